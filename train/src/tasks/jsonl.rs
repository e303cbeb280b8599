//! Tasks read from JSON-lines files: SFT demonstrations
//! `{"prompt": .., "response": ..}`, RL and held-out problems
//! `{"prompt": .., "answer": ..}` (an answer may also be a JSON number).
//!
//! A response's answer is the text after its last `####` (trimmed), or,
//! when it has no `####`, the content of its last `\boxed{…}` (braces
//! balanced). Answers compare after whitespace is normalised, and numbers by
//! value: `1,000`, `1000` and `1000.0` are equal.

use super::tokenizer::{CharTokenizer, HfTokenizer, Tokenizer};
use super::{Example, Problem, Rewards, Task, TaskError, Verdict};
use coopc_ir::spec::TaskSpec;
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

/// A task whose data comes from files.
pub struct JsonlTask {
    sft: Vec<Example>,
    rl: Vec<Problem>,
    eval: Vec<Problem>,
    tokenizer: Box<dyn Tokenizer>,
    rewards: Rewards,
}

impl JsonlTask {
    /// Reads `spec.sft_file`, `spec.rl_file` and (when given)
    /// `spec.eval_file`, relative paths from `base_dir`. With
    /// `spec.tokenizer` (a Hugging Face `tokenizer.json`, relative to
    /// `base_dir`) that tokenizer is used; otherwise a character tokenizer
    /// covering every character of the data. Fails, naming the file
    /// and line, on malformed records, and on a demonstration that does not
    /// fit `seq_len` or a prompt that leaves no room for a response.
    pub fn load(spec: &TaskSpec, seq_len: usize, base_dir: &Path) -> Result<Self, TaskError> {
        let need = |key: &str, v: &Option<String>| {
            v.as_deref()
                .map(|p| resolve(base_dir, p))
                .ok_or_else(|| TaskError::Config(format!("task kind \"jsonl\" needs task.{key}")))
        };
        let sft_path = need("sft_file", &spec.sft_file)?;
        let rl_path = need("rl_file", &spec.rl_file)?;
        let eval_path = spec.eval_file.as_deref().map(|p| resolve(base_dir, p));

        let sft = read_sft_file(&sft_path)?;
        let rl = read_problem_file(&rl_path)?;
        let eval = match &eval_path {
            Some(p) => read_problem_file(p)?,
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

        let tokenizer: Box<dyn Tokenizer> = match &spec.tokenizer {
            Some(t) => Box::new(HfTokenizer::from_file(&resolve(base_dir, t))?),
            None => {
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
        let tokens = |text: &str| -> Result<usize, TaskError> { Ok(tokenizer.encode(text)?.len()) };

        let sft_name = sft_path.display().to_string();
        for r in &sft {
            let len = 2 + tokens(&r.value.prompt)? + tokens(&r.value.response)?;
            if len > seq_len {
                return Err(TaskError::TooLong {
                    what: format!("{sft_name}:{}: BOS + prompt + response + EOS", r.line),
                    len,
                    seq_len,
                    help: "raise train.seq_len (and model.max_seq) or shorten the example".into(),
                });
            }
        }
        for (path, records) in [(Some(&rl_path), &rl), (eval_path.as_ref(), &eval)] {
            let Some(path) = path else { continue };
            for r in records {
                let len = 2 + tokens(&r.value.prompt)?;
                if len > seq_len {
                    return Err(TaskError::TooLong {
                        what: format!(
                            "{}:{}: BOS + prompt + one response token",
                            path.display(),
                            r.line
                        ),
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
            tokenizer,
            rewards: Rewards::from_spec(spec),
        })
    }

    pub fn sft_examples(&self) -> &[Example] {
        &self.sft
    }

    pub fn rl_problems(&self) -> &[Problem] {
        &self.rl
    }
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

    /// Malformed when no answer can be read; otherwise [`answers_match`].
    fn verify(&self, problem: &Problem, response: &str) -> Verdict {
        match extract_answer(response) {
            None => Verdict::Malformed,
            Some(a) if answers_match(&a, &problem.answer) => Verdict::Correct,
            Some(_) => Verdict::Wrong,
        }
    }

    fn max_response_tokens(&self) -> Option<usize> {
        None
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

/// The answer of a response: the text after the last `####`, trimmed; when
/// there is no `####`, the content of the last `\boxed{…}` (trimmed; `None`
/// if its braces do not close). `None` also for an empty answer.
pub fn extract_answer(response: &str) -> Option<String> {
    let answer = if let Some(i) = response.rfind("####") {
        response[i + 4..].trim()
    } else {
        const BOXED: &str = "\\boxed{";
        let start = response.rfind(BOXED)? + BOXED.len();
        let body = &response[start..];
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
        body[..end].trim()
    };
    (!answer.is_empty()).then(|| answer.to_string())
}

/// Whether two answers are the same after [`normalize_answer`].
pub fn answers_match(given: &str, gold: &str) -> bool {
    normalize_answer(given) == normalize_answer(gold)
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
