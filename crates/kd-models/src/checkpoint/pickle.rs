//! Safe reading of PyTorch `torch.save` checkpoints (`.bin`, `.pt`, `.ckpt`, `.pth`) into
//! name → tensor, without ever executing anything.
//!
//! A `torch.save` file (torch ≥ 1.6) is an uncompressed zip: `<prefix>/data.pkl` (a pickle of the
//! saved object, whose tensors refer to storages by key), `<prefix>/data/<key>` (the raw storage
//! bytes), `<prefix>/byteorder` and `<prefix>/version`. Python unpickling can run arbitrary code
//! (`GLOBAL os.system` + `REDUCE`). This module interprets the pickle opcodes itself and only
//! knows the handful of names a plain state dict needs ([`ALLOWED_GLOBALS`], what torch's own
//! `weights_only` unpickler accepts for state dicts); a pickle naming anything else is refused
//! as soon as the name is read, before any tensor is built, with an error naming the file and
//! the global. Calling (`REDUCE`, `NEWOBJ`, `INST`, `OBJ`) or `BUILD`ing anything but those
//! few is refused too. Every length, offset and stride read from the file is checked, so a
//! truncated or corrupt file is an error, never a panic or an unbounded allocation.
//!
//! Storages are read from the file when a tensor is loaded (no mmap, no whole-file read); the
//! file must not change while a [`PickleWeights`] is open.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;

/// The `module.name` globals a pickle may name: exactly what a plain state dict (or a dict of
/// them, e.g. a Lightning checkpoint) needs. Everything else is refused.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch._tensor.Tensor",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

/// Largest `data.pkl` read (real checkpoints' are well under a megabyte).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Largest zip central directory read.
const MAX_CENTRAL_DIRECTORY_BYTES: u64 = 256 << 20;
/// Largest small text record (`byteorder`).
const MAX_RECORD_BYTES: u64 = 4096;
/// Deepest dict nesting followed when flattening (a cycle ends here).
const MAX_NESTING: usize = 32;
/// Most dict entries visited when flattening (shared sub-dicts could otherwise explode).
const MAX_VISITS: usize = 1 << 22;
/// Most tensor dimensions.
const MAX_RANK: usize = 64;
/// Largest output of a view that has more elements than the bytes it reads (stride 0).
const MAX_EXPANSION_BYTES: usize = 16 << 20;
/// The one sentence every refusal ends with.
const ONLY_PLAIN: &str =
    "only tensors and plain containers (dicts, lists, tuples, numbers, strings) are allowed";

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A name from the file, safe to print: escaped and at most 120 characters.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(120).flat_map(char::escape_debug).collect();
    if s.chars().count() > 120 {
        out.push('…');
    }
    out
}

// --- storages ------------------------------------------------------------------------------------

/// The element type of a torch storage class (`torch.<Kind>Storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageKind {
    Float,
    Half,
    BFloat16,
    Double,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageKind {
    const ALL: [StorageKind; 10] = [
        Self::Float,
        Self::Half,
        Self::BFloat16,
        Self::Double,
        Self::Long,
        Self::Int,
        Self::Short,
        Self::Char,
        Self::Byte,
        Self::Bool,
    ];

    fn class_name(self) -> &'static str {
        match self {
            Self::Float => "FloatStorage",
            Self::Half => "HalfStorage",
            Self::BFloat16 => "BFloat16Storage",
            Self::Double => "DoubleStorage",
            Self::Long => "LongStorage",
            Self::Int => "IntStorage",
            Self::Short => "ShortStorage",
            Self::Char => "CharStorage",
            Self::Byte => "ByteStorage",
            Self::Bool => "BoolStorage",
        }
    }

    fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }

    /// The candle dtype a tensor of this storage loads as (candle has no i8 and no bool: i8
    /// widens to i16, bool is u8 0/1).
    fn dtype(self) -> DType {
        match self {
            Self::Float => DType::F32,
            Self::Half => DType::F16,
            Self::BFloat16 => DType::BF16,
            Self::Double => DType::F64,
            Self::Long => DType::I64,
            Self::Int => DType::I32,
            Self::Short | Self::Char => DType::I16,
            Self::Byte | Self::Bool => DType::U8,
        }
    }

    fn stored(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            Self::Float => D::F32,
            Self::Half => D::F16,
            Self::BFloat16 => D::BF16,
            Self::Double => D::F64,
            Self::Long => D::I64,
            Self::Int => D::I32,
            Self::Short => D::I16,
            Self::Char => D::I8,
            Self::Byte => D::U8,
            Self::Bool => D::BOOL,
        }
    }
}

// --- allowed globals -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorClass,
    ParameterClass,
    Storage(StorageKind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromTypeV2,
            ("torch._tensor" | "torch", "Tensor") => Self::TensorClass,
            ("torch.nn.parameter", "Parameter") => Self::ParameterClass,
            ("torch", class) => Self::Storage(
                StorageKind::ALL
                    .into_iter()
                    .find(|k| k.class_name() == class)?,
            ),
            _ => return None,
        })
    }

    fn name(self) -> String {
        match self {
            Self::OrderedDict => "collections.OrderedDict".into(),
            Self::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Self::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Self::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state".into(),
            Self::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2".into(),
            Self::TensorClass => "torch.Tensor".into(),
            Self::ParameterClass => "torch.nn.parameter.Parameter".into(),
            Self::Storage(k) => format!("torch.{}", k.class_name()),
        }
    }
}

fn refuse_global(module: &str, name: &str) -> String {
    let hint = if (module, name) == ("torch.storage", "_load_from_bytes") {
        " (a nested pickle)"
    } else {
        ""
    };
    format!(
        "refuses to load: the pickle names `{}.{}`{hint}; {ONLY_PLAIN}",
        shown(module),
        shown(name)
    )
}

// --- the pickle machine --------------------------------------------------------------------------

/// A pickled value. Containers live in arenas (indices), so memo copies are O(1) and shared
/// references behave as in Python.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    /// Something kept but never interpreted (bytes, Python 2 strings, ints over 64 bits).
    Opaque(&'static str),
    Tuple(Rc<[Value]>),
    List(usize),
    Dict(usize),
    Global(Global),
    Storage(usize),
    Tensor(usize),
}

impl Value {
    fn describe(&self) -> String {
        match self {
            Self::None => "None".into(),
            Self::Bool(_) => "a bool".into(),
            Self::Int(_) => "an int".into(),
            Self::Float(f) => format!("the float {f}"),
            Self::Str(_) => "a string".into(),
            Self::Opaque(what) => (*what).into(),
            Self::Tuple(_) => "a tuple".into(),
            Self::List(_) => "a list".into(),
            Self::Dict(_) => "a dict".into(),
            Self::Global(g) => format!("`{}`", g.name()),
            Self::Storage(_) => "a storage".into(),
            Self::Tensor(_) => "a tensor".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct StorageRef {
    kind: StorageKind,
    key: Rc<str>,
    numel: u64,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: usize,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

/// Runs pickle opcodes over `data`. Nothing is ever called: the only "functions" are the
/// allowed globals, applied here to plain values.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    lists: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
    storages: Vec<StorageRef>,
    tensors: Vec<TensorRef>,
}

type Fail<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            lists: Vec::new(),
            dicts: Vec::new(),
            storages: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn eof(&self) -> String {
        format!(
            "data.pkl is truncated or corrupt (ends inside an opcode at byte {})",
            self.data.len()
        )
    }

    fn take(&mut self, n: usize) -> Fail<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.eof())?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn take_u64_len(&mut self, n: u64) -> Fail<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| self.eof())?;
        self.take(n)
    }

    fn u8(&mut self) -> Fail<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Fail<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Fail<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Fail<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Bytes up to the next `\n` (consumed, not returned; a trailing `\r` is dropped).
    fn line(&mut self) -> Fail<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.eof())?;
        self.pos += n + 1;
        let l = &rest[..n];
        Ok(l.strip_suffix(b"\r").unwrap_or(l))
    }

    fn line_str(&mut self) -> Fail<&'a str> {
        let l = self.line()?;
        std::str::from_utf8(l)
            .map_err(|_| "data.pkl has a text opcode argument that is not UTF-8".into())
    }

    fn utf8(&self, b: &[u8]) -> Fail<Value> {
        std::str::from_utf8(b)
            .map(|s| Value::Str(s.into()))
            .map_err(|_| "data.pkl has a string that is not valid UTF-8".into())
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v)
    }

    fn pop(&mut self) -> Fail<Value> {
        if self.stack.len() <= self.floor() {
            return Err("data.pkl is corrupt (pops an empty stack)".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "data.pkl is corrupt (pops an empty stack)".into())
    }

    fn top(&self) -> Fail<&Value> {
        if self.stack.len() <= self.floor() {
            return Err("data.pkl is corrupt (reads an empty stack)".into());
        }
        self.stack
            .last()
            .ok_or_else(|| "data.pkl is corrupt (reads an empty stack)".into())
    }

    fn pop_mark(&mut self) -> Fail<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or("data.pkl is corrupt (no MARK to pop to)")?;
        Ok(self.stack.split_off(m))
    }

    fn new_dict(&mut self, items: Vec<(Value, Value)>) -> Value {
        self.dicts.push(items);
        Value::Dict(self.dicts.len() - 1)
    }

    fn new_list(&mut self, items: Vec<Value>) -> Value {
        self.lists.push(items);
        Value::List(self.lists.len() - 1)
    }

    fn memo_put(&mut self, key: u32) -> Fail<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Fail<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("data.pkl is corrupt (memo {key} was never stored)"))?;
        self.push(v);
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> Fail<Value> {
        Global::resolve(module, name)
            .map(Value::Global)
            .ok_or_else(|| refuse_global(module, name))
    }

    fn int(v: &Value, what: &str) -> Fail<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            Value::Bool(b) => Ok(u64::from(*b)),
            other => Err(format!(
                "data.pkl is corrupt ({what} is {}, expected a non-negative int)",
                other.describe()
            )),
        }
    }

    fn int_tuple(v: &Value, what: &str) -> Fail<Vec<u64>> {
        let Value::Tuple(items) = v else {
            return Err(format!(
                "data.pkl is corrupt ({what} is {}, expected a tuple)",
                v.describe()
            ));
        };
        if items.len() > MAX_RANK {
            return Err(format!(
                "a tensor has {} dimensions (at most {MAX_RANK})",
                items.len()
            ));
        }
        items.iter().map(|i| Self::int(i, what)).collect()
    }

    /// Applies an allowed global to `args` (`REDUCE`): builds dicts and tensor records only.
    fn call(&mut self, g: Global, args: &[Value]) -> Fail<Value> {
        let refused = |why: &str| {
            format!(
                "refuses to load: the pickle calls `{}` {why}; {ONLY_PLAIN}",
                g.name()
            )
        };
        match g {
            Global::OrderedDict => match args {
                [] => Ok(self.new_dict(Vec::new())),
                [Value::List(i)] => {
                    let items = self.lists[*i].clone();
                    let pairs = Self::pairs_of(&items)?;
                    Ok(self.new_dict(pairs))
                }
                [Value::Tuple(items)] => {
                    let pairs = Self::pairs_of(items)?;
                    Ok(self.new_dict(pairs))
                }
                _ => Err(refused("with arguments other than a list of pairs")),
            },
            Global::RebuildTensorV2 => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if !(6..=7).contains(&args.len()) {
                    return Err(refused(&format!(
                        "with {} arguments (expected 6 or 7)",
                        args.len()
                    )));
                }
                let Value::Storage(storage) = args[0] else {
                    return Err(format!(
                        "data.pkl is corrupt (a tensor's storage is {})",
                        args[0].describe()
                    ));
                };
                let offset = Self::int(&args[1], "a storage offset")?;
                let shape = Self::int_tuple(&args[2], "a tensor size")?;
                let stride = Self::int_tuple(&args[3], "a tensor stride")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "data.pkl is corrupt (a tensor has {} sizes but {} strides)",
                        shape.len(),
                        stride.len()
                    ));
                }
                self.tensors.push(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                });
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if g == Global::RebuildParameter { 3 } else { 4 };
                match args.first() {
                    Some(t @ Value::Tensor(_)) if args.len() == n => Ok(t.clone()),
                    _ => Err(refused("on something other than a tensor")),
                }
            }
            Global::RebuildFromTypeV2 => {
                // (func, new_type, args, state): func(*args), with new_type a plain tensor type.
                let [Value::Global(func), Value::Global(ty), Value::Tuple(inner), _] = args else {
                    return Err(refused("with unexpected arguments"));
                };
                let func_ok = matches!(
                    func,
                    Global::RebuildTensorV2
                        | Global::RebuildParameter
                        | Global::RebuildParameterWithState
                );
                let ty_ok = matches!(ty, Global::TensorClass | Global::ParameterClass);
                if !func_ok || !ty_ok {
                    return Err(refused(&format!(
                        "to rebuild `{}` as `{}`",
                        func.name(),
                        ty.name()
                    )));
                }
                let inner = inner.clone();
                self.call(*func, &inner)
            }
            Global::TensorClass | Global::ParameterClass | Global::Storage(_) => {
                Err(refused("(a type, not an allowed function)"))
            }
        }
    }

    fn pairs_of(items: &[Value]) -> Fail<Vec<(Value, Value)>> {
        items
            .iter()
            .map(|p| match p {
                Value::Tuple(kv) if kv.len() == 2 => Ok((kv[0].clone(), kv[1].clone())),
                other => Err(format!(
                    "data.pkl is corrupt (an OrderedDict item is {}, expected a pair)",
                    other.describe()
                )),
            })
            .collect()
    }

    /// `NEWOBJ` / `INST` / `OBJ`: only an empty `OrderedDict` may be instantiated.
    fn instantiate(&mut self, class: &Value, op: &str) -> Fail<Value> {
        match class {
            Value::Global(Global::OrderedDict) => Ok(self.new_dict(Vec::new())),
            Value::Global(g) => Err(format!(
                "refuses to load: the pickle instantiates `{}` ({op}); {ONLY_PLAIN}",
                g.name()
            )),
            other => Err(format!(
                "data.pkl is corrupt ({op} on {}, not a class)",
                other.describe()
            )),
        }
    }

    /// `BINPERSID`: a storage reference `("storage", torch.<Kind>Storage, key, location, numel)`.
    fn persistent_load(&mut self, pid: Value) -> Fail<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(format!(
                "data.pkl is corrupt (a persistent id is {}, expected a storage tuple)",
                pid.describe()
            ));
        };
        match &t[..] {
            [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), Value::Str(_), numel]
                if &**tag == "storage" =>
            {
                let numel = Self::int(numel, "a storage size")?;
                self.storages.push(StorageRef {
                    kind: *kind,
                    key: key.clone(),
                    numel,
                });
                Ok(Value::Storage(self.storages.len() - 1))
            }
            [Value::Str(tag), Value::Global(g), ..] if &**tag == "storage" => Err(format!(
                "refuses to load: a storage of type `{}`; {ONLY_PLAIN}",
                g.name()
            )),
            _ => Err("data.pkl is corrupt (a persistent id is not a storage reference)".into()),
        }
    }

    /// Runs to `STOP`; the pickled object.
    fn run(&mut self) -> Fail<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO, FRAME
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("data.pkl uses pickle protocol {v} (at most 5 exists)"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                // globals
                b'c' => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    let g = self.global(&module, &name)?;
                    self.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err("data.pkl is corrupt (STACK_GLOBAL on non-strings)".into());
                    };
                    let g = self.global(module, name)?;
                    self.push(g);
                }
                b'i' => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    let class = self.global(&module, &name)?;
                    let args = self.pop_mark()?;
                    if !args.is_empty() {
                        return Err(format!(
                            "refuses to load: the pickle instantiates `{}` with arguments (INST); {ONLY_PLAIN}",
                            shown(&format!("{module}.{name}"))
                        ));
                    }
                    let v = self.instantiate(&class, "INST")?;
                    self.push(v);
                }
                b'o' => {
                    let items = self.pop_mark()?;
                    let class = items
                        .first()
                        .ok_or("data.pkl is corrupt (OBJ without a class)")?;
                    if items.len() > 1 {
                        return Err(format!(
                            "refuses to load: the pickle instantiates {} with arguments (OBJ); {ONLY_PLAIN}",
                            class.describe()
                        ));
                    }
                    let v = self.instantiate(class, "OBJ")?;
                    self.push(v);
                }
                0x81 => {
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.instantiate(&class, "NEWOBJ")?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.instantiate(&class, "NEWOBJ_EX")?;
                    self.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let Value::Tuple(args) = args else {
                        return Err(format!(
                            "data.pkl is corrupt (REDUCE with {} as arguments)",
                            args.describe()
                        ));
                    };
                    let Value::Global(g) = callable else {
                        return Err(format!(
                            "refuses to load: the pickle calls {}; {ONLY_PLAIN}",
                            callable.describe()
                        ));
                    };
                    let v = self.call(g, &args)?;
                    self.push(v);
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // An OrderedDict's attributes (`_metadata`) or a tensor's `__dict__`:
                        // ignored.
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            return Err(format!(
                                "refuses to load: the pickle sets the state of {} (BUILD); {ONLY_PLAIN}",
                                other.describe()
                            ))
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v);
                }
                b'P' => {
                    return Err("refuses to load: the pickle uses a text persistent id (PERSID), which torch.save never writes".into())
                }
                0x82..=0x84 => {
                    return Err(format!(
                        "refuses to load: the pickle uses the copyreg extension registry (EXT opcode at byte {at}), which can name any callable; {ONLY_PLAIN}"
                    ))
                }
                0x97 | 0x98 => {
                    return Err("refuses to load: the pickle uses out-of-band buffers (protocol 5)".into())
                }
                // stack and memo
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.stack.len() > self.floor() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'p' => {
                    let k = self.line_str()?.parse::<u32>().map_err(|_| "data.pkl is corrupt (bad PUT index)")?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u32::from(k))?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| "data.pkl memo is too large")?;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let k = self.line_str()?.parse::<u32>().map_err(|_| "data.pkl is corrupt (bad GET index)")?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    self.memo_get(u32::from(k))?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                // scalars
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'I' => {
                    let v = match self.line_str()?.trim() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => s
                            .parse::<i64>()
                            .map(Value::Int)
                            .unwrap_or(Value::Opaque("a big int")),
                    };
                    self.push(v);
                }
                b'L' => {
                    let s = self.line_str()?.trim();
                    let v = s
                        .strip_suffix('L')
                        .unwrap_or(s)
                        .parse::<i64>()
                        .map(Value::Int)
                        .unwrap_or(Value::Opaque("a big int"));
                    self.push(v);
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8()?)
                    } else {
                        let n = self.u32()? as i32;
                        u64::try_from(n).map_err(|_| "data.pkl is corrupt (negative LONG4 size)")?
                    };
                    let b = self.take_u64_len(n)?;
                    let v = if b.is_empty() {
                        Value::Int(0)
                    } else if b.len() <= 8 {
                        let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
                        let mut a = [fill; 8];
                        a[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(a))
                    } else {
                        Value::Opaque("a big int")
                    };
                    self.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let v = self
                        .line_str()?
                        .trim()
                        .parse::<f64>()
                        .map_err(|_| "data.pkl is corrupt (bad FLOAT)")?;
                    self.push(Value::Float(v));
                }
                // strings and bytes
                b'X' => {
                    let n = self.u32()?;
                    let b = self.take_u64_len(u64::from(n))?;
                    let v = self.utf8(b)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()?;
                    let b = self.take(usize::from(n))?;
                    let v = self.utf8(b)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let b = self.take_u64_len(n)?;
                    let v = self.utf8(b)?;
                    self.push(v);
                }
                b'V' => {
                    let l = self.line()?;
                    let s = raw_unicode_escape(l)?;
                    self.push(Value::Str(s.into()));
                }
                b'S' => {
                    self.line()?;
                    self.push(Value::Opaque("a Python 2 string"));
                }
                b'T' | b'B' => {
                    let n = self.u32()?;
                    if op == b'T' && (n as i32) < 0 {
                        return Err("data.pkl is corrupt (negative BINSTRING size)".into());
                    }
                    self.take_u64_len(u64::from(n))?;
                    self.push(Value::Opaque("bytes"));
                }
                b'U' | b'C' => {
                    let n = self.u8()?;
                    self.take(usize::from(n))?;
                    self.push(Value::Opaque("bytes"));
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    self.take_u64_len(n)?;
                    self.push(Value::Opaque("bytes"));
                }
                // containers
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items.into()));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items.into()));
                }
                b']' | 0x8f => {
                    let v = self.new_list(Vec::new());
                    self.push(v);
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_list(items);
                    self.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    let i = self.list_on_top("APPEND")?;
                    self.lists[i].push(v);
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let i = self.list_on_top(if op == b'e' { "APPENDS" } else { "ADDITEMS" })?;
                    self.lists[i].extend(items);
                }
                b'}' => {
                    let v = self.new_dict(Vec::new());
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = Self::flat_pairs(items)?;
                    let v = self.new_dict(pairs);
                    self.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let i = self.dict_on_top("SETITEM")?;
                    self.dicts[i].push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = Self::flat_pairs(items)?;
                    let i = self.dict_on_top("SETITEMS")?;
                    self.dicts[i].extend(pairs);
                }
                other => {
                    return Err(format!(
                        "data.pkl is corrupt or not a pickle (unknown opcode 0x{other:02x} at byte {at})"
                    ))
                }
            }
        }
    }

    fn flat_pairs(items: Vec<Value>) -> Fail<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return Err("data.pkl is corrupt (a dict with an odd number of items)".into());
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn list_on_top(&self, op: &str) -> Fail<usize> {
        match self.top()? {
            Value::List(i) => Ok(*i),
            other => Err(format!(
                "refuses to load: the pickle applies {op} to {}, which is not a list; {ONLY_PLAIN}",
                other.describe()
            )),
        }
    }

    fn dict_on_top(&self, op: &str) -> Fail<usize> {
        match self.top()? {
            Value::Dict(i) => Ok(*i),
            other => Err(format!(
                "refuses to load: the pickle applies {op} to {}, which is not a dict; {ONLY_PLAIN}",
                other.describe()
            )),
        }
    }

    /// The tensors of a dict, nested string-keyed dicts flattened with dots (`a.b.weight`).
    /// Anything else (numbers, strings, lists, tensors inside lists) is ignored.
    fn flatten(&self, dict: usize) -> Fail<Vec<(String, usize)>> {
        let mut out = Vec::new();
        let mut visits = 0usize;
        self.flatten_into(dict, "", 0, &mut visits, &mut out)?;
        Ok(out)
    }

    fn flatten_into(
        &self,
        dict: usize,
        prefix: &str,
        depth: usize,
        visits: &mut usize,
        out: &mut Vec<(String, usize)>,
    ) -> Fail<()> {
        if depth > MAX_NESTING {
            return Err(format!(
                "dicts nested more than {MAX_NESTING} deep (under `{}`): corrupt or cyclic",
                shown(prefix)
            ));
        }
        for (k, v) in &self.dicts[dict] {
            *visits += 1;
            if *visits > MAX_VISITS {
                return Err("too many dict entries (shared sub-dicts?)".into());
            }
            let Value::Str(k) = k else { continue };
            match v {
                Value::Tensor(t) => out.push((format!("{prefix}{k}"), *t)),
                Value::Dict(d) => {
                    self.flatten_into(*d, &format!("{prefix}{k}."), depth + 1, visits, out)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The first 20 string keys of a dict, for messages.
    fn string_keys(&self, dict: usize) -> Vec<String> {
        let mut keys: Vec<String> = self.dicts[dict]
            .iter()
            .filter_map(|(k, _)| match k {
                Value::Str(s) => Some(format!("`{}`", shown(s))),
                _ => None,
            })
            .take(21)
            .collect();
        if keys.len() > 20 {
            keys[20] = "…".into();
        }
        keys
    }
}

/// Python's `raw-unicode-escape` (the protocol 0 `UNICODE` opcode): latin-1 with `\uXXXX` and
/// `\UXXXXXXXX` escapes.
fn raw_unicode_escape(b: &[u8]) -> Fail<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let n = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if n > 0 && i + 2 + n <= b.len() {
            let hex = std::str::from_utf8(&b[i + 2..i + 2 + n]).ok();
            if let Some(c) = hex
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
            {
                out.push(c);
                i += 2 + n;
                continue;
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    Ok(out)
}

/// What a pickle holds once run: the selected tensors and their storages.
struct Parsed {
    tensors: Vec<(String, TensorRef, StorageRef)>,
}

/// Runs `data` (a `data.pkl`) and picks the tensors of the root dict (or of `root[key]`).
fn parse_pickle(data: &[u8], key: Option<&str>) -> Fail<Parsed> {
    let mut m = Machine::new(data);
    let root = m.run()?;
    let Value::Dict(root_dict) = root else {
        return Err(format!(
            "the pickle holds {}, not a dict of tensors",
            root.describe()
        ));
    };
    let dict = match key {
        None => root_dict,
        Some(key) => {
            let found = m.dicts[root_dict]
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
                .map(|(_, v)| v.clone());
            match found {
                Some(Value::Dict(d)) => d,
                Some(other) => {
                    return Err(format!(
                        "`{}` is {}, not a dict of tensors",
                        shown(key),
                        other.describe()
                    ))
                }
                None => {
                    return Err(format!(
                        "has no top-level key `{}` (it has: {})",
                        shown(key),
                        m.string_keys(root_dict).join(", ")
                    ))
                }
            }
        }
    };
    let names = m.flatten(dict)?;
    let mut out = Vec::with_capacity(names.len());
    for (name, t) in names {
        // The same tensor object under two names (tied weights) is simply read twice.
        let tr = m.tensors[t].clone();
        let sr = m
            .storages
            .get(tr.storage)
            .cloned()
            .ok_or("data.pkl is corrupt (a tensor refers to a missing storage)")?;
        out.push((name, tr, sr));
    }
    Ok(Parsed { tensors: out })
}

// --- the zip archive -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct ZipEntry {
    flags: u16,
    method: u16,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A cursor over the central directory; every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Fail<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("the zip central directory is truncated or corrupt")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Fail<u16> {
        Ok(le16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Fail<u32> {
        Ok(le32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Fail<u64> {
        Ok(le64(self.take(8)?, 0))
    }
}

struct Archive {
    path: PathBuf,
    file: File,
    len: u64,
    entries: HashMap<String, ZipEntry>,
}

impl Archive {
    fn bad(&self, m: impl Into<String>) -> ModelError {
        bad(&self.path, m)
    }

    fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) {
            return Err(self.bad("truncated or corrupt (a record lies past the end of the file)"));
        }
        let n = usize::try_from(len).map_err(|_| self.bad("a record is too large"))?;
        let mut buf = vec![0u8; n];
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|e| io_err(&self.path, e))?;
        Ok(buf)
    }

    fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| io_err(path, e))?;
        let len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut file, &mut magic).map_err(|e| io_err(path, e))?;
        if magic[..n] != *b"PK\x03\x04" {
            let message = if n >= 2 && magic[0] == 0x80 && magic[1] <= 5 {
                "is in the legacy (pre-1.6, non-zip) torch.save format, which is not supported; \
                 re-save it with torch >= 1.6 (`torch.save(torch.load(f, weights_only=True), f2)`) \
                 or convert it to safetensors"
            } else {
                "is not a PyTorch checkpoint (a torch.save zip archive)"
            };
            return Err(bad(path, message));
        }
        let mut a = Self {
            path: path.to_path_buf(),
            file,
            len,
            entries: HashMap::new(),
        };
        a.read_central_directory()?;
        Ok(a)
    }

    fn read_central_directory(&mut self) -> Result<()> {
        const EOCD: usize = 22;
        let tail_len = self.len.min((EOCD + 0xffff) as u64);
        let tail_start = self.len - tail_len;
        let tail = self.read_at(tail_start, tail_len)?;
        let truncated = "is truncated or corrupt (no zip end-of-central-directory record)";
        if tail.len() < EOCD {
            return Err(self.bad(truncated));
        }
        let at = (0..=tail.len() - EOCD)
            .rev()
            .find(|&i| {
                tail[i..i + 4] == *b"PK\x05\x06"
                    && i + EOCD + usize::from(le16(&tail, i + 20)) <= tail.len()
            })
            .ok_or_else(|| self.bad(truncated))?;
        let eocd_pos = tail_start + at as u64;
        let disk = le16(&tail, at + 4);
        let cd_disk = le16(&tail, at + 6);
        let mut count = u64::from(le16(&tail, at + 10));
        let mut cd_size = u64::from(le32(&tail, at + 12));
        let mut cd_offset = u64::from(le32(&tail, at + 16));
        if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
            // ZIP64: the locator sits right before the end record.
            let loc_pos = eocd_pos
                .checked_sub(20)
                .ok_or_else(|| self.bad("corrupt zip64 archive (no locator)"))?;
            let loc = self.read_at(loc_pos, 20)?;
            if loc[..4] != *b"PK\x06\x07" {
                return Err(self.bad("corrupt zip64 archive (no locator)"));
            }
            let rec_pos = le64(&loc, 8);
            if rec_pos.checked_add(56).is_none_or(|e| e > loc_pos) {
                return Err(self.bad("corrupt zip64 archive (bad end record offset)"));
            }
            let rec = self.read_at(rec_pos, 56)?;
            if rec[..4] != *b"PK\x06\x06" {
                return Err(self.bad("corrupt zip64 archive (no end record)"));
            }
            count = le64(&rec, 32);
            cd_size = le64(&rec, 40);
            cd_offset = le64(&rec, 48);
        } else if disk != 0 || cd_disk != 0 {
            return Err(self.bad("is a multi-part zip archive, which is not supported"));
        }
        if cd_offset.checked_add(cd_size).is_none_or(|e| e > eocd_pos) {
            return Err(self
                .bad("is truncated or corrupt (the zip central directory lies outside the file)"));
        }
        if cd_size > MAX_CENTRAL_DIRECTORY_BYTES || count > cd_size / 46 {
            return Err(self.bad("is corrupt (implausible zip central directory)"));
        }
        let cd = self.read_at(cd_offset, cd_size)?;
        let mut c = Cursor { b: &cd, pos: 0 };
        for _ in 0..count {
            let (name, entry) = Self::entry(&mut c).map_err(|m| self.bad(m))?;
            if self.entries.insert(name.clone(), entry).is_some() {
                return Err(self.bad(format!(
                    "is corrupt (the zip archive holds `{}` twice)",
                    shown(&name)
                )));
            }
        }
        Ok(())
    }

    fn entry(c: &mut Cursor<'_>) -> Fail<(String, ZipEntry)> {
        if c.take(4)? != b"PK\x01\x02" {
            return Err("is corrupt (bad zip central directory entry)".into());
        }
        c.take(4)?; // versions
        let flags = c.u16()?;
        let method = c.u16()?;
        c.take(8)?; // time, date, crc
        let mut compressed = u64::from(c.u32()?);
        let mut size = u64::from(c.u32()?);
        let name_len = usize::from(c.u16()?);
        let extra_len = usize::from(c.u16()?);
        let comment_len = usize::from(c.u16()?);
        c.take(8)?; // disk, attributes
        let mut local_offset = u64::from(c.u32()?);
        let name = c.take(name_len)?;
        let extra = c.take(extra_len)?;
        c.take(comment_len)?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| "is corrupt (a zip entry name is not UTF-8)".to_string())?;
        let mut x = Cursor { b: extra, pos: 0 };
        while x.pos + 4 <= extra.len() {
            let id = x.u16()?;
            let n = usize::from(x.u16()?);
            let body = x.take(n)?;
            if id == 1 {
                let mut z = Cursor { b: body, pos: 0 };
                if size == 0xffff_ffff {
                    size = z.u64()?;
                }
                if compressed == 0xffff_ffff {
                    compressed = z.u64()?;
                }
                if local_offset == 0xffff_ffff {
                    local_offset = z.u64()?;
                }
            }
        }
        Ok((
            name,
            ZipEntry {
                flags,
                method,
                compressed,
                size,
                local_offset,
            },
        ))
    }

    /// File offset and length of an entry's (stored) bytes.
    fn locate(&mut self, name: &str) -> Result<(u64, u64)> {
        let Some(e) = self.entries.get(name).copied() else {
            return Err(self.bad(format!("is corrupt (the archive lacks `{}`)", shown(name))));
        };
        if e.flags & 1 != 0 {
            return Err(self.bad(format!("`{}` is encrypted", shown(name))));
        }
        if e.method != 0 || e.compressed != e.size {
            return Err(self.bad(format!(
                "`{}` is compressed (zip method {}); torch.save never compresses: re-save the \
                 checkpoint with torch.save",
                shown(name),
                e.method
            )));
        }
        let header = self.read_at(e.local_offset, 30)?;
        if header[..4] != *b"PK\x03\x04" {
            return Err(self.bad(format!(
                "is corrupt (bad zip local header for `{}`)",
                shown(name)
            )));
        }
        let data =
            e.local_offset + 30 + u64::from(le16(&header, 26)) + u64::from(le16(&header, 28));
        if data.checked_add(e.size).is_none_or(|end| end > self.len) {
            return Err(self.bad(format!(
                "is truncated or corrupt (`{}` lies past the end of the file)",
                shown(name)
            )));
        }
        Ok((data, e.size))
    }

    fn read_entry(&mut self, name: &str, max: u64) -> Result<Vec<u8>> {
        let (offset, len) = self.locate(name)?;
        if len > max {
            return Err(self.bad(format!(
                "`{}` is implausibly large ({len} bytes)",
                shown(name)
            )));
        }
        self.read_at(offset, len)
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

// --- public API ----------------------------------------------------------------------------------

/// Shape and element type of one tensor of a [`PickleWeights`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleTensorInfo {
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// The dtype [`PickleWeights::load`] returns (as stored, except i8 → i16 and bool → u8 0/1).
    pub dtype: DType,
    /// The stored element type.
    pub stored: safetensors::Dtype,
    /// Whether the tensor is a plain row-major block of its storage (else a strided view).
    pub contiguous: bool,
}

#[derive(Debug)]
struct Entry {
    kind: StorageKind,
    shape: Vec<usize>,
    stride: Vec<usize>,
    /// Element offset of the tensor in its storage.
    offset: usize,
    numel: usize,
    /// Element offset (in the storage) one past the last element the tensor reads.
    end: usize,
    contiguous: bool,
    /// File offset of the storage's first byte.
    data: u64,
    storage_key: String,
    storage_numel: usize,
}

/// The tensors of one `torch.save` checkpoint, validated at open and read on demand.
pub struct PickleWeights {
    path: PathBuf,
    file: Mutex<File>,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for PickleWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickleWeights")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl PickleWeights {
    /// Opens a `torch.save` checkpoint and validates every tensor record against the archive.
    ///
    /// With `key = None` the pickled object must be a dict; its tensors are returned under
    /// their keys, and tensors in nested string-keyed dicts under dotted names
    /// (`{"state_dict": {"a.weight": t}}` gives `state_dict.a.weight`). With `Some(key)` only
    /// the dict `root[key]` is read (e.g. `"state_dict"` for a Lightning `.ckpt`, `"model"`,
    /// `"ema"`), flattened the same way. Non-tensor values (numbers, strings, lists and what
    /// they hold) are ignored.
    pub fn open(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let mut zip = Archive::open(path)?;
        let mut prefixes: Vec<&str> = zip
            .entries
            .keys()
            .filter_map(|n| n.strip_suffix("/data.pkl"))
            .filter(|p| !p.is_empty() && !p.contains('/'))
            .collect();
        prefixes.sort_unstable();
        let prefix = match prefixes[..] {
            [p] => p.to_string(),
            [] => {
                return Err(bad(
                    path,
                    "is not a torch.save archive (the zip holds no `<name>/data.pkl`)",
                ))
            }
            _ => {
                return Err(bad(
                    path,
                    format!(
                        "is ambiguous: the zip holds several pickles ({})",
                        prefixes
                            .iter()
                            .map(|p| format!("`{}`", shown(p)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        let byteorder = format!("{prefix}/byteorder");
        if zip.entries.contains_key(&byteorder) {
            let b = zip.read_entry(&byteorder, MAX_RECORD_BYTES)?;
            match std::str::from_utf8(&b).map(str::trim) {
                Ok("little") => {}
                Ok("big") => {
                    return Err(bad(
                        path,
                        "was saved on a big-endian machine (byteorder = big); only little-endian \
                         checkpoints are supported: re-save it on a little-endian machine",
                    ))
                }
                _ => return Err(bad(path, "is corrupt (unreadable byteorder record)")),
            }
        }
        let pkl = zip.read_entry(&format!("{prefix}/data.pkl"), MAX_PICKLE_BYTES)?;
        let parsed = parse_pickle(&pkl, key).map_err(|m| bad(path, m))?;

        let mut located: HashMap<Rc<str>, (u64, u64)> = HashMap::new();
        let mut tensors = HashMap::with_capacity(parsed.tensors.len());
        for (name, t, s) in parsed.tensors {
            let (data, bytes) = match located.get(&s.key) {
                Some(&l) => l,
                None => {
                    let l = zip.locate(&format!("{prefix}/data/{}", s.key))?;
                    located.insert(s.key.clone(), l);
                    l
                }
            };
            let entry = validate(&name, &t, &s, bytes, data).map_err(|m| bad(path, m))?;
            if tensors.insert(name.clone(), entry).is_some() {
                return Err(bad(
                    path,
                    format!(
                        "two entries are both named `{}` once flattened",
                        shown(&name)
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(zip.file),
            tensors,
        })
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether `name` is a tensor here.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape and dtype of `name`, if present.
    pub fn info(&self, name: &str) -> Option<PickleTensorInfo> {
        let e = self.tensors.get(name)?;
        Some(PickleTensorInfo {
            shape: e.shape.clone(),
            dtype: e.kind.dtype(),
            stored: e.kind.stored(),
            contiguous: e.contiguous,
        })
    }

    /// Reads `name` from the file (strided views are gathered into a contiguous tensor), with
    /// its dtype as [`PickleTensorInfo::dtype`] says.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            return Err(ModelError::MissingTensor {
                files: self.path.display().to_string(),
                key: name.to_string(),
                expected: vec![],
            });
        };
        let dtype = e.kind.dtype();
        if e.numel == 0 {
            return Ok(Tensor::zeros(e.shape.as_slice(), dtype, device)?);
        }
        let es = e.kind.elem_size();
        // Both products were checked against the storage size at open.
        let span = (e.end - e.offset) * es;
        let out_bytes = e.numel.saturating_mul(es);
        if out_bytes > span.max(MAX_EXPANSION_BYTES) {
            return Err(bad(
                &self.path,
                format!(
                    "tensor `{}` is an expanded view ({:?} over {} stored elements of storage \
                     `{}`); re-save it with `.contiguous()`",
                    shown(name),
                    e.shape,
                    e.storage_numel,
                    shown(&e.storage_key)
                ),
            ));
        }
        let mut raw = vec![0u8; span];
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.seek(SeekFrom::Start(e.data + (e.offset * es) as u64))
                .and_then(|_| f.read_exact(&mut raw))
                .map_err(|err| io_err(&self.path, err))?;
        }
        let bytes = if e.contiguous {
            raw
        } else {
            gather(&raw, &e.shape, &e.stride, es, e.numel)
        };
        let t = match e.kind {
            StorageKind::Char => {
                let v: Vec<i16> = bytes.iter().map(|&b| i16::from(b as i8)).collect();
                Tensor::from_vec(v, e.shape.as_slice(), device)?
            }
            _ => Tensor::from_raw_buffer(&bytes, dtype, &e.shape, device)?,
        };
        Ok(t)
    }
}

/// Checks a tensor record against its storage (every product and sum checked).
fn validate(name: &str, t: &TensorRef, s: &StorageRef, bytes: u64, data: u64) -> Fail<Entry> {
    let es = s.kind.elem_size();
    let too_big = || format!("tensor `{}` is implausibly large", shown(name));
    let storage_bytes = s.numel.checked_mul(es as u64).ok_or_else(too_big)?;
    if storage_bytes > bytes {
        return Err(format!(
            "is truncated or corrupt (storage `{}` should hold {} elements of {} = {storage_bytes} \
             bytes, the archive has {bytes})",
            shown(&s.key),
            s.numel,
            s.kind.class_name()
        ));
    }
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| too_big());
    let shape = t
        .shape
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Fail<Vec<_>>>()?;
    let stride = t
        .stride
        .iter()
        .map(|&d| to_usize(d))
        .collect::<Fail<Vec<_>>>()?;
    let offset = to_usize(t.offset)?;
    let storage_numel = to_usize(s.numel)?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(too_big)?;
    let end = if numel == 0 {
        offset
    } else {
        let last = shape
            .iter()
            .zip(&stride)
            .try_fold(offset, |a, (&d, &st)| {
                a.checked_add((d - 1).checked_mul(st)?)
            })
            .ok_or_else(too_big)?;
        last.checked_add(1).ok_or_else(too_big)?
    };
    if numel > 0 && end > storage_numel {
        return Err(format!(
            "is corrupt (tensor `{}` of shape {shape:?}, stride {stride:?} at offset {offset} reads \
             past the {storage_numel} elements of storage `{}`)",
            shown(name),
            shown(&s.key)
        ));
    }
    let mut expect = 1usize;
    let mut contiguous = true;
    for (&d, &st) in shape.iter().zip(&stride).rev() {
        if d != 1 && st != expect {
            contiguous = false;
        }
        expect = expect.saturating_mul(d);
    }
    Ok(Entry {
        kind: s.kind,
        shape,
        stride,
        offset,
        numel,
        end,
        contiguous: contiguous || numel == 0,
        data,
        storage_key: s.key.to_string(),
        storage_numel,
    })
}

/// Copies the elements of a strided view (strides relative to `raw`'s first element) into
/// row-major order.
fn gather(raw: &[u8], shape: &[usize], stride: &[usize], es: usize, numel: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    let mut src = 0usize;
    for _ in 0..numel {
        out.extend_from_slice(&raw[src * es..(src + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            src += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            src -= stride[d] * shape[d];
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uni(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    /// `{"weight": <value>}`.
    fn in_dict(value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 2, b'}'];
        v.extend(uni("weight"));
        v.extend(value);
        v.extend(b"s.");
        v
    }

    fn err(p: &[u8]) -> String {
        match parse_pickle(p, None) {
            Ok(_) => panic!("accepted {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn refuses_every_global_not_on_the_list() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("__builtin__", "getattr"),
            ("builtins", "exec"),
            ("subprocess", "Popen"),
            ("torch.nn.modules.linear", "Linear"),
            ("numpy.core.multiarray", "_reconstruct"),
            (
                "pytorch_lightning.callbacks.model_checkpoint",
                "ModelCheckpoint",
            ),
            ("torch.storage", "_load_from_bytes"),
            ("torch._utils", "_rebuild_tensor"),
            ("copyreg", "_reconstructor"),
            ("torch", "load"),
            ("torch", "UntypedStorage"),
            ("collections", "defaultdict"),
        ] {
            let mut g = format!("c{module}\n{name}\n").into_bytes();
            g.extend(b")R");
            let e = err(&in_dict(&g));
            assert!(
                e.contains(&format!("the pickle names `{module}.{name}`"))
                    && e.contains(ONLY_PLAIN),
                "{e}"
            );
            // The same through STACK_GLOBAL (protocol 4).
            let mut s = uni(module);
            s.extend(uni(name));
            s.push(0x93);
            let e = err(&in_dict(&s));
            assert!(e.contains(&format!("`{module}.{name}`")), "{e}");
        }
        for allowed in ALLOWED_GLOBALS {
            let (m, n) = allowed.rsplit_once('.').unwrap();
            assert!(Global::resolve(m, n).is_some(), "{allowed}");
        }
    }

    #[test]
    fn refuses_calls_builds_and_mutations_of_non_containers() {
        let cases: &[(&[u8], &str)] = &[
            (b"ctorch\nFloatStorage\n)R", "calls `torch.FloatStorage`"),
            (b"ctorch\nTensor\n)R", "calls `torch.Tensor`"),
            (
                b"ccollections\nOrderedDict\n}b",
                "sets the state of `collections.OrderedDict`",
            ),
            (
                b"ctorch\nHalfStorage\n)\x81",
                "instantiates `torch.HalfStorage`",
            ),
            (
                b"(ctorch\nFloatStorage\no",
                "instantiates `torch.FloatStorage`",
            ),
            (b"\x82\x01", "extension registry"),
            (
                b"ctorch\nFloatStorage\nNa",
                "APPEND to `torch.FloatStorage`",
            ),
            (
                b"ctorch\nFloatStorage\nNNs",
                "SETITEM to `torch.FloatStorage`",
            ),
            (b"N)R", "calls None"),
            (
                b"ctorch._utils\n_rebuild_parameter\nK\x01\x85R",
                "on something other than a tensor",
            ),
        ];
        for (body, want) in cases {
            let e = err(&in_dict(body));
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn ignores_non_tensor_values_and_flattens_nested_dicts() {
        // {"a": 1, "b": "x", "c": [1.5], "d": {"e": None}}
        let mut p = vec![0x80, 2, b'}', b'('];
        p.extend(uni("a"));
        p.extend(b"K\x01");
        p.extend(uni("b"));
        p.extend(uni("x"));
        p.extend(uni("c"));
        p.extend(b"]G?\xf8\x00\x00\x00\x00\x00\x00a");
        p.extend(uni("d"));
        p.extend(b"}");
        p.extend(uni("e"));
        p.extend(b"Nsu.");
        let parsed = parse_pickle(&p, None).unwrap();
        assert!(parsed.tensors.is_empty());
        assert!(parse_pickle(&p, Some("d")).unwrap().tensors.is_empty());
        let e = parse_pickle(&p, Some("a")).err().unwrap();
        assert!(e.contains("`a` is an int, not a dict"), "{e}");
        let e = parse_pickle(&p, Some("zz")).err().unwrap();
        assert!(
            e.contains("no top-level key `zz`") && e.contains("`d`"),
            "{e}"
        );
    }

    #[test]
    fn cycles_and_bombs_end_in_errors() {
        // d = {}; d["a"] = d
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        p.extend(uni("a"));
        p.extend(b"h\x00s.");
        assert!(err(&p).contains("nested more than"), "{}", err(&p));
        // A memo doubling bomb: t = (t, t) 64 times, cheap because values are shared.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend(b"h\x00h\x00\x86q\x00");
        }
        p.extend(b"0}.");
        assert!(parse_pickle(&p, None).unwrap().tensors.is_empty());
        // Shared sub-dicts: 40 levels of {"a": d, "b": d}.
        let mut p = vec![0x80, 2, b'}', b'q', 0];
        for _ in 0..40 {
            p.push(b'}');
            p.extend(uni("a"));
            p.extend(b"h\x00s");
            p.extend(uni("b"));
            p.extend(b"h\x00sq\x00");
        }
        p.push(b'.');
        let e = err(&p);
        assert!(e.contains("nested") || e.contains("too many"), "{e}");
    }

    #[test]
    fn every_prefix_of_a_pickle_is_an_error_not_a_panic() {
        let mut p = in_dict(b"ccollections\nOrderedDict\n)R");
        p.extend(b"\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x09");
        for n in 0..p.len() {
            let _ = parse_pickle(&p[..n], None);
        }
        for b in 0..=255u8 {
            let mut q = p.clone();
            q[3] = b;
            let _ = parse_pickle(&q, None);
        }
        assert!(err(b"").contains("truncated"));
        assert!(err(b"\xff").contains("unknown opcode 0xff"));
        assert!(err(b"0").contains("empty stack") || err(b"0").contains("MARK"));
    }

    #[test]
    fn gathers_strided_views() {
        // A 2x3 view, stride (1, 2), of 6 u8 elements 0..6: the transpose of a 3x2 matrix.
        let raw: Vec<u8> = (0..6).collect();
        assert_eq!(gather(&raw, &[2, 3], &[1, 2], 1, 6), [0, 2, 4, 1, 3, 5]);
        assert_eq!(gather(&raw, &[2, 2], &[0, 1], 1, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn raw_unicode_escape_decodes() {
        assert_eq!(
            raw_unicode_escape(b"a\\u00e9\\U0001F600\xe9").unwrap(),
            "aé😀é"
        );
    }
}
