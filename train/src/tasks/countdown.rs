//! Countdown: reach a target from given numbers with + − × ÷, each number
//! used at most once, division only when exact.
//!
//! Prompt `numbers>target:` (numbers comma-separated). Instances are made
//! solvable by construction: the generator combines the numbers pairwise in
//! random order with random valid operations, and the last value is the
//! target. The SFT demonstration is that solver trace, one `a op b=c` step
//! per combination, comma-separated, then `#` and the expression:
//! `3,5,4>32:` is answered `5+3=8,8*4=32#(5+3)*4` (larger operand first).
//!
//! With `search_demos`, a demonstration first shows a dead end: the same
//! numbers combined another way to a value other than the target, its last
//! step marked `!`, then the solving trace: `5*4=20,20+3=23!,5+3=8,8*4=32#(5+3)*4`.
//!
//! The verifier parses the expression after `#` with a small
//! recursive-descent parser (numbers, `+ - * /`, parentheses, whitespace; no
//! unary minus), checks that it uses only the given numbers (as a multiset),
//! and evaluates it in exact integer arithmetic.

use super::tokenizer::{CharTokenizer, Tokenizer};
use super::{
    redraw_held_out, single_hash, Example, Problem, Rewards, Task, TaskError, Verdict, EVAL_SEED,
    MAX_DRAWS,
};
use coopc_ir::spec::TaskKind;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::RangeInclusive;

/// Instance sizes and bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct CountdownConfig {
    /// How many numbers an SFT demonstration gives (default 3..=4).
    pub sft_counts: RangeInclusive<usize>,
    /// How many numbers an RL prompt gives (default 3..=4).
    pub rl_counts: RangeInclusive<usize>,
    /// How many numbers a held-out problem gives (default 3..=4).
    pub eval_counts: RangeInclusive<usize>,
    /// Given numbers are drawn from 1..=max_number (default 10).
    pub max_number: u64,
    /// Bound on every intermediate value and the target (default 100).
    pub max_value: u64,
    /// Longest demonstration response, EOS included (default 48); longer
    /// instances are redrawn.
    pub max_response_tokens: usize,
    /// Held-out problems (default 128).
    pub eval_size: usize,
    /// Demonstrations show a dead-end attempt before the solution (default
    /// false).
    pub search_demos: bool,
}

impl CountdownConfig {
    /// The generator `spec` describes: every kind of instance gives
    /// `min_numbers..=max_numbers` numbers.
    pub fn from_spec(spec: &coopc_ir::spec::CountdownSpec) -> Self {
        let counts = spec.min_numbers..=spec.max_numbers;
        CountdownConfig {
            sft_counts: counts.clone(),
            rl_counts: counts.clone(),
            eval_counts: counts,
            max_number: spec.max_number,
            max_value: spec.max_value,
            search_demos: spec.search_demos,
            // 48 for up to 4 numbers, as the default.
            max_response_tokens: 12 * spec.max_numbers.max(4),
            ..CountdownConfig::default()
        }
    }
}

impl Default for CountdownConfig {
    fn default() -> Self {
        CountdownConfig {
            sft_counts: 3..=4,
            rl_counts: 3..=4,
            eval_counts: 3..=4,
            max_number: 10,
            max_value: 100,
            max_response_tokens: 48,
            eval_size: 128,
            search_demos: false,
        }
    }
}

/// The four operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    fn precedence(self) -> u8 {
        match self {
            Op::Add | Op::Sub => 1,
            Op::Mul | Op::Div => 2,
        }
    }
}

/// An arithmetic expression over the given numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Num(u64),
    Bin(Op, Box<Expr>, Box<Expr>),
}

impl Expr {
    /// The numbers it uses, left to right.
    pub fn leaves(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.collect_leaves(&mut out);
        out
    }

    fn collect_leaves(&self, out: &mut Vec<u64>) {
        match self {
            Expr::Num(n) => out.push(*n),
            Expr::Bin(_, l, r) => {
                l.collect_leaves(out);
                r.collect_leaves(out);
            }
        }
    }

    /// Exact integer value; every division must be exact.
    pub fn eval(&self) -> Result<i128, EvalError> {
        match self {
            Expr::Num(n) => Ok(*n as i128),
            Expr::Bin(op, l, r) => {
                let (a, b) = (l.eval()?, r.eval()?);
                match op {
                    Op::Add => a.checked_add(b).ok_or(EvalError::Overflow),
                    Op::Sub => a.checked_sub(b).ok_or(EvalError::Overflow),
                    Op::Mul => a.checked_mul(b).ok_or(EvalError::Overflow),
                    Op::Div => {
                        if b == 0 {
                            Err(EvalError::DivisionByZero)
                        } else if a.checked_rem(b).ok_or(EvalError::Overflow)? != 0 {
                            Err(EvalError::Inexact)
                        } else {
                            a.checked_div(b).ok_or(EvalError::Overflow)
                        }
                    }
                }
            }
        }
    }

    /// With only the parentheses the left-to-right, × ÷ before + − reading
    /// needs (its value under [`Expr::eval`] is unchanged).
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) {
        match self {
            Expr::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Expr::Bin(op, l, r) => {
                Self::render_child(l, *op, false, out);
                out.push(op.symbol());
                Self::render_child(r, *op, true, out);
            }
        }
    }

    fn render_child(child: &Expr, parent: Op, right: bool, out: &mut String) {
        let parens = match child {
            Expr::Num(_) => false,
            Expr::Bin(op, ..) => {
                op.precedence() < parent.precedence()
                    || (right
                        && op.precedence() == parent.precedence()
                        && matches!(parent, Op::Sub | Op::Div))
            }
        };
        if parens {
            out.push('(');
        }
        child.render_into(out);
        if parens {
            out.push(')');
        }
    }
}

/// Why an expression has no exact integer value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalError {
    DivisionByZero,
    /// A division with a remainder.
    Inexact,
    Overflow,
}

/// A generated instance with its solver trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub numbers: Vec<u64>,
    pub target: u64,
    /// `a op b=c` per combination, in order.
    pub steps: Vec<String>,
    pub solution: Expr,
}

impl Instance {
    pub fn prompt(&self) -> String {
        format_prompt(&self.numbers, self.target)
    }

    /// The trace, `#`, and the solving expression.
    pub fn response(&self) -> String {
        format!("{}#{}", self.steps.join(","), self.solution.render())
    }

    pub fn problem(&self) -> Problem {
        Problem {
            prompt: self.prompt(),
            answer: self.solution.render(),
        }
    }

    /// Given numbers (sorted) and target: equal keys are the same puzzle.
    fn key(&self) -> (Vec<u64>, u64) {
        let mut n = self.numbers.clone();
        n.sort_unstable();
        (n, self.target)
    }
}

fn format_prompt(numbers: &[u64], target: u64) -> String {
    let list: Vec<String> = numbers.iter().map(u64::to_string).collect();
    format!("{}>{target}:", list.join(","))
}

/// The numbers and target of a prompt this task made (`numbers>target:`).
pub fn parse_prompt(prompt: &str) -> Option<(Vec<u64>, u64)> {
    let (list, target) = prompt.strip_suffix(':')?.split_once('>')?;
    let numbers = list
        .split(',')
        .map(|n| n.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some((numbers, target.parse().ok()?))
}

/// The countdown task.
pub struct Countdown {
    config: CountdownConfig,
    seq_len: usize,
    tokenizer: CharTokenizer,
    rewards: Rewards,
    eval: Vec<Instance>,
    eval_keys: HashSet<(Vec<u64>, u64)>,
    /// What `generate` returns if it ever runs out of redraws.
    fallback: Instance,
}

impl Countdown {
    /// Fails on an invalid configuration, or one whose instances (too often)
    /// do not fit `seq_len` or `max_response_tokens`.
    pub fn new(
        config: CountdownConfig,
        rewards: Rewards,
        seq_len: usize,
    ) -> Result<Self, TaskError> {
        for (name, r) in [
            ("sft_counts", &config.sft_counts),
            ("rl_counts", &config.rl_counts),
            ("eval_counts", &config.eval_counts),
        ] {
            if r.is_empty() || *r.start() < 2 || *r.end() > 8 {
                return Err(TaskError::Config(format!(
                    "countdown: {name} {r:?} must be a non-empty range within 2..=8"
                )));
            }
        }
        if config.max_number < 1
            || config.max_number > 1_000_000
            || config.max_value < config.max_number
            || config.max_value > 1_000_000_000
        {
            return Err(TaskError::Config(format!(
                "countdown: need 1 <= max_number ({}) <= 1000000 and \
                 max_number <= max_value ({}) <= 1000000000",
                config.max_number, config.max_value
            )));
        }
        let tokenizer = CharTokenizer::for_task(TaskKind::Countdown)?;
        let mut task = Countdown {
            config,
            seq_len,
            tokenizer,
            rewards,
            eval: Vec::new(),
            eval_keys: HashSet::new(),
            fallback: Instance {
                numbers: Vec::new(),
                target: 0,
                steps: Vec::new(),
                solution: Expr::Num(0),
            },
        };
        let mut rng = StdRng::seed_from_u64(EVAL_SEED);
        let counts = task.config.eval_counts.clone();
        let (mut fails, mut draws) = (0, 0);
        while task.eval.len() < task.config.eval_size.max(1) {
            draws += 1;
            match task.try_generate(&mut rng, &counts) {
                Some(inst) => {
                    fails = 0;
                    if task.eval_keys.insert(inst.key()) {
                        task.eval.push(inst);
                    }
                }
                None => {
                    fails += 1;
                    if fails > MAX_DRAWS {
                        return Err(TaskError::Config(format!(
                            "countdown: no instance fits train.seq_len ({seq_len}) and \
                             max_response_tokens ({}) in {MAX_DRAWS} draws; raise train.seq_len \
                             or lower max_number, max_value or the number counts",
                            task.config.max_response_tokens
                        )));
                    }
                }
            }
            if draws > 10 * MAX_DRAWS {
                return Err(TaskError::Config(format!(
                    "countdown: could not make {} distinct held-out problems",
                    task.config.eval_size
                )));
            }
        }
        // With eval_size = 0 one instance was still made, as the fallback.
        task.fallback = task.eval[0].clone();
        task.eval.truncate(task.config.eval_size);
        task.eval_keys = task.eval.iter().map(Instance::key).collect();
        Ok(task)
    }

    pub fn config(&self) -> &CountdownConfig {
        &self.config
    }

    /// The held-out instances, with their traces.
    pub fn eval_instances(&self) -> &[Instance] {
        &self.eval
    }

    /// A random instance with `counts` numbers that fits, redrawing until one
    /// does. Falls back to a fixed instance after very many redraws (not
    /// reached in practice for a configuration `new` accepted).
    pub fn generate(&self, rng: &mut dyn RngCore, counts: &RangeInclusive<usize>) -> Instance {
        if counts.is_empty() {
            return self.fallback.clone();
        }
        for _ in 0..MAX_DRAWS {
            if let Some(inst) = self.try_generate(rng, counts) {
                return inst;
            }
        }
        self.fallback.clone()
    }

    /// One attempt: `None` when a step has no valid operation or the
    /// sequence does not fit.
    fn try_generate(
        &self,
        rng: &mut dyn RngCore,
        counts: &RangeInclusive<usize>,
    ) -> Option<Instance> {
        let c = &self.config;
        let n = rng.gen_range(counts.clone());
        let numbers: Vec<u64> = (0..n).map(|_| rng.gen_range(1..=c.max_number)).collect();
        let (steps, target, solution) = self.combine(rng, &numbers)?;
        if numbers.contains(&target) {
            return None;
        }
        let inst = Instance {
            numbers,
            target,
            steps,
            solution,
        };
        let response = inst.response().len() + 1;
        let total = 1 + inst.prompt().len() + response;
        (response <= c.max_response_tokens && total <= self.seq_len).then_some(inst)
    }

    /// `numbers` combined pairwise in random order with random valid
    /// operations: the steps, the last value and its expression (`None`
    /// when some step has no valid operation).
    fn combine(&self, rng: &mut dyn RngCore, numbers: &[u64]) -> Option<(Vec<String>, u64, Expr)> {
        let c = &self.config;
        let n = numbers.len();
        let mut pool: Vec<(u64, Expr)> = numbers.iter().map(|&v| (v, Expr::Num(v))).collect();
        let mut steps = Vec::with_capacity(n.saturating_sub(1));
        while pool.len() > 1 {
            let i = rng.gen_range(0..pool.len());
            let (x, ex) = pool.swap_remove(i);
            let j = rng.gen_range(0..pool.len());
            let (y, ey) = pool.swap_remove(j);
            // Larger operand first: subtraction stays positive, division is
            // of the larger by the smaller.
            let ((a, ea), (b, eb)) = if x >= y {
                ((x, ex), (y, ey))
            } else {
                ((y, ey), (x, ex))
            };
            let mut ops = vec![];
            if a.saturating_add(b) <= c.max_value {
                ops.push((Op::Add, a + b));
            }
            if a > b {
                ops.push((Op::Sub, a - b));
            }
            if a > 1 && b > 1 && a.saturating_mul(b) <= c.max_value {
                ops.push((Op::Mul, a * b));
            }
            if b > 1 && a % b == 0 {
                ops.push((Op::Div, a / b));
            }
            if ops.is_empty() {
                return None;
            }
            let (op, v) = ops[rng.gen_range(0..ops.len())];
            steps.push(format!("{a}{}{b}={v}", op.symbol()));
            pool.push((v, Expr::Bin(op, Box::new(ea), Box::new(eb))));
        }
        let (value, expr) = pool.pop()?;
        Some((steps, value, expr))
    }

    /// The demonstration of `inst`: its trace, or with `search_demos` a
    /// dead end first (another combination of the same numbers that misses
    /// the target, last step marked `!`) when one is found in a few tries
    /// and the longer demonstration fits `seq_len`.
    pub fn demonstration(&self, rng: &mut dyn RngCore, inst: &Instance) -> String {
        let plain = inst.response();
        if !self.config.search_demos {
            return plain;
        }
        for _ in 0..8 {
            let Some((steps, value, _)) = self.combine(rng, &inst.numbers) else {
                continue;
            };
            if value == inst.target {
                continue;
            }
            let demo = format!("{}!,{plain}", steps.join(","));
            // BOS, prompt, demonstration, EOS.
            let len = inst.prompt().len() + demo.len() + 2;
            if len <= self.seq_len {
                return demo;
            }
        }
        plain
    }

    fn draw_problem(&self, rng: &mut dyn RngCore) -> Instance {
        self.draw_training(rng, &self.config.rl_counts)
    }

    /// A puzzle with `counts` numbers that is not held out (redrawn; after
    /// many redraws, the last draw).
    fn draw_training(&self, rng: &mut dyn RngCore, counts: &RangeInclusive<usize>) -> Instance {
        redraw_held_out(|| self.generate(rng, counts), |inst| self.is_held_out(inst))
    }

    /// Whether `inst` is a held-out puzzle (the same numbers, in any order,
    /// and target).
    pub fn is_held_out(&self, inst: &Instance) -> bool {
        self.eval_keys.contains(&inst.key())
    }
}

impl Task for Countdown {
    fn name(&self) -> &str {
        "countdown"
    }

    fn tokenizer(&self) -> &dyn Tokenizer {
        &self.tokenizer
    }

    fn rewards(&self) -> Rewards {
        self.rewards
    }

    /// Redraws puzzles of the held-out set.
    fn sft_example(&self, rng: &mut dyn RngCore) -> Example {
        let inst = self.draw_training(rng, &self.config.sft_counts);
        Example {
            prompt: inst.prompt(),
            response: self.demonstration(rng, &inst),
        }
    }

    /// Redraws puzzles of the held-out set.
    fn rl_problem(&self, rng: &mut dyn RngCore) -> Problem {
        self.draw_problem(rng).problem()
    }

    fn eval_set(&self) -> Vec<Problem> {
        self.eval.iter().map(Instance::problem).collect()
    }

    /// Malformed: not exactly one `#`, no expression after it, a syntax
    /// error, or a division by zero. Wrong: a number not given (or used more
    /// often than given), an inexact division, or a value other than the
    /// target. The numbers and target come from the problem's prompt (a
    /// prompt this task did not make is judged malformed).
    fn verify(&self, problem: &Problem, response: &str) -> Verdict {
        let Some((numbers, target)) = parse_prompt(&problem.prompt) else {
            return Verdict::Malformed;
        };
        let Some(at) = single_hash(response) else {
            return Verdict::Malformed;
        };
        let expr = match parse_expression(&response[at + 1..]) {
            Ok(Parsed::Expr(e)) => e,
            Ok(Parsed::OversizeNumber) => return Verdict::Wrong,
            Err(_) => return Verdict::Malformed,
        };
        let mut left = numbers;
        for leaf in expr.leaves() {
            match left.iter().position(|&n| n == leaf) {
                Some(i) => {
                    left.swap_remove(i);
                }
                None => return Verdict::Wrong,
            }
        }
        match expr.eval() {
            Ok(v) if v == target as i128 => Verdict::Correct,
            Ok(_) | Err(EvalError::Inexact) | Err(EvalError::Overflow) => Verdict::Wrong,
            Err(EvalError::DivisionByZero) => Verdict::Malformed,
        }
    }

    fn max_response_tokens(&self) -> Option<usize> {
        Some(self.config.max_response_tokens)
    }
}

/// A syntactically valid expression, or one whose literal does not fit u64
/// (so cannot be a given number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Expr(Expr),
    OversizeNumber,
}

/// Why an expression does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Byte offset into the text.
    pub at: usize,
    pub message: &'static str,
}

/// Deepest parenthesis nesting the parser accepts (bounds its recursion).
const MAX_DEPTH: usize = 64;

/// Parses `text` as a whole (surrounding whitespace allowed):
/// `expr := term (('+'|'-') term)*`, `term := factor (('*'|'/') factor)*`,
/// `factor := number | '(' expr ')'`; a number is ASCII digits without a
/// leading zero (unless it is `0`).
pub fn parse_expression(text: &str) -> Result<Parsed, SyntaxError> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
        depth: 0,
        oversize: false,
    };
    let e = p.expr()?;
    p.skip_spaces();
    if p.pos != p.s.len() {
        return Err(p.error("unexpected text after the expression"));
    }
    Ok(if p.oversize {
        Parsed::OversizeNumber
    } else {
        Parsed::Expr(e)
    })
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
    oversize: bool,
}

impl Parser<'_> {
    fn error(&self, message: &'static str) -> SyntaxError {
        SyntaxError {
            at: self.pos,
            message,
        }
    }

    fn skip_spaces(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_spaces();
        self.s.get(self.pos).copied()
    }

    fn expr(&mut self) -> Result<Expr, SyntaxError> {
        let mut lhs = self.term()?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let op = if c == b'+' { Op::Add } else { Op::Sub };
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.term()?));
        }
        Ok(lhs)
    }

    fn term(&mut self) -> Result<Expr, SyntaxError> {
        let mut lhs = self.factor()?;
        while let Some(c @ (b'*' | b'/')) = self.peek() {
            self.pos += 1;
            let op = if c == b'*' { Op::Mul } else { Op::Div };
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.factor()?));
        }
        Ok(lhs)
    }

    fn factor(&mut self) -> Result<Expr, SyntaxError> {
        match self.peek() {
            Some(b'(') => {
                if self.depth >= MAX_DEPTH {
                    return Err(self.error("parentheses nested too deeply"));
                }
                self.pos += 1;
                self.depth += 1;
                let e = self.expr()?;
                self.depth -= 1;
                if self.peek() != Some(b')') {
                    return Err(self.error("expected `)`"));
                }
                self.pos += 1;
                Ok(e)
            }
            Some(b'0'..=b'9') => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let digits = &self.s[start..self.pos];
                if digits.len() > 1 && digits[0] == b'0' {
                    return Err(SyntaxError {
                        at: start,
                        message: "a number with a leading zero",
                    });
                }
                // ASCII digits, so valid UTF-8.
                let text = std::str::from_utf8(digits).unwrap_or_default();
                match text.parse::<u64>() {
                    Ok(v) => Ok(Expr::Num(v)),
                    Err(_) => {
                        self.oversize = true;
                        Ok(Expr::Num(0))
                    }
                }
            }
            Some(_) => Err(self.error("expected a number or `(`")),
            None => Err(self.error("expected a number or `(`, found the end")),
        }
    }
}
