//! The Kandinsky 2.2 prior: `PriorTransformer`, the UnCLIP scheduler and the prior pipelines
//! (text → image embedding, image → image embedding, fusion, Emb2Emb).

pub mod transformer;
pub mod unclip;
