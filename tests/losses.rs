//! The SFT loss and the GRPO surrogate on hand-computed cases: clipping on
//! both sides, positive and negative advantages, the tie rule, the k1, k2
//! and k3 KL penalties (and none in the loss when it is in the reward),
//! garbage at masked positions, the three aggregations, GSPO's sequence
//! ratio and CISPO's surrogate.

mod common;

use common::*;
use coopc_compiler::autodiff::grad;
use coopc_compiler::ir::{DType, Graph, NodeId};
use coopc_compiler::losses::{grpo_loss, sft_loss, RlBatch};
use coopc_compiler::spec::{KlEstimator, LossAgg, PolicyLoss, RatioLevel, RlSpec};

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

/// Each gradient element is `close` to the one wanted.
fn assert_grad(gr: &[f64], want: [f64; 9]) {
    assert_eq!(gr.len(), want.len());
    for (i, (a, b)) in gr.iter().zip(want).enumerate() {
        assert!(close(*a, b), "grad[{i}] = {a}, want {b}");
    }
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
    assert_grad(&gr, want_g);
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

/// ref − logπ = ln 2 on every response token (∞ elsewhere, dropped).
fn ln2_reference() -> Vec<f64> {
    LOGP.iter()
        .zip(MASK)
        .map(|(lp, m)| {
            if m > 0.0 {
                lp + 2f64.ln()
            } else {
                f64::INFINITY
            }
        })
        .collect()
}

#[test]
fn grpo_k1_and_k2_penalties_use_their_estimates() {
    let beta = 0.1;
    let kappa = 2f64.ln();
    let surrogate = (-1.28 - 0.5 + 1.6 + 1.2) / 4.0;
    // (estimator, its value at κ, its derivative with respect to logπ).
    for (kl, value, slope) in [
        (KlEstimator::K1, -kappa, 1.0),
        (KlEstimator::K2, kappa * kappa / 2.0, -kappa),
    ] {
        let mut spec = rl_spec(beta, LossAgg::TokenMean);
        spec.kl_estimator = kl;
        let (l, gr) = grpo(&spec, &LOGP, &old(), &ln2_reference(), &ADV, &MASK, 3, 3);
        let want = surrogate + beta * value;
        assert!(close(l, want), "{kl:?}: {l} vs {want}");
        // Token 1 is clipped: only the KL term's gradient.
        assert!(close(gr[1], beta * slope / 4.0), "{kl:?}: {}", gr[1]);
        assert!(
            close(gr[7], 1.2 / 4.0 + beta * slope / 4.0),
            "{kl:?}: {}",
            gr[7]
        );
    }
}

#[test]
fn a_kl_penalty_in_the_reward_is_not_in_the_loss() {
    let mut spec = rl_spec(0.1, LossAgg::TokenMean);
    spec.kl_in_reward = true;
    let (l, gr) = grpo(&spec, &LOGP, &old(), &ln2_reference(), &ADV, &MASK, 3, 3);
    let want = (-1.28 - 0.5 + 1.6 + 1.2) / 4.0;
    assert!(close(l, want), "{l} vs {want}");
    assert_eq!(gr[1], 0.0);
}

#[test]
fn dr_grpo_divides_token_sums_by_sequences_times_max_new_tokens() {
    let mut spec = rl_spec(0.0, LossAgg::SeqMeanTokenSumNorm);
    spec.max_new_tokens = 4;
    let (l, gr) = grpo(&spec, &LOGP, &old(), &[0.0; 9], &ADV, &MASK, 3, 3);
    // 3 sequences × 4 tokens, whatever their lengths.
    let want = (-1.28 - 0.5 + 1.6 + 1.2) / 12.0;
    assert!(close(l, want), "{l} vs {want}");
    let want_g = [0.0, 0.0, -0.5 / 12.0, 0.0, 0.0, 0.0, 0.0, 1.2 / 12.0, 0.0];
    assert_grad(&gr, want_g);
}

#[test]
fn gspo_clips_the_length_normalised_sequence_ratio() {
    let mut spec = rl_spec(0.0, LossAgg::TokenMean);
    spec.ratio_level = RatioLevel::Sequence;
    let (l, gr) = grpo(&spec, &LOGP, &old(), &[0.0; 9], &ADV, &MASK, 3, 3);
    // s = √(1.5 · 0.5) inside the range for sequence 0 (A = 1); 0.5, below
    // it, for sequence 1 (A = −2: the clipped −1.6 wins, no gradient); 1.2
    // for sequence 2 (A = −1).
    let s0 = 0.75f64.sqrt();
    let want = (-s0 - s0 + 1.6 + 1.2) / 4.0;
    assert!(close(l, want), "{l} vs {want}");
    // ∂/∂logπ_t of the sequence's term −s·A is −s·A / n_b; each sequence
    // weighs n_b / 4 in the token mean.
    let want_g = [
        0.0,
        -s0 / 4.0,
        -s0 / 4.0,
        0.0,
        0.0,
        0.0,
        0.0,
        1.2 / 4.0,
        0.0,
    ];
    assert_grad(&gr, want_g);
}

#[test]
fn cispo_weights_every_token_by_its_clipped_ratio() {
    let mut spec = rl_spec(0.0, LossAgg::TokenMean);
    spec.loss = PolicyLoss::Cispo;
    let (l, gr) = grpo(&spec, &LOGP, &old(), &[0.0; 9], &ADV, &MASK, 3, 3);
    // ℓ = −clip(ρ)·A·logπ: −1.28·1·(−1), −0.8·1·(−2), −0.8·(−2)·(−1),
    // −1.2·(−1)·(−0.5).
    let want = (1.28 + 1.6 - 1.6 - 0.6) / 4.0;
    assert!(close(l, want), "{l} vs {want}");
    // −clip(ρ)·A on every response token: clipped ones (1 and 4) too.
    let want_g = [
        0.0,
        -1.28 / 4.0,
        -0.8 / 4.0,
        0.0,
        1.6 / 4.0,
        0.0,
        0.0,
        1.2 / 4.0,
        0.0,
    ];
    assert_grad(&gr, want_g);
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

/// A batch without a response token (every completion masked out, as
/// `mask_truncated` can make it, or a process's share of one): each
/// aggregation's mean over nothing is 0 and so is its gradient — not 0/0 —
/// in the op and in its reference lowering, the SFT loss too.
#[test]
fn a_batch_without_response_tokens_has_zero_loss_and_gradient() {
    use coopc_compiler::losses::{grpo as grpo_op, grpo_operands, reference_grad, reference_loss};
    let none = [0.0; 9];
    for agg in [
        LossAgg::TokenMean,
        LossAgg::SeqMean,
        LossAgg::SeqMeanTokenSumNorm,
    ] {
        for kl in [0.0, 0.1] {
            let spec = rl_spec(kl, agg);
            let (l, gr) = grpo(&spec, &LOGP, &old(), &[-1.0; 9], &ADV, &none, 3, 3);
            assert_eq!(l, 0.0, "{agg:?}, kl {kl}: loss");
            assert!(gr.iter().all(|&x| x == 0.0), "{agg:?}, kl {kl}: {gr:?}");
            // The reference lowering (the op's definition) agrees.
            let mut g = Graph::new();
            let lp = g.input("logp", DType::F64, vec![3, 3]);
            let batch = RlBatch {
                input_ids: g.input("ids", DType::I32, vec![3, 3]),
                loss_mask: g.input("mask", DType::F64, vec![3, 3]),
                advantages: g.input("adv", DType::F64, vec![3]),
                old_logprobs: g.input("old", DType::F64, vec![3, 3]),
                ref_logprobs: Some(g.input("ref", DType::F64, vec![3, 3])),
            };
            let ops = grpo_operands(&spec, lp, &batch);
            let rl = reference_loss(&mut g, grpo_op(&spec), &ops);
            let one = g.full(1.0, DType::F64, vec![]);
            let rg = reference_grad(&mut g, grpo_op(&spec), &ops, one);
            let mut inputs = Inputs::new();
            inputs.insert("logp".into(), f64_tensor(&[3, 3], &LOGP));
            inputs.insert("mask".into(), f64_tensor(&[3, 3], &none));
            inputs.insert("adv".into(), f64_tensor(&[3], &ADV));
            inputs.insert("old".into(), f64_tensor(&[3, 3], &old()));
            inputs.insert("ref".into(), f64_tensor(&[3, 3], &[-1.0; 9]));
            let out = eval(&g, &inputs, &[rl, rg]);
            assert_eq!(out[0][0], 0.0, "{agg:?}, kl {kl}: reference loss");
            assert!(out[1].iter().all(|&x| x == 0.0), "{agg:?}: {:?}", out[1]);
        }
    }
    let mut g = Graph::new();
    let lp = g.input("logp", DType::F64, vec![2, 3]);
    let m = g.input("mask", DType::F64, vec![2, 3]);
    let l = sft_loss(&mut g, lp, m);
    let gl = grad(&mut g, l, &[lp])[0];
    let mut inputs = Inputs::new();
    inputs.insert("logp".into(), f64_tensor(&[2, 3], &[-1.0; 6]));
    inputs.insert("mask".into(), f64_tensor(&[2, 3], &[0.0; 6]));
    let out = eval(&g, &inputs, &[l, gl]);
    assert_eq!(out[0][0], 0.0);
    assert!(out[1].iter().all(|&x| x == 0.0), "{:?}", out[1]);
}
