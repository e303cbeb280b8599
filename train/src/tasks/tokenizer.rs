//! Tokenizers for the tasks: the trait every tokenizer implements, and the
//! built-in character tokenizer (one token per character, after the three
//! special tokens PAD = 0, BOS = 1, EOS = 2).

use super::chat::ModelText;
use super::TaskError;
use coopc_ir::spec::TaskKind;
use std::collections::HashMap;

/// Padding token id of the character tokenizer.
pub const PAD: i32 = 0;
/// Beginning-of-sequence token id of the character tokenizer.
pub const BOS: i32 = 1;
/// End-of-sequence token id of the character tokenizer.
pub const EOS: i32 = 2;
/// Number of special tokens before the first character.
pub const N_SPECIAL: usize = 3;

/// Text to token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Number of token ids (special tokens included); ids are `0..vocab_size`.
    fn vocab_size(&self) -> usize;
    /// Ids of `text`, without BOS/EOS. Fails on text the vocabulary cannot
    /// represent, naming the offending character.
    fn encode(&self, text: &str) -> Result<Vec<i32>, TaskError>;
    /// Text of `ids`. Special tokens produce no text; an id outside the
    /// vocabulary becomes U+FFFD, so decoding never fails.
    fn decode(&self, ids: &[i32]) -> String;
    fn bos(&self) -> i32;
    fn eos(&self) -> i32;
    fn pad(&self) -> i32;
    /// The token every sequence starts with, when the tokenizer puts one
    /// there (Qwen's puts none).
    fn bos_prefix(&self) -> Option<i32> {
        Some(self.bos())
    }
    /// Tokens that end a generated response: EOS, and others a model
    /// folder's generation config names.
    fn stop_tokens(&self) -> Vec<i32> {
        vec![self.eos()]
    }
}

/// One token per character of a fixed alphabet.
#[derive(Clone, Debug)]
pub struct CharTokenizer {
    /// What the vocabulary is for, used in error messages (`addition`, ...).
    name: String,
    /// Character of id `N_SPECIAL + i`.
    chars: Vec<char>,
    ids: HashMap<char, i32>,
}

/// The addition alphabet. Used: digits, `+` `=` (prompt), `,` (between
/// carry-chain steps), `#` (before the answer). The rest are reserved so
/// that the vocabulary has exactly 24 entries.
pub const ADDITION_ALPHABET: &str = "0123456789+=,# \n:>-*.";

/// The countdown alphabet. Used: digits, `+ - * / ( ) =` (steps and the
/// expression), `,` (between numbers and between steps), `>` and `:`
/// (prompt), `#` (before the expression). The rest are reserved so that the
/// vocabulary has exactly 32 entries.
pub const COUNTDOWN_ALPHABET: &str = "0123456789+-*/()=,>:# \n.?![]_";

impl CharTokenizer {
    /// A tokenizer over `alphabet` (in that order); `name` appears in errors.
    /// A repeated character is an error.
    pub fn new(name: &str, alphabet: impl IntoIterator<Item = char>) -> Result<Self, TaskError> {
        let mut chars = Vec::new();
        let mut ids = HashMap::new();
        for c in alphabet {
            let id = (N_SPECIAL + chars.len()) as i32;
            if ids.insert(c, id).is_some() {
                return Err(TaskError::Config(format!(
                    "the {name} alphabet lists the character {c:?} twice"
                )));
            }
            chars.push(c);
        }
        Ok(CharTokenizer {
            name: name.to_string(),
            chars,
            ids,
        })
    }

    /// The built-in vocabulary of `kind`: 24 tokens for `addition`, 32 for
    /// `countdown`. `jsonl` has none (its alphabet comes from its data, see
    /// [`CharTokenizer::from_texts`]).
    pub fn for_task(kind: TaskKind) -> Result<Self, TaskError> {
        let alphabet = match kind {
            TaskKind::Addition => ADDITION_ALPHABET,
            TaskKind::Countdown => COUNTDOWN_ALPHABET,
            TaskKind::Jsonl => {
                return Err(TaskError::Config(
                    "task kind \"jsonl\" has no built-in character vocabulary".into(),
                ))
            }
        };
        CharTokenizer::new(kind.name(), alphabet.chars())
    }

    /// A tokenizer over every character that occurs in `texts`, in code
    /// point order (so the same texts give the same ids).
    pub fn from_texts<'a>(
        name: &str,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, TaskError> {
        let set: std::collections::BTreeSet<char> =
            texts.into_iter().flat_map(str::chars).collect();
        CharTokenizer::new(name, set)
    }

    /// The characters, in id order (id `N_SPECIAL + i` is `alphabet()[i]`).
    pub fn alphabet(&self) -> &[char] {
        &self.chars
    }
}

impl Tokenizer for CharTokenizer {
    fn vocab_size(&self) -> usize {
        N_SPECIAL + self.chars.len()
    }

    fn encode(&self, text: &str) -> Result<Vec<i32>, TaskError> {
        text.chars()
            .map(|c| {
                self.ids
                    .get(&c)
                    .copied()
                    .ok_or_else(|| TaskError::UnknownChar {
                        ch: c,
                        vocabulary: self.name.clone(),
                    })
            })
            .collect()
    }

    fn decode(&self, ids: &[i32]) -> String {
        ids.iter()
            .filter(|&&id| !(0..N_SPECIAL as i32).contains(&id))
            .map(|&id| {
                usize::try_from(id)
                    .ok()
                    .and_then(|i| self.chars.get(i.checked_sub(N_SPECIAL)?).copied())
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }

    fn bos(&self) -> i32 {
        BOS
    }

    fn eos(&self) -> i32 {
        EOS
    }

    fn pad(&self) -> i32 {
        PAD
    }
}

/// Names the end-of-sequence token has in common Hugging Face tokenizers,
/// in order of preference.
const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<eos>",
    "[SEP]",
];
/// Names of the beginning-of-sequence token (EOS stands in when none exists,
/// as GPT-2-style vocabularies do).
const BOS_NAMES: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "[CLS]",
    "<|endoftext|>",
];
/// Names of the padding token (EOS stands in when none exists).
const PAD_NAMES: &[&str] = &["<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"];

/// A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram or WordLevel),
/// through the `tokenizers` crate. BOS, EOS and PAD are found by their
/// usual names (`<s>`, `</s>`, `<|endoftext|>`, `<pad>`, …).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    vocab: usize,
    bos: i32,
    eos: i32,
    pad: i32,
    /// Whether sequences start with `bos`.
    add_bos: bool,
    stop: Vec<i32>,
}

impl HfTokenizer {
    pub fn from_file(path: &std::path::Path) -> Result<Self, TaskError> {
        let err = |message: String| TaskError::Io {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            return Err(err("no such file (task.tokenizer)".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        // Malformed JSON is named here, with its line and column: the
        // tokenizers crate panics on some of it (a truncated decoder).
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            return Err(err(format!("not valid JSON: {e}")));
        }
        let text = String::from_utf8(bytes).map_err(|e| err(format!("not UTF-8 text: {e}")))?;
        // Some malformed tokenizers it also panics on (a merge rule shorter
        // than the subword prefix): that is an error of the file too, and
        // the panic's own report is kept off the terminal.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
        std::panic::set_hook(previous);
        let inner = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(err(format!("not a Hugging Face tokenizer.json: {e}"))),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(err(format!(
                    "not a Hugging Face tokenizer.json: the tokenizers library failed on it ({why})"
                )));
            }
        };
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| inner.token_to_id(n))
                .map(|id| id as i32)
        };
        let eos = find(EOS_NAMES).ok_or_else(|| {
            err(format!(
                "no end-of-sequence token; looked for {}",
                EOS_NAMES.join(", ")
            ))
        })?;
        let bos = find(BOS_NAMES).unwrap_or(eos);
        let pad = find(PAD_NAMES).unwrap_or(eos);
        let vocab = inner.get_vocab_size(true);
        Ok(HfTokenizer {
            inner,
            vocab,
            bos,
            eos,
            pad,
            add_bos: true,
            stop: vec![eos],
        })
    }

    /// The tokenizer of a Hugging Face model folder: `tokenizer.json`, with
    /// BOS, EOS and PAD as `tokenizer_config.json` names them (no BOS when
    /// it names none, as Qwen's) and generation stopping at
    /// `generation_config.json`'s `eos_token_id`s too. Returns the folder's
    /// text settings (chat template, special tokens) with it.
    pub fn from_folder(dir: &std::path::Path) -> Result<(Self, ModelText), TaskError> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"))?;
        let text = ModelText::read(dir, &tok)?;
        let id = |tok: &Self, t: &str| tok.token_id(t).expect("checked by ModelText::read");
        tok.eos = id(&tok, &text.eos_token);
        match &text.bos_token {
            Some(b) => {
                tok.bos = id(&tok, b);
                tok.add_bos = true;
            }
            None => {
                tok.bos = tok.eos;
                tok.add_bos = false;
            }
        }
        tok.pad = match &text.pad_token {
            Some(p) => id(&tok, p),
            None => tok.eos,
        };
        tok.stop = text.stop_ids.clone();
        Ok((tok, text))
    }

    /// The id of a token's text (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<i32> {
        self.inner.token_to_id(token).map(|i| i as i32)
    }

    /// The text of a token id.
    pub fn token_text(&self, id: i32) -> Option<String> {
        self.inner.id_to_token(u32::try_from(id).ok()?)
    }
}

impl Tokenizer for HfTokenizer {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn encode(&self, text: &str) -> Result<Vec<i32>, TaskError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TaskError::Config(format!("tokenizer cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
    }

    fn decode(&self, ids: &[i32]) -> String {
        // Out-of-vocabulary ids decode to U+FFFD, like the character tokenizer's.
        let mut out = String::new();
        let mut run: Vec<u32> = Vec::new();
        let flush = |run: &mut Vec<u32>, out: &mut String| {
            if !run.is_empty() {
                out.push_str(&self.inner.decode(run, true).unwrap_or_default());
                run.clear();
            }
        };
        for &id in ids {
            if id >= 0 && (id as usize) < self.vocab {
                run.push(id as u32);
            } else {
                flush(&mut run, &mut out);
                out.push('\u{FFFD}');
            }
        }
        flush(&mut run, &mut out);
        out
    }

    fn bos(&self) -> i32 {
        self.bos
    }

    fn eos(&self) -> i32 {
        self.eos
    }

    fn pad(&self) -> i32 {
        self.pad
    }

    fn bos_prefix(&self) -> Option<i32> {
        self.add_bos.then_some(self.bos)
    }

    fn stop_tokens(&self) -> Vec<i32> {
        self.stop.clone()
    }
}
