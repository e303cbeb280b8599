//! Snapshot tests of the text printer and DOT export on a small graph.

use coopc_compiler::ir::{to_dot, to_text, DType, Graph};

/// A two-layer perceptron loss: y = tanh(x Wᵀ) · v, L = Σ y.
fn small_graph() -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let w = g.input("w", DType::F32, vec![4, 3]);
    let v = g.input("v", DType::F32, vec![4, 1]);
    let wt = g.transpose(w);
    let h = g.matmul(x, wt);
    let h = g.tanh(h);
    let y = g.matmul(h, v);
    let s = g.sum_all(y);
    let k = g.full(0.5, DType::F32, vec![]);
    let l = g.mul(s, k);
    g.set_output("loss", l);
    g.set_output("hidden", h);
    g
}

#[test]
fn text_form_of_a_small_graph() {
    insta::assert_snapshot!(to_text(&small_graph()));
}

#[test]
fn dot_form_of_a_small_graph() {
    insta::assert_snapshot!(to_dot(&small_graph()));
}

#[test]
fn text_form_of_a_gradient_graph() {
    let mut g = small_graph();
    let l = g.output("loss").unwrap();
    let w = g.inputs_by_name()["w"];
    let gw = coopc_compiler::autodiff::grad(&mut g, l, &[w])[0];
    g.clear_outputs();
    g.set_output("grad.w", gw);
    coopc_compiler::passes::Pipeline::standard().run(&mut g);
    insta::assert_snapshot!(to_text(&g));
}
