//! Checking the TOML document: typed reads of keys with their spans,
//! ranges, choices and unknown keys (with a "did you mean" for near
//! misses), each problem recorded as a diagnostic.

use super::diagnostics::Diagnostic;
use std::fmt;
use std::ops::Range;
use toml_edit::{Item, TableLike, Value};

// ---------------------------------------------------------------------------
// Reading the document
// ---------------------------------------------------------------------------

/// A value read from the document, with the span it came from.
#[derive(Clone, Debug)]
pub(super) struct Field<T> {
    pub(super) value: T,
    pub(super) span: Option<Range<usize>>,
}

/// A table of the document (a `[section]`, a dotted or an inline table)
/// under its dotted path; `table` is `None` for an absent optional section.
#[derive(Clone)]
pub(super) struct Section<'a> {
    pub(super) path: String,
    pub(super) table: Option<&'a dyn TableLike>,
    pub(super) span: Option<Range<usize>>,
}

impl<'a> Section<'a> {
    pub(super) fn absent(path: &str) -> Self {
        Section {
            path: path.to_string(),
            table: None,
            span: None,
        }
    }

    pub(super) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The item under `key` and the best span for it (value, else key,
    /// else the table).
    pub(super) fn get(&self, key: &str) -> Option<(&'a Item, Option<Range<usize>>)> {
        let (k, item) = self.table?.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        let span = item
            .span()
            .or_else(|| k.span())
            .or_else(|| self.span.clone());
        Some((item, span))
    }

    /// The span of the key itself, else of the table.
    pub(super) fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table
            .and_then(|t| t.key(key))
            .and_then(|k| k.span())
            .or_else(|| self.span.clone())
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// What kind of TOML value an item is, for "found …" in messages.
pub(super) fn describe(item: &Item) -> String {
    match item {
        Item::None => "nothing".to_string(),
        Item::Table(_) => "a table".to_string(),
        Item::ArrayOfTables(_) => "an array of tables".to_string(),
        Item::Value(v) => match v {
            Value::String(s) => format!("the string {:?}", s.value()),
            Value::Integer(i) => format!("the integer {}", i.value()),
            Value::Float(f) => format!("the float {:?}", f.value()),
            Value::Boolean(b) => format!("the boolean {}", b.value()),
            Value::Datetime(_) => "a date-time".to_string(),
            Value::Array(_) => "an array".to_string(),
            Value::InlineTable(_) => "a table".to_string(),
        },
    }
}

/// Optimal-string-alignment distance (edits, with adjacent swaps).
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The known name closest to `given`, when it is close enough to be a typo.
pub(super) fn closest<'k>(given: &str, known: &[&'k str]) -> Option<&'k str> {
    let given_lower = given.to_lowercase();
    let limit = (given.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(&given_lower, k), *k))
        .filter(|(d, k)| {
            *d <= limit
                || (given_lower.len() >= 3
                    && (k.starts_with(&given_lower) || given_lower.starts_with(k)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

pub(super) fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn plain_list(names: &[&str]) -> String {
    names.join(", ")
}

/// Upper bounds of sizes a pipeline sets: past them the compiler's graphs
/// and tables (RoPE over `max_seq` positions, one layer's nodes per
/// `n_layers`, rows per batch) would not fit in memory or time, and a typo
/// (an extra zero, a 2⁶³) must be refused, not an abort or a hang. Each is
/// above the largest open models' sizes (d_model 16 384, 126 layers,
/// 262 144 tokens of vocabulary, 128k-token training contexts); a model
/// folder's `config.json` is held to the `model.*` ones too.
const SIZE_LIMITS: &[(&str, usize)] = &[
    ("model.vocab_size", 1 << 22),
    ("model.d_model", 1 << 16),
    ("model.d_ff", 1 << 18),
    ("model.n_layers", 512),
    ("model.n_heads", 1024),
    ("model.n_kv_heads", 1024),
    ("model.head_dim", 4096),
    ("model.max_seq", 1 << 17),
    ("model.lower.lora_rank", 1 << 16),
    ("lora.rank", 1 << 16),
    ("rl.group_size", 1024),
    ("rl.prompts_per_step", 1 << 13),
    ("rl.max_new_tokens", 1 << 17),
    ("rl.max_sampling_rounds", 1024),
    ("rl.top_k", 1 << 22),
    ("sft.batch_size", 1 << 13),
    ("train.seq_len", 1 << 17),
    ("train.eval_samples", 1024),
    ("bilevel.hypergradient.unroll", 256),
    ("bilevel.hypergradient.backprop", 256),
];

/// The bound `SIZE_LIMITS` sets on the key at `path`, if any.
pub(super) fn size_limit(path: &str) -> Option<usize> {
    SIZE_LIMITS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|&(_, limit)| limit)
}

/// Collects diagnostics while the document is read.
pub(super) struct Checker<'s> {
    pub(super) source: &'s str,
    pub(super) diags: Vec<Diagnostic>,
    /// `model.from` given on the command line (`--model DIR`), which
    /// replaces the pipeline's.
    pub(super) model_from: Option<String>,
}

impl Checker<'_> {
    pub(super) fn error(&mut self, path: &str, span: Option<Range<usize>>, message: String) {
        self.diags
            .push(Diagnostic::error(message).with_path(path).with_span(span));
    }

    pub(super) fn error_help(
        &mut self,
        path: &str,
        span: Option<Range<usize>>,
        message: String,
        help: String,
    ) {
        self.diags.push(
            Diagnostic::error(message)
                .with_path(path)
                .with_span(span)
                .with_help(help),
        );
    }

    pub(super) fn wrong_type(&mut self, sec: &Section, key: &str, expected: &str) {
        if let Some((item, span)) = sec.get(key) {
            let path = sec.key_path(key);
            let found = describe(item);
            self.error(
                &path,
                span,
                format!("`{path}` must be {expected}, found {found}"),
            );
        }
    }

    /// Reports every key of `sec` that is not in `known`.
    pub(super) fn unknown_keys(&mut self, sec: &Section, known: &[&str]) {
        let Some(table) = sec.table else { return };
        for (key, item) in table.iter() {
            if item.is_none() || known.contains(&key) {
                continue;
            }
            let path = sec.key_path(key);
            let span = sec.key_span(key);
            let is_section = matches!(item, Item::Table(t) if !t.is_dotted());
            let message = if is_section {
                format!("unknown section `[{path}]`")
            } else {
                format!("unknown key `{path}`")
            };
            let help = match closest(key, known) {
                Some(k) if is_section => format!("did you mean `[{}]`?", sec.key_path(k)),
                Some(k) => format!("did you mean `{k}`?"),
                None => format!("[{}] accepts: {}", sec.path, plain_list(known)),
            };
            self.error_help(&path, span, message, help);
        }
    }

    /// A sub-table (`[a.b]`, `a.b.c = ..` or `b = { .. }`) of `sec`; an absent
    /// section when the key is missing or is not a table (reported).
    pub(super) fn table<'a>(&mut self, sec: &Section<'a>, key: &str) -> Section<'a> {
        let path = sec.key_path(key);
        match sec.get(key) {
            None => Section::absent(&path),
            Some((item, span)) => match item.as_table_like() {
                Some(table) => Section {
                    path,
                    table: Some(table),
                    span,
                },
                None => {
                    self.wrong_type(sec, key, "a table");
                    Section::absent(&path)
                }
            },
        }
    }

    pub(super) fn usize(&mut self, sec: &Section, key: &str) -> Option<Field<usize>> {
        let (item, span) = sec.get(key)?;
        match item.as_integer() {
            Some(v) if v >= 0 => match usize::try_from(v) {
                Ok(value) => {
                    let path = sec.key_path(key);
                    if let Some(limit) = size_limit(&path) {
                        if value > limit {
                            self.error(
                                &path,
                                span,
                                format!(
                                    "`{path}` must be at most {limit} (what coopc can compile \
                                     and allocate), found {v}"
                                ),
                            );
                            return None;
                        }
                    }
                    Some(Field { value, span })
                }
                Err(_) => {
                    let path = sec.key_path(key);
                    self.error(&path, span, format!("`{path}` is too large, found {v}"));
                    None
                }
            },
            Some(v) => {
                let path = sec.key_path(key);
                self.error(
                    &path,
                    span,
                    format!("`{path}` must be a non-negative integer, found {v}"),
                );
                None
            }
            None => {
                self.wrong_type(sec, key, "an integer");
                None
            }
        }
    }

    pub(super) fn usize_or(&mut self, sec: &Section, key: &str, default: usize) -> Field<usize> {
        self.usize(sec, key).unwrap_or(Field {
            value: default,
            span: None,
        })
    }

    /// A finite number; integers are accepted as numbers.
    pub(super) fn float(&mut self, sec: &Section, key: &str) -> Option<Field<f64>> {
        let (item, span) = sec.get(key)?;
        let value = match item {
            Item::Value(Value::Float(f)) => *f.value(),
            Item::Value(Value::Integer(i)) => *i.value() as f64,
            _ => {
                self.wrong_type(sec, key, "a number");
                return None;
            }
        };
        if !value.is_finite() {
            let path = sec.key_path(key);
            self.error(
                &path,
                span,
                format!("`{path}` must be a finite number, found {value}"),
            );
            return None;
        }
        Some(Field { value, span })
    }

    pub(super) fn float_or(&mut self, sec: &Section, key: &str, default: f64) -> Field<f64> {
        self.float(sec, key).unwrap_or(Field {
            value: default,
            span: None,
        })
    }

    pub(super) fn bool_or(&mut self, sec: &Section, key: &str, default: bool) -> bool {
        let Some((item, _)) = sec.get(key) else {
            return default;
        };
        match item.as_bool() {
            Some(v) => v,
            None => {
                self.wrong_type(sec, key, "a boolean (true or false)");
                default
            }
        }
    }

    pub(super) fn string(&mut self, sec: &Section, key: &str) -> Option<Field<String>> {
        let (item, span) = sec.get(key)?;
        match item.as_str() {
            Some("") => {
                let path = sec.key_path(key);
                self.error(&path, span, format!("`{path}` must not be empty"));
                None
            }
            Some(s) => Some(Field {
                value: s.to_string(),
                span,
            }),
            None => {
                self.wrong_type(sec, key, "a string");
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub(super) fn choice<T: Copy>(
        &mut self,
        sec: &Section,
        key: &str,
        options: &[(&str, T)],
    ) -> Option<Field<T>> {
        let (item, span) = sec.get(key)?;
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let path = sec.key_path(key);
        let Some(given) = item.as_str() else {
            self.wrong_type(sec, key, &format!("one of {}", quoted_list(&names)));
            return None;
        };
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == given) {
            return Some(Field { value: *v, span });
        }
        let message = format!(
            "`{path}` must be one of {}, found {given:?}",
            quoted_list(&names)
        );
        match closest(given, &names) {
            Some(n) => self.error_help(&path, span, message, format!("did you mean \"{n}\"?")),
            None => self.error(&path, span, message),
        }
        None
    }

    pub(super) fn choice_or<T: Copy>(
        &mut self,
        sec: &Section,
        key: &str,
        options: &[(&str, T)],
        default: T,
    ) -> Field<T> {
        self.choice(sec, key, options).unwrap_or(Field {
            value: default,
            span: None,
        })
    }

    /// Reports `field` unless `ok`; the message reads "`path` must <rule>, found <value>".
    pub(super) fn check<T: fmt::Debug>(
        &mut self,
        sec: &Section,
        key: &str,
        field: &Field<T>,
        ok: bool,
        rule: &str,
    ) -> bool {
        if !ok {
            let path = sec.key_path(key);
            // Quote the value as written when it was written.
            let found = field
                .span
                .as_ref()
                .and_then(|s| self.source.get(s.clone()))
                .map_or_else(|| format!("{:?}", field.value), |s| s.trim().to_string());
            let span = field.span.clone().or_else(|| sec.key_span(key));
            self.error(&path, span, format!("`{path}` must {rule}, found {found}"));
        }
        ok
    }

    pub(super) fn at_least_one(&mut self, sec: &Section, key: &str, field: &Field<usize>) -> bool {
        self.check(sec, key, field, field.value >= 1, "be at least 1")
    }

    /// Reports a required key that is absent.
    pub(super) fn missing(&mut self, sec: &Section, key: &str, why: &str, example: &str) {
        let path = sec.key_path(key);
        self.error_help(
            &path,
            sec.span.clone(),
            format!("missing key `{path}`{why}"),
            format!("add `{key} = {example}` to [{}]", sec.path),
        );
    }

    /// Reports a key that is present although it does not apply.
    pub(super) fn not_applicable(&mut self, sec: &Section, key: &str, why: &str, help: &str) {
        let path = sec.key_path(key);
        self.error_help(
            &path,
            sec.key_span(key),
            format!("`{path}` does not apply {why}"),
            help.to_string(),
        );
    }
}
