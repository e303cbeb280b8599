//! `coopc compare`: reading several runs' metrics, the PNG figure and the
//! markdown summary.

use coopc::cli::compare::{compare, PNG_SIZE};
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("coopc-compare-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One metrics row as the training loop writes it (plus an unknown field,
/// which the reader must ignore).
fn row(step: usize, method: &str, reward: Option<f64>, eval: Option<f64>, wall: f64) -> String {
    serde_json::json!({
        "step": step,
        "method": method,
        "lambda": 0.5,
        "reward_mean": reward,
        "accuracy": reward.map(|r| (r + 1.0) / 2.0),
        "sft_loss": 2.0 / step as f64,
        "rl_loss": reward.map(|r| -r),
        "kl": null,
        "coop_gain": if method == "bridge" { Some(0.01) } else { None },
        "response_len": 12.5,
        "step_time_s": 0.5,
        "wall_time_s": wall,
        "eval_accuracy": eval,
        "some_future_field": [1, 2, 3],
    })
    .to_string()
}

fn write_run(dir: &Path, rows: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
}

/// Three runs: bridge seeds 0 and 1 (evaluated every 2 steps), and an
/// rl_zero run that was never evaluated.
fn three_runs(root: &Path) -> Vec<PathBuf> {
    let b0 = root.join("bridge-s0");
    let b1 = root.join("bridge-s1");
    let rz = root.join("rlzero-s0");
    write_run(
        &b0,
        &[
            row(1, "bridge", Some(-0.8), None, 10.0),
            row(2, "bridge", Some(-0.4), Some(0.30), 20.0),
            row(3, "bridge", Some(0.0), None, 30.0),
            row(4, "bridge", Some(0.2), Some(0.70), 40.0),
            row(5, "bridge", Some(0.4), None, 50.0),
            row(6, "bridge", Some(0.5), Some(0.60), 60.0),
        ],
    );
    write_run(
        &b1,
        &[
            row(1, "bridge", Some(-0.6), None, 12.0),
            row(2, "bridge", Some(-0.2), Some(0.40), 24.0),
            row(3, "bridge", Some(0.1), None, 36.0),
            row(4, "bridge", Some(0.3), Some(0.50), 48.0),
            row(5, "bridge", Some(0.5), None, 60.0),
            row(6, "bridge", Some(0.6), Some(0.80), 72.0),
        ],
    );
    write_run(
        &rz,
        &[
            row(1, "rl_zero", Some(-1.0), None, 5.0),
            row(2, "rl_zero", None, None, 10.0),
            row(3, "rl_zero", Some(-0.25), None, 15.5),
        ],
    );
    vec![b0, b1, rz]
}

/// Width and height from a PNG's signature and IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "PNG too short");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

fn table_row<'a>(md: &'a str, first_cell: &str) -> Vec<&'a str> {
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {first_cell} |")))
        .unwrap_or_else(|| panic!("no row for {first_cell} in\n{md}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

#[test]
fn compare_writes_png_and_tables() {
    let root = temp_dir("ok");
    let dirs = three_runs(&root);
    let png = root.join("out").join("compare.png");
    let md_path = root.join("out").join("compare.md");
    let md = compare(&dirs, &png, Some(&md_path)).unwrap_or_else(|e| panic!("{e}"));

    // The PNG exists, is a PNG of the stated size, and decodes.
    let bytes = std::fs::read(&png).expect("PNG written");
    assert_eq!(png_size(&bytes), PNG_SIZE);
    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().expect("PNG header decodes");
    let mut pixels = vec![0; reader.output_buffer_size().expect("PNG buffer size")];
    let info = reader.next_frame(&mut pixels).expect("PNG data decodes");
    assert_eq!((info.width, info.height), PNG_SIZE);
    // Not a blank canvas: the lines' colours are there.
    let coloured = pixels
        .chunks(info.line_size / info.width as usize)
        .filter(|p| p.len() >= 3 && (p[0] != p[1] || p[1] != p[2]))
        .count();
    assert!(coloured > 1000, "only {coloured} coloured pixels");

    // The markdown file holds what was returned.
    assert_eq!(std::fs::read_to_string(&md_path).unwrap(), md);

    // Per-run rows: run, method, steps, final eval, best eval, final reward, wall.
    assert_eq!(
        table_row(&md, "bridge-s0"),
        [
            "bridge-s0",
            "bridge",
            "6",
            "0.600",
            "0.700",
            "0.500",
            "60.0"
        ]
    );
    assert_eq!(
        table_row(&md, "bridge-s1"),
        [
            "bridge-s1",
            "bridge",
            "6",
            "0.800",
            "0.800",
            "0.600",
            "72.0"
        ]
    );
    // Never evaluated; the last step had no rollouts' reward, so the last
    // non-null reward is reported.
    assert_eq!(
        table_row(&md, "rlzero-s0"),
        ["rlzero-s0", "rl_zero", "3", "–", "–", "-0.250", "15.5"]
    );

    // Per-method aggregate: final eval accuracy 0.6 and 0.8 → 0.700 ± 0.141;
    // wall time 60 and 72 → 66.0 ± 8.5 (sample std).
    assert_eq!(
        table_row(&md, "bridge"),
        ["bridge", "2", "0.700 ± 0.141", "66.0 ± 8.5"]
    );
    assert_eq!(table_row(&md, "rl_zero"), ["rl_zero", "1", "–", "15.5 ± –"]);
    assert!(md.contains("mean ± sample standard deviation"), "{md}");
}

#[test]
fn no_aggregate_table_when_every_method_has_one_run() {
    let root = temp_dir("single");
    let dirs = three_runs(&root);
    let md = compare(&dirs[1..], &root.join("c.png"), None).unwrap();
    assert!(md.contains("| bridge-s1 |"));
    assert!(!md.contains("mean ± std"), "{md}");
}

#[test]
fn resumed_run_keeps_the_later_rows() {
    let root = temp_dir("resumed");
    let dir = root.join("bridge-resumed");
    write_run(
        &dir,
        &[
            row(1, "bridge", Some(0.0), None, 1.0),
            row(2, "bridge", Some(0.1), Some(0.9), 2.0),
            row(3, "bridge", Some(0.2), None, 3.0),
            // Resumed from the step-1 checkpoint.
            row(2, "bridge", Some(0.3), Some(0.4), 2.5),
        ],
    );
    let md = compare(&[dir], &root.join("c.png"), None).unwrap();
    assert_eq!(
        table_row(&md, "bridge-resumed"),
        [
            "bridge-resumed",
            "bridge",
            "2",
            "0.400",
            "0.400",
            "0.300",
            "2.5"
        ]
    );
}

#[test]
fn missing_metrics_names_the_folder() {
    let root = temp_dir("missing");
    let mut dirs = three_runs(&root);
    let empty = root.join("not-a-run");
    std::fs::create_dir_all(&empty).unwrap();
    dirs.push(empty.clone());
    let png = root.join("c.png");
    let err = compare(&dirs, &png, None).unwrap_err();
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(!png.exists(), "no figure is written when a run is missing");

    let gone = root.join("does-not-exist");
    let err = compare(std::slice::from_ref(&gone), &png, None).unwrap_err();
    assert!(err.contains(&gone.display().to_string()), "{err}");
}

#[test]
fn corrupt_metrics_names_the_file_and_line() {
    let root = temp_dir("corrupt");
    let dir = root.join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    let good = row(1, "bridge", Some(0.0), None, 1.0);
    std::fs::write(
        dir.join("metrics.jsonl"),
        format!("{good}\n\n{{\"step\": 2, \"method\": \"bri\n"),
    )
    .unwrap();
    let err = compare(std::slice::from_ref(&dir), &root.join("c.png"), None).unwrap_err();
    let file = dir.join("metrics.jsonl").display().to_string();
    assert!(err.contains(&file), "{err}");
    assert!(err.contains("line 3"), "{err}");

    std::fs::write(dir.join("metrics.jsonl"), "\n").unwrap();
    let err = compare(&[dir], &root.join("c.png"), None).unwrap_err();
    assert!(
        err.contains(&file) && err.contains("no metrics rows"),
        "{err}"
    );
}

#[test]
fn no_runs_is_an_error() {
    let root = temp_dir("none");
    assert!(compare(&[], &root.join("c.png"), None).is_err());
}

/// Six methods, three seeds each, one method without rollouts or
/// evaluations: every run gets its row and every method its aggregate, and
/// the figure is a PNG of the stated size. The figure is written to
/// `$COOPC_COMPARE_DEMO` when that variable is set, for looking at it.
#[test]
fn six_methods_of_three_seeds_each_get_every_row_and_a_figure() {
    let root = temp_dir("demo");
    let out = std::env::var_os("COOPC_COMPARE_DEMO")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("demo.png"));
    let methods = [
        "bridge",
        "rl_zero",
        "cold_start",
        "sft",
        "mix",
        "alternating",
    ];
    let mut dirs = Vec::new();
    for (m, method) in methods.iter().enumerate() {
        for seed in 0..3 {
            let dir = root.join(format!("{method}-seed{seed}"));
            let rate = 0.02 + 0.01 * m as f64 + 0.003 * seed as f64;
            let rows: Vec<String> = (1..=120)
                .map(|step| {
                    let t = step as f64;
                    let acc =
                        0.9 * (1.0 - (-rate * t).exp()) + 0.02 * ((t + seed as f64) * 0.7).sin();
                    let rollouts = *method != "sft";
                    let eval = (rollouts && step % 10 == 0).then_some(acc);
                    let reward = rollouts.then_some(2.0 * acc - 1.0);
                    let wall = t * (1.0 + 0.4 * m as f64) + seed as f64;
                    row(step, method, reward, eval, wall)
                })
                .collect();
            write_run(&dir, &rows);
            dirs.push(dir);
        }
    }
    let md = compare(&dirs, &out, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        png_size(&std::fs::read(&out).expect("PNG written")),
        PNG_SIZE
    );
    for method in methods {
        for seed in 0..3 {
            let cells = table_row(&md, &format!("{method}-seed{seed}"));
            assert_eq!(cells[1], method);
            assert_eq!(cells[2], "120");
        }
        // The aggregate row counts three seeds.
        assert_eq!(table_row(&md, method)[1], "3", "{method}");
    }
    // sft never evaluated and had no rollouts.
    let sft = table_row(&md, "sft-seed0");
    assert_eq!((sft[3], sft[5]), ("–", "–"));
}
