//! Kandinsky model code: typed configs, diffusers-format checkpoint loading, the models, the
//! schedulers and the pipelines, on candle. Pure and synchronous: no tokio, no gRPC.

pub mod amused;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod conv;
pub mod decoder;
pub mod dense;
pub mod error;
pub mod image;
pub mod interrupt;
pub mod kd20;
pub mod kl;
pub mod mclip;
pub mod movq;
pub mod noise;
pub mod norm;
pub mod pipeline;
pub mod prior;
pub mod schedulers;
pub mod unet;
pub mod uvit;

pub use kd_kernels::retain_freed_memory;

pub use checkpoint::{CheckpointDir, ComponentDir, ModelFamily, Variant, Weights};
pub use error::{ModelError, Result};
