//! CPU kernels the models call where candle's own are slow, and the heap policy of the processes
//! that run them ([`retain_freed_memory`]).
//!
//! [`linear`]: a dense layer with its bias and activation fused; [`PackedMatrix`]: the same from
//! a weight packed once at load, in its stored precision (AVX-512; see `packed`); [`attention`]:
//! multi-head attention read in place from the q, k and v projections (the transformer towers).
//!
//! [`group_norm`]: GroupNorm, optionally fused with SiLU, in one parallel pass; [`spatial_norm`]:
//! the MoVQ's SpatialNorm (GroupNorm, then the latents' per-pixel scale and shift), the same way.
//!
//! [`conv3x3`]: a 3×3, stride-1, dilation-1, ungrouped convolution of an f32 NCHW tensor, as a
//! candle [`CustomOp3`] (input, weight, bias). candle's CPU conv2d copies the input to NHWC,
//! re-flattens the weight on every call and builds its im2col tiles and scatters its output one
//! scalar at a time; for the MoVQ decoder that bookkeeping took more time than the GEMM itself.
//! Here the weight `[C_out, C_in, 3, 3]` is already the GEMM's left matrix `[C_out, 9·C_in]`
//! (row order c, kh, kw), the im2col of a band of output rows is built from whole shifted input
//! rows (memcpy-sized copies), and the GEMM writes straight into the NCHW output, starting from
//! the bias, so there is no output copy and no bias pass. Bands run in parallel on candle's rayon
//! pool, each GEMM single-threaded; with fewer bands than threads the GEMM is parallel instead.
//! Convolutions with enough channels and output tiles run as Winograd F(4×4, 3×3) instead
//! (`winograd`: a quarter of the multiplies).

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

mod dense;
mod norm;
mod packed;
mod winograd;

pub use dense::{attention, attention_supported, linear, linear_supported, Activation};
pub use norm::{group_norm, group_norm_supported, spatial_norm, spatial_norm_supported};
pub use packed::{packed_dense_enabled, packed_supported, PackedMatrix, PackedPrecision};

/// Floats per task of [`fresh_f32`]'s parallel fill (written through a stack window of 4096).
const FILL_TASK: usize = 1 << 16;
const FILL_WINDOW: usize = 1 << 12;

/// A vector of `n` floats written by `fill(offset, window)` over consecutive windows, in
/// parallel on candle's rayon pool, without zeroing the memory first (the page faults of a fresh
/// buffer run on the writing threads, so they are spread too). Plain pages: asking for
/// transparent huge pages (`MADV_HUGEPAGE`) made checkpoint loads 1.7–2× slower once memory was
/// fragmented by other processes (measured alternating with and without, full-size CLIP text
/// tower 3.1–5.1 s vs 1.7–1.8 s, UNet 3.1–3.7 s vs 2.0 s): each 2 MiB fault then compacts
/// memory and zeroes the whole page at once.
pub fn fresh_f32(n: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(FILL_TASK)
            .enumerate()
            .for_each(|(t, task)| {
                let mut tmp = [0f32; FILL_WINDOW];
                for (i, dst) in task.chunks_mut(FILL_WINDOW).enumerate() {
                    let t_ = &mut tmp[..dst.len()];
                    fill(t * FILL_TASK + i * FILL_WINDOW, t_);
                    for (d, &x) in dst.iter_mut().zip(t_.iter()) {
                        d.write(x);
                    }
                }
            });
    };
    // SAFETY: the windows cover all n elements and each is written from `tmp`.
    unsafe { filled(n, write) }
}

/// Source rows per task of [`fresh_f32_transposed`]: 16 floats, one 64-byte line of each
/// output row.
const TRANSPOSE_ROWS: usize = 16;

/// The transpose `(cols, rows)` of a `(rows, cols)` matrix whose rows `read(row, window)` writes
/// as floats (`window` holds the whole row), built in parallel like
/// [`fresh_f32`]: each task converts 16 whole source rows (long slices convert fastest) and
/// writes them as 16-float runs of every output row. A dense layer's weight `(out, in)` loaded
/// this way is the `(in, out)` right-hand matrix its GEMM reads fastest (measured 1.2–1.6× on the
/// CLIP and prior shapes).
pub fn fresh_f32_transposed(
    rows: usize,
    cols: usize,
    read: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let n = rows * cols;
    if n == 0 {
        return Vec::new();
    }
    let write = |out: &mut [MaybeUninit<f32>]| {
        let dst = Shared(out.as_mut_ptr().cast::<f32>());
        (0..rows.div_ceil(TRANSPOSE_ROWS))
            .into_par_iter()
            .for_each_init(Vec::new, |tmp: &mut Vec<f32>, t| {
                let r0 = t * TRANSPOSE_ROWS;
                let h = TRANSPOSE_ROWS.min(rows - r0);
                tmp.resize(h * cols, 0.0);
                for (i, row) in tmp.chunks_mut(cols).enumerate() {
                    read(r0 + i, row);
                }
                for c in 0..cols {
                    // SAFETY: output row c, elements r0 .. r0 + h: inside the n-element buffer
                    // and written by this task only.
                    let o = unsafe { dst.ptr().add(c * rows + r0) };
                    for i in 0..h {
                        unsafe { o.add(i).write(tmp[i * cols + c]) };
                    }
                }
            });
    };
    // SAFETY: the tasks cover source rows 0 .. rows, and each writes its rows' element of every
    // output row: all n elements.
    unsafe { filled(n, write) }
}

/// A vector of `n` elements filled by `write`, without zeroing it first (the zeroing was a
/// tenth of a norm or convolution kernel's time at the MoVQ's full resolution).
///
/// # Safety
/// `write` must initialise every one of the `n` elements it is given.
pub(crate) unsafe fn filled<T>(n: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    write(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's contract: all n elements are initialised.
    unsafe { v.set_len(n) };
    v
}

/// Keeps freed memory in the process heap instead of handing it back to the kernel, for processes
/// that run models on the CPU (every stage binary calls it first thing).
///
/// Tensors at the MoVQ's and UNet's full resolution are 12–140 MiB each. glibc serves such
/// allocations with `mmap` and unmaps them on free, so every intermediate tensor of every layer
/// faults in and zeroes fresh pages: a fifth of a 512² MoVQ decode was page faults. With `mmap`
/// off for allocations and the heap's top trimmed only above 2 GiB, freed tensors are reused; the
/// peak resident memory stays what the largest step needs (measured on the full-size Kandinsky
/// 2.2 stages, 2 threads: MoVQ decode 512² 11.4 → 8.8 s, UNet step 7.6 → 7.0 s, peak RSS +5–8%).
/// `KD_HEAP_RETAIN=0` in the environment keeps glibc's defaults. Other allocators: no effect.
pub fn retain_freed_memory() {
    if std::env::var_os("KD_HEAP_RETAIN").is_some_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Output pixels per im2col band (rounded to whole rows, at least one): small enough that a
/// band's columns (9·C_in·pixels floats) stay near the L2 cache. Measured on the full-size
/// Kandinsky 2.2 models (2 threads): 256 beat 1024 by 8–10% on the UNet and MoVQ, and 4096 lost.
const BAND_PIXELS: usize = 256;

/// Winograd pays when the GEMMs are large next to the transforms: enough channels on both sides
/// and enough tiles to amortise the per-call weight transform (measured with the `conv_shapes`
/// example on CFG batches of 2: at 4 tiles per image, an 8×8 map, a 1536-channel convolution is
/// 2–4× slower in Winograd; at 16 per image, 16×16, a 1152-channel one is 1.4× faster).
fn use_winograd(d: &winograd::Dims) -> bool {
    match FORCE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    d.cin >= WINOGRAD_MIN_CHANNELS
        && d.cout >= WINOGRAD_MIN_CHANNELS
        && d.tiles_per_image() >= WINOGRAD_MIN_TILES
}

/// 0: by shape; 1: always Winograd; 2: never (see [`force_path`]).
static FORCE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Benchmarks and tests: `Some(true)` sends every [`conv3x3`] call through Winograd, `Some(false)`
/// through im2col, `None` lets the shape decide (the default).
pub fn force_path(winograd: Option<bool>) {
    let v = match winograd {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    };
    FORCE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// See [`use_winograd`].
const WINOGRAD_MIN_CHANNELS: usize = 16;
/// See [`use_winograd`]. Counted per image, not per call, so that an image takes the same path,
/// and gets the same result, alone and in a batch (step-level batching relies on it).
const WINOGRAD_MIN_TILES: usize = 16;

/// True when [`conv3x3`] handles this convolution: CPU, f32, a 3×3 kernel, stride 1, dilation
/// 1, one group. Everything else should go through candle's `conv2d`.
pub fn conv3x3_supported(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && stride == 1
        && dilation == 1
        && groups == 1
        && x.rank() == 4
        && weight.rank() == 4
        && weight.dims()[2..] == [3, 3]
}

/// `conv2d(x, weight, padding, stride 1) + bias`: x `(B, C_in, H, W)`, weight
/// `(C_out, C_in, 3, 3)`, bias `(C_out,)`; any strides (non-contiguous operands are copied).
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    apply_contiguous([x, weight, bias], &Conv3x3 { padding })
}

/// Runs a kernel on its three operands, copying any that is not contiguous first (the kernels
/// read plain slices; [`f32_operands`] refuses strided layouts).
pub(crate) fn apply_contiguous(operands: [&Tensor; 3], op: &impl CustomOp3) -> Result<Tensor> {
    let [a, b, c] = operands;
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &c.contiguous()?, op)
}

struct Conv3x3 {
    padding: usize,
}

/// A raw pointer shared by parallel tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
// SAFETY: every user writes only elements no other task writes (see each call site).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The operands of a kernel (`name`, for the errors) as f32 slices, each exactly its layout's
/// elements: another dtype or a strided layout is an error.
pub(crate) fn f32_operands<'a, const N: usize>(
    name: &str,
    operands: [(&'a CpuStorage, &'a Layout); N],
) -> Result<[&'a [f32]; N]> {
    let mut out: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in out.iter_mut().zip(operands) {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("{name}: f32 operands only")
        };
        if !layout.is_contiguous() {
            candle_core::bail!("{name}: contiguous operands only")
        }
        let start = layout.start_offset();
        *slot = v
            .get(start..start + layout.shape().elem_count())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{name}: operand outside its storage"))
            })?;
    }
    Ok(out)
}

/// A matrix operand of [`matmul`]: element (i, j) at `ptr + i·rs + j·cs` (in floats).
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub(crate) ptr: *const f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl Strided {
    /// Row-major rows `rs` floats apart.
    pub(crate) fn rows(ptr: *const f32, rs: usize) -> Self {
        Self { ptr, rs, cs: 1 }
    }
}

/// `dst = scale·lhs·rhs`, or `dst += scale·lhs·rhs` when `accumulate`: dst `m×n` row-major with
/// rows `dst_rs` floats apart, lhs `m×k`, rhs `k×n` (the `gemm` crate's kernels).
///
/// # Safety
/// Every element the three views address lies inside a live allocation, and no other thread
/// reads or writes dst's elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// SiLU, `t·σ(t)`, as the fused kernels write it.
#[inline]
pub(crate) fn silu(t: f32) -> f32 {
    t / (1.0 + (-t).exp())
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "kd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, bias] = f32_operands("kd-conv3x3", [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, cin, h, wd) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        if (wcin, kh, kw) != (cin, 3, 3) || l3.shape().dims() != [cout] {
            candle_core::bail!(
                "kd-conv3x3: weight {:?} / bias {:?} do not fit input {:?}",
                l2.shape(),
                l3.shape(),
                l1.shape()
            )
        }
        let p = self.padding;
        let (oh, ow) = match ((h + 2 * p).checked_sub(2), (wd + 2 * p).checked_sub(2)) {
            (Some(oh), Some(ow)) if oh > 0 && ow > 0 => (oh, ow),
            _ => candle_core::bail!("kd-conv3x3: input {h}×{wd} too small for padding {p}"),
        };
        let k = cin * 9;
        let plane = oh * ow;
        let n_out = b * cout * plane;

        let dims = winograd::Dims {
            b,
            cin,
            h,
            w: wd,
            cout,
            pad: p,
            oh,
            ow,
        };
        if use_winograd(&dims) {
            // SAFETY: the Winograd path writes every output element (each tile's 4×4 block,
            // cropped at the edges; tested against a NaN-filled buffer).
            let out = unsafe { filled(n_out, |o| winograd::conv(x, w, bias, o, dims)) };
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
        }

        // The output starts as the bias; the GEMM accumulates into it.
        // SAFETY: the planes of `plane` elements cover all b·C_out·plane elements.
        let mut out = unsafe {
            filled(n_out, |o| {
                for (i, chunk) in o.chunks_mut(plane).enumerate() {
                    chunk.fill(MaybeUninit::new(bias[i % cout]));
                }
            })
        };

        let rows = (BAND_PIXELS / ow).clamp(1, oh);
        let bands_per_image = oh.div_ceil(rows);
        let tasks = b * bands_per_image;
        let threads = candle_core::utils::get_num_threads().max(1);
        let (outer_parallel, gemm_par) = if tasks >= threads {
            (true, gemm::Parallelism::None)
        } else {
            (false, gemm::Parallelism::Rayon(threads))
        };
        let dst = Shared(out.as_mut_ptr());
        let band = |task: usize, cols: &mut Vec<f32>| {
            let (bi, band) = (task / bands_per_image, task % bands_per_image);
            let y0 = band * rows;
            let r = rows.min(oh - y0);
            let n = r * ow;
            cols.clear();
            cols.resize(k * n, 0.0);
            let img = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
            im2col_band(img, cols, cin, h, wd, p, y0, r, ow);
            // SAFETY: `out` holds b·C_out·oh·ow floats; this band writes rows c of image `bi`,
            // columns y0·ow .. y0·ow + n of each, which no other band writes. `w` is
            // C_out × 9·C_in row-major, `cols` 9·C_in × n row-major.
            unsafe {
                matmul(
                    (cout, n, k),
                    dst.ptr().add(bi * cout * plane + y0 * ow),
                    plane,
                    true,
                    Strided::rows(w.as_ptr(), k),
                    Strided::rows(cols.as_ptr(), n),
                    1.0,
                    gemm_par,
                );
            }
        };
        if outer_parallel {
            (0..tasks)
                .into_par_iter()
                .for_each_init(Vec::new, |cols, t| band(t, cols));
        } else {
            let mut cols = Vec::new();
            (0..tasks).for_each(|t| band(t, &mut cols));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// The im2col of output rows `y0 .. y0 + r` of one image: `cols[(c·9 + kh·3 + kw), j]` is the
/// input pixel under tap (kh, kw) of output pixel j (zero in the padding).
#[allow(clippy::too_many_arguments)]
fn im2col_band(
    img: &[f32],
    cols: &mut [f32],
    cin: usize,
    h: usize,
    w: usize,
    p: usize,
    y0: usize,
    r: usize,
    ow: usize,
) {
    let n = r * ow;
    for c in 0..cin {
        let chan = &img[c * h * w..(c + 1) * h * w];
        for kh in 0..3 {
            for kw in 0..3 {
                let row = &mut cols[((c * 9) + kh * 3 + kw) * n..][..n];
                // Output x reads input x + kw − p; the valid x are those with 0 ≤ x + kw − p < w.
                let x_lo = p.saturating_sub(kw);
                let x_hi = (w + p).saturating_sub(kw).min(ow);
                for yy in 0..r {
                    let iy = (y0 + yy + kh) as isize - p as isize;
                    let dst = &mut row[yy * ow..(yy + 1) * ow];
                    if iy < 0 || iy >= h as isize || x_lo >= x_hi {
                        continue; // stays zero
                    }
                    let src = &chan[iy as usize * w..(iy as usize + 1) * w];
                    let sx = x_lo + kw - p;
                    dst[x_lo..x_hi].copy_from_slice(&src[sx..sx + (x_hi - x_lo)]);
                }
            }
        }
    }
}

/// Relative L2 error of `a` against `b`, for the kernels' tests.
#[cfg(test)]
pub(crate) fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd shapes against candle's conv2d, through Winograd and im2col: channels that fill no SIMD
    /// block, widths and heights that leave partial bands and tiles, padding 0 and 1 (and 2),
    /// batch > 1, strided input.
    #[test]
    fn equals_candles_conv2d_on_odd_shapes() {
        let dev = Device::Cpu;
        let cases = [
            // (b, cin, cout, h, w, padding)
            (1, 1, 1, 1, 1, 1),
            (1, 3, 5, 7, 9, 1),
            (2, 5, 3, 13, 11, 1),
            (3, 4, 7, 8, 8, 0),
            (1, 17, 33, 37, 29, 1),
            (2, 8, 16, 70, 50, 1),
            (1, 6, 2, 5, 4, 2),
            (1, 2, 3, 3, 3, 0),
        ];
        for (b, cin, cout, h, w, p) in cases {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 0.3, (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let want = x
                .conv2d(&k, p, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            // By shape, then each path forced (both are exact, so a test running at the same
            // time sees correct results whichever path it gets).
            for path in [None, Some(true), Some(false)] {
                force_path(path);
                let got = conv3x3(&x, &k, &bias, p).unwrap();
                force_path(None);
                assert_eq!(got.dims(), want.dims(), "{b} {cin} {cout} {h} {w} {p}");
                let e = rel(&got, &want);
                assert!(
                    e <= 1e-5,
                    "{b} {cin} {cout} {h} {w} pad {p} {path:?}: rel L2 {e:e}"
                );
            }
        }
        // A transposed (non-contiguous) input.
        let x = Tensor::randn(0f32, 1.0, (1, 3, 10, 12), &dev).unwrap();
        let xt = x.transpose(2, 3).unwrap();
        let k = Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev).unwrap();
        let zero = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let want = xt.contiguous().unwrap().conv2d(&k, 1, 1, 1, 1).unwrap();
        assert!(rel(&conv3x3(&xt, &k, &zero, 1).unwrap(), &want) <= 1e-5);
    }

    #[test]
    fn refuses_what_it_does_not_compute() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((3, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv3x3_supported(&x, &k, 1, 1, 1));
        assert!(!conv3x3_supported(&x, &k, 2, 1, 1));
        assert!(!conv3x3_supported(&x, &k, 1, 2, 1));
        assert!(!conv3x3_supported(
            &x.to_dtype(DType::F16).unwrap(),
            &k,
            1,
            1,
            1
        ));
        let k1 = Tensor::zeros((3, 2, 1, 1), DType::F32, &dev).unwrap();
        assert!(!conv3x3_supported(&x, &k1, 1, 1, 1));
        // Wrong channel count and too small an input are errors, not panics.
        let bias = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let k_bad = Tensor::zeros((3, 5, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv3x3(&x, &k_bad, &bias, 1).is_err());
        let tiny = Tensor::zeros((1, 2, 1, 1), DType::F32, &dev).unwrap();
        assert!(conv3x3(&tiny, &k, &bias, 0).is_err());
    }
}

#[cfg(test)]
mod fill_tests {
    use super::*;

    /// Every element written, in the right place, for shapes that leave partial blocks and tasks.
    #[test]
    fn fresh_fills_and_transposes_every_element() {
        let n = 3 * FILL_TASK + 17;
        let v = fresh_f32(n, |o, w| {
            for (i, x) in w.iter_mut().enumerate() {
                *x = (o + i) as f32;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (5, 32), (0, 4)] {
            let t = fresh_f32_transposed(rows, cols, |r, w| {
                assert_eq!(w.len(), cols);
                for (j, x) in w.iter_mut().enumerate() {
                    *x = (r * cols + j) as f32;
                }
            });
            assert_eq!(t.len(), rows * cols);
            for c in 0..cols {
                for r in 0..rows {
                    assert_eq!(
                        t[c * rows + r],
                        (r * cols + c) as f32,
                        "{rows}×{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
