//! Tensor files in the safetensors format: reading Hugging Face checkpoints
//! and coopc parameter files into host tensors, writing host tensors back,
//! and strict matching of a file's tensors against the parameters a graph
//! expects (every missing, mis-shaped or unexpected tensor is named).

use crate::tensor::{Buffer, HostTensor};
use coopc_ir::file::write_atomically;
use coopc_ir::{DType, TensorType};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a tensor file could not be read or written, or its tensors do not
/// match what was expected.
#[derive(Debug, Error)]
pub enum TensorFileError {
    #[error("tensor file {} does not exist", path.display())]
    NotFound { path: PathBuf },

    #[error("cannot {action} tensor file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// `read` or `write`.
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{} is not a valid safetensors file: {message}", path.display())]
    Format { path: PathBuf, message: String },

    #[error(
        "{}: tensor `{tensor}` has dtype {dtype}, which cannot be loaded \
         (supported: F32, F64, I32, I64, U8, BOOL, BF16, F16)",
        path.display()
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error(
        "{}: tensor `{tensor}` holds the value {value}, which does not fit in i32",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        tensor: String,
        value: i64,
    },

    #[error("cannot encode tensor file {}: {message}", path.display())]
    Encode { path: PathBuf, message: String },

    /// Tensors that do not match the expected set; `what` names the set
    /// (e.g. the file and its role).
    #[error("{what}: {}", list_problems(problems))]
    Mismatch {
        what: String,
        problems: Vec<TensorProblem>,
    },
}

/// One way a set of tensors differs from the expected one.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorProblem {
    /// An expected tensor is absent.
    Missing { name: String, expected: TensorType },
    /// A tensor has the wrong shape (its dtype may differ too).
    WrongShape {
        name: String,
        expected: TensorType,
        got: TensorType,
    },
    /// A tensor has the right shape but a dtype that cannot be converted
    /// to the expected one (only f32 ↔ f64 is converted).
    WrongDtype {
        name: String,
        expected: TensorType,
        got: DType,
    },
    /// A tensor that nothing expects.
    Unexpected { name: String, got: TensorType },
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorProblem::Missing { name, expected } => {
                write!(f, "missing tensor `{name}` (expected {expected})")
            }
            TensorProblem::WrongShape {
                name,
                expected,
                got,
            } => write!(f, "tensor `{name}` is {got}, expected {expected}"),
            TensorProblem::WrongDtype {
                name,
                expected,
                got,
            } => write!(
                f,
                "tensor `{name}` has dtype {got}, expected {expected} (only f32 and f64 convert)"
            ),
            TensorProblem::Unexpected { name, got } => {
                write!(f, "unexpected tensor `{name}` ({got})")
            }
        }
    }
}

impl TensorProblem {
    /// The tensor the problem is about.
    pub fn name(&self) -> &str {
        match self {
            TensorProblem::Missing { name, .. }
            | TensorProblem::WrongShape { name, .. }
            | TensorProblem::WrongDtype { name, .. }
            | TensorProblem::Unexpected { name, .. } => name,
        }
    }
}

fn list_problems(problems: &[TensorProblem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads every tensor of a safetensors file, by name.
///
/// Element types map to the IR's: F32 → f32, F64 → f64, I32 → i32,
/// I64 → i32 (an error names the tensor when a value does not fit),
/// U8 → i32, BOOL → bool (any non-zero byte is true), BF16 and F16 → f32
/// (exact). Other element types are an error naming the tensor and dtype.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, TensorFileError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TensorFileError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            TensorFileError::Io {
                path: path.to_path_buf(),
                action: "read",
                source,
            }
        }
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| TensorFileError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in file.iter() {
        let t = decode(path, name, view.dtype(), view.shape(), view.data())?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Little-endian elements of `N` bytes each.
fn le<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// One tensor's bytes as a host tensor of float type `to` (any float
/// element type converts; an integer or boolean tensor is an error naming
/// it).
pub(crate) fn decode_as(
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
    to: DType,
) -> Result<HostTensor, TensorFileError> {
    let floating = matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16);
    if !floating || !to.is_float() {
        return Err(TensorFileError::Mismatch {
            what: path.display().to_string(),
            problems: vec![TensorProblem::WrongDtype {
                name: name.to_string(),
                expected: TensorType::new(to, shape.to_vec()),
                got: if to.is_float() {
                    DType::I32
                } else {
                    DType::F32
                },
            }],
        });
    }
    if dtype == Dtype::F64 && to == DType::F32 {
        let v: Vec<f32> = le::<8>(data)
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect();
        return HostTensor::new(shape.to_vec(), Buffer::F32(v)).map_err(|e| {
            TensorFileError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            }
        });
    }
    if to == DType::F64 {
        let v: Vec<f64> = match dtype {
            Dtype::F64 => le::<8>(data).map(f64::from_le_bytes).collect(),
            Dtype::F32 => le::<4>(data)
                .map(|b| f64::from(f32::from_le_bytes(b)))
                .collect(),
            Dtype::BF16 => le::<2>(data)
                .map(|b| half::bf16::from_le_bytes(b).to_f64())
                .collect(),
            _ => le::<2>(data)
                .map(|b| half::f16::from_le_bytes(b).to_f64())
                .collect(),
        };
        return HostTensor::new(shape.to_vec(), Buffer::F64(v)).map_err(|e| {
            TensorFileError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            }
        });
    }
    decode(path, name, dtype, shape, data)
}

/// One tensor's bytes as a host tensor (the byte count was checked
/// against the shape by the safetensors parser).
fn decode(
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<HostTensor, TensorFileError> {
    let buffer = match dtype {
        Dtype::F32 => Buffer::F32(le::<4>(data).map(f32::from_le_bytes).collect()),
        Dtype::F64 => Buffer::F64(le::<8>(data).map(f64::from_le_bytes).collect()),
        Dtype::I32 => Buffer::I32(le::<4>(data).map(i32::from_le_bytes).collect()),
        Dtype::I64 => Buffer::I32(
            le::<8>(data)
                .map(|b| {
                    let v = i64::from_le_bytes(b);
                    i32::try_from(v).map_err(|_| TensorFileError::OutOfRange {
                        path: path.to_path_buf(),
                        tensor: name.to_string(),
                        value: v,
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Dtype::U8 => Buffer::I32(data.iter().map(|&b| i32::from(b)).collect()),
        Dtype::BOOL => Buffer::Bool(data.iter().map(|&b| b != 0).collect()),
        Dtype::BF16 => Buffer::F32(
            le::<2>(data)
                .map(|b| half::bf16::from_le_bytes(b).to_f32())
                .collect(),
        ),
        Dtype::F16 => Buffer::F32(
            le::<2>(data)
                .map(|b| half::f16::from_le_bytes(b).to_f32())
                .collect(),
        ),
        other => {
            return Err(TensorFileError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                dtype: other.to_string(),
            })
        }
    };
    HostTensor::new(shape.to_vec(), buffer).map_err(|e| TensorFileError::Format {
        path: path.to_path_buf(),
        message: format!("tensor `{name}`: {e}"),
    })
}

/// A host tensor's bytes in safetensors layout.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// How float tensors are stored in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatStorage {
    /// As held (f32 or f64).
    Native,
    /// bfloat16, rounded to nearest even.
    Bf16,
    /// IEEE f32.
    F32,
}

impl Encoded {
    fn stored(t: &HostTensor, storage: FloatStorage) -> Encoded {
        let floats = || t.to_f64_vec();
        let (dtype, bytes) = match (&t.data, storage) {
            (Buffer::F32(_) | Buffer::F64(_), FloatStorage::Bf16) => (
                Dtype::BF16,
                floats()
                    .into_iter()
                    .flat_map(|x| half::bf16::from_f64(x).to_le_bytes())
                    .collect(),
            ),
            (Buffer::F64(_), FloatStorage::F32) => (
                Dtype::F32,
                floats()
                    .into_iter()
                    .flat_map(|x| (x as f32).to_le_bytes())
                    .collect(),
            ),
            _ => return Encoded::new(t),
        };
        Encoded {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }

    fn new(t: &HostTensor) -> Encoded {
        let (dtype, bytes) = match &t.data {
            Buffer::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Buffer::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            // Exact: the values are bf16's, held as f32.
            Buffer::Bf16(v) => (
                Dtype::BF16,
                v.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            Buffer::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Buffer::Bool(v) => (Dtype::BOOL, v.iter().map(|&x| u8::from(x)).collect()),
        };
        Encoded {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` to a safetensors file (F32, F64, I32 and BOOL element
/// types), atomically: readers of `path` see the old file or the whole new
/// one. A tensor whose buffer does not fit its shape is an error.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<(), TensorFileError> {
    write_encoded(path, tensors, FloatStorage::Native, false)
}

/// [`write_tensors`] with float tensors stored as `storage` says, and the
/// `{"format": "pt"}` metadata Hugging Face loaders look for.
pub fn write_tensors_as(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    storage: FloatStorage,
) -> Result<(), TensorFileError> {
    write_encoded(path, tensors, storage, true)
}

fn write_encoded(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    storage: FloatStorage,
    hf_metadata: bool,
) -> Result<(), TensorFileError> {
    let encode_err = |message: String| TensorFileError::Encode {
        path: path.to_path_buf(),
        message,
    };
    if let Some((name, t)) = tensors.iter().find(|(_, t)| t.data.len() != t.numel()) {
        return Err(encode_err(format!(
            "tensor `{name}` has {} elements for shape {:?}",
            t.data.len(),
            t.shape
        )));
    }
    let encoded: Vec<(&String, Encoded)> = tensors
        .iter()
        .map(|(name, t)| (name, Encoded::stored(t, storage)))
        .collect();
    let metadata = hf_metadata
        .then(|| std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(encoded.iter().map(|(n, e)| (n.as_str(), e)), metadata)
        .map_err(|e| encode_err(e.to_string()))?;
    write_atomically(path, &bytes).map_err(|source| TensorFileError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    })
}

/// Takes the expected tensors out of `tensors`, strictly.
///
/// Every `(name, type)` of `expected` must be present with exactly that
/// shape. A tensor whose dtype differs is converted when both are floats
/// (f32 ↔ f64, f64 → f32 rounding to nearest); any other dtype difference
/// (e.g. an integer tensor where a float is expected) is a problem. On
/// success the expected tensors are removed from `tensors` and returned,
/// with the expected dtypes; tensors nothing expects are left in `tensors`
/// (reject them with [`reject_unexpected`], or use [`take_all_exact`]).
/// On failure `tensors` is unchanged and the error lists every missing,
/// mis-shaped and mis-typed tensor; `what` names the set in the message
/// (e.g. "parameter file ckpt/theta.safetensors").
pub fn take_exact(
    tensors: &mut BTreeMap<String, HostTensor>,
    expected: &[(String, TensorType)],
    what: &str,
) -> Result<BTreeMap<String, HostTensor>, TensorFileError> {
    let problems = check_expected(tensors, expected);
    if !problems.is_empty() {
        return Err(TensorFileError::Mismatch {
            what: what.to_string(),
            problems,
        });
    }
    let mut out = BTreeMap::new();
    for (name, ty) in expected {
        if let Some(t) = tensors.remove(name) {
            out.insert(name.clone(), convert_float(t, ty.dtype));
        }
    }
    Ok(out)
}

/// An error listing every tensor of `rest` (what is left after the
/// [`take_exact`] calls for a file), or `Ok` when it is empty.
pub fn reject_unexpected(
    rest: &BTreeMap<String, HostTensor>,
    what: &str,
) -> Result<(), TensorFileError> {
    let problems = unexpected(rest);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TensorFileError::Mismatch {
            what: what.to_string(),
            problems,
        })
    }
}

/// [`take_exact`] and [`reject_unexpected`] in one: `tensors` must hold
/// exactly the expected tensors. One error lists every problem, unexpected
/// tensors included.
pub fn take_all_exact(
    mut tensors: BTreeMap<String, HostTensor>,
    expected: &[(String, TensorType)],
    what: &str,
) -> Result<BTreeMap<String, HostTensor>, TensorFileError> {
    let mut problems = check_expected(&tensors, expected);
    let mut rest = tensors.clone();
    for (name, _) in expected {
        rest.remove(name);
    }
    problems.extend(unexpected(&rest));
    if !problems.is_empty() {
        return Err(TensorFileError::Mismatch {
            what: what.to_string(),
            problems,
        });
    }
    take_exact(&mut tensors, expected, what)
}

fn check_expected(
    tensors: &BTreeMap<String, HostTensor>,
    expected: &[(String, TensorType)],
) -> Vec<TensorProblem> {
    let mut problems = Vec::new();
    for (name, ty) in expected {
        match tensors.get(name) {
            None => problems.push(TensorProblem::Missing {
                name: name.clone(),
                expected: ty.clone(),
            }),
            Some(t) if t.shape != ty.shape => problems.push(TensorProblem::WrongShape {
                name: name.clone(),
                expected: ty.clone(),
                got: t.ty(),
            }),
            Some(t) if t.dtype() != ty.dtype && !(t.dtype().is_float() && ty.dtype.is_float()) => {
                problems.push(TensorProblem::WrongDtype {
                    name: name.clone(),
                    expected: ty.clone(),
                    got: t.dtype(),
                })
            }
            Some(_) => {}
        }
    }
    problems
}

fn unexpected(rest: &BTreeMap<String, HostTensor>) -> Vec<TensorProblem> {
    rest.iter()
        .map(|(name, t)| TensorProblem::Unexpected {
            name: name.clone(),
            got: t.ty(),
        })
        .collect()
}

/// `t` with float elements converted to `to` (other tensors unchanged).
fn convert_float(t: HostTensor, to: DType) -> HostTensor {
    let data = match (t.data, to) {
        (Buffer::F32(v), DType::F64) => Buffer::F64(v.into_iter().map(f64::from).collect()),
        (Buffer::F64(v), DType::F32) => Buffer::F32(v.into_iter().map(|x| x as f32).collect()),
        (data, _) => data,
    };
    HostTensor {
        shape: t.shape,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "coopc-safetensors-test-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A raw tensor of any safetensors dtype, for writing test files.
    struct Raw(Dtype, Vec<usize>, Vec<u8>);

    impl View for &Raw {
        fn dtype(&self) -> Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    fn write_raw(path: &Path, tensors: &[(&str, Raw)]) {
        let bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (*n, r)), None).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn ty(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    #[test]
    fn every_dtype_round_trips() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("t.safetensors");
        let mut m = BTreeMap::new();
        m.insert(
            "a.f32".to_string(),
            HostTensor::f32(
                vec![2, 3],
                vec![1.5, -0.0, f32::INFINITY, 3e-39, 7.0, -8.25],
            ),
        );
        m.insert(
            "b.f64".to_string(),
            HostTensor::f64(vec![3], vec![0.1, f64::NEG_INFINITY, 1e-310]),
        );
        m.insert(
            "c.i32".to_string(),
            HostTensor::i32(vec![2, 2], vec![i32::MIN, -1, 0, i32::MAX]),
        );
        m.insert(
            "d.bool".to_string(),
            HostTensor::bool(vec![3], vec![true, false, true]),
        );
        m.insert(
            "e.scalar".to_string(),
            HostTensor::f32(Vec::<usize>::new(), vec![2.0]),
        );
        m.insert(
            "f.empty".to_string(),
            HostTensor::f64(vec![0, 4], Vec::new()),
        );
        write_tensors(&path, &m).unwrap();
        let back = read_tensors(&path).unwrap();
        assert_eq!(back, m);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "a temporary file was left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_precision_i64_and_u8_are_converted() {
        let dir = temp_dir("convert");
        let path = dir.join("t.safetensors");
        let bf16: Vec<u8> = [0x3f80u16, 0xc020, 0x0000, 0x7f80]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let f16: Vec<u8> = [0x3c00u16, 0x3800, 0x7bff, 0x0001, 0xfc00]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let i64s: Vec<u8> = [-5i64, i32::MAX as i64, i32::MIN as i64]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        write_raw(
            &path,
            &[
                ("bf", Raw(Dtype::BF16, vec![2, 2], bf16)),
                ("h", Raw(Dtype::F16, vec![5], f16)),
                ("ids", Raw(Dtype::I64, vec![3], i64s)),
                ("bytes", Raw(Dtype::U8, vec![3], vec![0, 7, 255])),
                ("mask", Raw(Dtype::BOOL, vec![2], vec![1, 0])),
            ],
        );
        let m = read_tensors(&path).unwrap();
        assert_eq!(
            m["bf"],
            HostTensor::f32(vec![2, 2], vec![1.0, -2.5, 0.0, f32::INFINITY])
        );
        let two_pow_m24 = 1.0 / 16_777_216.0;
        assert_eq!(
            m["h"],
            HostTensor::f32(
                vec![5],
                vec![1.0, 0.5, 65504.0, two_pow_m24, f32::NEG_INFINITY]
            )
        );
        assert_eq!(
            m["ids"],
            HostTensor::i32(vec![3], vec![-5, i32::MAX, i32::MIN])
        );
        assert_eq!(m["bytes"], HostTensor::i32(vec![3], vec![0, 7, 255]));
        assert_eq!(m["mask"], HostTensor::bool(vec![2], vec![true, false]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn i64_values_beyond_i32_are_an_error_naming_the_tensor() {
        let dir = temp_dir("i64");
        let path = dir.join("t.safetensors");
        let v: Vec<u8> = [1i64, 1 << 31]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        write_raw(&path, &[("input_ids", Raw(Dtype::I64, vec![2], v))]);
        let e = read_tensors(&path).unwrap_err();
        assert!(
            matches!(&e, TensorFileError::OutOfRange { tensor, value, .. }
                if tensor == "input_ids" && *value == 1 << 31),
            "{e}"
        );
        assert!(e.to_string().contains("t.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsupported_dtypes_are_an_error_naming_tensor_and_dtype() {
        let dir = temp_dir("dtype");
        let path = dir.join("t.safetensors");
        write_raw(&path, &[("w", Raw(Dtype::U16, vec![2], vec![0; 4]))]);
        let e = read_tensors(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, TensorFileError::UnsupportedDtype { .. }),
            "{msg}"
        );
        assert!(msg.contains("`w`") && msg.contains("U16"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_corrupt_files_are_errors_naming_the_file() {
        let dir = temp_dir("corrupt");
        let missing = dir.join("nope.safetensors");
        let e = read_tensors(&missing).unwrap_err();
        assert!(matches!(e, TensorFileError::NotFound { .. }));
        assert!(e.to_string().contains("nope.safetensors"));

        let path = dir.join("bad.safetensors");
        std::fs::write(&path, b"definitely not a tensor file").unwrap();
        let e = read_tensors(&path).unwrap_err();
        assert!(matches!(e, TensorFileError::Format { .. }), "{e}");
        assert!(e.to_string().contains("bad.safetensors"));

        // A valid file cut short anywhere is refused, never a panic.
        let mut m = BTreeMap::new();
        m.insert("x".to_string(), HostTensor::f32(vec![4], vec![1.0; 4]));
        write_tensors(&path, &m).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(read_tensors(&path), Err(TensorFileError::Format { .. })),
                "cut at {cut}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn params() -> BTreeMap<String, HostTensor> {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            HostTensor::f64(vec![2, 2], vec![0.1, 0.2, 0.3, 0.4]),
        );
        m.insert(
            "b".to_string(),
            HostTensor::f32(vec![3], vec![1.0, 2.0, 3.0]),
        );
        m.insert("ids".to_string(), HostTensor::i32(vec![2], vec![1, 2]));
        m.insert("extra".to_string(), HostTensor::f32(vec![1], vec![0.0]));
        m
    }

    #[test]
    fn take_exact_converts_floats_and_leaves_the_rest() {
        let mut m = params();
        let expected = vec![
            ("w".to_string(), ty(DType::F32, &[2, 2])),
            ("b".to_string(), ty(DType::F64, &[3])),
            ("ids".to_string(), ty(DType::I32, &[2])),
        ];
        let got = take_exact(&mut m, &expected, "params").unwrap();
        assert_eq!(
            got["w"],
            HostTensor::f32(vec![2, 2], vec![0.1, 0.2, 0.3, 0.4])
        );
        assert_eq!(got["b"], HostTensor::f64(vec![3], vec![1.0, 2.0, 3.0]));
        assert_eq!(got["ids"], HostTensor::i32(vec![2], vec![1, 2]));
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["extra"]);
        let e = reject_unexpected(&m, "params").unwrap_err();
        assert_eq!(e.to_string(), "params: unexpected tensor `extra` (f32[1])");
        assert!(reject_unexpected(&BTreeMap::new(), "params").is_ok());
    }

    #[test]
    fn take_exact_lists_every_missing_misshaped_and_mistyped_tensor() {
        let mut m = params();
        let before = m.clone();
        let expected = vec![
            ("w".to_string(), ty(DType::F64, &[2, 3])),
            ("gone".to_string(), ty(DType::F32, &[4])),
            ("ids".to_string(), ty(DType::F32, &[2])),
            ("b".to_string(), ty(DType::F32, &[3])),
            ("also_gone".to_string(), ty(DType::F64, &[])),
        ];
        let e = take_exact(&mut m, &expected, "theta.safetensors").unwrap_err();
        assert_eq!(m, before, "nothing is taken on failure");
        match &e {
            TensorFileError::Mismatch { problems, .. } => assert_eq!(
                problems,
                &vec![
                    TensorProblem::WrongShape {
                        name: "w".into(),
                        expected: ty(DType::F64, &[2, 3]),
                        got: ty(DType::F64, &[2, 2]),
                    },
                    TensorProblem::Missing {
                        name: "gone".into(),
                        expected: ty(DType::F32, &[4]),
                    },
                    TensorProblem::WrongDtype {
                        name: "ids".into(),
                        expected: ty(DType::F32, &[2]),
                        got: DType::I32,
                    },
                    TensorProblem::Missing {
                        name: "also_gone".into(),
                        expected: ty(DType::F64, &[]),
                    },
                ]
            ),
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(msg.starts_with("theta.safetensors: "), "{msg}");
        assert!(
            msg.contains("tensor `w` is f64[2,2], expected f64[2,3]"),
            "{msg}"
        );
        assert!(
            msg.contains("missing tensor `gone` (expected f32[4])"),
            "{msg}"
        );
    }

    #[test]
    fn take_all_exact_reports_unexpected_tensors_with_the_rest() {
        let expected = vec![
            ("w".to_string(), ty(DType::F64, &[2, 2])),
            ("b".to_string(), ty(DType::F32, &[3])),
            ("ids".to_string(), ty(DType::I32, &[2])),
            ("lm_head.weight".to_string(), ty(DType::F32, &[2])),
        ];
        let e = take_all_exact(params(), &expected, "params").unwrap_err();
        match &e {
            TensorFileError::Mismatch { problems, .. } => {
                assert_eq!(problems.len(), 2, "{e}");
                assert!(
                    matches!(&problems[0], TensorProblem::Missing { name, .. } if name == "lm_head.weight")
                );
                assert!(
                    matches!(&problems[1], TensorProblem::Unexpected { name, .. } if name == "extra")
                );
            }
            other => panic!("{other}"),
        }
        let ok = take_all_exact(params(), &expected[..3], "params");
        assert!(ok.is_err(), "`extra` is still unexpected");
        let mut m = params();
        m.remove("extra");
        assert_eq!(
            take_all_exact(m, &expected[..3], "params").unwrap().len(),
            3
        );
    }
}
