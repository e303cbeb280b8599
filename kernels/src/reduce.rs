//! The generated reduction kernels: the reduced elements of each output
//! element, each computed by the fused prologue program, are folded, then
//! the epilogue program runs on the result. Specialised at compile time by
//! [`ReduceSpec`]. Two shapes: one unit per output element
//! ([`reduce_program`], for many short reductions), or one cube per output
//! element whose units stride over the reduced elements and fold their
//! partial results in shared memory ([`reduce_program_rows`], for long
//! reductions such as a softmax over a vocabulary, or few outputs), as the
//! fuser chose (`coopc_ir::kernel::ReduceSplit`).

use crate::program::{expand_program, expand_stores, expand_strided_index};
use coopc_ir::kernel::{ElemProgram, ReduceLayout};
use coopc_ir::ReduceKind;
use cubecl::prelude::*;

/// Everything a reduction kernel is specialised on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReduceSpec {
    pub kind: ReduceKind,
    pub layout: ReduceLayout,
    pub prologue: ElemProgram,
    pub epilogue: ElemProgram,
}

#[allow(unused_variables)]
fn operand_at(inputs: &Sequence<Array<f32>>, o: usize, r: usize, spec: ReduceSpec) -> f32 {
    unimplemented!("device-only: expanded into the kernel")
}

mod operand_at {
    use super::*;

    /// The prologue's value at reduced element `r` of output element `o`.
    pub fn expand(
        scope: &mut Scope,
        inputs: SequenceExpand<Array<f32>>,
        o: NativeExpand<usize>,
        r: NativeExpand<usize>,
        spec: ReduceSpec,
    ) -> NativeExpand<f32> {
        let l = &spec.layout;
        let base = expand_strided_index(scope, o, &l.out_shape, &l.out_strides);
        let off = expand_strided_index(scope, r, &l.red_shape, &l.red_strides);
        let at = add_index::expand(scope, base, off);
        let ins: Vec<_> = inputs.iter_cloned().map(Some).collect();
        expand_program(scope, &spec.prologue, &at, &ins, &[]).remove(0)
    }
}

#[cube]
fn add_index(a: usize, b: usize) -> usize {
    a + b
}

#[cube]
fn combine(acc: f32, v: f32, #[comptime] max: bool) -> f32 {
    if max {
        select(acc.is_nan() || acc >= v, acc, v)
    } else {
        acc + v
    }
}

#[allow(unused_variables)]
fn finish(
    acc: f32,
    epilogue_inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    o: usize,
    spec: ReduceSpec,
) {
    unimplemented!("device-only: expanded into the kernel")
}

mod finish {
    use super::*;

    /// Runs the epilogue with the reduced value in slot 0 and stores.
    pub fn expand(
        scope: &mut Scope,
        acc: NativeExpand<f32>,
        epilogue_inputs: SequenceExpand<Array<f32>>,
        outputs: SequenceExpand<Array<f32>>,
        o: NativeExpand<usize>,
        spec: ReduceSpec,
    ) {
        let mut ins: Vec<_> = vec![None];
        ins.extend(epilogue_inputs.iter_cloned().map(Some));
        let outs: Vec<_> = outputs.iter_cloned().collect();
        let values = expand_program(scope, &spec.epilogue, &o, &ins, &[(0, acc)]);
        expand_stores(scope, &outs, &o, values);
    }
}

/// Output element `o < n_out` folds `n_red ≥ 1` prologue values.
#[cube(launch)]
pub fn reduce_program(
    prologue_inputs: &Sequence<Array<f32>>,
    epilogue_inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    n_out: u32,
    n_red: u32,
    #[comptime] spec: ReduceSpec,
) {
    let o = ABSOLUTE_POS;
    if o < n_out as usize {
        let max = comptime!(spec.kind == ReduceKind::Max);
        let mean = comptime!(spec.kind == ReduceKind::Mean);
        let mut acc = operand_at(prologue_inputs, o, 0, spec.clone());
        let mut r = (n_red / n_red) as usize; // 1 (n_red ≥ 1), as a run-time value
        while r < n_red as usize {
            let v = operand_at(prologue_inputs, o, r, spec.clone());
            acc = combine(acc, v, max);
            r += 1;
        }
        if mean {
            acc /= f32::cast_from(n_red);
        }
        finish(acc, epilogue_inputs, outputs, o, spec);
    }
}

/// Output element `CUBE_POS < n_out` folds `n_red ≥ 1` prologue values with
/// `block` units (a power of two, the cube's size): unit `u` folds elements
/// `u, u + block, …`, then the partials are folded pairwise in shared
/// memory and unit 0 runs the epilogue. Units past `n_red` hold nothing
/// and are never folded in, so no identity element is needed (WGSL has no
/// −∞ literal).
#[cube(launch)]
pub fn reduce_program_rows(
    prologue_inputs: &Sequence<Array<f32>>,
    epilogue_inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    n_out: u32,
    n_red: u32,
    #[comptime] spec: ReduceSpec,
    #[comptime] block: usize,
) {
    let o = CUBE_POS;
    // A whole cube takes the same branch, so its barriers stay uniform.
    if o >= n_out as usize {
        terminate!();
    }
    let max = comptime!(spec.kind == ReduceKind::Max);
    let mean = comptime!(spec.kind == ReduceKind::Mean);
    let tid = UNIT_POS as usize;
    let n = n_red as usize;
    let mut partial = SharedMemory::<f32>::new(block);
    // Units past the end start from element 0 and are never folded in.
    let first = select(tid < n, tid, tid * 0usize);
    let mut acc = operand_at(prologue_inputs, o, first, spec.clone());
    let mut r = tid + block;
    while r < n {
        let v = operand_at(prologue_inputs, o, r, spec.clone());
        acc = combine(acc, v, max);
        r += block;
    }
    partial[tid] = acc;
    sync_cube();
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0usize {
        if tid < stride && tid + stride < n {
            partial[tid] = combine(partial[tid], partial[tid + stride], max);
        }
        sync_cube();
        stride /= 2usize;
    }
    if tid == 0 {
        let mut total = partial[0usize];
        if mean {
            total /= f32::cast_from(n_red);
        }
        finish(total, epilogue_inputs, outputs, o, spec);
    }
}
