//! The policy as IR: a Llama/Qwen2/Qwen3-style decoder with LoRA adapters, built
//! from parameter nodes named as Hugging Face (θ) and PEFT (w) name them,
//! producing per-token log-probabilities of a batch of token ids.

use crate::ir::{DType, Graph, NodeId};
pub use crate::params::*;
use crate::spec::{LoraSpec, ModelSpec, Projection};
use std::collections::BTreeMap;

/// Parameter nodes by name.
pub type Params = BTreeMap<String, NodeId>;

/// Builds the decoder over given parameter nodes.
pub struct Decoder<'a> {
    pub model: &'a ModelSpec,
    pub lora: &'a LoraSpec,
    pub dtype: DType,
}

impl Decoder<'_> {
    /// Parameter `name` in the decoder's compute type: the node itself, or
    /// (a bf16 decoder over f32 master copies) its cast, one per parameter
    /// node once CSE has run.
    pub(crate) fn p(&self, g: &mut Graph, params: &Params, name: &str) -> NodeId {
        self.get(g, params, name)
            .unwrap_or_else(|| panic!("parameter `{name}` not provided to the decoder"))
    }

    /// As [`Decoder::p`], `None` when `params` has no `name`.
    pub(crate) fn get(&self, g: &mut Graph, params: &Params, name: &str) -> Option<NodeId> {
        let &id = params.get(name)?;
        Some(if g.ty(id).dtype == self.dtype {
            id
        } else {
            g.cast(id, self.dtype)
        })
    }

    /// `x Wᵀ (+ b) (+ s_low · (x A_lowᵀ) B_lowᵀ) + s · (x Aᵀ) Bᵀ` on the
    /// last axis of x.
    pub(crate) fn linear(
        &self,
        g: &mut Graph,
        x: NodeId,
        theta: &Params,
        w: &Params,
        layer: usize,
        p: Projection,
    ) -> NodeId {
        let path = module_path(layer, p);
        let weight = self.p(g, theta, &format!("{path}.weight"));
        let mut y = matmul_t(g, x, weight);
        if let Some(b) = self.get(g, theta, &format!("{path}.bias")) {
            let shape = g.ty(y).shape.clone();
            let bb = g.broadcast(b, shape);
            y = g.add(y, bb);
        }
        // The lower level's LoRA of θ (`model.lower`), read from θ's params
        // when it is there (the decode step reads it merged instead).
        if let Some(lower) = &self.model.lower {
            if let (Some(a), Some(b)) = (
                self.get(g, theta, &lower_lora_name(layer, p, 'A')),
                self.get(g, theta, &lower_lora_name(layer, p, 'B')),
            ) {
                let xa = matmul_t(g, x, a);
                let xab = matmul_t(g, xa, b);
                let xab = g.scale(xab, lower.scale());
                y = g.add(y, xab);
            }
        }
        if self.lora.targets.contains(&p) {
            let a = self.p(g, w, &lora_name(layer, p, 'A'));
            let b = self.p(g, w, &lora_name(layer, p, 'B'));
            let xa = matmul_t(g, x, a);
            let xab = matmul_t(g, xa, b);
            let xab = g.scale(xab, self.lora.scale());
            y = g.add(y, xab);
        }
        y
    }

    /// RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · g
    /// (`Op::RmsNorm`).
    pub(crate) fn rms_norm(&self, g: &mut Graph, x: NodeId, weight: NodeId) -> NodeId {
        g.rms_norm(x, weight, self.model.rms_eps)
    }

    /// Values of the cos and sin tables [t, head_dim] of HF Llama's
    /// rotate-half RoPE, row-major.
    pub(crate) fn rope_values(&self, t: usize) -> (Vec<f64>, Vec<f64>) {
        let hd = self.model.head_dim();
        let half = hd / 2;
        let inv_freq = self.model.rope_inv_freq();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for pos in 0..t {
            for j in 0..hd {
                let a = pos as f64 * inv_freq[j % half];
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// cos and sin tables [T, head_dim] as literals.
    fn rope_tables(&self, g: &mut Graph, t: usize) -> (NodeId, NodeId) {
        let hd = self.model.head_dim();
        let (cos, sin) = self.rope_values(t);
        (
            g.literal(&cos, self.dtype, vec![t, hd]),
            g.literal(&sin, self.dtype, vec![t, hd]),
        )
    }

    /// x·cos + rotate_half(x)·sin for x [B, H, T, hd] (`Op::Rope`).
    pub(crate) fn rope(&self, g: &mut Graph, x: NodeId, cos: NodeId, sin: NodeId) -> NodeId {
        g.rope(x, cos, sin, false)
    }

    /// [B, T, n·hd] → [B, n, T, hd].
    pub(crate) fn split_heads(&self, g: &mut Graph, x: NodeId, n: usize) -> NodeId {
        let s = g.ty(x).shape.clone();
        let hd = self.model.head_dim();
        let r = g.reshape(x, vec![s[0], s[1], n, hd]);
        g.permute(r, &[0, 2, 1, 3])
    }

    /// Decoder layer `i` on hidden states `x` [B, T, d_model]: the pre-norm
    /// attention block and the SwiGLU MLP block, each with its residual.
    /// `attend` gets the rotated queries [B, H, T, hd] and keys and values
    /// [B, H_kv, T, hd] and returns the attention output [B, H, T, hd]: the
    /// full forward attends causally over the sequence, the decode step
    /// over its cache. Written once for both, so they agree to rounding.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer(
        &self,
        g: &mut Graph,
        theta: &Params,
        w: &Params,
        i: usize,
        x: NodeId,
        (cos, sin): (NodeId, NodeId),
        attend: impl FnOnce(&mut Graph, NodeId, NodeId, NodeId) -> NodeId,
    ) -> NodeId {
        let m = self.model;
        let s = g.ty(x).shape.clone();
        let (b, t) = (s[0], s[1]);
        let ln1 = self.p(
            g,
            theta,
            &format!("model.layers.{i}.input_layernorm.weight"),
        );
        let hn = self.rms_norm(g, x, ln1);
        let q = self.linear(g, hn, theta, w, i, Projection::QProj);
        let k = self.linear(g, hn, theta, w, i, Projection::KProj);
        let v = self.linear(g, hn, theta, w, i, Projection::VProj);
        let (mut q, mut k) = (q, k);
        if m.qk_norm {
            // Qwen3: RMSNorm over each head's width, before the heads split off.
            let hd = m.head_dim();
            for (x, heads, which) in [
                (&mut q, m.n_heads, "q_norm"),
                (&mut k, m.n_kv_heads, "k_norm"),
            ] {
                let weight = self.p(
                    g,
                    theta,
                    &format!("model.layers.{i}.self_attn.{which}.weight"),
                );
                let r = g.reshape(*x, vec![b, t, heads, hd]);
                let r = self.rms_norm(g, r, weight);
                *x = g.reshape(r, vec![b, t, heads * hd]);
            }
        }
        let q = self.split_heads(g, q, m.n_heads);
        let k = self.split_heads(g, k, m.n_kv_heads);
        let v = self.split_heads(g, v, m.n_kv_heads);
        let q = self.rope(g, q, cos, sin);
        let k = self.rope(g, k, cos, sin);
        let a = attend(g, q, k, v);
        let a = g.permute(a, &[0, 2, 1, 3]);
        let a = g.reshape(a, vec![b, t, m.n_heads * m.head_dim()]);
        let o = self.linear(g, a, theta, w, i, Projection::OProj);
        let x = g.add(x, o);
        let ln2 = self.p(
            g,
            theta,
            &format!("model.layers.{i}.post_attention_layernorm.weight"),
        );
        let hn = self.rms_norm(g, x, ln2);
        let gate = self.linear(g, hn, theta, w, i, Projection::GateProj);
        let up = self.linear(g, hn, theta, w, i, Projection::UpProj);
        let act = g.silu(gate);
        let act = g.mul(act, up);
        let down = self.linear(g, act, theta, w, i, Projection::DownProj);
        g.add(x, down)
    }

    /// Final hidden states [B, T, d_model] (after the last RMSNorm) for ids [B, T].
    pub fn hidden(&self, g: &mut Graph, theta: &Params, w: &Params, ids: NodeId) -> NodeId {
        let m = self.model;
        let t = g.ty(ids).shape[1];
        let embed = self.p(g, theta, "model.embed_tokens.weight");
        let mut x = g.gather(embed, ids);
        let (cos, sin) = self.rope_tables(g, t);
        for i in 0..m.n_layers {
            x = self.layer(g, theta, w, i, x, (cos, sin), |g, q, k, v| {
                g.causal_attention(q, k, v)
            });
        }
        let norm = self.p(g, theta, "model.norm.weight");
        self.rms_norm(g, x, norm)
    }

    /// Logits [B, T, vocab] for ids [B, T].
    pub fn logits(&self, g: &mut Graph, theta: &Params, w: &Params, ids: NodeId) -> NodeId {
        let h = self.hidden(g, theta, w, ids);
        let head = self.head(g, theta);
        matmul_t(g, h, head)
    }

    /// The LM head: `lm_head.weight`, or the embedding when tied.
    fn head(&self, g: &mut Graph, theta: &Params) -> NodeId {
        match self.get(g, theta, "lm_head.weight") {
            Some(hw) => hw,
            None => self.p(g, theta, "model.embed_tokens.weight"),
        }
    }

    /// Token log-probabilities [B, T]: entry t is log π(ids[t] | ids[<t]),
    /// from the hidden state at position t − 1 (one `linear_logprob`, so
    /// the [B, T, vocab] logits are never a value); entry 0 is 0.
    pub fn token_logprobs(&self, g: &mut Graph, theta: &Params, w: &Params, ids: NodeId) -> NodeId {
        let (prev, head) = self.scoring_states(g, theta, w, ids);
        self.token_logprobs_of(g, prev, head, ids)
    }

    /// [`Decoder::token_logprobs`] and the entropy of each of the
    /// distributions they are taken from, `[B, T]` (entry t that of π(· |
    /// ids[<t]), one `linear_entropy`; entry 0 is 0).
    pub fn token_logprobs_and_entropy(
        &self,
        g: &mut Graph,
        theta: &Params,
        w: &Params,
        ids: NodeId,
    ) -> (NodeId, NodeId) {
        let (prev, head) = self.scoring_states(g, theta, w, ids);
        let lp = self.token_logprobs_of(g, prev, head, ids);
        (lp, self.token_entropy_of(g, prev, head, ids))
    }

    /// The hidden states `[B·(T−1), d]` that score positions 1.. of `ids
    /// [B, T]`, and the LM head.
    fn scoring_states(
        &self,
        g: &mut Graph,
        theta: &Params,
        w: &Params,
        ids: NodeId,
    ) -> (NodeId, NodeId) {
        let s = g.ty(ids).shape.clone();
        let (b, t) = (s[0], s[1]);
        let h = self.hidden(g, theta, w, ids);
        let d = self.model.d_model;
        let prev = g.slice(h, &[0, 0, 0], &[b, t - 1, d]);
        let prev = g.reshape(prev, vec![b * (t - 1), d]);
        (prev, self.head(g, theta))
    }

    fn token_logprobs_of(&self, g: &mut Graph, prev: NodeId, head: NodeId, ids: NodeId) -> NodeId {
        let s = g.ty(ids).shape.clone();
        let (b, t) = (s[0], s[1]);
        let next = g.slice(ids, &[0, 1], &[b, t]);
        let next = g.reshape(next, vec![b * (t - 1)]);
        let picked = g.linear_logprob(prev, head, next);
        let picked = g.reshape(picked, vec![b, t - 1]);
        g.pad(picked, &[0, 1], &[0, 0], 0.0)
    }

    fn token_entropy_of(&self, g: &mut Graph, prev: NodeId, head: NodeId, ids: NodeId) -> NodeId {
        let s = g.ty(ids).shape.clone();
        let (b, t) = (s[0], s[1]);
        let e = g.linear_entropy(prev, head);
        let e = g.reshape(e, vec![b, t - 1]);
        g.pad(e, &[0, 1], &[0, 0], 0.0)
    }
}

/// Causal softmax attention of q [B,H,T,hd] over k, v [B,H,T,hd] written
/// with ordinary ops (see `attention::causal_probs`): the pattern the
/// fusion pass recognises in graphs that spell attention out.
pub fn causal_attention(g: &mut Graph, q: NodeId, k: NodeId, v: NodeId) -> NodeId {
    let p = crate::attention::causal_probs(g, q, k);
    g.matmul(p, v)
}

/// `x Wᵀ` over the last axis of x (any rank ≥ 2) for W [out, in].
pub fn matmul_t(g: &mut Graph, x: NodeId, w: NodeId) -> NodeId {
    let xs = g.ty(x).shape.clone();
    let ws = g.ty(w).shape.clone();
    let inner = *xs.last().expect("rank ≥ 1");
    let rows: usize = xs[..xs.len() - 1].iter().product();
    let x2 = g.reshape(x, vec![rows, inner]);
    let wt = g.transpose(w);
    let y = g.matmul(x2, wt);
    let mut out = xs[..xs.len() - 1].to_vec();
    out.push(ws[0]);
    g.reshape(y, out)
}
