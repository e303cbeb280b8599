//! The policy and the losses, written with burn tensors as a burn user would
//! write a Llama/Qwen2 decoder with PEFT-style LoRA: pre-norm RMSNorm blocks,
//! rotate-half RoPE, causal grouped-query attention, SwiGLU, tied or untied
//! LM head; SFT and GRPO losses with the conventions of docs/semantics.md §2 and §4.
//!
//! Every parameter is kept as a rank-2 tensor (a norm gain or a bias as
//! [1, n]) so that one map holds θ and one holds w; the forward pass works
//! on the flattened [batch·T, d] residual stream.

use std::collections::HashMap;

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::spec::{lora_name, module_path, LossAgg, Spec};

/// Named rank-2 parameters (θ or w).
pub type Params<B> = HashMap<String, Tensor<B, 2>>;

/// One step's batch as tensors (masks and log-probs are data: no gradient).
#[derive(Clone)]
pub struct Batch<B: Backend> {
    pub sft_ids: Tensor<B, 2, Int>,
    pub sft_mask: Tensor<B, 2>,
    pub sft_mask_sum: f64,
    pub rl_ids: Tensor<B, 2, Int>,
    pub rl_mask: Tensor<B, 2>,
    pub rl_advantages: Tensor<B, 2>,
    pub rl_old_logprobs: Tensor<B, 2>,
    pub rl_ref_logprobs: Option<Tensor<B, 2>>,
}

/// RoPE tables and the causal mask for one sequence length.
struct Tables<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    causal: Tensor<B, 4>,
}

pub struct Policy<'s> {
    pub spec: &'s Spec,
}

fn param<'a, B: Backend>(p: &'a Params<B>, name: &str) -> &'a Tensor<B, 2> {
    p.get(name)
        .unwrap_or_else(|| panic!("parameter `{name}` is missing (checked when loading)"))
}

impl<'s> Policy<'s> {
    fn tables<B: Backend>(&self, t: usize, device: &B::Device) -> Tables<B> {
        // Hugging Face Llama's rotate-half tables, computed in f64 (as coopc
        // and the PyTorch peer do), then rounded to the working precision.
        let hd = self.spec.head_dim();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for pos in 0..t {
            for j in 0..hd {
                let i = (j % (hd / 2)) * 2;
                let inv = 1.0 / self.spec.rope_theta.powf(i as f64 / hd as f64);
                let f = pos as f64 * inv;
                cos.push(f.cos());
                sin.push(f.sin());
            }
        }
        let mk = |v: Vec<f64>| {
            Tensor::<B, 4>::from_data(
                TensorData::new(v, [1, 1, t, hd]).convert::<B::FloatElem>(),
                device,
            )
        };
        // Additive causal mask: 0 on and below the diagonal, −∞ above.
        let mut mask = vec![0.0f64; t * t];
        for r in 0..t {
            for c in r + 1..t {
                mask[r * t + c] = f64::NEG_INFINITY;
            }
        }
        Tables {
            cos: mk(cos),
            sin: mk(sin),
            causal: Tensor::from_data(
                TensorData::new(mask, [1, 1, t, t]).convert::<B::FloatElem>(),
                device,
            ),
        }
    }

    fn rms_norm<B: Backend>(&self, x: Tensor<B, 2>, g: &Tensor<B, 2>) -> Tensor<B, 2> {
        let ms = x.clone().square().mean_dim(1);
        x / ms.add_scalar(self.spec.rms_eps).sqrt() * g.clone()
    }

    /// `x Wᵀ (+ b) + (alpha / rank) (x Aᵀ) Bᵀ` for projection `proj` of block `layer`.
    fn linear<B: Backend>(
        &self,
        x: Tensor<B, 2>,
        theta: &Params<B>,
        w: &Params<B>,
        layer: usize,
        proj: &str,
    ) -> Tensor<B, 2> {
        let path = module_path(layer, proj);
        let mut y = x
            .clone()
            .matmul(param(theta, &format!("{path}.weight")).clone().transpose());
        if let Some(b) = theta.get(&format!("{path}.bias")) {
            y = y + b.clone();
        }
        if self.spec.has_lora(proj) {
            let a = param(w, &lora_name(layer, proj, "A")).clone();
            let b = param(w, &lora_name(layer, proj, "B")).clone();
            y = y + x
                .matmul(a.transpose())
                .matmul(b.transpose())
                .mul_scalar(self.spec.lora_scale());
        }
        y
    }

    /// SiLU x·σ(x) with σ(x) = (1 + tanh(x/2)) / 2. burn 0.21's
    /// `activation::silu` goes through its `sigmoid`, which computes
    /// exp(−log(1 + exp(−x))) after a cast to f32 (whatever the tensor's
    /// dtype): about 1e-7 relative error even in f64, and visibly more than
    /// the other ops in f32. tanh is computed in the tensor's own precision
    /// and stays finite for any x (so does its derivative).
    fn silu<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
        let sigma = x.clone().mul_scalar(0.5).tanh().add_scalar(1.0).mul_scalar(0.5);
        x * sigma
    }

    fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
        let hd = x.dims()[3];
        let h = hd / 2;
        let x1 = x.clone().narrow(3, 0, h);
        let x2 = x.narrow(3, h, h);
        Tensor::cat(vec![x2.neg(), x1], 3)
    }

    /// [B, T]: entry t is log π(ids[t] | ids[<t]) from the logits at t − 1;
    /// entry 0 is 0.
    pub fn token_logprobs<B: Backend>(
        &self,
        theta: &Params<B>,
        w: &Params<B>,
        ids: &Tensor<B, 2, Int>,
    ) -> Tensor<B, 2> {
        let s = self.spec;
        let [b, t] = ids.dims();
        let n = b * t;
        let (h, kv, hd, d) = (s.n_heads, s.n_kv_heads, s.head_dim(), s.d_model);
        let device = ids.device();
        let tab = self.tables::<B>(t, &device);
        let scale = 1.0 / (hd as f64).sqrt();
        let embed = param(theta, "model.embed_tokens.weight");
        let mut x = embed.clone().select(0, ids.clone().reshape([n]));
        for i in 0..s.n_layers {
            let hn = self.rms_norm(
                x.clone(),
                param(theta, &format!("model.layers.{i}.input_layernorm.weight")),
            );
            let heads = |y: Tensor<B, 2>, nh: usize| -> Tensor<B, 4> {
                y.reshape([b, t, nh, hd]).swap_dims(1, 2)
            };
            let q = heads(self.linear(hn.clone(), theta, w, i, "q_proj"), h);
            let k = heads(self.linear(hn.clone(), theta, w, i, "k_proj"), kv);
            let v = heads(self.linear(hn, theta, w, i, "v_proj"), kv);
            let q = q.clone() * tab.cos.clone() + Self::rotate_half(q) * tab.sin.clone();
            let k = k.clone() * tab.cos.clone() + Self::rotate_half(k) * tab.sin.clone();
            let (k, v) = if kv != h {
                // Grouped-query attention: query head j uses kv head j / (h / kv).
                let rep = h / kv;
                let expand = |y: Tensor<B, 4>| -> Tensor<B, 4> {
                    y.reshape([b, kv, 1, t, hd])
                        .repeat_dim(2, rep)
                        .reshape([b, h, t, hd])
                };
                (expand(k), expand(v))
            } else {
                (k, v)
            };
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + tab.causal.clone();
            let att = softmax(scores, 3).matmul(v);
            let att = att.swap_dims(1, 2).reshape([n, h * hd]);
            x = x + self.linear(att, theta, w, i, "o_proj");
            let hn = self.rms_norm(
                x.clone(),
                param(
                    theta,
                    &format!("model.layers.{i}.post_attention_layernorm.weight"),
                ),
            );
            let act = Self::silu(self.linear(hn.clone(), theta, w, i, "gate_proj"))
                * self.linear(hn, theta, w, i, "up_proj");
            x = x + self.linear(act, theta, w, i, "down_proj");
        }
        let x = self.rms_norm(x, param(theta, "model.norm.weight"));
        let head = theta.get("lm_head.weight").unwrap_or(embed).clone();
        // Positions 0..T−2 predict tokens 1..T−1.
        let x = x.reshape([b, t, d]).narrow(1, 0, t - 1).reshape([b * (t - 1), d]);
        let lp = log_softmax(x.matmul(head.transpose()), 1);
        let targets = ids.clone().narrow(1, 1, t - 1).reshape([b * (t - 1), 1]);
        let picked = lp.gather(1, targets).reshape([b, t - 1]);
        Tensor::cat(vec![Tensor::zeros([b, 1], &device), picked], 1)
    }

    /// L_SFT = −Σ mask·logπ / Σ mask.
    pub fn sft_loss<B: Backend>(
        &self,
        theta: &Params<B>,
        w: &Params<B>,
        batch: &Batch<B>,
    ) -> Tensor<B, 1> {
        let lp = self.token_logprobs(theta, w, &batch.sft_ids);
        // A multiplication by −1/Σmask formed in f64: burn 0.21's autodiff
        // differentiates `div_scalar` by multiplying with `1 / (s as f32)`,
        // which is off by up to 6e-8 relative in f64 (when 1/s is not an f32).
        (lp * batch.sft_mask.clone())
            .sum()
            .mul_scalar(-1.0 / batch.sft_mask_sum)
    }

    /// The GRPO surrogate (docs/semantics.md §4.2): masked positions have ratio 1 and
    /// k3 0; on a tie the unclipped term is used.
    pub fn rl_loss<B: Backend>(
        &self,
        theta: &Params<B>,
        w: &Params<B>,
        batch: &Batch<B>,
    ) -> Tensor<B, 1> {
        let s = self.spec;
        let lp = self.token_logprobs(theta, w, &batch.rl_ids);
        let mask = batch.rl_mask.clone();
        let off = mask.clone().lower_equal_elem(0.0);
        let d = (lp.clone() - batch.rl_old_logprobs.clone()).mask_fill(off.clone(), 0.0);
        let ratio = d.exp();
        let adv = batch.rl_advantages.clone();
        let unclipped = ratio.clone() * adv.clone();
        let clipped = ratio.clamp(1.0 - s.clip_low, 1.0 + s.clip_high) * adv;
        let take_unclipped = unclipped.clone().lower_equal(clipped.clone());
        let surrogate = clipped.mask_where(take_unclipped, unclipped);
        let mut per_token = surrogate.neg();
        if s.kl_coef > 0.0 {
            let r = batch
                .rl_ref_logprobs
                .clone()
                .expect("rl.ref_logprobs is loaded when kl_coef > 0");
            let diff = (r - lp).mask_fill(off, 0.0);
            let k3 = (diff.clone().exp() - diff).sub_scalar(1.0);
            per_token = per_token + k3.mul_scalar(s.kl_coef);
        }
        let weighted = per_token * mask.clone();
        match s.loss_agg {
            LossAgg::TokenMean => weighted.sum() / mask.sum(),
            LossAgg::SeqMean => {
                let cnt = mask.sum_dim(1);
                let none = cnt.clone().lower_equal_elem(0.0);
                let has = none.clone().bool_not().float();
                let per_seq = weighted.sum_dim(1) / cnt.mask_fill(none, 1.0);
                (per_seq * has.clone()).sum() / has.sum()
            }
        }
    }
}
