//! Safetensors weights of one checkpoint component, single-file or sharded, fp32 or fp16 on
//! disk, loadable as any float dtype. Every lookup is checked against the expected shape before
//! any data is converted, and failures name the file, the key and what was expected.
//!
//! Components that ship only PyTorch pickles (`diffusion_pytorch_model.bin`, `pytorch_model.bin`,
//! sharded `*.bin.index.json`) and original-format single files (`.pt`, `.ckpt`) are read through
//! [`PickleWeights`] (never executed; see `checkpoint::pickle`), with the same lookups and errors.
//! Safetensors always wins when a folder has both.

use super::pickle::PickleWeights;
use super::stfile::SafetensorsFile;
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The suffix of a virtual key: `<key>` + `TRANSPOSED` is the transpose of the stored matrix
/// `<key>`, contiguous (read that way in one pass; `crate::dense` loads its weights so).
pub const TRANSPOSED: &str = "@T";

/// The suffix of a virtual key: `<key>` + `STORED` is the tensor `<key>` in the dtype it is
/// stored in, whatever dtype is asked (`crate::dense` keeps fp16/bf16 weights so on the CPU).
pub const STORED: &str = "@S";

/// Weight file base names used by diffusers (`diffusion_pytorch_model`) and transformers (`model`).
const BASE_NAMES: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// PyTorch pickle base names (`<base>[.fp16].bin`), tried only when no safetensors file exists:
/// diffusers (`diffusion_pytorch_model`) and transformers (`pytorch_model`).
const BIN_BASE_NAMES: [&str; 2] = ["diffusion_pytorch_model", "pytorch_model"];

/// File extensions read as PyTorch pickles by [`Weights::open_files`] and [`Weights::open_index`].
const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "pt", "pth", "ckpt"];

/// One weight file.
enum Source {
    /// A safetensors file, read one tensor at a time (see `checkpoint::stfile`).
    Safetensors(SafetensorsFile),
    /// A `torch.save` archive, read on demand.
    Pickle(PickleWeights),
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
}

/// The weight files of one component: safetensors files, or PyTorch pickles.
pub struct Weights {
    files: Vec<(PathBuf, Source)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// Which stored precision to prefer when a component ships both (`*.fp16.safetensors` variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The default (usually fp32) files, falling back to the fp16 variant.
    Default,
    /// The fp16 variant files, falling back to the default ones.
    Fp16,
}

impl Weights {
    /// Finds and opens the weight files in `dir`: `<base>[.fp16].safetensors` or a sharded
    /// `<base>[.fp16].safetensors.index.json` whose `weight_map` names the shards; failing every
    /// safetensors name, the PyTorch pickles `diffusion_pytorch_model[.fp16].bin` /
    /// `pytorch_model[.fp16].bin` or a sharded `<base>[.fp16].bin.index.json` (the variant
    /// preference applies within each format).
    pub fn open_dir(dir: &Path, variant: Variant) -> Result<Self> {
        let suffixes: &[&str] = match variant {
            Variant::Default => &["", ".fp16"],
            Variant::Fp16 => &[".fp16", ""],
        };
        for suffix in suffixes {
            for base in BASE_NAMES {
                let single = dir.join(format!("{base}{suffix}.safetensors"));
                if single.is_file() {
                    return Self::open_files(vec![single]);
                }
                let index = dir.join(format!("{base}{suffix}.safetensors.index.json"));
                if index.is_file() {
                    return Self::open_index(&index);
                }
            }
        }
        for suffix in suffixes {
            for base in BIN_BASE_NAMES {
                let single = dir.join(format!("{base}{suffix}.bin"));
                if single.is_file() {
                    return Self::open_files(vec![single]);
                }
                let index = dir.join(format!("{base}{suffix}.bin.index.json"));
                if index.is_file() {
                    return Self::open_index(&index);
                }
            }
        }
        Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            message: "no weights found (expected diffusion_pytorch_model.safetensors, \
                      model.safetensors, an .fp16 variant, or a sharded *.safetensors.index.json; \
                      or else the PyTorch pickles diffusion_pytorch_model.bin, pytorch_model.bin, \
                      an .fp16 variant, or a sharded *.bin.index.json)"
                .into(),
        })
    }

    /// One original-format PyTorch checkpoint (`Kandinsky-2-0.pt`, a Lightning `.ckpt`, a
    /// `pytorch_model.bin`), read safely (see [`PickleWeights::open`]): with `key = None` the
    /// tensors of the saved dict, nested dicts flattened into dotted names; with `Some(key)`
    /// only those of the dict `root[key]` (e.g. `"state_dict"`).
    pub fn open_pickle(path: &Path, key: Option<&str>) -> Result<Self> {
        let pw = PickleWeights::open(path, key)?;
        let index = pw.keys().into_iter().map(|k| (k.to_string(), 0)).collect();
        Ok(Self {
            files: vec![(path.to_path_buf(), Source::Pickle(pw))],
            index,
        })
    }

    /// Opens the shards listed by a `*.safetensors.index.json` (or reads those of a
    /// `*.bin.index.json`: shards named `.bin`/`.pt`/`.pth`/`.ckpt` are PyTorch pickles).
    pub fn open_index(index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let parsed: Index = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: index.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&String> = parsed.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let weights = Self::open_files(shards.iter().map(|s| dir.join(s)).collect())?;
        for (key, shard) in &parsed.weight_map {
            let file = dir.join(shard);
            match weights.index.get(key) {
                Some(&i) if weights.files[i].0 == file => {}
                _ => {
                    return Err(ModelError::Checkpoint {
                        path: index.to_path_buf(),
                        message: format!("weight_map puts `{key}` in {shard}, which lacks it"),
                    })
                }
            }
        }
        Ok(weights)
    }

    /// Opens the given safetensors files (validating each header); files named `.bin`, `.pt`,
    /// `.pth` or `.ckpt` are read as PyTorch pickles ([`PickleWeights::open`] with no key).
    pub fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            if is_pickle(&path) {
                let pw = PickleWeights::open(&path, None)?;
                for name in pw.keys() {
                    index.insert(name.to_string(), files.len());
                }
                files.push((path, Source::Pickle(pw)));
                continue;
            }
            let st = SafetensorsFile::open(&path)?;
            for name in st.names() {
                index.insert(name, files.len());
            }
            files.push((path, Source::Safetensors(st)));
        }
        Ok(Self { files, index })
    }

    /// Names of all stored tensors, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.index.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    /// The file paths, for messages.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }

    /// Stored shape and dtype of `key`, if present.
    pub fn info(&self, key: &str) -> Option<(Vec<usize>, safetensors::Dtype)> {
        let &i = self.index.get(key)?;
        match &self.files[i].1 {
            Source::Safetensors(st) => st.info(key).map(|i| (i.shape.clone(), i.dtype)),
            Source::Pickle(pw) => pw.info(key).map(|i| (i.shape, i.stored)),
        }
    }

    fn files_display(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Loads `key` as `dtype` on `device`, checking its stored shape against `expected` first.
    /// A key ending in [`TRANSPOSED`] names the transpose of the stored matrix before it; one
    /// ending in [`STORED`] the tensor before it in its stored dtype (`dtype` is then ignored).
    pub fn load(
        &self,
        key: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (key, stored) = match key.strip_suffix(STORED) {
            Some(base) => (base, true),
            None => (key, false),
        };
        let (key, transposed) = match key.strip_suffix(TRANSPOSED) {
            Some(base) if !stored => (base, true),
            _ => (key, false),
        };
        let stored_shape: Vec<usize> = match (transposed, expected) {
            (true, &[k, n]) => vec![n, k],
            _ => expected.to_vec(),
        };
        let expected = stored_shape.as_slice();
        let Some(&i) = self.index.get(key) else {
            return Err(ModelError::MissingTensor {
                files: self.files_display(),
                key: key.to_string(),
                expected: expected.to_vec(),
            });
        };
        let (path, source) = &self.files[i];
        let shape_mismatch = |actual: &[usize]| ModelError::ShapeMismatch {
            file: path.clone(),
            key: key.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        };
        let shape = self.info(key).map(|(shape, _)| shape).unwrap_or_default();
        if shape != expected || (transposed && shape.len() != 2) {
            return Err(shape_mismatch(&shape));
        }
        match source {
            Source::Safetensors(st) if stored => st.load(key, device),
            Source::Pickle(pw) if stored => pw.load(key, device),
            Source::Safetensors(st) if transposed => st.load_transposed_as(key, dtype, device),
            Source::Safetensors(st) => st.load_as(key, dtype, device),
            Source::Pickle(pw) => {
                let t = pw.load(key, device)?.to_dtype(dtype)?;
                Ok(if transposed { t.t()?.contiguous()? } else { t })
            }
        }
    }

    /// Loads `key` as stored (no shape check), converted to `dtype`.
    pub fn load_unchecked(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&i) = self.index.get(key) else {
            return Err(ModelError::MissingTensor {
                files: self.files_display(),
                key: key.to_string(),
                expected: vec![],
            });
        };
        match &self.files[i].1 {
            Source::Safetensors(st) => st.load_as(key, dtype, device),
            Source::Pickle(pw) => Ok(pw.load(key, device)?.to_dtype(dtype)?),
        }
    }

    /// A candle `VarBuilder` over these weights; lookups go through [`Weights::load`], so a
    /// model constructor's errors name the file, key and expected shape.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, s.dims(), dtype, dev)
            .map_err(ModelError::into_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_unchecked(name, dtype, dev)
            .map_err(ModelError::into_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some(base) = name.strip_suffix(STORED) {
            return self.index.contains_key(base);
        }
        match name.strip_suffix(TRANSPOSED) {
            Some(base) => self.info(base).is_some_and(|(shape, _)| shape.len() == 2),
            None => self.index.contains_key(name),
        }
    }
}
