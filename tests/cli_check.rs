//! `coopc check PIPELINE`: exit code 0 and a summary for the examples, 2 and
//! diagnostics for every malformed fixture and for a missing file.

use coopc::cli::check as cli_check;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bad_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/bad"))
        .expect("fixture folder")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "only {} bad fixtures", files.len());
    files
}

#[test]
fn check_accepts_the_examples() {
    for example in ["examples/addition.toml", "examples/tiny.toml"] {
        assert_eq!(cli_check::check(&root().join(example)), 0, "{example}");
    }
}

#[test]
fn check_rejects_every_bad_fixture_with_code_2() {
    for file in bad_fixtures() {
        assert_eq!(cli_check::check(&file), 2, "{}", file.display());
    }
}

#[test]
fn check_rejects_a_missing_file_with_code_2() {
    assert_eq!(cli_check::check(Path::new("no/such/pipeline.toml")), 2);
}

#[test]
fn binary_exits_with_code_2_on_every_bad_fixture() {
    for file in bad_fixtures() {
        let out = Command::new(env!("CARGO_BIN_EXE_coopc"))
            .arg("check")
            .arg(&file)
            .output()
            .expect("running coopc");
        assert_eq!(out.status.code(), Some(2), "{}", file.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: "), "{}: {stderr}", file.display());
    }
}

#[test]
fn binary_prints_a_summary_and_exits_0_on_the_examples() {
    for example in ["examples/addition.toml", "examples/tiny.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_coopc"))
            .arg("check")
            .arg(root().join(example))
            .output()
            .expect("running coopc");
        assert_eq!(out.status.code(), Some(0), "{example}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("ok: "), "{example}: {stdout}");
        assert!(stdout.contains("method bridge"), "{example}: {stdout}");
    }
}
