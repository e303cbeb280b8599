//! The KV-cache decode step and the sampler built on it: decode-step logits
//! against the full forward at every position, generation against a naive
//! generator that recomputes the full forward for every token, seeding,
//! nucleus, stop token, length cap and prompt validation.

mod common;

use coopc_compiler::decode::{
    cache_input, cache_output, cache_shape, decode_step_program, full_logits_program,
    lora_merge_program, DECODE_IDS, DECODE_LOGITS, DECODE_POS,
};
use coopc_compiler::frontend::parse_pipeline;
use coopc_compiler::ir::{DType, Graph, TensorType};
use coopc_compiler::model::{lora_shapes, theta_shapes};
use coopc_compiler::spec::{PipelineSpec, Projection};
use coopc_runtime::{execute, HostTensor};
use coopc_train::sampler::{choose_token, Generation, SampleError, Sampler, SamplingConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Instant;

type Params = HashMap<String, HostTensor>;

const TINY: &str = r#"
[model]
d_model = 16
n_layers = 2
n_heads = 2
n_kv_heads = 1
d_ff = 32
max_seq = 16

[lora]
rank = 2

[backend]
kind = "cpu"
dtype = "f64"
"#;

fn tiny_spec() -> PipelineSpec {
    parse_pipeline(TINY).expect("valid pipeline")
}

/// Qwen2-like variant: q/k/v biases, untied head, 4 query heads over 2 kv
/// heads, LoRA on some projections only.
fn biased_spec() -> PipelineSpec {
    let mut s = tiny_spec();
    s.model.qkv_bias = true;
    s.model.tie_embeddings = false;
    s.model.n_heads = 4;
    s.model.n_kv_heads = 2;
    s.lora.targets = vec![Projection::QProj, Projection::VProj, Projection::DownProj];
    s
}

/// θ and w with every tensor random (LoRA B included), in f64.
fn random_params(spec: &PipelineSpec, seed: u64) -> Params {
    let mut rng = StdRng::seed_from_u64(seed);
    theta_shapes(&spec.model)
        .into_iter()
        .chain(lora_shapes(&spec.model, &spec.lora))
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let (lo, hi) = if name.contains("norm") {
                (0.5, 1.5)
            } else {
                (-0.6, 0.6)
            };
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
            (name, HostTensor::f64(shape, v))
        })
        .collect()
}

fn random_tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<i32> {
    (0..n).map(|_| rng.gen_range(0..vocab as i32)).collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>();
    (d / n.max(1e-300)).sqrt()
}

/// The full-forward logits [rows, len, vocab] of equal-length sequences.
fn full_logits(spec: &PipelineSpec, params: &Params, seqs: &[Vec<i32>]) -> Vec<f64> {
    let (b, t) = (seqs.len(), seqs[0].len());
    let g = full_logits_program(&spec.model, &spec.lora, DType::F64, b, t);
    let mut inputs = params.clone();
    inputs.insert(
        DECODE_IDS.into(),
        HostTensor::i32(vec![b, t], seqs.concat()),
    );
    let out = execute(&g, &inputs).expect("full forward runs");
    out.into_iter()
        .find(|(n, _)| n == DECODE_LOGITS)
        .expect("logits")
        .1
        .to_f64_vec()
}

fn check_decode_against_full_forward(spec: &PipelineSpec, seed: u64) {
    let params = random_params(spec, seed);
    let mut rng = StdRng::seed_from_u64(seed + 100);
    let (b, l) = (3, 10);
    let vocab = spec.model.vocab_size;
    let seqs: Vec<Vec<i32>> = (0..b).map(|_| random_tokens(&mut rng, l, vocab)).collect();
    let want = full_logits(spec, &params, &seqs);

    let step = decode_step_program(&spec.model, &spec.lora, DType::F64, b, l);
    let cache = TensorType::new(DType::F64, cache_shape(&spec.model, b, l));
    let mut inputs = params.clone();
    // The adapted projections' weights with the LoRA update merged in.
    let merge = lora_merge_program(&spec.model, &spec.lora, DType::F64).expect("LoRA targets");
    let merged = execute(&merge, &params).expect("merge runs");
    assert!(!merged.is_empty());
    for (name, t) in merged {
        assert!(params.contains_key(&name), "{name} replaces a θ weight");
        inputs.insert(name, t);
    }
    for layer in 0..spec.model.n_layers {
        for which in ['k', 'v'] {
            inputs.insert(cache_input(layer, which), HostTensor::zeros(&cache));
        }
    }
    for pos in 0..l {
        let ids: Vec<i32> = seqs.iter().map(|s| s[pos]).collect();
        inputs.insert(DECODE_IDS.into(), HostTensor::i32(vec![b], ids));
        inputs.insert(
            DECODE_POS.into(),
            HostTensor::i32(vec![1], vec![pos as i32]),
        );
        let out = execute(&step, &inputs).expect("decode step runs");
        let mut got = Vec::new();
        for (name, t) in out {
            if name == DECODE_LOGITS {
                got = t.to_f64_vec();
            } else {
                inputs.insert(name["next.".len()..].to_string(), t);
            }
        }
        for r in 0..b {
            let g = &got[r * vocab..(r + 1) * vocab];
            let w = &want[(r * l + pos) * vocab..(r * l + pos + 1) * vocab];
            let e = rel_err(g, w);
            assert!(
                e < 1e-10,
                "row {r} position {pos}: rel err {e:e}\n got  {g:?}\n want {w:?}"
            );
        }
    }
    assert!(inputs.contains_key(&cache_input(0, 'k')));
    assert!(step.output(&cache_output(0, 'k')).is_some());
}

#[test]
fn decode_step_logits_equal_the_full_forward_at_every_position() {
    check_decode_against_full_forward(&tiny_spec(), 1);
}

#[test]
fn decode_step_with_qkv_bias_untied_head_and_partial_lora_equals_the_full_forward() {
    check_decode_against_full_forward(&biased_spec(), 2);
}

/// A generator without a cache: for each row, recompute the full forward
/// of the whole sequence for every new token and pick with the same rule
/// and the same per-row random stream as the sampler.
fn naive_generate(
    spec: &PipelineSpec,
    params: &Params,
    prompts: &[Vec<i32>],
    cfg: &SamplingConfig,
    seed: u64,
) -> Vec<Generation> {
    let vocab = spec.model.vocab_size;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut streams: Vec<StdRng> = prompts
        .iter()
        .map(|_| StdRng::seed_from_u64(rng.gen()))
        .collect();
    let mut programs: HashMap<usize, Graph> = HashMap::new();
    let mut out = Vec::new();
    for (prompt, stream) in prompts.iter().zip(&mut streams) {
        let mut tokens = prompt.clone();
        let mut stopped = false;
        while tokens.len() - prompt.len() < cfg.max_new_tokens && !stopped {
            let t = tokens.len();
            let g = programs
                .entry(t)
                .or_insert_with(|| full_logits_program(&spec.model, &spec.lora, DType::F64, 1, t));
            let mut inputs = params.clone();
            inputs.insert(
                DECODE_IDS.into(),
                HostTensor::i32(vec![1, t], tokens.clone()),
            );
            let logits = execute(g, &inputs).expect("full forward").remove(0).1;
            let logits = logits.to_f64_vec();
            let last = &logits[(t - 1) * vocab..t * vocab];
            let token = choose_token(last, cfg, stream).expect("finite logits");
            tokens.push(token);
            stopped = cfg.stop_tokens.contains(&token);
        }
        out.push(Generation {
            response_len: tokens.len() - prompt.len(),
            prompt_len: prompt.len(),
            tokens,
            stopped,
        });
    }
    out
}

fn prompts(spec: &PipelineSpec, lens: &[usize], seed: u64) -> Vec<Vec<i32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    lens.iter()
        .map(|&n| {
            let mut p = vec![1];
            p.extend(random_tokens(&mut rng, n - 1, spec.model.vocab_size));
            p
        })
        .collect()
}

fn config(greedy: bool) -> SamplingConfig {
    SamplingConfig {
        top_k: 0,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 6,
        stop_tokens: vec![],
        pad_token: 0,
        greedy,
    }
}

fn generate(
    sampler: &Sampler,
    params: &Params,
    prompts: &[Vec<i32>],
    cfg: &SamplingConfig,
    seed: u64,
) -> Vec<Generation> {
    let mut rng = StdRng::seed_from_u64(seed);
    sampler
        .generate(params, prompts, cfg, &mut rng)
        .expect("generation runs")
}

#[test]
fn kv_cache_generation_equals_full_recomputation_token_for_token() {
    let spec = tiny_spec();
    let params = random_params(&spec, 3);
    // Five prompts of different lengths through a batch of two: three
    // chunks, the last with a padding row.
    let ps = prompts(&spec, &[1, 4, 2, 7, 3], 4);
    let sampler = common::sampler(&spec, 2, 16);
    let mut cases = vec![config(false), config(true)];
    let mut nucleus = config(false);
    nucleus.top_p = 0.7;
    nucleus.temperature = 1.3;
    cases.push(nucleus);
    // A stop token in the vocabulary, so some rows end early.
    let mut stopping = config(false);
    stopping.stop_tokens = vec![5];
    stopping.max_new_tokens = 8;
    cases.push(stopping);
    for cfg in cases {
        for seed in [11, 12] {
            let got = generate(&sampler, &params, &ps, &cfg, seed);
            let want = naive_generate(&spec, &params, &ps, &cfg, seed);
            assert_eq!(got, want, "config {cfg:?}, seed {seed}");
        }
    }
}

#[test]
fn generation_does_not_depend_on_the_compiled_batch_size() {
    let spec = biased_spec();
    let params = random_params(&spec, 5);
    let ps = prompts(&spec, &[3, 1, 5, 2], 6);
    let cfg = config(false);
    let one = generate(&common::sampler(&spec, 1, 12), &params, &ps, &cfg, 7);
    let four = generate(&common::sampler(&spec, 4, 12), &params, &ps, &cfg, 7);
    let wide = generate(&common::sampler(&spec, 6, 16), &params, &ps, &cfg, 7);
    assert_eq!(one, four);
    assert_eq!(one, wide);
}

#[test]
fn a_fixed_seed_generates_identically_and_another_seed_differently() {
    let spec = tiny_spec();
    let params = random_params(&spec, 8);
    let ps = prompts(&spec, &[2, 3, 1, 4], 9);
    let sampler = common::sampler(&spec, 4, 16);
    let cfg = config(false);
    let a = generate(&sampler, &params, &ps, &cfg, 21);
    let b = generate(&sampler, &params, &ps, &cfg, 21);
    let c = generate(&sampler, &params, &ps, &cfg, 22);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn a_tiny_top_p_equals_greedy() {
    let spec = tiny_spec();
    let params = random_params(&spec, 10);
    let ps = prompts(&spec, &[2, 5, 1], 11);
    let sampler = common::sampler(&spec, 3, 16);
    let greedy = generate(&sampler, &params, &ps, &config(true), 1);
    let mut tiny = config(false);
    tiny.top_p = 1e-9;
    tiny.temperature = 2.0;
    assert_eq!(generate(&sampler, &params, &ps, &tiny, 2), greedy);
    // And sampling at full nucleus is not greedy here.
    let full = generate(&sampler, &params, &ps, &config(false), 2);
    assert_ne!(full, greedy);
}

#[test]
fn the_stop_token_ends_a_row_and_is_kept() {
    let spec = tiny_spec();
    let params = random_params(&spec, 12);
    let ps = prompts(&spec, &[3, 2, 4], 13);
    let sampler = common::sampler(&spec, 3, 16);
    let free = generate(&sampler, &params, &ps, &config(true), 0);
    // Stop on the second token greedy decoding gives row 0.
    let stop = free[0].response()[1];
    let mut cfg = config(true);
    cfg.stop_tokens = vec![stop];
    let got = generate(&sampler, &params, &ps, &cfg, 0);
    let first_stop = free[0].response().iter().position(|&t| t == stop).unwrap();
    assert_eq!(got[0].response(), &free[0].response()[..=first_stop]);
    assert!(got[0].stopped);
    for (g, f) in got.iter().zip(&free) {
        match f.response().iter().position(|&t| t == stop) {
            Some(i) => {
                assert!(g.stopped);
                assert_eq!(g.response(), &f.response()[..=i]);
                assert_eq!(g.response_len, i + 1);
            }
            None => {
                assert!(!g.stopped);
                assert_eq!(g, f);
            }
        }
    }
}

#[test]
fn max_new_tokens_caps_every_response_and_keeps_the_prompt() {
    let spec = tiny_spec();
    let params = random_params(&spec, 14);
    let ps = prompts(&spec, &[1, 6, 3], 15);
    let sampler = common::sampler(&spec, 2, 16);
    for n in [0, 1, 5, 10] {
        let mut cfg = config(false);
        cfg.max_new_tokens = n;
        let got = generate(&sampler, &params, &ps, &cfg, 3);
        for (g, p) in got.iter().zip(&ps) {
            assert_eq!(g.prompt_len, p.len());
            assert_eq!(&g.tokens[..p.len()], &p[..]);
            assert_eq!(g.response_len, n);
            assert_eq!(g.tokens.len(), p.len() + n);
            assert!(!g.stopped);
            let vocab = spec.model.vocab_size as i32;
            assert!(g.response().iter().all(|&t| (0..vocab).contains(&t)));
        }
    }
}

#[test]
fn bad_prompts_and_configurations_are_errors_not_panics() {
    let spec = tiny_spec();
    let params = random_params(&spec, 16);
    let sampler = common::sampler(&spec, 2, 8);
    let mut rng = StdRng::seed_from_u64(0);
    let cfg = config(false);
    let too_long = vec![vec![1, 2], vec![1; 3]];
    let e = sampler.generate(&params, &too_long, &cfg, &mut rng);
    assert!(
        matches!(
            e,
            Err(SampleError::PromptTooLong {
                row: 1,
                prompt_len: 3,
                max_new_tokens: 6,
                max_len: 8
            })
        ),
        "{e:?}"
    );
    let e = sampler.generate(&params, &[vec![1], vec![]], &cfg, &mut rng);
    assert!(
        matches!(e, Err(SampleError::EmptyPrompt { row: 1 })),
        "{e:?}"
    );
    let e = sampler.generate(&params, &[vec![1, 999]], &cfg, &mut rng);
    assert!(
        matches!(
            e,
            Err(SampleError::TokenOutOfRange {
                row: 0,
                position: 1,
                token: 999,
                ..
            })
        ),
        "{e:?}"
    );
    let mut bad = cfg.clone();
    bad.temperature = 0.0;
    let e = sampler.generate(&params, &[vec![1]], &bad, &mut rng);
    assert!(matches!(e, Err(SampleError::Config(_))), "{e:?}");
    let mut bad = cfg.clone();
    bad.top_p = f64::NAN;
    let e = sampler.generate(&params, &[vec![1]], &bad, &mut rng);
    assert!(matches!(e, Err(SampleError::Config(_))), "{e:?}");
    let mut missing = params.clone();
    missing.remove("model.norm.weight");
    let e = sampler.generate(&missing, &[vec![1]], &cfg, &mut rng);
    assert!(matches!(e, Err(SampleError::Exec(_))), "{e:?}");
    // Nothing to generate is fine.
    assert_eq!(sampler.generate(&params, &[], &cfg, &mut rng), Ok(vec![]));
}

/// Prints the decode-step time of examples/addition.toml's model for a
/// batch of 16 (no assertion on the time).
#[test]
fn decode_step_time_for_the_addition_model_is_reported() {
    let spec = parse_pipeline(include_str!("../examples/addition.toml")).expect("example parses");
    let (batch, max_len) = (16, spec.model.max_seq);
    let sampler = common::sampler(&spec, batch, max_len);
    let mut params: Params = common::init_params(&spec, 0).into_iter().collect();
    let mut rng = StdRng::seed_from_u64(1);
    for (name, t) in params.iter_mut() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..t.numel()).map(|_| rng.gen_range(-0.02..0.02)).collect();
            *t = HostTensor::f32(t.shape.clone(), v);
        }
    }
    let ps = prompts(&spec, &[12; 16], 2);
    let mut cfg = config(false);
    cfg.max_new_tokens = max_len - 12;
    let start = Instant::now();
    let got = sampler
        .generate(&params, &ps, &cfg, &mut rng)
        .expect("generation runs");
    let elapsed = start.elapsed();
    let steps = 12 + 32 - 1;
    assert_eq!(got.len(), 16);
    println!(
        "addition model (d_model {}, {} layers, vocab {}), batch {batch}, cache {max_len}: \
         {steps} decode steps in {:.1} ms = {:.3} ms/step",
        spec.model.d_model,
        spec.model.n_layers,
        spec.model.vocab_size,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3 / steps as f64
    );
}
