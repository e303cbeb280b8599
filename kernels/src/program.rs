//! Expansion of an elementwise program (`coopc_ir::kernel::ElemProgram`)
//! into kernel code. The program is a compile-time constant of the kernel:
//! this module walks it while the kernel is being traced and emits one
//! straight-line instruction per program instruction, so a fused group
//! becomes a single specialised kernel (the burn-cubecl-fusion pattern).
//!
//! Each instruction's semantics is a small `#[cube]` function below that
//! mirrors the CPU executor's scalar rule (`UnaryOp::apply` and friends).

use coopc_ir::kernel::{ElemInstr, ElemProgram, Index, Kernel};
use coopc_ir::{BinaryOp, CompareOp, DType, Graph, Op, UnaryOp};
use cubecl::prelude::*;

/// Whether `kernel` leaves each bf16 result it writes rounded to bf16 in
/// its f32 buffer: fused programs round what they compute
/// (`FusedSchedule::rounding_bf16`) and data movement only moves bf16
/// values. Every other kernel computes a bf16 result in f32, and
/// [`bf16_rounding`] rounds it after it.
pub(crate) fn rounds_bf16_itself(g: &Graph, kernel: &Kernel) -> bool {
    match kernel {
        Kernel::Elementwise { .. } | Kernel::Reduce { .. } | Kernel::OptimStep { .. } => true,
        Kernel::Node(id) => matches!(
            g.op(*id),
            Op::Reshape { .. }
                | Op::StopGradient
                | Op::Barrier { .. }
                | Op::Permute { .. }
                | Op::Slice { .. }
                | Op::Concat { .. }
                | Op::UpdateSlice { .. }
                | Op::TakeAlongAxis { .. }
                | Op::Gather
        ),
        _ => false,
    }
}

/// The program that rounds its input to bf16: run after a kernel that does
/// not round its bf16 results itself ([`rounds_bf16_itself`]).
pub(crate) fn bf16_rounding() -> ElemProgram {
    ElemProgram {
        n_inputs: 1,
        instrs: vec![
            ElemInstr::Load {
                input: 0,
                index: Index::Same,
            },
            ElemInstr::Cast(DType::Bf16, 0),
        ],
        outputs: vec![1],
    }
}

type F = NativeExpand<f32>;
type U = NativeExpand<usize>;
type Arr = <Array<f32> as CubeType>::ExpandType;

#[cube]
fn sigmoid(x: f32) -> f32 {
    // The stable form of both branches, chosen by sign as on the CPU.
    let pos = f32::new(1.0) / (f32::new(1.0) + (-x).exp());
    let e = x.exp();
    let neg = e / (f32::new(1.0) + e);
    select(x >= f32::new(0.0), pos, neg)
}

#[cube]
fn unary_neg(x: f32) -> f32 {
    -x
}
#[cube]
fn unary_exp(x: f32) -> f32 {
    x.exp()
}
#[cube]
fn unary_log(x: f32) -> f32 {
    x.ln()
}
#[cube]
fn unary_sqrt(x: f32) -> f32 {
    x.sqrt()
}
#[cube]
fn unary_rsqrt(x: f32) -> f32 {
    f32::new(1.0) / x.sqrt()
}
#[cube]
fn unary_tanh(x: f32) -> f32 {
    x.tanh()
}
#[cube]
fn unary_sigmoid(x: f32) -> f32 {
    sigmoid(x)
}
#[cube]
fn unary_silu(x: f32) -> f32 {
    x * sigmoid(x)
}
#[cube]
fn unary_abs(x: f32) -> f32 {
    x.abs()
}
#[cube]
fn unary_sign(x: f32) -> f32 {
    // 1, -1, or x itself (0, -0, NaN), as on the CPU.
    select(
        x > f32::new(0.0),
        f32::new(1.0),
        select(x < f32::new(0.0), f32::new(-1.0), x),
    )
}
#[cube]
fn unary_recip(x: f32) -> f32 {
    f32::new(1.0) / x
}
#[cube]
fn unary_sin(x: f32) -> f32 {
    x.sin()
}
#[cube]
fn unary_cos(x: f32) -> f32 {
    x.cos()
}

#[cube]
fn binary_add(a: f32, b: f32) -> f32 {
    a + b
}
#[cube]
fn binary_sub(a: f32, b: f32) -> f32 {
    a - b
}
#[cube]
fn binary_mul(a: f32, b: f32) -> f32 {
    a * b
}
#[cube]
fn binary_div(a: f32, b: f32) -> f32 {
    a / b
}
#[cube]
fn binary_max(a: f32, b: f32) -> f32 {
    // NaN-propagating, `a` on ties.
    select(a.is_nan() || a >= b, a, b)
}
#[cube]
fn binary_min(a: f32, b: f32) -> f32 {
    select(a.is_nan() || a <= b, a, b)
}
#[cube]
fn binary_pow(a: f32, b: f32) -> f32 {
    // powf semantics for negative bases: defined for whole exponents (odd
    // ones keep the sign), NaN otherwise.
    let m = a.abs().powf(b);
    let whole = b.trunc() == b;
    let odd = whole && (b * f32::new(0.5)).trunc() != b * f32::new(0.5);
    // NaN from a run-time zero: a folded 0/0 has no WGSL literal.
    let z = a - a;
    let neg = select(whole, select(odd, -m, m), z / z);
    select(a < f32::new(0.0), neg, m)
}

#[cube]
fn compare_lt(a: f32, b: f32) -> f32 {
    select(a < b, f32::new(1.0), f32::new(0.0))
}
#[cube]
fn compare_le(a: f32, b: f32) -> f32 {
    select(a <= b, f32::new(1.0), f32::new(0.0))
}
#[cube]
fn compare_gt(a: f32, b: f32) -> f32 {
    select(a > b, f32::new(1.0), f32::new(0.0))
}
#[cube]
fn compare_ge(a: f32, b: f32) -> f32 {
    select(a >= b, f32::new(1.0), f32::new(0.0))
}
#[cube]
fn compare_eq(a: f32, b: f32) -> f32 {
    select(a == b, f32::new(1.0), f32::new(0.0))
}
#[cube]
fn compare_ne(a: f32, b: f32) -> f32 {
    select(a != b, f32::new(1.0), f32::new(0.0))
}

#[cube]
fn select_nonzero(c: f32, a: f32, b: f32) -> f32 {
    select(c != f32::new(0.0), a, b)
}

#[cube]
fn clamp_between(x: f32, lo: f32, hi: f32) -> f32 {
    // NaN stays NaN.
    select(x < lo, lo, select(x > hi, hi, x))
}

#[cube]
fn cast_i32(x: f32) -> f32 {
    // Truncation toward zero; NaN → 0.
    select(x.is_nan(), f32::new(0.0), x.trunc())
}

/// Rounds to the nearest bf16, ties to even, as `coopc_ir::round_bf16`:
/// a bf16 value held in f32 storage. NaN stays a quiet NaN; overflow goes
/// to ±∞.
#[cube]
pub(crate) fn round_bf16(x: f32) -> f32 {
    let bits = u32::reinterpret(x);
    let lsb = (bits >> 16) & 1;
    // Clearing the low 16 bits by shifts (a mask literal ≥ 2³¹ is not
    // expressible here).
    let rounded = ((bits + (u32::new(0x7fff) + lsb)) >> 16) << 16;
    let nan = ((bits | u32::new(0x0040_0000)) >> 16) << 16;
    f32::reinterpret(select(x.is_nan(), nan, rounded))
}

#[cube]
fn cast_bool(x: f32) -> f32 {
    select(x != f32::new(0.0), f32::new(1.0), f32::new(0.0))
}

#[cube]
fn constant(#[comptime] v: f32) -> f32 {
    f32::new(v)
}

/// A non-finite constant, computed at run time from a zero that the
/// compiler cannot fold (WGSL has no literal for infinities or NaN).
#[cube]
fn non_finite(zero: f32, #[comptime] numerator: f32) -> f32 {
    f32::new(numerator) / zero
}

#[cube]
fn runtime_zero(i: usize) -> f32 {
    f32::cast_from(i) * f32::new(0.0)
}

#[cube]
fn load(a: &Array<f32>, i: usize) -> f32 {
    a[i]
}

#[cube]
fn store(a: &mut Array<f32>, i: usize, v: f32) {
    a[i] = v;
}

#[cube]
fn index_term(rest: usize, #[comptime] extent: u32, #[comptime] stride: u32) -> usize {
    (rest % extent as usize) * stride as usize
}

#[cube]
fn index_next(rest: usize, #[comptime] extent: u32) -> usize {
    rest / extent as usize
}

#[cube]
fn index_add(a: usize, b: usize) -> usize {
    a + b
}

/// Emits `Σ_a ((i / Π_{b>a} shape_b) mod shape_a) · strides_a`.
pub(crate) fn expand_strided_index(scope: &mut Scope, i: U, shape: &[u32], strides: &[u32]) -> U {
    let mut rest = i;
    let mut at: Option<U> = None;
    for (a, (&d, &s)) in shape.iter().zip(strides).enumerate().rev() {
        if d != 1 && s != 0 {
            let term = index_term::expand(scope, rest.clone(), d, s);
            at = Some(match at {
                None => term,
                Some(prev) => index_add::expand(scope, prev, term),
            });
        }
        if a > 0 && d != 1 {
            rest = index_next::expand(scope, rest, d);
        }
    }
    match at {
        Some(at) => at,
        // Every axis broadcast: element 0.
        None => index_term::expand(scope, rest, 1, 0),
    }
}

fn expand_index(scope: &mut Scope, i: &U, index: &Index) -> U {
    match index {
        Index::Same => i.clone(),
        Index::Broadcast { shape, strides } => {
            expand_strided_index(scope, i.clone(), shape, strides)
        }
    }
}

/// A constant; infinities and NaN are computed from a run-time zero.
fn expand_const(scope: &mut Scope, v: f64, i: &U, zero: &mut Option<F>) -> F {
    let v = v as f32;
    if v.is_finite() {
        return constant::expand(scope, v);
    }
    let z = match zero {
        Some(z) => z.clone(),
        None => {
            let z = runtime_zero::expand(scope, i.clone());
            *zero = Some(z.clone());
            z
        }
    };
    let num = if v.is_nan() { 0.0 } else { v.signum() };
    non_finite::expand(scope, z, num)
}

/// Emits the program's instructions at element `i`; `load_input(slot)`
/// gives the array of input slot `slot`, and `preset` values stand for
/// the first slots (the reduced value of an epilogue). Returns the output
/// registers.
pub(crate) fn expand_program(
    scope: &mut Scope,
    program: &ElemProgram,
    i: &U,
    inputs: &[Option<Arr>],
    preset: &[(u32, F)],
) -> Vec<F> {
    let mut regs: Vec<F> = Vec::with_capacity(program.instrs.len());
    let mut zero: Option<F> = None;
    for ins in &program.instrs {
        let r = |k: &u32| regs[*k as usize].clone();
        let v = match ins {
            ElemInstr::Load { input, index } => {
                if let Some((_, v)) = preset.iter().find(|(s, _)| s == input) {
                    v.clone()
                } else {
                    let arr = inputs[*input as usize]
                        .clone()
                        .expect("every loaded slot is bound");
                    let at = expand_index(scope, i, index);
                    load::expand(scope, arr, at)
                }
            }
            ElemInstr::Const(bits) => expand_const(scope, f64::from_bits(*bits), i, &mut zero),
            ElemInstr::Unary(op, a) => {
                let x = r(a);
                match op {
                    UnaryOp::Neg => unary_neg::expand(scope, x),
                    UnaryOp::Exp => unary_exp::expand(scope, x),
                    UnaryOp::Log => unary_log::expand(scope, x),
                    UnaryOp::Sqrt => unary_sqrt::expand(scope, x),
                    UnaryOp::Rsqrt => unary_rsqrt::expand(scope, x),
                    UnaryOp::Tanh => unary_tanh::expand(scope, x),
                    UnaryOp::Sigmoid => unary_sigmoid::expand(scope, x),
                    UnaryOp::Silu => unary_silu::expand(scope, x),
                    UnaryOp::Abs => unary_abs::expand(scope, x),
                    UnaryOp::Sign => unary_sign::expand(scope, x),
                    UnaryOp::Recip => unary_recip::expand(scope, x),
                    UnaryOp::Sin => unary_sin::expand(scope, x),
                    UnaryOp::Cos => unary_cos::expand(scope, x),
                }
            }
            ElemInstr::Binary(op, a, b) => {
                let (x, y) = (r(a), r(b));
                match op {
                    BinaryOp::Add => binary_add::expand(scope, x, y),
                    BinaryOp::Sub => binary_sub::expand(scope, x, y),
                    BinaryOp::Mul => binary_mul::expand(scope, x, y),
                    BinaryOp::Div => binary_div::expand(scope, x, y),
                    BinaryOp::Max => binary_max::expand(scope, x, y),
                    BinaryOp::Min => binary_min::expand(scope, x, y),
                    BinaryOp::Pow => binary_pow::expand(scope, x, y),
                }
            }
            ElemInstr::Compare(op, a, b) => {
                let (x, y) = (r(a), r(b));
                match op {
                    CompareOp::Lt => compare_lt::expand(scope, x, y),
                    CompareOp::Le => compare_le::expand(scope, x, y),
                    CompareOp::Gt => compare_gt::expand(scope, x, y),
                    CompareOp::Ge => compare_ge::expand(scope, x, y),
                    CompareOp::Eq => compare_eq::expand(scope, x, y),
                    CompareOp::Ne => compare_ne::expand(scope, x, y),
                }
            }
            ElemInstr::Select(c, a, b) => select_nonzero::expand(scope, r(c), r(a), r(b)),
            ElemInstr::Clamp(a, lo, hi) => {
                let lo = expand_const(scope, f64::from_bits(*lo), i, &mut zero);
                let hi = expand_const(scope, f64::from_bits(*hi), i, &mut zero);
                clamp_between::expand(scope, r(a), lo, hi)
            }
            // bf16 values are held in f32 storage, rounded where the
            // program says (`FusedSchedule::rounding_bf16`).
            ElemInstr::Cast(to, a) => match to {
                DType::F32 | DType::F64 => r(a),
                DType::Bf16 => round_bf16::expand(scope, r(a)),
                DType::I32 => cast_i32::expand(scope, r(a)),
                DType::Bool => cast_bool::expand(scope, r(a)),
            },
        };
        regs.push(v);
    }
    program
        .outputs
        .iter()
        .map(|o| regs[*o as usize].clone())
        .collect()
}

/// Stores `values[j]` at element `i` of output `j`.
pub(crate) fn expand_stores(scope: &mut Scope, outputs: &[Arr], i: &U, values: Vec<F>) {
    for (o, v) in outputs.iter().zip(values) {
        store::expand(scope, o.clone(), i.clone(), v);
    }
}
