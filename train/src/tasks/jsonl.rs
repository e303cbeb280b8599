//! Tasks read from JSON-lines files, in one of three layouts
//! (`task.format`):
//!
//! - `prompt_response`: SFT demonstrations `{"prompt": .., "response": ..}`,
//!   RL and held-out problems `{"prompt": .., "answer": ..}` (an answer may
//!   also be a JSON number);
//! - `gsm8k`: `{"question": .., "answer": ..}`, the answer a worked
//!   solution ending in `#### N` (its `<<48/2=24>>` calculator annotations
//!   are dropped); a demonstration is question → solution, a problem
//!   question → N;
//! - `math`: `{"problem": .., "solution": ..}`, the gold answer the
//!   solution's last `\boxed{…}`.
//!
//! A demonstration or RL problem whose prompt is also a held-out problem's
//! (compared with whitespace runs collapsed) is left out of training, so the
//! held-out score never measures memorised answers;
//! [`JsonlTask::held_out_overlap`] counts them.
//!
//! Prompts go to the model as they are, or, with `task.chat_template`, as a
//! user message (after an optional system message) rendered by the
//! tokenizer folder's chat template with the generation prompt; a
//! demonstration is then `template(prompt) response EOS`, EOS being the
//! folder's end-of-turn token.
//!
//! The verifier reads a response's final answer from, in order, its last
//! `####`, its last `\boxed{…}` (braces balanced), or its last "the answer
//! is …"; a response with none of these is *malformed*, but its last
//! number still counts as its answer if it is correct. Answers compare as
//! numbers when both read as numbers (`1,000` = `1000.0`, `1/2` =
//! `\frac{1}{2}` = `0.5`, `$12` = `12 dollars` = `12.`), as text with
//! whitespace normalised otherwise.

use super::chat::{ChatTemplate, Message};
use super::tokenizer::{CharTokenizer, HfTokenizer, Tokenizer};
use super::{Example, Problem, Rewards, Task, TaskError, TokenizedExample, Verdict};
use coopc_ir::spec::{DataFormat, TaskSpec};
use rand::{Rng, RngCore};
use std::path::{Path, PathBuf};

/// A record of a JSON-lines file with the line it came from (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<T> {
    pub line: usize,
    pub value: T,
}

/// Characters the character tokenizer always has, so that a numeric answer
/// after `####` can be written whatever the data contains.
const ALWAYS: &str = "#### \n0123456789";

/// Prompts through a chat template.
struct Chat {
    template: ChatTemplate,
    system: Option<String>,
}

/// A task whose data comes from files.
pub struct JsonlTask {
    sft: Vec<Example>,
    rl: Vec<Problem>,
    eval: Vec<Problem>,
    tokenizer: Box<dyn Tokenizer>,
    chat: Option<Chat>,
    rewards: Rewards,
    /// SFT and RL records left out because their prompt is held out.
    overlap: (usize, usize),
}

impl JsonlTask {
    /// Reads `spec.sft_file`, `spec.rl_file` and (when given)
    /// `spec.eval_file` in `spec.format`, relative paths from `base_dir`.
    /// With `spec.tokenizer` (a Hugging Face `tokenizer.json`, relative to
    /// `base_dir`) that tokenizer is used — with the special tokens and
    /// chat template of its folder when the folder has a
    /// `tokenizer_config.json`; otherwise a character tokenizer covering
    /// every character of the data. Fails, naming the file and line, on
    /// malformed records, and on a demonstration that does not fit
    /// `seq_len` or a prompt that leaves no room for a response.
    pub fn load(spec: &TaskSpec, seq_len: usize, base_dir: &Path) -> Result<Self, TaskError> {
        let need = |key: &str, v: &Option<String>| {
            v.as_deref()
                .map(|p| resolve(base_dir, p))
                .ok_or_else(|| TaskError::Config(format!("task kind \"jsonl\" needs task.{key}")))
        };
        let sft_path = need("sft_file", &spec.sft_file)?;
        let rl_path = need("rl_file", &spec.rl_file)?;
        let eval_path = spec.eval_file.as_deref().map(|p| resolve(base_dir, p));

        let mut sft = read_demonstrations(&sft_path, spec.format)?;
        let mut rl = read_problems(&rl_path, spec.format)?;
        let eval = match &eval_path {
            Some(p) => read_problems(p, spec.format)?,
            None => Vec::new(),
        };
        for (path, empty) in [(&sft_path, sft.is_empty()), (&rl_path, rl.is_empty())] {
            if empty {
                return Err(TaskError::Io {
                    path: path.display().to_string(),
                    message: "no records".into(),
                });
            }
        }
        // Held-out prompts never train.
        let held: std::collections::HashSet<String> =
            eval.iter().map(|r| same_prompt(&r.value.prompt)).collect();
        let (sft_n, rl_n) = (sft.len(), rl.len());
        sft.retain(|r| !held.contains(&same_prompt(&r.value.prompt)));
        rl.retain(|r| !held.contains(&same_prompt(&r.value.prompt)));
        let overlap = (sft_n - sft.len(), rl_n - rl.len());
        for (path, empty) in [(&sft_path, sft.is_empty()), (&rl_path, rl.is_empty())] {
            if empty {
                return Err(TaskError::Io {
                    path: path.display().to_string(),
                    message: format!(
                        "every record's prompt is a held-out problem of {}: nothing is left to train on",
                        eval_path.as_ref().map_or(String::new(), |p| p.display().to_string())
                    ),
                });
            }
        }

        let mut chat = None;
        let tokenizer: Box<dyn Tokenizer> = match &spec.tokenizer {
            Some(t) => {
                let path = resolve(base_dir, t);
                let dir = path.parent().unwrap_or(Path::new("."));
                if dir.join("tokenizer_config.json").exists() {
                    let (tok, text) = HfTokenizer::from_folder(dir)?;
                    if spec.chat_template {
                        let source = text.chat_template.as_deref().ok_or_else(|| {
                            TaskError::Config(format!(
                                "task.chat_template = true, but {} has no chat template \
                                 (neither chat_template.jinja nor tokenizer_config.json's chat_template)",
                                dir.display()
                            ))
                        })?;
                        let origin = if dir.join("chat_template.jinja").exists() {
                            dir.join("chat_template.jinja")
                        } else {
                            dir.join("tokenizer_config.json")
                        };
                        chat = Some(Chat {
                            template: ChatTemplate::new(source, &text, &origin)?,
                            system: spec.system_prompt.clone(),
                        });
                    }
                    Box::new(tok)
                } else {
                    if spec.chat_template {
                        return Err(TaskError::Config(format!(
                            "task.chat_template = true, but {} has no tokenizer_config.json with a chat template",
                            dir.display()
                        )));
                    }
                    Box::new(HfTokenizer::from_file(&path)?)
                }
            }
            None => {
                if spec.chat_template {
                    return Err(TaskError::Config(
                        "task.chat_template = true needs a Hugging Face tokenizer folder \
                         (model.from or task.tokenizer)"
                            .into(),
                    ));
                }
                let texts = sft
                    .iter()
                    .flat_map(|r| [r.value.prompt.as_str(), r.value.response.as_str()])
                    .chain(
                        rl.iter()
                            .chain(&eval)
                            .flat_map(|r| [r.value.prompt.as_str(), r.value.answer.as_str()]),
                    )
                    .chain([ALWAYS]);
                Box::new(CharTokenizer::from_texts("jsonl", texts)?)
            }
        };
        let task = JsonlTask {
            sft: Vec::new(),
            rl: Vec::new(),
            eval: Vec::new(),
            tokenizer,
            chat,
            rewards: Rewards::from_spec(spec),
            overlap,
        };

        let sft_name = sft_path.display().to_string();
        for r in &sft {
            let len = task.encode_example(&r.value)?.tokens.len();
            if len > seq_len {
                return Err(TaskError::TooLong {
                    what: format!("{sft_name}:{}: prompt + response + EOS", r.line),
                    len,
                    seq_len,
                    help: "raise train.seq_len (and model.max_seq) or shorten the example".into(),
                });
            }
        }
        for (path, records) in [(Some(&rl_path), &rl), (eval_path.as_ref(), &eval)] {
            let Some(path) = path else { continue };
            for r in records {
                let len = task.encode_prompt(&r.value)?.len() + 1;
                if len > seq_len {
                    return Err(TaskError::TooLong {
                        what: format!("{}:{}: prompt + one response token", path.display(), r.line),
                        len,
                        seq_len,
                        help: "raise train.seq_len (and model.max_seq) or shorten the prompt"
                            .into(),
                    });
                }
            }
        }
        Ok(JsonlTask {
            sft: sft.into_iter().map(|r| r.value).collect(),
            rl: rl.into_iter().map(|r| r.value).collect(),
            eval: eval.into_iter().map(|r| r.value).collect(),
            ..task
        })
    }

    /// The prompt's ids: `BOS prompt`, or the chat template's rendering of
    /// it as a user message with the generation prompt.
    fn prompt_ids(&self, prompt: &str) -> Result<Vec<i32>, TaskError> {
        let tok = self.tokenizer.as_ref();
        match &self.chat {
            None => {
                let mut ids: Vec<i32> = tok.bos_prefix().into_iter().collect();
                ids.extend(tok.encode(prompt)?);
                Ok(ids)
            }
            Some(chat) => {
                let mut messages = Vec::new();
                if let Some(system) = &chat.system {
                    messages.push(Message {
                        role: "system".into(),
                        content: system.clone(),
                    });
                }
                messages.push(Message {
                    role: "user".into(),
                    content: prompt.to_string(),
                });
                tok.encode(&chat.template.render(&messages, true)?)
            }
        }
    }

    pub fn sft_examples(&self) -> &[Example] {
        &self.sft
    }

    pub fn rl_problems(&self) -> &[Problem] {
        &self.rl
    }

    /// How many SFT demonstrations and RL problems were left out because
    /// their prompt is a held-out problem's.
    pub fn held_out_overlap(&self) -> (usize, usize) {
        self.overlap
    }
}

/// A prompt with whitespace runs collapsed to one space and trimmed: two
/// prompts that differ only there are the same problem.
fn same_prompt(prompt: &str) -> String {
    prompt.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn resolve(base_dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() || base_dir.as_os_str().is_empty() || base_dir == Path::new(".") {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

impl Task for JsonlTask {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }

    fn rewards(&self) -> Rewards {
        self.rewards
    }

    fn sft_example(&self, rng: &mut dyn RngCore) -> Example {
        self.sft[rng.gen_range(0..self.sft.len())].clone()
    }

    fn rl_problem(&self, rng: &mut dyn RngCore) -> Problem {
        self.rl[rng.gen_range(0..self.rl.len())].clone()
    }

    /// The eval file's problems (none without one).
    fn eval_set(&self) -> Vec<Problem> {
        self.eval.clone()
    }

    /// Correct when the answer read from the response (see
    /// [`read_answer`]) matches; otherwise wrong when the response states an
    /// answer in a recognised format, malformed when it does not.
    fn verify(&self, problem: &Problem, response: &str) -> Verdict {
        match read_answer(response) {
            Some((a, _)) if answers_match(&a, &problem.answer) => Verdict::Correct,
            Some((_, true)) => Verdict::Wrong,
            _ => Verdict::Malformed,
        }
    }

    fn max_response_tokens(&self) -> Option<usize> {
        None
    }

    fn answer_of(&self, _problem: &Problem, response: &str) -> Option<String> {
        read_answer(response).map(|(a, _)| a)
    }

    fn same_answer(&self, a: &str, b: &str) -> bool {
        answers_match(a, b)
    }

    fn encode_prompt(&self, problem: &Problem) -> Result<Vec<i32>, TaskError> {
        self.prompt_ids(&problem.prompt)
    }

    fn encode_example(&self, example: &Example) -> Result<TokenizedExample, TaskError> {
        let tok = self.tokenizer.as_ref();
        let mut tokens = self.prompt_ids(&example.prompt)?;
        let prompt_len = tokens.len();
        tokens.extend(tok.encode(&example.response)?);
        tokens.push(tok.eos());
        Ok(TokenizedExample {
            response_len: tokens.len() - prompt_len,
            tokens,
            prompt_len,
        })
    }
}

/// Reads `{"prompt": .., "response": ..}` lines (blank lines skipped).
pub fn read_sft_file(path: &Path) -> Result<Vec<Record<Example>>, TaskError> {
    read_records(path, |obj, err| {
        Ok(Example {
            prompt: string_field(obj, "prompt", err)?,
            response: string_field(obj, "response", err)?,
        })
    })
}

/// Reads `{"prompt": .., "answer": ..}` lines (blank lines skipped); a
/// numeric answer is kept as its JSON text.
pub fn read_problem_file(path: &Path) -> Result<Vec<Record<Problem>>, TaskError> {
    read_records(path, |obj, err| {
        let answer = match obj.get("answer") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err(err("field \"answer\" must be a string or a number".into())),
            None => return Err(err("missing field \"answer\"".into())),
        };
        Ok(Problem {
            prompt: string_field(obj, "prompt", err)?,
            answer,
        })
    })
}

/// Demonstrations of a file in `format`.
pub fn read_demonstrations(
    path: &Path,
    format: DataFormat,
) -> Result<Vec<Record<Example>>, TaskError> {
    match format {
        DataFormat::PromptResponse => read_sft_file(path),
        DataFormat::Gsm8k => read_records(path, |obj, err| {
            let answer = string_field(obj, "answer", err)?;
            gsm8k_final(&answer).ok_or_else(|| err(NO_HASHES.into()))?;
            Ok(Example {
                prompt: string_field(obj, "question", err)?,
                response: strip_calculator(&answer),
            })
        }),
        DataFormat::Math => read_records(path, |obj, err| {
            let solution = string_field(obj, "solution", err)?;
            last_boxed(&solution).ok_or_else(|| err(NO_BOXED.into()))?;
            Ok(Example {
                prompt: string_field(obj, "problem", err)?,
                response: solution,
            })
        }),
    }
}

/// Problems (prompt and gold answer) of a file in `format`.
pub fn read_problems(path: &Path, format: DataFormat) -> Result<Vec<Record<Problem>>, TaskError> {
    match format {
        DataFormat::PromptResponse => read_problem_file(path),
        DataFormat::Gsm8k => read_records(path, |obj, err| {
            let answer = string_field(obj, "answer", err)?;
            Ok(Problem {
                prompt: string_field(obj, "question", err)?,
                answer: gsm8k_final(&answer).ok_or_else(|| err(NO_HASHES.into()))?,
            })
        }),
        DataFormat::Math => read_records(path, |obj, err| {
            let solution = string_field(obj, "solution", err)?;
            Ok(Problem {
                prompt: string_field(obj, "problem", err)?,
                answer: last_boxed(&solution).ok_or_else(|| err(NO_BOXED.into()))?,
            })
        }),
    }
}

const NO_HASHES: &str = "field \"answer\" has no final answer after `####` (format = \"gsm8k\")";
const NO_BOXED: &str =
    "field \"solution\" has no closed `\\boxed{…}` final answer (format = \"math\")";

/// The text after a GSM8K answer's last `####`, trimmed (`None` when
/// absent or empty).
fn gsm8k_final(answer: &str) -> Option<String> {
    let i = answer.rfind("####")?;
    let a = answer[i + 4..].trim();
    (!a.is_empty()).then(|| a.to_string())
}

/// GSM8K's calculator annotations `<<48/2=24>>` removed.
fn strip_calculator(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("<<") {
        match rest[i..].find(">>") {
            Some(j) => {
                out.push_str(&rest[..i]);
                rest = &rest[i + j + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

type Object = serde_json::Map<String, serde_json::Value>;

fn string_field(
    obj: &Object,
    key: &str,
    err: &dyn Fn(String) -> TaskError,
) -> Result<String, TaskError> {
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(err(format!("field \"{key}\" must be a string"))),
        None => Err(err(format!("missing field \"{key}\""))),
    }
}

fn read_records<T>(
    path: &Path,
    parse: impl Fn(&Object, &dyn Fn(String) -> TaskError) -> Result<T, TaskError>,
) -> Result<Vec<Record<T>>, TaskError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TaskError::Io {
        path: name.clone(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = if i == 0 {
            raw.trim_start_matches('\u{feff}')
        } else {
            raw
        };
        if raw.trim().is_empty() {
            continue;
        }
        let err = |message: String| TaskError::Jsonl {
            path: name.clone(),
            line,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(err("expected a JSON object".into()));
        };
        out.push(Record {
            line,
            value: parse(&obj, &err)?,
        });
    }
    Ok(out)
}

/// The content of the last `\\boxed{…}` of `text`, trimmed (`None` if its
/// braces do not close or it is empty).
fn last_boxed(text: &str) -> Option<String> {
    const BOXED: &str = "\\boxed{";
    let start = text.rfind(BOXED)? + BOXED.len();
    let body = &text[start..];
    let mut depth = 1usize;
    let end = body.char_indices().find_map(|(j, c)| {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
        None
    })?;
    let a = body[..end].trim();
    (!a.is_empty()).then(|| a.to_string())
}

/// The answer a response states in a recognised format: the text after
/// its last `####` (trimmed); else the content of its last `\\boxed{…}`;
/// else what follows its last "the answer is" (case-insensitive) up to the
/// end of that sentence. `None` when there is none (or it is empty).
pub fn extract_answer(response: &str) -> Option<String> {
    if let Some(i) = response.rfind("####") {
        let a = response[i + 4..].trim();
        return (!a.is_empty()).then(|| a.to_string());
    }
    if response.contains("\\boxed{") {
        return last_boxed(response);
    }
    let lower = response.to_lowercase();
    // Lower-casing can change byte lengths outside ASCII: search only
    // where the two agree.
    if lower.len() == response.len() {
        if let Some(i) = lower.rfind("the answer is") {
            let rest = response[i + "the answer is".len()..].trim_start_matches([':', ' ']);
            let end = rest
                .char_indices()
                .find(|&(j, c)| {
                    c == '\n'
                        || (c == '.' && !rest[j + 1..].starts_with(|d: char| d.is_ascii_digit()))
                })
                .map_or(rest.len(), |(j, _)| j);
            let a = rest[..end].trim();
            return (!a.is_empty()).then(|| a.to_string());
        }
    }
    None
}

/// The answer of a response and whether it was stated in a recognised
/// format ([`extract_answer`]); failing that, its last number (unformatted).
pub fn read_answer(response: &str) -> Option<(String, bool)> {
    if let Some(a) = extract_answer(response) {
        return Some((a, true));
    }
    last_number(response).map(|n| (n, false))
}

/// The last number of `text` (digits with optional sign, thousands commas
/// and decimal part).
fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let end = b.iter().rposition(u8::is_ascii_digit)? + 1;
    let mut start = end - 1;
    while start > 0 {
        let c = b[start - 1];
        let separator = (c == b',' || c == b'.') && start >= 2 && b[start - 2].is_ascii_digit();
        if c.is_ascii_digit() || separator {
            start -= 1;
        } else {
            break;
        }
    }
    if start > 0 && b[start - 1] == b'-' {
        start -= 1;
    }
    Some(text[start..end].to_string())
}

/// Whether two answers are the same: equal as numbers when both read as
/// one ([`as_number`]: decimals with thousands commas, fractions `a/b` and
/// `\\frac{a}{b}`, with `$`, units and a final period around them), equal
/// after [`normalize_answer`] otherwise.
pub fn answers_match(given: &str, gold: &str) -> bool {
    if normalize_answer(given) == normalize_answer(gold) {
        return true;
    }
    match (as_number(given), as_number(gold)) {
        (Some(a), Some(b)) => a.equals(&b),
        _ => false,
    }
}

/// An exact rational read from an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Rational {
    negative: bool,
    /// Canonical decimal digits of the numerator (no leading zeros) and
    /// of the denominator, whose value is `num / den`.
    num: String,
    den: String,
}

impl Rational {
    fn equals(&self, other: &Rational) -> bool {
        let zero = |r: &Rational| r.num == "0";
        if zero(self) || zero(other) {
            return zero(self) && zero(other);
        }
        if self.negative != other.negative {
            return false;
        }
        // a/b = c/d ⇔ a·d = c·b, in exact decimal arithmetic.
        mul_digits(&self.num, &other.den) == mul_digits(&other.num, &self.den)
    }
}

/// The product of two non-negative decimal digit strings.
fn mul_digits(a: &str, b: &str) -> String {
    let (a, b): (Vec<u32>, Vec<u32>) = (
        a.bytes().rev().map(|c| u32::from(c - b'0')).collect(),
        b.bytes().rev().map(|c| u32::from(c - b'0')).collect(),
    );
    let mut out = vec![0u32; a.len() + b.len()];
    for (i, x) in a.iter().enumerate() {
        let mut carry = 0;
        for (j, y) in b.iter().enumerate() {
            let t = out[i + j] + x * y + carry;
            out[i + j] = t % 10;
            carry = t / 10;
        }
        let mut k = i + b.len();
        while carry > 0 {
            let t = out[k] + carry;
            out[k] = t % 10;
            carry = t / 10;
            k += 1;
        }
    }
    let s: String = out
        .iter()
        .rev()
        .map(|&d| char::from(b'0' + d as u8))
        .collect();
    match s.trim_start_matches('0') {
        "" => "0".to_string(),
        t => t.to_string(),
    }
}

/// An answer read as a number, or `None`: `$`/`\\$` before it; a unit
/// word (letters), `%` or a final period after it; `\\text{…}` unwrapped;
/// a decimal (see [`normalize_answer`]), `a/b` or `\\frac{a}{b}`
/// (`\\dfrac`, `\\tfrac`).
pub fn as_number(answer: &str) -> Option<Rational> {
    let mut s = answer.trim().to_string();
    for wrapper in ["\\text{", "\\mathrm{", "\\textbf{"] {
        while let Some(i) = s.find(wrapper) {
            let close = s[i..].find('}')? + i;
            s = format!(
                "{}{}{}",
                &s[..i],
                &s[i + wrapper.len()..close],
                &s[close + 1..]
            );
        }
    }
    let mut s = s.replace("\\$", "$").replace("\\!", "").replace("\\,", "");
    s = s.trim().trim_end_matches('.').trim().to_string();
    if let Some(rest) = s.strip_prefix('$') {
        s = rest.trim_start().to_string();
    }
    if let Some(rest) = s.strip_prefix("-$") {
        s = format!("-{}", rest.trim_start());
    }
    // Unit words and a percent sign after the number.
    let cut = s
        .char_indices()
        .find(|&(_, c)| c.is_alphabetic() || c == '%')
        .map(|(i, _)| i);
    if let Some(i) = cut {
        let (number, unit) = s.split_at(i);
        let unit_ok = unit
            .trim_end_matches('.')
            .split_whitespace()
            .all(|w| w.chars().all(|c| c.is_alphabetic() || c == '%'));
        if unit_ok && !number.trim().is_empty() && !number.contains('\\') {
            s = number.trim().to_string();
        }
    }
    let frac = |s: &str| -> Option<(String, String)> {
        for name in ["\\frac{", "\\dfrac{", "\\tfrac{"] {
            if let Some(rest) = s.strip_prefix(name) {
                let (a, rest) = rest.split_once('}')?;
                let b = rest.strip_prefix('{')?.strip_suffix('}')?;
                return Some((a.trim().to_string(), b.trim().to_string()));
            }
        }
        let (a, b) = s.split_once('/')?;
        Some((a.trim().to_string(), b.trim().to_string()))
    };
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start().to_string()),
        None => (false, s.clone()),
    };
    let (num, den) = match frac(&body) {
        Some((a, b)) => (decimal(&a)?, decimal(&b)?),
        None => (decimal(&body)?, ("1".to_string(), 0)),
    };
    // num = n / 10^p, den = d / 10^q: num/den = n·10^q / (d·10^p).
    let ((n, p), (d, q)) = (num, den);
    if d == "0" {
        return None;
    }
    Some(Rational {
        negative,
        num: mul_digits(&n, &format!("1{}", "0".repeat(q))),
        den: mul_digits(&d, &format!("1{}", "0".repeat(p))),
    })
}

/// A non-negative decimal as digits and a power of ten to divide by.
fn decimal(s: &str) -> Option<(String, usize)> {
    let c = canonical_number(s)?;
    if c.starts_with('-') {
        return None;
    }
    Some(match c.split_once('.') {
        Some((i, f)) => (
            match format!("{i}{f}").trim_start_matches('0') {
                "" => "0".to_string(),
                t => t.to_string(),
            },
            f.len(),
        ),
        None => (c, 0),
    })
}

/// Whitespace runs become one space and the ends are trimmed; a number
/// (optional sign, digits with optional well-formed thousands commas,
/// optional decimal part) becomes its canonical decimal text (`1,000.50` →
/// `1000.5`, `-0` → `0`), exactly, at any length.
pub fn normalize_answer(s: &str) -> String {
    let text = s.split_whitespace().collect::<Vec<_>>().join(" ");
    canonical_number(&text).unwrap_or(text)
}

fn canonical_number(s: &str) -> Option<String> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.contains(',') {
        let mut groups = int.split(',');
        let first = groups.next()?;
        if first.is_empty() || first.len() > 3 || !groups.all(|g| g.len() == 3) {
            return None;
        }
    }
    let int: String = int.chars().filter(|&c| c != ',').collect();
    if !all_digits(&int) || !all_digits(frac) || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let int = match int.trim_start_matches('0') {
        "" => "0",
        t => t,
    };
    let frac = frac.trim_end_matches('0');
    let mut out = String::new();
    if negative && !(int == "0" && frac.is_empty()) {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_markers_then_the_last_number() {
        for (response, want) in [
            ("so 3 + 4 = 7\n#### 7", Some(("7", true))),
            (
                "\\boxed{\\frac{1}{\\sqrt{2}}}",
                Some(("\\frac{1}{\\sqrt{2}}", true)),
            ),
            ("So the answer is 42.", Some(("42", true))),
            ("The answer is: $1,250.50. Done", Some(("$1,250.50", true))),
            ("THE ANSWER IS 3\nmore", Some(("3", true))),
            (
                "I think 12 apples, then -1,234.5 left.",
                Some(("-1,234.5", false)),
            ),
            ("no digits here", None),
            ("x = 10, y = 2", Some(("2", false))),
        ] {
            let got = read_answer(response);
            assert_eq!(
                got.as_ref().map(|(a, f)| (a.as_str(), *f)),
                want,
                "{response:?}"
            );
        }
    }

    #[test]
    fn numbers_compare_by_value_across_notations() {
        for (a, b) in [
            ("1/2", "0.5"),
            ("\\frac{1}{2}", "0.50"),
            ("\\dfrac{3}{4}", "0.75"),
            ("$12", "12"),
            ("\\$12.00", "12"),
            ("12 dollars", "12"),
            ("12 apples.", "12"),
            ("50%", "50"),
            ("1,000", "1000.0"),
            ("2/4", "1/2"),
            ("-3/6", "-0.5"),
            ("\\text{5 cm}", "5"),
            ("0", "-0.0"),
            ("12345678901234567890123/1", "12345678901234567890123"),
        ] {
            assert!(answers_match(a, b), "{a:?} vs {b:?}");
        }
        for (a, b) in [
            ("1/3", "0.33"),
            ("$12", "13"),
            ("-1/2", "1/2"),
            ("1 000", "1000"),
            ("1/0", "0"),
            ("12 apples 3", "12"),
            ("x", "0"),
            ("", "0"),
        ] {
            assert!(!answers_match(a, b), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn gsm8k_solutions_lose_their_calculator_annotations() {
        assert_eq!(
            strip_calculator("48/2 = <<48/2=24>>24 and <<unclosed"),
            "48/2 = 24 and <<unclosed"
        );
        assert_eq!(gsm8k_final("a\n#### 1,200 ").as_deref(), Some("1,200"));
        assert_eq!(gsm8k_final("no final"), None);
    }
}
