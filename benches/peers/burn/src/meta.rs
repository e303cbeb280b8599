//! The meta-step of `coopc grad` with the first-order hypergradient:
//! K lower steps on θ, K shadow steps on θ̂ (RL only), then L_up and its
//! gradient in w with θ_K and θ̂_K held fixed (the paper's penalty/Danskin
//! approximation). burn's autodiff differentiates once per graph, so this is
//! the one hypergradient it can form; `truncated` and `finite_difference`
//! would need the derivative of a gradient.
//!
//! Parameters live on the inner (non-autodiff) backend between steps; each
//! loss evaluation lifts them onto the autodiff backend, tracked where a
//! gradient is wanted (θ in a lower/shadow step, w in L_up) and constant
//! elsewhere.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::model::{Batch, Params, Policy};
use crate::spec::{OptimKind, Spec};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;
/// Named tensors in a fixed order, on the inner backend.
pub type Named<B> = Vec<(String, Tensor<Inner<B>, 2>)>;

/// The inputs of one meta-step, converted once.
pub struct Inputs<B: AutodiffBackend> {
    pub theta: Named<B>,
    pub w: Named<B>,
    pub shadow: Option<Named<B>>,
    pub batches: Vec<Batch<B>>,
}

/// What `coopc grad` writes, by name. Scalars (`loss.*`) are held as [1, 1]
/// tensors, 1-d parameters as [1, n].
pub type Outputs<B> = Vec<(String, Tensor<Inner<B>, 2>)>;

fn lift<B: AutodiffBackend>(p: &Named<B>, tracked: bool) -> Params<B> {
    p.iter()
        .map(|(n, t)| {
            let t = Tensor::<B, 2>::from_inner(t.clone());
            (n.clone(), if tracked { t.require_grad() } else { t })
        })
        .collect()
}

/// The lower optimiser (PyTorch conventions) with its state, on the inner backend.
struct LowerOpt<B: AutodiffBackend> {
    step: i32,
    m: Vec<Tensor<Inner<B>, 2>>,
    v: Vec<Tensor<Inner<B>, 2>>,
}

impl<B: AutodiffBackend> LowerOpt<B> {
    fn new(params: &[Tensor<Inner<B>, 2>], kind: OptimKind) -> Self {
        let zeros = || params.iter().map(|p| p.zeros_like()).collect::<Vec<_>>();
        LowerOpt {
            step: 0,
            m: if kind == OptimKind::Sgd { Vec::new() } else { zeros() },
            v: if kind == OptimKind::AdamW { zeros() } else { Vec::new() },
        }
    }

    fn update(
        &mut self,
        spec: &Spec,
        params: Vec<Tensor<Inner<B>, 2>>,
        grads: Vec<Tensor<Inner<B>, 2>>,
    ) -> Vec<Tensor<Inner<B>, 2>> {
        let o = &spec.lower;
        self.step += 1;
        match o.kind {
            OptimKind::Sgd => params
                .into_iter()
                .zip(grads)
                .map(|(p, g)| p - g.mul_scalar(o.lr))
                .collect(),
            OptimKind::Momentum => {
                // b ← μ b + g; θ ← θ − lr b (b₀ = 0, no dampening, no Nesterov).
                let mut out = Vec::with_capacity(params.len());
                for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
                    let b = self.m[i].clone().mul_scalar(o.momentum) + g;
                    out.push(p - b.clone().mul_scalar(o.lr));
                    self.m[i] = b;
                }
                out
            }
            OptimKind::AdamW => {
                let c1 = 1.0 - o.beta1.powi(self.step);
                let c2 = 1.0 - o.beta2.powi(self.step);
                let mut out = Vec::with_capacity(params.len());
                for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
                    let m = self.m[i].clone().mul_scalar(o.beta1) + g.clone().mul_scalar(1.0 - o.beta1);
                    let v = self.v[i].clone().mul_scalar(o.beta2)
                        + g.clone().square().mul_scalar(1.0 - o.beta2);
                    let denom = v.clone().div_scalar(c2).sqrt().add_scalar(o.eps).mul_scalar(c1);
                    let p = if o.weight_decay != 0.0 {
                        p.mul_scalar(1.0 - o.lr * o.weight_decay)
                    } else {
                        p
                    };
                    out.push(p - (m.clone() / denom).mul_scalar(o.lr));
                    self.m[i] = m;
                    self.v[i] = v;
                }
                out
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chain {
    Lower,
    Shadow,
}

/// Losses and gradient of the first lower step (step 0's batch, initial θ).
struct First<B: AutodiffBackend> {
    sft: Tensor<Inner<B>, 1>,
    rl: Tensor<Inner<B>, 1>,
    grads: Vec<Tensor<Inner<B>, 2>>,
}

pub struct MetaStep<'s> {
    pub spec: &'s Spec,
}

impl<'s> MetaStep<'s> {
    /// K optimiser steps of one chain from `start`, each step k on step k's batch.
    fn unroll<B: AutodiffBackend>(
        &self,
        chain: Chain,
        start: &Named<B>,
        w: &Params<B>,
        batches: &[Batch<B>],
    ) -> (Named<B>, Option<First<B>>) {
        let spec = self.spec;
        let policy = Policy { spec };
        let lam = spec.lambda0;
        let names: Vec<String> = start.iter().map(|(n, _)| n.clone()).collect();
        let mut theta: Vec<_> = start.iter().map(|(_, t)| t.clone()).collect();
        let mut opt = LowerOpt::<B>::new(&theta, spec.lower.kind);
        let mut first = None;
        for (k, batch) in batches.iter().enumerate().take(spec.unroll) {
            let named: Named<B> = names.iter().cloned().zip(theta.iter().cloned()).collect();
            let tp = lift::<B>(&named, true);
            let (loss, parts) = match chain {
                Chain::Lower => {
                    let sft = policy.sft_loss(&tp, w, batch);
                    let rl = policy.rl_loss(&tp, w, batch);
                    let loss = sft.clone().mul_scalar(1.0 - lam) + rl.clone().mul_scalar(lam);
                    (loss, Some((sft, rl)))
                }
                Chain::Shadow => (policy.rl_loss(&tp, w, batch), None),
            };
            let grads = loss.backward();
            let g: Vec<_> = names
                .iter()
                .zip(&theta)
                .map(|(n, t)| tp[n].grad(&grads).unwrap_or_else(|| t.zeros_like()))
                .collect();
            if k == 0 {
                if let Some((sft, rl)) = parts {
                    first = Some(First {
                        sft: sft.inner(),
                        rl: rl.inner(),
                        grads: g.clone(),
                    });
                }
            }
            theta = opt.update(spec, theta, g);
        }
        (names.into_iter().zip(theta).collect(), first)
    }

    pub fn run<B: AutodiffBackend>(&self, inp: &Inputs<B>) -> Outputs<B> {
        let spec = self.spec;
        let policy = Policy { spec };
        let lam = spec.lambda0;
        let scalar = |t: Tensor<Inner<B>, 1>| t.reshape([1, 1]);
        let mut out: Outputs<B> = Vec::new();

        let w_const = lift::<B>(&inp.w, false);
        let (theta_k, first) = self.unroll(Chain::Lower, &inp.theta, &w_const, &inp.batches);
        let first = first.expect("the lower chain records its first step");
        out.push(("loss.sft".into(), scalar(first.sft)));
        out.push(("loss.rl".into(), scalar(first.rl)));
        for ((n, _), g) in inp.theta.iter().zip(first.grads) {
            out.push((format!("lower.{n}"), g));
        }

        if spec.bridge() {
            let shadow_start = match (&inp.shadow, spec.shadow_persistent) {
                (Some(s), true) => s,
                _ => &inp.theta,
            };
            let (shadow_k, _) =
                self.unroll(Chain::Shadow, shadow_start, &w_const, &inp.batches);
            // L_up = (1−λ) L_SFT(θ_K, w) + λ [L_RL(θ_K, w) − L_RL(θ̂_K, w)] on the
            // last step's batch, differentiated in w only.
            let last = &inp.batches[spec.unroll - 1];
            let wp = lift::<B>(&inp.w, true);
            let tk = lift::<B>(&theta_k, false);
            let sk = lift::<B>(&shadow_k, false);
            let at_theta = policy.sft_loss(&tk, &wp, last).mul_scalar(1.0 - lam)
                + policy.rl_loss(&tk, &wp, last).mul_scalar(lam);
            let l_up = at_theta - policy.rl_loss(&sk, &wp, last).mul_scalar(lam);
            let grads = l_up.backward();
            out.push(("loss.up".into(), scalar(l_up.inner())));
            for (n, t) in &inp.w {
                let h = wp[n].grad(&grads).unwrap_or_else(|| t.zeros_like());
                out.push((format!("hyper.{n}"), h));
            }
        }
        for (n, t) in theta_k {
            out.push((format!("theta_K.{n}"), t));
        }
        out
    }
}

/// A scalar output as f64.
pub fn scalar_of<B: AutodiffBackend>(t: &Tensor<Inner<B>, 2>) -> f64 {
    t.clone().into_scalar().elem::<f64>()
}
