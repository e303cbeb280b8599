//! The IR decoder against a plain-loop reference written from docs/semantics.md §2:
//! pre-norm blocks, RMSNorm, rotate-half RoPE, grouped-query causal
//! attention (query head h reads kv head h / (H / KV)), SwiGLU, LoRA with
//! scale alpha / rank, tied or separate LM head, optional q/k/v biases.

mod common;

use common::*;
use coopc_compiler::ir::{DType, Graph};
use coopc_compiler::model::{lora_shapes, theta_shapes, Decoder, Params};
use coopc_compiler::spec::{PipelineSpec, Projection};
use coopc_runtime::HostTensor;
use rand::Rng;
use std::collections::HashMap;

type P = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// y[n, out] = x[n, in] · Wᵀ (+ b) (+ s · (x Aᵀ) Bᵀ) for the projection at `path`.
fn linear(
    p: &P,
    spec: &PipelineSpec,
    path: &str,
    proj: Projection,
    x: &[f64],
    n: usize,
) -> Vec<f64> {
    let (ws, w) = &p[&format!("{path}.weight")];
    let (out, inp) = (ws[0], ws[1]);
    let mut y = vec![0.0; n * out];
    for r in 0..n {
        for o in 0..out {
            let mut acc = 0.0;
            for i in 0..inp {
                acc += x[r * inp + i] * w[o * inp + i];
            }
            if let Some((_, b)) = p.get(&format!("{path}.bias")) {
                acc += b[o];
            }
            y[r * out + o] = acc;
        }
    }
    if spec.lora.targets.contains(&proj) {
        let (_, a) = &p[&format!("base_model.model.{path}.lora_A.weight")];
        let (_, bm) = &p[&format!("base_model.model.{path}.lora_B.weight")];
        let rank = spec.lora.rank;
        let s = spec.lora.alpha / rank as f64;
        for r in 0..n {
            let xa: Vec<f64> = (0..rank)
                .map(|k| (0..inp).map(|i| x[r * inp + i] * a[k * inp + i]).sum())
                .collect();
            for o in 0..out {
                y[r * out + o] += s * (0..rank).map(|k| xa[k] * bm[o * rank + k]).sum::<f64>();
            }
        }
    }
    y
}

fn rms_norm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let d = g.len();
    let mut y = x.to_vec();
    for row in y.chunks_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for (v, gg) in row.iter_mut().zip(g) {
            *v = *v * r * gg;
        }
    }
    y
}

/// Rotate-half RoPE of one head vector at position `pos`.
fn rope(v: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let hd = v.len();
    let half = hd / 2;
    (0..hd)
        .map(|j| {
            let i = j % half;
            let a = pos as f64 / theta.powf((2 * i) as f64 / hd as f64);
            let rot = if j < half { -v[j + half] } else { v[j - half] };
            v[j] * a.cos() + rot * a.sin()
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Each position's log-prob of its token and the entropy of the
/// distribution it is drawn from (0 at position 0).
fn reference_logprobs(spec: &PipelineSpec, p: &P, ids: &[i32], t: usize) -> (Vec<f64>, Vec<f64>) {
    let m = &spec.model;
    let (d, h, kvh, hd) = (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim());
    let (mut out, mut entropy) = (Vec::new(), Vec::new());
    for seq in ids.chunks(t) {
        let emb = &p["model.embed_tokens.weight"].1;
        let mut x: Vec<f64> = seq
            .iter()
            .flat_map(|&id| emb[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        for l in 0..m.n_layers {
            let at =
                |proj: Projection| format!("model.layers.{l}.{}.{}", proj.block(), proj.name());
            let hn = rms_norm(
                &x,
                &p[&format!("model.layers.{l}.input_layernorm.weight")].1,
                m.rms_eps,
            );
            let q = linear(p, spec, &at(Projection::QProj), Projection::QProj, &hn, t);
            let k = linear(p, spec, &at(Projection::KProj), Projection::KProj, &hn, t);
            let v = linear(p, spec, &at(Projection::VProj), Projection::VProj, &hn, t);
            let mut attn = vec![0.0; t * h * hd];
            for head in 0..h {
                let kv = head / (h / kvh);
                let qs: Vec<Vec<f64>> = (0..t)
                    .map(|i| rope(&q[i * h * hd + head * hd..][..hd], i, m.rope_theta))
                    .collect();
                let ks: Vec<Vec<f64>> = (0..t)
                    .map(|i| rope(&k[i * kvh * hd + kv * hd..][..hd], i, m.rope_theta))
                    .collect();
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            qs[i].iter().zip(&ks[j]).map(|(a, b)| a * b).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        attn[i * h * hd + head * hd + c] = (0..=i)
                            .map(|j| e[j] / z * v[j * kvh * hd + kv * hd + c])
                            .sum();
                    }
                }
            }
            let o = linear(p, spec, &at(Projection::OProj), Projection::OProj, &attn, t);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let hn = rms_norm(
                &x,
                &p[&format!("model.layers.{l}.post_attention_layernorm.weight")].1,
                m.rms_eps,
            );
            let gate = linear(
                p,
                spec,
                &at(Projection::GateProj),
                Projection::GateProj,
                &hn,
                t,
            );
            let up = linear(p, spec, &at(Projection::UpProj), Projection::UpProj, &hn, t);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            let down = linear(
                p,
                spec,
                &at(Projection::DownProj),
                Projection::DownProj,
                &act,
                t,
            );
            for (a, b) in x.iter_mut().zip(&down) {
                *a += b;
            }
        }
        let xn = rms_norm(&x, &p["model.norm.weight"].1, m.rms_eps);
        let head = p
            .get("lm_head.weight")
            .unwrap_or(&p["model.embed_tokens.weight"]);
        let vocab = m.vocab_size;
        out.push(0.0);
        entropy.push(0.0);
        for i in 1..t {
            let logits: Vec<f64> = (0..vocab)
                .map(|vv| {
                    (0..d)
                        .map(|c| xn[(i - 1) * d + c] * head.1[vv * d + c])
                        .sum()
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + logits.iter().map(|l| (l - mx).exp()).sum::<f64>().ln();
            out.push(logits[seq[i] as usize] - lse);
            entropy.push(
                -logits
                    .iter()
                    .map(|l| (l - lse).exp() * (l - lse))
                    .sum::<f64>(),
            );
        }
    }
    (out, entropy)
}

fn check(spec: &PipelineSpec, seed: u64) {
    let mut r = rng(seed);
    let mut p = P::new();
    let mut g = Graph::new();
    let mut theta = Params::new();
    let mut w = Params::new();
    let mut inputs = Inputs::new();
    for (is_theta, list) in [
        (true, theta_shapes(&spec.model)),
        (false, lora_shapes(&spec.model, &spec.lora)),
    ] {
        for (name, shape) in list {
            let n: usize = shape.iter().product();
            let v = if name.contains("norm") {
                uniform(&mut r, n, 0.5, 1.5)
            } else {
                uniform(&mut r, n, -0.6, 0.6)
            };
            let id = g.input(name.clone(), DType::F64, shape.clone());
            if is_theta {
                theta.insert(name.clone(), id);
            } else {
                w.insert(name.clone(), id);
            }
            inputs.insert(name.clone(), f64_tensor(&shape, &v));
            p.insert(name, (shape, v));
        }
    }
    let (b, t) = (3, 7);
    let ids: Vec<i32> = (0..b * t)
        .map(|_| r.gen_range(0..spec.model.vocab_size as i32))
        .collect();
    let idn = g.input("ids", DType::I32, vec![b, t]);
    inputs.insert("ids".into(), HostTensor::i32(vec![b, t], ids.clone()));
    let dec = Decoder {
        model: &spec.model,
        lora: &spec.lora,
        dtype: DType::F64,
    };
    let lp = dec.token_logprobs(&mut g, &theta, &w, idn);
    let (lp2, ent) = dec.token_logprobs_and_entropy(&mut g, &theta, &w, idn);
    let got = eval(&g, &inputs, &[lp, lp2, ent]);
    let (want, want_entropy) = reference_logprobs(spec, &p, &ids, t);
    for (what, got, want) in [
        ("log-probs", &got[0], &want),
        ("log-probs beside the entropy", &got[1], &want),
        ("entropy", &got[2], &want_entropy),
    ] {
        let e = rel_err(got, want, 1e-9);
        assert!(
            e < 1e-12,
            "decoder vs reference, {what}: rel err {e:e}\n got  {got:?}\n want {want:?}"
        );
    }
}

#[test]
fn grouped_query_decoder_with_lora_matches_the_reference() {
    let mut spec = tiny_spec();
    spec.model.n_layers = 2;
    check(&spec, 1);
}

#[test]
fn decoder_with_qkv_bias_untied_head_and_partial_lora_matches_the_reference() {
    let mut spec = tiny_spec();
    spec.model.qkv_bias = true;
    spec.model.tie_embeddings = false;
    spec.model.n_heads = 4;
    spec.model.n_kv_heads = 2;
    spec.model.d_model = 16;
    spec.lora.targets = vec![Projection::QProj, Projection::VProj, Projection::DownProj];
    check(&spec, 2);
}
