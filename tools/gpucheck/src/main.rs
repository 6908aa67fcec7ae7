//! `kd-gpucheck`: runs the kd-models modules (CLIP text and vision towers, prior transformer,
//! decoder UNet, MoVQ decoder) on a device in one dtype against the fp32 diffusers references
//! that `tools/gpu/reference.py` wrote, and times the workloads that `tools/gpu/check.sh` reports.
//!
//! * `kd-gpucheck modules --refs DIR --prior-dir P --decoder-dir D --device cuda:0 --dtype f16`:
//!   one `parity` line per module (relative L2 error of each output against the reference) and
//!   one `time` line per workload of `DIR/manifest.json` (median seconds after one warm-up).
//! * `kd-gpucheck pipeline --prior-dir P --decoder-dir D --size 512 --prior-steps 25 --steps 50`:
//!   the whole text-to-image pipeline in this one process (`kd_models::pipeline::Text2Image`).
//!
//! Everything it reports is one JSON object per line on stdout; progress goes to stderr. A module
//! that fails prints an `error` line and the others still run (exit status 1 at the end).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use kd_models::clip::ClipTextEncoder;
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::pipeline::{PipelineTask, Text2Image, Text2ImageRequest};
use kd_models::prior::image_prior::ImagePrior;
use kd_models::prior::SampleParams;
use kd_models::unet::{UNet2DConditionModel, UNetConditioning};
use kd_models::{CheckpointDir, Variant};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "kd-gpucheck",
    about = "kd-models parity and timing on a device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Module parity against the references and per-workload timing.
    Modules(ModulesArgs),
    /// The whole text-to-image pipeline in-process, timed.
    Pipeline(PipelineArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// The prior checkpoint folder (text encoder, prior, image encoder).
    #[arg(long)]
    prior_dir: PathBuf,
    /// The decoder checkpoint folder (UNet, MoVQ).
    #[arg(long)]
    decoder_dir: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct ModulesArgs {
    #[command(flatten)]
    common: Common,
    /// The folder `reference.py` wrote (manifest.json and one safetensors file per module).
    #[arg(long)]
    refs: PathBuf,
    /// Modules to run (comma-separated): text_encoder, image_encoder, prior, unet, movq.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "text_encoder,image_encoder,prior,unet,movq"
    )]
    modules: Vec<String>,
    /// Timed iterations per workload (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Stop iterating a workload once it has run this long (seconds; at least one timed run).
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f64,
    /// Parity only, no timing.
    #[arg(long)]
    no_timing: bool,
}

#[derive(Args)]
struct PipelineArgs {
    #[command(flatten)]
    common: Common,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 25)]
    prior_steps: usize,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Runs; the first is a warm-up when there are more than one.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    #[arg(long, default_value = "a photo of a red fox in the snow")]
    prompt: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn open_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n).with_context(|| {
                format!("cannot open {s} (was kd-gpucheck built with --features cuda?)")
            }),
            None => bail!("unknown device `{s}` (allowed: cpu, cuda, cuda:N)"),
        },
    }
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unknown dtype `{s}` (allowed: f32, f16, bf16)"),
    })
}

/// Relative L2 error ‖a − b‖ / max(‖b‖, 1e-12), in f64 on the CPU; NaN/inf propagate.
fn rel_l2(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    if actual.dims() != expected.dims() {
        bail!("shape {:?}, reference {:?}", actual.dims(), expected.dims());
    }
    let a = actual
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let b = expected
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(1e-12))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// One warm-up, then up to `iters` timed runs (stopping after `max_s`); seconds per run.
fn time_runs(
    dev: &Device,
    iters: usize,
    max_s: f64,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<f64>)> {
    let t0 = Instant::now();
    f()?;
    dev.synchronize()?;
    let warm = t0.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
        if start.elapsed().as_secs_f64() > max_s {
            break;
        }
    }
    Ok((warm, times))
}

struct Ctx<'a> {
    dev: Device,
    dtype: DType,
    dtype_name: String,
    device_name: String,
    prior: CheckpointDir,
    decoder: CheckpointDir,
    refs_dir: &'a Path,
    manifest: Value,
    iters: usize,
    max_s: f64,
    timing: bool,
}

impl Ctx<'_> {
    fn refs(&self, module: &str) -> Result<HashMap<String, Tensor>> {
        let file = self.manifest["modules"][module]["file"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{module}.safetensors"));
        let path = self.refs_dir.join(file);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))
    }

    fn input(&self, refs: &HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
        let t = refs
            .get(&format!("in.{key}"))
            .ok_or_else(|| anyhow!("reference input `in.{key}` missing"))?;
        Ok(t.to_device(&self.dev)?)
    }

    fn float_input(&self, refs: &HashMap<String, Tensor>, key: &str) -> Result<Tensor> {
        Ok(self.input(refs, key)?.to_dtype(self.dtype)?)
    }

    fn parity(
        &self,
        module: &str,
        load_s: f64,
        refs: &HashMap<String, Tensor>,
        outputs: &[(&str, &Tensor)],
    ) -> Result<()> {
        let mut per = serde_json::Map::new();
        let mut worst: f64 = 0.0;
        for (name, got) in outputs {
            let want = refs
                .get(&format!("out.{name}"))
                .ok_or_else(|| anyhow!("reference output `out.{name}` missing"))?;
            let e = rel_l2(got, want).with_context(|| format!("{module} output {name}"))?;
            worst = if e.is_nan() || worst.is_nan() {
                f64::NAN
            } else {
                worst.max(e)
            };
            per.insert((*name).to_string(), json!(finite_or_str(e)));
        }
        eprintln!(
            "[kd-gpucheck] {module} {} on {}: rel L2 {worst:.3e} (load {load_s:.1} s)",
            self.dtype_name, self.device_name
        );
        emit(json!({
            "kind": "parity",
            "impl": "ours",
            "module": module,
            "dtype": self.dtype_name,
            "device": self.device_name,
            "rel_l2": finite_or_str(worst),
            "outputs": per,
            "load_s": load_s,
            "label": self.manifest["modules"][module]["label"],
        }));
        Ok(())
    }

    /// The timing workloads of `module` from the manifest, as (name, spec).
    fn workloads(&self, module: &str) -> Vec<(String, Value)> {
        if !self.timing {
            return Vec::new();
        }
        let mut v: Vec<(String, Value)> = self.manifest["timing"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, w)| w["module"] == module)
                    .map(|(k, w)| (k.clone(), w.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn timed(&self, name: &str, spec: &Value, f: impl FnMut() -> Result<()>) -> Result<()> {
        let (warm, times) = time_runs(&self.dev, self.iters, self.max_s, f)?;
        let med = median(&times);
        eprintln!(
            "[kd-gpucheck] {name} {}: {:.4} s median of {} (warm-up {warm:.2} s)",
            self.dtype_name,
            med,
            times.len()
        );
        emit(json!({
            "kind": "time",
            "impl": "ours",
            "workload": name,
            "label": spec["label"],
            "dtype": self.dtype_name,
            "device": self.device_name,
            "median_s": med,
            "times_s": times,
            "warmup_s": warm,
        }));
        Ok(())
    }

    fn usize_of(spec: &Value, key: &str) -> Result<usize> {
        spec[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("workload field `{key}` missing: {spec}"))
    }

    fn text_encoder(&self) -> Result<()> {
        let t0 = Instant::now();
        let te = ClipTextEncoder::load(&self.prior, self.dtype, &self.dev)?;
        self.dev.synchronize()?;
        let load_s = t0.elapsed().as_secs_f64();
        let refs = self.refs("text_encoder")?;
        let ids = self.input(&refs, "input_ids")?;
        let out = te.text_model().forward(&ids)?;
        self.parity(
            "text_encoder",
            load_s,
            &refs,
            &[
                ("text_embeds", &out.text_embeds),
                ("last_hidden_state", &out.last_hidden_state),
            ],
        )?;
        for (name, spec) in self.workloads("text_encoder") {
            self.timed(&name, &spec, || {
                te.text_model().forward(&ids)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn prior_modules(&self, text: bool, prior: bool) -> Result<()> {
        let t0 = Instant::now();
        let ip = ImagePrior::load(&self.prior, self.dtype, &self.dev)?;
        self.dev.synchronize()?;
        let load_s = t0.elapsed().as_secs_f64();
        if text {
            let refs = self.refs("image_encoder")?;
            let px = self.float_input(&refs, "pixel_values")?;
            let emb = ip.encode_pixels(&px)?;
            self.parity("image_encoder", load_s, &refs, &[("image_embeds", &emb)])?;
            for (name, spec) in self.workloads("image_encoder") {
                self.timed(&name, &spec, || {
                    ip.encode_pixels(&px)?;
                    Ok(())
                })?;
            }
        }
        if prior {
            let refs = self.refs("prior")?;
            let hs = self.float_input(&refs, "hidden_states")?;
            let proj = self.float_input(&refs, "proj_embedding")?;
            let ehs = self.float_input(&refs, "encoder_hidden_states")?;
            // 0/1 as u32, as the prior service passes it (the reference stores i64).
            let mask = refs
                .get("in.attention_mask")
                .ok_or_else(|| anyhow!("reference input `in.attention_mask` missing"))?
                .to_dtype(DType::U32)?
                .to_device(&self.dev)?;
            let t = self.manifest["modules"]["prior"]["timestep"]
                .as_f64()
                .unwrap_or(500.0) as f32;
            let p = ip.prior();
            let out = p.forward(&hs, &[t], &proj, &ehs, Some(&mask))?;
            self.parity(
                "prior",
                load_s,
                &refs,
                &[("predicted_image_embedding", &out)],
            )?;
            for (name, spec) in self.workloads("prior") {
                let b = Self::usize_of(&spec, "batch")?;
                let rows = |x: &Tensor| -> Result<Tensor> {
                    let r = x.dim(0)?;
                    Ok(if r == b {
                        x.clone()
                    } else {
                        x.narrow(0, 0, 1)?.repeat(prepend_one(b, x.rank()))?
                    })
                };
                let (hs, proj, ehs, mask) = (rows(&hs)?, rows(&proj)?, rows(&ehs)?, rows(&mask)?);
                self.timed(&name, &spec, || {
                    p.forward(&hs, &[t], &proj, &ehs, Some(&mask))?;
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    fn unet(&self) -> Result<()> {
        let t0 = Instant::now();
        let comp = self.decoder.component("unet")?;
        let cfg = comp.unet_config()?;
        let vb = comp
            .weights(Variant::Default)?
            .var_builder(self.dtype, &self.dev);
        let unet = UNet2DConditionModel::new(&cfg, vb)?;
        self.dev.synchronize()?;
        let load_s = t0.elapsed().as_secs_f64();
        let refs = self.refs("unet")?;
        let sample = self.float_input(&refs, "sample")?;
        let embeds = self.float_input(&refs, "image_embeds")?;
        let t = self.manifest["modules"]["unet"]["timestep"]
            .as_f64()
            .unwrap_or(500.0);
        let out = unet.forward(&sample, t, &UNetConditioning::image(&embeds))?;
        self.parity("unet", load_s, &refs, &[("sample", &out)])?;
        for (name, spec) in self.workloads("unet") {
            let b = Self::usize_of(&spec, "batch")?;
            let l = Self::usize_of(&spec, "latent")?;
            let c = cfg.in_channels;
            let x = Tensor::randn(0f32, 1.0, (b, c, l, l), &self.dev)?.to_dtype(self.dtype)?;
            let e =
                Tensor::randn(0f32, 1.0, (b, unet.embed_dim()), &self.dev)?.to_dtype(self.dtype)?;
            self.timed(&name, &spec, || {
                unet.forward(&x, t, &UNetConditioning::image(&e))?;
                Ok(())
            })?;
        }
        Ok(())
    }

    fn movq(&self) -> Result<()> {
        let t0 = Instant::now();
        let vq = VqModel::load(
            &self.decoder.component("movq")?,
            MovqOptions::default(),
            self.dtype,
            &self.dev,
        )?;
        self.dev.synchronize()?;
        let load_s = t0.elapsed().as_secs_f64();
        let refs = self.refs("movq")?;
        let z = self.float_input(&refs, "latents")?;
        let out = vq.decode(&z)?;
        self.parity("movq", load_s, &refs, &[("decoded", &out)])?;
        for (name, spec) in self.workloads("movq") {
            let b = Self::usize_of(&spec, "batch")?;
            let l = Self::usize_of(&spec, "latent")?;
            let c = vq.config().latent_channels;
            let x = Tensor::randn(0f32, 1.0, (b, c, l, l), &self.dev)?.to_dtype(self.dtype)?;
            self.timed(&name, &spec, || {
                vq.decode(&x)?;
                Ok(())
            })?;
        }
        Ok(())
    }
}

fn prepend_one(b: usize, rank: usize) -> Vec<usize> {
    let mut v = vec![1; rank];
    v[0] = b;
    v
}

fn finite_or_str(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

fn modules(a: ModulesArgs) -> Result<bool> {
    let dev = open_device(&a.common.device)?;
    let dtype = parse_dtype(&a.common.dtype)?;
    let manifest_path = a.refs.join("manifest.json");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let ctx = Ctx {
        dev: dev.clone(),
        dtype,
        dtype_name: a.common.dtype.clone(),
        device_name: a.common.device.clone(),
        prior: CheckpointDir::open(&a.common.prior_dir)?,
        decoder: CheckpointDir::open(&a.common.decoder_dir)?,
        refs_dir: &a.refs,
        manifest,
        iters: a.iters,
        max_s: a.max_seconds,
        timing: !a.no_timing,
    };
    let want = |m: &str| a.modules.iter().any(|x| x == m);
    let mut ok = true;
    let mut run = |module: &str, r: Result<()>| {
        if let Err(e) = r {
            ok = false;
            let msg = format!("{e:#}");
            eprintln!("[kd-gpucheck] {module} {}: ERROR {msg}", ctx.dtype_name);
            emit(json!({
                "kind": "error",
                "impl": "ours",
                "module": module,
                "dtype": ctx.dtype_name,
                "device": ctx.device_name,
                "error": msg,
            }));
        }
    };
    // candle's CPU backend has no bf16 matmul or convolution.
    if dev.is_cpu() && dtype == DType::BF16 {
        for m in &a.modules {
            emit(json!({
                "kind": "skip", "impl": "ours", "module": m, "dtype": "bf16",
                "device": ctx.device_name,
                "reason": "candle's CPU backend has no bf16 matmul/convolution",
            }));
        }
        return Ok(true);
    }
    if want("text_encoder") {
        run("text_encoder", ctx.text_encoder());
    }
    if want("image_encoder") || want("prior") {
        let name = match (want("image_encoder"), want("prior")) {
            (true, true) => "image_encoder+prior",
            (true, false) => "image_encoder",
            _ => "prior",
        };
        run(
            name,
            ctx.prior_modules(want("image_encoder"), want("prior")),
        );
    }
    if want("unet") {
        run("unet", ctx.unet());
    }
    if want("movq") {
        run("movq", ctx.movq());
    }
    Ok(ok)
}

fn pipeline(a: PipelineArgs) -> Result<bool> {
    let dev = open_device(&a.common.device)?;
    let dtype = parse_dtype(&a.common.dtype)?;
    let t0 = Instant::now();
    let t2i = Text2Image::load(
        &CheckpointDir::open(&a.common.prior_dir)?,
        &CheckpointDir::open(&a.common.decoder_dir)?,
        dtype,
        &dev,
    )?;
    dev.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let req = Text2ImageRequest {
        prompt: a.prompt.clone(),
        negative_prompt: None,
        height: a.size,
        width: a.size,
        seeds: vec![a.seed],
        prior: SampleParams {
            num_inference_steps: a.prior_steps,
            guidance_scale: 4.0,
        },
        decoder_steps: a.steps,
        decoder_guidance: 4.0,
        decoder_timesteps: None,
        task: PipelineTask::Text,
    };
    let mut runs = Vec::new();
    for i in 0..a.runs.max(1) {
        let t = Instant::now();
        let out = t2i.generate(&req)?;
        dev.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "[kd-gpucheck] pipeline run {i}: {s:.2} s ({} image(s) {}x{})",
            out.images.len(),
            out.images[0].width(),
            out.images[0].height()
        );
        runs.push(s);
    }
    let timed = if runs.len() > 1 {
        &runs[1..]
    } else {
        &runs[..]
    };
    emit(json!({
        "kind": "pipeline",
        "impl": "ours-inprocess",
        "dtype": a.common.dtype,
        "device": a.common.device,
        "size": a.size,
        "prior_steps": a.prior_steps,
        "steps": a.steps,
        "load_s": load_s,
        "runs_s": runs,
        "median_s": median(timed),
    }));
    Ok(true)
}

fn main() -> std::process::ExitCode {
    // The heap policy of the stage binaries, so that timings and peak RSS are theirs.
    kd_models::retain_freed_memory();
    let r = match Cli::parse().command {
        Command::Modules(a) => modules(a),
        Command::Pipeline(a) => pipeline(a),
    };
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kd-gpucheck: {e:#}");
            emit(json!({"kind": "error", "impl": "ours", "error": format!("{e:#}")}));
            std::process::ExitCode::FAILURE
        }
    }
}
