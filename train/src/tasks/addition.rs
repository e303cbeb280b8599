//! Multi-digit addition with a carry-chain chain of thought.
//!
//! Prompt `a+b=`; the response works from the least significant digit up,
//! one comma-separated step of five digits per position (the digit of `a`,
//! the digit of `b`, the carry in, then their sum as two digits: carry out
//! and result digit; a shorter operand contributes 0), then `#` and the sum.
//! `1234+5678=` is answered `48012,37111,26109,15006#6912`.
//!
//! SFT demonstrations may use fewer digits than RL prompts, so that SFT
//! teaches the procedure and RL extends it. The held-out problems are drawn
//! like RL prompts (the in-distribution split, the default) or, with
//! `eval_digits`, have operands of exactly that many digits (a
//! length-generalisation split). Neither SFT demonstrations nor RL prompts
//! are ever a held-out pair (in either order).
//!
//! Two settings make the demonstrations partial on purpose: `carry_free`
//! draws only sums in which no column carries (a corpus that teaches the
//! format and digit sums but never a carry), and `flaw =
//! DropFinalCarry` writes every answer without the final carry, a
//! systematic error that SFT alone learns and the verifier's reward does not.

use super::tokenizer::{CharTokenizer, Tokenizer};
use super::{
    redraw_held_out, single_hash, Example, Problem, Rewards, Task, TaskError, Verdict, EVAL_SEED,
};
use coopc_ir::spec::{SftFlaw, TaskKind};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashSet;
use std::ops::RangeInclusive;

/// Operand sizes, in decimal digits (a 1-digit operand is 0..=9, a d-digit
/// one 10^(d−1)..10^d − 1). Each operand's size is drawn on its own.
#[derive(Clone, Debug, PartialEq)]
pub struct AdditionConfig {
    /// SFT demonstrations (default 1..=3).
    pub sft_digits: RangeInclusive<usize>,
    /// RL prompts (default 1..=4).
    pub rl_digits: RangeInclusive<usize>,
    /// Both operands of every held-out problem have this many digits; `None`
    /// (the default): held-out problems are drawn like RL prompts.
    pub eval_digits: Option<usize>,
    /// Held-out problems (default 128).
    pub eval_size: usize,
    /// A systematic flaw in every demonstration (default none).
    pub flaw: SftFlaw,
    /// Demonstrations only of sums in which no column carries (default
    /// false).
    pub carry_free: bool,
}

impl Default for AdditionConfig {
    fn default() -> Self {
        AdditionConfig {
            sft_digits: 1..=3,
            rl_digits: 1..=4,
            eval_digits: None,
            eval_size: 128,
            flaw: SftFlaw::None,
            carry_free: false,
        }
    }
}

/// Longest operand the task supports (sums stay below u64::MAX).
const MAX_DIGITS: usize = 18;

/// The addition task.
pub struct Addition {
    config: AdditionConfig,
    tokenizer: CharTokenizer,
    rewards: Rewards,
    eval: Vec<Problem>,
    /// Held-out operand pairs, smaller first, so RL never draws them.
    eval_pairs: HashSet<(u64, u64)>,
}

impl Addition {
    /// Fails on an empty or out-of-range digit range, or when the longest
    /// sequence (`BOS prompt response EOS` at the largest digit count) does
    /// not fit `seq_len`.
    pub fn new(
        config: AdditionConfig,
        rewards: Rewards,
        seq_len: usize,
    ) -> Result<Self, TaskError> {
        let eval_range = config.eval_digits.map(|d| d..=d);
        for (name, r) in [
            ("sft_digits", Some(&config.sft_digits)),
            ("rl_digits", Some(&config.rl_digits)),
            ("eval_digits", eval_range.as_ref()),
        ] {
            let Some(r) = r else { continue };
            if r.is_empty() || *r.start() == 0 || *r.end() > MAX_DIGITS {
                return Err(TaskError::Config(format!(
                    "addition: {name} {r:?} must be a non-empty range within 1..={MAX_DIGITS}"
                )));
            }
        }
        let held_out = eval_range.unwrap_or_else(|| config.rl_digits.clone());
        let count: u128 = held_out
            .clone()
            .map(|d| {
                if d == 1 {
                    10u128
                } else {
                    9 * 10u128.pow(d as u32 - 1)
                }
            })
            .sum();
        let pairs = count * (count + 1) / 2;
        if config.eval_size as u128 > pairs / 2 {
            return Err(TaskError::Config(format!(
                "addition: {} held-out problems with operands of {held_out:?} digit(s) leave too few for training",
                config.eval_size
            )));
        }
        let longest = Self::longest_sequence(&config);
        if longest > seq_len {
            let n = Self::max_digits(&config);
            return Err(TaskError::TooLong {
                what: format!(
                    "an addition of two {n}-digit numbers (BOS, prompt, carry chain, answer, EOS)"
                ),
                len: longest,
                seq_len,
                help: "raise train.seq_len (and model.max_seq) or use fewer digits".into(),
            });
        }
        let tokenizer = CharTokenizer::for_task(TaskKind::Addition)?;
        let mut task = Addition {
            config,
            tokenizer,
            rewards,
            eval: Vec::new(),
            eval_pairs: HashSet::new(),
        };
        task.build_eval_set();
        Ok(task)
    }

    pub fn config(&self) -> &AdditionConfig {
        &self.config
    }

    fn max_digits(config: &AdditionConfig) -> usize {
        (*config.sft_digits.end())
            .max(*config.rl_digits.end())
            .max(config.eval_digits.unwrap_or(0))
    }

    /// Tokens of `BOS prompt response EOS` for two n-digit operands:
    /// 1 + (2n + 2) + (6n − 1 + 1 + n + 1) + 1.
    pub fn sequence_len(n: usize) -> usize {
        9 * n + 5
    }

    /// The longest `BOS prompt response EOS` any draw of `config` makes.
    pub fn longest_sequence(config: &AdditionConfig) -> usize {
        Self::sequence_len(Self::max_digits(config))
    }

    fn build_eval_set(&mut self) {
        let mut rng = StdRng::seed_from_u64(EVAL_SEED);
        while self.eval.len() < self.config.eval_size {
            let (a, b) = match self.config.eval_digits {
                Some(d) => (number(&mut rng, d), number(&mut rng, d)),
                None => Self::draw(&mut rng, &self.config.rl_digits),
            };
            if self.eval_pairs.insert((a.min(b), a.max(b))) {
                self.eval.push(problem(a, b));
            }
        }
    }

    fn draw(rng: &mut dyn RngCore, digits: &RangeInclusive<usize>) -> (u64, u64) {
        let da = rng.gen_range(digits.clone());
        let db = rng.gen_range(digits.clone());
        (number(rng, da), number(rng, db))
    }

    /// Whether `a + b` (or `b + a`) is a held-out problem.
    pub fn is_held_out(&self, a: u64, b: u64) -> bool {
        self.eval_pairs.contains(&(a.min(b), a.max(b)))
    }

    /// A draw from `digits` that is not a held-out pair (redrawn; after
    /// many redraws, when the range is all held out, the last draw).
    fn draw_training(&self, rng: &mut dyn RngCore, digits: &RangeInclusive<usize>) -> (u64, u64) {
        redraw_held_out(|| Self::draw(rng, digits), |&(a, b)| self.is_held_out(a, b))
    }

    /// The demonstration response for `a + b` with `flaw`.
    pub fn solve_with(a: u64, b: u64, flaw: SftFlaw) -> String {
        let correct = Self::solve(a, b);
        match flaw {
            SftFlaw::None => correct,
            SftFlaw::DropFinalCarry => {
                let n = digits_lsd_first(a).len().max(digits_lsd_first(b).len());
                let wrong = (a + b) % 10u64.pow(n as u32);
                let at = correct.rfind('#').expect("a solution has a #");
                format!("{}#{wrong}", &correct[..at])
            }
        }
    }

    /// Whether some column of `a + b` carries.
    pub fn carries(a: u64, b: u64) -> bool {
        let (mut a, mut b, mut carry) = (a, b, 0);
        while a > 0 || b > 0 {
            carry = (a % 10 + b % 10 + carry) / 10;
            if carry > 0 {
                return true;
            }
            a /= 10;
            b /= 10;
        }
        false
    }

    /// The correct demonstration response for `a + b`.
    pub fn solve(a: u64, b: u64) -> String {
        let (da, db) = (digits_lsd_first(a), digits_lsd_first(b));
        let n = da.len().max(db.len());
        let mut carry = 0u8;
        let mut steps = Vec::with_capacity(n);
        for i in 0..n {
            let x = da.get(i).copied().unwrap_or(0);
            let y = db.get(i).copied().unwrap_or(0);
            let s = x + y + carry;
            steps.push(format!("{x}{y}{carry}{}{}", s / 10, s % 10));
            carry = s / 10;
        }
        format!("{}#{}", steps.join(","), a + b)
    }

    /// The operands of a prompt this task made (`a+b=`).
    pub fn parse_prompt(prompt: &str) -> Option<(u64, u64)> {
        let (a, b) = prompt.strip_suffix('=')?.split_once('+')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

fn problem(a: u64, b: u64) -> Problem {
    Problem {
        prompt: format!("{a}+{b}="),
        answer: (a + b).to_string(),
    }
}

/// A uniformly drawn number of exactly `d` digits (0..=9 for d = 1).
fn number(rng: &mut (impl RngCore + ?Sized), d: usize) -> u64 {
    if d == 1 {
        rng.gen_range(0..=9)
    } else {
        let lo = 10u64.pow(d as u32 - 1);
        rng.gen_range(lo..lo * 10)
    }
}

fn digits_lsd_first(mut x: u64) -> Vec<u8> {
    let mut out = vec![(x % 10) as u8];
    x /= 10;
    while x > 0 {
        out.push((x % 10) as u8);
        x /= 10;
    }
    out
}

impl Task for Addition {
    fn name(&self) -> &str {
        "addition"
    }

    fn tokenizer(&self) -> &dyn Tokenizer {
        &self.tokenizer
    }

    fn rewards(&self) -> Rewards {
        self.rewards
    }

    /// Redraws pairs of the held-out set and, with `carry_free`, sums
    /// that carry.
    fn sft_example(&self, rng: &mut dyn RngCore) -> Example {
        let carry_free = self.config.carry_free;
        let (a, b) = redraw_held_out(
            || Self::draw(rng, &self.config.sft_digits),
            |&(a, b)| self.is_held_out(a, b) || (carry_free && Self::carries(a, b)),
        );
        Example {
            prompt: format!("{a}+{b}="),
            response: Self::solve_with(a, b, self.config.flaw),
        }
    }

    /// Redraws pairs of the held-out set (and gives up after many redraws,
    /// when the RL range is all held out).
    fn rl_problem(&self, rng: &mut dyn RngCore) -> Problem {
        let (a, b) = self.draw_training(rng, &self.config.rl_digits);
        problem(a, b)
    }

    fn eval_set(&self) -> Vec<Problem> {
        self.eval.clone()
    }

    /// The response must hold exactly one `#`, followed by ASCII digits and
    /// nothing else (trailing whitespace aside); otherwise it is malformed.
    /// Those digits must equal the sum exactly, as text (so no leading zeros,
    /// and any length is compared without overflow). The steps before `#`
    /// are not graded.
    fn verify(&self, problem: &Problem, response: &str) -> Verdict {
        let Some(at) = single_hash(response) else {
            return Verdict::Malformed;
        };
        let answer = response[at + 1..].trim_end();
        if answer.is_empty() || !answer.bytes().all(|b| b.is_ascii_digit()) {
            return Verdict::Malformed;
        }
        if answer == problem.answer {
            Verdict::Correct
        } else {
            Verdict::Wrong
        }
    }

    /// 7n + 2 for the largest RL or held-out digit count n.
    fn max_response_tokens(&self) -> Option<usize> {
        let n = (*self.config.rl_digits.end()).max(self.config.eval_digits.unwrap_or(0));
        Some(7 * n + 2)
    }
}
