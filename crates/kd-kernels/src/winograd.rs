//! Winograd F(4×4, 3×3) for the 3×3 stride-1 convolution (Lavin & Gray, 2015): each 4×4 output
//! tile costs 36 multiplies per (input, output) channel pair instead of 144, so the GEMM work is a
//! quarter of the im2col path's. Per call:
//!
//! 1. the weight `g` (C_out × C_in × 3×3) becomes `U = G g Gᵀ`, 36 values per channel pair,
//!    laid out `[C_out][36][C_in]` so that `U[·][ξ][·]` is a strided C_out × C_in matrix
//!    (transformed per call and per block of output channels, see [`U_BLOCK_FLOATS`], not stored, so a
//!    model's resident memory stays its weights);
//! 2. each 6×6 input patch `d` (tiles overlap by 2) becomes `V = Bᵀ d B`, laid out
//!    `[36][C_in][tiles]`;
//! 3. per block of output channels, 36 GEMMs `M[ξ] = U[ξ] · V[ξ]` (C_out × tiles), in parallel
//!    over ξ;
//! 4. each output tile is `Aᵀ m A` (6×6 → 4×4) plus the bias, cropped at the right and bottom
//!    edges.
//!
//! Tiles run in chunks of whole tile rows so that `V` and `M` stay bounded ([`CHUNK_FLOATS`]),
//! and each GEMM covers one image's tiles, so that an image gets the same result alone and in a
//! batch.
//! The interpolation points are 0, ±1, ±2 and ∞; against a direct f32 convolution the relative
//! L2 error is a few 1e-7 (measured in the tests on up to 1152 channels).

use crate::{matmul, Shared, Strided};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Bᵀ of F(4, 3): the input transform.
const BT: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

/// G of F(4, 3): the weight transform.
const G: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Aᵀ of F(4, 3): the output transform.
const AT: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// Floats each of the transformed-input and product buffers may hold (32 MiB each).
const CHUNK_FLOATS: usize = 8 << 20;

/// Scratch buffers kept between calls (the transformed weight, input and products), so that a
/// model's convolutions do not fault in and zero fresh pages on every call; at most
/// [`POOL_FLOATS`] floats are kept.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// See [`POOL`] (128 MiB).
const POOL_FLOATS: usize = 32 << 20;

/// Floats of transformed weight that exist at once (32 MiB, instead of four times the whole
/// weight: 382 MiB for the 2.2 UNet's 2304 → 1152 convolution): the output channels run in blocks
/// of `U_BLOCK_FLOATS / (36·C_in)`, at least [`MIN_CO_BLOCK`]. Each block re-packs the transformed
/// input for its GEMMs, so blocks are kept as large as that allows (measured: blocks of 128
/// channels were 5–10% slower than 256 on the UNet's 384- and 768-channel convolutions).
const U_BLOCK_FLOATS: usize = 8 << 20;

/// See [`U_BLOCK_FLOATS`].
const MIN_CO_BLOCK: usize = 64;

/// A buffer of `n` floats, reused from the pool when one is large enough. Its contents are
/// whatever the last user left: callers write every element they read.
fn take(n: usize) -> Vec<f32> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let best = (0..pool.len())
        .filter(|&i| pool[i].capacity() >= n)
        .min_by_key(|&i| pool[i].capacity());
    match best {
        Some(i) => {
            let mut v = pool.swap_remove(i);
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, 0.0);
            }
            v
        }
        None => vec![0.0; n],
    }
}

/// Returns a buffer to the pool, dropping the smallest ones when the pool would exceed its cap.
fn give(v: Vec<f32>) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    pool.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
    let mut kept = 0;
    pool.retain(|b| {
        kept += b.capacity();
        kept <= POOL_FLOATS
    });
}

/// The shape of one convolution call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Dims {
    /// Output tiles per image row of tiles, tile rows per image.
    fn tiles(&self) -> (usize, usize) {
        (self.ow.div_ceil(4), self.oh.div_ceil(4))
    }

    /// 4×4 output tiles per image.
    pub fn tiles_per_image(&self) -> usize {
        let (tx, ty) = self.tiles();
        tx * ty
    }
}

/// `out = conv3x3(x, w, padding) + bias`: x `[b][cin][h][w]`, w `[cout][cin][3][3]`, out
/// `[b][cout][oh][ow]` (every element written).
pub(crate) fn conv(x: &[f32], w: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>], d: Dims) {
    let co_block = (U_BLOCK_FLOATS / (36 * d.cin)).max(MIN_CO_BLOCK);
    conv_chunked(x, w, bias, out, d, CHUNK_FLOATS, co_block)
}

/// [`conv`] with `V` and `M` bounded by `chunk_floats` each (at least one tile row) and the
/// output channels in blocks of `co_block`.
fn conv_chunked(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    out: &mut [MaybeUninit<f32>],
    d: Dims,
    chunk_floats: usize,
    co_block: usize,
) {
    let (ntx, nty) = d.tiles();
    let rows_total = d.b * nty;
    let per_row = 36 * ntx * d.cin.max(d.cout);
    let budget = (chunk_floats / per_row).max(1);
    // Chunks of whole images when an image fits, else of rows within one image; every GEMM covers
    // one image's rows, so an image's arithmetic does not depend on the batch it is in (gemm picks
    // its blocking from the matrix sizes).
    let chunks: Vec<(usize, usize)> = if nty <= budget {
        let per = budget / nty;
        (0..d.b)
            .step_by(per)
            .map(|i| (i * nty, per.min(d.b - i) * nty))
            .collect()
    } else {
        (0..d.b)
            .flat_map(|i| {
                (0..nty)
                    .step_by(budget)
                    .map(move |r| (i * nty + r, budget.min(nty - r)))
            })
            .collect()
    };
    let chunk_rows = chunks
        .iter()
        .map(|c| c.1)
        .max()
        .unwrap_or(1)
        .min(rows_total);
    let cb = co_block.clamp(1, d.cout);
    let mut u = take(cb * 36 * d.cin);
    let mut v = take(36 * d.cin * chunk_rows * ntx);
    let mut m = take(36 * d.cout * chunk_rows * ntx);
    let dst = Shared(out.as_mut_ptr().cast::<f32>());
    for (chunk, &(r0, rows)) in chunks.iter().enumerate() {
        let tc = rows * ntx;
        // (first column, columns) of each image's part of the chunk.
        let mut segments = Vec::new();
        let mut r = r0;
        while r < r0 + rows {
            let end = ((r / nty + 1) * nty).min(r0 + rows);
            segments.push(((r - r0) * ntx, (end - r) * ntx));
            r = end;
        }
        transform_input(x, &mut v, d, r0, rows);
        for co0 in (0..d.cout).step_by(cb) {
            let nb = cb.min(d.cout - co0);
            let ub = &mut u[..nb * 36 * d.cin];
            // With one block for all output channels, its transform serves every chunk.
            if cb < d.cout || chunk == 0 {
                transform_weight(&w[co0 * d.cin * 9..(co0 + nb) * d.cin * 9], d.cin, ub);
            }
            let vp = Shared(v.as_mut_ptr());
            let mp = Shared(m.as_mut_ptr());
            let up = Shared(ub.as_mut_ptr());
            let segments = &segments;
            (0..36).into_par_iter().for_each(|xi| {
                for &(col, n) in segments {
                    // SAFETY: the block's U is nb × 36·cin (row stride 36·cin, column ξ·cin
                    // onward); V[ξ] is cin × tc and M[ξ] cout × tc, row-major, and columns
                    // col .. col + n lie inside them; each ξ writes only rows co0 .. co0 + nb of
                    // its own M[ξ].
                    unsafe {
                        matmul(
                            (nb, n, d.cin),
                            mp.ptr().add((xi * d.cout + co0) * tc + col),
                            tc,
                            false,
                            Strided::rows(up.ptr().add(xi * d.cin), 36 * d.cin),
                            Strided::rows(vp.ptr().add(xi * d.cin * tc + col), tc),
                            1.0,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
        }
        transform_output(&m, bias, dst, d, r0, rows);
    }
    give(u);
    give(v);
    give(m);
}

/// `U[co][ξ][ci] = (G g Gᵀ)[ξ]` for every channel pair of a block of output channels (`w` their
/// weights, `u` their transforms), in parallel over output channels and
/// vectorised over input channels: per output channel the weight is first transposed to nine rows
/// of C_in, then `t = G g` (three rows per i) and `u = t Gᵀ` are whole-row multiply-adds.
fn transform_weight(w: &[f32], cin: usize, u: &mut [f32]) {
    u.par_chunks_mut(36 * cin).enumerate().for_each_init(
        || vec![0f32; 12 * cin],
        |buf, (co, uc)| {
            let (wt, t) = buf.split_at_mut(9 * cin);
            for (ci, g) in w[co * cin * 9..(co + 1) * cin * 9]
                .chunks_exact(9)
                .enumerate()
            {
                for (k, &gk) in g.iter().enumerate() {
                    wt[k * cin + ci] = gk;
                }
            }
            for (i, gi) in G.iter().enumerate() {
                // t[j] = Σ_k G[i][k] · g[k][j]  (row k·3 + j of wt).
                for j in 0..3 {
                    let tj = &mut t[j * cin..(j + 1) * cin];
                    tj.fill(0.0);
                    for (k, &c) in gi.iter().enumerate() {
                        if c != 0.0 {
                            let src = &wt[(k * 3 + j) * cin..(k * 3 + j + 1) * cin];
                            for (a, &b) in tj.iter_mut().zip(src) {
                                *a += c * b;
                            }
                        }
                    }
                }
                // u[i][l] = Σ_j t[j] · G[l][j].
                let (t0, rest) = t.split_at(cin);
                let (t1, t2) = rest.split_at(cin);
                for (l, gl) in G.iter().enumerate() {
                    let (c0, c1, c2) = (gl[0], gl[1], gl[2]);
                    let dst = &mut uc[(i * 6 + l) * cin..(i * 6 + l + 1) * cin];
                    for (((a, &x0), &x1), &x2) in dst.iter_mut().zip(t0).zip(t1).zip(t2) {
                        *a = c0 * x0 + c1 * x1 + c2 * x2;
                    }
                }
            }
        },
    );
}

/// `V[ξ][ci][t] = (Bᵀ d B)[ξ]` for the tiles of image tile rows `r0 .. r0 + rows` (a tile row is
/// one image's row of tiles; rows are numbered image-major), in parallel over input channels.
fn transform_input(x: &[f32], v: &mut [f32], d: Dims, r0: usize, rows: usize) {
    let (ntx, nty) = d.tiles();
    let tc = rows * ntx;
    let wp = 4 * ntx + 2; // padded input columns a tile row reads
    let vp = Shared(v.as_mut_ptr());
    (0..d.cin).into_par_iter().for_each_init(
        || vec![0f32; 12 * wp + 6 * ntx],
        |buf, ci| {
            let (inp, rest) = buf.split_at_mut(6 * wp);
            let (z, ph) = rest.split_at_mut(6 * wp);
            for r in 0..rows {
                let (img, ty) = ((r0 + r) / nty, (r0 + r) % nty);
                let chan = &x[(img * d.cin + ci) * d.h * d.w..][..d.h * d.w];
                // The six input rows under this tile row, zero outside the image.
                for j in 0..6 {
                    let row = &mut inp[j * wp..(j + 1) * wp];
                    row.fill(0.0);
                    let iy = (4 * ty + j) as isize - d.pad as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    // Padded column c reads input column c − pad.
                    let lo = d.pad.min(wp);
                    let hi = (d.w + d.pad).min(wp);
                    if lo < hi {
                        let src = &chan[iy as usize * d.w..][..d.w];
                        row[lo..hi].copy_from_slice(&src[..hi - lo]);
                    }
                }
                // Vertical: z[k] = Σ_j Bᵀ[k][j] · inp[j], whole rows at a time.
                for (k, btk) in BT.iter().enumerate() {
                    let zk = &mut z[k * wp..(k + 1) * wp];
                    zk.fill(0.0);
                    for (j, &c) in btk.iter().enumerate() {
                        if c != 0.0 {
                            let ij = &inp[j * wp..(j + 1) * wp];
                            for (a, &b) in zk.iter_mut().zip(ij) {
                                *a += c * b;
                            }
                        }
                    }
                }
                // Horizontal: V[k·6 + l][ci][t] = Σ_m Bᵀ[l][m] · z[k][4·tx + m], vectorised over
                // tx through the six phases p[m][tx] = z[k][4·tx + m].
                let t0 = r * ntx;
                for k in 0..6 {
                    let zk = &z[k * wp..(k + 1) * wp];
                    for (m, pm) in ph.chunks_exact_mut(ntx).enumerate() {
                        for (tx, e) in pm.iter_mut().enumerate() {
                            *e = zk[4 * tx + m];
                        }
                    }
                    let p = |m: usize| &ph[m * ntx..(m + 1) * ntx];
                    let (p0, p1, p2, p3, p4, p5) = (p(0), p(1), p(2), p(3), p(4), p(5));
                    // SAFETY: V is 36 × cin × tc; this task alone writes channel ci, and the six
                    // rows (k·6 + l, ci, t0 .. t0 + ntx) are disjoint.
                    let row = |l: usize| unsafe {
                        std::slice::from_raw_parts_mut(
                            vp.ptr().add(((k * 6 + l) * d.cin + ci) * tc + t0),
                            ntx,
                        )
                    };
                    let (r0, r1, r2) = (row(0), row(1), row(2));
                    let (r3, r4, r5) = (row(3), row(4), row(5));
                    for t in 0..ntx {
                        r0[t] = 4.0 * p0[t] - 5.0 * p2[t] + p4[t];
                        r1[t] = -4.0 * (p1[t] + p2[t]) + p3[t] + p4[t];
                        r2[t] = 4.0 * (p1[t] - p2[t]) - p3[t] + p4[t];
                        r3[t] = 2.0 * (p3[t] - p1[t]) - p2[t] + p4[t];
                        r4[t] = 2.0 * (p1[t] - p3[t]) - p2[t] + p4[t];
                        r5[t] = 4.0 * p1[t] - 5.0 * p3[t] + p5[t];
                    }
                }
            }
        },
    );
}

/// `out[img][co][4·ty + i][4·tx + j] = (Aᵀ m A)[i][j] + bias[co]` for the chunk's tiles, cropped
/// to the output, in parallel over output channels and vectorised over the tiles of a row.
fn transform_output(m: &[f32], bias: &[f32], out: Shared, d: Dims, r0: usize, rows: usize) {
    let (ntx, nty) = d.tiles();
    let tc = rows * ntx;
    let plane = d.oh * d.ow;
    (0..d.cout).into_par_iter().for_each_init(
        || vec![0f32; 28 * ntx],
        |buf, co| {
            let (q, y) = buf.split_at_mut(24 * ntx);
            for r in 0..rows {
                let (img, ty) = ((r0 + r) / nty, (r0 + r) % nty);
                let t0 = r * ntx;
                let mrow = |xi: usize| &m[(xi * d.cout + co) * tc + t0..][..ntx];
                // Horizontal: q[k][j] = Σ_l Aᵀ[j][l] · m[k][l].
                for k in 0..6 {
                    let (s0, s1, s2) = (mrow(k * 6), mrow(k * 6 + 1), mrow(k * 6 + 2));
                    let (s3, s4, s5) = (mrow(k * 6 + 3), mrow(k * 6 + 4), mrow(k * 6 + 5));
                    let qk = &mut q[k * 4 * ntx..(k + 1) * 4 * ntx];
                    let (q0, rest) = qk.split_at_mut(ntx);
                    let (q1, rest) = rest.split_at_mut(ntx);
                    let (q2, q3) = rest.split_at_mut(ntx);
                    for t in 0..ntx {
                        let (a, b) = (s1[t] + s2[t], s1[t] - s2[t]);
                        let (c, e) = (s3[t] + s4[t], s3[t] - s4[t]);
                        q0[t] = s0[t] + a + c;
                        q1[t] = b + 2.0 * e;
                        q2[t] = a + 4.0 * c;
                        q3[t] = b + 8.0 * e + s5[t];
                    }
                }
                // Vertical, one output row i at a time: y[j] = Σ_k Aᵀ[i][k] · q[k][j] + bias.
                let base = (img * d.cout + co) * plane;
                for (i, ati) in AT.iter().enumerate() {
                    let oy = 4 * ty + i;
                    if oy >= d.oh {
                        break;
                    }
                    for j in 0..4 {
                        let yj = &mut y[j * ntx..(j + 1) * ntx];
                        yj.fill(bias[co]);
                        for (k, &c) in ati.iter().enumerate() {
                            if c != 0.0 {
                                let qkj = &q[(k * 4 + j) * ntx..(k * 4 + j + 1) * ntx];
                                for (a, &b) in yj.iter_mut().zip(qkj) {
                                    *a += c * b;
                                }
                            }
                        }
                    }
                    // SAFETY: plane (img, co) belongs to this task alone; row oy < oh.
                    let orow = unsafe {
                        std::slice::from_raw_parts_mut(out.ptr().add(base + oy * d.ow), d.ow)
                    };
                    for (x, o) in orow.iter_mut().enumerate() {
                        *o = y[(x % 4) * ntx + x / 4];
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3×3 correlation in f64, the ground truth.
    fn direct(x: &[f32], w: &[f32], bias: &[f32], d: Dims) -> Vec<f64> {
        let mut out = vec![0f64; d.b * d.cout * d.oh * d.ow];
        for img in 0..d.b {
            for co in 0..d.cout {
                for y in 0..d.oh {
                    for xx in 0..d.ow {
                        let mut s = bias[co] as f64;
                        for ci in 0..d.cin {
                            for kh in 0..3 {
                                for kw in 0..3 {
                                    let iy = (y + kh) as isize - d.pad as isize;
                                    let ix = (xx + kw) as isize - d.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= d.h as isize || ix >= d.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((img * d.cin + ci) * d.h + iy as usize) * d.w
                                        + ix as usize];
                                    s +=
                                        xv as f64 * w[((co * d.cin + ci) * 3 + kh) * 3 + kw] as f64;
                                }
                            }
                        }
                        out[((img * d.cout + co) * d.oh + y) * d.ow + xx] = s;
                    }
                }
            }
        }
        out
    }

    /// Relative L2 error of an output buffer (initialised before the call, so an element the
    /// kernel missed shows as NaN) against the f64 ground truth.
    fn rel_to(out: &[MaybeUninit<f32>], want: &[f64]) -> f64 {
        // SAFETY: the tests fill every buffer with NaN before the kernel writes it.
        let got = out.iter().map(|v| unsafe { v.assume_init() } as f64);
        let num: f64 = got.zip(want).map(|(g, w)| (g - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    /// A deterministic pseudo-random fill in [-1, 1).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// Every tile position (edges cropped, padding 0, 1 and 2, batch > 1, sizes that are not
    /// multiples of 4), the chunked path (one tile row per chunk, with one weight transform for
    /// all chunks or one per block) and output-channel blocks (of 1 and of 7, leaving a partial
    /// block) against the f64 direct convolution.
    #[test]
    fn equals_the_direct_convolution() {
        let cases = [
            // (b, cin, cout, h, w, pad)
            (1, 1, 1, 1, 1, 1),
            (1, 3, 5, 7, 9, 1),
            (2, 5, 3, 13, 11, 1),
            (3, 4, 7, 8, 8, 0),
            (1, 17, 33, 37, 29, 1),
            (1, 6, 2, 5, 4, 2),
            (2, 24, 20, 16, 16, 1),
        ];
        for (b, cin, cout, h, w, pad) in cases {
            let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let d = Dims {
                b,
                cin,
                h,
                w,
                cout,
                pad,
                oh,
                ow,
            };
            let x = fill(b * cin * h * w, 1);
            let k: Vec<f32> = fill(cout * cin * 9, 2).iter().map(|v| v * 0.3).collect();
            let bias = fill(cout, 3);
            let want = direct(&x, &k, &bias, d);
            for (chunk, co_block) in [
                (CHUNK_FLOATS, usize::MAX),
                (1, usize::MAX),
                (1, 1),
                (CHUNK_FLOATS, 7),
            ] {
                let mut out = vec![MaybeUninit::new(f32::NAN); want.len()];
                conv_chunked(&x, &k, &bias, &mut out, d, chunk, co_block);
                let e = rel_to(&out, &want);
                assert!(
                    e <= 1e-5,
                    "{d:?} chunk {chunk} block {co_block}: rel L2 {e:e}"
                );
            }
        }
    }

    /// An image's output is bit-identical alone and in a batch (step-level batching relies on
    /// it), also when images span chunks.
    #[test]
    fn batch_invariant() {
        let (cin, cout, h, w) = (40, 72, 20, 28);
        let one = |b: usize| Dims {
            b,
            cin,
            h,
            w,
            cout,
            pad: 1,
            oh: h,
            ow: w,
        };
        let x = fill(3 * cin * h * w, 7);
        let k = fill(cout * cin * 9, 8);
        let bias = fill(cout, 9);
        for (chunk, co_block) in [(CHUNK_FLOATS, usize::MAX), (36 * 7 * 72 * 3, 64), (1, 32)] {
            let mut all = vec![MaybeUninit::new(f32::NAN); 3 * cout * h * w];
            conv_chunked(&x, &k, &bias, &mut all, one(3), chunk, co_block);
            for i in 0..3 {
                let mut alone = vec![MaybeUninit::new(f32::NAN); cout * h * w];
                let xi = &x[i * cin * h * w..(i + 1) * cin * h * w];
                conv_chunked(xi, &k, &bias, &mut alone, one(1), chunk, co_block);
                let part = &all[i * cout * h * w..(i + 1) * cout * h * w];
                // SAFETY: both buffers were initialised (NaN) before the calls.
                let same = part.iter().zip(&alone).all(|(a, b)| unsafe {
                    a.assume_init().to_bits() == b.assume_init().to_bits()
                });
                assert!(
                    same,
                    "image {i}, chunk {chunk}, block {co_block}: batch changed the result"
                );
            }
        }
    }

    /// Kandinsky-sized channel counts keep the error of an f32 convolution (the UNet's widest
    /// level, its activations' scale).
    #[test]
    fn wide_channels_stay_accurate() {
        let d = Dims {
            b: 1,
            cin: 1152,
            h: 8,
            w: 8,
            cout: 8,
            pad: 1,
            oh: 8,
            ow: 8,
        };
        let x = fill(d.b * d.cin * d.h * d.w, 4);
        let k: Vec<f32> = fill(d.cout * d.cin * 9, 5)
            .iter()
            .map(|v| v * 0.02)
            .collect();
        let bias = fill(d.cout, 6);
        let want = direct(&x, &k, &bias, d);
        let mut out = vec![MaybeUninit::new(f32::NAN); want.len()];
        conv(&x, &k, &bias, &mut out, d);
        let e = rel_to(&out, &want);
        assert!(e <= 1e-5, "rel L2 {e:e}");
    }
}
