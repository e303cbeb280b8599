//! Optimiser steps (`Op::OptimStep`) as hand-written kernels: one unit per
//! element of the parameter reads θ, its gradient and the state once and
//! writes every value of the step asked for (θ', the new state, AdamW's
//! step size `D`) — PyTorch's fused optimiser update for one tensor.
//!
//! The gradient is computed in the kernel by a prologue program when the
//! schedule fused its producer (e.g. `(1 − λ) g_sft + λ g_rl`), or loaded
//! when the prologue is a single load. Hyperparameters are run-time
//! scalars, so one compiled kernel serves every learning rate; AdamW's bias
//! corrections come from the step count on the device, so a step needs no
//! host value.

use crate::program::expand_program;
use coopc_ir::kernel::{ElemProgram, Kernel};
use coopc_ir::{StepOut, StepRule};
use cubecl::prelude::*;

/// Which of the step kernels a rule runs (its hyperparameters are launch
/// arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepKind {
    Sgd,
    Momentum,
    AdamW,
}

impl StepKind {
    pub fn of(rule: StepRule) -> StepKind {
        match rule {
            StepRule::Sgd { .. } => StepKind::Sgd,
            StepRule::Momentum { .. } => StepKind::Momentum,
            StepRule::AdamW { .. } => StepKind::AdamW,
        }
    }

    /// Arrays besides the gradient's: θ, the state buffers, the step count.
    pub fn state_arrays(self) -> usize {
        match self {
            StepKind::Sgd => 1,
            StepKind::Momentum => 2,
            StepKind::AdamW => 4,
        }
    }
}

/// What an optimiser-step kernel is specialised on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepSpec {
    /// Computes the gradient (output 0) from the gradient inputs.
    pub prologue: ElemProgram,
    /// The values written, in the order of the output arrays.
    pub writes: Vec<StepOut>,
    /// AdamW scales θ by `1 − lr·wd` (weight decay is not zero).
    pub decay: bool,
    /// The gradient is written too, to the last output array.
    pub write_gradient: bool,
}

impl StepSpec {
    /// The spec of the step kernel of a fused schedule.
    pub fn of(kernel: &Kernel) -> Option<StepSpec> {
        let Kernel::OptimStep {
            rule,
            prologue,
            outputs,
            gradient,
            ..
        } = kernel
        else {
            return None;
        };
        Some(StepSpec {
            prologue: prologue.clone(),
            writes: outputs.iter().map(|o| o.0).collect(),
            decay: rule.decay().is_some(),
            write_gradient: gradient.is_some(),
        })
    }

    /// Output arrays of the kernel.
    pub fn n_outputs(&self) -> usize {
        self.writes.len() + usize::from(self.write_gradient)
    }
}

#[allow(unused_variables)]
fn gradient_at(inputs: &Sequence<Array<f32>>, i: usize, spec: StepSpec) -> f32 {
    unimplemented!("device-only: expanded into the kernel")
}

mod gradient_at {
    use super::*;

    /// The prologue's gradient at element `i`.
    pub fn expand(
        scope: &mut Scope,
        inputs: SequenceExpand<Array<f32>>,
        i: NativeExpand<usize>,
        spec: StepSpec,
    ) -> NativeExpand<f32> {
        let ins: Vec<_> = inputs.iter_cloned().map(Some).collect();
        expand_program(scope, &spec.prologue, &i, &ins, &[]).remove(0)
    }
}

#[cube]
fn store_value(a: &mut Array<f32>, i: usize, v: f32) {
    a[i] = v;
}

#[allow(unused_variables, clippy::too_many_arguments)]
fn store_step(
    outputs: &mut Sequence<Array<f32>>,
    i: usize,
    grad: f32,
    param: f32,
    first: f32,
    second: f32,
    precond: f32,
    spec: StepSpec,
) {
    unimplemented!("device-only: expanded into the kernel")
}

mod store_step {
    use super::*;

    /// Stores the values `spec.writes` asks for: θ', the first state value
    /// (momentum buffer, exp_avg), the second (exp_avg_sq) and `D`; then
    /// the gradient when `spec.write_gradient`.
    #[allow(clippy::too_many_arguments)]
    pub fn expand(
        scope: &mut Scope,
        outputs: SequenceExpand<Array<f32>>,
        i: NativeExpand<usize>,
        grad: NativeExpand<f32>,
        param: NativeExpand<f32>,
        first: NativeExpand<f32>,
        second: NativeExpand<f32>,
        precond: NativeExpand<f32>,
        spec: StepSpec,
    ) {
        let mut values: Vec<_> = spec
            .writes
            .iter()
            .map(|which| match which {
                StepOut::Param => param.clone(),
                StepOut::MomentumBuffer | StepOut::ExpAvg => first.clone(),
                StepOut::ExpAvgSq => second.clone(),
                StepOut::Precond => precond.clone(),
            })
            .collect();
        if spec.write_gradient {
            values.push(grad);
        }
        for (out, v) in outputs.iter_cloned().zip(values) {
            store_value::expand(scope, out, i.clone(), v);
        }
    }
}

/// `θ' = θ − lr g`.
#[cube(launch)]
pub fn sgd_step(
    grad_inputs: &Sequence<Array<f32>>,
    param: &Array<f32>,
    outputs: &mut Sequence<Array<f32>>,
    numel: u32,
    lr: f32,
    #[comptime] spec: StepSpec,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let g = gradient_at(grad_inputs, i, spec.clone());
        let p = param[i] - g * lr;
        store_step(outputs, i, g, p, p, p, p, spec);
    }
}

/// `b' = μ b + g`, `θ' = θ − lr b'`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn momentum_step(
    grad_inputs: &Sequence<Array<f32>>,
    param: &Array<f32>,
    buffer: &Array<f32>,
    outputs: &mut Sequence<Array<f32>>,
    numel: u32,
    lr: f32,
    mu: f32,
    #[comptime] spec: StepSpec,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let g = gradient_at(grad_inputs, i, spec.clone());
        let b = buffer[i] * mu + g;
        let p = param[i] - b * lr;
        store_step(outputs, i, g, p, b, b, b, spec);
    }
}

/// AdamW: `m' = β1 m + (1 − β1) g`, `v' = β2 v + (1 − β2) g²`, `D = lr /
/// ((√(v' / c2) + eps) c1)` with `c = 1 − β^t` (`t = step[0]`, the count
/// after this step), `θ' = decay θ − D m'`. `beta1c`, `beta2c` are `1 −
/// β` rounded once from f64, as the reference computes them.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    grad_inputs: &Sequence<Array<f32>>,
    param: &Array<f32>,
    exp_avg: &Array<f32>,
    exp_avg_sq: &Array<f32>,
    step: &Array<f32>,
    outputs: &mut Sequence<Array<f32>>,
    numel: u32,
    lr: f32,
    beta1: f32,
    beta1c: f32,
    beta2: f32,
    beta2c: f32,
    eps: f32,
    decay: f32,
    #[comptime] spec: StepSpec,
) {
    let i = ABSOLUTE_POS;
    if i < numel as usize {
        let g = gradient_at(grad_inputs, i, spec.clone());
        let m = exp_avg[i] * beta1 + g * beta1c;
        let v = exp_avg_sq[i] * beta2 + g * g * beta2c;
        let t = step[0usize];
        let c1 = f32::new(1.0) - beta1.powf(t);
        let c2 = f32::new(1.0) - beta2.powf(t);
        let d = lr / (((v / c2).sqrt() + eps) * c1);
        let decayed = comptime!(spec.decay);
        let mut p = param[i];
        if decayed {
            p *= decay;
        }
        store_step(outputs, i, g, p - d * m, m, v, d, spec);
    }
}
