//! Host tensors: a dense row-major buffer of one of the IR's element types
//! plus a shape. These are the values the CPU executor consumes and produces.

use crate::error::ExecError;
use coopc_ir::{numel, DType, TensorType};
use std::fmt::Debug;

/// The elements of a tensor, row-major, one variant per [`DType`].
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// bf16 values, each held as the f32 it is exactly (rounded to bf16
    /// when stored, [`coopc_ir::round_bf16`]): kernels read them as f32 and
    /// compute in f32.
    Bf16(Vec<f32>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

impl Buffer {
    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::F64(_) => DType::F64,
            Buffer::Bf16(_) => DType::Bf16,
            Buffer::I32(_) => DType::I32,
            Buffer::Bool(_) => DType::Bool,
        }
    }

    /// Number of elements stored.
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) | Buffer::Bf16(v) => v.len(),
            Buffer::F64(v) => v.len(),
            Buffer::I32(v) => v.len(),
            Buffer::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` elements of `dtype`, all zero (`false` for bool).
    pub fn zeros(dtype: DType, n: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(vec![0.0; n]),
            DType::F64 => Buffer::F64(vec![0.0; n]),
            DType::Bf16 => Buffer::Bf16(vec![0.0; n]),
            DType::I32 => Buffer::I32(vec![0; n]),
            DType::Bool => Buffer::Bool(vec![false; n]),
        }
    }

    /// The buffer as a value of type `dtype` is stored: an f32 buffer of a
    /// bf16 value rounded to bf16 ([`Buffer::Bf16`]); anything else as it is.
    pub fn stored_as(self, dtype: DType) -> Buffer {
        match (self, dtype) {
            (Buffer::F32(mut v), DType::Bf16) => {
                coopc_ir::round_bf16_slice(&mut v);
                Buffer::Bf16(v)
            }
            (b, _) => b,
        }
    }

    /// Every element converted to f64 (exact for all four types; bool → 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Buffer::F32(v) | Buffer::Bf16(v) => v.iter().map(|&x| x.to_f64_exact()).collect(),
            Buffer::F64(v) => v.clone(),
            Buffer::I32(v) => v.iter().map(|&x| x.to_f64_exact()).collect(),
            Buffer::Bool(v) => v.iter().map(|&x| x.to_f64_exact()).collect(),
        }
    }
}

/// A Rust type that can be the element of a [`Buffer`]: `f32`, `f64`, `i32`
/// or `bool`. Lets data-movement kernels be written once, generically.
pub trait Element: Copy + Default + PartialOrd + Send + Sync + Debug + 'static {
    const DTYPE: DType;

    /// Conversion from f64 with Rust `as` semantics (float → i32 truncates
    /// toward zero and saturates, NaN → 0); to bool: `v != 0`.
    fn from_f64_as(v: f64) -> Self;

    /// Exact widening to f64 (bool → 0 or 1).
    fn to_f64_exact(self) -> f64;

    /// The elements of `b` when it holds this type.
    fn view(b: &Buffer) -> Option<&[Self]>;

    /// Wraps a vector in the matching `Buffer` variant.
    fn into_buffer(v: Vec<Self>) -> Buffer;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn from_f64_as(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        self as f64
    }
    /// An f32 or a bf16 buffer (bf16 values are held as f32).
    fn view(b: &Buffer) -> Option<&[Self]> {
        match b {
            Buffer::F32(v) | Buffer::Bf16(v) => Some(v),
            _ => None,
        }
    }
    fn into_buffer(v: Vec<Self>) -> Buffer {
        Buffer::F32(v)
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    #[inline]
    fn from_f64_as(v: f64) -> Self {
        v
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        self
    }
    fn view(b: &Buffer) -> Option<&[Self]> {
        match b {
            Buffer::F64(v) => Some(v),
            _ => None,
        }
    }
    fn into_buffer(v: Vec<Self>) -> Buffer {
        Buffer::F64(v)
    }
}

impl Element for i32 {
    const DTYPE: DType = DType::I32;
    #[inline]
    fn from_f64_as(v: f64) -> Self {
        v as i32
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        self as f64
    }
    fn view(b: &Buffer) -> Option<&[Self]> {
        match b {
            Buffer::I32(v) => Some(v),
            _ => None,
        }
    }
    fn into_buffer(v: Vec<Self>) -> Buffer {
        Buffer::I32(v)
    }
}

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    #[inline]
    fn from_f64_as(v: f64) -> Self {
        v != 0.0
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        if self {
            1.0
        } else {
            0.0
        }
    }
    fn view(b: &Buffer) -> Option<&[Self]> {
        match b {
            Buffer::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn into_buffer(v: Vec<Self>) -> Buffer {
        Buffer::Bool(v)
    }
}

/// A dense tensor in host memory: `data` holds `numel(shape)` elements in
/// row-major order.
///
/// The fields are public; [`HostTensor::new`] checks that they agree, and the
/// executor re-checks every tensor bound to a graph input.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Buffer,
}

impl HostTensor {
    /// Rows `start..end` of the leading axis (a copy).
    pub fn slice_rows(&self, start: usize, end: usize) -> HostTensor {
        let row: usize = self.shape[1..].iter().product();
        let (a, b) = (start * row, end * row);
        let data = match &self.data {
            Buffer::F32(v) => Buffer::F32(v[a..b].to_vec()),
            Buffer::Bf16(v) => Buffer::Bf16(v[a..b].to_vec()),
            Buffer::F64(v) => Buffer::F64(v[a..b].to_vec()),
            Buffer::I32(v) => Buffer::I32(v[a..b].to_vec()),
            Buffer::Bool(v) => Buffer::Bool(v[a..b].to_vec()),
        };
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        HostTensor { shape, data }
    }

    /// A tensor from a shape and a buffer, or an error when the buffer length
    /// is not the element count of the shape.
    pub fn new(shape: impl Into<Vec<usize>>, data: Buffer) -> Result<Self, ExecError> {
        let shape = shape.into();
        let n = numel(&shape);
        if data.len() != n {
            return Err(ExecError::BufferLength {
                dtype: data.dtype(),
                shape,
                len: data.len(),
                numel: n,
            });
        }
        Ok(HostTensor { shape, data })
    }

    /// A tensor of any element type. The length is checked in debug builds
    /// only; use [`HostTensor::new`] for a checked construction.
    pub fn from_vec<T: Element>(shape: impl Into<Vec<usize>>, data: Vec<T>) -> Self {
        let shape = shape.into();
        debug_assert_eq!(
            data.len(),
            numel(&shape),
            "buffer of {} elements for shape {:?}",
            data.len(),
            shape
        );
        HostTensor {
            shape,
            data: T::into_buffer(data),
        }
    }

    /// An f32 tensor (length checked in debug builds).
    pub fn f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Self {
        Self::from_vec(shape, data)
    }

    /// An f64 tensor (length checked in debug builds).
    pub fn f64(shape: impl Into<Vec<usize>>, data: Vec<f64>) -> Self {
        Self::from_vec(shape, data)
    }

    /// An i32 tensor (length checked in debug builds).
    pub fn i32(shape: impl Into<Vec<usize>>, data: Vec<i32>) -> Self {
        Self::from_vec(shape, data)
    }

    /// A bool tensor (length checked in debug builds).
    pub fn bool(shape: impl Into<Vec<usize>>, data: Vec<bool>) -> Self {
        Self::from_vec(shape, data)
    }

    /// A tensor of `dtype` from f64 values, converted as by `as` (bool:
    /// `value != 0`), or an error when the value count does not fit `shape`.
    pub fn from_f64(
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        values: &[f64],
    ) -> Result<Self, ExecError> {
        fn conv<T: Element>(values: &[f64]) -> Buffer {
            T::into_buffer(values.iter().map(|&v| T::from_f64_as(v)).collect())
        }
        let data = match dtype {
            DType::F32 => conv::<f32>(values),
            DType::F64 => conv::<f64>(values),
            DType::Bf16 => conv::<f32>(values).stored_as(DType::Bf16),
            DType::I32 => conv::<i32>(values),
            DType::Bool => conv::<bool>(values),
        };
        Self::new(shape, data)
    }

    /// A tensor of the given type, all zero.
    pub fn zeros(ty: &TensorType) -> Self {
        HostTensor {
            shape: ty.shape.clone(),
            data: Buffer::zeros(ty.dtype, ty.numel()),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Element count of the shape (1 for rank 0).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The IR type of this tensor.
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape.clone())
    }

    /// The elements as a slice of `T`, when `T` is the element type.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::view(&self.data)
    }

    /// Every element converted to f64 (bool → 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data.to_f64_vec()
    }

    /// The value of a tensor with exactly one element (rank 0, or any shape
    /// of extent 1 everywhere), as f64.
    pub fn scalar_f64(&self) -> Result<f64, ExecError> {
        let not_scalar = || ExecError::NotScalar {
            shape: self.shape.clone(),
        };
        if self.numel() != 1 || self.data.len() != 1 {
            return Err(not_scalar());
        }
        Ok(match &self.data {
            Buffer::F32(v) | Buffer::Bf16(v) => v[0].to_f64_exact(),
            Buffer::F64(v) => v[0],
            Buffer::I32(v) => v[0].to_f64_exact(),
            Buffer::Bool(v) => v[0].to_f64_exact(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `round_bf16` is IEEE round-to-nearest-even to bf16 (the `half`
    /// crate's conversion), on every 2^12-th bit pattern, a window around
    /// every power of two (ties and carries into the exponent), and the
    /// special values; NaN stays a quiet NaN with its sign.
    #[test]
    fn bf16_rounding_is_round_to_nearest_even() {
        let same = |x: f32| {
            let ours = coopc_ir::round_bf16(x);
            if x.is_nan() {
                assert!(ours.is_nan() && ours.is_sign_negative() == x.is_sign_negative());
                assert_eq!(ours.to_bits() & 0xffff, 0, "{:#x}", x.to_bits());
                return;
            }
            let want = half::bf16::from_f32(x).to_f32();
            assert_eq!(
                ours.to_bits(),
                want.to_bits(),
                "{x:e} ({:#010x}) → {ours:e}, IEEE gives {want:e}",
                x.to_bits()
            );
        };
        for hi in (0u32..=u32::MAX).step_by(1 << 12) {
            same(f32::from_bits(hi | 0x0123));
        }
        for e in 0u32..256 {
            for sign in [0, 1u32 << 31] {
                for m in [
                    0u32, 1, 0x7fff, 0x8000, 0x8001, 0x1_7fff, 0x1_8000, 0x7f_ffff,
                ] {
                    same(f32::from_bits(sign | e << 23 | m));
                }
            }
        }
        // Ties go to the even neighbour, both ways.
        assert_eq!(
            coopc_ir::round_bf16(f32::from_bits(0x3f80_8000)).to_bits(),
            0x3f80_0000
        );
        assert_eq!(
            coopc_ir::round_bf16(f32::from_bits(0x3f81_8000)).to_bits(),
            0x3f82_0000
        );
        assert_eq!(coopc_ir::round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(coopc_ir::round_bf16(-f32::MAX), f32::NEG_INFINITY);
        assert_eq!(coopc_ir::round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(coopc_ir::round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        same(f32::NAN);
        same(-f32::NAN);
        same(f32::from_bits(0x7f80_0001)); // a signalling NaN with a low payload
    }

    #[test]
    fn a_bf16_value_is_stored_rounded() {
        let b = Buffer::F32(vec![1.0 + 2f32.powi(-9), 3.0e-3]).stored_as(DType::Bf16);
        assert_eq!(b.dtype(), DType::Bf16);
        let Buffer::Bf16(v) = &b else { unreachable!() };
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1].to_bits() & 0xffff, 0);
        // Other types are left alone.
        let f = Buffer::F32(vec![1.0 + 2f32.powi(-9)]).stored_as(DType::F32);
        assert_eq!(f, Buffer::F32(vec![1.0 + 2f32.powi(-9)]));
        let t = HostTensor::from_f64(DType::Bf16, vec![1], &[0.1]).unwrap();
        assert_eq!(
            t.data,
            Buffer::Bf16(vec![half::bf16::from_f64(0.1).to_f32()])
        );
        // Kernels read bf16 values as f32.
        assert_eq!(
            t.as_slice::<f32>(),
            Some(&[half::bf16::from_f64(0.1).to_f32()][..])
        );
    }

    #[test]
    fn new_checks_length() {
        assert!(HostTensor::new(vec![2, 3], Buffer::F32(vec![0.0; 6])).is_ok());
        let e = HostTensor::new(vec![2, 3], Buffer::I32(vec![0; 5])).unwrap_err();
        assert!(matches!(
            e,
            ExecError::BufferLength {
                len: 5,
                numel: 6,
                ..
            }
        ));
    }

    #[test]
    fn from_f64_converts_like_as() {
        let v = [2.7, -2.7, 0.0, f64::NAN];
        let t = HostTensor::from_f64(DType::I32, vec![4], &v).unwrap();
        assert_eq!(t.data, Buffer::I32(vec![2, -2, 0, 0]));
        let t = HostTensor::from_f64(DType::Bool, vec![4], &v).unwrap();
        assert_eq!(t.data, Buffer::Bool(vec![true, true, false, true]));
        assert!(HostTensor::from_f64(DType::F64, vec![3], &v).is_err());
        let t = HostTensor::from_f64(DType::F32, vec![2, 2], &v).unwrap();
        assert_eq!(t.ty(), TensorType::new(DType::F32, vec![2, 2]));
        assert_eq!(t.numel(), 4);
    }

    #[test]
    fn to_f64_and_scalar() {
        let t = HostTensor::bool(vec![3], vec![true, false, true]);
        assert_eq!(t.to_f64_vec(), vec![1.0, 0.0, 1.0]);
        assert!(matches!(t.scalar_f64(), Err(ExecError::NotScalar { .. })));
        let s = HostTensor::i32(Vec::<usize>::new(), vec![-7]);
        assert_eq!(s.scalar_f64().unwrap(), -7.0);
        let s = HostTensor::f32(vec![1, 1], vec![0.5]);
        assert_eq!(s.scalar_f64().unwrap(), 0.5);
    }
}
