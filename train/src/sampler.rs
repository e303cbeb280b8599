//! Batched autoregressive generation (rollouts) from the compiled decode
//! step with a key/value cache: temperature, nucleus (top-p) or greedy
//! sampling, a stop token and a cap on new tokens, seeded so that the CPU
//! executor reproduces a generation exactly.
//!
//! Rows of a batch share the position: at step t every row feeds its prompt
//! token t while t is inside its prompt (prefill, one token per step; the
//! logits are not sampled from), then its own last sampled token; a finished
//! row feeds the pad token. Each row samples from its own random stream,
//! seeded by one draw from the caller's generator per prompt, in prompt
//! order; a sampled token costs one uniform draw from that stream (greedy
//! decoding draws nothing). So a row's tokens depend only on the seed, its
//! index among the prompts, the parameters and its prompt — not on the
//! compiled batch size or on the other rows.

use coopc_ir::plan::{Plan, Port, Program, Role, DECODE_IDS, DECODE_LOGITS, DECODE_POS};
use coopc_ir::TensorType;
use coopc_runtime::{Backend, CpuBackend, ExecError, HostTensor, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// How tokens are chosen and when a row ends.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this before the softmax (> 0; unused when greedy).
    pub temperature: f64,
    /// Nucleus mass in [0, 1]: sample among the smallest set of most probable
    /// tokens whose probability sums to at least this (at least one token;
    /// 1 samples from the whole distribution).
    pub top_p: f64,
    /// Keep only the `top_k` most probable tokens (ties by index) before
    /// the nucleus, renormalised (as Hugging Face's `top_k` then `top_p`);
    /// 0 keeps all. A device backend then draws on the host.
    pub top_k: usize,
    /// Most tokens generated per row (the stop token included).
    pub max_new_tokens: usize,
    /// A row ends after producing one of these tokens (kept in its
    /// response): EOS, and the end-of-turn tokens a model folder's
    /// generation config lists. Values outside the vocabulary never stop a
    /// row.
    pub stop_tokens: Vec<i32>,
    /// Fed for finished rows and rows that only fill the batch.
    pub pad_token: i32,
    /// Argmax (lowest index on ties) instead of sampling.
    pub greedy: bool,
}

/// One row's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The prompt followed by the response.
    pub tokens: Vec<i32>,
    pub prompt_len: usize,
    pub response_len: usize,
    /// Whether the response ends with the stop token.
    pub stopped: bool,
}

impl Generation {
    /// The generated tokens.
    pub fn response(&self) -> &[i32] {
        &self.tokens[self.prompt_len..]
    }
}

/// Why a generation could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SampleError {
    #[error("prompt {row} is empty (it must start with the BOS token)")]
    EmptyPrompt { row: usize },
    #[error(
        "prompt {row} has {prompt_len} tokens; with max_new_tokens = {max_new_tokens} \
         it needs {} positions, but the sampler holds {max_len}",
        prompt_len + max_new_tokens
    )]
    PromptTooLong {
        row: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        max_len: usize,
    },
    #[error(
        "prompt {row}: token {token} at position {position} is outside the vocabulary 0..{vocab}"
    )]
    TokenOutOfRange {
        row: usize,
        position: usize,
        token: i32,
        vocab: usize,
    },
    #[error("sampling configuration: {0}")]
    Config(String),
    #[error("row {row}: the logits after position {position} are not finite")]
    NonFiniteLogits { row: usize, position: usize },
    #[error("decode step: {0}")]
    Exec(#[from] ExecError),
}

/// Generates from a compiled decode step of a fixed batch size and cache length.
pub struct Sampler {
    program: Program,
    batch: usize,
    max_len: usize,
    vocab: usize,
    /// The decode step's cache inputs and their type.
    caches: Vec<String>,
    cache: TensorType,
    /// θ and w names the decode step and the merge read.
    param_names: Vec<String>,
    /// Merges the LoRA adapters into θ's weights once per call; its
    /// outputs replace those weights.
    merge: Option<Program>,
    /// Where each decode step runs.
    backend: Arc<dyn Backend>,
    /// Plan FLOPs of one decode step and of one merge.
    decode_flops: u64,
    merge_flops: u64,
    /// Plan FLOPs of every decode step and merge run so far.
    flops_done: AtomicU64,
}

impl Sampler {
    /// A sampler of the plan's decode step (the RL batch, sequences of up to
    /// `train.seq_len` tokens) and LoRA merge.
    pub fn from_plan(plan: &Plan) -> Result<Sampler, SampleError> {
        Sampler::new(plan.decode_step().clone(), plan.lora_merge().cloned())
    }

    /// A sampler of a compiled decode step and LoRA merge: the batch, the
    /// cache length and the vocabulary are read off the step's signature.
    pub fn new(program: Program, merge: Option<Program>) -> Result<Sampler, SampleError> {
        let sig = &program.signature;
        let bad = |what: &str| SampleError::Config(format!("the decode step has no {what}"));
        let batch = sig
            .input(DECODE_IDS)
            .ok_or_else(|| bad("token input"))?
            .ty
            .shape[0];
        let vocab = sig
            .output(DECODE_LOGITS)
            .ok_or_else(|| bad("logits"))?
            .ty
            .shape[1];
        let caches: Vec<&Port> = sig.inputs_where(|r| *r == Role::Cache).collect();
        let cache = caches.first().ok_or_else(|| bad("cache"))?.ty.clone();
        let max_len = cache.shape[2];
        let caches = caches.iter().map(|p| p.name.clone()).collect();
        let mut param_names: Vec<String> = [Some(&program), merge.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|p| p.signature.parameters().map(|p| p.name.clone()))
            .collect();
        param_names.sort();
        param_names.dedup();
        if batch == 0 || max_len == 0 {
            return Err(SampleError::Config(
                "the decode step has an empty batch or cache".into(),
            ));
        }
        let flops = |p: &Program| coopc_ir::cost::program_flops(&p.graph, &p.schedule);
        let decode_flops = flops(&program);
        let merge_flops = merge.as_ref().map_or(0, flops);
        Ok(Sampler {
            decode_flops,
            merge_flops,
            flops_done: AtomicU64::new(0),
            program,
            batch,
            max_len,
            vocab,
            caches,
            cache,
            param_names,
            merge,
            backend: Arc::new(CpuBackend),
        })
    }

    /// The same sampler running its decode steps on `backend`.
    pub fn with_backend(mut self, backend: Arc<dyn Backend>) -> Sampler {
        self.backend = backend;
        self
    }

    /// The compiled decode step.
    pub fn program(&self) -> &Program {
        &self.program
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Generates a response for every prompt (in chunks of the compiled
    /// batch size). `params` holds θ and w by HF/PEFT name, in the sampler's
    /// dtype (host tensors, or values already resident on the backend);
    /// other entries are ignored. Each prompt needs
    /// `len + max_new_tokens ≤ max_len`.
    ///
    /// On a device backend the parameters are copied to the device once per
    /// call (not at all when already resident) and the KV caches never leave
    /// it: per decoded token only the ids and the position go up and the
    /// logits come back.
    pub fn generate<V: Clone + Into<Value>>(
        &self,
        params: &HashMap<String, V>,
        prompts: &[Vec<i32>],
        cfg: &SamplingConfig,
        rng: &mut StdRng,
    ) -> Result<Vec<Generation>, SampleError> {
        let streams: Vec<StdRng> = prompts
            .iter()
            .map(|_| StdRng::seed_from_u64(rng.gen()))
            .collect();
        self.generate_with_streams(params, prompts, cfg, streams)
    }

    /// [`Sampler::generate`] with each prompt's own random stream: a
    /// prompt's response depends on its stream alone, so a data-parallel
    /// run that gives each process its share of the prompts, with the
    /// streams one process would have drawn for them, samples what one
    /// process would.
    pub fn generate_with_streams<V: Clone + Into<Value>>(
        &self,
        params: &HashMap<String, V>,
        prompts: &[Vec<i32>],
        cfg: &SamplingConfig,
        mut streams: Vec<StdRng>,
    ) -> Result<Vec<Generation>, SampleError> {
        assert_eq!(streams.len(), prompts.len(), "one random stream per prompt");
        self.check(prompts, cfg)?;
        // The parameters enter the step's input map once per call; the
        // caches then move from each step's outputs to the next's inputs.
        let mut inputs: HashMap<String, Value> = HashMap::new();
        for n in &self.param_names {
            if let Some(t) = params.get(n) {
                inputs.insert(n.clone(), self.backend.resident(t.clone().into())?);
            }
        }
        // The adapted weights, merged once for the whole call, take the
        // place of the unmerged ones.
        if let Some(merge) = &self.merge {
            self.flops_done
                .fetch_add(self.merge_flops, Ordering::Relaxed);
            for (name, v) in self.backend.run_values(merge, &inputs, &|_| false)? {
                if let Some(Role::Merged { of }) = merge.signature.output(&name).map(|p| &p.role) {
                    inputs.insert(of.clone(), v);
                }
            }
        }
        let mut out = Vec::with_capacity(prompts.len());
        for (chunk, rngs) in prompts
            .chunks(self.batch)
            .zip(streams.chunks_mut(self.batch))
        {
            out.extend(self.generate_chunk(&mut inputs, chunk, cfg, rngs)?);
        }
        Ok(out)
    }

    /// The plan's FLOP count ([`coopc_ir::cost`])
    /// of every decode step and merge this sampler has run.
    pub fn flops_done(&self) -> u64 {
        self.flops_done.load(Ordering::Relaxed)
    }

    fn check(&self, prompts: &[Vec<i32>], cfg: &SamplingConfig) -> Result<(), SampleError> {
        let temperature_ok = cfg.temperature > 0.0 && cfg.temperature.is_finite();
        if !cfg.greedy && !temperature_ok {
            return Err(SampleError::Config(format!(
                "temperature must be positive and finite, got {}",
                cfg.temperature
            )));
        }
        if !(0.0..=1.0).contains(&cfg.top_p) {
            return Err(SampleError::Config(format!(
                "top_p must be in [0, 1], got {}",
                cfg.top_p
            )));
        }
        if !self.in_vocab(cfg.pad_token) {
            return Err(SampleError::Config(format!(
                "pad token {} is outside the vocabulary 0..{}",
                cfg.pad_token, self.vocab
            )));
        }
        for (row, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(SampleError::EmptyPrompt { row });
            }
            if p.len() + cfg.max_new_tokens > self.max_len {
                return Err(SampleError::PromptTooLong {
                    row,
                    prompt_len: p.len(),
                    max_new_tokens: cfg.max_new_tokens,
                    max_len: self.max_len,
                });
            }
            if let Some((position, &token)) =
                p.iter().enumerate().find(|&(_, &t)| !self.in_vocab(t))
            {
                return Err(SampleError::TokenOutOfRange {
                    row,
                    position,
                    token,
                    vocab: self.vocab,
                });
            }
        }
        Ok(())
    }

    fn in_vocab(&self, token: i32) -> bool {
        usize::try_from(token).is_ok_and(|t| t < self.vocab)
    }

    /// Generates for at most `batch` prompts; missing rows are padding.
    fn generate_chunk(
        &self,
        inputs: &mut HashMap<String, Value>,
        prompts: &[Vec<i32>],
        cfg: &SamplingConfig,
        rngs: &mut [StdRng],
    ) -> Result<Vec<Generation>, SampleError> {
        for name in &self.caches {
            inputs.insert(name.clone(), self.backend.zeros(&self.cache)?);
        }
        let mut rows: Vec<Generation> = prompts
            .iter()
            .map(|p| Generation {
                tokens: p.clone(),
                prompt_len: p.len(),
                response_len: 0,
                stopped: false,
            })
            .collect();
        let mut done: Vec<bool> = (0..self.batch)
            .map(|r| r >= rows.len() || cfg.max_new_tokens == 0)
            .collect();
        let mut ids = vec![cfg.pad_token; self.batch];
        let mut pos = 0;
        while !done.iter().all(|&d| d) {
            for (r, id) in ids.iter_mut().enumerate() {
                *id = if done[r] {
                    cfg.pad_token
                } else {
                    rows[r].tokens[pos]
                };
            }
            inputs.insert(
                DECODE_IDS.into(),
                Value::host(HostTensor::i32(vec![self.batch], ids.clone())),
            );
            inputs.insert(
                DECODE_POS.into(),
                Value::host(HostTensor::i32(vec![1], vec![pos as i32])),
            );
            // A device backend draws the tokens where the logits are: they
            // never come back, only one token per row does.
            let on_device = self.backend.samples_tokens() && cfg.top_k == 0;
            let mut logits = None;
            let on_host = |name: &str| name == DECODE_LOGITS && !on_device;
            let outputs = self.backend.run_values(&self.program, inputs, &on_host)?;
            self.flops_done
                .fetch_add(self.decode_flops, Ordering::Relaxed);
            for (name, v) in outputs {
                match self.program.signature.output(&name).map(|p| &p.role) {
                    Some(Role::Next { of }) => {
                        inputs.insert(of.clone(), v);
                    }
                    Some(Role::Logits) => logits = Some(v),
                    _ => {}
                }
            }
            let logits = logits.expect("the decode step outputs logits");
            let sampling = |r: usize, row: &Generation| !done[r] && pos + 1 >= row.prompt_len;
            let tokens: Vec<Option<i32>> = if on_device {
                // One uniform per sampling row, from its own stream, as
                // `choose_token` would draw it.
                let mut draws = vec![0.0; self.batch];
                for (r, row) in rows.iter().enumerate() {
                    if sampling(r, row) && !cfg.greedy {
                        draws[r] = rngs[r].gen::<f64>();
                    }
                }
                self.backend.sample_tokens(
                    &logits,
                    &draws,
                    cfg.temperature,
                    cfg.top_p,
                    cfg.greedy,
                )?
            } else {
                let logits = self.backend.to_host(&logits)?.to_f64_vec();
                rows.iter()
                    .enumerate()
                    .map(|(r, row)| {
                        sampling(r, row).then(|| {
                            let row_logits = &logits[r * self.vocab..(r + 1) * self.vocab];
                            choose_token(row_logits, cfg, &mut rngs[r])
                        })?
                    })
                    .collect()
            };
            for (r, row) in rows.iter_mut().enumerate() {
                if done[r] || pos + 1 < row.prompt_len {
                    continue;
                }
                let token = tokens[r].ok_or(SampleError::NonFiniteLogits {
                    row: r,
                    position: pos,
                })?;
                row.tokens.push(token);
                row.response_len += 1;
                if cfg.stop_tokens.contains(&token) {
                    row.stopped = true;
                    done[r] = true;
                } else if row.response_len == cfg.max_new_tokens {
                    done[r] = true;
                }
            }
            pos += 1;
        }
        Ok(rows)
    }
}

/// Picks the next token from one row's logits as the sampler does: argmax
/// (lowest index on ties) when greedy; otherwise softmax(logits /
/// temperature) in f64, cut to the `top_k` most probable tokens and
/// renormalised (when `top_k` > 0), then to the top-p nucleus of those (most
/// probable first, ties by index; all of them in index order when top_p ≥
/// 1), and one uniform draw from `rng`. `None` when a logit is not finite.
pub fn choose_token(logits: &[f64], cfg: &SamplingConfig, rng: &mut StdRng) -> Option<i32> {
    if logits.is_empty() || logits.iter().any(|l| !l.is_finite()) {
        return None;
    }
    let argmax = || {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as i32
    };
    if cfg.greedy {
        return Some(argmax());
    }
    let z: Vec<f64> = logits.iter().map(|&l| l / cfg.temperature).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let mut p: Vec<f64> = e.iter().map(|&v| v / s).collect();
    let top_k = cfg.top_k > 0 && cfg.top_k < p.len();
    // Most probable first; stable: equal probabilities stay in index order.
    let ranked = |p: &[f64]| {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        order
    };
    let candidates: Vec<usize> = if top_k {
        let mut order = ranked(&p);
        order.truncate(cfg.top_k);
        let mass: f64 = order.iter().map(|&i| p[i]).sum();
        for &i in &order {
            p[i] /= mass;
        }
        order
    } else {
        (0..p.len()).collect()
    };
    let kept: Vec<usize> = if cfg.top_p >= 1.0 {
        let mut all = candidates;
        all.sort_unstable();
        all
    } else {
        let order = if top_k { candidates } else { ranked(&p) };
        let mut mass = 0.0;
        let mut n = 0;
        for &i in &order {
            mass += p[i];
            n += 1;
            if mass >= cfg.top_p {
                break;
            }
        }
        let mut order = order;
        order.truncate(n);
        order
    };
    let total: f64 = kept.iter().map(|&i| p[i]).sum();
    let u = rng.gen::<f64>() * total;
    let mut acc = 0.0;
    for &i in &kept {
        acc += p[i];
        if u < acc {
            return Some(i as i32);
        }
    }
    kept.last().map(|&i| i as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(top_p: f64, greedy: bool) -> SamplingConfig {
        SamplingConfig {
            top_k: 0,
            temperature: 1.0,
            top_p,
            max_new_tokens: 4,
            stop_tokens: vec![0],
            pad_token: 0,
            greedy,
        }
    }

    #[test]
    fn greedy_takes_the_lowest_index_among_tied_maxima() {
        let mut rng = StdRng::seed_from_u64(0);
        let l = [0.5, 2.0, -1.0, 2.0];
        assert_eq!(choose_token(&l, &cfg(1.0, true), &mut rng), Some(1));
    }

    #[test]
    fn a_tiny_nucleus_keeps_only_the_most_probable_token() {
        let mut rng = StdRng::seed_from_u64(0);
        let l = [0.5, 2.0, -1.0, 2.0, 1.9];
        for _ in 0..50 {
            assert_eq!(choose_token(&l, &cfg(1e-12, false), &mut rng), Some(1));
        }
    }

    #[test]
    fn the_nucleus_excludes_the_tail() {
        // p ≈ [0.66, 0.24, 0.09, 0.01]: top_p = 0.8 keeps tokens 0 and 1.
        let l = [3.0, 2.0, 1.0, -1.0];
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[choose_token(&l, &cfg(0.8, false), &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn top_k_keeps_the_k_most_probable_renormalised_before_the_nucleus() {
        // p ≈ [0.66, 0.24, 0.09, 0.01]; top_k = 2 leaves [0.731, 0.269].
        let l = [3.0, 2.0, 1.0, -1.0];
        let mut rng = StdRng::seed_from_u64(5);
        let top_k = |k: usize, top_p: f64| SamplingConfig {
            top_k: k,
            ..cfg(top_p, false)
        };
        let n = 20000;
        let mut seen = [0usize; 4];
        for _ in 0..n {
            seen[choose_token(&l, &top_k(2, 1.0), &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let want = 1.0 / (1.0 + (-1.0f64).exp());
        let f = seen[0] as f64 / n as f64;
        assert!((f - want).abs() < 0.02, "{f} vs {want}");
        // The nucleus of the renormalised pair: 0.731 ≥ 0.7 keeps token 0
        // alone (0.66 of the full softmax would not).
        for _ in 0..200 {
            assert_eq!(choose_token(&l, &top_k(2, 0.7), &mut rng), Some(0));
        }
        assert!((0..200).any(|_| choose_token(&l, &cfg(0.7, false), &mut rng) == Some(1)));
        // k at or above the vocabulary keeps everything.
        let mut a = StdRng::seed_from_u64(8);
        let mut b = StdRng::seed_from_u64(8);
        for _ in 0..100 {
            assert_eq!(
                choose_token(&l, &top_k(4, 0.9), &mut a),
                choose_token(&l, &cfg(0.9, false), &mut b)
            );
        }
    }

    #[test]
    fn full_distribution_sampling_matches_the_softmax() {
        let l = [1.0, 0.0, 2.0];
        let e: Vec<f64> = l.iter().map(|v: &f64| v.exp()).collect();
        let s: f64 = e.iter().sum();
        let mut rng = StdRng::seed_from_u64(9);
        let n = 20000;
        let mut seen = [0usize; 3];
        for _ in 0..n {
            seen[choose_token(&l, &cfg(1.0, false), &mut rng).unwrap() as usize] += 1;
        }
        for i in 0..3 {
            let f = seen[i] as f64 / n as f64;
            assert!(
                (f - e[i] / s).abs() < 0.02,
                "token {i}: {f} vs {}",
                e[i] / s
            );
        }
    }

    #[test]
    fn non_finite_logits_are_refused() {
        let mut rng = StdRng::seed_from_u64(0);
        let l = [0.0, f64::NAN];
        assert_eq!(choose_token(&l, &cfg(1.0, false), &mut rng), None);
        assert_eq!(choose_token(&l, &cfg(1.0, true), &mut rng), None);
    }
}
