//! Graph-level tests of the executor: small hand-computed cases per op,
//! error reporting, buffer lifetime, determinism and matmul overhead.

use crate::{execute, execute_nodes, Buffer, ExecError, HostTensor};
use coopc_ir::{CompareOp, DType, Graph, NodeId, ReduceKind};
use std::collections::HashMap;

fn inputs(pairs: &[(&str, HostTensor)]) -> HashMap<String, HostTensor> {
    pairs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect()
}

/// Evaluates `node` of `g`.
fn run(g: &Graph, ins: &[(&str, HostTensor)], node: NodeId) -> HostTensor {
    execute_nodes(g, &inputs(ins), &[node])
        .unwrap()
        .pop()
        .unwrap()
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    t.as_slice::<f32>().expect("an f32 tensor").to_vec()
}

fn iota_f32(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

#[test]
fn matmul_2d() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![2, 3]);
    let b = g.input("b", DType::F32, vec![3, 2]);
    let c = g.matmul(a, b);
    let out = run(
        &g,
        &[
            (
                "a",
                HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
            ),
            (
                "b",
                HostTensor::f32(vec![3, 2], vec![7., 8., 9., 10., 11., 12.]),
            ),
        ],
        c,
    );
    assert_eq!(out.shape, vec![2, 2]);
    assert_eq!(f32s(&out), vec![58., 64., 139., 154.]);
}

#[test]
fn matmul_batched_f64() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F64, vec![2, 2, 2]);
    let b = g.input("b", DType::F64, vec![2, 2, 1]);
    let c = g.matmul(a, b);
    let out = run(
        &g,
        &[
            (
                "a",
                HostTensor::f64(vec![2, 2, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.]),
            ),
            ("b", HostTensor::f64(vec![2, 2, 1], vec![1., 1., 2., -1.])),
        ],
        c,
    );
    assert_eq!(out.shape, vec![2, 2, 1]);
    // [[1,2],[3,4]]·[1,1] = [3,7]; [[5,6],[7,8]]·[2,-1] = [4,6]
    assert_eq!(out.data, Buffer::F64(vec![3., 7., 4., 6.]));
}

/// x = 0..12 as [2,3,2].
fn reduce_case(kind: ReduceKind, axes: &[usize], keepdim: bool) -> HostTensor {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3, 2]);
    let r = g.reduce(kind, x, axes, keepdim);
    run(
        &g,
        &[("x", HostTensor::f32(vec![2, 3, 2], iota_f32(12)))],
        r,
    )
}

#[test]
fn reduce_sum_axis_sets() {
    // (axes, shape, shape with keepdim, values)
    type Case = (Vec<usize>, Vec<usize>, Vec<usize>, Vec<f32>);
    let cases: Vec<Case> = vec![
        (
            vec![0],
            vec![3, 2],
            vec![1, 3, 2],
            vec![6., 8., 10., 12., 14., 16.],
        ),
        (vec![1], vec![2, 2], vec![2, 1, 2], vec![6., 9., 24., 27.]),
        (
            vec![2],
            vec![2, 3],
            vec![2, 3, 1],
            vec![1., 5., 9., 13., 17., 21.],
        ),
        (vec![0, 2], vec![3], vec![1, 3, 1], vec![14., 22., 30.]),
        (vec![2, 0], vec![3], vec![1, 3, 1], vec![14., 22., 30.]),
        (vec![0, 1, 2], vec![], vec![1, 1, 1], vec![66.]),
        (vec![], vec![2, 3, 2], vec![2, 3, 2], iota_f32(12)),
    ];
    for (axes, shape, kept_shape, want) in cases {
        let r = reduce_case(ReduceKind::Sum, &axes, false);
        assert_eq!(r.shape, shape, "sum over {axes:?}");
        assert_eq!(f32s(&r), want, "sum over {axes:?}");
        let r = reduce_case(ReduceKind::Sum, &axes, true);
        assert_eq!(r.shape, kept_shape, "keepdim sum over {axes:?}");
        assert_eq!(f32s(&r), want, "keepdim sum over {axes:?}");
    }
}

#[test]
fn reduce_max_and_mean() {
    let r = reduce_case(ReduceKind::Max, &[1], false);
    assert_eq!(
        (r.shape.clone(), f32s(&r)),
        (vec![2, 2], vec![4., 5., 10., 11.])
    );
    let r = reduce_case(ReduceKind::Max, &[0, 2], true);
    assert_eq!(
        (r.shape.clone(), f32s(&r)),
        (vec![1, 3, 1], vec![7., 9., 11.])
    );
    let r = reduce_case(ReduceKind::Max, &[0, 1, 2], false);
    assert_eq!(r.scalar_f64().unwrap(), 11.0);
    let r = reduce_case(ReduceKind::Mean, &[2], false);
    assert_eq!(f32s(&r), vec![0.5, 2.5, 4.5, 6.5, 8.5, 10.5]);
    let r = reduce_case(ReduceKind::Mean, &[0, 1], true);
    assert_eq!((r.shape.clone(), f32s(&r)), (vec![1, 1, 2], vec![5., 6.]));
}

#[test]
fn reduce_axes_0_2_equals_manual_loop() {
    let (a, b, c) = (7, 5, 9);
    let x: Vec<f32> = (0..a * b * c)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let mut g = Graph::new();
    let xi = g.input("x", DType::F32, vec![a, b, c]);
    let s = g.sum(xi, &[0, 2], false);
    let m = g.reduce_max(xi, &[0, 2], false);
    let outs = execute_nodes(
        &g,
        &inputs(&[("x", HostTensor::f32(vec![a, b, c], x.clone()))]),
        &[s, m],
    )
    .unwrap();
    for j in 0..b {
        let mut sum = 0.0f32;
        let mut max = f32::NEG_INFINITY;
        for i in 0..a {
            for k in 0..c {
                let v = x[(i * b + j) * c + k];
                sum += v;
                max = max.max(v);
            }
        }
        assert_eq!(f32s(&outs[0])[j].to_bits(), sum.to_bits(), "sum at {j}");
        assert_eq!(f32s(&outs[1])[j], max, "max at {j}");
    }
}

#[test]
fn permute_slice_concat_pad() {
    let mut g = Graph::new();
    let x = g.input("x", DType::I32, vec![2, 3]);
    let t = g.permute(x, &[1, 0]);
    let s = g.slice(x, &[0, 1], &[2, 3]);
    let c0 = g.concat(&[x, x], 0);
    let c1 = g.concat(&[x, s], 1);
    let p = g.pad(x, &[1, 0], &[0, 2], 9.0);
    let outs = execute_nodes(
        &g,
        &inputs(&[("x", HostTensor::i32(vec![2, 3], vec![1, 2, 3, 4, 5, 6]))]),
        &[t, s, c0, c1, p],
    )
    .unwrap();
    assert_eq!(outs[0], HostTensor::i32(vec![3, 2], vec![1, 4, 2, 5, 3, 6]));
    assert_eq!(outs[1], HostTensor::i32(vec![2, 2], vec![2, 3, 5, 6]));
    assert_eq!(
        outs[2],
        HostTensor::i32(vec![4, 3], vec![1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6])
    );
    assert_eq!(
        outs[3],
        HostTensor::i32(vec![2, 5], vec![1, 2, 3, 2, 3, 4, 5, 6, 5, 6])
    );
    assert_eq!(
        outs[4],
        HostTensor::i32(
            vec![3, 5],
            vec![9, 9, 9, 9, 9, 1, 2, 3, 9, 9, 4, 5, 6, 9, 9]
        )
    );
}

#[test]
fn permute_3d() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3, 4]);
    let p = g.permute(x, &[2, 0, 1]);
    let out = run(
        &g,
        &[("x", HostTensor::f32(vec![2, 3, 4], iota_f32(24)))],
        p,
    );
    assert_eq!(out.shape, vec![4, 2, 3]);
    let v = f32s(&out);
    // out[k, i, j] = x[i, j, k] = 12i + 4j + k
    for k in 0..4 {
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(v[(k * 2 + i) * 3 + j], (12 * i + 4 * j + k) as f32);
            }
        }
    }
}

#[test]
fn broadcast_shapes() {
    let mut g = Graph::new();
    let v = g.input("v", DType::F32, vec![3]);
    let col = g.input("c", DType::F32, vec![2, 1]);
    let s = g.input("s", DType::Bool, Vec::<usize>::new());
    let bv = g.broadcast(v, vec![2, 3]);
    let bc = g.broadcast(col, vec![2, 3]);
    let bs = g.broadcast(s, vec![2, 2]);
    let outs = execute_nodes(
        &g,
        &inputs(&[
            ("v", HostTensor::f32(vec![3], vec![1., 2., 3.])),
            ("c", HostTensor::f32(vec![2, 1], vec![10., 20.])),
            ("s", HostTensor::bool(Vec::<usize>::new(), vec![true])),
        ]),
        &[bv, bc, bs],
    )
    .unwrap();
    assert_eq!(f32s(&outs[0]), vec![1., 2., 3., 1., 2., 3.]);
    assert_eq!(f32s(&outs[1]), vec![10., 10., 10., 20., 20., 20.]);
    assert_eq!(outs[2], HostTensor::bool(vec![2, 2], vec![true; 4]));
}

#[test]
fn take_along_axis_and_scatter_add() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 3]);
    let idx = g.input("idx", DType::I32, vec![2, 2]);
    let upd = g.input("upd", DType::F32, vec![2, 2]);
    let t = g.take_along_axis(x, idx, 1);
    let sa = g.scatter_add(x, idx, upd, 1);
    let idx0 = g.input("idx0", DType::I32, vec![1, 3]);
    let upd0 = g.input("upd0", DType::F32, vec![1, 3]);
    let t0 = g.take_along_axis(x, idx0, 0);
    let sa0 = g.scatter_add(x, idx0, upd0, 0);
    let outs = execute_nodes(
        &g,
        &inputs(&[
            (
                "x",
                HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
            ),
            ("idx", HostTensor::i32(vec![2, 2], vec![0, 0, 2, 1])),
            ("upd", HostTensor::f32(vec![2, 2], vec![10., 20., 30., 40.])),
            ("idx0", HostTensor::i32(vec![1, 3], vec![1, 0, 1])),
            ("upd0", HostTensor::f32(vec![1, 3], vec![100., 200., 300.])),
        ]),
        &[t, sa, t0, sa0],
    )
    .unwrap();
    assert_eq!(f32s(&outs[0]), vec![1., 1., 6., 5.]);
    // Repeated index 0 in row 0 accumulates both updates.
    assert_eq!(f32s(&outs[1]), vec![31., 2., 3., 4., 45., 36.]);
    assert_eq!(outs[2].shape, vec![1, 3]);
    assert_eq!(f32s(&outs[2]), vec![4., 2., 6.]);
    assert_eq!(f32s(&outs[3]), vec![1., 202., 3., 104., 5., 306.]);
}

#[test]
fn gather_and_scatter_add_rows() {
    let mut g = Graph::new();
    let table = g.input("table", DType::F32, vec![3, 2]);
    let ids = g.input("ids", DType::I32, vec![2, 2]);
    let e = g.gather(table, ids);
    let upd = g.input("upd", DType::F32, vec![2, 2, 2]);
    let s = g.scatter_add_rows(ids, upd, 3);
    let outs = execute_nodes(
        &g,
        &inputs(&[
            (
                "table",
                HostTensor::f32(vec![3, 2], vec![0., 1., 10., 11., 20., 21.]),
            ),
            ("ids", HostTensor::i32(vec![2, 2], vec![2, 0, 2, 2])),
            (
                "upd",
                HostTensor::f32(vec![2, 2, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.]),
            ),
        ]),
        &[e, s],
    )
    .unwrap();
    assert_eq!(outs[0].shape, vec![2, 2, 2]);
    assert_eq!(f32s(&outs[0]), vec![20., 21., 0., 1., 20., 21., 20., 21.]);
    assert_eq!(outs[1].shape, vec![3, 2]);
    // Row 2 collects positions 0, 2 and 3; row 1 gets nothing.
    assert_eq!(f32s(&outs[1]), vec![3., 4., 0., 0., 13., 16.]);
}

#[test]
fn gather_of_i32_table() {
    let mut g = Graph::new();
    let table = g.input("table", DType::I32, vec![3]);
    let ids = g.input("ids", DType::I32, vec![4]);
    let e = g.gather(table, ids);
    let out = run(
        &g,
        &[
            ("table", HostTensor::i32(vec![3], vec![7, 8, 9])),
            ("ids", HostTensor::i32(vec![4], vec![2, 2, 0, 1])),
        ],
        e,
    );
    assert_eq!(out, HostTensor::i32(vec![4], vec![9, 9, 7, 8]));
}

#[test]
fn scatter_add_rows_without_ids() {
    let mut g = Graph::new();
    let ids = g.input("ids", DType::I32, vec![0]);
    let upd = g.input("upd", DType::F64, vec![0, 2]);
    let s = g.scatter_add_rows(ids, upd, 3);
    let out = run(
        &g,
        &[
            ("ids", HostTensor::i32(vec![0], vec![])),
            ("upd", HostTensor::f64(vec![0, 2], vec![])),
        ],
        s,
    );
    assert_eq!(out, HostTensor::f64(vec![3, 2], vec![0.0; 6]));
}

#[test]
fn one_hot_out_of_range_rows_are_zero() {
    let mut g = Graph::new();
    let ids = g.input("ids", DType::I32, vec![4]);
    let o = g.one_hot(ids, 3, DType::F64);
    let out = run(
        &g,
        &[("ids", HostTensor::i32(vec![4], vec![1, -1, 3, 0]))],
        o,
    );
    assert_eq!(out.shape, vec![4, 3]);
    assert_eq!(
        out.data,
        Buffer::F64(vec![0., 1., 0., 0., 0., 0., 0., 0., 0., 1., 0., 0.])
    );
}

#[test]
fn iota_along_axes() {
    let mut g = Graph::new();
    let a = g.iota(0, DType::F32, vec![2, 3]);
    let b = g.iota(1, DType::I32, vec![2, 3]);
    let outs = execute_nodes(&g, &HashMap::<String, HostTensor>::new(), &[a, b]).unwrap();
    assert_eq!(
        outs[0],
        HostTensor::f32(vec![2, 3], vec![0., 0., 0., 1., 1., 1.])
    );
    assert_eq!(outs[1], HostTensor::i32(vec![2, 3], vec![0, 1, 2, 0, 1, 2]));
}

#[test]
fn casts_between_all_kinds() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![5]);
    let i = g.cast(x, DType::I32);
    let b = g.cast(i, DType::Bool);
    let f = g.cast(b, DType::F64);
    let xb = g.cast(x, DType::Bool);
    let back = g.cast(i, DType::F32);
    let outs = execute_nodes(
        &g,
        &inputs(&[(
            "x",
            HostTensor::f32(vec![5], vec![2.7, -2.7, 0.4, -0.0, 1e10]),
        )]),
        &[i, b, f, xb, back],
    )
    .unwrap();
    assert_eq!(outs[0].data, Buffer::I32(vec![2, -2, 0, 0, i32::MAX]));
    assert_eq!(
        outs[1].data,
        Buffer::Bool(vec![true, true, false, false, true])
    );
    assert_eq!(outs[2].data, Buffer::F64(vec![1., 1., 0., 0., 1.]));
    assert_eq!(
        outs[3].data,
        Buffer::Bool(vec![true, true, true, false, true])
    );
    assert_eq!(
        outs[4].data,
        Buffer::F32(vec![2., -2., 0., 0., i32::MAX as f32])
    );
}

#[test]
fn select_and_compare() {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, vec![4]);
    let b = g.input("b", DType::F32, vec![4]);
    let lt = g.compare(CompareOp::Lt, a, b);
    let ne = g.compare(CompareOp::Ne, a, b);
    let sel = g.select(lt, a, b);
    let i = g.input("i", DType::I32, vec![3]);
    let j = g.input("j", DType::I32, vec![3]);
    let ge = g.compare(CompareOp::Ge, i, j);
    let isel = g.select(ge, i, j);
    let lt3 = g.slice(lt, &[0], &[3]);
    let bge = g.compare(CompareOp::Gt, ge, lt3);
    let outs = execute_nodes(
        &g,
        &inputs(&[
            ("a", HostTensor::f32(vec![4], vec![1., 5., f32::NAN, 2.])),
            ("b", HostTensor::f32(vec![4], vec![2., 4., 0., 2.])),
            ("i", HostTensor::i32(vec![3], vec![1, 5, -3])),
            ("j", HostTensor::i32(vec![3], vec![1, 7, -4])),
        ]),
        &[lt, ne, sel, ge, isel, bge],
    )
    .unwrap();
    assert_eq!(outs[0].data, Buffer::Bool(vec![true, false, false, false]));
    assert_eq!(outs[1].data, Buffer::Bool(vec![true, true, true, false]));
    assert_eq!(f32s(&outs[2]), vec![1., 4., 0., 2.]);
    assert_eq!(outs[3].data, Buffer::Bool(vec![true, false, true]));
    assert_eq!(outs[4].data, Buffer::I32(vec![1, 7, -3]));
    // bool compare: ge > lt[..3] with false < true
    assert_eq!(outs[5].data, Buffer::Bool(vec![false, false, true]));
}

#[test]
fn elementwise_constants_and_clamp() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![4]);
    let two = g.full(2.0, DType::F64, vec![4]);
    let lit = g.literal(&[1., -1., 0.5, 0.], DType::F64, vec![4]);
    let p = g.pow(x, two);
    let m = g.mul(p, lit);
    let e = g.exp(m);
    let c = g.clamp(m, -1.0, 3.0);
    let il = g.literal(&[1.9, -1.9], DType::I32, vec![2]);
    let outs = execute_nodes(
        &g,
        &inputs(&[("x", HostTensor::f64(vec![4], vec![1., 2., 3., 4.]))]),
        &[m, e, c, il],
    )
    .unwrap();
    assert_eq!(outs[0].data, Buffer::F64(vec![1., -4., 4.5, 0.]));
    assert_eq!(
        outs[1].to_f64_vec(),
        vec![1f64.exp(), (-4f64).exp(), 4.5f64.exp(), 1.0]
    );
    assert_eq!(outs[2].data, Buffer::F64(vec![1., -1., 3., 0.]));
    assert_eq!(outs[3].data, Buffer::I32(vec![1, -1]));
}

#[test]
fn f32_graph_accumulates_in_f32() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![3]);
    let s = g.sum(x, &[0], false);
    let out = run(
        &g,
        &[("x", HostTensor::f32(vec![3], vec![16777216.0, 1.0, 1.0]))],
        s,
    );
    // In f32 each `+ 1` rounds back to 2^24; an f64 accumulator would give
    // 2^24 + 2, which f32 represents exactly.
    assert_eq!(out.scalar_f64().unwrap(), 16777216.0);
}

#[test]
fn execute_returns_named_outputs_in_order() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    let y = g.exp(x);
    let r = g.reshape(y, vec![1, 2]);
    let z = g.stop_gradient(y);
    let w = g.add(y, z);
    g.set_output("w", w);
    g.set_output("r", r);
    g.set_output("x", x);
    g.set_output("w_again", w);
    let xin = HostTensor::f32(vec![2], vec![0.0, 1.0]);
    let outs = execute(&g, &inputs(&[("x", xin.clone())])).unwrap();
    let names: Vec<&str> = outs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["w", "r", "x", "w_again"]);
    let e1 = 1f32.exp();
    assert_eq!(f32s(&outs[0].1), vec![2.0, 2.0 * e1]);
    assert_eq!(outs[1].1, HostTensor::f32(vec![1, 2], vec![1.0, e1]));
    assert_eq!(outs[2].1, xin);
    assert_eq!(outs[3].1, outs[0].1);
}

#[test]
fn reshape_of_a_dying_value_and_intermediate_requests() {
    // y is used by the reshape (its last use) and requested in another call;
    // chains of relabelings must not lose values still needed.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2, 2]);
    let y = g.neg(x);
    let r = g.reshape(y, vec![4]);
    let s = g.stop_gradient(r);
    let t = g.reshape(s, vec![2, 2]);
    let u = g.add(t, x);
    let ins = inputs(&[("x", HostTensor::f32(vec![2, 2], vec![1., 2., 3., 4.]))]);
    let outs = execute_nodes(&g, &ins, &[u, y, r]).unwrap();
    assert_eq!(f32s(&outs[0]), vec![0.; 4]);
    assert_eq!(
        outs[1],
        HostTensor::f32(vec![2, 2], vec![-1., -2., -3., -4.])
    );
    assert_eq!(outs[2], HostTensor::f32(vec![4], vec![-1., -2., -3., -4.]));
    // Reshape of an input (borrowed) value.
    let rx = g.reshape(x, vec![4]);
    let out = execute_nodes(&g, &ins, &[rx]).unwrap();
    assert_eq!(out[0], HostTensor::f32(vec![4], vec![1., 2., 3., 4.]));
}

#[test]
fn missing_input_is_an_error() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    let unused = g.input("unused", DType::F32, vec![2]);
    let y = g.exp(x);
    let _ = unused;
    g.set_output("y", y);
    let e = execute(&g, &HashMap::<String, HostTensor>::new()).unwrap_err();
    assert!(
        matches!(&e, ExecError::MissingInput { name, .. } if name == "x"),
        "{e}"
    );
    // An input nothing requested depends on may be left out.
    let ok = execute(
        &g,
        &inputs(&[("x", HostTensor::f32(vec![2], vec![0., 0.]))]),
    );
    assert_eq!(ok.unwrap()[0].1, HostTensor::f32(vec![2], vec![1., 1.]));
}

#[test]
fn input_of_wrong_type_is_an_error() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    g.set_output("x", x);
    for bad in [
        HostTensor::f64(vec![2], vec![0., 0.]),
        HostTensor::f32(vec![1, 2], vec![0., 0.]),
        HostTensor {
            shape: vec![2],
            data: Buffer::F32(vec![0.0; 3]),
        },
    ] {
        let e = execute(&g, &inputs(&[("x", bad)])).unwrap_err();
        assert!(matches!(e, ExecError::InputMismatch { .. }), "{e}");
    }
}

#[test]
fn out_of_range_gather_index_is_an_error() {
    let mut g = Graph::new();
    let table = g.input("table", DType::F32, vec![3, 2]);
    let ids = g.input("ids", DType::I32, vec![3]);
    let e = g.gather(table, ids);
    g.set_output("e", e);
    let err = execute(
        &g,
        &inputs(&[
            ("table", HostTensor::f32(vec![3, 2], vec![0.; 6])),
            ("ids", HostTensor::i32(vec![3], vec![0, 3, 1])),
        ]),
    )
    .unwrap_err();
    assert_eq!(
        err,
        ExecError::IndexOutOfRange {
            node: e.index(),
            op: "gather",
            index: 3,
            bound: 3
        }
    );
    assert!(err.to_string().contains("index 3"), "{err}");
}

#[test]
fn out_of_range_scatter_indices_are_errors() {
    let mut g = Graph::new();
    let ids = g.input("ids", DType::I32, vec![2]);
    let upd = g.input("upd", DType::F32, vec![2, 1]);
    let s = g.scatter_add_rows(ids, upd, 2);
    let base = g.input("base", DType::F32, vec![1, 2]);
    let idx = g.input("idx", DType::I32, vec![1, 2]);
    let upd2 = g.reshape(upd, vec![1, 2]);
    let sa = g.scatter_add(base, idx, upd2, 1);
    let ins = inputs(&[
        ("ids", HostTensor::i32(vec![2], vec![1, -1])),
        ("upd", HostTensor::f32(vec![2, 1], vec![1., 1.])),
        ("base", HostTensor::f32(vec![1, 2], vec![0., 0.])),
        ("idx", HostTensor::i32(vec![1, 2], vec![0, 2])),
    ]);
    let e = execute_nodes(&g, &ins, &[s]).unwrap_err();
    assert!(
        matches!(
            e,
            ExecError::IndexOutOfRange {
                index: -1,
                bound: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = execute_nodes(&g, &ins, &[sa]).unwrap_err();
    assert!(
        matches!(
            e,
            ExecError::IndexOutOfRange {
                index: 2,
                bound: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_node_is_an_error() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![2]);
    let y = g.exp(x);
    g.remove(y);
    let e = execute_nodes(&g, &HashMap::<String, HostTensor>::new(), &[y]).unwrap_err();
    assert_eq!(e, ExecError::UnknownNode { node: y.index() });
}

#[test]
fn large_results_do_not_depend_on_thread_count() {
    let (n, d) = (300, 257);
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 10007) as f32 / 1000.0).sin())
        .collect();
    let mut g = Graph::new();
    let xi = g.input("x", DType::F32, vec![n, d]);
    let s0 = g.sum(xi, &[0], false);
    let s1 = g.sum(xi, &[1], false);
    let e = g.exp(xi);
    let t = g.transpose(e);
    let ins = inputs(&[("x", HostTensor::f32(vec![n, d], x))]);
    let nodes = [s0, s1, t];
    let many = execute_nodes(&g, &ins, &nodes).unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| execute_nodes(&g, &ins, &nodes).unwrap());
    for (a, b) in many.iter().zip(&one) {
        let bits = |t: &HostTensor| f32s(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn matmul_equals_direct_sgemm_bitwise() {
    let n = 512;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.2).collect();
    let mut g = Graph::new();
    let ai = g.input("a", DType::F32, vec![n, n]);
    let bi = g.input("b", DType::F32, vec![n, n]);
    let c = g.matmul(ai, bi);
    g.set_output("c", c);
    let ins = inputs(&[
        ("a", HostTensor::f32(vec![n, n], a.clone())),
        ("b", HostTensor::f32(vec![n, n], b.clone())),
    ]);
    let direct = || {
        let mut c = vec![0.0f32; n * n];
        // SAFETY: dense row-major n×n buffers.
        unsafe {
            matrixmultiply::sgemm(
                n,
                n,
                n,
                1.0,
                a.as_ptr(),
                n as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        c
    };
    let via_exec = || execute(&g, &ins).unwrap();
    // Speed against sgemm is a benchmark (benches/executor.rs), not a test.
    let want = direct();
    let got = via_exec();
    assert_eq!(f32s(&got[0].1), want);
}
