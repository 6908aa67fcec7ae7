//! Dense layers from weights packed once at load: the transformer towers' GEMM without the
//! per-call packing, and with half-precision checkpoints kept in half precision.
//!
//! The `gemm` crate repacks the weight of every dense layer on every call: it copies 64-row
//! blocks of the `(in, out)` matrix out of rows `out` floats apart (a fifth of the CLIP text
//! tower's time went to that copy, most of it waiting for memory). Here the weight `(out, in)`
//! is rearranged once, at load, into panels of [`NR`] output columns, each panel `in × NR`
//! contiguous, and kept in its stored precision: an fp16 or bf16 checkpoint stays 2 bytes per
//! weight (half the memory and half the memory traffic of f32; widening to f32 is exact), an f32
//! one stays f32. A call gives each thread a contiguous range of panels, walked in memory order
//! in blocks of [`KC`] input rows: a block is widened to f32 into a per-task buffer (f32 panels
//! are read in place) and multiplied into every row of the input by an AVX-512 microkernel of
//! [`MR`] rows × [`NR`] columns holding its 24 accumulators in registers, while the next block
//! is prefetched a share per tile. A panel accumulates in a contiguous buffer starting from the
//! bias, takes the activation and is copied into the output. f32 arithmetic throughout: the
//! result equals `x·Wᵀ + b` of the f32 weights up to the order of the additions.
//!
//! Measured (`examples/dense_shapes`, `TOWER`, 2 threads, every weight cold as in a forward):
//! the CLIP text tower's layers 0.41 → 0.34 s, the prior's 0.52 → 0.43–0.44 s, CLIP vision's
//! 0.39 → 0.34–0.35 s against the `gemm` crate on f32 weights (fp16 panels).

use crate::dense::Activation;
use crate::{f32_operands, filled, Shared};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output columns per panel: four 16-float vectors.
pub const NR: usize = 64;
/// Input rows per microkernel call: 6 rows × 4 vectors = 24 accumulators.
pub const MR: usize = 6;
/// Input depth per block: a widened panel block is `KC × NR` f32 = 32 KiB, within L1 (256
/// measured 2–4% slower).
pub const KC: usize = 128;

/// How a packed weight stores its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedPrecision {
    /// f32.
    F32,
    /// IEEE half precision (fp16 checkpoints).
    F16,
    /// bfloat16 (bf16 checkpoints).
    BF16,
}

#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    /// f16 or bf16 bits.
    Half(Vec<u16>),
}

impl Panels {
    /// The elements' bytes.
    fn as_bytes(&self) -> &[u8] {
        let (ptr, bytes) = match self {
            Self::F32(v) => (v.as_ptr().cast::<u8>(), v.len() * 4),
            Self::Half(v) => (v.as_ptr().cast::<u8>(), v.len() * 2),
        };
        // SAFETY: the vector's initialised elements, viewed as bytes.
        unsafe { std::slice::from_raw_parts(ptr, bytes) }
    }

    /// Bytes per element.
    fn elem_bytes(&self) -> usize {
        match self {
            Self::F32(_) => 4,
            Self::Half(_) => 2,
        }
    }
}

/// A dense layer's weight `(out, in)` in panels of [`NR`] output columns (the last one padded
/// with zeros), each `in × NR` row-major: element `(o, i)` of the weight at
/// `panel o / NR, row i, column o % NR`.
#[derive(Debug)]
pub struct PackedMatrix {
    panels: Panels,
    precision: PackedPrecision,
    /// Input features (`in`).
    k: usize,
    /// Output features (`out`).
    n: usize,
}

/// Whether this CPU runs [`PackedMatrix`]'s kernel (x86-64 with AVX-512F and F16C). Elsewhere
/// dense layers keep their f32 weights and the `gemm` crate's path.
pub fn packed_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether models pack their dense weights at load ([`packed_supported`], unless the
/// environment sets `KD_PACKED_DENSE=0`, which keeps f32 weights and the `gemm` crate's path, for
/// side-by-side measurements).
pub fn packed_dense_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        packed_supported() && std::env::var_os("KD_PACKED_DENSE").is_none_or(|v| v != "0")
    })
}

impl PackedMatrix {
    /// Packs the weight `w` `(out, in)` (f32, f16 or bf16, on the CPU) in its own precision.
    /// Errors where [`packed_supported`] is false, for another dtype or device, or for a weight
    /// that is not a non-empty matrix.
    pub fn pack(w: &Tensor) -> Result<Self> {
        if !packed_supported() {
            candle_core::bail!("kd-packed: this CPU has no AVX-512F/F16C")
        }
        let (n, k) = w.dims2()?;
        if n == 0 || k == 0 {
            candle_core::bail!("kd-packed: empty weight {:?}", w.shape())
        }
        let w = w.contiguous()?;
        let npanels = n.div_ceil(NR);
        let len = npanels
            .checked_mul(k)
            .and_then(|v| v.checked_mul(NR))
            .ok_or_else(|| candle_core::Error::Msg("kd-packed: weight too large".into()))?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("kd-packed: the weight is not on the CPU")
        };
        let range = layout.start_offset()..layout.start_offset() + n * k;
        let (panels, precision) = match cpu {
            CpuStorage::F32(v) => (
                Panels::F32(pack_panels(&v[range], n, k, len, 0.0)),
                PackedPrecision::F32,
            ),
            CpuStorage::F16(v) => (
                Panels::Half(pack_half_panels(v[range].reinterpret_cast(), n, k, len)),
                PackedPrecision::F16,
            ),
            CpuStorage::BF16(v) => (
                Panels::Half(pack_half_panels(v[range].reinterpret_cast(), n, k, len)),
                PackedPrecision::BF16,
            ),
            _ => candle_core::bail!(
                "kd-packed: weights of dtype {:?} are not packed (f32, f16 or bf16)",
                w.dtype()
            ),
        };
        Ok(Self {
            panels,
            precision,
            k,
            n,
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The stored precision.
    pub fn precision(&self) -> PackedPrecision {
        self.precision
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.as_bytes().len()
    }

    /// `act(x·Wᵀ + b)` for x `(…, in)` f32 on the CPU and bias `(out,)` f32; the output is
    /// `(…, out)`.
    pub fn linear(&self, x: &Tensor, bias: &Tensor, act: Activation) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2_no_bwd(&bias.contiguous()?, &PackedLinear { w: self, act })
    }
}

/// Rows of the source transposed per step of [`pack_panels`]: a 64 × 64 tile.
const PACK_TILE: usize = 64;

/// `(n, k)` row-major `src` into `len` elements of panels (see [`PackedMatrix`]), in parallel
/// (one task per panel), padded with `zero`.
fn pack_panels<T: Copy + Send + Sync>(
    src: &[T],
    n: usize,
    k: usize,
    len: usize,
    zero: T,
) -> Vec<T> {
    let fill = |p: usize, panel: &mut [MaybeUninit<T>]| {
        let o0 = p * NR;
        for i0 in (0..k).step_by(PACK_TILE) {
            let i1 = (i0 + PACK_TILE).min(k);
            for j in 0..NR {
                let o = o0 + j;
                if o < n {
                    let row = &src[o * k..(o + 1) * k];
                    for i in i0..i1 {
                        panel[i * NR + j] = MaybeUninit::new(row[i]);
                    }
                } else {
                    for i in i0..i1 {
                        panel[i * NR + j] = MaybeUninit::new(zero);
                    }
                }
            }
        }
    };
    // SAFETY: every panel writes all of its k × NR elements.
    unsafe { panels_filled(len, k, fill) }
}

/// `len` elements of panels (`k × NR` each), panel `p` written by `fill(p, panel)`, in
/// parallel.
///
/// # Safety
/// `fill` must initialise every element of the panel it is given.
unsafe fn panels_filled<T: Send>(
    len: usize,
    k: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let write = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| fill(p, panel))
    };
    // SAFETY: the panels cover `len`, and the caller's `fill` writes each whole.
    unsafe { filled(len, write) }
}

/// [`pack_panels`] for half-precision bits: whole 8 × 8 blocks transposed in SSE2 registers
/// (scalar, one element at a time, the transposition was a fifth of a tower's load), the edges
/// (a partial last panel, a depth not a multiple of 8) element by element.
fn pack_half_panels(src: &[u16], n: usize, k: usize, len: usize) -> Vec<u16> {
    #[cfg(not(target_arch = "x86_64"))]
    return pack_panels(src, n, k, len, 0);
    #[cfg(target_arch = "x86_64")]
    {
        let fill = |p: usize, panel: &mut [MaybeUninit<u16>]| {
            let o0 = p * NR;
            let rows = n.saturating_sub(o0).min(NR);
            let (full_j, full_i) = (rows / 8 * 8, k / 8 * 8);
            for i0 in (0..full_i).step_by(8) {
                for j0 in (0..full_j).step_by(8) {
                    // SAFETY: rows o0 + j0 .. + 8 (< n) of src, columns i0 .. + 8 (≤ k);
                    // panel rows i0 .. + 8, columns j0 .. + 8 (< NR).
                    unsafe {
                        transpose8(
                            src.as_ptr().add((o0 + j0) * k + i0),
                            k,
                            panel.as_mut_ptr().add(i0 * NR + j0).cast(),
                            NR,
                        )
                    };
                }
            }
            for i in 0..k {
                let from = if i < full_i { full_j } else { 0 };
                for j in from..NR {
                    let v = if j < rows { src[(o0 + j) * k + i] } else { 0 };
                    panel[i * NR + j] = MaybeUninit::new(v);
                }
            }
        };
        // SAFETY: every panel writes all of its k × NR elements (the 8 × 8 blocks, then every
        // element outside them).
        unsafe { panels_filled(len, k, fill) }
    }
}

/// dst (8 rows `ld_dst` apart) = the transpose of src (8 rows `ld_src` apart), 8 × 8 u16.
///
/// # Safety
/// Both 8 × 8 blocks in bounds.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose8(src: *const u16, ld_src: usize, dst: *mut u16, ld_dst: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bounds; SSE2 is part of x86-64.
    unsafe {
        let r = |i: usize| _mm_loadu_si128(src.add(i * ld_src).cast());
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
        let t0 = _mm_unpacklo_epi16(r0, r1);
        let t1 = _mm_unpackhi_epi16(r0, r1);
        let t2 = _mm_unpacklo_epi16(r2, r3);
        let t3 = _mm_unpackhi_epi16(r2, r3);
        let t4 = _mm_unpacklo_epi16(r4, r5);
        let t5 = _mm_unpackhi_epi16(r4, r5);
        let t6 = _mm_unpacklo_epi16(r6, r7);
        let t7 = _mm_unpackhi_epi16(r6, r7);
        let u0 = _mm_unpacklo_epi32(t0, t2);
        let u1 = _mm_unpackhi_epi32(t0, t2);
        let u2 = _mm_unpacklo_epi32(t1, t3);
        let u3 = _mm_unpackhi_epi32(t1, t3);
        let u4 = _mm_unpacklo_epi32(t4, t6);
        let u5 = _mm_unpackhi_epi32(t4, t6);
        let u6 = _mm_unpacklo_epi32(t5, t7);
        let u7 = _mm_unpackhi_epi32(t5, t7);
        let cols = [
            _mm_unpacklo_epi64(u0, u4),
            _mm_unpackhi_epi64(u0, u4),
            _mm_unpacklo_epi64(u1, u5),
            _mm_unpackhi_epi64(u1, u5),
            _mm_unpacklo_epi64(u2, u6),
            _mm_unpackhi_epi64(u2, u6),
            _mm_unpacklo_epi64(u3, u7),
            _mm_unpackhi_epi64(u3, u7),
        ];
        for (i, c) in cols.into_iter().enumerate() {
            _mm_storeu_si128(dst.add(i * ld_dst).cast(), c);
        }
    }
}

struct PackedLinear<'a> {
    w: &'a PackedMatrix,
    act: Activation,
}

impl CustomOp2 for PackedLinear<'_> {
    fn name(&self) -> &'static str {
        "kd-packed-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, bias] = f32_operands("kd-packed-linear", [(s1, l1), (s2, l2)])?;
        let (n, k) = (self.w.n, self.w.k);
        let dims = l1.shape().dims();
        if dims.last() != Some(&k) || l2.shape().dims() != [n] {
            candle_core::bail!(
                "kd-packed-linear: weight ({n}, {k}) / bias {:?} do not fit input {:?}",
                l2.shape(),
                l1.shape()
            )
        }
        let m = x.len() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        // SAFETY: the tasks write every element of the m × n output (all rows of all panels),
        // from x (m × k) and the panels (n columns × k rows).
        let out = unsafe {
            filled(m * n, |o| {
                if m > 0 {
                    self.run(x, bias, m, o.as_mut_ptr().cast());
                }
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

impl PackedLinear<'_> {
    /// out (m × n) = act(x · Wᵀ + b). One task per thread, each a contiguous range of panels
    /// over all rows (with fewer panels than threads, each panel's rows split into bands).
    /// A panel accumulates in a contiguous `rows × NR` buffer, starting from the bias, over
    /// blocks of [`KC`] input rows, then takes the activation and is copied into its columns of
    /// the output. Accumulating in the output itself, whose rows are `out` floats apart, mapped
    /// every row of a tile to the same few cache sets when `out` is a power of two (the prior's
    /// 2048 and 8192): the prior's layers ran ~8% slower (tower test 0.54 → 0.50 s).
    ///
    /// # Safety
    /// `out` points at m × n floats, `x` holds m × k.
    unsafe fn run(&self, x: &[f32], bias: &[f32], m: usize, out: *mut f32) {
        let (n, k) = (self.w.n, self.w.k);
        let npanels = n.div_ceil(NR);
        let threads = rayon::current_num_threads().max(1);
        let tasks: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> = if npanels >= threads {
            (0..threads)
                .map(|t| (t * npanels / threads..(t + 1) * npanels / threads, 0..m))
                .collect()
        } else {
            let band = m.div_ceil(threads.div_ceil(npanels)).div_ceil(MR).max(1) * MR;
            (0..npanels)
                .flat_map(|p| {
                    (0..m)
                        .step_by(band)
                        .map(move |r| (p..p + 1, r..(r + band).min(m)))
                })
                .collect()
        };
        let xp = pack_rows(x, m, k);
        let xp = &xp[..];
        // Each task writes only its own panels' columns of its own rows.
        let out = Shared(out);
        let act = self.act;
        let (all, elem) = (self.w.panels.as_bytes(), self.w.panels.elem_bytes());
        tasks.into_par_iter().for_each(|(panels, rows)| {
            let mut wide = match self.w.panels {
                Panels::F32(_) => Vec::new(),
                Panels::Half(_) => vec![0f32; KC * NR],
            };
            let mut acc = vec![0f32; rows.len() * NR];
            for p in panels {
                let cols = NR.min(n - p * NR);
                for row in acc.chunks_mut(NR) {
                    row[..cols].copy_from_slice(&bias[p * NR..p * NR + cols]);
                    row[cols..].fill(0.0);
                }
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let block: &[f32] = match &self.w.panels {
                        Panels::F32(v) => &v[(p * k + k0) * NR..(p * k + k0 + kc) * NR],
                        Panels::Half(v) => {
                            let src = &v[(p * k + k0) * NR..(p * k + k0 + kc) * NR];
                            // SAFETY: AVX-512F present (as for every packed weight).
                            unsafe { kernel::widen(src, self.w.precision, &mut wide[..kc * NR]) };
                            &wide[..kc * NR]
                        }
                    };
                    // The next block in this task's order (the next depth block of this panel or
                    // the next panel's first) follows this one in memory: its cache lines are
                    // requested a share per tile, so that reading it overlaps the arithmetic
                    // instead of stalling the next widening (a twelfth of a tower's time).
                    let next = (p * k + k0 + kc) * NR * elem;
                    let next = &all[next.min(all.len())..(next + KC * NR * elem).min(all.len())];
                    let groups = acc.len().div_ceil(MR * NR);
                    let share = next.len().div_ceil(groups).next_multiple_of(64);
                    for (g, c) in acc.chunks_mut(MR * NR).enumerate() {
                        let i = rows.start + g * MR;
                        let part =
                            &next[(g * share).min(next.len())..((g + 1) * share).min(next.len())];
                        // SAFETY: a prefetch of bytes inside the panels.
                        unsafe { kernel::prefetch(part.as_ptr(), part.len()) };
                        // SAFETY: row group i / MR of the packed rows holds k × MR floats (row
                        // bands start at multiples of MR), of which k0 .. k0 + kc are read; c
                        // is mr × NR, the block kc × NR.
                        unsafe {
                            let a = xp.as_ptr().add((i / MR * k + k0) * MR);
                            kernel::tile(c.len() / NR, kc, a, block, c);
                        }
                    }
                }
                for (r, row) in acc.chunks_mut(NR).enumerate() {
                    let row = &mut row[..cols];
                    // SAFETY: AVX-512F present (as for every packed weight).
                    unsafe { kernel::activate(act, row) };
                    // SAFETY: row rows.start + r, columns p·NR .. p·NR + cols of the m × n
                    // output: this task's alone.
                    unsafe {
                        let dst = out.ptr().add((rows.start + r) * n + p * NR);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                    }
                }
            }
        });
    }
}

/// The rows of x `(m, k)` in groups of [`MR`], each group `k × MR` (row r of the group at
/// column r; rows past m zero): the microkernel then reads one sequential stream. Reading the
/// rows in place, `k` floats apart, puts all of a group's rows in the same L1 set whenever `k·4`
/// is a multiple of 4 KiB (the prior's 2048 and 8192): measured ~5–8% slower on the prior's
/// layers (tower test 0.43–0.44 → 0.46–0.48 s), level elsewhere.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let groups = m.div_ceil(MR);
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(k * MR).enumerate().for_each(|(g, dst)| {
            let rows = m.saturating_sub(g * MR).min(MR);
            if rows == MR {
                // Whole groups: six sequential reads, one sequential write.
                let src: [&[f32]; MR] =
                    std::array::from_fn(|r| &x[(g * MR + r) * k..(g * MR + r + 1) * k]);
                for (j, d) in dst.chunks_exact_mut(MR).enumerate() {
                    for (r, slot) in d.iter_mut().enumerate() {
                        *slot = MaybeUninit::new(src[r][j]);
                    }
                }
                return;
            }
            for (j, d) in dst.chunks_exact_mut(MR).enumerate() {
                for (r, slot) in d.iter_mut().enumerate() {
                    let v = if r < rows {
                        x[(g * MR + r) * k + j]
                    } else {
                        0.0
                    };
                    *slot = MaybeUninit::new(v);
                }
            }
        });
    };
    // SAFETY: every group writes all of its k × MR elements.
    unsafe { filled(groups * k * MR, write) }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Activation, PackedPrecision, MR, NR};
    use std::arch::x86_64::*;

    /// c (mr × NR row-major) += a · b, a the packed rows (kc steps of MR floats, the first mr
    /// used), b kc × NR row-major.
    ///
    /// # Safety
    /// AVX-512F present (checked by [`super::packed_supported`] before any weight is packed);
    /// a covers kc × MR floats.
    pub(super) unsafe fn tile(mr: usize, kc: usize, a: *const f32, b: &[f32], c: &mut [f32]) {
        assert!(b.len() >= kc * NR && (1..=MR).contains(&mr) && c.len() == mr * NR);
        let (b, c) = (b.as_ptr(), c.as_mut_ptr());
        // SAFETY: forwarded, and the extents asserted above.
        unsafe {
            match mr {
                6 => tile_n::<6>(kc, a, b, c),
                5 => tile_n::<5>(kc, a, b, c),
                4 => tile_n::<4>(kc, a, b, c),
                3 => tile_n::<3>(kc, a, b, c),
                2 => tile_n::<2>(kc, a, b, c),
                _ => tile_n::<1>(kc, a, b, c),
            }
        }
    }

    /// The activation over `values`, its loop compiled for AVX-512 (the crate's baseline is
    /// SSE2: GELU's polynomials ran 4 lanes wide, a twentieth of the CLIP vision tower).
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn activate(act: Activation, values: &mut [f32]) {
        act.apply(values)
    }

    /// Asks for the `bytes` bytes at `p` to be brought into the L2 cache.
    ///
    /// # Safety
    /// None beyond a valid address range: prefetches do not fault.
    pub(super) unsafe fn prefetch(p: *const u8, bytes: usize) {
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off).cast()) };
        }
    }

    /// Half-precision bits to f32 (exact), 16 at a time.
    ///
    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(src: &[u16], precision: PackedPrecision, dst: &mut [f32]) {
        assert!(src.len() == dst.len() && src.len().is_multiple_of(16));
        let bf16 = match precision {
            PackedPrecision::F16 => false,
            PackedPrecision::BF16 => true,
            PackedPrecision::F32 => unreachable!("f32 panels are not widened"),
        };
        for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: 16 u16 read, 16 f32 written, both in bounds.
            unsafe {
                let h = _mm256_loadu_si256(s.as_ptr().cast());
                let f = if bf16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                } else {
                    _mm512_cvtph_ps(h)
                };
                _mm512_storeu_ps(d.as_mut_ptr(), f);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_n<const R: usize>(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        // SAFETY: c holds R × NR floats, a kc × MR, b kc × NR.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(c.add(r * NR + j * 16));
                }
            }
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let b2 = _mm512_loadu_ps(bp.add(32));
                let b3 = _mm512_loadu_ps(bp.add(48));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                    row[2] = _mm512_fmadd_ps(x, b2, row[2]);
                    row[3] = _mm512_fmadd_ps(x, b3, row[3]);
                }
                ap = ap.add(MR);
                bp = bp.add(NR);
            }
            for (r, row) in acc.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * NR + j * 16), *v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    /// Never called: no weight is packed where [`super::packed_supported`] is false.
    pub(super) unsafe fn tile(_: usize, _: usize, _: *const f32, _: &[f32], _: &mut [f32]) {
        unreachable!("packed weights need x86-64 AVX-512F")
    }

    /// Never called, as [`tile`].
    pub(super) unsafe fn activate(_: super::Activation, _: &mut [f32]) {
        unreachable!("packed weights need x86-64 AVX-512F")
    }

    /// No prefetching elsewhere.
    pub(super) unsafe fn prefetch(_: *const u8, _: usize) {}

    /// Never called, as [`tile`].
    pub(super) unsafe fn widen(_: &[u16], _: super::PackedPrecision, _: &mut [f32]) {
        unreachable!("packed weights need x86-64 AVX-512F")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel;
    use candle_core::{DType, Device, Module};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    /// candle's dense layer (f32 weights, the given ones widened) and the activation.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Tensor {
        let w = w.to_dtype(DType::F32).unwrap();
        let y = candle_nn::Linear::new(w, Some(b.clone()))
            .forward(x)
            .unwrap();
        match act {
            Activation::Identity => y,
            Activation::Gelu => y.gelu_erf().unwrap(),
            Activation::QuickGelu => {
                (&y * candle_nn::ops::sigmoid(&(&y * 1.702).unwrap()).unwrap()).unwrap()
            }
        }
    }

    /// Odd shapes around every blocking edge: rows around the 6-row tile and the thread bands,
    /// depth around KC (1, 17, 128, 129, 300), outputs around the 64-column panel (1, 63, 64, 65,
    /// 130, 200), batch dimensions, each stored precision and activation.
    #[test]
    fn packed_linear_equals_candles_linear_on_odd_shapes() {
        if !packed_supported() {
            eprintln!("skipped: this CPU has no AVX-512F/F16C (the packed path is off here)");
            return;
        }
        let cases = [
            (vec![1usize, 17], 1usize, Activation::Identity),
            (vec![5, 128], 63, Activation::Gelu),
            (vec![6, 129], 64, Activation::QuickGelu),
            (vec![7, 300], 65, Activation::Identity),
            (vec![2, 7, 33], 130, Activation::Gelu),
            (vec![13, 1], 200, Activation::Identity),
            (vec![3, 67, 96], 64, Activation::QuickGelu),
            (vec![161, 256], 2, Activation::Identity),
        ];
        for (dims, n, act) in cases {
            let k = *dims.last().unwrap();
            let x = randn(&dims);
            let b = randn(&[n]);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w = randn(&[n, k]).to_dtype(dtype).unwrap();
                let packed = PackedMatrix::pack(&w).unwrap();
                assert_eq!(packed.dims(), (n, k));
                let got = packed.linear(&x, &b, act).unwrap();
                let want = reference(&x, &w, &b, act);
                assert_eq!(got.dims(), want.dims());
                let e = rel(&got, &want);
                assert!(
                    e <= 1e-5,
                    "{dims:?}·({n}, {k}) {dtype:?} {act:?}: rel L2 {e:.2e}"
                );
            }
        }
    }

    /// The blocked transposition of half-precision weights lays out exactly what the
    /// element-by-element one does, around every edge (rows and depth not multiples of 8, a
    /// partial last panel).
    #[test]
    fn half_panels_equal_the_plain_packing() {
        for (n, k) in [
            (1usize, 1usize),
            (7, 9),
            (8, 8),
            (63, 17),
            (64, 64),
            (65, 130),
            (200, 31),
        ] {
            let src: Vec<u16> = (0..n * k).map(|i| (i * 7919 % 65521) as u16).collect();
            let len = n.div_ceil(NR) * k * NR;
            assert_eq!(
                pack_half_panels(&src, n, k, len),
                pack_panels(&src, n, k, len, 0),
                "({n}, {k})"
            );
        }
    }

    #[test]
    fn half_precision_weights_keep_two_bytes_each() {
        if !packed_supported() {
            eprintln!("skipped: this CPU has no AVX-512F/F16C (the packed path is off here)");
            return;
        }
        let w = randn(&[65, 10]);
        let p32 = PackedMatrix::pack(&w).unwrap();
        let p16 = PackedMatrix::pack(&w.to_dtype(DType::F16).unwrap()).unwrap();
        let pbf = PackedMatrix::pack(&w.to_dtype(DType::BF16).unwrap()).unwrap();
        // Two panels of 64 columns × 10 rows.
        assert_eq!(p32.bytes(), 2 * 64 * 10 * 4);
        assert_eq!(p16.bytes(), 2 * 64 * 10 * 2);
        assert_eq!(
            (p32.precision(), p16.precision(), pbf.precision()),
            (
                PackedPrecision::F32,
                PackedPrecision::F16,
                PackedPrecision::BF16
            )
        );
    }

    #[test]
    fn bad_operands_are_errors() {
        if !packed_supported() {
            eprintln!("skipped: this CPU has no AVX-512F/F16C (the packed path is off here)");
            return;
        }
        let w = PackedMatrix::pack(&randn(&[8, 4])).unwrap();
        let e = w
            .linear(&randn(&[3, 5]), &randn(&[8]), Activation::Identity)
            .unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let e = w
            .linear(&randn(&[3, 4]), &randn(&[7]), Activation::Identity)
            .unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let ints = Tensor::zeros((3, 4), DType::U32, &Device::Cpu).unwrap();
        assert!(PackedMatrix::pack(&ints).is_err());
        assert!(PackedMatrix::pack(&randn(&[0, 4])).is_err());
        assert!(PackedMatrix::pack(&randn(&[4])).is_err());
        // A strided weight is packed from its contiguous copy.
        let wt = randn(&[4, 8]);
        let p = PackedMatrix::pack(&wt.t().unwrap()).unwrap();
        let x = randn(&[2, 4]);
        let b = randn(&[8]);
        let e = rel(
            &p.linear(&x, &b, Activation::Identity).unwrap(),
            &reference(
                &x,
                &wt.t().unwrap().contiguous().unwrap(),
                &b,
                Activation::Identity,
            ),
        );
        assert!(e <= 1e-6, "{e}");
    }
}
