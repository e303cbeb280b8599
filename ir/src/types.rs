//! Element types, tensor types and the scalar wrapper used in op attributes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    /// bfloat16: f32's exponent with a 7-bit mantissa. A bf16 value is
    /// stored rounded to nearest, ties to even ([`round_bf16`]); the ops
    /// that produce one compute in f32 (products and reductions accumulate
    /// in f32) and round what they store.
    Bf16,
    /// Token ids and gather/scatter indices.
    I32,
    /// Results of comparisons; the condition of `select`.
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::Bf16)
    }

    /// The type an op on this type computes and accumulates in: f32 for
    /// bf16, the type itself otherwise. Log-probs and entropies of bf16
    /// states are values of this type.
    pub fn accumulator(self) -> DType {
        match self {
            DType::Bf16 => DType::F32,
            other => other,
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 => 8,
            DType::Bf16 => 2,
            DType::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bf16 => "bf16",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `x` rounded to the nearest bfloat16, ties to even, as an f32 (the upper
/// 16 bits of the result are the bf16's bits, the lower 16 are zero).
/// NaN stays NaN (quiet, sign kept); values beyond bf16's range round to
/// ±∞ as IEEE rounding does; subnormals round like any other value.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xffff_0000);
    }
    // Add half an ulp of bf16, less one unless the kept lsb is odd (ties
    // to even); the carry may ripple into the exponent, up to ∞.
    let lsb = (bits >> 16) & 1;
    f32::from_bits(bits.wrapping_add(0x7fff + lsb) & 0xffff_0000)
}

/// Rounds every value of `xs` to bf16 in place ([`round_bf16`]).
pub fn round_bf16_slice(xs: &mut [f32]) {
    for x in xs {
        *x = round_bf16(*x);
    }
}

/// Static shape: one extent per axis, row-major.
pub type Shape = Vec<usize>;

/// Number of elements of a shape (1 for a scalar, rank 0).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The type of a value in the graph: element type and static shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> Self {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// A scalar attribute (a constant's value, a clamp bound). Stored as f64 and
/// compared by bit pattern, so ops can be hashed for CSE; converted to the
/// node's element type when executed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Scalar(pub f64);

impl Scalar {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Scalar {}

impl std::hash::Hash for Scalar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

impl From<f64> for Scalar {
    fn from(v: f64) -> Self {
        Scalar(v)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_finite() && v == v.trunc() && v.abs() < 1e15 {
            write!(f, "{v:.1}")
        } else {
            write!(f, "{v}")
        }
    }
}
