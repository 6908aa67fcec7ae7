//! Kandinsky 2.0's sampling: the guided-diffusion code of the official `kandinsky2` package
//! (ai-forever/Kandinsky-2 `aeefc1c`: `model/gaussian_diffusion.py`, `model/respace.py`,
//! `model/samplers.py`, `model/model_creation.py`, `kandinsky2_model.py: generate_img` and
//! friends), pure math around a model callback.
//!
//! * [`GaussianDiffusion`]: `create_gaussian_diffusion(**config)` (always a `SpacedDiffusion`):
//!   β, ᾱ, posterior tables in f64, `timestep_respacing` ([`space_timesteps`]),
//!   `p_mean_variance` / `p_sample` / `p_sample_loop`, the img2img `q_sample`.
//! * [`DdimSampler`], [`PlmsSampler`]: `samplers.py` on the 1000-step diffusion.
//! * [`GenerateImg`]: `generate_img` (CFG via [`guided_model_fn`], the sampler branches, the
//!   inpainting `denoised_fn`); [`pipeline_diffusion`], [`img2img_start`], [`prepare_mask`].
//!
//! **The model callback** is `FnMut(&Tensor x, &Tensor t) -> Result<Tensor>`: the UNet as the
//! official code calls it. `t` is an f32 tensor with one value per row: for the p-sampler the
//! respaced index mapped through `timestep_map` and rescaled (`· 1000 / steps`, in f32), for
//! DDIM/PLMS the raw DDIM timestep (a `torch.long` there; integer-valued here). The output is
//! `(B, 2C, …)` (ε then variance values) for learned-sigma diffusions, `(B, C, …)` or `(B, 2C,
//! …)` for DDIM/PLMS (only ε is read). All Gaussian noise is drawn from a
//! [`NoiseSource`](crate::noise::NoiseSource) in the official draw order, so recorded torch
//! draws replay exactly; arithmetic is f32 on f32 scalars cast from the f64 tables, in torch's
//! operation order.
//!
//! # Quirks of the official code, reproduced
//!
//! 1. **Dynamic thresholding from batch element 0.** `p_mean_variance(clip_denoised=True)`
//!    (the p-sampler's default, never turned off by the pipeline) takes
//!    `s = max(np.percentile(|x₀[0]|, 99.5), 1)` — the hard-coded 99.5th percentile of the
//!    *first* batch element only (NumPy "linear", computed in f32) — and applies
//!    `clip(x₀, −s, s) / s` to the **whole** batch: other prompts and the unconditional half
//!    use row 0's threshold.
//! 2. **`dynamic_threshold_v` / `denoised_type` do nothing outside inpainting.** Text2img and
//!    img2img define a `denoised_fn` but pass `None`; the p-sampler thresholds at 99.5 anyway.
//! 3. **Inpainting thresholds twice.** The p-sampler's `denoised_fn` thresholds at
//!    `dynamic_threshold_v` (or clamps), blends `x₀·(1 − mask) + init·mask`, and then
//!    `clip_denoised` applies the 99.5 threshold of row 0 to the blended x₀.
//! 4. **DDIM/PLMS never threshold and never blend.** The samplers ignore `denoised_fn` and
//!    `clip_denoised`: DDIM/PLMS inpainting only has the UNet's inpainting inputs.
//! 5. **`ddim_eta` never reaches DDIM.** `generate_img` rebinds `sampler` to the sampler object
//!    before `if sampler == "ddim_sampler"`, so the `else` branch calls `sample` without `eta`:
//!    DDIM always runs deterministically (eta 0), whatever `ddim_eta` (0.8 / 0.05 defaults).
//! 6. **Draws that are multiplied by 0.** `p_sample` draws `randn_like(x)` at index 0 too;
//!    DDIM/PLMS draw `randn(shape)` at every update even with σ = 0, PLMS twice in its first
//!    step. An initial `randn` is drawn when no `x_T` is given.
//! 7. **DDIM timesteps are `range(0, 1000, 1000 // S) + 1`.** Offset by one (S = 10: 901 … 1),
//!    the final update goes to `ᾱ[0]`, not 1; the step count is that of the range (S = 6 gives 7
//!    steps, S = 7 gives 8); when `1000 // S` divides 999 (S = 3, S > 500) the range ends at
//!    1000 and the official code fails indexing ᾱ — refused here (`num_steps`). The UNet gets
//!    the raw timestep; the samplers need the unrespaced 1000-step diffusion.
//! 8. **Respacing.** `space_timesteps` rounds half to even (`"7"`: 0, 166, 333, 500, 666, 832,
//!    999); `"ddimN"` uses the +1 DDIM striding (`"ddim4"`: 1, 251, 501, 751 — never 0), its
//!    member 1000 (N > 500, …) is dropped silently; `int()` accepts `" 6 "`, `"+3"`, `"1_0"`; a
//!    section count ≤ 0 takes no steps. Even without respacing β is re-derived from ᾱ ratios.
//!    A diffusion with fewer than 2 steps fails officially (`posterior_variance[1]`): refused.
//! 9. **CFG feeds the conditional half twice.** `model_fn` runs the UNet on
//!    `cat([x[:B], x[:B]])` with the (cond, uncond) text conditioning; the unconditional half
//!    of the state is never seen by the UNet. The guided ε goes to both halves; for the
//!    p-sampler each half keeps its own variance channels. Only `samples[:B]` is returned.
//! 10. **img2img.** `start_step = int(num_timesteps · (1 − strength))`; `q_sample` at
//!     `timestep_map[start_step − 1]` on a linear 1e-4 … 0.02 schedule hard-coded in
//!     `model/utils.py` (config `linear_start`/`linear_end` ignored), one draw of the init
//!     latents' shape, then `repeat(2)`. DDIM/PLMS then start at the largest DDIM timestep
//!     `<= start_step` (strength 0.7, 10 steps: noised to 299, first step at 201).
//!     `start_step = 0` (p: the loop has no step and fails; DDIM: returns the noised latents)
//!     is refused (`strength`).
//! 11. **PLMS.** The first step is improved Euler with the second UNet call at the *next*
//!     timestep (the same one on the last step); the ε history keeps the plain ε, up to 3.
//! 12. **`prepare_mask`** zeroes six of the eight neighbours of every pixel that is not 1 (not
//!     up-right nor down-left).
//!
//! Refused by name ([`ModelError::invalid`](crate::ModelError::invalid)): `num_steps` 0 (and
//! DDIM counts past 1000), unknown `sampler` / `denoised_type` names, bad
//! `timestep_respacing` strings, `dynamic_threshold_v` outside 0 ..= 100, `init_step` /
//! `strength` leaving no step, odd CFG batches.

mod diffusion;
mod pipeline;
mod respace;
mod samplers;
mod threshold;

pub use diffusion::{
    named_beta_schedule, DiffusionConfig, GaussianDiffusion, MeanType, MeanVariance,
    PSampleOptions, VarType,
};
pub use pipeline::{
    guided_model_fn, img2img_start, pipeline_diffusion, prepare_mask, GenerateImg, Img2ImgStart,
    SamplerKind,
};
pub use respace::space_timesteps;
pub use samplers::{
    DdimSampler, DdimSchedule, PlmsSampler, SamplerStep, StepObserver, DDPM_NUM_TIMESTEPS,
};
pub use threshold::{
    dynamic_threshold, dynamic_threshold_scale, np_percentile, DenoisedFn, DenoisedType,
};
