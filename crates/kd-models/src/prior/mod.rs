//! The Kandinsky 2.2 prior: `PriorTransformer`, the UnCLIP scheduler, the sampler over explicit
//! conditioning ([`ImagePrior`]) and the prompt-level pipelines (text → image embedding,
//! image → image embedding, fusion, Emb2Emb).

pub mod fusion;
pub mod image_prior;
pub mod pipeline;
pub mod transformer;
pub mod unclip;

pub use image_prior::{FusionInput, ImagePrior, PriorRun, SampleParams};
pub use pipeline::{
    Emb2EmbImage, Emb2EmbRequest, FusionItem, FusionOptions, PriorOptions, PriorOutput,
    PriorRequest, PriorStack, TextConditioning,
};
pub use transformer::PriorTransformer;
pub use unclip::UnClipScheduler;
