//! The policy's autoregressive decode step as IR: one token per row at a
//! shared position, attending over a key/value cache that the step reads as
//! inputs and returns, with the new position written, as outputs. It
//! computes the same function as [`Decoder::logits`] at that position, with
//! the same op order, so the two agree to rounding.

use crate::ir::{DType, Graph, NodeId};
use crate::model::{
    lora_name, lora_shapes, lower_lora_name, lower_lora_shapes, matmul_t, module_path,
    policy_theta_shapes, theta_shapes, Decoder, Params,
};
use crate::passes::Pipeline;
use crate::plan::next_name;
pub use crate::plan::{cache_input, DECODE_IDS, DECODE_LOGITS, DECODE_POS};
use crate::spec::{LoraSpec, ModelSpec, Projection};

/// Name of the updated cache output: `next.cache.{layer}.k` or `.v`.
pub fn cache_output(layer: usize, which: char) -> String {
    next_name(&cache_input(layer, which))
}

/// Shape of every cache tensor: `[batch, n_kv_heads, max_len, head_dim]`.
/// Keys are stored after RoPE.
pub fn cache_shape(model: &ModelSpec, batch: usize, max_len: usize) -> Vec<usize> {
    vec![batch, model.n_kv_heads, max_len, model.head_dim()]
}

/// Adds θ (HF names; with `lower_lora`, the lower level's LoRA of θ too)
/// and w (PEFT names) as inputs of `dtype`.
fn parameter_inputs(
    g: &mut Graph,
    model: &ModelSpec,
    lora: &LoraSpec,
    dtype: DType,
    lower_lora: bool,
) -> (Params, Params) {
    let mut theta = Params::new();
    let shapes = if lower_lora {
        policy_theta_shapes(model)
    } else {
        theta_shapes(model)
    };
    for (name, shape) in shapes {
        let id = g.input(name.clone(), dtype, shape);
        theta.insert(name, id);
    }
    let mut w = Params::new();
    for (name, shape) in lora_shapes(model, lora) {
        let id = g.input(name.clone(), dtype, shape);
        w.insert(name, id);
    }
    (theta, w)
}

/// The full forward as a program: inputs θ, w and `ids` i32
/// `[batch, seq_len]`; output `logits` `[batch, seq_len, vocab]`
/// ([`Decoder::logits`]). The reference the decode step is checked against.
pub fn full_logits_program(
    model: &ModelSpec,
    lora: &LoraSpec,
    dtype: DType,
    batch: usize,
    seq_len: usize,
) -> Graph {
    let mut g = Graph::new();
    let (theta, w) = parameter_inputs(&mut g, model, lora, dtype, true);
    let ids = g.input(DECODE_IDS, DType::I32, vec![batch, seq_len]);
    let dec = Decoder { model, lora, dtype };
    let logits = dec.logits(&mut g, &theta, &w, ids);
    g.set_output(DECODE_LOGITS, logits);
    Pipeline::standard().run(&mut g);
    g
}

/// The LoRA-merged weights the decode step reads: for each projection
/// `lora.targets` (or the lower level's LoRA of θ, `model.lower`) adapts,
/// `W + s_low·(B_low·A_low) + s·(B·A)` (s = alpha / rank) under W's own
/// name, from inputs W (θ's name) and the factors (w's PEFT names,
/// `lower_lora.*`). A sampler runs it once per generation call, so that a
/// decoded token costs one product per projection instead of three (or
/// five). `None` when nothing is adapted.
pub fn lora_merge_program(model: &ModelSpec, lora: &LoraSpec, dtype: DType) -> Option<Graph> {
    let lower = model.lower.as_ref();
    let adapted =
        |p: Projection| lora.targets.contains(&p) || lower.is_some_and(|l| l.targets.contains(&p));
    if !Projection::ALL.into_iter().any(adapted) {
        return None;
    }
    let mut g = Graph::new();
    let shapes: std::collections::HashMap<String, Vec<usize>> = theta_shapes(model)
        .into_iter()
        .chain(lower_lora_shapes(model))
        .chain(lora_shapes(model, lora))
        .collect();
    let input = |g: &mut Graph, name: String| {
        let shape = shapes[&name].clone();
        g.input(name, dtype, shape)
    };
    for layer in 0..model.n_layers {
        for p in Projection::ALL {
            if !adapted(p) {
                continue;
            }
            let name = format!("{}.weight", module_path(layer, p));
            let mut merged = input(&mut g, name.clone());
            if let Some(l) = lower.filter(|l| l.targets.contains(&p)) {
                let a = input(&mut g, lower_lora_name(layer, p, 'A'));
                let b = input(&mut g, lower_lora_name(layer, p, 'B'));
                let ba = g.matmul(b, a);
                let ba = g.scale(ba, l.scale());
                merged = g.add(merged, ba);
            }
            if lora.targets.contains(&p) {
                let a = input(&mut g, lora_name(layer, p, 'A'));
                let b = input(&mut g, lora_name(layer, p, 'B'));
                let ba = g.matmul(b, a);
                let ba = g.scale(ba, lora.scale());
                merged = g.add(merged, ba);
            }
            g.set_output(name, merged);
        }
    }
    Pipeline::standard().run(&mut g);
    Some(g)
}

/// One decode step for `batch` rows sharing position `pos`.
///
/// Inputs: θ as [`theta_shapes`] names it, with the weights of the
/// projections `lora` adapts replaced by their merged values (outputs of
/// [`lora_merge_program`]; the step itself reads no LoRA factor);
/// `ids` i32 `[batch]`, the token at position `pos` of each row; `pos` i32
/// `[1]`, in `0..max_len`; and for each layer l the caches
/// `cache.{l}.k` and `cache.{l}.v` of [`cache_shape`] in `dtype`, holding
/// the rotated keys and the values of positions `0..pos` (later positions
/// are ignored, but must be finite).
///
/// Outputs, in this order: `logits` `[batch, vocab]` (the logits after
/// position `pos`), then `next.cache.{l}.k`, `next.cache.{l}.v` for each
/// layer: the caches with position `pos` written. The cache inputs are
/// donated ([`Graph::donate`]): after a run, the values passed for them
/// must be replaced by the outputs, not read.
pub fn decode_step_program(
    model: &ModelSpec,
    lora: &LoraSpec,
    dtype: DType,
    batch: usize,
    max_len: usize,
) -> Graph {
    assert!(
        batch > 0 && max_len > 0,
        "decode step of an empty batch or cache"
    );
    let mut g = Graph::new();
    // The adapters are merged into θ's weights beforehand.
    let lora = &LoraSpec {
        targets: vec![],
        ..lora.clone()
    };
    // The lower level's LoRA is merged into θ's weights too.
    let (theta, w) = parameter_inputs(&mut g, model, lora, dtype, false);
    let ids = g.input(DECODE_IDS, DType::I32, vec![batch]);
    let pos = g.input(DECODE_POS, DType::I32, vec![1]);
    let shape = cache_shape(model, batch, max_len);
    let caches: Vec<(NodeId, NodeId)> = (0..model.n_layers)
        .map(|l| {
            let k = g.input(cache_input(l, 'k'), dtype, shape.clone());
            let v = g.input(cache_input(l, 'v'), dtype, shape.clone());
            (k, v)
        })
        .collect();
    // The caller replaces its caches with the outputs: a device writes the
    // new position into the cache's buffer instead of copying the cache.
    for l in 0..model.n_layers {
        g.donate(cache_input(l, 'k'));
        g.donate(cache_input(l, 'v'));
    }
    let step = DecodeStep {
        dec: Decoder { model, lora, dtype },
        model,
        dtype,
        batch,
        max_len,
    };
    let (logits, next) = step.build(&mut g, &theta, &w, ids, pos, &caches);
    g.set_output(DECODE_LOGITS, logits);
    for (l, (k, v)) in next.into_iter().enumerate() {
        g.set_output(cache_output(l, 'k'), k);
        g.set_output(cache_output(l, 'v'), v);
    }
    Pipeline::standard().run(&mut g);
    g
}

/// Builder of the decode step, on `Decoder`'s per-token pieces (linear,
/// RMSNorm, RoPE, head split, GQA repeat).
struct DecodeStep<'a> {
    /// The full-sequence builder whose per-token pieces the step reuses.
    dec: Decoder<'a>,
    model: &'a ModelSpec,
    dtype: DType,
    batch: usize,
    max_len: usize,
}

impl DecodeStep<'_> {
    /// Logits `[batch, vocab]` and the updated (k, v) cache of every layer.
    fn build(
        &self,
        g: &mut Graph,
        theta: &Params,
        w: &Params,
        ids: NodeId,
        pos: NodeId,
        caches: &[(NodeId, NodeId)],
    ) -> (NodeId, Vec<(NodeId, NodeId)>) {
        let m = self.model;
        let b = self.batch;
        let embed = self.dec.p(g, theta, "model.embed_tokens.weight");
        let x = g.gather(embed, ids);
        let mut x = g.reshape(x, vec![b, 1, m.d_model]);
        let (cos, sin) = self.rope_at(g, pos);
        let mut next = Vec::with_capacity(caches.len());
        for (i, &(k_cache, v_cache)) in caches.iter().enumerate() {
            x = self.dec.layer(g, theta, w, i, x, (cos, sin), |g, q, k, v| {
                let k_all = g.update_slice(k_cache, k, pos, 2);
                let v_all = g.update_slice(v_cache, v, pos, 2);
                next.push((k_all, v_all));
                g.cached_attention(q, k_all, v_all, pos)
            });
        }
        let norm = self.dec.p(g, theta, "model.norm.weight");
        let h = self.dec.rms_norm(g, x, norm);
        let head = self.dec.get(g, theta, "lm_head.weight").unwrap_or(embed);
        let logits = matmul_t(g, h, head);
        let logits = g.reshape(logits, vec![b, m.vocab_size]);
        (logits, next)
    }

    /// Rows `pos` of the rotate-half RoPE cos and sin tables, `[1, head_dim]`
    /// each; the tables over `0..max_len` are literals computed as
    /// `Decoder`'s are.
    fn rope_at(&self, g: &mut Graph, pos: NodeId) -> (NodeId, NodeId) {
        let hd = self.model.head_dim();
        let t = self.max_len;
        let (cos, sin) = self.dec.rope_values(t);
        let cos = g.literal(&cos, self.dtype, vec![t, hd]);
        let sin = g.literal(&sin, self.dtype, vec![t, hd]);
        (g.gather(cos, pos), g.gather(sin, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::parse_pipeline;

    fn spec() -> crate::spec::PipelineSpec {
        let text = "[model]\nd_model = 16\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nd_ff = 32\nmax_seq = 16\n[lora]\nrank = 2\n";
        parse_pipeline(text).expect("valid pipeline")
    }

    #[test]
    fn decode_step_has_the_documented_inputs_and_outputs() {
        let s = spec();
        let (b, l) = (3, 10);
        let g = decode_step_program(&s.model, &s.lora, DType::F32, b, l);
        g.validate().expect("valid graph");
        let inputs = g.inputs_by_name();
        for (name, shape) in theta_shapes(&s.model) {
            let id = inputs[&name];
            assert_eq!(g.ty(id).shape, shape, "{name}");
            assert_eq!(g.ty(id).dtype, DType::F32, "{name}");
        }
        // The adapters come merged into the weights.
        for (name, _) in lora_shapes(&s.model, &s.lora) {
            assert!(!inputs.contains_key(&name), "{name}");
        }
        // The merge gives every adapted weight, under its own name and shape.
        let merge = lora_merge_program(&s.model, &s.lora, DType::F32).expect("targets");
        let merge_inputs = merge.inputs_by_name();
        let adapted: Vec<&str> = merge.outputs().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(adapted.len(), 2 * s.lora.targets.len());
        for (name, id) in merge.outputs() {
            assert_eq!(g.ty(inputs[name]), merge.ty(*id), "{name}");
            assert_eq!(merge.ty(merge_inputs[name]), merge.ty(*id), "{name}");
        }
        let none = crate::spec::LoraSpec {
            targets: vec![],
            ..s.lora.clone()
        };
        assert!(lora_merge_program(&s.model, &none, DType::F32).is_none());
        assert_eq!(g.ty(inputs[DECODE_IDS]).shape, vec![b]);
        assert_eq!(g.ty(inputs[DECODE_POS]).shape, vec![1]);
        let names: Vec<&str> = g.outputs().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "logits",
                "next.cache.0.k",
                "next.cache.0.v",
                "next.cache.1.k",
                "next.cache.1.v"
            ]
        );
        let cache = cache_shape(&s.model, b, l);
        assert_eq!(cache, vec![b, 1, l, 8]);
        for layer in 0..2 {
            for which in ['k', 'v'] {
                assert_eq!(g.ty(inputs[&cache_input(layer, which)]).shape, cache);
                let out = g.output(&cache_output(layer, which)).expect("cache output");
                assert_eq!(g.ty(out).shape, cache);
            }
        }
        let logits = g.output(DECODE_LOGITS).expect("logits");
        assert_eq!(g.ty(logits).shape, vec![b, s.model.vocab_size]);
    }

    #[test]
    fn full_logits_program_has_sequence_logits() {
        let s = spec();
        let g = full_logits_program(&s.model, &s.lora, DType::F64, 2, 5);
        let logits = g.output(DECODE_LOGITS).expect("logits");
        assert_eq!(g.ty(logits).shape, vec![2, 5, s.model.vocab_size]);
    }
}
