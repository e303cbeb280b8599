//! A Hugging Face model folder's text side: its tokenizer with the special
//! tokens `tokenizer_config.json` names, the stop tokens of
//! `generation_config.json`, and its chat template, rendered with
//! minijinja as `transformers`' `apply_chat_template` renders it.

use super::tokenizer::{HfTokenizer, Tokenizer};
use super::TaskError;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The folder's special tokens and chat template.
pub struct ModelText {
    /// `bos_token` of tokenizer_config.json (`None` for Qwen).
    pub bos_token: Option<String>,
    /// `eos_token` of tokenizer_config.json: what ends a turn.
    pub eos_token: String,
    /// `pad_token` of tokenizer_config.json, when it names one the
    /// tokenizer has.
    pub pad_token: Option<String>,
    /// The template's source, when the folder has one.
    pub chat_template: Option<String>,
    /// Token ids generation stops at: the EOS token and generation_config.json's
    /// `eos_token_id` (one id or several).
    pub stop_ids: Vec<i32>,
}

fn io(path: &Path, message: impl Into<String>) -> TaskError {
    TaskError::Io {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TaskError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| io(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e.to_string())),
    }
}

/// A special token as tokenizer_config.json writes it: a string, or an
/// object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ModelText {
    /// Reads `tokenizer_config.json`, `chat_template.jinja` (transformers
    /// 5 writes the template there) and `generation_config.json` of `dir`;
    /// ids are looked up in `tokenizer`.
    pub fn read(dir: &Path, tokenizer: &HfTokenizer) -> Result<Self, TaskError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let id_of = |text: &str, what: &str, path: &Path| -> Result<i32, TaskError> {
            tokenizer.token_id(text).ok_or_else(|| {
                io(
                    path,
                    format!("{what} {text:?} is not a token of the folder's tokenizer.json"),
                )
            })
        };
        let bos_token = token_text(config.get("bos_token"));
        if let Some(b) = &bos_token {
            id_of(b, "bos_token", &config_path)?;
        }
        let eos_token = match token_text(config.get("eos_token")) {
            Some(e) => e,
            None => tokenizer.token_text(tokenizer.eos()).unwrap_or_default(),
        };
        let eos = id_of(&eos_token, "eos_token", &config_path)?;
        let pad_token =
            token_text(config.get("pad_token")).filter(|p| tokenizer.token_id(p).is_some());
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| io(&jinja, e.to_string()))?)
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the one named "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                Some(_) => {
                    return Err(io(
                        &config_path,
                        "chat_template must be a string or a list of named templates",
                    ))
                }
            }
        };
        let mut stop_ids = vec![eos];
        let gen_path = dir.join("generation_config.json");
        if let Some(gen) = read_json(&gen_path)? {
            let ids: Vec<Value> = match gen.get("eos_token_id") {
                Some(Value::Array(a)) => a.clone(),
                Some(v @ Value::Number(_)) => vec![v.clone()],
                _ => Vec::new(),
            };
            for v in ids {
                let id = v
                    .as_u64()
                    .ok_or_else(|| io(&gen_path, format!("eos_token_id {v} is not a token id")))?
                    as i32;
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Ok(ModelText {
            bos_token,
            eos_token,
            pad_token,
            chat_template,
            stop_ids,
        })
    }
}

/// A chat template ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for errors.
    origin: PathBuf,
}

/// A message of a conversation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl ChatTemplate {
    /// The template `source` (from `origin`, named in errors). Fails on a
    /// template that does not parse.
    pub fn new(source: &str, text: &ModelText, origin: &Path) -> Result<Self, TaskError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // Llama 3.2's template prints today's date; a fixed one keeps runs
        // reproducible.
        env.add_function("strftime_now", |_fmt: String| "01 Jan 2026".to_string());
        env.set_trim_blocks(false);
        env.set_lstrip_blocks(false);
        env.set_keep_trailing_newline(true);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| io(origin, format!("the chat template does not parse: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: text.bos_token.clone().unwrap_or_default(),
            eos_token: text.eos_token.clone(),
            origin: origin.to_path_buf(),
        })
    }

    /// The text of `messages` with `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TaskError> {
        let t = self.env.get_template("chat").expect("added in new");
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| io(&self.origin, format!("the chat template failed: {e:#}")))
    }
}
