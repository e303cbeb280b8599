//! Every device kernel — generated elementwise programs and reductions, the
//! matrix products (CubeCL's and coopc's), data movement and indexing — run through the device
//! executor and compared with the CPU executor on fresh random inputs
//! (relative error ≤ 1e-4 in f32), with every output buffer poisoned (NaN)
//! before its kernel runs so an unwritten element fails. Then a whole
//! truncated (second-order) meta-step of a tiny decoder.
//!
//! Runs on wgpu (Mesa's lavapipe on a machine without a GPU; `.ci/run`
//! installs it), or on CUDA with `COOPC_TEST_CUDA=1`.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{BinaryOp, CompareOp, DType, Graph, ReduceKind, UnaryOp};
use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
use coopc_compiler::passes::Pipeline;
use coopc_compiler::spec::Precision;
use coopc_kernels::device::{Device, Prepared};
use coopc_kernels::matmul::MatmulKernel;
use coopc_runtime::{execute, Backend, CpuBackend, HostTensor, Value};
use rand::Rng;
use std::collections::HashMap;

/// Whether the suite runs on CUDA (`COOPC_TEST_CUDA=1`) instead of wgpu.
fn cuda_requested() -> bool {
    std::env::var("COOPC_TEST_CUDA").is_ok_and(|v| v == "1")
}

/// Whether this machine lacks the tested device: then each test returns
/// early with a note, unless `COOPC_REQUIRE_WGPU=1` (set by `.ci/run`,
/// which installs lavapipe) or `COOPC_TEST_CUDA=1` demands the device.
fn device_missing() -> bool {
    static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        if cuda_requested() || std::env::var("COOPC_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            return None;
        }
        Device::wgpu().err().map(|e| e.to_string())
    });
    if let Some(why) = missing {
        eprintln!(
            "skipped: no wgpu adapter ({why}); install Mesa's lavapipe (mesa-vulkan-drivers) \
             or set COOPC_REQUIRE_WGPU=1 to make this a failure"
        );
    }
    missing.is_some()
}

/// Evaluates `$body` with `$dev` bound to the tested device (CUDA or
/// wgpu, which are different types), poisoning its output buffers.
macro_rules! with_device {
    (|$dev:ident| $body:expr) => {
        if cuda_requested() {
            let mut $dev = Device::cuda().expect("CUDA device");
            $dev.poison = true;
            $body
        } else {
            let mut $dev =
                Device::wgpu().expect("wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
            $dev.poison = true;
            $body
        }
    };
}

/// `g` compiled by itself (scheduled and fused as a plan's programs are).
fn program(g: &Graph) -> coopc_compiler::plan::Program {
    coopc_compiler::compile_graph(g.clone())
}

fn on_device(g: &Graph, inputs: &Inputs) -> Vec<(String, HostTensor)> {
    on_device_with(g, inputs, MatmulKernel::Cubecl)
}

/// [`on_device`] with the matrix products run by `matmul`.
fn on_device_with(g: &Graph, inputs: &Inputs, matmul: MatmulKernel) -> Vec<(String, HostTensor)> {
    let prepared = Prepared::new(
        g,
        coopc_compiler::fusion::fuse(g, &coopc_compiler::schedule::schedule(g).order),
    );
    with_device!(|d| {
        d.matmul = matmul;
        d.execute(g, &prepared, inputs)
    })
    .expect("device run")
}

/// A tensor's elements as f32, as the device takes them.
fn f32s(t: &HostTensor) -> Vec<f32> {
    t.to_f64_vec().into_iter().map(|x| x as f32).collect()
}

/// Kernel results against the CPU executor's outputs, in order: every
/// element written and finite, each within `tol` relative error.
fn check_results(want: &[(String, HostTensor)], got: impl IntoIterator<Item = Vec<f32>>, tol: f64) {
    for ((name, w), got) in want.iter().zip(got) {
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name}: unwritten elements"
        );
        let e = rel_err(&got, &w.to_f64_vec(), 1e-6);
        assert!(e <= tol, "{name}: relative error {e:e}");
    }
}

/// Device outputs against the CPU executor's, each within `tol` relative
/// (2-norm) error.
fn check(g: &Graph, inputs: &Inputs, tol: f64) {
    check_scaled(g, inputs, tol, &[]);
}

/// As [`check`], with some outputs measured against another output's scale:
/// `(name, scale)` checks `‖dev − cpu‖ ≤ tol · ‖cpu[scale]‖` — for a
/// difference of two nearly equal values, whose own size says nothing about
/// the rounding it carries.
fn check_scaled(g: &Graph, inputs: &Inputs, tol: f64, scaled: &[(&str, &str)]) {
    check_with(g, inputs, tol, scaled, MatmulKernel::Cubecl);
}

/// [`check_scaled`] with the matrix products run by `matmul`.
fn check_with(g: &Graph, inputs: &Inputs, tol: f64, scaled: &[(&str, &str)], matmul: MatmulKernel) {
    let want = execute(g, inputs).expect("cpu");
    let got = on_device_with(g, inputs, matmul);
    assert_eq!(got.len(), want.len());
    for ((name, w), (_, d)) in want.iter().zip(&got) {
        assert_eq!(w.shape, d.shape, "{name}");
        assert_eq!(w.dtype(), d.dtype(), "{name}");
        let (w, d) = (w.to_f64_vec(), d.to_f64_vec());
        assert!(
            d.iter().all(|x| x.is_finite()),
            "{name}: unwritten or non-finite elements"
        );
        let scale = scaled.iter().find(|(n, _)| n == name).map(|(_, s)| {
            let (_, t) = want.iter().find(|(n, _)| n == s).expect("scale output");
            norm(&t.to_f64_vec())
        });
        let e = match scale {
            Some(s) => norm(&d.iter().zip(&w).map(|(a, b)| a - b).collect::<Vec<_>>()) / s,
            None => rel_err(&d, &w, 1e-6),
        };
        assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
    }
}

fn f32_input(
    g: &mut Graph,
    inputs: &mut Inputs,
    name: &str,
    shape: &[usize],
    lo: f64,
    hi: f64,
    seed: u64,
) -> coopc_compiler::NodeId {
    let n: usize = shape.iter().product();
    f32_input_of(g, inputs, name, shape, &uniform(&mut rng(seed), n, lo, hi))
}

/// An f32 graph input `name` of `shape`, given the values `v`.
fn f32_input_of(
    g: &mut Graph,
    inputs: &mut Inputs,
    name: &str,
    shape: &[usize],
    v: &[f64],
) -> coopc_compiler::NodeId {
    inputs.insert(
        name.into(),
        HostTensor::from_f64(DType::F32, shape.to_vec(), v).unwrap(),
    );
    g.input(name, DType::F32, shape.to_vec())
}

#[test]
fn every_elementwise_op_in_generated_programs_matches_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let shape = [7, 37];
    let x = f32_input(&mut g, &mut inp, "x", &shape, -2.0, 2.0, 1);
    let y = f32_input(&mut g, &mut inp, "y", &shape, 0.5, 2.0, 2);
    for u in UnaryOp::ALL {
        // log, sqrt, rsqrt need positive operands.
        let operand = if matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt) {
            y
        } else {
            x
        };
        let v = g.unary(u, operand);
        g.set_output(format!("unary.{}", u.name()), v);
    }
    for b in BinaryOp::ALL {
        // pow with a negative base is NaN for fractional exponents.
        let (a, c) = if b == BinaryOp::Pow { (y, x) } else { (x, y) };
        let v = g.binary(b, a, c);
        g.set_output(format!("binary.{}", b.name()), v);
    }
    let half = g.full(0.5, DType::F32, shape.to_vec());
    for c in CompareOp::ALL {
        let m = g.compare(c, x, half);
        let v = g.select(m, x, y);
        g.set_output(format!("select.{}", c.name()), v);
        g.set_output(format!("compare.{}", c.name()), m);
    }
    let cl = g.clamp(x, -0.5, 0.75);
    g.set_output("clamp", cl);
    let scaled = g.scale(x, 3.0);
    let ci = g.cast(scaled, DType::I32);
    g.set_output("cast.i32", ci);
    let back = g.cast(ci, DType::F32);
    let mixed = g.add(back, x);
    g.set_output("cast.roundtrip", mixed);
    check(&g, &inp, 1e-4);
}

#[test]
fn reductions_with_prologue_and_epilogue_match_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let x = f32_input(&mut g, &mut inp, "x", &[3, 5, 33], -3.0, 3.0, 3);
    for (i, axes) in [vec![2], vec![0], vec![1], vec![0, 2], vec![0, 1, 2]]
        .iter()
        .enumerate()
    {
        for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean] {
            let v = g.reduce(kind, x, axes, false);
            g.set_output(format!("{}.{i}", kind.name()), v);
        }
    }
    // The model's log-softmax: max, then sum(exp(x − max)) fused.
    let ls = g.log_softmax(x);
    g.set_output("log_softmax", ls);
    // Long rows (one cube per row, a partial last round of units) and
    // many short ones (one unit per output) of the same tensor.
    let y = f32_input(&mut g, &mut inp, "y", &[4, 1000], -5.0, 5.0, 4);
    let ly = g.log_softmax(y);
    g.set_output("log_softmax.long", ly);
    for kind in [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Mean] {
        for axis in [0, 1] {
            let v = g.reduce(kind, y, &[axis], false);
            g.set_output(format!("{}.long{axis}", kind.name()), v);
        }
    }
    check(&g, &inp, 1e-4);
}

#[test]
fn batched_matmul_matches_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let a = f32_input(&mut g, &mut inp, "a", &[3, 17, 45], -1.0, 1.0, 4);
    let b = f32_input(&mut g, &mut inp, "b", &[3, 45, 20], -1.0, 1.0, 5);
    let c = g.matmul(a, b);
    g.set_output("c", c);
    let p = f32_input(&mut g, &mut inp, "p", &[1, 64], -1.0, 1.0, 6);
    let q = f32_input(&mut g, &mut inp, "q", &[64, 33], -1.0, 1.0, 7);
    let r = g.matmul(p, q);
    g.set_output("r", r);
    // Operands read transposed (transposes only products read are never
    // copied), alone and together, and one transpose also read elsewhere.
    let at = f32_input(&mut g, &mut inp, "at", &[3, 45, 17], -1.0, 1.0, 8);
    let bt = f32_input(&mut g, &mut inp, "bt", &[3, 20, 45], -1.0, 1.0, 9);
    let (ta, tb) = (g.transpose(at), g.transpose(bt));
    let c_ta = g.matmul(ta, b);
    let c_tb = g.matmul(a, tb);
    let c_tt = g.matmul(ta, tb);
    g.set_output("c_ta", c_ta);
    g.set_output("c_tb", c_tb);
    g.set_output("c_tt", c_tt);
    let e = g.exp(tb);
    g.set_output("exp_tb", e);
    let fused = coopc_compiler::fusion::fuse(&g, &coopc_compiler::schedule::schedule(&g).order);
    let reads_transposed = fused
        .kernels
        .iter()
        .filter(|k| {
            matches!(
                k,
                coopc_compiler::fusion::Kernel::MatMul { trans_a: true, .. }
                    | coopc_compiler::fusion::Kernel::MatMul { trans_b: true, .. }
            )
        })
        .count();
    assert_eq!(
        reads_transposed, 2,
        "tb is also read by exp, so it is computed"
    );
    for kernel in MatmulKernel::ALL {
        check_with(&g, &inp, 1e-4, &[], kernel);
    }
}

#[test]
fn register_blocked_matmul_matches_the_cpu() {
    if device_missing() {
        return;
    }
    use coopc_kernels::matmul::Product;
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    // Blocks cut by every edge (100 = 64 + 36 rows, 130 = 2·64 + 2
    // columns, k = 70 not a multiple of the panel depth), each operand
    // read straight and transposed; an exact 64 × 64 block. Then the
    // 128 × 128 blocks the same way (200 = 128 + 72 rows, 260 = 2·128 + 4
    // columns) and an exact one.
    let (m, k, n) = (100, 70, 130);
    assert_eq!(Product::for_shape(m, n), Product::Blocked);
    assert_eq!(Product::for_shape(64, 64), Product::Blocked);
    assert_eq!(Product::for_shape(m, 16), Product::Tiled);
    assert_eq!(Product::for_shape(200, 260), Product::Wide);
    assert_eq!(Product::for_shape(128, 128), Product::Wide);
    assert_eq!(Product::for_shape(127, 260), Product::Blocked);
    let wide = f32_input(&mut g, &mut inp, "wa", &[200, 70], -1.0, 1.0, 26);
    let wide_b = f32_input(&mut g, &mut inp, "wb", &[70, 260], -1.0, 1.0, 27);
    let wide_bt = f32_input(&mut g, &mut inp, "wbt", &[260, 70], -1.0, 1.0, 28);
    let c = g.matmul(wide, wide_b);
    g.set_output("wide", c);
    let t = g.transpose(wide_bt);
    let c = g.matmul(wide, t);
    g.set_output("wide_tb", c);
    let sq = f32_input(&mut g, &mut inp, "sq128", &[128, 128], -1.0, 1.0, 29);
    let c = g.matmul(sq, sq);
    g.set_output("square_128", c);
    let a = f32_input(&mut g, &mut inp, "a", &[2, m, k], -1.0, 1.0, 21);
    let b = f32_input(&mut g, &mut inp, "b", &[2, k, n], -1.0, 1.0, 22);
    let at = f32_input(&mut g, &mut inp, "at", &[2, k, m], -1.0, 1.0, 23);
    let bt = f32_input(&mut g, &mut inp, "bt", &[2, n, k], -1.0, 1.0, 24);
    let (ta, tb) = (g.transpose(at), g.transpose(bt));
    for (name, x, y) in [
        ("c", a, b),
        ("c_ta", ta, b),
        ("c_tb", a, tb),
        ("c_tt", ta, tb),
    ] {
        let c = g.matmul(x, y);
        g.set_output(name, c);
    }
    let sq = f32_input(&mut g, &mut inp, "sq", &[64, 64], -1.0, 1.0, 25);
    let c = g.matmul(sq, sq);
    g.set_output("square", c);
    for kernel in MatmulKernel::ALL {
        check_with(&g, &inp, 1e-5, &[], kernel);
    }
}

#[test]
fn movement_ops_match_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let x = f32_input(&mut g, &mut inp, "x", &[2, 3, 4], -1.0, 1.0, 8);
    let y = f32_input(&mut g, &mut inp, "y", &[2, 5, 4], -1.0, 1.0, 9);
    let p = g.permute(x, &[2, 0, 1]);
    g.set_output("permute", p);
    let s = g.slice(x, &[1, 0, 1], &[2, 3, 3]);
    g.set_output("slice", s);
    let pd = g.pad(x, &[0, 1, 2], &[1, 0, 1], -0.5);
    g.set_output("pad", pd);
    let c = g.concat(&[x, y, x], 1);
    g.set_output("concat", c);
    let b = g.reshape(x, vec![2, 1, 12]);
    let bb = g.broadcast(b, vec![3, 2, 5, 12]);
    g.set_output("broadcast", bb);
    check(&g, &inp, 0.0);
}

#[test]
fn index_ops_match_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let mut r = rng(10);
    let table = f32_input(&mut g, &mut inp, "table", &[11, 6], -1.0, 1.0, 11);
    let ids: Vec<i32> = (0..14).map(|_| r.gen_range(0..11)).collect();
    inp.insert("ids".into(), HostTensor::i32(vec![2, 7], ids.clone()));
    let ids_n = g.input("ids", DType::I32, vec![2, 7]);
    let gathered = g.gather(table, ids_n);
    g.set_output("gather", gathered);
    let upd = f32_input(&mut g, &mut inp, "upd", &[2, 7, 6], -1.0, 1.0, 12);
    let rows = g.scatter_add_rows(ids_n, upd, 11);
    g.set_output("scatter_add_rows", rows);
    // More ids than a cube scans at once and rows longer than a cube, with
    // rows no id names.
    let many: Vec<i32> = (0..600).map(|_| r.gen_range(0..40)).collect();
    inp.insert("many".into(), HostTensor::i32(vec![600], many));
    let many_n = g.input("many", DType::I32, vec![600]);
    let wide = f32_input(&mut g, &mut inp, "wide", &[600, 300], -1.0, 1.0, 15);
    let rows2 = g.scatter_add_rows(many_n, wide, 45);
    g.set_output("scatter_add_rows_wide", rows2);
    let oh = g.one_hot(ids_n, 11, DType::F32);
    g.set_output("one_hot", oh);
    let logits = f32_input(&mut g, &mut inp, "logits", &[2, 7, 11], -1.0, 1.0, 13);
    let tgt: Vec<i32> = (0..14).map(|_| r.gen_range(0..11)).collect();
    inp.insert("tgt".into(), HostTensor::i32(vec![2, 7, 1], tgt));
    let t = g.input("tgt", DType::I32, vec![2, 7, 1]);
    let taken = g.take_along_axis(logits, t, 2);
    g.set_output("take_along_axis", taken);
    let u = f32_input(&mut g, &mut inp, "u", &[2, 7, 1], -1.0, 1.0, 14);
    let sc = g.scatter_add(logits, t, u, 2);
    g.set_output("scatter_add", sc);
    let io = g.iota(1, DType::F32, vec![3, 5, 2]);
    g.set_output("iota", io);
    let lit = g.literal(&[1.0, -2.0, 3.5], DType::F32, vec![3]);
    g.set_output("literal", lit);
    check(&g, &inp, 1e-6);
}

#[test]
fn rope_kernels_match_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    // Several cubes of elements; a one-position table (the decode step).
    for (i, (xs, t, hd)) in [(vec![3, 4, 37, 64], 37, 64), (vec![2, 3, 1, 8], 1, 8)]
        .into_iter()
        .enumerate()
    {
        let seed = 40 + 4 * i as u64;
        let x = f32_input(&mut g, &mut inp, &format!("x{i}"), &xs, -1.0, 1.0, seed);
        let c = f32_input(
            &mut g,
            &mut inp,
            &format!("c{i}"),
            &[t, hd],
            -1.0,
            1.0,
            seed + 1,
        );
        let s = f32_input(
            &mut g,
            &mut inp,
            &format!("s{i}"),
            &[t, hd],
            -1.0,
            1.0,
            seed + 2,
        );
        for transpose in [false, true] {
            let y = g.rope(x, c, s, transpose);
            g.set_output(format!("rope{i}_{transpose}"), y);
        }
    }
    check(&g, &inp, 1e-6);
}

#[test]
fn rms_norm_kernels_match_the_cpu() {
    if device_missing() {
        return;
    }
    use coopc_compiler::ir::NormOperand;
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    // Rows longer than a cube, a gain over more columns than one `dw`
    // cube takes; one short row (the decode step).
    for (i, xs) in [vec![3, 37, 700], vec![1, 1, 24]].into_iter().enumerate() {
        let d = xs[2];
        let seed = 60 + 4 * i as u64;
        let x = f32_input(&mut g, &mut inp, &format!("x{i}"), &xs, -2.0, 2.0, seed);
        let w = f32_input(&mut g, &mut inp, &format!("w{i}"), &[d], 0.5, 1.5, seed + 1);
        let dy = f32_input(
            &mut g,
            &mut inp,
            &format!("dy{i}"),
            &xs,
            -1.0,
            1.0,
            seed + 2,
        );
        let y = g.rms_norm(x, w, 1e-5);
        g.set_output(format!("rms_norm{i}"), y);
        for wrt in [NormOperand::Input, NormOperand::Weight] {
            let gr = g.rms_norm_grad(wrt, [x, w], dy, 1e-5);
            g.set_output(format!("rms_norm{i}_d{}", wrt.name()), gr);
        }
    }
    check(&g, &inp, 1e-5);
}

#[test]
fn optimiser_step_kernels_match_the_cpu() {
    if device_missing() {
        return;
    }
    let rules = step_rules();
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    inp.insert(
        "t".into(),
        HostTensor::from_f64(DType::F32, vec![], &[4.0]).unwrap(),
    );
    let t = g.input("t", DType::F32, vec![]);
    // 900 elements (not a multiple of a cube); the gradient loaded, computed
    // by a fused prologue, computed there and also an output, or a
    // transpose read through strides.
    let shape = [3, 300];
    for (r, rule) in rules.into_iter().enumerate() {
        for case in 0..4 {
            let seed = 300 + 10 * r as u64 + 3 * case;
            let name = |x: &str| format!("{}{r}_{case}.{x}", rule.name());
            let mut input = |x: &str, lo, hi, k| {
                f32_input(&mut g, &mut inp, &name(x), &shape, lo, hi, seed + k)
            };
            let p = input("p", -1.0, 1.0, 0);
            let g1 = input("g1", -1.0, 1.0, 1);
            let g2 = input("g2", -1.0, 1.0, 2);
            let m = input("m", -0.3, 0.3, 3);
            let v = input("v", 0.01, 0.2, 4);
            let grad = match case {
                0 => g1,
                // Read through permuted strides.
                3 => {
                    let gt = f32_input(&mut g, &mut inp, &name("gt"), &[300, 3], -1.0, 1.0, seed);
                    g.transpose(gt)
                }
                _ => {
                    let a = g.scale(g1, 0.3);
                    let b = g.scale(g2, 0.7);
                    g.add(a, b)
                }
            };
            if case == 2 {
                g.set_output(name("grad"), grad);
            }
            let ops = match rule.arity() {
                2 => vec![p, grad],
                3 => vec![p, grad, m],
                _ => vec![p, grad, m, v, t],
            };
            for (&out, id) in rule.outputs().iter().zip(g.optim_steps(rule, &ops)) {
                g.set_output(name(out.name()), id);
            }
        }
    }
    // AdamW's bias corrections take a device powf (1e-4 as for every kernel).
    check(&g, &inp, 1e-4);
}

/// A dyadic f32 input: `k/16` for whole `k` in `[-64, 64]`, a bf16 number
/// whose products and sums of a few dozen are exact in f32 in any order,
/// so that only bf16 rounding can tell two executors apart.
fn dyadic_input(
    g: &mut Graph,
    inputs: &mut Inputs,
    name: &str,
    shape: &[usize],
    seed: u64,
) -> coopc_compiler::NodeId {
    let mut r = rng(seed);
    let v: Vec<f64> = (0..shape.iter().product::<usize>())
        .map(|_| f64::from(r.gen_range(-64i32..=64)) / 16.0)
        .collect();
    f32_input_of(g, inputs, name, shape, &v)
}

/// bf16 on the device: values held in f32 buffers, rounded to nearest
/// (ties to even) wherever one is stored — every register of a fused
/// program, a bf16 constant, a reduction's result, a product's — bit for
/// bit as the CPU executor rounds them. The inputs are dyadic, so every f32
/// operation here is exact and only a missed or extra rounding shows; the
/// f32 twin of the same graph (no rounding) must differ.
#[test]
fn bf16_values_are_rounded_where_stored_as_on_the_cpu() {
    if device_missing() {
        return;
    }
    let build = |dtype: DType| {
        let mut g = Graph::new();
        let mut inp = Inputs::new();
        let x = dyadic_input(&mut g, &mut inp, "x", &[6, 40], 41);
        let w = dyadic_input(&mut g, &mut inp, "w", &[40, 24], 42);
        let (x, w) = (g.cast(x, dtype), g.cast(w, dtype));
        // x² has up to 13 significant bits: rounded before the add.
        let sq = g.mul(x, x);
        let s = g.add(sq, x);
        // 1.001 is not a bf16 number (it rounds to 1).
        let c = g.scale(s, 1.001);
        g.set_output("chain", c);
        // A reduction of bf16 values (accumulated in f32) and its epilogue.
        let r = g.reduce(ReduceKind::Sum, s, &[1], false);
        let half = g.scale(r, 0.5);
        let e = g.add(half, r);
        g.set_output("sum.epilogue", e);
        // A product, rounded after its kernel; then a fused use of it.
        let p = g.matmul(x, w);
        g.set_output("product", p);
        let pp = g.mul(p, p);
        let out = g.cast(pp, DType::F32);
        g.set_output("product.squared.f32", out);
        (g, inp)
    };
    let (g, inp) = build(DType::Bf16);
    let want = execute(&g, &inp).expect("cpu");
    let got = on_device(&g, &inp);
    let (g32, inp32) = build(DType::F32);
    let single = execute(&g32, &inp32).expect("cpu f32");
    for (((name, w), (_, d)), (_, s)) in want.iter().zip(&got).zip(&single) {
        assert_eq!(w.dtype(), d.dtype(), "{name}");
        let bits = |t: &HostTensor| -> Vec<u32> {
            t.to_f64_vec()
                .iter()
                .map(|&x| (x as f32).to_bits())
                .collect()
        };
        let (w, d, s) = (bits(w), bits(d), bits(s));
        let differ = w.iter().zip(&d).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "{name}: {differ} of {} elements differ from the CPU",
            w.len()
        );
        assert!(
            d.iter().all(|b| b & 0xffff == 0),
            "{name}: a value that is not a bf16 number"
        );
        assert!(w != s, "{name}: bf16 equals f32, so the test tests nothing");
    }
}

/// A bf16 meta-step on the device (first-order and truncated) against the
/// CPU executor's bf16 one: the device's products and reductions may sum
/// in other orders, so a value near a bf16 rounding boundary may round the
/// other way; the two stay at most half as far apart as bf16 is from the
/// f64 reference, and the device's bf16 is as far from f64 as the CPU's
/// (and not the f32 result).
#[test]
fn bf16_meta_steps_on_the_device_match_the_cpu_to_bf16_rounding() {
    if device_missing() {
        return;
    }
    use coopc_compiler::spec::HypergradKind;
    for kind in [HypergradKind::FirstOrder, HypergradKind::Truncated] {
        let graph = |dtype: Precision| {
            let mut spec = tiny_spec();
            spec.bilevel.hypergradient.kind = kind;
            spec.backend.dtype = dtype;
            let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
            let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 33), DType::F32);
            let mut g = ms.graph;
            Pipeline::standard().run(&mut g);
            (g, inputs)
        };
        let grads = |outs: Vec<(String, HostTensor)>| {
            gradient_outputs(outs.iter().map(|(n, t)| (n.as_str(), t.to_f64_vec())))
        };
        let (g64, inputs) = graph(Precision::F64);
        let reference = grads(execute(&g64, &with_float_dtype(&inputs, DType::F64)).unwrap());
        let (g16, _) = graph(Precision::Bf16);
        let cpu = grads(execute(&g16, &inputs).unwrap());
        let device = grads(on_device(&g16, &inputs));
        let (g32, _) = graph(Precision::F32);
        let device32 = grads(on_device(&g32, &inputs));
        let e_cpu = rel_err(&cpu, &reference, 1e-12);
        let e_dev = rel_err(&device, &reference, 1e-12);
        let e_split = rel_err(&device, &cpu, 1e-12);
        let e32 = rel_err(&device32, &reference, 1e-12);
        eprintln!(
            "{kind:?}: bf16 vs f64: cpu {e_cpu:.2e}, device {e_dev:.2e}; device vs cpu {e_split:.2e}; \
             device f32 vs f64 {e32:.2e}"
        );
        // (How far bf16 is from f64 depends on the inputs: the first-order
        // hypergradient is a difference of two nearly equal gradients;
        // tests/bf16.rs holds it to the reference.)
        assert!(
            e_split <= 0.5 * e_cpu,
            "{kind:?}: device off the cpu by {e_split:.2e}, bf16 off f64 by {e_cpu:.2e}"
        );
        assert!(
            e_dev <= 1.5 * e_cpu,
            "{kind:?}: device bf16 off f64 by {e_dev:.2e}, cpu bf16 by {e_cpu:.2e}"
        );
        assert!(
            e_dev > 20.0 * e32,
            "{kind:?}: device bf16 ({e_dev:.2e}) no further from f64 than f32 ({e32:.2e})"
        );
    }
}

/// Every bf16 value of a bf16 meta-step, as the device stores it, is a
/// bf16 number: each bf16 node is read through a cast to f32 (which does
/// not round), so a kernel family that leaves f32 results behind shows.
#[test]
fn every_bf16_value_the_device_stores_is_a_bf16_number() {
    if device_missing() {
        return;
    }
    use coopc_compiler::spec::HypergradKind;
    let mut spec = tiny_spec();
    spec.bilevel.hypergradient.kind = HypergradKind::Truncated;
    spec.backend.dtype = Precision::Bf16;
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 34), DType::F32);
    let mut g = ms.graph;
    Pipeline::standard().run(&mut g);
    let half: Vec<_> = g
        .node_ids()
        .filter(|&id| g.ty(id).dtype == DType::Bf16)
        .collect();
    let mut families = std::collections::BTreeSet::new();
    for &id in &half {
        families.insert(g.op(id).name());
        let f = g.cast(id, DType::F32);
        g.set_output(format!("bf16.{}", id.index()), f);
    }
    for op in ["matmul", "causal_attention", "rms_norm", "rope"] {
        assert!(families.contains(op), "no bf16 {op} in {families:?}");
    }
    let got = on_device(&g, &inputs);
    let mut checked = 0;
    for (name, t) in got.iter().filter(|(n, _)| n.starts_with("bf16.")) {
        let id: usize = name["bf16.".len()..].parse().unwrap();
        for (i, x) in t.to_f64_vec().into_iter().enumerate() {
            assert!(
                (x as f32).to_bits() & 0xffff == 0,
                "node %{id} ({}) element {i} = {x:e} is not a bf16 number",
                g.op(half.iter().copied().find(|h| h.index() == id).unwrap())
                    .name()
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} bf16 values");
}

#[test]
fn truncated_meta_step_on_the_device_matches_the_cpu() {
    if device_missing() {
        return;
    }
    let mut spec = tiny_spec();
    spec.backend.dtype = Precision::F32;
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 21), DType::F32);
    let mut g = ms.graph;
    Pipeline::standard().run(&mut g);
    check(&g, &inputs, 1e-4);
}

/// The log-prob scorer on the device, whose logits the fused linear
/// log-prob kernel replaces (scored positions a prefix of each sequence)
/// and whose attention the attention kernel does (grouped-query).
#[test]
fn scorer_with_the_fused_linear_logprob_matches_the_cpu() {
    if device_missing() {
        return;
    }
    use coopc_compiler::lowering::lower_logprobs;
    let mut spec = tiny_spec();
    spec.backend.dtype = Precision::F32;
    let shapes = BatchShapes::from_spec(&spec);
    let ms = lower_meta_step(&spec, shapes);
    let mut inputs = with_float_dtype(&meta_inputs(&spec, &ms, 22), DType::F32);
    let ids = inputs["step0.rl.input_ids"].clone();
    inputs.insert("input_ids".into(), ids);
    let mut g = lower_logprobs(&spec, shapes);
    Pipeline::standard().run(&mut g);
    let fused = coopc_compiler::fusion::fuse(&g, &coopc_compiler::schedule::schedule(&g).order);
    use coopc_compiler::fusion::Kernel;
    assert!(fused
        .kernels
        .iter()
        .any(|k| matches!(k, Kernel::LinearLogprob { .. })));
    assert!(fused
        .kernels
        .iter()
        .any(|k| matches!(k, Kernel::Attention { kv_heads: 1, .. })));
    check(&g, &inputs, 1e-4);
}

#[test]
fn adamw_first_order_meta_step_on_the_device_matches_the_cpu() {
    if device_missing() {
        return;
    }
    use coopc_compiler::spec::{HypergradKind, OptimKind};
    let mut spec = tiny_spec();
    spec.backend.dtype = Precision::F32;
    spec.bilevel.hypergradient.kind = HypergradKind::FirstOrder;
    spec.bilevel.hypergradient.unroll = 1;
    spec.bilevel.hypergradient.backprop = 0;
    for opt in [&mut spec.optim.lower, &mut spec.optim.upper] {
        opt.kind = OptimKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
    }
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 22), DType::F32);
    let mut g = ms.graph;
    Pipeline::standard().run(&mut g);
    // The cooperative gain is a difference of two RL losses of similar size.
    check_scaled(&g, &inputs, 1e-4, &[("gain", "loss.rl")]);
}

#[test]
fn fused_linear_logprob_matches_log_softmax_of_the_full_logits() {
    if device_missing() {
        return;
    }
    let (t, d, v) = (70, 80, 1000);
    let mut r = rng(30);
    let h = uniform(&mut r, t * d, -1.0, 1.0);
    let w = uniform(&mut r, v * d, -0.5, 0.5);
    // Targets repeat so that dW rows collect several tokens.
    let y: Vec<f64> = (0..t)
        .map(|_| r.gen_range(0..v / 50) as f64 * 50.0)
        .collect();
    let gv = uniform(&mut r, t, -1.0, 1.0);
    // Reference: the [T, V] logits, log-softmax and the target column.
    let mut g = Graph::new();
    let hn = g.input("h", DType::F32, vec![t, d]);
    let wn = g.input("w", DType::F32, vec![v, d]);
    let yn = g.input("y", DType::I32, vec![t, 1]);
    let wt = g.permute(wn, &[1, 0]);
    let logits = g.matmul(hn, wt);
    let ls = g.log_softmax(logits);
    let lp = g.take_along_axis(ls, yn, 1);
    let lse = log_sum_exp(&mut g, logits, 1);
    // Backward reference: the gradient of Σ_t g_t · logprob_t.
    let gn = g.input("g", DType::F32, vec![t, 1]);
    let weighted = g.mul(lp, gn);
    let loss = g.sum_all(weighted);
    let grads = grad(&mut g, loss, &[hn, wn]);
    g.set_output("logprob", lp);
    g.set_output("lse", lse);
    g.set_output("dh", grads[0]);
    g.set_output("dw", grads[1]);
    let inputs = Inputs::from([
        (
            "h".to_string(),
            HostTensor::from_f64(DType::F32, vec![t, d], &h).unwrap(),
        ),
        (
            "w".to_string(),
            HostTensor::from_f64(DType::F32, vec![v, d], &w).unwrap(),
        ),
        (
            "y".to_string(),
            HostTensor::from_f64(DType::I32, vec![t, 1], &y).unwrap(),
        ),
        (
            "g".to_string(),
            HostTensor::from_f64(DType::F32, vec![t, 1], &gv).unwrap(),
        ),
    ]);
    let want = execute(&g, &inputs).unwrap();
    let [hf, wf, yf, gf] = ["h", "w", "y", "g"].map(|n| f32s(&inputs[n]));
    // Forward, then backward from the forward's own lse: the whole
    // vocabulary at once (the executor's chunk at this size), and in
    // chunks of 64 and 300 rows (the last ones partial), dh summed over
    // the chunks; with either matmul. Chunks of 10 rows start at offsets
    // of W and dW that are multiples of 256 bytes every other chunk, so
    // CubeCL's products take every other chunk through views and coopc's
    // the rest.
    let chunks = [coopc_compiler::ir::kernel::device_chunk(t, v), 64, 300, 10];
    for (kernel, chunk) in MatmulKernel::ALL
        .into_iter()
        .flat_map(|k| chunks.map(|c| (k, c)))
    {
        let got = with_device!(|dev| {
            dev.matmul = kernel;
            let (lp, lse) = dev.linear_logprob(&hf, &wf, &yf, d).expect("forward");
            let (dh, dw) = dev
                .linear_logprob_backward(&hf, &wf, &yf, &lse, &gf, d, chunk)
                .expect("backward");
            // Chunks of 10: 50 of the 100 chunks' logit products, 50 of
            // their dW products and 50 of the 99 dh products after the
            // first read or write at unaligned offsets.
            let unaligned = if chunk == 10 { 150 } else { 0 };
            let fallbacks = if kernel == MatmulKernel::Cubecl {
                unaligned
            } else {
                0
            };
            assert_eq!(
                dev.matmul_fallbacks(),
                fallbacks,
                "{kernel:?}, chunks of {chunk}"
            );
            [lp, lse, dh, dw]
        });
        check_results(&want, got, 1e-5);
    }
}

/// The device as a [`Backend`]: CUDA with `COOPC_TEST_CUDA=1`, else wgpu.
fn device_backend() -> Box<dyn Backend> {
    if cuda_requested() {
        Box::new(Device::cuda().expect("CUDA device"))
    } else {
        Box::new(Device::wgpu().expect("wgpu adapter"))
    }
}

/// The decode attention over a cache: head dims 64 and 7, grouped-query
/// heads, caches longer than one chunk of the kernel, positions at the
/// start, inside and at the end of the cache (and past it, clamped).
#[test]
fn cached_attention_matches_the_cpu() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    for (i, (b, h, kv, l, hd, pos)) in [
        (2, 4, 2, 700, 64, 600),
        (1, 2, 2, 700, 64, 699),
        (3, 3, 1, 9, 7, 0),
        (1, 4, 4, 20, 16, 5),
        (1, 2, 1, 6, 8, 9),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 80 + 4 * i as u64;
        let q = f32_input(
            &mut g,
            &mut inp,
            &format!("q{i}"),
            &[b, h, 1, hd],
            -1.0,
            1.0,
            seed,
        );
        let k = f32_input(
            &mut g,
            &mut inp,
            &format!("k{i}"),
            &[b, kv, l, hd],
            -1.0,
            1.0,
            seed + 1,
        );
        let v = f32_input(
            &mut g,
            &mut inp,
            &format!("v{i}"),
            &[b, kv, l, hd],
            -1.0,
            1.0,
            seed + 2,
        );
        inp.insert(format!("pos{i}"), HostTensor::i32(vec![1], vec![pos]));
        let p = g.input(format!("pos{i}"), DType::I32, vec![1]);
        let o = g.cached_attention(q, k, v, p);
        g.set_output(format!("cached{i}"), o);
    }
    check(&g, &inp, 1e-5);
}

/// `update_slice` writes one position of a cache-like tensor; with a donated
/// base that nothing but the caller's inputs holds, into the base's own
/// buffer (the caller's old value then holds the new position), else into
/// a copy (the old value is untouched). Every path equals the CPU's result.
#[test]
fn update_slice_writes_a_donated_base_in_place() {
    if device_missing() {
        return;
    }
    let d = device_backend();
    let shape = vec![2, 3, 7, 5];
    let build = |inp: &mut Inputs, donate: bool, index: i32| {
        let mut g = Graph::new();
        let base = f32_input(&mut g, inp, "cache", &shape, -1.0, 1.0, 70);
        let upd = f32_input(&mut g, inp, "new", &[2, 3, 1, 5], -1.0, 1.0, 71);
        inp.insert("pos".into(), HostTensor::i32(vec![1], vec![index]));
        let pos = g.input("pos", DType::I32, vec![1]);
        let out = g.update_slice(base, upd, pos, 2);
        // A reader of the new cache, as the decode step's attention.
        let s = g.sum(out, &[3], false);
        g.set_output("next.cache", out);
        g.set_output("sum", s);
        if donate {
            g.donate("cache");
        }
        g
    };
    // (donated, another holder of the value, index; written in place?)
    for (donate, shared, index, in_place) in [
        (true, false, 4, true),
        (true, true, 4, false),
        (false, false, 4, false),
        (true, false, 0, true),
        (true, false, 7, true),
    ] {
        let mut inp = Inputs::new();
        let g = build(&mut inp, donate, index);
        let want = execute(&g, &inp).unwrap();
        let cache = d.resident(Value::host(inp["cache"].clone())).unwrap();
        let other_holder = shared.then(|| cache.clone());
        let mut vals: HashMap<String, Value> = inp
            .iter()
            .map(|(k, v)| (k.clone(), Value::host(v.clone())))
            .collect();
        vals.insert("cache".into(), cache);
        let got = d.run_values(&program(&g), &vals, &|_| true).unwrap();
        for ((name, w), (_, v)) in want.iter().zip(&got) {
            let v = v.as_host().expect("read back").to_f64_vec();
            assert!(
                rel_err(&v, &w.to_f64_vec(), 1e-6) <= 1e-6,
                "{name} (donated {donate}, shared {shared}, index {index})"
            );
        }
        let old = d.to_host(&vals["cache"]).unwrap().to_f64_vec();
        let written = old != inp["cache"].to_f64_vec();
        let changes = (0..7).contains(&index);
        assert_eq!(
            written,
            in_place && changes,
            "donated {donate}, shared {shared}, index {index}: the old value was {}",
            if written { "overwritten" } else { "kept" }
        );
        drop(other_holder);
    }
    // Two values of one buffer (a graph output and a pass-through of it):
    // donating one must not change the other.
    let mut inp = Inputs::new();
    let g = build(&mut inp, true, 2);
    let mut pass = Graph::new();
    let x = pass.input("x", DType::F32, shape.clone());
    pass.set_output("a", x);
    pass.set_output("b", x);
    let x = d.resident(Value::host(inp["cache"].clone())).unwrap();
    let mut two = d
        .run_values(
            &program(&pass),
            &HashMap::from([("x".to_string(), x)]),
            &|_| false,
        )
        .unwrap();
    let (b, a) = (two.pop().unwrap().1, two.pop().unwrap().1);
    let mut vals: HashMap<String, Value> = inp
        .iter()
        .map(|(k, v)| (k.clone(), Value::host(v.clone())))
        .collect();
    vals.insert("cache".into(), a);
    d.run_values(&program(&g), &vals, &|_| true).unwrap();
    assert_eq!(
        d.to_host(&b).unwrap().to_f64_vec(),
        inp["cache"].to_f64_vec(),
        "a value sharing the donated buffer is untouched"
    );
}

/// The device memory peak a run records covers the buffers live at once:
/// x (4 MiB, uploaded) and e = exp(x) (4 MiB) both exist when the sum
/// reads e; a second input-sized value is never needed.
#[test]
fn the_device_memory_peak_counts_the_live_buffers() {
    if device_missing() {
        return;
    }
    let d = device_backend();
    let n = 1 << 20;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, vec![n]);
    let e = g.exp(x);
    // Read e by something that is not fused with it, so it is written.
    let s = g.sum(e, &[0], false);
    let y = g.mul(e, e);
    let t = g.sum(y, &[0], false);
    let out = g.add(s, t);
    g.set_output("out", out);
    let mut r = rng(80);
    let inputs = Inputs::from([(
        "x".to_string(),
        HostTensor::from_f64(DType::F32, vec![n], &uniform(&mut r, n, -1.0, 1.0)).unwrap(),
    )]);
    d.run(&program(&g), &inputs).unwrap();
    d.track_memory(true);
    d.run(&program(&g), &inputs).unwrap();
    let peak = d.memory_peak().expect("a device backend reports it");
    d.track_memory(false);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    assert!(
        mib(peak) >= 8.0,
        "x and exp(x) are live together: {:.2} MiB",
        mib(peak)
    );
    assert!(
        mib(peak) < 32.0,
        "nothing else of that size: {:.2} MiB",
        mib(peak)
    );
    assert_eq!(CpuBackend.memory_peak(), None);
}

/// State kept between runs never crosses to the host: a value made
/// resident once feeds run after run, outputs stay on the device unless
/// asked for, and only what is read back is downloaded.
#[test]
fn resident_values_stay_on_the_device_between_runs() {
    if device_missing() {
        return;
    }
    let d = device_backend();
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let x = f32_input(&mut g, &mut inp, "x", &[64], -1.0, 1.0, 31);
    let e = g.unary(UnaryOp::Tanh, x);
    let y = g.binary(BinaryOp::Add, e, x);
    g.set_output("y", y);
    let n_bytes = 4 * 64;

    let t0 = d.transfers().unwrap();
    let xv = d.resident(Value::host(inp["x"].clone())).unwrap();
    assert!(xv.is_resident());
    assert_eq!(d.transfers().unwrap().since(t0).uploaded, n_bytes);

    // Twice through the graph, the intermediate never leaving the device.
    let t1 = d.transfers().unwrap();
    let mut vals = HashMap::from([("x".to_string(), xv)]);
    let once = d.run_values(&program(&g), &vals, &|_| false).unwrap();
    assert!(once[0].1.is_resident());
    vals.insert("x".into(), once[0].1.clone());
    let twice = d
        .run_values(&program(&g), &vals, &|name| name == "y")
        .unwrap();
    let moved = d.transfers().unwrap().since(t1);
    assert_eq!(moved.uploaded, 0, "resident inputs are not uploaded");
    assert_eq!(moved.downloaded, n_bytes, "only the requested output");

    let cpu_once = execute(&g, &inp).unwrap().remove(0).1;
    let cpu_twice = execute(&g, &HashMap::from([("x".to_string(), cpu_once)]))
        .unwrap()
        .remove(0)
        .1;
    let got = twice[0].1.as_host().expect("read back").to_f64_vec();
    assert!(rel_err(&got, &cpu_twice.to_f64_vec(), 1e-6) <= 1e-5);

    // Zeros are made on the device.
    let t2 = d.transfers().unwrap();
    let z = d.zeros(&g.ty(x).clone()).unwrap();
    assert_eq!(d.transfers().unwrap().since(t2).uploaded, 0);
    assert!(d
        .to_host(&z)
        .unwrap()
        .to_f64_vec()
        .iter()
        .all(|&v| v == 0.0));

    // A resident value of the wrong type, or handed to the CPU, is an error.
    let mut small = Graph::new();
    let s = small.input("x", DType::F32, vec![32]);
    let s2 = small.unary(UnaryOp::Exp, s);
    small.set_output("y", s2);
    let e = d
        .run_values(&program(&small), &vals, &|_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input `x`") && e.contains("[32]"), "{e}");
    let e = CpuBackend
        .run_values(&program(&g), &vals, &|_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lives on the") && e.contains("device"), "{e}");
    let f64_value = Value::host(HostTensor::f64(vec![1], vec![1.0]));
    assert!(d
        .resident(f64_value)
        .unwrap_err()
        .to_string()
        .contains("f32"));
    // A value resident on another device (of the same backend) is refused.
    let other = device_backend();
    let e = other
        .run_values(&program(&g), &vals, &|_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another"), "{e}");
}

/// The hand-written causal attention (grouped-query: 4 query heads over 2
/// key/value heads; 150 positions, more than one cube's worth of keys)
/// against the model's attention graph on the CPU and its autodiff
/// gradients, the backward run from the forward's own `lse`.
#[test]
fn attention_kernels_match_the_model_attention_and_its_gradients() {
    if device_missing() {
        return;
    }
    use coopc_kernels::attention::AttentionShape;
    // Query tiles cut by the sequence end (150, 33, 17, 5 positions), the
    // largest head dim, an odd one, a sequence shorter than a key tile, and
    // 1, 2 and 4 query heads per key/value head.
    for (i, (batch, heads, kv_heads, seq, head_dim)) in [
        (2, 4, 2, 150, 16),
        (1, 2, 1, 5, 128),
        (1, 3, 3, 33, 7),
        (1, 4, 1, 17, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let s = AttentionShape {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
        };
        attention_case(s, 41 + 10 * i as u64);
    }
}

fn attention_case(s: coopc_kernels::attention::AttentionShape, seed: u64) {
    use coopc_compiler::model::causal_attention;
    use coopc_kernels::attention::AttentionShape;
    let qs = vec![s.batch, s.heads, s.seq, s.head_dim];
    let kvs = vec![s.batch, s.kv_heads, s.seq, s.head_dim];
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let q = f32_input(&mut g, &mut inp, "q", &qs, -1.0, 1.0, seed);
    let k = f32_input(&mut g, &mut inp, "k", &kvs, -1.0, 1.0, seed + 1);
    let v = f32_input(&mut g, &mut inp, "v", &kvs, -1.0, 1.0, seed + 2);
    let d_o = f32_input(&mut g, &mut inp, "do", &qs, -1.0, 1.0, seed + 3);
    // Key/value head h / (H / H_kv) for query head h, as the model repeats them.
    let group = s.heads / s.kv_heads;
    let expand = |g: &mut Graph, x| {
        let e = g.reshape(x, vec![s.batch, s.kv_heads, 1, s.seq, s.head_dim]);
        let e = g.broadcast(e, vec![s.batch, s.kv_heads, group, s.seq, s.head_dim]);
        g.reshape(e, qs.clone())
    };
    let (ke, ve) = (expand(&mut g, k), expand(&mut g, v));
    let o = causal_attention(&mut g, q, ke, ve);
    let weighted = g.mul(o, d_o);
    let loss = g.sum_all(weighted);
    let grads = grad(&mut g, loss, &[q, k, v]);
    g.set_output("o", o);
    g.set_output("dq", grads[0]);
    g.set_output("dk", grads[1]);
    g.set_output("dv", grads[2]);
    let want = execute(&g, &inp).unwrap();
    let [qf, kf, vf, df] = ["q", "k", "v", "do"].map(|n| f32s(&inp[n]));
    let got = with_device!(|dev| {
        // A shape the kernels cannot take is an error, not a launch.
        let bad = AttentionShape { head_dim: 200, ..s };
        let e = dev.attention(&qf, &kf, &vf, bad).unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");
        let (o, lse) = dev.attention(&qf, &kf, &vf, s).expect("forward");
        let [dq, dk, dv] = dev
            .attention_backward(&qf, &kf, &vf, &o, &lse, &df, s)
            .expect("backward");
        [o, dq, dk, dv]
    });
    check_results(&want, got, 1e-4);
}

/// In `g`'s fused schedule: whether some kernel is the op's own (`own`),
/// and the sizes of the gradient groups (`group` of each kernel).
fn op_kernel_and_grad_groups(
    g: &Graph,
    own: impl Fn(&coopc_compiler::fusion::Kernel) -> bool,
    group: impl Fn(&coopc_compiler::fusion::Kernel) -> Option<usize>,
) -> (bool, Vec<usize>) {
    let order = coopc_compiler::schedule::schedule(g).order;
    let kernels = coopc_compiler::fusion::fuse(g, &order).kernels;
    (
        kernels.iter().any(own),
        kernels.iter().filter_map(group).collect(),
    )
}

/// The linear log-prob ops of the IR (`linear_logprob` and its two
/// `linear_logprob_grad`s; a vocabulary longer than a cube, repeated
/// targets) through the device executor against the CPU executor; the
/// log-prob is the fused kernel, and its gradients share one forward. A target
/// outside the vocabulary makes its row NaN on the device (and is an
/// error on the CPU).
#[test]
fn linear_logprob_ops_match_the_cpu_executor() {
    if device_missing() {
        return;
    }
    use coopc_compiler::fusion::Kernel;
    use coopc_compiler::ir::LogprobOperand;
    let (n, d, v) = (37, 24, 300);
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let h = f32_input(&mut g, &mut inp, "h", &[n, d], -1.0, 1.0, 71);
    let w = f32_input(&mut g, &mut inp, "w", &[v, d], -1.0, 1.0, 72);
    let gr = f32_input(&mut g, &mut inp, "g", &[n], -1.0, 1.0, 73);
    let mut r = rng(74);
    let mut targets: Vec<f64> = (0..n)
        .map(|_| r.gen_range(0..v / 30) as f64 * 30.0)
        .collect();
    let y = g.input("y", DType::I32, vec![n]);
    let tensor = |t: &[f64]| HostTensor::from_f64(DType::I32, vec![n], t).unwrap();
    inp.insert("y".into(), tensor(&targets));
    let lp = g.linear_logprob(h, w, y);
    g.set_output("logprob", lp);
    for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
        let d = g.linear_logprob_grad(wrt, [h, w, y], gr);
        g.set_output(format!("d{}", wrt.name()), d);
    }
    let (own, grads) = op_kernel_and_grad_groups(
        &g,
        |k| matches!(k, Kernel::LinearLogprob { id, .. } if *id == lp),
        |k| match k {
            Kernel::LogprobGrads { grads, .. } => Some(grads.len()),
            _ => None,
        },
    );
    assert!(own, "the log-prob op runs as the fused kernel");
    assert_eq!(grads, [2], "the two gradients share one forward launch");
    for kernel in MatmulKernel::ALL {
        check_with(&g, &inp, 1e-4, &[], kernel);
    }
    // One target out of range: NaN rows on the device, an error on the CPU.
    targets[5] = v as f64;
    inp.insert("y".into(), tensor(&targets));
    assert!(
        execute(&g, &inp).is_err(),
        "the CPU executor refuses the target"
    );
    for kernel in MatmulKernel::ALL {
        let got = on_device_with(&g, &inp, kernel);
        let value = |name: &str| got.iter().find(|(n, _)| n == name).unwrap().1.to_f64_vec();
        assert!(value("logprob")[5].is_nan() && value("logprob")[4].is_finite());
        assert!(value("dh")[5 * d].is_nan() && value("dh")[4 * d].is_finite());
        assert!(
            value("dw").iter().all(|x| x.is_nan()),
            "{kernel:?}: every dW row reads token 5"
        );
    }
}

/// The linear entropy ops of the IR (`linear_entropy` and its two
/// `linear_entropy_grad`s, a vocabulary longer than a cube) through the
/// device executor against the CPU executor, with either matmul.
#[test]
fn linear_entropy_ops_match_the_cpu_executor() {
    if device_missing() {
        return;
    }
    use coopc_compiler::ir::LogprobOperand;
    let (n, d, v) = (37, 24, 300);
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let h = f32_input(&mut g, &mut inp, "h", &[n, d], -1.0, 1.0, 81);
    let w = f32_input(&mut g, &mut inp, "w", &[v, d], -1.0, 1.0, 82);
    let gr = f32_input(&mut g, &mut inp, "g", &[n], -1.0, 1.0, 83);
    let e = g.linear_entropy(h, w);
    g.set_output("entropy", e);
    for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
        let d = g.linear_entropy_grad(wrt, [h, w], gr);
        g.set_output(format!("d{}", wrt.name()), d);
    }
    for kernel in MatmulKernel::ALL {
        check_with(&g, &inp, 1e-4, &[], kernel);
    }
}

/// The device's linear entropy in chunks of the vocabulary (the whole at
/// once, 64, 300 and 10 rows, the last ones partial) equals the entropy of
/// the full logits' softmax and its autodiff gradients, with either
/// matmul: the chunks' running (max, Σexp, Σexp·logit) merge exactly.
#[test]
fn fused_linear_entropy_in_chunks_matches_the_full_logits() {
    if device_missing() {
        return;
    }
    use coopc_compiler::linear_logprob::reference_entropy;
    let (t, d, v) = (70, 80, 1000);
    let mut r = rng(31);
    let h = uniform(&mut r, t * d, -1.0, 1.0);
    let w = uniform(&mut r, v * d, -0.5, 0.5);
    let gv = uniform(&mut r, t, -1.0, 1.0);
    let mut g = Graph::new();
    let hn = g.input("h", DType::F32, vec![t, d]);
    let wn = g.input("w", DType::F32, vec![v, d]);
    let gn = g.input("g", DType::F32, vec![t]);
    let ent = reference_entropy(&mut g, hn, wn);
    let weighted = g.mul(ent, gn);
    let loss = g.sum_all(weighted);
    let grads = grad(&mut g, loss, &[hn, wn]);
    g.set_output("entropy", ent);
    g.set_output("dh", grads[0]);
    g.set_output("dw", grads[1]);
    let tensor = |shape: Vec<usize>, x: &[f64]| HostTensor::from_f64(DType::F32, shape, x).unwrap();
    let inputs = Inputs::from([
        ("h".to_string(), tensor(vec![t, d], &h)),
        ("w".to_string(), tensor(vec![v, d], &w)),
        ("g".to_string(), tensor(vec![t], &gv)),
    ]);
    let want = execute(&g, &inputs).unwrap();
    let [hf, wf, gf] = ["h", "w", "g"].map(|n| f32s(&inputs[n]));
    let chunks = [coopc_compiler::ir::kernel::device_chunk(t, v), 64, 300, 10];
    for (kernel, chunk) in MatmulKernel::ALL
        .into_iter()
        .flat_map(|k| chunks.map(|c| (k, c)))
    {
        let got = with_device!(|dev| {
            dev.matmul = kernel;
            let (e, _) = dev.linear_entropy(&hf, &wf, d, chunk).expect("forward");
            let (dh, dw) = dev
                .linear_entropy_backward(&hf, &wf, &gf, d, chunk)
                .expect("backward");
            [e, dh, dw]
        });
        check_results(&want, got, 1e-5);
    }
}

/// The attention ops of the IR (`causal_attention` and the three
/// `causal_attention_grad`s, grouped-query, 150 positions) through the
/// device executor against the CPU executor; the attention is one fused
/// kernel, and its three gradients share one set of launches.
#[test]
fn attention_ops_match_the_cpu_executor() {
    if device_missing() {
        return;
    }
    use coopc_compiler::fusion::Kernel;
    use coopc_compiler::ir::AttentionOperand;
    let qs = [2, 4, 150, 16];
    let kvs = [2, 2, 150, 16];
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let q = f32_input(&mut g, &mut inp, "q", &qs, -1.0, 1.0, 61);
    let k = f32_input(&mut g, &mut inp, "k", &kvs, -1.0, 1.0, 62);
    let v = f32_input(&mut g, &mut inp, "v", &kvs, -1.0, 1.0, 63);
    let d_o = f32_input(&mut g, &mut inp, "do", &qs, -1.0, 1.0, 64);
    let o = g.causal_attention(q, k, v);
    g.set_output("o", o);
    for wrt in AttentionOperand::ALL {
        let d = g.causal_attention_grad(wrt, [q, k, v, o], d_o);
        g.set_output(format!("d{}", wrt.name()), d);
    }
    let (own, grads) = op_kernel_and_grad_groups(
        &g,
        |k| matches!(k, Kernel::Attention { id, .. } if *id == o),
        |k| match k {
            Kernel::AttentionGrads { grads, .. } => Some(grads.len()),
            _ => None,
        },
    );
    assert!(own, "the attention op runs as the attention kernel");
    assert_eq!(grads, [3], "the three gradients share one set of launches");
    check(&g, &inp, 1e-4);
}

/// Tokens drawn on the device equal the CPU sampler's (`choose_token`) for
/// the same uniform draws: greedy (ties to the lowest index), full
/// softmax, top-p nuclei, top-1, over vocabularies shorter and longer than
/// a cube up to 32k, with tied (rows of a few distinct values among them)
/// and negligible logits; a non-finite row is refused.
#[test]
fn device_sampling_matches_the_cpu_sampler() {
    if device_missing() {
        return;
    }
    use coopc_train::sampler::{choose_token, SamplingConfig};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    let d = device_backend();
    let mut r = rng(50);
    let cases = [(5usize, 40usize), (300, 24), (1000, 8), (32_000, 4)];
    for (case, &(vocab, rows)) in cases.iter().enumerate() {
        let mut logits = uniform(&mut r, rows * vocab, -4.0, 4.0);
        for row in 0..rows {
            let x = &mut logits[row * vocab..(row + 1) * vocab];
            // Ties (including for the maximum) and tokens of negligible mass.
            x[vocab - 1] = x[0];
            if row % 3 == 0 {
                x[1] = x.iter().copied().fold(f64::MIN, f64::max);
            }
            // Rows of a few distinct values: long runs of tied tokens.
            if row % 4 == 1 {
                x.iter_mut().for_each(|v| *v = v.round());
            }
            if vocab > 4 {
                x[2] = -60.0;
            }
        }
        // Round to f32 first: the device holds f32 logits.
        let logits: Vec<f64> = logits.iter().map(|&v| v as f32 as f64).collect();
        let t = HostTensor::from_f64(DType::F32, vec![rows, vocab], &logits).unwrap();
        let value = d.resident(Value::host(t)).unwrap();
        for (temperature, top_p, greedy) in [
            (1.0, 1.0, true),
            (1.0, 1.0, false),
            (0.7, 0.9, false),
            (1.3, 0.5, false),
            (1.0, 0.0, false),
            // The largest top_p below 1: rounding may leave the whole
            // row's mass short of it (every token kept).
            (1.0, f64::from(1.0f32 - f32::EPSILON / 2.0), false),
        ] {
            let cfg = SamplingConfig {
                top_k: 0,
                temperature,
                top_p,
                max_new_tokens: 1,
                stop_tokens: vec![],
                pad_token: 0,
                greedy,
            };
            let seeds: Vec<StdRng> = (0..rows)
                .map(|row| StdRng::seed_from_u64((case * 1000 + row) as u64))
                .collect();
            let draws: Vec<f64> = seeds
                .iter()
                .map(|s| if greedy { 0.0 } else { s.clone().gen::<f64>() })
                .collect();
            let got = d
                .sample_tokens(&value, &draws, temperature, top_p, greedy)
                .unwrap();
            for row in 0..rows {
                let mut rng_row = seeds[row].clone();
                let want =
                    choose_token(&logits[row * vocab..(row + 1) * vocab], &cfg, &mut rng_row);
                assert_eq!(
                    got[row], want,
                    "vocab {vocab}, row {row}, T {temperature}, top_p {top_p}, greedy {greedy}"
                );
            }
        }
    }
    // A non-finite logit anywhere in a row (the first included): no token
    // for that row, the others sampled, greedy or not.
    let t = HostTensor::f32(
        vec![4, 3],
        vec![
            0.0,
            f32::NAN,
            1.0,
            f32::NAN,
            0.5,
            0.2,
            f32::INFINITY,
            0.0,
            0.0,
            0.5,
            2.0,
            0.1,
        ],
    );
    let rows = Value::host(t);
    for (top_p, greedy) in [(1.0, true), (1.0, false), (0.9, false)] {
        let got = d
            .sample_tokens(&rows, &[0.5; 4], 1.0, top_p, greedy)
            .unwrap();
        assert_eq!(
            got,
            vec![None, None, None, Some(1)],
            "top_p {top_p}, greedy {greedy}"
        );
    }
    // A temperature that is not a positive f32 is refused, not sampled.
    assert!(d
        .sample_tokens(&rows, &[0.5; 4], 1e-60, 1.0, false)
        .is_err());
    // The CPU backend draws tokens on the host: it has no device sampler.
    let host_logits = Value::host(HostTensor::f32(vec![1, 3], vec![0.0; 3]));
    assert!(!CpuBackend.samples_tokens());
    assert!(CpuBackend
        .sample_tokens(&host_logits, &[0.5], 1.0, 1.0, true)
        .is_err());
}

/// A target outside the vocabulary gives NaN from the fused linear
/// log-prob in a graph (as a checked gather does), and is refused by the
/// kernel's direct entry point.
#[test]
fn fused_linear_logprob_out_of_range_targets_are_nan_or_refused() {
    if device_missing() {
        return;
    }
    let (n, d, v) = (3, 4, 5);
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let h = f32_input(&mut g, &mut inp, "h", &[n, d], -1.0, 1.0, 61);
    let w = f32_input(&mut g, &mut inp, "w", &[v, d], -1.0, 1.0, 62);
    let y = g.input("y", DType::I32, vec![n, 1]);
    inp.insert("y".into(), HostTensor::i32(vec![n, 1], vec![1, 9, 4]));
    let wt = g.transpose(w);
    let logits = g.matmul(h, wt);
    let ls = g.log_softmax(logits);
    let lp = g.take_along_axis(ls, y, 1);
    g.set_output("lp", lp);
    for kernel in MatmulKernel::ALL {
        let got = on_device_with(&g, &inp, kernel).remove(0).1.to_f64_vec();
        assert!(
            got[0].is_finite() && got[1].is_nan() && got[2].is_finite(),
            "{kernel:?}: {got:?}"
        );
    }
    let (hf, wf) = (f32s(&inp["h"]), f32s(&inp["w"]));
    let e = with_device!(|dev| dev
        .linear_logprob(&hf, &wf, &[1.0, 9.0, 4.0], d)
        .map(|_| ()));
    let e = e.unwrap_err().to_string();
    assert!(e.contains("target 1 is 9"), "{e}");
}

/// The policy losses and their gradients with respect to the log-probs:
/// SFT, GRPO with and without the KL term (k1, k2, k3), the three
/// aggregations, GSPO's sequence ratio and CISPO; a batch wider than a
/// cube (several strided passes per sequence), a small one with a
/// sequence without response tokens and one with no response token at
/// all (loss and gradient 0); NaN at the masked positions of
/// GRPO's inputs (dropped); gradients seeded with 0.7. The tolerance is
/// 5e-5: GSPO's loss sums 2400 terms of ±s·A that largely cancel, summed
/// in another order than the CPU's.
#[test]
fn token_losses_match_the_cpu() {
    if device_missing() {
        return;
    }
    use coopc_compiler::ir::TokenLoss;
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    for (i, loss) in token_losses().into_iter().enumerate() {
        for (j, (b, t, empty)) in [(8, 300, false), (3, 5, true), (2, 4, true)]
            .into_iter()
            .enumerate()
        {
            let garbage = matches!(loss, TokenLoss::Grpo { .. });
            let mut values = token_loss_batch(900 + 10 * i as u64 + j as u64, b, t, empty, garbage);
            if j == 2 {
                // No response token at all: a mean over nothing, 0.
                values[1].fill(0.0);
            }
            let mut ops = Vec::new();
            for ((name, shape), v) in token_loss_operands(loss, b, t).into_iter().zip(values) {
                let name = format!("{name}{i}_{j}");
                let x = HostTensor::from_f64(DType::F32, shape.clone(), &v).unwrap();
                inp.insert(name.clone(), x);
                ops.push(g.input(name, DType::F32, shape));
            }
            let l = g.token_loss(loss, &ops);
            let scaled = g.scale(l, 0.7);
            let d = grad(&mut g, scaled, &[ops[0]])[0];
            g.set_output(format!("loss{i}_{j}"), l);
            g.set_output(format!("grad{i}_{j}"), d);
        }
    }
    check(&g, &inp, 5e-5);
}

/// Where the reference's loss is NaN the device's is too: a ratio that
/// overflows against a zero advantage (`min` returns its NaN first
/// operand), and, for the sequence mean, a sequence without response
/// tokens whose advantage is infinite (its terms times 0).
#[test]
fn token_loss_keeps_the_references_nans() {
    if device_missing() {
        return;
    }
    let [token_mean, seq_mean] = [1, 4].map(|i| token_losses()[i]);
    let inf = f64::INFINITY;
    for (loss, logp0, adv0, mask0) in [(token_mean, 0.0, 0.0, 1.0), (seq_mean, -1.0, inf, 0.0)] {
        let (b, t) = (2, 3);
        let mut values = token_loss_batch(950, b, t, false, false);
        values[0][0] = logp0;
        values[2][0] = -100.0; // old: exp(logπ − old) overflows in f32
        values[3][0] = adv0;
        for m in &mut values[1][..t] {
            *m = mask0;
        }
        let mut g = Graph::new();
        let mut inp = Inputs::new();
        let mut ops = Vec::new();
        for ((name, shape), v) in token_loss_operands(loss, b, t).into_iter().zip(values) {
            let x = HostTensor::from_f64(DType::F32, shape.clone(), &v).unwrap();
            inp.insert(name.to_string(), x);
            ops.push(g.input(name, DType::F32, shape));
        }
        let l = g.token_loss(loss, &ops);
        g.set_output("loss", l);
        let cpu = execute(&g, &inp).unwrap()[0].1.to_f64_vec()[0];
        let dev = on_device(&g, &inp)[0].1.to_f64_vec()[0];
        assert!(
            cpu.is_nan() && dev.is_nan(),
            "{loss:?}: cpu {cpu}, device {dev}"
        );
    }
}

/// CubeCL's matmul takes every product shape of the schedules (thin rows,
/// odd sizes, batches, operands read transposed) itself, without falling
/// back to coopc's kernels, and equals an f64 product.
#[test]
fn cubecl_matmul_takes_every_product_itself() {
    if device_missing() {
        return;
    }
    use coopc_kernels::matmul::{CubeclStrategy, MatmulShape};
    for (batch, m, k, n, trans_a, trans_b) in [
        (1, 64, 64, 64, false, false),
        (2, 33, 70, 17, true, false),
        (1, 128, 256, 96, false, true),
        (3, 17, 45, 20, true, true),
        (1, 1, 128, 384, false, true),
        (1, 16, 384, 16, false, false),
    ] {
        let mut r = rng((m * k + n) as u64);
        let a = uniform(&mut r, batch * m * k, -1.0, 1.0);
        let b = uniform(&mut r, batch * k * n, -1.0, 1.0);
        let at = |q: usize, i: usize, l: usize| match trans_a {
            true => a[q * m * k + l * m + i],
            false => a[q * m * k + i * k + l],
        };
        let bt = |q: usize, l: usize, j: usize| match trans_b {
            true => b[q * k * n + j * k + l],
            false => b[q * k * n + l * n + j],
        };
        let mut want = Vec::with_capacity(batch * m * n);
        for q in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    want.push((0..k).map(|l| at(q, i, l) * bt(q, l, j)).sum::<f64>());
                }
            }
        }
        let s = MatmulShape {
            batch,
            m,
            k,
            n,
            trans_a,
            trans_b,
        };
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let unit = CubeclStrategy::SimpleUnit(Default::default());
        let got = with_device!(|dev| {
            let (ah, bh) = (dev.upload(&f32s(&a)), dev.upload(&f32s(&b)));
            let out = dev
                .launch_matmul_cubecl(&ah, &bh, s, &unit)
                .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            dev.download(out, batch * m * n).expect("download")
        });
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        let e = rel_err(&got, &want, 1e-6);
        assert!(e < 1e-5, "{s:?}: relative error {e:e}");
    }
}

/// The device memory a log-prob and both its gradients hold is what the
/// compiler's footprint estimate says: CubeCL's matmul holds a chunk of
/// logits in the forward, a chunk of coefficients and dh's temporary in
/// the backward; coopc's fused kernels hold less, within the same
/// estimate. Beyond the operands and results it is flat in the
/// vocabulary: the same at 9,000 rows (2 chunks) as at 36,000 (5).
#[test]
fn linear_logprob_device_memory_matches_the_estimate_and_is_flat_in_the_vocabulary() {
    logprob_or_entropy_memory_matches_the_estimate(false);
}

/// The same for the linear entropy and its two gradients.
#[test]
fn linear_entropy_device_memory_matches_the_estimate_and_is_flat_in_the_vocabulary() {
    logprob_or_entropy_memory_matches_the_estimate(true);
}

fn logprob_or_entropy_memory_matches_the_estimate(entropy: bool) {
    if device_missing() {
        return;
    }
    use coopc_compiler::ir::LogprobOperand;
    // The entropy's products on fewer features (its scratch does not
    // depend on them), to keep the test's time down.
    let (n, d) = (2048, if entropy { 8 } else { 32 });
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut scratch = Vec::new();
    for (v, chunks) in [(9000usize, 2), (36_000, 5)] {
        let chunk = coopc_compiler::ir::kernel::device_chunk(n, v);
        assert_eq!(v.div_ceil(chunk), chunks);
        let mut g = Graph::new();
        let mut inp = Inputs::new();
        let h = f32_input(&mut g, &mut inp, "h", &[n, d], -1.0, 1.0, 91);
        let w = f32_input(&mut g, &mut inp, "w", &[v, d], -0.5, 0.5, 92);
        let gr = f32_input(&mut g, &mut inp, "g", &[n], -1.0, 1.0, 93);
        let mut r = rng(94);
        let targets: Vec<f64> = (0..n).map(|_| r.gen_range(0..v) as f64).collect();
        let y = g.input("y", DType::I32, vec![n]);
        inp.insert(
            "y".into(),
            HostTensor::from_f64(DType::I32, vec![n], &targets).unwrap(),
        );
        if entropy {
            let e = g.linear_entropy(h, w);
            g.set_output("entropy", e);
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                let d = g.linear_entropy_grad(wrt, [h, w], gr);
                g.set_output(format!("d{}", wrt.name()), d);
            }
        } else {
            let lp = g.linear_logprob(h, w, y);
            g.set_output("logprob", lp);
            for wrt in [LogprobOperand::Hidden, LogprobOperand::Weight] {
                let d = g.linear_logprob_grad(wrt, [h, w, y], gr);
                g.set_output(format!("d{}", wrt.name()), d);
            }
        }
        let order = coopc_compiler::schedule::schedule(&g).order;
        let estimate = coopc_compiler::fusion::fuse(&g, &order).device_peak_bytes(&g) as f64;
        // Inputs h, w, g, y (not read by the entropy, so not uploaded);
        // results logprob or entropy, dh, dW.
        let operands = (4 * (2 * n * d + 2 * v * d + 2 * n + (!entropy) as usize * n)) as f64;
        // The entropy's launches differ between the matmuls only in the
        // products; CubeCL's (the estimate's) is checked.
        let kernels: &[MatmulKernel] = if entropy {
            &[MatmulKernel::Cubecl]
        } else {
            &MatmulKernel::ALL
        };
        for &kernel in kernels {
            let peak = with_device!(|dev| {
                dev.poison = false;
                dev.matmul = kernel;
                dev.run(&program(&g), &inp).unwrap();
                dev.track_memory(true);
                dev.run(&program(&g), &inp).unwrap();
                let peak = dev.memory_peak().expect("a device backend reports it");
                dev.track_memory(false);
                peak as f64
            });
            assert!(
                peak <= estimate,
                "{kernel:?}, vocabulary {v}: the run held {:.3} MiB, over the estimate's {:.3} MiB",
                mib(peak),
                mib(estimate)
            );
            // The estimate is CubeCL's path (the default), to the buffer.
            if kernel == MatmulKernel::Cubecl {
                assert!(
                    peak >= 0.999 * estimate,
                    "vocabulary {v}: the run held {:.3} MiB, the estimate says {:.3} MiB",
                    mib(peak),
                    mib(estimate)
                );
                scratch.push(peak - operands);
            }
        }
    }
    // One chunk of coefficients (64 MiB) and dh's temporary at either size.
    let (small, large) = (scratch[0], scratch[1]);
    assert!(small >= (4 * n * 8192) as f64, "{:.3} MiB", mib(small));
    assert!(
        (large - small).abs() <= 1024.0,
        "scratch {:.3} MiB at 9,000 rows, {:.3} MiB at 36,000",
        mib(small),
        mib(large)
    );
}

/// `backend.matmul = "tf32"`: products through CubeCL's tensor-core routine
/// where the device has one (CUDA: within TF32's rounding of the CPU's
/// products), its f32 routine where it has none (lavapipe: within f32's).
/// The device made for it keeps it: its start-up check allows TF32's
/// rounding.
#[test]
fn tf32_products_match_the_cpu_within_their_rounding() {
    if device_missing() {
        return;
    }
    let mut g = Graph::new();
    let mut inp = Inputs::new();
    let a = f32_input(&mut g, &mut inp, "a", &[3, 70, 90], -1.0, 1.0, 41);
    let b = f32_input(&mut g, &mut inp, "b", &[3, 90, 65], -1.0, 1.0, 42);
    let c = g.matmul(a, b);
    g.set_output("c", c);
    let bt = f32_input(&mut g, &mut inp, "bt", &[3, 65, 90], -1.0, 1.0, 43);
    let tb = g.transpose(bt);
    let c_tb = g.matmul(a, tb);
    g.set_output("c_tb", c_tb);
    let p = f32_input(&mut g, &mut inp, "p", &[1, 64], -1.0, 1.0, 44);
    let q = f32_input(&mut g, &mut inp, "q", &[64, 33], -1.0, 1.0, 45);
    let r = g.matmul(p, q);
    g.set_output("r", r);
    let want = execute(&g, &inp).expect("cpu");
    let prepared = Prepared::new(
        &g,
        coopc_compiler::fusion::fuse(&g, &coopc_compiler::schedule::schedule(&g).order),
    );
    let tf32 = MatmulKernel::CubeclTf32;
    let (got, kernel, tol) = if cuda_requested() {
        let mut d = Device::cuda_with(tf32).expect("CUDA device");
        d.poison = true;
        (d.execute(&g, &prepared, &inp), d.matmul, 5e-3)
    } else {
        let mut d = Device::wgpu_with(tf32).expect("wgpu adapter");
        d.poison = true;
        (d.execute(&g, &prepared, &inp), d.matmul, 1e-4)
    };
    assert_eq!(kernel, tf32, "the start-up check kept TF32 products");
    let got = got.expect("device run");
    check_results(&want, got.iter().map(|(_, t)| f32s(t)), tol);
}

/// The device memory a whole truncated (second-order) meta-step holds at
/// its peak is what the compiler's footprint estimate says, the estimate
/// that puts the medium workload's meta-step at 15.3 GiB: on a decoder
/// whose buffers, not the allocator's granularity, make the peak (2
/// layers, d_model 64, vocabulary 512, 32-token sequences), lavapipe held
/// 11,161,920 bytes against 11,162,088 estimated.
#[test]
fn truncated_meta_step_device_memory_matches_the_estimate() {
    if device_missing() {
        return;
    }
    let mut spec = tiny_spec();
    spec.backend.dtype = Precision::F32;
    spec.model.vocab_size = 512;
    spec.model.d_model = 64;
    spec.model.n_layers = 2;
    spec.model.n_heads = 4;
    spec.model.n_kv_heads = 2;
    spec.model.d_ff = 128;
    spec.model.max_seq = 32;
    spec.train.seq_len = 32;
    spec.lora.rank = 4;
    spec.rl.prompts_per_step = 2;
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    let inputs = with_float_dtype(&meta_inputs(&spec, &ms, 23), DType::F32);
    let mut g = ms.graph;
    Pipeline::standard().run(&mut g);
    let order = coopc_compiler::schedule::schedule(&g).order;
    let estimate = coopc_compiler::fusion::fuse(&g, &order).device_peak_bytes(&g) as f64;
    let peak = with_device!(|dev| {
        dev.poison = false;
        dev.run(&program(&g), &inputs).unwrap();
        dev.track_memory(true);
        dev.run(&program(&g), &inputs).unwrap();
        let peak = dev.memory_peak().expect("a device backend reports it");
        dev.track_memory(false);
        peak as f64
    });
    let mib = |b: f64| b / (1u64 << 20) as f64;
    eprintln!(
        "truncated meta-step: {peak} bytes held, {estimate} estimated ({:.3} MiB)",
        mib(estimate)
    );
    assert!(
        peak <= estimate,
        "the run held {peak} bytes, over the estimate's {estimate}"
    );
    assert!(
        peak >= 0.99 * estimate,
        "the run held {peak} bytes, the estimate says {estimate}"
    );
}

/// CUDA only: an NCCL communicator of one process. Its host operations
/// (sums, broadcast, barrier) return their operands, and a device with it
/// attached sums `AllReduceSum` nodes through NCCL in device memory, into
/// a fresh (poisoned) buffer the rest of the graph reads, leaving the
/// operand as it was.
#[test]
fn all_reduce_sum_through_nccl_on_the_device_matches_the_cpu() {
    use coopc_kernels::nccl::{new_unique_id, NcclComm};
    use coopc_runtime::collective::Collective;
    if !cuda_requested() {
        eprintln!("skipped: NCCL runs on CUDA (COOPC_TEST_CUDA=1)");
        return;
    }
    let ordinal = coopc_kernels::device::cuda_ordinal().expect("device ordinal");
    let id = new_unique_id().expect("an NCCL unique id");
    let comm = std::sync::Arc::new(NcclComm::new(&id, 0, 1, ordinal).expect("NCCL communicator"));
    let mut v32 = vec![1.5f32, -2.25, 3.0e-3];
    comm.all_reduce_sum_f32(&mut v32).unwrap();
    assert_eq!(v32, [1.5f32, -2.25, 3.0e-3]);
    let mut v64 = vec![0.1f64, -7.0];
    comm.all_reduce_sum_f64(&mut v64).unwrap();
    assert_eq!(v64, [0.1, -7.0]);
    let mut bytes = vec![3u8, 1, 4, 1, 5];
    comm.broadcast(0, &mut bytes).unwrap();
    assert_eq!(bytes, [3, 1, 4, 1, 5]);
    comm.barrier().unwrap();

    let mut g = Graph::new();
    let mut inputs = Inputs::new();
    let x = f32_input(&mut g, &mut inputs, "x", &[37, 129], -1.0, 1.0, 91);
    let e = g.exp(x);
    let s = g.all_reduce_sum(e);
    let m = g.mul(s, x);
    g.set_output("exp", e);
    g.set_output("sum", s);
    g.set_output("product", m);
    let want = execute(&g, &inputs).expect("cpu");
    let prepared = Prepared::new(
        &g,
        coopc_compiler::fusion::fuse(&g, &coopc_compiler::schedule::schedule(&g).order),
    );
    let mut d = Device::cuda().expect("CUDA device");
    d.poison = true;
    d.attach_nccl(comm);
    assert!(d.sums_on_device());
    let got = d.execute(&g, &prepared, &inputs).expect("device run");
    check_results(&want, got.iter().map(|(_, t)| f32s(t)), 1e-5);
}
