//! Diagnostics: a problem in a pipeline with the span it points at,
//! rendered rustc-style (file, line, column, the source line, a caret).

use std::fmt;
use std::ops::Range;

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

/// One problem found in a pipeline description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, in one sentence.
    pub message: String,
    /// The dotted key path the problem is about (`lora.rank`), when there is one.
    pub path: Option<String>,
    /// Byte range in the source that the problem points at.
    pub span: Option<Range<usize>>,
    /// How to fix it, when that can be said.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic with a message and nothing else.
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            path: None,
            span: None,
            help: None,
        }
    }

    pub(super) fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    pub(super) fn with_span(mut self, span: Option<Range<usize>>) -> Self {
        self.span = span;
        self
    }

    pub(super) fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// All problems found in one pipeline description, in source order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// Whether some diagnostic is about the key `path` (e.g. `lora.rank`).
    pub fn mentions(&self, path: &str) -> bool {
        self.0.iter().any(|d| d.path.as_deref() == Some(path))
    }

    /// Plain-text rendering in the style of rustc: message, `file:line:column`,
    /// the source line with the offending span underlined, and the help.
    /// Deterministic and free of colour codes.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let mut out = String::new();
        for d in &self.0 {
            render_one(&mut out, d, file_name, source);
            out.push('\n');
        }
        let n = self.0.len();
        out.push_str(&format!(
            "found {n} error{} in {file_name}\n",
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(&d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// 1-based line and column (in characters) of byte `offset`, the line's text
/// without its terminator, and the byte offset where that line starts.
pub(super) fn locate(source: &str, offset: usize) -> (usize, usize, &str, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[offset..]
        .find('\n')
        .map_or(source.len(), |i| offset + i);
    let line_no = source[..line_start].matches('\n').count() + 1;
    let column = source[line_start..offset].chars().count() + 1;
    let text = source[line_start..line_end].trim_end_matches('\r');
    (line_no, column, text, line_start)
}

pub(super) fn render_one(out: &mut String, d: &Diagnostic, file_name: &str, source: &str) {
    out.push_str("error: ");
    out.push_str(&d.message);
    out.push('\n');
    match &d.span {
        Some(span) => {
            let (line_no, column, text, line_start) = locate(source, span.start);
            let width = line_no.to_string().len();
            let pad = " ".repeat(width);
            out.push_str(&format!("{pad}--> {file_name}:{line_no}:{column}\n"));
            out.push_str(&format!("{pad} |\n"));
            out.push_str(&format!("{line_no} | {text}\n"));
            // Underline from the span's start to its end, or to the end of
            // the line when the span runs on; always at least one caret.
            // Tabs are kept so the carets line up under the text.
            let indent: String = text
                .chars()
                .take(column - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let end_in_line = span.end.saturating_sub(line_start);
            let underlined = text
                .char_indices()
                .skip(column - 1)
                .take_while(|(b, _)| *b < end_in_line)
                .count()
                .max(1);
            out.push_str(&format!(
                "{pad} | {indent}{} here\n",
                "^".repeat(underlined)
            ));
            if let Some(help) = &d.help {
                out.push_str(&format!("{pad} = help: {help}\n"));
            }
        }
        None => {
            out.push_str(&format!(" --> {file_name}\n"));
            if let Some(help) = &d.help {
                out.push_str(&format!("  = help: {help}\n"));
            }
        }
    }
}
