//! Where the randomness of sampling comes from: Gaussian noise (diffusion) and uniform draws
//! (masked-token sampling: categorical draws and Gumbel noise).
//!
//! Production draws are made on the CPU from one seeded RNG **per batch row** (per image), so an
//! image depends only on its own seed — not on batch composition, replica or device. Parity tests
//! replay the exact tensors diffusers drew instead.

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::VecDeque;

/// A source of random tensors, drawn in a fixed order.
pub trait NoiseSource {
    /// Draws a standard-normal tensor of `shape` (f32) on `device`.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;

    /// Draws a tensor of `shape` (f32) uniform in [0, 1) on `device`.
    fn rand(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// One ChaCha8 RNG per batch row. A draw of shape `(B, ...)` takes row `i` from RNG `i`. A draw
/// of `k·B` rows (Kandinsky 2.0 samples the classifier-free guidance halves as one `2B` batch)
/// takes each RNG's row once and repeats the `B` rows `k` times: both halves of an image draw
/// from its seed, and the stream advances as for one draw.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rngs: Vec<ChaCha8Rng>,
}

impl SeededNoise {
    /// One RNG per seed; the batch size of every draw must be `seeds.len()` or a multiple of it.
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            rngs: seeds
                .iter()
                .map(|&s| ChaCha8Rng::seed_from_u64(s))
                .collect(),
        }
    }

    /// Number of rows (seeds).
    pub fn rows(&self) -> usize {
        self.rngs.len()
    }
}

impl SeededNoise {
    /// Draws `shape` row by row, `draw` giving each value from its row's RNG.
    fn draw(
        &mut self,
        shape: &[usize],
        device: &Device,
        draw: impl Fn(&mut ChaCha8Rng) -> f32,
    ) -> Result<Tensor> {
        let (&b, rest) = shape
            .split_first()
            .ok_or_else(|| ModelError::invalid("noise shape", "must have a batch dimension"))?;
        let n = self.rngs.len();
        if n == 0 || b == 0 || !b.is_multiple_of(n) {
            return Err(ModelError::invalid(
                "seeds",
                format!("{n} seeds for a batch of {b} (allowed: a multiple of the seeds)"),
            ));
        }
        let per_row: usize = rest.iter().product();
        let mut data = Vec::with_capacity(b * per_row);
        for rng in &mut self.rngs {
            data.extend((0..per_row).map(|_| draw(rng)));
        }
        let mut row_shape = shape.to_vec();
        row_shape[0] = n;
        let t = Tensor::from_vec(data, row_shape, &Device::Cpu)?;
        let t = match b / n {
            1 => t,
            k => Tensor::cat(&vec![&t; k], 0)?,
        };
        Ok(t.to_device(device)?)
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.draw(shape, device, |rng| StandardNormal.sample(rng))
    }

    fn rand(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.draw(shape, device, |rng| rng.random::<f32>())
    }
}

/// Replays recorded tensors in order (parity tests against diffusers' recorded draws).
#[derive(Debug, Clone, Default)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
}

impl ReplayNoise {
    /// Replays `draws` in order.
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: draws.into_iter().collect(),
        }
    }

    /// Splits a stacked `(K, ...)` tensor into K draws.
    pub fn from_stacked(stacked: &Tensor) -> Result<Self> {
        let k = stacked.dim(0)?;
        Ok(Self::new(
            (0..k)
                .map(|i| stacked.get(i))
                .collect::<candle_core::Result<Vec<_>>>()?,
        ))
    }

    /// Draws not yet consumed.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl ReplayNoise {
    fn next(&mut self) -> Result<Tensor> {
        self.queue
            .pop_front()
            .ok_or_else(|| ModelError::invalid("noise", "replay source exhausted"))
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.next()?;
        if t.dims() != shape {
            return Err(ModelError::invalid(
                "noise",
                format!("replayed draw has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        Ok(t.to_dtype(candle_core::DType::F32)?.to_device(device)?)
    }

    /// Replays the next draw reshaped to `shape`: diffusers draws the categorical sampler's
    /// uniforms as one flat (B·N) vector where this crate draws (B, N), so only the element
    /// count must match.
    fn rand(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.next()?;
        if t.elem_count() != shape.iter().product::<usize>() {
            return Err(ModelError::invalid(
                "noise",
                format!(
                    "replayed uniform draw has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.reshape(shape)?
            .to_dtype(candle_core::DType::F32)?
            .to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_depend_only_on_their_own_seed() {
        let dev = Device::Cpu;
        let a = SeededNoise::new(&[7, 8]).randn(&[2, 3, 4], &dev).unwrap();
        let b = SeededNoise::new(&[8]).randn(&[1, 3, 4], &dev).unwrap();
        let a1 = a
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b0 = b
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a1, b0);
        let a0 = a
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a0, a1);
    }

    #[test]
    fn a_multiple_of_the_rows_repeats_each_seeds_draw() {
        let dev = Device::Cpu;
        let rows = |t: &Tensor| -> Vec<Vec<f32>> {
            (0..t.dim(0).unwrap())
                .map(|i| t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let mut doubled = SeededNoise::new(&[3, 4]);
        let mut single = SeededNoise::new(&[3, 4]);
        for _ in 0..2 {
            let d = rows(&doubled.randn(&[4, 2, 3], &dev).unwrap());
            let s = rows(&single.randn(&[2, 2, 3], &dev).unwrap());
            assert_eq!(
                d,
                [s.clone(), s].concat(),
                "the halves repeat, the streams advance once"
            );
        }
        let e = SeededNoise::new(&[3, 4]).randn(&[3, 2], &dev).unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        assert!(SeededNoise::new(&[]).randn(&[0, 2], &dev).is_err());
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let t = SeededNoise::new(&[1])
            .randn(&[1, 20000], &Device::Cpu)
            .unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn batch_mismatch_and_exhaustion_are_errors() {
        let dev = Device::Cpu;
        assert!(SeededNoise::new(&[1, 2]).randn(&[3, 4], &dev).is_err());
        let mut r =
            ReplayNoise::new([Tensor::zeros((2, 2), candle_core::DType::F32, &dev).unwrap()]);
        assert!(r.randn(&[2, 3], &dev).is_err());
        assert!(r.randn(&[2, 2], &dev).is_err(), "exhausted after one draw");
    }
}
