//! The `pipeline.toml` frontend: parses a pipeline description into the typed
//! [`PipelineSpec`], applying defaults and validating every key, and reports
//! each problem as a [`Diagnostic`] that points at its line and column.
//!
//! The schema (sections, keys, defaults and allowed ranges) is documented in
//! `docs/pipeline.md`; this file is its executable form.
//!
//! `diagnostics` renders problems, `check` reads the TOML document key by
//! key, `sections` holds the schema and one reader per section.

mod check;
mod diagnostics;
mod sections;

use crate::spec::PipelineSpec;
use check::{Checker, Section};
pub use diagnostics::{Diagnostic, Diagnostics};
use sections::read_pipeline;
pub use sections::{builtin_vocab_size, DEFAULT_LORA_RANK};
use std::path::{Path, PathBuf};
use toml_edit::{ImDocument, TableLike};

/// Why a pipeline file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The file is missing, unreadable or not UTF-8.
    #[error("cannot read pipeline `{}`: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: String,
        #[source]
        error: std::io::Error,
    },
    /// The file was read but does not describe a valid pipeline.
    #[error("invalid pipeline `{}`: {diagnostics}", path.display())]
    Invalid {
        path: PathBuf,
        text: String,
        diagnostics: Diagnostics,
    },
}

impl FrontendError {
    /// The error as a person reads it: rendered diagnostics for an invalid
    /// pipeline, a one-line message for an unreadable file.
    pub fn render(&self) -> String {
        match self {
            FrontendError::Read { .. } => format!("error: {self}\n"),
            FrontendError::Invalid {
                path,
                text,
                diagnostics,
            } => diagnostics.render(&path.display().to_string(), text),
        }
    }
}

/// Reads and parses a pipeline file; returns its text along with the spec.
pub fn load_pipeline(path: &Path) -> Result<(String, PipelineSpec), FrontendError> {
    load_pipeline_with(path, &Options::default())
}

/// [`load_pipeline`] with command-line [`Options`].
pub fn load_pipeline_with(
    path: &Path,
    options: &Options,
) -> Result<(String, PipelineSpec), FrontendError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        let reason = match error.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::InvalidData => "the file is not valid UTF-8 text".to_string(),
            _ if path.is_dir() => "it is a directory, not a file".to_string(),
            _ => error.to_string(),
        };
        FrontendError::Read {
            path: path.to_path_buf(),
            reason,
            error,
        }
    })?;
    match parse_pipeline_with(&text, options) {
        Ok(spec) => Ok((text, spec)),
        Err(diagnostics) => Err(FrontendError::Invalid {
            path: path.to_path_buf(),
            text,
            diagnostics,
        }),
    }
}

/// Parses and validates a `pipeline.toml`; on failure returns every problem
/// found (a TOML syntax error stops at that error). A relative
/// `model.from` is read from the current directory.
pub fn parse_pipeline(source: &str) -> Result<PipelineSpec, Diagnostics> {
    parse_pipeline_with(source, &Options::default())
}

/// What the command line adds to a pipeline.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A Hugging Face model folder that replaces `model.from` (`--model`).
    pub model_from: Option<String>,
}

/// [`parse_pipeline`] with command-line [`Options`].
pub fn parse_pipeline_with(source: &str, options: &Options) -> Result<PipelineSpec, Diagnostics> {
    let doc = match ImDocument::parse(source) {
        Ok(doc) => doc,
        Err(e) => {
            let mut lines = e.message().trim().lines();
            let first = lines.next().unwrap_or("invalid TOML").trim().to_string();
            let rest: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
            let mut d =
                Diagnostic::error(format!("TOML syntax error: {first}")).with_span(e.span());
            if !rest.is_empty() {
                d = d.with_help(rest.join("; "));
            }
            return Err(Diagnostics(vec![d]));
        }
    };
    let root = Section {
        path: String::new(),
        table: Some(doc.as_table() as &dyn TableLike),
        span: None,
    };
    let mut c = Checker {
        source,
        diags: Vec::new(),
        model_from: options.model_from.clone(),
    };
    let spec = read_pipeline(&mut c, &root);
    let mut diags = c.diags;
    // Source order; diagnostics without a place last, stable otherwise.
    diags.sort_by_key(|d| d.span.as_ref().map_or(usize::MAX, |s| s.start));
    match spec {
        Some(spec) if diags.is_empty() => Ok(spec),
        _ => {
            if diags.is_empty() {
                diags.push(Diagnostic::error("the pipeline could not be read"));
            }
            Err(Diagnostics(diags))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check::*;
    use super::diagnostics::*;
    use super::sections::*;
    use std::ops::Range;

    #[test]
    fn closest_suggests_near_names_only() {
        assert_eq!(closest("n_head", MODEL_KEYS), Some("n_heads"));
        assert_eq!(closest("trian", &["train", "task"]), Some("train"));
        assert_eq!(closest("zzzz", MODEL_KEYS), None);
    }

    #[test]
    fn locate_counts_lines_and_characters() {
        let src = "a = 1\nλb = 2\n";
        assert_eq!(locate(src, 0), (1, 1, "a = 1", 0));
        // `b` is the second character of line 2 although λ takes two bytes.
        let (line, column, text, start) = locate(src, 8);
        assert_eq!((line, column, text, start), (2, 2, "λb = 2", 6));
        assert_eq!(locate(src, src.len()).0, 3);
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // deliberately inverted spans
    fn render_keeps_tabs_and_tolerates_any_span() {
        let src = "[lora]\n\trank = 0\n";
        let d =
            |span: Range<usize>| Diagnostics(vec![Diagnostic::error("bad").with_span(Some(span))]);
        let text = d(15..16).render("p.toml", src);
        assert!(
            text.contains("2 | \trank = 0\n  | \t       ^ here\n"),
            "{text}"
        );
        // Reversed, out-of-range and mid-character spans render without panicking.
        for span in [5..1, 100..200, 0..1000, 8..8] {
            let text = d(span).render("p.toml", "a = \"é\"\n");
            assert!(text.contains("^ here"), "{text}");
        }
    }
}
