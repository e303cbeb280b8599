//! The generated elementwise kernel: one `#[cube]` kernel specialised by a
//! compile-time elementwise program (see [`crate::program`]). One unit per
//! element.

use crate::program::{expand_program, expand_stores};
use coopc_ir::kernel::ElemProgram;
use cubecl::prelude::*;

#[allow(unused_variables)]
fn run_elementwise(
    inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    i: usize,
    program: ElemProgram,
) {
    unimplemented!("device-only: expanded into the kernel")
}

mod run_elementwise {
    use super::*;

    pub fn expand(
        scope: &mut Scope,
        inputs: SequenceExpand<Array<f32>>,
        outputs: SequenceExpand<Array<f32>>,
        i: NativeExpand<usize>,
        program: ElemProgram,
    ) {
        let ins: Vec<_> = inputs.iter_cloned().map(Some).collect();
        let outs: Vec<_> = outputs.iter_cloned().collect();
        let values = expand_program(scope, &program, &i, &ins, &[]);
        expand_stores(scope, &outs, &i, values);
    }
}

/// `outputs[j][i] = program(inputs…)[j]` for `i < numel`.
#[cube(launch)]
pub fn elementwise_program(
    inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    numel: u32,
    #[comptime] program: ElemProgram,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        run_elementwise(inputs, outputs, i, program);
    }
}
