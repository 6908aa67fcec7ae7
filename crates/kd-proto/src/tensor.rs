//! Wire tensor codec: [`v1::Tensor`] (raw little-endian, row-major bytes) ⇄ [`candle_core::Tensor`].
//!
//! Decoding never trusts the message: the shape is checked for negative and overflowing
//! dimensions, the byte length must equal `product(shape) · size_of(dtype)`, and the total size is
//! capped, so a malformed or hostile message yields a [`WireTensorError`], never a panic or a huge
//! allocation.

use crate::v1;
use candle_core::{DType, Device, Tensor};

/// Why a wire tensor could not be decoded or encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireTensorError {
    #[error("tensor dtype {0} is not supported (allowed: F32, F16, BF16, I64)")]
    UnknownDType(i32),
    #[error("tensor dimension {index} is {value}; dimensions must be >= 0")]
    NegativeDim { index: usize, value: i64 },
    #[error("tensor shape {shape:?} overflows the element count")]
    Overflow { shape: Vec<i64> },
    #[error("tensor of shape {shape:?} needs {needed} bytes, over the limit of {limit} bytes")]
    TooLarge {
        shape: Vec<i64>,
        needed: u128,
        limit: usize,
    },
    #[error(
        "tensor of shape {shape:?} and dtype {dtype} needs {expected} bytes of data, got {actual}"
    )]
    LengthMismatch {
        shape: Vec<i64>,
        dtype: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("tensor dtype {0:?} cannot be sent on the wire (allowed: F32, F16, BF16, I64)")]
    UnsupportedCandleDType(DType),
    #[error("tensor: {0}")]
    Candle(String),
    #[error("tensor of shape {shape:?} has no rows (a row helper needs rank >= 1)")]
    NoRows { shape: Vec<i64> },
    #[error("rows {start}..{end} asked of a tensor with {rows} rows")]
    RowsOutOfRange {
        start: usize,
        end: usize,
        rows: usize,
    },
    #[error("no tensors to concatenate")]
    NothingToConcat,
    #[error(
        "tensor {index} has shape {shape:?} and dtype {dtype}; rows can only be joined to \
         shape {expected:?} (any first dimension) and dtype {expected_dtype}"
    )]
    RowMismatch {
        index: usize,
        shape: Vec<i64>,
        dtype: i32,
        expected: Vec<i64>,
        expected_dtype: i32,
    },
}

/// Bounds applied when decoding untrusted tensors.
#[derive(Debug, Clone, Copy)]
pub struct TensorLimits {
    /// Largest accepted `data` size in bytes.
    pub max_bytes: usize,
    /// Largest accepted rank.
    pub max_rank: usize,
}

impl Default for TensorLimits {
    /// 256 MiB and rank 8: comfortably above a batch of 2048×2048 latents.
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_rank: 8,
        }
    }
}

fn wire_dtype(dtype: DType) -> Result<v1::DType, WireTensorError> {
    Ok(match dtype {
        DType::F32 => v1::DType::DtypeF32,
        DType::F16 => v1::DType::DtypeF16,
        DType::BF16 => v1::DType::DtypeBf16,
        DType::I64 => v1::DType::DtypeI64,
        other => return Err(WireTensorError::UnsupportedCandleDType(other)),
    })
}

fn candle_dtype(dtype: i32) -> Result<(DType, &'static str), WireTensorError> {
    match v1::DType::try_from(dtype) {
        Ok(v1::DType::DtypeF32) => Ok((DType::F32, "F32")),
        Ok(v1::DType::DtypeF16) => Ok((DType::F16, "F16")),
        Ok(v1::DType::DtypeBf16) => Ok((DType::BF16, "BF16")),
        Ok(v1::DType::DtypeI64) => Ok((DType::I64, "I64")),
        _ => Err(WireTensorError::UnknownDType(dtype)),
    }
}

/// Encodes a candle tensor (any device, contiguous or not) as a wire tensor.
pub fn to_wire(t: &Tensor) -> Result<v1::Tensor, WireTensorError> {
    let dtype = wire_dtype(t.dtype())?;
    let c = |e: candle_core::Error| WireTensorError::Candle(e.to_string());
    let flat = t
        .flatten_all()
        .map_err(c)?
        .to_device(&Device::Cpu)
        .map_err(c)?;
    let data: Vec<u8> = match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .map_err(c)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .map_err(c)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .map_err(c)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .map_err(c)?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(WireTensorError::UnsupportedCandleDType(other)),
    };
    Ok(v1::Tensor {
        shape: t.dims().iter().map(|&d| d as i64).collect(),
        dtype: dtype as i32,
        data: data.into(),
    })
}

/// Checks a wire tensor's header against `limits` and returns its dims and dtype.
pub fn validate(
    t: &v1::Tensor,
    limits: &TensorLimits,
) -> Result<(Vec<usize>, DType), WireTensorError> {
    let (dtype, name) = candle_dtype(t.dtype)?;
    if t.shape.len() > limits.max_rank {
        return Err(WireTensorError::TooLarge {
            shape: t.shape.clone(),
            needed: u128::MAX,
            limit: limits.max_bytes,
        });
    }
    let mut dims = Vec::with_capacity(t.shape.len());
    let mut elems: u128 = 1;
    for (index, &value) in t.shape.iter().enumerate() {
        if value < 0 {
            return Err(WireTensorError::NegativeDim { index, value });
        }
        elems = elems
            .checked_mul(value as u128)
            .ok_or_else(|| WireTensorError::Overflow {
                shape: t.shape.clone(),
            })?;
        dims.push(
            usize::try_from(value).map_err(|_| WireTensorError::Overflow {
                shape: t.shape.clone(),
            })?,
        );
    }
    let needed = elems * dtype.size_in_bytes() as u128;
    if needed > limits.max_bytes as u128 {
        return Err(WireTensorError::TooLarge {
            shape: t.shape.clone(),
            needed,
            limit: limits.max_bytes,
        });
    }
    if needed != t.data.len() as u128 {
        return Err(WireTensorError::LengthMismatch {
            shape: t.shape.clone(),
            dtype: name,
            expected: needed as usize,
            actual: t.data.len(),
        });
    }
    Ok((dims, dtype))
}

/// Decodes a wire tensor onto `device`, after [`validate`].
pub fn from_wire(
    t: &v1::Tensor,
    device: &Device,
    limits: &TensorLimits,
) -> Result<Tensor, WireTensorError> {
    let (dims, dtype) = validate(t, limits)?;
    let c = |e: candle_core::Error| WireTensorError::Candle(e.to_string());
    let bytes = &t.data[..];
    let tensor = match dtype {
        DType::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        DType::F16 => {
            let v: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        DType::I64 => {
            let v: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("chunks_exact(8)")))
                .collect();
            Tensor::from_vec(v, dims, device)
        }
        other => return Err(WireTensorError::UnsupportedCandleDType(other)),
    };
    tensor.map_err(c)
}

/// The rows of a validated wire tensor: (rows, bytes per row).
fn rows_of(t: &v1::Tensor) -> Result<(usize, usize), WireTensorError> {
    let (dims, _) = validate(t, &TensorLimits::default())?;
    let rows = *dims.first().ok_or_else(|| WireTensorError::NoRows {
        shape: t.shape.clone(),
    })?;
    // `validate` checked that data holds exactly product(dims) elements.
    let row_bytes = t.data.len().checked_div(rows).unwrap_or(0);
    Ok((rows, row_bytes))
}

/// `t` with its first dimension set to `rows` and `data` as its bytes.
fn with_rows(
    t: &v1::Tensor,
    rows: usize,
    data: bytes::Bytes,
) -> Result<v1::Tensor, WireTensorError> {
    let overflow = || WireTensorError::Overflow {
        shape: t.shape.clone(),
    };
    let mut shape = t.shape.clone();
    *shape.first_mut().ok_or_else(overflow)? = i64::try_from(rows).map_err(|_| overflow())?;
    Ok(v1::Tensor {
        shape,
        dtype: t.dtype,
        data,
    })
}

/// Row `row` of a (B, ...) wire tensor, as a (1, ...) tensor sharing `t`'s bytes.
pub fn select_row(t: &v1::Tensor, row: usize) -> Result<v1::Tensor, WireTensorError> {
    select_rows(t, row, 1)
}

/// Rows `start..start + n` of a (B, ...) wire tensor, as an (n, ...) tensor sharing `t`'s bytes
/// (one request's share of a batch computed for several).
pub fn select_rows(t: &v1::Tensor, start: usize, n: usize) -> Result<v1::Tensor, WireTensorError> {
    let (rows, row_bytes) = rows_of(t)?;
    let end = start.checked_add(n).filter(|&e| e <= rows);
    let Some(end) = end else {
        return Err(WireTensorError::RowsOutOfRange {
            start,
            end: start.saturating_add(n),
            rows,
        });
    };
    // end <= rows, so end · row_bytes <= data.len().
    with_rows(t, n, t.data.slice(start * row_bytes..end * row_bytes))
}

/// Repeats every row of a (B, ...) wire tensor `n` times, row-major like torch's
/// `repeat_interleave(n, dim=0)`: rows a, b and n = 2 give a, a, b, b.
pub fn repeat_rows(t: &v1::Tensor, n: usize) -> Result<v1::Tensor, WireTensorError> {
    let (rows, row_bytes) = rows_of(t)?;
    let overflow = || WireTensorError::Overflow {
        shape: t.shape.clone(),
    };
    let out_rows = rows.checked_mul(n).ok_or_else(overflow)?;
    let out_bytes = t.data.len().checked_mul(n).ok_or_else(overflow)?;
    let limit = TensorLimits::default().max_bytes;
    if out_bytes > limit {
        return Err(WireTensorError::TooLarge {
            shape: t.shape.clone(),
            needed: out_bytes as u128,
            limit,
        });
    }
    let mut data = Vec::with_capacity(out_bytes);
    for row in t.data.chunks_exact(row_bytes.max(1)).take(rows) {
        for _ in 0..n {
            data.extend_from_slice(row);
        }
    }
    with_rows(t, out_rows, data.into())
}

/// Joins (B_i, ...) wire tensors of the same trailing shape and dtype into one (ΣB_i, ...).
pub fn concat_rows(parts: &[v1::Tensor]) -> Result<v1::Tensor, WireTensorError> {
    let first = parts.first().ok_or(WireTensorError::NothingToConcat)?;
    let mut rows = 0usize;
    let mut len = 0usize;
    for (index, p) in parts.iter().enumerate() {
        let (r, _) = rows_of(p)?;
        if p.shape[1..] != first.shape[1..] || p.dtype != first.dtype {
            return Err(WireTensorError::RowMismatch {
                index,
                shape: p.shape.clone(),
                dtype: p.dtype,
                expected: first.shape.clone(),
                expected_dtype: first.dtype,
            });
        }
        let overflow = || WireTensorError::Overflow {
            shape: p.shape.clone(),
        };
        rows = rows.checked_add(r).ok_or_else(overflow)?;
        len = len.checked_add(p.data.len()).ok_or_else(overflow)?;
    }
    let mut data = Vec::with_capacity(len);
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    with_rows(first, rows, data.into())
}

/// Applies `f` to each tensor of a text conditioning (absent tensors stay absent).
fn map_text_embeddings(
    c: &v1::TextEmbeddings,
    f: impl Fn(&v1::Tensor) -> Result<v1::Tensor, WireTensorError>,
) -> Result<v1::TextEmbeddings, WireTensorError> {
    let map = |t: &Option<v1::Tensor>| t.as_ref().map(&f).transpose();
    Ok(v1::TextEmbeddings {
        text_embeds: map(&c.text_embeds)?,
        hidden_states: map(&c.hidden_states)?,
        attention_mask: map(&c.attention_mask)?,
    })
}

/// Row `row` of every tensor of a text conditioning (one prompt of a batch).
pub fn text_embeddings_row(
    c: &v1::TextEmbeddings,
    row: usize,
) -> Result<v1::TextEmbeddings, WireTensorError> {
    text_embeddings_rows(c, row, 1)
}

/// Rows `start..start + n` of every tensor of a text conditioning (see [`select_rows`]).
pub fn text_embeddings_rows(
    c: &v1::TextEmbeddings,
    start: usize,
    n: usize,
) -> Result<v1::TextEmbeddings, WireTensorError> {
    map_text_embeddings(c, |t| select_rows(t, start, n))
}

/// Every row of every tensor of a text conditioning repeated `n` times (see [`repeat_rows`]).
pub fn repeat_text_embeddings(
    c: &v1::TextEmbeddings,
    n: usize,
) -> Result<v1::TextEmbeddings, WireTensorError> {
    map_text_embeddings(c, |t| repeat_rows(t, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(shape: Vec<i64>, dtype: v1::DType, len: usize) -> v1::Tensor {
        v1::Tensor {
            shape,
            dtype: dtype as i32,
            data: vec![0u8; len].into(),
        }
    }

    #[test]
    fn rejects_length_mismatch_naming_expected_bytes() {
        let err = from_wire(
            &wire(vec![2, 3], v1::DType::DtypeF32, 23),
            &Device::Cpu,
            &TensorLimits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor of shape [2, 3] and dtype F32 needs 24 bytes of data, got 23"
        );
    }

    #[test]
    fn rejects_negative_dim() {
        let err = from_wire(
            &wire(vec![2, -1], v1::DType::DtypeF32, 0),
            &Device::Cpu,
            &TensorLimits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            WireTensorError::NegativeDim {
                index: 1,
                value: -1
            }
        );
        assert!(err.to_string().contains("must be >= 0"));
    }

    #[test]
    fn rejects_overflowing_shape_without_allocating() {
        let t = wire(vec![i64::MAX, i64::MAX, i64::MAX], v1::DType::DtypeF32, 0);
        let err = from_wire(&t, &Device::Cpu, &TensorLimits::default()).unwrap_err();
        assert!(matches!(err, WireTensorError::Overflow { .. }), "{err}");
    }

    #[test]
    fn rejects_unknown_dtype() {
        let mut t = wire(vec![1], v1::DType::DtypeF32, 4);
        t.dtype = 42;
        let err = from_wire(&t, &Device::Cpu, &TensorLimits::default()).unwrap_err();
        assert_eq!(err, WireTensorError::UnknownDType(42));
        assert!(err.to_string().contains("allowed: F32, F16, BF16, I64"));
        t.dtype = v1::DType::DtypeUnspecified as i32;
        assert!(from_wire(&t, &Device::Cpu, &TensorLimits::default()).is_err());
    }

    #[test]
    fn rejects_over_size_cap() {
        let limits = TensorLimits {
            max_bytes: 1024,
            max_rank: 8,
        };
        let t = wire(vec![1, 4, 16, 16], v1::DType::DtypeF32, 4096);
        let err = from_wire(&t, &Device::Cpu, &limits).unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 1024 bytes"),
            "{err}"
        );
    }

    #[test]
    fn rejects_too_many_dims() {
        let t = wire(vec![1; 9], v1::DType::DtypeF32, 4);
        assert!(from_wire(&t, &Device::Cpu, &TensorLimits::default()).is_err());
    }

    #[test]
    fn scalar_and_empty_tensors_round_trip() {
        let s = Tensor::new(3.5f32, &Device::Cpu).unwrap();
        let w = to_wire(&s).unwrap();
        assert!(w.shape.is_empty());
        assert_eq!(w.data.len(), 4);
        let back = from_wire(&w, &Device::Cpu, &TensorLimits::default()).unwrap();
        assert_eq!(back.to_scalar::<f32>().unwrap(), 3.5);

        let e = Tensor::zeros((2, 0, 3), DType::F32, &Device::Cpu).unwrap();
        let back = from_wire(
            &to_wire(&e).unwrap(),
            &Device::Cpu,
            &TensorLimits::default(),
        )
        .unwrap();
        assert_eq!(back.dims(), &[2, 0, 3]);
    }

    #[test]
    fn unsupported_candle_dtype_is_an_error() {
        let t = Tensor::new(&[1u8, 2], &Device::Cpu).unwrap();
        assert_eq!(
            to_wire(&t).unwrap_err(),
            WireTensorError::UnsupportedCandleDType(DType::U8)
        );
    }

    #[test]
    fn non_contiguous_tensor_is_encoded_row_major() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap()
            .t()
            .unwrap();
        let back = from_wire(
            &to_wire(&t).unwrap(),
            &Device::Cpu,
            &TensorLimits::default(),
        )
        .unwrap();
        assert_eq!(
            back.to_vec2::<f32>().unwrap(),
            vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
        );
    }

    fn rows(values: &[f32], shape: Vec<i64>) -> v1::Tensor {
        v1::Tensor {
            shape,
            dtype: v1::DType::DtypeF32 as i32,
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    fn values(t: &v1::Tensor) -> Vec<f32> {
        from_wire(t, &Device::Cpu, &TensorLimits::default())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn rows_are_selected_repeated_and_joined() {
        let t = rows(&[1., 2., 3., 4., 5., 6.], vec![3, 2]);
        let r = select_row(&t, 1).unwrap();
        assert_eq!((r.shape.clone(), values(&r)), (vec![1, 2], vec![3., 4.]));
        let rep = repeat_rows(&t, 2).unwrap();
        assert_eq!(rep.shape, vec![6, 2]);
        assert_eq!(
            values(&rep),
            vec![1., 2., 1., 2., 3., 4., 3., 4., 5., 6., 5., 6.]
        );
        assert_eq!(repeat_rows(&t, 1).unwrap(), t);
        assert_eq!(repeat_rows(&t, 0).unwrap().shape, vec![0, 2]);
        let joined = concat_rows(&[select_row(&t, 2).unwrap(), t.clone()]).unwrap();
        assert_eq!(joined.shape, vec![4, 2]);
        assert_eq!(values(&joined), vec![5., 6., 1., 2., 3., 4., 5., 6.]);
        let mid = select_rows(&joined, 1, 2).unwrap();
        assert_eq!(
            (mid.shape.clone(), values(&mid)),
            (vec![2, 2], vec![1., 2., 3., 4.])
        );
        assert_eq!(select_rows(&joined, 4, 0).unwrap().shape, vec![0, 2]);
    }

    #[test]
    fn row_helpers_return_errors_not_panics() {
        let t = rows(&[1., 2., 3., 4.], vec![2, 2]);
        assert_eq!(
            select_row(&t, 2).unwrap_err(),
            WireTensorError::RowsOutOfRange {
                start: 2,
                end: 3,
                rows: 2
            }
        );
        assert_eq!(
            select_rows(&t, 1, usize::MAX).unwrap_err(),
            WireTensorError::RowsOutOfRange {
                start: 1,
                end: usize::MAX,
                rows: 2
            }
        );
        let scalar = rows(&[1.], vec![]);
        assert!(matches!(
            select_row(&scalar, 0).unwrap_err(),
            WireTensorError::NoRows { .. }
        ));
        assert!(repeat_rows(&scalar, 2).is_err());
        assert!(matches!(
            repeat_rows(&t, usize::MAX).unwrap_err(),
            WireTensorError::Overflow { .. }
        ));
        assert!(matches!(
            repeat_rows(&t, 1 << 30).unwrap_err(),
            WireTensorError::TooLarge { .. }
        ));
        let bad_len = rows(&[1., 2., 3.], vec![2, 2]);
        assert!(matches!(
            repeat_rows(&bad_len, 2).unwrap_err(),
            WireTensorError::LengthMismatch { .. }
        ));
        assert_eq!(
            concat_rows(&[]).unwrap_err(),
            WireTensorError::NothingToConcat
        );
        let err = concat_rows(&[t.clone(), rows(&[1., 2., 3.], vec![1, 3])]).unwrap_err();
        assert!(
            err.to_string().contains("tensor 1 has shape [1, 3]"),
            "{err}"
        );
        // An empty (0, ...) tensor has rows of any size but none to select.
        let empty = rows(&[], vec![0, 2]);
        assert_eq!(repeat_rows(&empty, 3).unwrap().shape, vec![0, 2]);
        assert!(select_row(&empty, 0).is_err());
    }

    #[test]
    fn text_embeddings_rows_apply_to_every_present_tensor() {
        let c = v1::TextEmbeddings {
            text_embeds: Some(rows(&[1., 2.], vec![2, 1])),
            hidden_states: Some(rows(&[1., 2., 3., 4.], vec![2, 1, 2])),
            attention_mask: None,
        };
        let r = repeat_text_embeddings(&text_embeddings_row(&c, 1).unwrap(), 3).unwrap();
        assert_eq!(values(r.text_embeds.as_ref().unwrap()), vec![2., 2., 2.]);
        assert_eq!(r.hidden_states.as_ref().unwrap().shape, vec![3, 1, 2]);
        assert!(r.attention_mask.is_none());
        assert!(text_embeddings_row(&c, 5).is_err());
    }

    fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..5, 0..4)
    }

    proptest! {
        #[test]
        fn f32_round_trip(shape in shape_strategy(), seed in any::<u64>()) {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((seed.wrapping_add(i as u64) % 1000) as f32 - 500.0) * 0.37).collect();
            let t = Tensor::from_vec(v.clone(), shape.clone(), &Device::Cpu).unwrap();
            let w = to_wire(&t).unwrap();
            prop_assert_eq!(w.data.len(), n * 4);
            let back = from_wire(&w, &Device::Cpu, &TensorLimits::default()).unwrap();
            prop_assert_eq!(back.dims(), &shape[..]);
            prop_assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        }

        #[test]
        fn f16_bf16_i64_round_trip(shape in shape_strategy(), seed in any::<i64>()) {
            let n: usize = shape.iter().product();
            let ints: Vec<i64> = (0..n as i64).map(|i| seed.wrapping_mul(31).wrapping_add(i)).collect();
            let t = Tensor::from_vec(ints.clone(), shape.clone(), &Device::Cpu).unwrap();
            let back = from_wire(&to_wire(&t).unwrap(), &Device::Cpu, &TensorLimits::default()).unwrap();
            prop_assert_eq!(back.flatten_all().unwrap().to_vec1::<i64>().unwrap(), ints);

            let floats: Vec<f32> = (0..n).map(|i| (i as f32) * 0.5 - 3.0).collect();
            for dtype in [DType::F16, DType::BF16] {
                let t = Tensor::from_vec(floats.clone(), shape.clone(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let w = to_wire(&t).unwrap();
                prop_assert_eq!(w.data.len(), n * 2);
                let back = from_wire(&w, &Device::Cpu, &TensorLimits::default()).unwrap();
                prop_assert_eq!(back.dtype(), dtype);
                // Values exactly representable in both half formats come back unchanged.
                prop_assert_eq!(back.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), floats.clone());
            }
        }

        #[test]
        fn arbitrary_headers_never_panic(shape in prop::collection::vec(any::<i64>(), 0..6), dtype in any::<i32>(), len in 0usize..64) {
            let t = v1::Tensor { shape, dtype, data: vec![7u8; len].into() };
            let _ = from_wire(&t, &Device::Cpu, &TensorLimits::default());
        }
    }
}
