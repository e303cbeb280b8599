//! Tasks: where SFT demonstrations, RL prompts and held-out problems come
//! from, and the verifiers that score a policy's responses. Built-in tasks
//! (`addition`, `countdown`) generate their data from a seeded RNG; `jsonl`
//! reads it from files. A task owns its tokenizer.
//!
//! Token layout shared by every task: a training row is
//! `BOS prompt response EOS`; the loss covers `response EOS`. A rollout's
//! prompt is `BOS prompt`, and the sampler stops at EOS.

pub mod addition;
pub mod chat;
pub mod countdown;
pub mod jsonl;
pub mod tokenizer;

pub use addition::{Addition, AdditionConfig};
pub use countdown::{Countdown, CountdownConfig};
pub use jsonl::{answers_match, extract_answer, JsonlTask};
pub use tokenizer::{CharTokenizer, Tokenizer};

use coopc_ir::spec::{TaskKind, TaskSpec};
use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;
use thiserror::Error;

/// Why a task could not be built or a text could not be tokenized.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TaskError {
    #[error("character {ch:?} (U+{:04X}) is not in the {vocabulary} vocabulary", *.ch as u32)]
    UnknownChar { ch: char, vocabulary: String },

    #[error("{path}: {message}")]
    Io { path: String, message: String },

    /// A malformed line of a JSON-lines file (`line` counts from 1).
    #[error("{path}:{line}: {message}")]
    Jsonl {
        path: String,
        line: usize,
        message: String,
    },

    #[error("{what} is {len} tokens, longer than train.seq_len ({seq_len}); {help}")]
    TooLong {
        what: String,
        len: usize,
        seq_len: usize,
        help: String,
    },

    #[error("the tokenizer has {tokenizer} tokens but model.vocab_size is {model}; set model.vocab_size to at least {tokenizer}")]
    VocabTooLarge { tokenizer: usize, model: usize },

    #[error("{0}")]
    Unsupported(String),

    #[error("{0}")]
    Config(String),
}

/// A supervised demonstration: the response the policy should produce.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Example {
    pub prompt: String,
    pub response: String,
}

/// A problem to answer: the prompt and a reference answer (the sum for
/// `addition`, one solving expression for `countdown`, the gold answer for
/// `jsonl`). Verifiers judge a response against the problem, not by string
/// equality with `answer` alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub prompt: String,
    pub answer: String,
}

/// A verifier's judgement of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A well-formed, correct answer.
    Correct,
    /// A well-formed answer that is wrong.
    Wrong,
    /// No answer could be read (none, several, or not in the task's format).
    Malformed,
}

/// Rewards of a verdict (`task.reward_correct` / `task.reward_wrong` /
/// `task.reward_malformed`, which defaults to `wrong`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rewards {
    pub correct: f64,
    pub wrong: f64,
    /// A response whose answer is not in the task's format
    /// (`task.reward_malformed`, default `wrong`).
    pub malformed: f64,
}

impl Rewards {
    pub fn from_spec(spec: &TaskSpec) -> Self {
        Rewards {
            correct: spec.reward_correct,
            wrong: spec.reward_wrong,
            malformed: spec.reward_malformed.unwrap_or(spec.reward_wrong),
        }
    }

    pub fn of(self, verdict: Verdict) -> f64 {
        match verdict {
            Verdict::Correct => self.correct,
            Verdict::Wrong => self.wrong,
            Verdict::Malformed => self.malformed,
        }
    }
}

impl Default for Rewards {
    /// ±1.
    fn default() -> Self {
        Rewards {
            correct: 1.0,
            wrong: -1.0,
            malformed: -1.0,
        }
    }
}

/// A tokenized training row `BOS prompt response EOS` (unpadded); the loss
/// covers `tokens[prompt_len .. prompt_len + response_len]` (the response
/// and EOS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedExample {
    pub tokens: Vec<i32>,
    /// BOS plus the prompt's tokens.
    pub prompt_len: usize,
    /// The response's tokens plus EOS.
    pub response_len: usize,
}

/// A source of data and a verifier. Everything drawn from `rng` is a
/// deterministic function of the RNG's state; `eval_set` is fixed.
pub trait Task: Send + Sync {
    /// `addition`, `countdown` or `jsonl`.
    fn name(&self) -> &str;
    fn tokenizer(&self) -> &dyn Tokenizer;
    fn rewards(&self) -> Rewards;
    /// One SFT demonstration.
    fn sft_example(&self, rng: &mut dyn RngCore) -> Example;
    /// One RL problem (never one of `eval_set`'s, where the task can avoid it).
    fn rl_problem(&self, rng: &mut dyn RngCore) -> Problem;
    /// The held-out problems, the same on every call and for every seed.
    fn eval_set(&self) -> Vec<Problem>;
    /// Judges `response` (decoded text, without special tokens). Never panics.
    fn verify(&self, problem: &Problem, response: &str) -> Verdict;
    /// Tokens (EOS included) a correct response to any RL or held-out
    /// problem needs at most, when the task knows it: a lower bound for
    /// `rl.max_new_tokens`.
    fn max_response_tokens(&self) -> Option<usize>;

    /// The reward of `response`.
    fn reward(&self, problem: &Problem, response: &str) -> f64 {
        self.rewards().of(self.verify(problem, response))
    }

    fn is_correct(&self, problem: &Problem, response: &str) -> bool {
        self.verify(problem, response) == Verdict::Correct
    }

    /// The answer `response` gives, for majority voting (`maj@k`); `None`
    /// when it gives none readable. By default the text after its only
    /// `#`, trimmed, for a well-formed response.
    fn answer_of(&self, problem: &Problem, response: &str) -> Option<String> {
        if self.verify(problem, response) == Verdict::Malformed {
            return None;
        }
        let at = single_hash(response)?;
        Some(response[at + 1..].trim().to_string())
    }

    /// Whether two answers of [`Task::answer_of`] are the same vote.
    fn same_answer(&self, a: &str, b: &str) -> bool {
        a == b
    }

    /// `BOS prompt`: what the sampler continues (no BOS for a tokenizer
    /// without one).
    fn encode_prompt(&self, problem: &Problem) -> Result<Vec<i32>, TaskError> {
        let tok = self.tokenizer();
        let mut ids: Vec<i32> = tok.bos_prefix().into_iter().collect();
        ids.extend(tok.encode(&problem.prompt)?);
        Ok(ids)
    }

    /// `BOS prompt response EOS` with the span the loss covers.
    fn encode_example(&self, example: &Example) -> Result<TokenizedExample, TaskError> {
        let tok = self.tokenizer();
        let mut tokens: Vec<i32> = tok.bos_prefix().into_iter().collect();
        tokens.extend(tok.encode(&example.prompt)?);
        let prompt_len = tokens.len();
        tokens.extend(tok.encode(&example.response)?);
        tokens.push(tok.eos());
        let response_len = tokens.len() - prompt_len;
        Ok(TokenizedExample {
            tokens,
            prompt_len,
            response_len,
        })
    }

    /// A tokenized SFT demonstration.
    fn sft_row(&self, rng: &mut dyn RngCore) -> Result<TokenizedExample, TaskError> {
        self.encode_example(&self.sft_example(rng))
    }

    /// The text of generated response tokens: everything before the first
    /// stop token (EOS), special tokens dropped.
    fn decode_response(&self, response: &[i32]) -> String {
        let tok = self.tokenizer();
        let stop = tok.stop_tokens();
        let end = response
            .iter()
            .position(|t| stop.contains(t))
            .unwrap_or(response.len());
        tok.decode(&response[..end])
    }
}

/// The task `spec` describes, with relative data paths read from the
/// current directory. See [`build_task_in`].
pub fn build_task(spec: &TaskSpec, seq_len: usize) -> Result<Box<dyn Task>, TaskError> {
    build_task_in(spec, seq_len, Path::new("."))
}

/// The task `spec` describes; relative `sft_file`/`rl_file`/`eval_file`
/// paths are read from `base_dir` (the pipeline file's directory). Fails when
/// a sequence of the task cannot fit `seq_len` tokens, or when
/// `task.tokenizer` names a Hugging Face tokenizer (not supported yet).
pub fn build_task_in(
    spec: &TaskSpec,
    seq_len: usize,
    base_dir: &Path,
) -> Result<Box<dyn Task>, TaskError> {
    if let (Some(path), false) = (&spec.tokenizer, spec.kind == TaskKind::Jsonl) {
        return Err(TaskError::Config(format!(
            "task.tokenizer = {path:?}: the built-in {} task has its own character vocabulary; \
             a tokenizer file applies to kind = \"jsonl\"",
            spec.kind.name()
        )));
    }
    let rewards = Rewards::from_spec(spec);
    let task: Box<dyn Task> = match spec.kind {
        TaskKind::Addition => {
            let config = AdditionConfig {
                sft_digits: 1..=spec.sft_max_digits,
                rl_digits: 1..=spec.rl_max_digits,
                eval_digits: spec.eval_digits,
                flaw: spec.sft_flaw,
                carry_free: spec.sft_carry_free,
                ..AdditionConfig::default()
            };
            Box::new(Addition::new(config, rewards, seq_len)?)
        }
        TaskKind::Countdown => Box::new(Countdown::new(
            CountdownConfig::from_spec(&spec.countdown),
            rewards,
            seq_len,
        )?),
        TaskKind::Jsonl => Box::new(JsonlTask::load(spec, seq_len, base_dir)?),
    };
    Ok(match spec.sft_pool {
        Some(n) => Box::new(Pooled::new(task, n)?),
        None => task,
    })
}

/// A fixed seed for SFT pools, so that `task.sft_pool` is the same set of
/// demonstrations for every `train.seed`: a dataset, not a draw.
pub(crate) const POOL_SEED: u64 = 0x9001_5EED;

/// A task whose SFT demonstrations come from a fixed pool of distinct ones
/// drawn once from the inner task (so held-out problems stay excluded);
/// everything else is the inner task's.
pub struct Pooled {
    inner: Box<dyn Task>,
    pool: Vec<Example>,
}

impl Pooled {
    /// Fails when the inner task cannot give `n` distinct demonstrations
    /// (by prompt) in [`MAX_DRAWS`] draws, or `n` is 0.
    pub fn new(inner: Box<dyn Task>, n: usize) -> Result<Self, TaskError> {
        if n == 0 {
            return Err(TaskError::Config(
                "task.sft_pool = 0: a pool needs at least one demonstration".into(),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(POOL_SEED);
        let mut seen = std::collections::HashSet::new();
        let mut pool = Vec::with_capacity(n.min(MAX_DRAWS));
        let mut draws = 0;
        while pool.len() < n {
            draws += 1;
            if draws > MAX_DRAWS {
                return Err(TaskError::Config(format!(
                    "task.sft_pool = {n}: only {} distinct demonstrations found in {MAX_DRAWS} \
                     draws; lower sft_pool or widen the task's demonstrations",
                    pool.len()
                )));
            }
            let ex = inner.sft_example(&mut rng);
            if seen.insert(ex.prompt.clone()) {
                pool.push(ex);
            }
        }
        Ok(Pooled { inner, pool })
    }

    /// The pool, in the order it was drawn.
    pub fn pool(&self) -> &[Example] {
        &self.pool
    }
}

impl Task for Pooled {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.inner.tokenizer()
    }
    fn rewards(&self) -> Rewards {
        self.inner.rewards()
    }
    /// A uniform draw from the pool.
    fn sft_example(&self, rng: &mut dyn RngCore) -> Example {
        self.pool[rng.gen_range(0..self.pool.len())].clone()
    }
    fn rl_problem(&self, rng: &mut dyn RngCore) -> Problem {
        self.inner.rl_problem(rng)
    }
    fn eval_set(&self) -> Vec<Problem> {
        self.inner.eval_set()
    }
    fn verify(&self, problem: &Problem, response: &str) -> Verdict {
        self.inner.verify(problem, response)
    }
    fn max_response_tokens(&self) -> Option<usize> {
        self.inner.max_response_tokens()
    }
    fn reward(&self, problem: &Problem, response: &str) -> f64 {
        self.inner.reward(problem, response)
    }
    fn is_correct(&self, problem: &Problem, response: &str) -> bool {
        self.inner.is_correct(problem, response)
    }
    fn answer_of(&self, problem: &Problem, response: &str) -> Option<String> {
        self.inner.answer_of(problem, response)
    }
    fn same_answer(&self, a: &str, b: &str) -> bool {
        self.inner.same_answer(a, b)
    }
    fn encode_prompt(&self, problem: &Problem) -> Result<Vec<i32>, TaskError> {
        self.inner.encode_prompt(problem)
    }
    fn encode_example(&self, example: &Example) -> Result<TokenizedExample, TaskError> {
        self.inner.encode_example(example)
    }
    fn decode_response(&self, response: &[i32]) -> String {
        self.inner.decode_response(response)
    }
}

/// Fails unless the task's tokenizer fits a model of `model_vocab_size`
/// embedding rows.
pub fn check_vocab(task: &dyn Task, model_vocab_size: usize) -> Result<(), TaskError> {
    let tokenizer = task.tokenizer().vocab_size();
    if tokenizer > model_vocab_size {
        return Err(TaskError::VocabTooLarge {
            tokenizer,
            model: model_vocab_size,
        });
    }
    Ok(())
}

/// A fixed seed for held-out sets, so that they do not depend on
/// `train.seed` and runs with different seeds are evaluated alike.
pub(crate) const EVAL_SEED: u64 = 0x5EED_E7A1;

/// How many times a generator may redraw before giving up (a configuration
/// whose instances never fit).
pub(crate) const MAX_DRAWS: usize = 100_000;

/// A result of `draw` that `held_out` does not reject: redrawn up to
/// [`MAX_DRAWS`] times, then the last draw (a range that is all held out).
pub(crate) fn redraw_held_out<T>(mut draw: impl FnMut() -> T, held_out: impl Fn(&T) -> bool) -> T {
    let mut x = draw();
    for _ in 0..MAX_DRAWS {
        if !held_out(&x) {
            break;
        }
        x = draw();
    }
    x
}

/// Position of the only `#` of `text`, or `None` when there are none or
/// several.
pub(crate) fn single_hash(text: &str) -> Option<usize> {
    let mut hits = text.match_indices('#');
    let (first, _) = hits.next()?;
    hits.next().is_none().then_some(first)
}
