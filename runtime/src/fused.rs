//! Host interpreter of a fused schedule (`coopc_ir::kernel`): runs
//! each kernel on host tensors in f64, with the elementwise programs'
//! reference semantics. It is what the fusion pass is tested against (its
//! results must equal the CPU executor's) and the per-kernel reference for
//! the device kernels.

use crate::{execute_nodes, ExecError, HostTensor};
use coopc_ir::kernel::{FusedSchedule, Kernel};
use coopc_ir::{Graph, NodeId, Op, ReduceKind};
use std::collections::HashMap;

/// Runs `fused` (a fusion of `g`'s schedule) and returns every written
/// node's value as f64 (booleans as 0/1), keyed by node.
pub fn execute_fused_host(
    g: &Graph,
    fused: &FusedSchedule,
    inputs: &HashMap<String, HostTensor>,
) -> Result<HashMap<NodeId, Vec<f64>>, ExecError> {
    let mut values: HashMap<NodeId, Vec<f64>> = HashMap::new();
    for k in &fused.kernels {
        for (id, v) in run_kernel(g, k, inputs, &values)? {
            values.insert(id, v);
        }
    }
    Ok(values)
}

/// One kernel on host values: `values` holds everything it reads.
pub fn run_kernel(
    g: &Graph,
    k: &Kernel,
    inputs: &HashMap<String, HostTensor>,
    values: &HashMap<NodeId, Vec<f64>>,
) -> Result<Vec<(NodeId, Vec<f64>)>, ExecError> {
    let get = |id: &NodeId| -> Result<&Vec<f64>, ExecError> {
        values
            .get(id)
            .ok_or(ExecError::UnknownNode { node: id.index() })
    };
    Ok(match k {
        Kernel::Elementwise {
            program,
            numel,
            inputs: ins,
            outputs,
        } => {
            let src: Vec<&Vec<f64>> = ins.iter().map(get).collect::<Result<_, _>>()?;
            let mut outs = vec![Vec::with_capacity(*numel); outputs.len()];
            for i in 0..*numel {
                let r = program.eval(i, |s, j| src[s as usize][j]);
                for (o, v) in outs.iter_mut().zip(r) {
                    o.push(v);
                }
            }
            outputs.iter().copied().zip(outs).collect()
        }
        // The gradient from the prologue, then the CPU executor's step.
        Kernel::OptimStep {
            rule,
            numel,
            prologue,
            prologue_inputs,
            state,
            outputs,
            gradient,
        } => {
            let pro: Vec<&Vec<f64>> = prologue_inputs.iter().map(get).collect::<Result<_, _>>()?;
            let grad: Vec<f64> = (0..*numel)
                .map(|i| prologue.eval(i, |s, j| pro[s as usize][j])[0])
                .collect();
            let st: Vec<&Vec<f64>> = state.iter().map(get).collect::<Result<_, _>>()?;
            let mut ops: Vec<&[f64]> = vec![st[0], &grad];
            ops.extend(st[1..].iter().map(|v| v.as_slice()));
            let mut res: Vec<_> = outputs
                .iter()
                .map(|&(out, id)| (id, crate::cpu::optim::step(*rule, out, &ops)))
                .collect();
            res.extend(gradient.map(|id| (id, grad.clone())));
            res
        }
        Kernel::Reduce {
            kind,
            layout,
            prologue,
            split: _,
            prologue_inputs,
            epilogue,
            epilogue_inputs,
            outputs,
        } => {
            let pro: Vec<&Vec<f64>> = prologue_inputs.iter().map(get).collect::<Result<_, _>>()?;
            // Slot 0 of the epilogue is the reduced value itself.
            let epi: Vec<&Vec<f64>> = epilogue_inputs[1..]
                .iter()
                .map(get)
                .collect::<Result<_, _>>()?;
            let (n_out, n_red) = (layout.out_numel(), layout.red_numel());
            let mut outs = vec![Vec::with_capacity(n_out); outputs.len()];
            for o in 0..n_out {
                let mut acc = match kind {
                    ReduceKind::Max => f64::NEG_INFINITY,
                    _ => 0.0,
                };
                for r in 0..n_red {
                    let at = layout.input_index(o, r);
                    let v = prologue.eval(at, |s, j| pro[s as usize][j])[0];
                    acc = match kind {
                        ReduceKind::Max => coopc_ir::BinaryOp::Max.apply(acc, v),
                        _ => acc + v,
                    };
                }
                if *kind == ReduceKind::Mean {
                    acc /= n_red as f64;
                }
                let r = epilogue.eval(o, |s, j| if s == 0 { acc } else { epi[s as usize - 1][j] });
                for (out, v) in outs.iter_mut().zip(r) {
                    out.push(v);
                }
            }
            outputs.iter().copied().zip(outs).collect()
        }
        Kernel::MatMul {
            id,
            a,
            b,
            trans_a,
            trans_b,
        } => {
            // The product of the operands as read: a source read transposed
            // is transposed here first.
            let mut one = Graph::new();
            let mut bound = HashMap::new();
            let mut args = vec![];
            for (i, (x, trans)) in [(a, trans_a), (b, trans_b)].into_iter().enumerate() {
                let ty = g.ty(*x).clone();
                let name = format!("arg{i}");
                let t = HostTensor::from_f64(ty.dtype, ty.shape.clone(), get(x)?)?;
                bound.insert(name.clone(), t);
                let mut arg = one.input(name, ty.dtype, ty.shape);
                if *trans {
                    arg = one.transpose(arg);
                }
                args.push(arg);
            }
            let unsupported = |message: String| ExecError::Unsupported {
                node: id.index(),
                op: "matmul",
                message,
            };
            let out = one
                .try_add_op(Op::MatMul, &args)
                .map_err(|e| unsupported(e.to_string()))?;
            if one.ty(out) != g.ty(*id) {
                return Err(unsupported(format!(
                    "computes {} where the graph has {}",
                    one.ty(out),
                    g.ty(*id)
                )));
            }
            let v = execute_nodes(&one, &bound, &[out])?;
            vec![(*id, v[0].to_f64_vec())]
        }
        Kernel::LinearLogprob {
            id,
            h,
            w,
            targets,
            seq_out,
            seq_in,
        } => {
            // log_softmax(h wᵀ)[target] row by row, in f64.
            let (hv, wv, tv) = (get(h)?, get(w)?, get(targets)?);
            let (vocab, d) = (g.ty(*w).shape[0], g.ty(*w).shape[1]);
            let n = g.ty(*id).numel();
            let mut out = Vec::with_capacity(n);
            let mut z = vec![0.0; vocab];
            for (t, &target) in tv.iter().enumerate().take(n) {
                let row = (t / seq_out) * seq_in + t % seq_out;
                let hr = &hv[row * d..(row + 1) * d];
                for (v, zv) in z.iter_mut().enumerate() {
                    *zv = hr
                        .iter()
                        .zip(&wv[v * d..(v + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                }
                if !(target >= 0.0 && target < vocab as f64) {
                    return Err(ExecError::IndexOutOfRange {
                        node: id.index(),
                        op: "take_along_axis",
                        index: target as i64,
                        bound: vocab,
                    });
                }
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
                out.push((z[target as usize] - m) - (lse - m));
            }
            vec![(*id, out)]
        }
        Kernel::Attention {
            id,
            q,
            k,
            v,
            kv_heads,
        } => {
            // softmax(q kᵀ / √hd + causal) v, row by row, in f64.
            let (qv, kv, vv) = (get(q)?, get(k)?, get(v)?);
            let s = &g.ty(*id).shape;
            let (b, heads, t, hd) = (s[0], s[1], s[2], s[3]);
            let group = heads / kv_heads.max(&1);
            let scale = 1.0 / (hd as f64).sqrt();
            let mut out = vec![0.0; b * heads * t * hd];
            let mut p = vec![0.0; t];
            for bh in 0..b * heads {
                let kv0 = ((bh / heads) * kv_heads + (bh % heads) / group) * t * hd;
                for i in 0..t {
                    let qi = &qv[(bh * t + i) * hd..(bh * t + i + 1) * hd];
                    for (j, pj) in p.iter_mut().enumerate().take(i + 1) {
                        let kj = &kv[kv0 + j * hd..kv0 + (j + 1) * hd];
                        *pj = scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>();
                    }
                    let m = p[..=i].iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    for pj in &mut p[..=i] {
                        *pj = (*pj - m).exp();
                        sum += *pj;
                    }
                    let o = &mut out[(bh * t + i) * hd..(bh * t + i + 1) * hd];
                    for (j, pj) in p[..=i].iter().enumerate() {
                        let vj = &vv[kv0 + j * hd..kv0 + (j + 1) * hd];
                        for (od, vd) in o.iter_mut().zip(vj) {
                            *od += pj / sum * vd;
                        }
                    }
                }
            }
            vec![(*id, out)]
        }
        // Each gradient as its own node: the reference the shared device
        // launches are checked against.
        Kernel::AttentionGrads { grads, .. } => grads
            .iter()
            .map(|&(_, id)| Ok((id, node_value(g, id, inputs, values)?)))
            .collect::<Result<_, ExecError>>()?,
        Kernel::LogprobGrads { grads, .. } => grads
            .iter()
            .map(|&(_, id)| Ok((id, node_value(g, id, inputs, values)?)))
            .collect::<Result<_, ExecError>>()?,
        Kernel::Node(id) => vec![(*id, node_value(g, *id, inputs, values)?)],
    })
}

/// Node `id`'s op applied to its operands' values (a one-node graph run by
/// the CPU executor), or an input's value.
fn node_value(
    g: &Graph,
    id: NodeId,
    inputs: &HashMap<String, HostTensor>,
    values: &HashMap<NodeId, Vec<f64>>,
) -> Result<Vec<f64>, ExecError> {
    let get = |id: &NodeId| -> Result<&Vec<f64>, ExecError> {
        values
            .get(id)
            .ok_or(ExecError::UnknownNode { node: id.index() })
    };
    let id = &id;
    {
        {
            let mut one = Graph::new();
            let mut bound = HashMap::new();
            let mut args = vec![];
            for (i, x) in g.inputs(*id).iter().enumerate() {
                let ty = g.ty(*x).clone();
                let name = format!("arg{i}");
                let t = HostTensor::from_f64(ty.dtype, ty.shape.clone(), get(x)?)?;
                bound.insert(name.clone(), t);
                args.push(one.input(name, ty.dtype, ty.shape));
            }
            let op = match g.op(*id) {
                Op::Input { name, ty } => {
                    let t = inputs.get(name).ok_or_else(|| ExecError::MissingInput {
                        name: name.clone(),
                        expected: ty.clone(),
                    })?;
                    return Ok(t.to_f64_vec());
                }
                op => op.clone(),
            };
            let out = one
                .try_add_op(op, &args)
                .map_err(|e| ExecError::Unsupported {
                    node: id.index(),
                    op: g.op(*id).name(),
                    message: e.to_string(),
                })?;
            let v = execute_nodes(&one, &bound, &[out])?;
            Ok(v[0].to_f64_vec())
        }
    }
}
