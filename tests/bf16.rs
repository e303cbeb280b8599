//! `backend.dtype = "bf16"`: the policy's weights and activations in bf16,
//! emulated by the CPU executor (every bf16 value rounded to nearest, ties
//! to even, where it is stored; products, reductions, norms, softmax and
//! the losses in f32), θ, w, the optimiser state and every program input
//! and output in f32.
//!
//! A bf16 meta-step is held to the f64 reference within a bf16 tolerance,
//! and must differ from the f32 meta-step by more than f32 rounding does
//! (so the rounding is really there); every bf16 value the graph computes
//! is a bf16 number.

mod common;

use common::*;
use coopc_compiler::ir::{DType, Op};
use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
use coopc_compiler::spec::{HypergradKind, PipelineSpec, Precision};
use coopc_runtime::execute;
use std::collections::BTreeMap;

fn outputs(spec: &PipelineSpec, inputs: &Inputs) -> BTreeMap<String, Vec<f64>> {
    let ms = lower_meta_step(spec, BatchShapes::from_spec(spec));
    execute(&ms.graph, inputs)
        .unwrap_or_else(|e| panic!("{:?} meta-step: {e}", spec.backend.dtype))
        .into_iter()
        .map(|(name, t)| {
            assert!(
                t.dtype() != DType::Bf16,
                "output {name} is bf16: outputs are f32 master copies"
            );
            (name, t.to_f64_vec())
        })
        .collect()
}

fn gradients(out: &BTreeMap<String, Vec<f64>>) -> Vec<f64> {
    gradient_outputs(out.iter().map(|(n, v)| (n.as_str(), v.clone())))
}

fn spec_with(kind: HypergradKind, dtype: Precision) -> PipelineSpec {
    let mut spec = tiny_spec();
    spec.bilevel.hypergradient.kind = kind;
    spec.backend.dtype = dtype;
    spec
}

#[test]
fn a_bf16_meta_step_is_within_bf16_rounding_of_the_f64_reference() {
    for kind in [HypergradKind::FirstOrder, HypergradKind::Truncated] {
        let s64 = spec_with(kind, Precision::F64);
        let ms = lower_meta_step(&s64, BatchShapes::from_spec(&s64));
        // All three start from the same f32 values.
        let f32_inputs = with_float_dtype(&meta_inputs(&s64, &ms, 31), DType::F32);
        let reference = outputs(&s64, &with_float_dtype(&f32_inputs, DType::F64));
        let single = outputs(&spec_with(kind, Precision::F32), &f32_inputs);
        let half = outputs(&spec_with(kind, Precision::Bf16), &f32_inputs);
        assert_eq!(
            half.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{kind:?}: the bf16 meta-step has the f64 one's outputs"
        );
        let want = gradients(&reference);
        assert!(want.len() > 100, "{kind:?}: {} gradient values", want.len());
        let e32 = rel_err(&gradients(&single), &want, 1e-12);
        let e16 = rel_err(&gradients(&half), &want, 1e-12);
        eprintln!("{kind:?}: gradients' relative error f32 {e32:.2e}, bf16 {e16:.2e}");
        assert!(
            e32 < 1e-4,
            "{kind:?}: f32 off the f64 reference by {e32:.2e}"
        );
        // bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per
        // stored value); a meta-step stores a few dozen in a row.
        assert!(
            e16 < 5e-2,
            "{kind:?}: bf16 off the f64 reference by {e16:.2e}"
        );
        assert!(
            e16 > 20.0 * e32,
            "{kind:?}: bf16 ({e16:.2e}) no further from f64 than f32 ({e32:.2e}): no rounding?"
        );
        for name in ["loss.sft", "loss.rl", "loss.up"] {
            let (a, b) = (half[name][0], reference[name][0]);
            assert!(
                (a - b).abs() <= 2e-2 * b.abs().max(1e-2),
                "{kind:?}: {name} bf16 {a} vs f64 {b}"
            );
        }
    }
}

#[test]
fn every_bf16_value_of_the_meta_step_is_a_bf16_number() {
    let spec = spec_with(HypergradKind::Truncated, Precision::Bf16);
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    let g = &ms.graph;
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 32), DType::F32);
    let half: Vec<_> = g
        .node_ids()
        .filter(|&id| g.ty(id).dtype == DType::Bf16)
        .collect();
    let count = |pred: &dyn Fn(&Op) -> bool| half.iter().filter(|&&id| pred(g.op(id))).count();
    // The policy computes in bf16: its products, attention, norms and the
    // casts of θ and w into it.
    assert!(count(&|op| matches!(op, Op::MatMul)) >= 10, "bf16 products");
    assert!(
        count(&|op| matches!(op, Op::CausalAttention)) >= 1,
        "bf16 attention"
    );
    assert!(
        count(&|op| matches!(op, Op::RmsNorm { .. })) >= 3,
        "bf16 norms"
    );
    assert!(
        count(&|op| matches!(op, Op::Cast { .. })) >= 10,
        "casts into bf16"
    );
    // Its log-probs are f32 (accumulated in f32, never rounded to bf16).
    for id in g.node_ids() {
        if matches!(g.op(id), Op::LinearLogprob | Op::LinearEntropy) {
            assert_eq!(g.ty(id).dtype, DType::F32, "node %{}", id.index());
        }
    }
    let values = eval(g, &inputs, &half);
    let mut checked = 0;
    for (id, v) in half.iter().zip(&values) {
        for (i, &x) in v.iter().enumerate() {
            let bits = (x as f32).to_bits();
            assert!(
                x as f32 as f64 == x && bits & 0xffff == 0,
                "node %{} ({}) element {i} = {x:e} is not a bf16 number",
                id.index(),
                g.op(*id).name()
            );
        }
        checked += v.len();
    }
    assert!(checked > 1000, "only {checked} bf16 values");
}
