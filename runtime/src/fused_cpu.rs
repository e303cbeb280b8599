//! The CPU executor over a program's fused kernels (`Program::fused`, the
//! partition the device path launches): an elementwise kernel is evaluated
//! in cache-sized chunks of its index space, each register of its program a
//! chunk-long column in the register's element type, so no intermediate
//! (and no broadcast) is ever a whole buffer; a reduction folds its
//! prologue's chunks straight into its outputs and runs its epilogue on the
//! result; an optimiser step computes its gradient from its prologue; the
//! other kernels (products, attention, the linear log-prob, …) run the
//! node-by-node executor's code on their nodes.
//!
//! Every value is computed with the same operations, in the same element
//! type and (for reductions) in the same order as the node-by-node executor
//! ([`crate::execute_program`]), so the two agree bit for bit; the tests in
//! `tests/fused_cpu.rs` hold them to it on the meta-step's programs.
//!
//! A program with a kernel this executor cannot run as such (a hand-written
//! kernel standing for a matched subgraph whose interior nodes are never
//! computed, or an elementwise program on element types the node executor
//! does not define) is reported by [`FusedPlan::new`], and the caller runs
//! the program node by node instead.

use crate::cpu::elementwise::{exp_family_into, specialised, ExpSlice};
use crate::cpu::{attention, optim, PAR_GRAIN, PAR_MIN_ELEMS};
use crate::exec::{
    any_dtype, bind_input, eval_node, matmul_transposed, missing_operand, print_profile,
    profile_key,
};
use crate::tensor::{Buffer, Element, HostTensor};
use crate::value::Inputs;
use crate::ExecError;
use coopc_ir::kernel::{ElemInstr, ElemProgram, FusedSchedule, Index, Kernel, ReduceLayout};
use coopc_ir::plan::Program;
use coopc_ir::{
    clamp_value, round_bf16_slice, AttentionOperand, BinaryOp, DType, Graph, NodeId, Op,
    ReduceKind, UnaryOp,
};
use num_traits::Float;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

/// Elements of one chunk of an elementwise program: every register is a
/// column this long, so a program's registers stay in the L1/L2 caches.
const CHUNK: usize = 512;

/// An elementwise program with the element type of each register (what
/// the node it computes holds), checked to be one the node executor runs.
#[derive(Debug)]
struct Typed<'p> {
    program: &'p ElemProgram,
    types: Vec<DType>,
    /// Per register: the input slot of a load at the kernel's own index
    /// (read in place, never copied into a column).
    direct: Vec<Option<u32>>,
}

impl<'p> Typed<'p> {
    /// Each register's type ([`ElemProgram::register_types`]); `None` when
    /// an operation is on types the node executor does not define.
    fn new(program: &'p ElemProgram, inputs: &[DType], outputs: &[DType]) -> Option<Typed<'p>> {
        let types = program.register_types(inputs, outputs)?;
        let direct = program
            .instrs
            .iter()
            .map(|ins| match ins {
                ElemInstr::Load {
                    input,
                    index: Index::Same,
                } => Some(*input),
                _ => None,
            })
            .collect();
        Some(Typed {
            program,
            types,
            direct,
        })
    }

    fn out_type(&self, j: usize) -> DType {
        self.types[self.program.outputs[j] as usize]
    }
}

/// One register's values over a chunk.
enum Col {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

impl Col {
    fn new(dtype: DType) -> Col {
        match dtype {
            // bf16 registers hold f32 values rounded to bf16.
            DType::F32 | DType::Bf16 => Col::F32(vec![0.0; CHUNK]),
            DType::F64 => Col::F64(vec![0.0; CHUNK]),
            DType::I32 => Col::I32(vec![0; CHUNK]),
            DType::Bool => Col::Bool(vec![false; CHUNK]),
        }
    }
}

/// Element types a column and a buffer can hold.
trait ColElem: Element {
    fn col(c: &Col) -> &[Self];
    fn col_mut(c: &mut Col) -> &mut [Self];
}

macro_rules! col_elem {
    ($T:ty, $V:ident) => {
        impl ColElem for $T {
            fn col(c: &Col) -> &[Self] {
                match c {
                    Col::$V(v) => v,
                    _ => unreachable!("register type checked when the program was typed"),
                }
            }
            fn col_mut(c: &mut Col) -> &mut [Self] {
                match c {
                    Col::$V(v) => v,
                    _ => unreachable!("register type checked when the program was typed"),
                }
            }
        }
    };
}
col_elem!(f32, F32);
col_elem!(f64, F64);
col_elem!(i32, I32);
col_elem!(bool, Bool);

/// As `any_dtype`, for float registers.
macro_rules! with_float {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::Bf16 => {
                type $T = f32;
                $body
            }
            _ => unreachable!("a float register (checked when the program was typed)"),
        }
    };
}

/// `out[j] = src[index.map(start + j)]` for `j < out.len()`.
#[inline(always)]
fn load<T: Copy>(src: &[T], index: &Index, start: usize, out: &mut [T]) {
    match index {
        Index::Same => out.copy_from_slice(&src[start..start + out.len()]),
        Index::Broadcast { shape, strides } => {
            // Walk the multi-index of `start..` in runs along the last axis.
            let r = shape.len();
            if r == 0 {
                out.fill(src[0]);
                return;
            }
            let mut idx = vec![0usize; r];
            let mut rest = start;
            let mut at = 0usize;
            for a in (0..r).rev() {
                let d = shape[a] as usize;
                idx[a] = rest % d;
                rest /= d;
                at += idx[a] * strides[a] as usize;
            }
            let (last, step) = (shape[r - 1] as usize, strides[r - 1] as usize);
            let mut j = 0;
            while j < out.len() {
                let run = (last - idx[r - 1]).min(out.len() - j);
                if step == 0 {
                    out[j..j + run].fill(src[at]);
                } else if step == 1 {
                    out[j..j + run].copy_from_slice(&src[at..at + run]);
                } else {
                    for (k, o) in out[j..j + run].iter_mut().enumerate() {
                        *o = src[at + k * step];
                    }
                }
                j += run;
                // Advance to the start of the next run.
                at += run * step;
                idx[r - 1] += run;
                let mut a = r - 1;
                while idx[a] == shape[a] as usize && a > 0 {
                    at -= shape[a] as usize * strides[a] as usize;
                    idx[a] = 0;
                    a -= 1;
                    idx[a] += 1;
                    at += strides[a] as usize;
                }
            }
        }
    }
}

#[inline(always)]
fn unary_into<T: ExpSlice>(op: UnaryOp, x: &[T], out: &mut [T]) {
    if exp_family_into(op, x, out) {
        return;
    }
    specialised!(
        op,
        UnaryOp,
        [Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Sigmoid, Silu, Abs, Sign, Recip, Sin, Cos],
        |OP| for (o, &v) in out.iter_mut().zip(x) {
            *o = OP.apply(v);
        }
    )
}

#[inline(always)]
fn binary_into<T: Float>(op: BinaryOp, a: &[T], b: &[T], out: &mut [T]) {
    specialised!(
        op,
        BinaryOp,
        [Add, Sub, Mul, Div, Max, Min, Pow],
        |OP| for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = OP.apply(x, y);
        }
    )
}

/// The registers of one chunk of a program.
struct Regs {
    cols: Vec<Col>,
    /// Per register (or empty): the output buffer its instruction writes
    /// straight into, at the chunk's own range, instead of its column.
    sink: Vec<Option<Shared<u8>>>,
}

impl Regs {
    fn new(p: &Typed) -> Regs {
        let mut cols: Vec<Col> = p.types.iter().map(|&t| Col::new(t)).collect();
        // Constants are the same in every chunk: written once.
        for (i, ins) in p.program.instrs.iter().enumerate() {
            if let ElemInstr::Const(bits) = ins {
                let v = f64::from_bits(*bits);
                any_dtype!(p.types[i], |T| T::col_mut(&mut cols[i])
                    .fill(T::from_f64_as(v)));
                if p.types[i] == DType::Bf16 {
                    round_bf16_slice(f32::col_mut(&mut cols[i]));
                }
            }
        }
        Regs { cols, sink: vec![] }
    }

    /// Evaluates every instruction over elements `start..start + len`,
    /// input slot s read from `src[s]`: compiled for the CPU's widest vector
    /// unit as well as for the baseline, and run in the former where the
    /// CPU has it. Every operation is an IEEE one (or a libm call) whose
    /// result does not depend on the vector width, and no multiply-add is
    /// contracted, so the two give the same bits.
    fn run(&mut self, p: &Typed, src: &[&Buffer], start: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        match crate::cpu::simd_level() {
            // SAFETY: the level's features were detected on this CPU.
            crate::cpu::SimdLevel::Avx512 => unsafe { self.run_avx512(p, src, start, len) },
            crate::cpu::SimdLevel::Avx2 => unsafe { self.run_avx2(p, src, start, len) },
            crate::cpu::SimdLevel::Baseline => self.run_body(p, src, start, len),
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.run_body(p, src, start, len)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
    unsafe fn run_avx512(&mut self, p: &Typed, src: &[&Buffer], start: usize, len: usize) {
        self.run_body(p, src, start, len)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&mut self, p: &Typed, src: &[&Buffer], start: usize, len: usize) {
        self.run_body(p, src, start, len)
    }

    #[inline(always)]
    fn run_body(&mut self, p: &Typed, src: &[&Buffer], start: usize, len: usize) {
        let sink = &self.sink[..];
        for (i, ins) in p.program.instrs.iter().enumerate() {
            let (prev, rest) = self.cols.split_at_mut(i);
            let out = &mut rest[0];
            let to = sink.get(i).copied().flatten();
            let t = p.types[i];
            match ins {
                ElemInstr::Const(_) => {}
                // Read in place by the instructions that use it.
                ElemInstr::Load { .. } if p.direct[i].is_some() => {}
                ElemInstr::Load { input, index } => any_dtype!(t, |T| load(
                    T::view(src[*input as usize]).expect("input type checked"),
                    index,
                    start,
                    dest::<T>(out, to, start, len),
                )),
                ElemInstr::Unary(op, a) => with_float!(t, |T| unary_into(
                    *op,
                    reg::<T>(p, prev, sink, src, *a, start, len),
                    dest::<T>(out, to, start, len)
                )),
                ElemInstr::Binary(op, a, b) => with_float!(t, |T| binary_into(
                    *op,
                    reg::<T>(p, prev, sink, src, *a, start, len),
                    reg::<T>(p, prev, sink, src, *b, start, len),
                    dest::<T>(out, to, start, len)
                )),
                ElemInstr::Compare(op, a, b) => {
                    let o = dest::<bool>(out, to, start, len);
                    any_dtype!(p.types[*a as usize], |T| {
                        let (x, y) = (
                            reg::<T>(p, prev, sink, src, *a, start, len),
                            reg::<T>(p, prev, sink, src, *b, start, len),
                        );
                        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                            *o = op.apply(x, y);
                        }
                    })
                }
                ElemInstr::Select(c, a, b) => any_dtype!(t, |T| {
                    let cond = reg::<bool>(p, prev, sink, src, *c, start, len);
                    let (x, y) = (
                        reg::<T>(p, prev, sink, src, *a, start, len),
                        reg::<T>(p, prev, sink, src, *b, start, len),
                    );
                    for (((o, &c), &x), &y) in dest::<T>(out, to, start, len)
                        .iter_mut()
                        .zip(cond)
                        .zip(x)
                        .zip(y)
                    {
                        *o = if c { x } else { y };
                    }
                }),
                ElemInstr::Clamp(a, lo, hi) => with_float!(t, |T| {
                    let lo = T::from_f64_as(f64::from_bits(*lo));
                    let hi = T::from_f64_as(f64::from_bits(*hi));
                    let x = reg::<T>(p, prev, sink, src, *a, start, len);
                    for (o, &v) in dest::<T>(out, to, start, len).iter_mut().zip(x) {
                        *o = clamp_value(v, lo, hi);
                    }
                }),
                ElemInstr::Cast(_, a) => any_dtype!(p.types[*a as usize], |S| {
                    let x = reg::<S>(p, prev, sink, src, *a, start, len);
                    any_dtype!(t, |D| {
                        for (o, &v) in dest::<D>(out, to, start, len).iter_mut().zip(x) {
                            *o = D::from_f64_as(v.to_f64_exact());
                        }
                    })
                }),
            }
            // A bf16 value is computed in f32 and rounded (loads and
            // constants already are).
            if t == DType::Bf16 && !matches!(ins, ElemInstr::Load { .. } | ElemInstr::Const(_)) {
                round_bf16_slice(dest::<f32>(out, to, start, len));
            }
        }
    }
}

/// Register `r` over elements `start..start + len`: its column, or for a
/// load of an input at the kernel's own index, that input's elements in
/// place.
#[inline(always)]
fn reg<'a, T: ColElem>(
    p: &Typed<'_>,
    cols: &'a [Col],
    sink: &[Option<Shared<u8>>],
    src: &[&'a Buffer],
    r: u32,
    start: usize,
    len: usize,
) -> &'a [T] {
    match (
        p.direct[r as usize],
        sink.get(r as usize).copied().flatten(),
    ) {
        (Some(s), _) => &T::view(src[s as usize]).expect("input type checked")[start..start + len],
        // SAFETY: as in `dest`, which wrote these elements earlier in this
        // chunk; nothing writes them while the slice is read.
        (None, Some(ptr)) => unsafe {
            std::slice::from_raw_parts((ptr.0 as *const T).add(start), len)
        },
        (None, None) => &T::col(&cols[r as usize])[..len],
    }
}

/// Where an instruction writes its values over `start..start + len`: its
/// column, or the output buffer it is sunk into.
#[inline(always)]
fn dest<T: ColElem>(col: &mut Col, to: Option<Shared<u8>>, start: usize, len: usize) -> &mut [T] {
    match to {
        // SAFETY: `to` points at an output buffer of `T` with room for the
        // kernel's n elements (`run_elementwise`); the chunk's range
        // start..start+len is written by this task only, and no other
        // register aliases it.
        Some(ptr) => unsafe { std::slice::from_raw_parts_mut((ptr.0 as *mut T).add(start), len) },
        None => &mut T::col_mut(col)[..len],
    }
}

/// A raw pointer that may cross threads: the tasks that hold copies write
/// disjoint ranges of the buffer it points into.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: only used to write disjoint element ranges from parallel tasks,
// while the owning buffers outlive the parallel loop.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Splits `0..n` into tasks of about `grain` elements (a multiple of
/// [`CHUNK`]), run in parallel when `n` is large, and calls
/// `f(regs, start, len)` per chunk with registers made by `init` once per
/// worker.
fn for_each_chunk<R, I, F>(n: usize, init: I, f: F)
where
    I: Fn() -> R + Sync + Send,
    F: Fn(&mut R, usize, usize) + Sync + Send,
{
    let per_task = PAR_GRAIN.div_ceil(CHUNK).max(1) * CHUNK;
    let task = |regs: &mut R, t: usize| {
        let end = ((t + 1) * per_task).min(n);
        let mut s = t * per_task;
        while s < end {
            let len = CHUNK.min(end - s);
            f(regs, s, len);
            s += len;
        }
    };
    let tasks = n.div_ceil(per_task);
    if n >= PAR_MIN_ELEMS && tasks > 1 {
        (0..tasks).into_par_iter().for_each_init(&init, task);
    } else {
        let mut regs = init();
        for t in 0..tasks {
            task(&mut regs, t);
        }
    }
}

/// Evaluates `p` over `n` elements into one new buffer per output.
fn run_elementwise(p: &Typed, src: &[&Buffer], n: usize) -> Vec<Buffer> {
    // Outputs are written chunk by chunk, every element once: allocated,
    // not zeroed.
    let mut outs: Vec<Buffer> = (0..p.program.outputs.len())
        .map(|j| any_dtype!(p.out_type(j), |T| T::into_buffer(Vec::with_capacity(n))))
        .collect();
    let ptrs: Vec<Shared<u8>> = outs.iter_mut().map(buffer_ptr).collect();
    // A computed register that is an output is written straight into its
    // (first) output buffer; loads read in place and constants are copied.
    let mut sink: Vec<Option<Shared<u8>>> = vec![None; p.program.instrs.len()];
    let mut sunk = vec![false; p.program.outputs.len()];
    for (j, &r) in p.program.outputs.iter().enumerate() {
        let r = r as usize;
        let computed = !matches!(p.program.instrs[r], ElemInstr::Const(_)) && p.direct[r].is_none();
        if computed && sink[r].is_none() {
            sink[r] = Some(ptrs[j]);
            sunk[j] = true;
        }
    }
    for_each_chunk(
        n,
        || Regs {
            sink: sink.clone(),
            ..Regs::new(p)
        },
        |regs, start, len| {
            regs.run(p, src, start, len);
            for (j, &r) in p.program.outputs.iter().enumerate() {
                if sunk[j] {
                    continue;
                }
                any_dtype!(p.types[r as usize], |T| {
                    let col = reg::<T>(p, &regs.cols, &regs.sink, src, r, start, len);
                    // SAFETY: output j has room for n elements of T (made
                    // above); this chunk's range start..start+len is written
                    // by this call only.
                    unsafe {
                        let dst = (ptrs[j].0 as *mut T).add(start);
                        std::ptr::copy_nonoverlapping(col.as_ptr(), dst, len);
                    }
                });
            }
        },
    );
    for b in &mut outs {
        // SAFETY: the chunks of `for_each_chunk` cover 0..n, and each wrote
        // its range of every output above.
        unsafe {
            match b {
                Buffer::F32(v) | Buffer::Bf16(v) => v.set_len(n),
                Buffer::F64(v) => v.set_len(n),
                Buffer::I32(v) => v.set_len(n),
                Buffer::Bool(v) => v.set_len(n),
            }
        }
    }
    outs
}

fn buffer_ptr(b: &mut Buffer) -> Shared<u8> {
    Shared(match b {
        Buffer::F32(v) | Buffer::Bf16(v) => v.as_mut_ptr() as *mut u8,
        Buffer::F64(v) => v.as_mut_ptr() as *mut u8,
        Buffer::I32(v) => v.as_mut_ptr() as *mut u8,
        Buffer::Bool(v) => v.as_mut_ptr() as *mut u8,
    })
}

/// A reduction's operand as the node executor sees it: the row-major
/// operand's axes (extent, whether reduced) in order, extent-1 axes left
/// out, recovered from the layout's strides.
fn operand_axes(layout: &ReduceLayout) -> Vec<(usize, bool)> {
    let mut axes: Vec<(usize, usize, bool)> = layout
        .out_shape
        .iter()
        .zip(&layout.out_strides)
        .map(|(&d, &s)| (d as usize, s as usize, false))
        .chain(
            layout
                .red_shape
                .iter()
                .zip(&layout.red_strides)
                .map(|(&d, &s)| (d as usize, s as usize, true)),
        )
        .filter(|a| a.0 != 1)
        .collect();
    axes.sort_by_key(|a| std::cmp::Reverse(a.1));
    axes.into_iter().map(|(d, _, r)| (d, r)).collect()
}

/// The reduction of the prologue's values: each output folded over its
/// reduced elements in row-major order from the identity, as
/// `cpu::reduce::reduce` folds (so the two agree bit for bit), the
/// prologue evaluated chunk by chunk and never stored whole.
fn run_reduce<T: Float + ColElem>(
    kind: ReduceKind,
    layout: &ReduceLayout,
    p: &Typed,
    src: &[&Buffer],
) -> Vec<T> {
    let (n_out, n_red) = (layout.out_numel(), layout.red_numel());
    let identity = match kind {
        ReduceKind::Sum | ReduceKind::Mean => T::zero(),
        ReduceKind::Max => T::neg_infinity(),
    };
    let combine = |a: T, b: T| match kind {
        ReduceKind::Sum | ReduceKind::Mean => a + b,
        ReduceKind::Max => BinaryOp::Max.apply(a, b),
    };
    let mut out = vec![identity; n_out];
    if n_out > 0 && n_red > 0 {
        let axes = operand_axes(layout);
        // The operand as [outer kept, rest]: outputs are independent across
        // the leading kept block, which is what runs in parallel.
        let lead = axes
            .iter()
            .take_while(|a| !a.1)
            .map(|a| a.0)
            .product::<usize>();
        let rest_axes = &axes[axes.iter().take_while(|a| !a.1).count()..];
        let rest_in: usize = rest_axes.iter().map(|a| a.0).product();
        let rest_out = n_out / lead.max(1);
        // Within one leading slice: output offset of operand element i as a
        // broadcast index (strides 0 on the reduced axes).
        let out_index = {
            let mut strides = vec![0u32; rest_axes.len()];
            let mut s = 1u32;
            for (a, &(d, red)) in rest_axes.iter().enumerate().rev() {
                if !red {
                    strides[a] = s;
                    s *= d as u32;
                }
            }
            let shape: Vec<u32> = rest_axes.iter().map(|a| a.0 as u32).collect();
            Index::Broadcast { shape, strides }
        };
        // Rows: the reduced block is trailing and contiguous.
        let rows = rest_axes.iter().all(|a| a.1);
        let slice = |regs: &mut (Regs, Vec<u32>), l: usize, acc: &mut [T]| {
            let (regs, at) = regs;
            let base = l * rest_in;
            let mut s = 0;
            while s < rest_in {
                let len = CHUNK.min(rest_in - s);
                regs.run(p, src, base + s, len);
                let v = reg::<T>(
                    p,
                    &regs.cols,
                    &regs.sink,
                    src,
                    p.program.outputs[0],
                    base + s,
                    len,
                );
                if rows {
                    // Only one output per slice (rest_out == 1).
                    acc[0] = v.iter().fold(acc[0], |a, &x| combine(a, x));
                } else {
                    let ids: Vec<u32> = (0..rest_out as u32).collect();
                    load(&ids, &out_index, s, &mut at[..len]);
                    for (&o, &x) in at[..len].iter().zip(v) {
                        acc[o as usize] = combine(acc[o as usize], x);
                    }
                }
                s += len;
            }
        };
        let init = || (Regs::new(p), vec![0u32; CHUNK]);
        if n_red * n_out >= PAR_MIN_ELEMS && lead > 1 {
            let per_task = PAR_GRAIN.div_ceil(rest_in).max(1) * rest_out;
            out.par_chunks_mut(per_task)
                .enumerate()
                .for_each_init(init, |regs, (t, part)| {
                    let l0 = t * per_task / rest_out;
                    for (k, acc) in part.chunks_mut(rest_out).enumerate() {
                        slice(regs, l0 + k, acc);
                    }
                });
        } else {
            let mut regs = init();
            for (l, acc) in out.chunks_mut(rest_out).enumerate() {
                slice(&mut regs, l, acc);
            }
        }
    }
    if kind == ReduceKind::Mean {
        let n = T::from_f64_as(n_red as f64);
        for v in &mut out {
            *v = *v / n;
        }
    }
    out
}

/// What the fused executor runs for one kernel, prepared once per program.
enum Step<'p> {
    Elementwise {
        program: Typed<'p>,
        numel: usize,
        inputs: &'p [NodeId],
        outputs: &'p [NodeId],
    },
    Reduce {
        kind: ReduceKind,
        layout: &'p ReduceLayout,
        prologue: Typed<'p>,
        prologue_inputs: &'p [NodeId],
        epilogue: Typed<'p>,
        epilogue_inputs: &'p [NodeId],
        outputs: &'p [NodeId],
    },
    Optimiser {
        numel: usize,
        prologue: Typed<'p>,
        prologue_inputs: &'p [NodeId],
        /// The `optim_step` nodes, each with its operands (θ, g, state…):
        /// `g` is replaced by the prologue's value.
        nodes: Vec<NodeId>,
        gradient: Option<NodeId>,
    },
    /// A product read with transposed operands.
    MatMul {
        id: NodeId,
        a: NodeId,
        b: NodeId,
        trans: [bool; 2],
    },
    /// The attention gradients asked for, from one pass over the heads.
    AttentionGrads {
        inputs: &'p [NodeId; 5],
        grads: &'p [(AttentionOperand, NodeId)],
    },
    /// Nodes computed one by one by the node executor's code.
    Nodes(Vec<NodeId>),
}

/// A program's fused kernels, prepared for the CPU: register types, and
/// the kernel after which each value is dropped.
pub struct FusedPlan<'p> {
    graph: &'p Graph,
    steps: Vec<Step<'p>>,
    /// Per step: the values dropped after it — roots whose last read (or
    /// whose aliases' last read) it is, and the copies of aliases read for
    /// the last time (see [`Relabel::Alias`]). Graph outputs are kept.
    drops: Vec<Vec<NodeId>>,
    /// One past the largest node index.
    bound: usize,
    /// Node index → the node whose buffer holds its values: itself, or for
    /// an aliased relabeling the root of its operand.
    root: Vec<NodeId>,
    /// What each relabeling (reshape, stop-gradient, barrier) does.
    relabel: HashMap<NodeId, Relabel>,
    outputs: Vec<NodeId>,
}

/// How a relabeling (`reshape`, `stop_gradient`, `barrier`: the same
/// elements under another type) gets its buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Relabel {
    /// Its operand's buffer dies here: taken over.
    Move,
    /// Its operand's buffer lives on: read in place (the root's lifetime
    /// is extended to the alias's last read). Kernels that take only
    /// buffers read it as it is; a node whose code reads its operands'
    /// shapes gets a copy made on its first such read.
    Alias,
    /// A graph output whose operand lives on: copied.
    Copy,
}

fn is_relabel(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. } | Op::StopGradient | Op::Barrier { .. }
    )
}

impl<'p> FusedPlan<'p> {
    /// Prepares `program`'s fused kernels, or says why they cannot run as
    /// such on the CPU (the caller then runs the program node by node).
    pub fn new(program: &'p Program) -> Result<FusedPlan<'p>, String> {
        FusedPlan::for_schedule(&program.graph, &program.fused)
    }

    /// As [`FusedPlan::new`], for a graph and a fusion of its schedule.
    pub fn for_schedule(g: &'p Graph, fused: &'p FusedSchedule) -> Result<FusedPlan<'p>, String> {
        let dtypes = |ids: &[NodeId]| ids.iter().map(|&i| g.ty(i).dtype).collect::<Vec<_>>();
        fn typed<'p>(
            p: &'p ElemProgram,
            ins: &[DType],
            outs: &[DType],
        ) -> Result<Typed<'p>, String> {
            Typed::new(p, ins, outs).ok_or_else(|| {
                "an elementwise program on element types the CPU executor does not define".into()
            })
        }
        let mut steps = Vec::with_capacity(fused.kernels.len());
        for k in &fused.kernels {
            steps.push(match k {
                Kernel::Elementwise {
                    program,
                    numel,
                    inputs,
                    outputs,
                } => Step::Elementwise {
                    program: typed(program, &dtypes(inputs), &dtypes(outputs))?,
                    numel: *numel,
                    inputs,
                    outputs,
                },
                Kernel::Reduce {
                    kind,
                    layout,
                    prologue,
                    prologue_inputs,
                    epilogue,
                    epilogue_inputs,
                    outputs,
                    ..
                } => {
                    // The reduced value has the type of epilogue slot 0.
                    let red = g.ty(epilogue_inputs[0]).dtype;
                    if !red.is_float() {
                        return Err(format!("a reduction of {red} values"));
                    }
                    Step::Reduce {
                        kind: *kind,
                        layout,
                        prologue: typed(prologue, &dtypes(prologue_inputs), &[red])?,
                        prologue_inputs,
                        epilogue: typed(epilogue, &dtypes(epilogue_inputs), &dtypes(outputs))?,
                        epilogue_inputs,
                        outputs,
                    }
                }
                Kernel::OptimStep {
                    numel,
                    prologue,
                    prologue_inputs,
                    state,
                    outputs,
                    gradient,
                    ..
                } => {
                    let t = g.ty(state[0]).dtype;
                    Step::Optimiser {
                        numel: *numel,
                        prologue: typed(prologue, &dtypes(prologue_inputs), &[t])?,
                        prologue_inputs,
                        nodes: outputs.iter().map(|o| o.1).collect(),
                        gradient: *gradient,
                    }
                }
                Kernel::MatMul {
                    id,
                    a,
                    b,
                    trans_a,
                    trans_b,
                } => Step::MatMul {
                    id: *id,
                    a: *a,
                    b: *b,
                    trans: [*trans_a, *trans_b],
                },
                Kernel::LinearLogprob { id, .. } | Kernel::Attention { id, .. } => {
                    if !matches!(g.op(*id), Op::LinearLogprob | Op::CausalAttention) {
                        return Err(format!(
                            "node %{} ({}) stands for a matched subgraph",
                            id.index(),
                            g.op(*id).name()
                        ));
                    }
                    Step::Nodes(vec![*id])
                }
                Kernel::AttentionGrads { inputs, grads, .. } => {
                    Step::AttentionGrads { inputs, grads }
                }
                Kernel::LogprobGrads { grads, .. } => {
                    Step::Nodes(grads.iter().map(|x| x.1).collect())
                }
                Kernel::Node(id) => Step::Nodes(vec![*id]),
            });
        }
        let bound = g.node_ids().map(|id| id.index() + 1).max().unwrap_or(0);
        let mut own = vec![usize::MAX; bound];
        for (s, step) in steps.iter().enumerate() {
            for r in step_reads(step, g) {
                own[r.index()] = s;
            }
        }
        let outputs: Vec<NodeId> = g.outputs().iter().map(|&(_, id)| id).collect();
        let mut is_output = vec![false; bound];
        for o in &outputs {
            own[o.index()] = usize::MAX;
            is_output[o.index()] = true;
        }
        // Relabelings in step order: each takes over, aliases or copies its
        // operand's root buffer, and an alias keeps its root alive until the
        // alias's own last read.
        let mut last_use = own.clone();
        let mut root: Vec<NodeId> = (0..bound).map(NodeId::new).collect();
        let mut relabel = HashMap::new();
        for (s, step) in steps.iter().enumerate() {
            let Step::Nodes(ids) = step else { continue };
            for &id in ids.iter().filter(|&&id| is_relabel(g.op(id))) {
                let ro = root[g.inputs(id)[0].index()];
                let dies = last_use[ro.index()] == s && !is_output[ro.index()];
                let how = if dies {
                    Relabel::Move
                } else if is_output[id.index()] {
                    Relabel::Copy
                } else {
                    root[id.index()] = ro;
                    if own[id.index()] != usize::MAX {
                        let l = &mut last_use[ro.index()];
                        *l = (*l).max(own[id.index()]);
                    }
                    Relabel::Alias
                };
                relabel.insert(id, how);
            }
        }
        let drops = steps
            .iter()
            .enumerate()
            .map(|(s, step)| {
                let mut d: Vec<NodeId> = vec![];
                for r in step_reads(step, g) {
                    let ro = root[r.index()];
                    if last_use[ro.index()] == s {
                        d.push(ro);
                    }
                    if ro != r && own[r.index()] == s {
                        d.push(r);
                    }
                }
                d.sort_unstable();
                d.dedup();
                d
            })
            .collect();
        Ok(FusedPlan {
            graph: g,
            steps,
            drops,
            bound,
            root,
            relabel,
            outputs,
        })
    }

    /// How many relabelings take over their operand's buffer, read it in
    /// place, and copy it (graph outputs), in that order.
    pub fn relabel_counts(&self) -> [usize; 3] {
        let count = |how| self.relabel.values().filter(|&&h| h == how).count();
        [
            count(Relabel::Move),
            count(Relabel::Alias),
            count(Relabel::Copy),
        ]
    }

    /// Runs the program this plan was made from on `inputs` and returns its
    /// outputs by name.
    pub fn run<I: Inputs + ?Sized>(
        &self,
        inputs: &I,
    ) -> Result<Vec<(String, HostTensor)>, ExecError> {
        let g = self.graph;
        let profile_mode = std::env::var("COOPC_PROFILE").ok();
        let by_shape = profile_mode.as_deref() == Some("shapes");
        let mut profile: Option<HashMap<String, (usize, f64, usize)>> =
            profile_mode.map(|_| HashMap::new());
        let mut values: Vec<Option<Cow<'_, HostTensor>>> = (0..self.bound).map(|_| None).collect();
        for (s, step) in self.steps.iter().enumerate() {
            let t0 = profile.is_some().then(Instant::now);
            // A bf16 value is rounded where it is stored.
            let tensor = |id: NodeId, data: Buffer| {
                Cow::Owned(HostTensor {
                    shape: g.ty(id).shape.clone(),
                    data: data.stored_as(g.ty(id).dtype),
                })
            };
            let results: Vec<(NodeId, Cow<'_, HostTensor>)> = match step {
                Step::Elementwise {
                    program: p,
                    numel,
                    inputs: ins,
                    outputs,
                } => {
                    let src = self.buffers(&values, ins)?;
                    let outs = run_elementwise(p, &src, *numel);
                    outputs
                        .iter()
                        .zip(outs)
                        .map(|(&id, b)| (id, tensor(id, b)))
                        .collect()
                }
                Step::Reduce {
                    kind,
                    layout,
                    prologue,
                    prologue_inputs,
                    epilogue,
                    epilogue_inputs,
                    outputs,
                } => {
                    let src = self.buffers(&values, prologue_inputs)?;
                    let red_type = prologue.out_type(0);
                    let red = with_float!(red_type, |T| T::into_buffer(run_reduce::<T>(
                        *kind, layout, prologue, &src
                    )))
                    .stored_as(red_type);
                    let mut esrc = vec![&red];
                    esrc.extend(self.buffers(&values, &epilogue_inputs[1..])?);
                    let outs = run_elementwise(epilogue, &esrc, layout.out_numel());
                    outputs
                        .iter()
                        .zip(outs)
                        .map(|(&id, b)| (id, tensor(id, b)))
                        .collect()
                }
                Step::Optimiser {
                    numel,
                    prologue,
                    prologue_inputs,
                    nodes,
                    gradient,
                } => {
                    let src = self.buffers(&values, prologue_inputs)?;
                    let grad = run_elementwise(prologue, &src, *numel)
                        .pop()
                        .expect("one output");
                    let mut res = Vec::with_capacity(nodes.len() + 1);
                    for &id in nodes {
                        let Op::OptimStep { rule, out } = g.op(id) else {
                            unreachable!("an optimiser step kernel writes optim_step nodes")
                        };
                        // θ, the gradient (the prologue's), the state.
                        let mut ins = g.inputs(id);
                        ins.remove(1);
                        let mut ops = self.buffers(&values, &ins)?;
                        ops.insert(1, &grad);
                        let data = with_float!(g.ty(id).dtype, |T| {
                            let ops = ops
                                .iter()
                                .map(|b| T::view(b).ok_or_else(|| mismatch(g, id)))
                                .collect::<Result<Vec<&[T]>, _>>()?;
                            T::into_buffer(optim::step(*rule, *out, &ops))
                        });
                        res.push((id, tensor(id, data)));
                    }
                    if let Some(id) = gradient {
                        res.push((*id, tensor(*id, grad)));
                    }
                    res
                }
                Step::MatMul { id, a, b, trans } => {
                    let args = [self.value(&values, *a)?, self.value(&values, *b)?];
                    let t = matmul_transposed(g, *id, &args, trans[0], trans[1])?;
                    vec![(*id, Cow::Owned(t))]
                }
                Step::AttentionGrads { inputs: ins, grads } => {
                    self.own_buffers(&mut values, &ins[..])?;
                    let args = ins
                        .iter()
                        .map(|&id| self.shaped(&values, id))
                        .collect::<Result<Vec<_>, _>>()?;
                    let dims = attention::Dims::of(&args[0].shape, &args[1].shape);
                    let which = [
                        AttentionOperand::Q,
                        AttentionOperand::K,
                        AttentionOperand::V,
                    ];
                    let wanted = which.map(|w| grads.iter().any(|x| x.0 == w));
                    let bufs: Vec<Buffer> = with_float!(g.ty(ins[0]).dtype, |T| {
                        let ops = args
                            .iter()
                            .map(|t| T::view(&t.data).ok_or_else(|| mismatch(g, grads[0].1)))
                            .collect::<Result<Vec<&[T]>, _>>()?;
                        let ops = [ops[0], ops[1], ops[2], ops[3], ops[4]];
                        attention::grads(&dims, wanted, ops)
                            .into_iter()
                            .map(|x| T::into_buffer(x.unwrap_or_default()))
                            .collect()
                    });
                    let mut bufs: Vec<Option<Buffer>> = bufs.into_iter().map(Some).collect();
                    let mut res: Vec<(NodeId, Cow<'_, HostTensor>)> = Vec::new();
                    for &(w, id) in grads.iter() {
                        let i = which.iter().position(|&x| x == w).expect("q, k or v");
                        let b = match bufs[i].take() {
                            Some(b) => b,
                            // A second node asking for the same gradient.
                            None => res
                                .iter()
                                .find(|r| grads.iter().any(|x| x.1 == r.0 && x.0 == w))
                                .map(|r| r.1.data.clone())
                                .expect("taken by an earlier node"),
                        };
                        res.push((id, tensor(id, b)));
                    }
                    res
                }
                Step::Nodes(ids) => {
                    let mut res = Vec::with_capacity(ids.len());
                    for &id in ids {
                        let relabel = self.relabel.get(&id).copied();
                        let v = match (g.op(id), relabel) {
                            (Op::Input { .. }, _) => Cow::Borrowed(bind_input(g, id, inputs)?),
                            (_, Some(Relabel::Alias)) => continue,
                            (_, Some(how)) => {
                                let ro = self.root[g.inputs(id)[0].index()];
                                let mut t = match how {
                                    Relabel::Move => values[ro.index()]
                                        .take()
                                        .ok_or_else(|| missing_operand(g, ro))?
                                        .into_owned(),
                                    _ => self.value(&values, ro)?.clone(),
                                };
                                t.shape = g.ty(id).shape.clone();
                                Cow::Owned(t)
                            }
                            _ => {
                                self.own_buffers(&mut values, &g.inputs(id))?;
                                let args = g
                                    .inputs(id)
                                    .iter()
                                    .map(|&o| self.shaped(&values, o))
                                    .collect::<Result<Vec<_>, _>>()?;
                                Cow::Owned(eval_node(g, id, &args)?)
                            }
                        };
                        res.push((id, v));
                    }
                    res
                }
            };
            if let (Some(p), Some(t0)) = (profile.as_mut(), t0) {
                let key = match step {
                    Step::Elementwise { program, numel, .. } if by_shape => format!(
                        "fused elementwise {numel} × {} instrs",
                        program.program.instrs.len()
                    ),
                    Step::Elementwise { .. } => "fused elementwise".to_string(),
                    Step::Reduce { .. } => "fused reduce".to_string(),
                    Step::Optimiser { .. } => "optim_step (fused gradient)".to_string(),
                    Step::MatMul { id, trans, .. } => profile_key(g, *id, *trans, by_shape),
                    Step::AttentionGrads { .. } => "causal_attention_grad (shared)".to_string(),
                    Step::Nodes(ids) => profile_key(g, ids[0], [false, false], by_shape),
                };
                let e = p.entry(key).or_default();
                e.0 += 1;
                e.1 += t0.elapsed().as_secs_f64();
                e.2 += results.iter().map(|r| r.1.numel()).sum::<usize>();
            }
            for (id, v) in results {
                values[id.index()] = Some(v);
            }
            // Drop what no later step reads.
            for r in &self.drops[s] {
                values[r.index()] = None;
            }
        }
        if let Some(p) = profile {
            print_profile(p);
        }
        // Hand out the outputs, moving each value on its last mention.
        let mut left: HashMap<NodeId, usize> = HashMap::new();
        for &id in &self.outputs {
            *left.entry(id).or_default() += 1;
        }
        let mut out = Vec::with_capacity(self.outputs.len());
        for (name, id) in g.outputs() {
            let n = left.get_mut(id).expect("counted above");
            *n -= 1;
            let slot = &mut values[id.index()];
            let t = if *n == 0 {
                slot.take().map(Cow::into_owned)
            } else {
                slot.as_deref().cloned()
            };
            out.push((name.clone(), t.ok_or_else(|| missing_operand(g, *id))?));
        }
        Ok(out)
    }
}

type Values<'i> = Vec<Option<Cow<'i, HostTensor>>>;

impl FusedPlan<'_> {
    /// The buffer holding `id`'s values (its root's, for an alias), which
    /// an earlier step computed.
    fn value<'v>(&self, values: &'v Values<'_>, id: NodeId) -> Result<&'v HostTensor, ExecError> {
        let ro = self.root[id.index()];
        values[ro.index()]
            .as_deref()
            .ok_or_else(|| missing_operand(self.graph, id))
    }

    /// The buffers of `ids`, in order.
    fn buffers<'v>(
        &self,
        values: &'v Values<'_>,
        ids: &[NodeId],
    ) -> Result<Vec<&'v Buffer>, ExecError> {
        ids.iter()
            .map(|&id| self.value(values, id).map(|t| &t.data))
            .collect()
    }

    /// Gives each alias among `ids` a tensor of its own type (a copy of its
    /// root's elements), for code that reads its operands' shapes.
    fn own_buffers(&self, values: &mut Values<'_>, ids: &[NodeId]) -> Result<(), ExecError> {
        for &id in ids {
            let ro = self.root[id.index()];
            if ro != id && values[id.index()].is_none() {
                let mut t = self.value(values, ro)?.clone();
                t.shape = self.graph.ty(id).shape.clone();
                values[id.index()] = Some(Cow::Owned(t));
            }
        }
        Ok(())
    }

    /// `id`'s value with its own shape (after [`Self::own_buffers`]).
    fn shaped<'v>(&self, values: &'v Values<'_>, id: NodeId) -> Result<&'v HostTensor, ExecError> {
        match values[id.index()].as_deref() {
            Some(t) => Ok(t),
            None => self.value(values, id),
        }
    }
}

fn mismatch(g: &Graph, id: NodeId) -> ExecError {
    ExecError::Unsupported {
        node: id.index(),
        op: g.op(id).name(),
        message: "operands of different element types".into(),
    }
}

/// The values a step reads.
fn step_reads(step: &Step<'_>, g: &Graph) -> Vec<NodeId> {
    match step {
        Step::Elementwise { inputs, .. } => inputs.to_vec(),
        Step::Reduce {
            prologue_inputs,
            epilogue_inputs,
            ..
        } => prologue_inputs
            .iter()
            .chain(&epilogue_inputs[1..])
            .copied()
            .collect(),
        Step::Optimiser {
            prologue_inputs,
            nodes,
            ..
        } => prologue_inputs
            .iter()
            .copied()
            .chain(nodes.iter().flat_map(|&id| {
                let mut ins = g.inputs(id);
                ins.remove(1);
                ins
            }))
            .collect(),
        Step::MatMul { a, b, .. } => vec![*a, *b],
        Step::AttentionGrads { inputs, .. } => inputs.to_vec(),
        Step::Nodes(ids) => ids.iter().flat_map(|&id| g.inputs(id)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coopc_ir::CompareOp;

    /// A program with every kind of instruction and every unary, binary
    /// and comparison op, on f32 (with a bf16 and an f64 lane), over
    /// values that include NaN, ±∞, ±0 and subnormals.
    fn every_instruction() -> (ElemProgram, Vec<DType>, Vec<DType>) {
        let mut instrs = vec![
            ElemInstr::Load {
                input: 0,
                index: Index::Same,
            },
            ElemInstr::Load {
                input: 1,
                index: Index::Broadcast {
                    shape: vec![40, 37],
                    strides: vec![0, 1],
                },
            },
        ];
        let mut outputs = vec![];
        let push = |instrs: &mut Vec<ElemInstr>, ins: ElemInstr| {
            instrs.push(ins);
            (instrs.len() - 1) as u32
        };
        for op in UnaryOp::ALL {
            let r = push(&mut instrs, ElemInstr::Unary(op, 0));
            outputs.push(r);
        }
        for op in BinaryOp::ALL {
            let r = push(&mut instrs, ElemInstr::Binary(op, 0, 1));
            outputs.push(r);
        }
        let mut cmp = vec![];
        for op in CompareOp::ALL {
            let r = push(&mut instrs, ElemInstr::Compare(op, 0, 1));
            cmp.push(r);
            outputs.push(r);
        }
        let half = push(&mut instrs, ElemInstr::Const(0.5f64.to_bits()));
        let sel = push(&mut instrs, ElemInstr::Select(cmp[0], 0, half));
        let clamp = push(
            &mut instrs,
            ElemInstr::Clamp(1, (-0.75f64).to_bits(), 2.5f64.to_bits()),
        );
        let to_i32 = push(&mut instrs, ElemInstr::Cast(DType::I32, 0));
        let to_f64 = push(&mut instrs, ElemInstr::Cast(DType::F64, 1));
        let f64_exp = push(&mut instrs, ElemInstr::Unary(UnaryOp::Exp, to_f64));
        let to_bf16 = push(&mut instrs, ElemInstr::Cast(DType::Bf16, 0));
        let bf16_mul = push(
            &mut instrs,
            ElemInstr::Binary(BinaryOp::Mul, to_bf16, to_bf16),
        );
        outputs.extend([sel, clamp, to_i32, f64_exp, bf16_mul]);
        let p = ElemProgram {
            n_inputs: 2,
            instrs,
            outputs,
        };
        let inputs = vec![DType::F32, DType::F32];
        let types = p.register_types(&inputs, &[]).expect("typed");
        let out_types = p.outputs.iter().map(|&r| types[r as usize]).collect();
        (p, inputs, out_types)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE / 4.0,
            -1.0,
            1.0,
            88.5,
            -104.0,
        ];
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                if i % 7 == 0 {
                    special[(s as usize) % special.len()]
                } else {
                    (s as f32 / u32::MAX as f32 - 0.5) * 12.0
                }
            })
            .collect()
    }

    fn bits(b: &Buffer) -> Vec<u64> {
        match b {
            Buffer::F32(v) | Buffer::Bf16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
            Buffer::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
            Buffer::I32(v) => v.iter().map(|&x| x as u32 as u64).collect(),
            Buffer::Bool(v) => v.iter().map(|&x| x as u64).collect(),
        }
    }

    /// Every vector level this CPU has computes the same bits as the
    /// baseline build of the same program, chunk by chunk (a short last
    /// chunk included).
    #[test]
    fn every_vector_level_gives_the_baseline_bits() {
        let (p, inputs, outputs) = every_instruction();
        let typed = Typed::new(&p, &inputs, &outputs).expect("typed");
        let n = 40 * 37;
        let a = Buffer::F32(values(n, 1));
        let b = Buffer::F32(values(37, 2));
        let src = [&a, &b];
        type Run = fn(&mut Regs, &Typed, &[&Buffer], usize, usize);
        let baseline: Run = |r, p, s, at, len| r.run_body(p, s, at, len);
        let mut levels: Vec<(&str, Run)> =
            vec![("dispatched", |r, p, s, at, len| r.run(p, s, at, len))];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::{simd_level, SimdLevel};
            let level = simd_level();
            if level == SimdLevel::Avx512 {
                // SAFETY: AVX-512 was detected on this CPU.
                levels.push(("avx512", |r, p, s, at, len| unsafe {
                    r.run_avx512(p, s, at, len)
                }));
            }
            if level != SimdLevel::Baseline {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                levels.push(("avx2", |r, p, s, at, len| unsafe {
                    r.run_avx2(p, s, at, len)
                }));
            } else {
                eprintln!("no AVX2 here: only the baseline build runs");
            }
        }
        let run_all = |run: Run| -> Vec<Vec<u64>> {
            let mut regs = Regs::new(&typed);
            let mut outs: Vec<Vec<u64>> = vec![vec![]; p.outputs.len()];
            let mut start = 0;
            while start < n {
                let len = CHUNK.min(n - start);
                run(&mut regs, &typed, &src, start, len);
                for (j, &r) in p.outputs.iter().enumerate() {
                    let col = any_dtype!(typed.types[r as usize], |T| T::into_buffer(
                        reg::<T>(&typed, &regs.cols, &regs.sink, &src, r, start, len).to_vec()
                    ));
                    outs[j].extend(bits(&col));
                }
                start += len;
            }
            outs
        };
        let want = run_all(baseline);
        for (name, run) in levels {
            let got = run_all(run);
            for (j, (w, g)) in want.iter().zip(&got).enumerate() {
                let at = w.iter().zip(g).position(|(a, b)| a != b);
                assert!(
                    at.is_none() && w.len() == g.len(),
                    "{name}: output {j} ({:?}) differs at element {at:?}",
                    p.instrs[p.outputs[j] as usize]
                );
            }
        }
    }
}
