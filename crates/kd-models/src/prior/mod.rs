//! The Kandinsky 2.2 prior: `PriorTransformer`, the UnCLIP scheduler and the prior pipelines
//! (text → image embedding, image → image embedding, fusion, Emb2Emb).

pub mod pipeline;
pub mod transformer;
pub mod unclip;

pub use pipeline::{
    Emb2EmbImage, Emb2EmbRequest, FusionItem, FusionOptions, PriorOptions, PriorOutput,
    PriorRequest, PriorStack, TextConditioning,
};
pub use transformer::PriorTransformer;
pub use unclip::UnClipScheduler;
