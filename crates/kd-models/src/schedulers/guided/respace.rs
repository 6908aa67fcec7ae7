//! `respace.py: space_timesteps` (and the `"ddimN"` striding of `make_ddim_timesteps`) with
//! Python's parsing and rounding: `int()` accepts surrounding whitespace, a sign and `_` between
//! digits; `round()` rounds half to even; a non-positive section count takes no steps.

use crate::error::{ModelError, Result};

const FIELD: &str = "timestep_respacing";

/// Python's `int(s)` for base-10 strings: surrounding whitespace, an optional sign, ASCII digits
/// with single underscores between them.
pub(crate) fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let (neg, digits) = match t.as_bytes().first()? {
        b'+' => (false, &t[1..]),
        b'-' => (true, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let v: i64 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -v } else { v })
}

fn bad(spec: &str, why: impl std::fmt::Display) -> ModelError {
    ModelError::invalid(
        FIELD,
        format!(
            "{spec:?}: {why}; allowed \"\" (every step), comma-separated section counts (\"10,5\") \
             or \"ddimN\""
        ),
    )
}

/// `make_ddim_timesteps("uniform", n, num_timesteps)`: `range(0, T, T // n) + 1`.
pub(crate) fn ddim_uniform_timesteps(n: i64, num_timesteps: usize) -> Option<Vec<usize>> {
    if n <= 0 || n as usize > num_timesteps {
        return None; // ZeroDivisionError / `range()` with step 0 / an empty range
    }
    let c = num_timesteps / n as usize;
    Some((0..num_timesteps).step_by(c).map(|t| t + 1).collect())
}

/// `space_timesteps(num_timesteps, section_counts)` as `create_gaussian_diffusion` calls it
/// (`""` means every step), sorted. Members `>= num_timesteps` (`"ddimN"` can produce
/// `num_timesteps` itself) are kept here; `SpacedDiffusion` drops them silently.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>> {
    if num_timesteps == 0 {
        return Err(ModelError::invalid("steps", "0; allowed ≥ 2"));
    }
    let mut steps: Vec<usize> = Vec::new();
    if spec.is_empty() {
        steps.extend(0..num_timesteps);
    } else if let Some(rest) = spec.strip_prefix("ddim") {
        let n = py_int(rest).ok_or_else(|| bad(spec, format!("{rest:?} is not an integer")))?;
        steps = ddim_uniform_timesteps(n, num_timesteps).ok_or_else(|| {
            bad(
                spec,
                format!("\"ddimN\" takes 1 ..= {num_timesteps} steps, got {n}"),
            )
        })?;
    } else {
        let counts = spec
            .split(',')
            .map(|p| py_int(p).ok_or_else(|| bad(spec, format!("{p:?} is not an integer"))))
            .collect::<Result<Vec<i64>>>()?;
        let k = counts.len();
        let (size_per, extra) = (num_timesteps / k, num_timesteps % k);
        let mut start = 0usize;
        for (i, &count) in counts.iter().enumerate() {
            let size = size_per + usize::from(i < extra);
            if count > size as i64 {
                return Err(bad(
                    spec,
                    format!("cannot divide section of {size} steps into {count}"),
                ));
            }
            let stride = if count <= 1 {
                1.0
            } else {
                (size - 1) as f64 / (count - 1) as f64
            };
            let mut cur = 0.0f64;
            for _ in 0..count.max(0) {
                steps.push(start + cur.round_ties_even() as usize);
                cur += stride;
            }
            start += size;
        }
    }
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int_parsing() {
        assert_eq!(py_int(" 6 "), Some(6));
        assert_eq!(py_int("+3"), Some(3));
        assert_eq!(py_int("-2"), Some(-2));
        assert_eq!(py_int("1_0"), Some(10));
        for s in ["", " ", "_1", "1_", "1__0", "x", "1.0", "+", "0x10"] {
            assert_eq!(py_int(s), None, "{s:?}");
        }
    }

    #[test]
    fn ties_round_to_even() {
        // "7": stride 166.5 -> 0, 166 (not 167), 333, 500, 666, 832 (not 833), 999
        assert_eq!(
            space_timesteps(1000, "7").unwrap(),
            vec![0, 166, 333, 500, 666, 832, 999]
        );
    }
}
