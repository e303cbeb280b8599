//! The SFT loss and the GRPO surrogate on hand-computed cases: clipping on
//! both sides, positive and negative advantages, the tie rule, the k3 KL
//! penalty, garbage at masked positions, and both aggregations.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{DType, Graph, NodeId};
use coopc_compiler::losses::{grpo_loss, sft_loss, RlBatch};
use coopc_compiler::spec::{LossAgg, RlSpec};

fn rl_spec(kl: f64, agg: LossAgg) -> RlSpec {
    let mut s = tiny_spec().rl;
    s.clip_low = 0.2;
    s.clip_high = 0.28;
    s.kl_coef = kl;
    s.loss_agg = agg;
    s
}

/// GRPO loss and its gradient with respect to logπ for a [b, t] batch.
#[allow(clippy::too_many_arguments)]
fn grpo(
    spec: &RlSpec,
    logp: &[f64],
    old: &[f64],
    reference: &[f64],
    adv: &[f64],
    mask: &[f64],
    b: usize,
    t: usize,
) -> (f64, Vec<f64>) {
    let mut g = Graph::new();
    let lp = g.input("logp", DType::F64, vec![b, t]);
    let batch = RlBatch {
        input_ids: g.input("ids", DType::I32, vec![b, t]),
        loss_mask: g.input("mask", DType::F64, vec![b, t]),
        advantages: g.input("adv", DType::F64, vec![b]),
        old_logprobs: g.input("old", DType::F64, vec![b, t]),
        ref_logprobs: Some(g.input("ref", DType::F64, vec![b, t])),
    };
    let l = grpo_loss(&mut g, spec, lp, &batch);
    let gl: NodeId = grad(&mut g, l, &[lp])[0];
    let mut inputs = Inputs::new();
    inputs.insert("logp".into(), f64_tensor(&[b, t], logp));
    inputs.insert("mask".into(), f64_tensor(&[b, t], mask));
    inputs.insert("adv".into(), f64_tensor(&[b], adv));
    inputs.insert("old".into(), f64_tensor(&[b, t], old));
    inputs.insert("ref".into(), f64_tensor(&[b, t], reference));
    let out = eval(&g, &inputs, &[l, gl]);
    (out[0][0], out[1].clone())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

/// Three sequences of three tokens; position 0 is never a response token.
/// seq 0 (A = +1): ρ = 1.5 (clipped at 1.28), ρ = 0.5 (below the range, unclipped wins)
/// seq 1 (A = −2): ρ = 0.5 (clipped at 0.8 wins: −1.6 < −1), masked token with NaN old log-prob
/// seq 2 (A = −1): ρ = 1.2 inside the range (tie: unclipped, gradient flows), masked token
const LOGP: [f64; 9] = [0.0, -1.0, -2.0, 0.0, -1.0, -3.0, 0.0, -0.5, -1.0];

fn old() -> [f64; 9] {
    [
        9.0,
        -1.0 - 1.5f64.ln(),
        -2.0 - 0.5f64.ln(),
        9.0,
        -1.0 - 0.5f64.ln(),
        f64::NAN,
        9.0,
        -0.5 - 1.2f64.ln(),
        f64::NAN,
    ]
}

const MASK: [f64; 9] = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0];
const ADV: [f64; 3] = [1.0, -2.0, -1.0];

#[test]
fn grpo_token_mean_clips_both_sides() {
    let (l, gr) = grpo(
        &rl_spec(0.0, LossAgg::TokenMean),
        &LOGP,
        &old(),
        &[f64::NAN; 9],
        &ADV,
        &MASK,
        3,
        3,
    );
    // ℓ = −1.28, −0.5, +1.6, +1.2 over 4 response tokens.
    let want = (-1.28 - 0.5 + 1.6 + 1.2) / 4.0;
    assert!(close(l, want), "{l} vs {want}");
    // d/dlogπ of −ρA is −ρA on unclipped tokens and 0 on clipped ones.
    let want_g = [0.0, 0.0, -0.5 / 4.0, 0.0, 0.0, 0.0, 0.0, 1.2 / 4.0, 0.0];
    for (i, (a, b)) in gr.iter().zip(want_g).enumerate() {
        assert!(close(*a, b), "grad[{i}] = {a}, want {b}");
    }
}

#[test]
fn grpo_seq_mean_averages_sequences_with_response_tokens() {
    // A fourth sequence with no response token is left out of the mean.
    let mut logp = LOGP.to_vec();
    logp.extend([0.0, 0.0, 0.0]);
    let mut o = old().to_vec();
    o.extend([0.0, 5.0, 5.0]);
    let mut mask = MASK.to_vec();
    mask.extend([0.0, 0.0, 0.0]);
    let mut adv = ADV.to_vec();
    adv.push(3.0);
    let (l, _) = grpo(
        &rl_spec(0.0, LossAgg::SeqMean),
        &logp,
        &o,
        &[0.0; 12],
        &adv,
        &mask,
        4,
        3,
    );
    let want = ((-1.28 - 0.5) / 2.0 + 1.6 + 1.2) / 3.0;
    assert!(close(l, want), "{l} vs {want}");
}

#[test]
fn grpo_k3_penalty_is_added_on_response_tokens() {
    let beta = 0.1;
    // ref − logπ = ln 2 on every response token: k3 = 2 − ln 2 − 1.
    let reference: Vec<f64> = LOGP
        .iter()
        .zip(MASK)
        .map(|(lp, m)| {
            if m > 0.0 {
                lp + 2f64.ln()
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let (l, gr) = grpo(
        &rl_spec(beta, LossAgg::TokenMean),
        &LOGP,
        &old(),
        &reference,
        &ADV,
        &MASK,
        3,
        3,
    );
    let k3 = 2.0 - 2f64.ln() - 1.0;
    let want = (-1.28 - 0.5 + 1.6 + 1.2) / 4.0 + beta * k3;
    assert!(close(l, want), "{l} vs {want}");
    // d k3 / d logπ = −e^{ref−logπ} + 1 = −1 per token, times β / 4.
    assert!(
        close(gr[1], -beta / 4.0),
        "clipped token carries only the KL gradient: {}",
        gr[1]
    );
    assert!(close(gr[7], 1.2 / 4.0 - beta / 4.0), "{}", gr[7]);
}

#[test]
fn sft_loss_is_the_masked_token_mean_of_negative_log_probs() {
    let mut g = Graph::new();
    let lp = g.input("logp", DType::F64, vec![2, 3]);
    let m = g.input("mask", DType::F64, vec![2, 3]);
    let l = sft_loss(&mut g, lp, m);
    let mut inputs = Inputs::new();
    inputs.insert(
        "logp".into(),
        f64_tensor(&[2, 3], &[0.0, -1.0, -2.0, 0.0, -4.0, -8.0]),
    );
    inputs.insert(
        "mask".into(),
        f64_tensor(&[2, 3], &[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]),
    );
    let v = eval(&g, &inputs, &[l])[0][0];
    assert!(close(v, 7.0 / 3.0), "{v}");
}
