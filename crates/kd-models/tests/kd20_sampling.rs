//! Kandinsky 2.0 sampling (`kd_models::schedulers::guided`) against the official `kandinsky2`
//! code (`tests/fixtures/kd20-sampling`, made by `tools/reference/gen_kd20_sampling.py`).
//!
//! Every case replays the official run: a replaying model callback checks each call's input x
//! (≤ 1e-4 relative L2, and for CFG that the input is `cat([half, half])` exactly) and timestep
//! (exact) and returns the recorded output; every torch draw is replayed with [`ReplayNoise`]
//! (all of them consumed); the final samples must match to ≤ 1e-4 relative L2. Cases: the
//! p-sampler without CFG (with / without the dynamic threshold, respacings "4" and "2,2"), the
//! pipeline's p-sampler with CFG (`generate_text2img`, thresholded; `generate_img` on "ddim4"
//! without), DDIM (eta 0.5 without CFG; the pipeline's, eta 0) and PLMS (without / with CFG),
//! img2img with the p-sampler and DDIM (`generate_img2img`: the q_sample start), inpainting with
//! the p-sampler (`denoised_fn` at `dynamic_threshold_v` 90 + the 99.5 threshold). Schedules
//! (respacing, diffusion tables, DDIM parameters, img2img start steps, NumPy percentiles) are
//! compared with `schedules.json`, and bad arguments are refused by name.

use candle_core::{DType, Device, Tensor};
use kd_models::noise::ReplayNoise;
use kd_models::schedulers::guided::{
    dynamic_threshold, guided_model_fn, img2img_start, np_percentile, pipeline_diffusion,
    prepare_mask, space_timesteps, DdimSampler, DdimSchedule, DenoisedType, DiffusionConfig,
    GaussianDiffusion, GenerateImg, PSampleOptions, PlmsSampler, SamplerKind,
};
use kd_models::{ModelError, Result};
use kd_testkit::parity::{fixtures_dir, get, load_reference, rel_l2};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Relative L2 bound for every model input and final sample.
const TOL: f64 = 1e-4;
const CHW: [usize; 3] = [4, 8, 8];

struct Fixture {
    refs: HashMap<String, Tensor>,
    meta: Value,
    sched: Value,
}

fn fx() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixtures_dir().join("kd20-sampling");
        let read = |n: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(n)).unwrap()).unwrap()
        };
        Fixture {
            refs: load_reference(dir.join("sampling.safetensors")).unwrap(),
            meta: read("sampling.json"),
            sched: read("schedules.json"),
        }
    })
}

fn cfg() -> DiffusionConfig {
    DiffusionConfig::kandinsky_2_0()
}

fn f32_of(key: &str) -> Tensor {
    get(&fx().refs, key).to_dtype(DType::F32).unwrap()
}

fn field(e: ModelError) -> &'static str {
    match e {
        ModelError::InvalidInput { field, .. } => field,
        other => panic!("expected an InvalidInput error, got {other}"),
    }
}

/// The recorded model: checks each call's (x, t) and returns the recorded output.
struct Replay {
    case: &'static str,
    x: Tensor,
    t: Vec<f32>,
    out: Tensor,
    cfg: bool,
    calls: usize,
    worst_x: f64,
}

impl Replay {
    fn new(case: &'static str) -> Self {
        let meta = &fx().meta["cases"][case];
        Self {
            case,
            x: f32_of(&format!("{case}.x")),
            t: get(&fx().refs, &format!("{case}.t")).to_vec1().unwrap(),
            out: f32_of(&format!("{case}.out")),
            cfg: meta["cfg"].as_bool().unwrap(),
            calls: 0,
            worst_x: 0.0,
        }
    }

    fn call(&mut self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (case, k) = (self.case, self.calls);
        assert!(
            k < self.t.len(),
            "{case}: more model calls than the {} recorded",
            self.t.len()
        );
        let n = x.dim(0)?;
        let seen = if self.cfg {
            let (a, b) = (x.narrow(0, 0, n / 2)?, x.narrow(0, n / 2, n / 2)?);
            let same = (a
                .ne(&b)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?)
                == 0.0;
            assert!(
                same,
                "{case} call {k}: the CFG model input is not cat([half, half])"
            );
            a
        } else {
            x.clone()
        };
        let err = rel_l2(&seen, &self.x.get(k)?)?;
        assert!(
            err <= TOL,
            "{case} call {k}: model input x off by {err:e} (rel L2)"
        );
        self.worst_x = self.worst_x.max(err);
        let tv: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
        assert_eq!(tv.len(), n, "{case} call {k}: one timestep per row");
        assert!(
            tv.iter().all(|&v| v == self.t[k]),
            "{case} call {k}: timestep {tv:?}, recorded {}",
            self.t[k]
        );
        self.calls += 1;
        Ok(self.out.get(k)?)
    }

    fn finish(&self, sample: &Tensor, noise: &ReplayNoise) -> (f64, f64) {
        let case = self.case;
        assert_eq!(self.calls, self.t.len(), "{case}: model calls");
        assert_eq!(noise.remaining(), 0, "{case}: unconsumed noise draws");
        let err = rel_l2(sample, &f32_of(&format!("{case}.sample"))).unwrap();
        println!(
            "{case}: {} calls, worst input x rel L2 {:.2e}, final sample rel L2 {err:.2e}",
            self.calls, self.worst_x
        );
        assert!(err <= TOL, "{case}: final sample off by {err:e} (rel L2)");
        (self.worst_x, err)
    }
}

fn noise_of(case: &str) -> ReplayNoise {
    ReplayNoise::from_stacked(&f32_of(&format!("{case}.noise"))).unwrap()
}

fn meta(case: &str) -> &'static Value {
    &fx().meta["cases"][case]
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Whole sampling runs

#[test]
fn p_sample_loop_without_cfg() {
    let dev = Device::Cpu;
    for (case, clip) in [("p_plain_thresh", true), ("p_plain_nothresh", false)] {
        let m = meta(case);
        assert_eq!(m["clip_denoised"].as_bool(), Some(clip));
        let d = GaussianDiffusion::new(&cfg().with_respacing(m["respacing"].as_str().unwrap()))
            .unwrap();
        assert_eq!(
            d.timestep_map(),
            usizes(&m["timestep_map"]).as_slice(),
            "{case}"
        );
        let mut replay = Replay::new(case);
        let mut noise = noise_of(case);
        let opts = PSampleOptions {
            clip_denoised: clip,
            ..PSampleOptions::official()
        };
        let mut model = |x: &Tensor, t: &Tensor| replay.call(x, t);
        let sample = d
            .p_sample_loop(&mut model, &[2, 4, 8, 8], None, &opts, &mut noise, &dev)
            .unwrap();
        replay.finish(&sample, &noise);
    }
}

fn run_pipeline(
    case: &'static str,
    d: &GaussianDiffusion,
    args: &GenerateImg,
    x_t: Option<&Tensor>,
    inpaint: Option<(&Tensor, &Tensor)>,
    mut noise: ReplayNoise,
) {
    let mut replay = Replay::new(case);
    let mut unet = |x: &Tensor, t: &Tensor| replay.call(x, t);
    let sample = args
        .run(d, CHW, x_t, inpaint, &mut unet, &mut noise, &Device::Cpu)
        .unwrap();
    assert_eq!(sample.dims(), &[args.batch_size, 4, 8, 8], "{case}");
    replay.finish(&sample, &noise);
}

fn pipeline_args(case: &str) -> GenerateImg {
    let m = meta(case);
    let sampler: SamplerKind = m["sampler"].as_str().unwrap().parse().unwrap();
    let mut a = GenerateImg::new(sampler, m["batch"].as_u64().unwrap() as usize);
    a.guidance_scale = m["guidance_scale"].as_f64().unwrap();
    if let Some(n) = m["num_steps"].as_u64() {
        a.num_steps = n as usize;
    }
    if let Some(e) = m["ddim_eta"].as_f64() {
        a.ddim_eta = e;
    }
    a
}

#[test]
fn p_sampler_pipeline_with_cfg() {
    // generate_text2img: respacing str(num_steps), the 99.5 threshold of row 0
    let case = "p_cfg_thresh";
    let args = pipeline_args(case);
    let d = pipeline_diffusion(&cfg(), SamplerKind::P, args.num_steps).unwrap();
    run_pipeline(case, &d, &args, None, None, noise_of(case));

    // generate_img on a "ddim4" diffusion whose p_sample_loop has clip_denoised=False
    let case = "p_cfg_nothresh";
    let mut args = pipeline_args(case);
    args.clip_denoised = false;
    let d = GaussianDiffusion::new(&cfg().with_respacing("ddim4")).unwrap();
    assert_eq!(
        d.timestep_map(),
        usizes(&meta(case)["timestep_map"]).as_slice()
    );
    run_pipeline(case, &d, &args, None, None, noise_of(case));
}

#[test]
fn ddim_and_plms_without_cfg() {
    let dev = Device::Cpu;
    let d = GaussianDiffusion::new(&cfg()).unwrap();

    let case = "ddim_plain";
    let m = meta(case);
    let s = DdimSampler::new(
        &d,
        m["steps"].as_u64().unwrap() as usize,
        m["eta"].as_f64().unwrap(),
        None,
    )
    .unwrap();
    let mut replay = Replay::new(case);
    let mut noise = noise_of(case);
    let mut model = |x: &Tensor, t: &Tensor| replay.call(x, t);
    let sample = s
        .sample(&mut model, &[2, 4, 8, 8], None, &mut noise, &dev)
        .unwrap();
    replay.finish(&sample, &noise);

    let case = "plms_plain";
    let s = PlmsSampler::new(&d, meta(case)["steps"].as_u64().unwrap() as usize, None).unwrap();
    let mut replay = Replay::new(case);
    let mut noise = noise_of(case);
    let mut model = |x: &Tensor, t: &Tensor| replay.call(x, t);
    let sample = s
        .sample(&mut model, &[2, 4, 8, 8], None, &mut noise, &dev)
        .unwrap();
    replay.finish(&sample, &noise);
}

#[test]
fn ddim_and_plms_pipeline_with_cfg() {
    for case in ["ddim_cfg", "plms_cfg"] {
        let args = pipeline_args(case);
        // the official ddim_eta (0.05 here) never reaches the sampler: eta 0 reproduces it
        assert_eq!(args.ddim_eta, 0.05);
        let d = pipeline_diffusion(&cfg(), args.sampler, args.num_steps).unwrap();
        assert_eq!(d.num_timesteps(), 1000);
        run_pipeline(case, &d, &args, None, None, noise_of(case));
    }
}

#[test]
fn img2img_start_and_sampling() {
    for case in ["img2img_p", "img2img_ddim"] {
        let m = meta(case);
        let mut args = pipeline_args(case);
        let d = pipeline_diffusion(&cfg(), args.sampler, args.num_steps).unwrap();
        // the q_sample draw comes first, then the loop's
        let mut draws = vec![f32_of(&format!("{case}.q_noise"))];
        let loop_noise = f32_of(&format!("{case}.noise"));
        for i in 0..loop_noise.dim(0).unwrap() {
            draws.push(loop_noise.get(i).unwrap());
        }
        let mut noise = ReplayNoise::new(draws);
        let init = f32_of(&format!("{case}.init_latents"));
        let start = img2img_start(&d, &init, m["strength"].as_f64().unwrap(), &mut noise).unwrap();
        assert_eq!(
            start.init_step as u64,
            m["init_step"].as_u64().unwrap(),
            "{case}"
        );
        assert_eq!(start.timestep as u64, m["q_t"].as_u64().unwrap(), "{case}");
        let err = rel_l2(&start.x_t, &f32_of(&format!("{case}.x_T"))).unwrap();
        println!("{case}: q_sample start rel L2 {err:.2e}");
        assert!(err <= 1e-6, "{case}: q_sample start off by {err:e}");
        args.init_step = Some(start.init_step);
        run_pipeline(case, &d, &args, Some(&start.x_t), None, noise);
    }
}

#[test]
fn inpainting_p_sampler() {
    let case = "inpaint_p";
    let m = meta(case);
    let mut args = pipeline_args(case);
    args.dynamic_threshold_v = m["dynamic_threshold_v"].as_f64().unwrap();
    args.denoised_type = m["denoised_type"].as_str().unwrap().parse().unwrap();
    assert_eq!(args.denoised_type, DenoisedType::DynamicThreshold);
    let d =
        GaussianDiffusion::new(&cfg().with_respacing(m["respacing"].as_str().unwrap())).unwrap();
    let init = f32_of("inpaint_p.init_img");
    let mask = f32_of("inpaint_p.img_mask");
    // utils.prepare_mask on the nearest-resized mask, then repeat(2)
    let prepared = prepare_mask(&f32_of("inpaint_p.mask_raw")).unwrap();
    let want = mask.narrow(0, 0, 1).unwrap();
    assert_eq!(
        prepared.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "prepare_mask"
    );
    run_pipeline(case, &d, &args, None, Some((&init, &mask)), noise_of(case));
}

// ------------------------------------------------------------------------------------------
// Schedules and helpers against schedules.json

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_rel(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1e-300);
        assert!(err <= tol, "{what}[{i}]: {g} vs {w} (rel {err:e})");
    }
}

#[test]
fn config_is_config_2_0() {
    let c: DiffusionConfig = serde_json::from_value(fx().sched["config"].clone()).unwrap();
    assert_eq!(c, DiffusionConfig::kandinsky_2_0());
}

#[test]
fn space_timesteps_matches_respace_py() {
    for (spec, want) in fx().sched["space_timesteps"].as_object().unwrap() {
        let got = space_timesteps(1000, spec).unwrap();
        assert_eq!(got, usizes(want), "space_timesteps(1000, {spec:?})");
    }
    for (spec, official) in fx().sched["space_timesteps_errors"].as_object().unwrap() {
        let e = GaussianDiffusion::new(&cfg().with_respacing(spec))
            .expect_err(&format!("{spec:?} must be refused (official: {official})"));
        assert_eq!(field(e), "timestep_respacing", "{spec:?}");
    }
}

#[test]
fn diffusion_tables_match() {
    for (spec, want) in fx().sched["diffusion"].as_object().unwrap() {
        let d = GaussianDiffusion::new(&cfg().with_respacing(spec)).unwrap();
        assert_eq!(
            d.num_timesteps() as u64,
            want["num_timesteps"].as_u64().unwrap()
        );
        assert_eq!(d.original_num_steps(), 1000);
        let index: Vec<usize> = match want.get("index") {
            Some(ix) => usizes(ix),
            None => {
                assert_eq!(d.timestep_map(), usizes(&want["timestep_map"]).as_slice());
                (0..d.num_timesteps()).collect()
            }
        };
        for name in [
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_variance",
            "posterior_log_variance_clipped",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "log_betas",
        ] {
            let table = d.table(name).unwrap();
            let got: Vec<f64> = index.iter().map(|&i| table[i]).collect();
            // cumulative products and libm logs: the last ulps may differ
            assert_rel(
                &format!("{spec:?} {name}"),
                &got,
                &floats(&want[name]),
                1e-13,
            );
        }
    }
}

#[test]
fn model_timesteps_are_mapped_and_rescaled() {
    let d = GaussianDiffusion::new(&cfg().with_respacing("5")).unwrap();
    let t: Vec<f32> = (0..5).map(|i| d.model_timestep(i)).collect();
    assert_eq!(t, [0.0, 250.0, 500.0, 749.0, 999.0]);
}

#[test]
fn ddim_schedules_match() {
    let d = GaussianDiffusion::new(&cfg()).unwrap();
    for (key, want) in fx().sched["ddim"].as_object().unwrap() {
        let steps = want["steps"].as_u64().unwrap() as usize;
        let init = want["init_step"].as_u64().map(|v| v as usize);
        let s = DdimSchedule::new(&d, steps, want["eta"].as_f64().unwrap(), init).unwrap();
        assert_eq!(s.timesteps, usizes(&want["timesteps"]), "{key}");
        assert_rel(
            &format!("{key} alphas"),
            &s.alphas,
            &floats(&want["alphas"]),
            1e-13,
        );
        assert_rel(
            &format!("{key} alphas_prev"),
            &s.alphas_prev,
            &floats(&want["alphas_prev"]),
            1e-13,
        );
        let ws = floats(&want["sigmas"]);
        assert_eq!(s.sigmas.len(), ws.len(), "{key} sigmas");
        for (g, w) in s.sigmas.iter().zip(&ws) {
            assert!(
                (g - w).abs() <= 1e-13 * w.abs().max(1e-3),
                "{key} sigma {g} vs {w}"
            );
        }
    }
}

#[test]
fn img2img_start_steps_match() {
    let mut by_n: HashMap<u64, GaussianDiffusion> = HashMap::new();
    for row in fx().sched["img2img_start"].as_array().unwrap() {
        let (n, strength, want) = (
            row[0].as_u64().unwrap(),
            row[1].as_f64().unwrap(),
            row[2].as_i64().unwrap(),
        );
        let d = by_n
            .entry(n)
            .or_insert_with(|| pipeline_diffusion(&cfg(), SamplerKind::P, n as usize).unwrap());
        match d.img2img_start_step(strength) {
            Ok(s) => assert_eq!(s as i64, want, "n {n} strength {strength}"),
            Err(e) => {
                assert!(
                    want < 1,
                    "n {n} strength {strength}: refused, official {want}"
                );
                assert_eq!(field(e), "strength");
            }
        }
    }
}

#[test]
fn numpy_percentile_is_bit_exact() {
    for case in fx().sched["percentile"].as_array().unwrap() {
        let values: Vec<f32> = floats(&case["values"]).iter().map(|&v| v as f32).collect();
        for (p, want) in case["results"].as_object().unwrap() {
            let mut abs: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            let got = np_percentile(&mut abs, p.parse().unwrap()).unwrap();
            assert_eq!(
                got,
                want.as_f64().unwrap() as f32,
                "n {} p {p}",
                values.len()
            );
        }
    }
}

#[test]
fn dynamic_threshold_uses_row_zero_for_the_whole_batch() {
    let dev = Device::Cpu;
    // row 0 within [-1, 1] (s = 1: unchanged), row 1 far outside: row 1 is clipped to ±1
    let row0: Vec<f32> = (0..256).map(|i| (i as f32 / 255.0) * 1.8 - 0.9).collect();
    let row1: Vec<f32> = row0.iter().map(|v| v * 10.0).collect();
    let x = Tensor::from_vec([row0.clone(), row1].concat(), (2, 4, 8, 8), &dev).unwrap();
    let y = dynamic_threshold(&x, 99.5).unwrap();
    let y0: Vec<f32> = y.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let y1: Vec<f32> = y.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(y0, row0);
    assert!(y1.iter().all(|v| v.abs() <= 1.0) && y1.iter().any(|v| v.abs() == 1.0));
}

// ------------------------------------------------------------------------------------------
// Refusals

#[test]
fn bad_arguments_are_refused_by_name() {
    let dev = Device::Cpu;
    let official = &fx().sched;
    let d1000 = GaussianDiffusion::new(&cfg()).unwrap();

    // sampler / denoised_type names
    assert_eq!(
        field("k_sampler".parse::<SamplerKind>().unwrap_err()),
        "sampler"
    );
    assert_eq!(field("DDIM".parse::<SamplerKind>().unwrap_err()), "sampler");
    assert_eq!(
        field("threshold".parse::<DenoisedType>().unwrap_err()),
        "denoised_type"
    );

    // steps 0 (official ZeroDivisionError / respacing "0" AssertionError)
    assert_eq!(
        field(pipeline_diffusion(&cfg(), SamplerKind::P, 0).unwrap_err()),
        "num_steps"
    );
    assert_eq!(
        field(pipeline_diffusion(&cfg(), SamplerKind::Ddim, 0).unwrap_err()),
        "num_steps"
    );
    for (s, what) in [(0usize, "0"), (3, "3"), (1000, "1000"), (1001, "1001")] {
        let e = DdimSchedule::new(&d1000, s, 0.0, None).expect_err(what);
        assert_eq!(
            field(e),
            "num_steps",
            "DDIM S = {s} (official: {})",
            official["ddim_errors"][what]
        );
    }
    let mut args = GenerateImg::new(SamplerKind::Plms, 1);
    args.num_steps = 0;
    let mut unet = |x: &Tensor, _t: &Tensor| Ok(x.clone());
    let mut noise = ReplayNoise::default();
    let e = args
        .run(&d1000, CHW, None, None, &mut unet, &mut noise, &dev)
        .unwrap_err();
    assert_eq!(field(e), "num_steps");

    // a 1-step p-sampler (official IndexError), DDIM on a respaced diffusion (AssertionError)
    assert_eq!(
        field(pipeline_diffusion(&cfg(), SamplerKind::P, 1).unwrap_err()),
        "num_steps"
    );
    let d5 = pipeline_diffusion(&cfg(), SamplerKind::P, 5).unwrap();
    assert_eq!(
        field(DdimSchedule::new(&d5, 5, 0.0, None).unwrap_err()),
        "timestep_respacing"
    );
    assert_eq!(
        field(DdimSchedule::new(&d1000, 5, -1.0, None).unwrap_err()),
        "ddim_eta"
    );

    // percentile range, init_step, strength, odd CFG batch, model output channels
    assert_eq!(
        field(
            dynamic_threshold(&Tensor::ones((1, 4), DType::F32, &dev).unwrap(), 100.5).unwrap_err()
        ),
        "dynamic_threshold_v"
    );
    let opts = PSampleOptions {
        init_step: Some(0),
        ..PSampleOptions::official()
    };
    let e = d5
        .p_sample_loop(&mut unet, &[2, 4, 8, 8], None, &opts, &mut noise, &dev)
        .unwrap_err();
    assert_eq!(field(e), "init_step");
    assert_eq!(field(d5.img2img_start_step(1.0).unwrap_err()), "strength");
    assert_eq!(field(d5.img2img_start_step(-0.5).unwrap_err()), "strength");
    let mut guided = guided_model_fn(&mut unet, 7.0, true);
    let odd = Tensor::zeros((3, 4, 8, 8), DType::F32, &dev).unwrap();
    let t = Tensor::zeros(3, DType::F32, &dev).unwrap();
    assert_eq!(field(guided(&odd, &t).unwrap_err()), "x");
    let mut wrong = |x: &Tensor, _t: &Tensor| Ok(x.clone()); // 4 channels, learned sigma needs 8
    let mut noise = ReplayNoise::new([Tensor::zeros((2, 4, 8, 8), DType::F32, &dev).unwrap()]);
    let e = d5
        .p_sample_loop(
            &mut wrong,
            &[2, 4, 8, 8],
            None,
            &PSampleOptions::official(),
            &mut noise,
            &dev,
        )
        .unwrap_err();
    assert_eq!(field(e), "model output");
}
