//! A safetensors file read one tensor at a time with positioned reads, never memory-mapped.
//!
//! A mapped checkpoint stays resident: every page a load touches counts in the process's RSS
//! until the map is dropped, so converting an fp16 file to f32 weights peaked at the f32 weights
//! plus the whole file (7.4 GB for the 4.9 GB of the Kandinsky 2.2 UNet). Here only the header
//! is kept; each tensor's bytes are read into a buffer, converted, and the buffer freed, so the
//! peak is the weights at the compute dtype plus one stored tensor.

use crate::error::{ModelError, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Bytes per `pread` of a tensor's parallel read (`SafetensorsFile::read_raw`).
const READ_CHUNK: usize = 4 << 20;

/// Stored (little-endian) 2-byte values in native order, in place (a no-op on little-endian
/// hosts).
fn le_to_native(bits: &mut [u16]) {
    if cfg!(target_endian = "big") {
        for b in bits.iter_mut() {
            *b = u16::from_le(*b);
        }
    }
}

/// The largest header accepted (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One open safetensors file: its validated header and the file handle.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    metadata: Metadata,
    /// Absolute offset of the data section (8 + header length).
    data_start: u64,
    /// The stored bits of the half-precision tensor being converted, reused from tensor to
    /// tensor (a fresh buffer per tensor faulted in and zeroed as many pages as the weights
    /// themselves); freed with the file.
    scratch: std::sync::Mutex<Vec<u16>>,
}

impl SafetensorsFile {
    /// Opens `path` and validates its header: the length prefix, the JSON, every tensor's dtype,
    /// shape and offsets (contiguous, sizes that match, no overflow), and that the data section
    /// the header describes fits the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix)
            .map_err(|e| bad(format!("cannot read safetensors file: header length: {e}")))?;
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER {
            return Err(bad(format!(
                "cannot read safetensors file: header of {n} bytes (at most {MAX_HEADER})"
            )));
        }
        let data_start = n.checked_add(8).filter(|&s| s <= file_len).ok_or_else(|| {
            bad(format!(
                "cannot read safetensors file: header of {n} bytes in a file of {file_len}"
            ))
        })?;
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read safetensors file: header: {e}")))?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("cannot read safetensors file: header: {e}")))?;
        let data_len = metadata.data_len() as u64;
        if data_start
            .checked_add(data_len)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad(format!(
                "cannot read safetensors file: the header describes {data_len} bytes of data \
                 after offset {data_start}, the file has {file_len} bytes"
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata,
            data_start,
            scratch: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Names of the stored tensors, in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// Stored dtype, shape and offsets of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// Reads `name` from disk as `dtype` onto `device`. fp16/bf16 files loaded as f32 on the
    /// CPU convert with the half crate's slice conversion (F16C where the CPU has it), in
    /// parallel, not one element at a time through candle's `to_dtype`: that conversion was most
    /// of a load.
    pub fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        if let Some(t) = self.half_to_f32(info, dtype, device, |bits, convert| {
            kd_kernels::fresh_f32(bits.len(), |offset, dst| {
                convert(&bits[offset..offset + dst.len()], dst)
            })
        })? {
            return Ok(Tensor::from_vec(t, info.shape.as_slice(), device)?);
        }
        Ok(self.load(name, device)?.to_dtype(dtype)?)
    }

    /// Reads the 2-D tensor `name` `(rows, cols)` as its transpose `(cols, rows)`, contiguous:
    /// for fp16/bf16 files loaded as f32 on the CPU the conversion writes the transpose
    /// directly (no second pass).
    pub fn load_transposed_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        let &[rows, cols] = info.shape.as_slice() else {
            return Err(ModelError::Checkpoint {
                path: self.path.clone(),
                message: format!("`{name}` is not a matrix (shape {:?})", info.shape),
            });
        };
        if let Some(t) = self.half_to_f32(info, dtype, device, |bits, convert| {
            kd_kernels::fresh_f32_transposed(rows, cols, |r, dst| {
                convert(&bits[r * cols..(r + 1) * cols], dst)
            })
        })? {
            return Ok(Tensor::from_vec(t, (cols, rows), device)?);
        }
        Ok(self.load_as(name, dtype, device)?.t()?.contiguous()?)
    }

    /// For a half-precision tensor loaded as f32 on the CPU: its stored bits (read into the
    /// reused scratch buffer) and their slice conversion, handed to `build`; `None` otherwise.
    fn half_to_f32(
        &self,
        info: &TensorInfo,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(&[u16], &(dyn Fn(&[u16], &mut [f32]) + Sync)) -> Vec<f32>,
    ) -> Result<Option<Vec<f32>>> {
        if !(dtype == DType::F32 && device.is_cpu()) {
            return Ok(None);
        }
        let f16_bits =
            |src: &[u16], dst: &mut [f32]| src.reinterpret_cast::<f16>().convert_to_f32_slice(dst);
        let bf16_bits =
            |src: &[u16], dst: &mut [f32]| src.reinterpret_cast::<bf16>().convert_to_f32_slice(dst);
        self.with_half_bits(info, |bits, is_f16| {
            Ok(if is_f16 {
                build(bits, &f16_bits)
            } else {
                build(bits, &bf16_bits)
            })
        })
    }

    /// A half-precision tensor as stored, read straight into the tensor's own buffer (no
    /// scratch copy, no zeroing first); `None` for other dtypes.
    fn half_as_stored(&self, info: &TensorInfo, device: &Device) -> Result<Option<Tensor>> {
        let shape = info.shape.as_slice();
        Ok(Some(match info.dtype {
            safetensors::Dtype::F16 => {
                Tensor::from_vec(self.read_halves::<f16>(info)?, shape, device)?
            }
            safetensors::Dtype::BF16 => {
                Tensor::from_vec(self.read_halves::<bf16>(info)?, shape, device)?
            }
            _ => return Ok(None),
        }))
    }

    /// The stored bytes of the tensor `info` describes as 2-byte values `T` (f16 or bf16),
    /// read into a fresh vector's spare capacity (never zeroed first).
    fn read_halves<T: Copy>(&self, info: &TensorInfo) -> Result<Vec<T>> {
        assert_eq!(std::mem::size_of::<T>(), 2);
        let (start, end) = info.data_offsets;
        let n = (end - start) / 2;
        let mut v: Vec<T> = Vec::with_capacity(n);
        // SAFETY: the capacity holds the tensor's 2·n bytes.
        unsafe {
            self.read_raw(info, v.as_mut_ptr().cast())?;
            v.set_len(n);
        }
        // SAFETY: T is a 2-byte value type, any bit pattern valid; same length.
        le_to_native(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u16>(), n) });
        Ok(v)
    }

    /// Reads the stored bytes of the tensor `info` describes to `dst` with `pread`, in chunks of
    /// [`READ_CHUNK`] on candle's thread pool: the copy out of the page cache was most of a
    /// load's reading, and one thread left the other idle (CLIP text tower 0.88 → 0.71 s).
    ///
    /// # Safety
    /// `dst` is valid for writes of the tensor's byte size.
    unsafe fn read_raw(&self, info: &TensorInfo, dst: *mut u8) -> Result<()> {
        let (start, end) = info.data_offsets;
        let bytes = end - start;
        // The address, shared by the parallel reads (each writes its own chunk).
        let dst = dst as usize;
        let io = |source| ModelError::Io {
            path: self.path.clone(),
            source,
        };
        (0..bytes.div_ceil(READ_CHUNK))
            .into_par_iter()
            .try_for_each(|c| {
                let (mut done, to) = (c * READ_CHUNK, ((c + 1) * READ_CHUNK).min(bytes));
                while done < to {
                    let offset = libc::off_t::try_from(self.data_start + (start + done) as u64)
                        .map_err(|_| io(std::io::Error::other("offset out of range")))?;
                    // SAFETY: at most `to - done` bytes into this chunk of dst (the chunks are
                    // disjoint, dst holds `bytes`); the descriptor is this file's.
                    let r = unsafe {
                        libc::pread(
                            self.file.as_raw_fd(),
                            (dst as *mut u8).add(done).cast(),
                            to - done,
                            offset,
                        )
                    };
                    match r {
                        0 => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                        r if r < 0 => {
                            let e = std::io::Error::last_os_error();
                            if e.kind() != std::io::ErrorKind::Interrupted {
                                return Err(io(e));
                            }
                        }
                        r => done += r as usize,
                    }
                }
                Ok(())
            })
    }

    /// For a half-precision tensor (fp16 or bf16): its stored bits, read into the reused
    /// scratch buffer, handed to `use_bits` with whether they are fp16; `None` otherwise.
    fn with_half_bits<R>(
        &self,
        info: &TensorInfo,
        use_bits: impl FnOnce(&[u16], bool) -> Result<R>,
    ) -> Result<Option<R>> {
        let stored = info.dtype;
        if !matches!(stored, safetensors::Dtype::F16 | safetensors::Dtype::BF16) {
            return Ok(None);
        }
        let (start, end) = info.data_offsets;
        let n = (end - start) / 2;
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.len() < n {
            scratch.resize(n, 0);
        }
        let bits = &mut scratch[..n];
        // SAFETY: any byte pattern is a valid u16; the byte view covers exactly `bits`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr().cast::<u8>(), n * 2) };
        self.read_into(info, bytes)?;
        le_to_native(bits);
        use_bits(bits, stored == safetensors::Dtype::F16).map(Some)
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Checkpoint {
            path: self.path.clone(),
            message: format!("no tensor `{name}`"),
        }
    }

    /// The stored bytes of the tensor `info` describes.
    fn read(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.read_into(info, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads the stored bytes of the tensor `info` describes into `bytes` (exactly its size).
    fn read_into(&self, info: &TensorInfo, bytes: &mut [u8]) -> Result<()> {
        let (start, end) = info.data_offsets;
        assert_eq!(
            bytes.len(),
            end - start,
            "read_into: a buffer of the tensor's size"
        );
        // SAFETY: `bytes` is exactly the tensor's size.
        unsafe { self.read_raw(info, bytes.as_mut_ptr()) }
    }

    /// Reads `name` from disk as stored, onto `device` (through one host buffer; half-precision
    /// tensors straight into the tensor's own buffer).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        if let Some(t) = self.half_as_stored(info, device)? {
            return Ok(t);
        }
        let bytes = self.read(info)?;
        let view = TensorView::new(info.dtype, info.shape.clone(), &bytes).map_err(|e| {
            ModelError::Checkpoint {
                path: self.path.clone(),
                message: format!("tensor `{name}`: {e}"),
            }
        })?;
        Ok(view.load(device)?)
    }
}
