//! Optimiser steps written with ordinary ops: the reference semantics of
//! `Op::OptimStep`, and what autodiff differentiates for its derivative.
//!
//! The bilevel lowering updates every parameter with `OptimStep` nodes (one
//! per value of the step), which executors compute with one pass over the
//! parameter (the device runs them as one hand-written kernel).

use crate::ir::{Graph, NodeId, StepOut, StepRule};

/// The value `out` of one step of `rule` on operands `ops` (see
/// `Op::OptimStep`), with ordinary ops.
pub fn reference_step(g: &mut Graph, rule: StepRule, out: StepOut, ops: &[NodeId]) -> NodeId {
    let (p, gr) = (ops[0], ops[1]);
    match rule {
        StepRule::Sgd { lr } => {
            let s = g.scale(gr, lr.get());
            g.sub(p, s)
        }
        StepRule::Momentum { lr, mu } => {
            let mb = g.scale(ops[2], mu.get());
            let b = g.add(mb, gr);
            if out == StepOut::MomentumBuffer {
                return b;
            }
            let s = g.scale(b, lr.get());
            g.sub(p, s)
        }
        StepRule::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            ..
        } => {
            let (m, v, t) = (ops[2], ops[3], ops[4]);
            let (lr, beta1, beta2) = (lr.get(), beta1.get(), beta2.get());
            let m1 = g.scale(m, beta1);
            let gm = g.scale(gr, 1.0 - beta1);
            let m2 = g.add(m1, gm);
            if out == StepOut::ExpAvg {
                return m2;
            }
            let v1 = g.scale(v, beta2);
            let g2 = g.mul(gr, gr);
            let g2 = g.scale(g2, 1.0 - beta2);
            let v2 = g.add(v1, g2);
            if out == StepOut::ExpAvgSq {
                return v2;
            }
            // Bias corrections 1 − β^t.
            let one = g.full_like(1.0, t);
            let b1 = g.full_like(beta1, t);
            let b2 = g.full_like(beta2, t);
            let p1 = g.pow(b1, t);
            let p2 = g.pow(b2, t);
            let c1 = g.sub(one, p1);
            let c2 = g.sub(one, p2);
            let shape = g.ty(p).shape.clone();
            let c2b = g.broadcast(c2, shape.clone());
            let vhat = g.div(v2, c2b);
            let den = g.sqrt(vhat);
            let epsn = g.full_like(eps.get(), den);
            let den = g.add(den, epsn);
            let c1b = g.broadcast(c1, shape);
            let den = g.mul(den, c1b);
            let lrn = g.full_like(lr, den);
            let d = g.div(lrn, den);
            let d = g.stop_gradient(d);
            if out == StepOut::Precond {
                return d;
            }
            let decayed = match rule.decay() {
                Some(k) => g.scale(p, k),
                None => p,
            };
            let upd = g.mul(d, m2);
            g.sub(decayed, upd)
        }
    }
}
