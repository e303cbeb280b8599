//! `coopc compare`: reading several runs' metrics, the PNG figure and the
//! markdown summary.

use coopc::cli::compare::{
    bootstrap_mean_ci, clip_polygon, clip_polyline, compare, render, smooth_ema, Band, GroupLine,
    Options, PanelView, Rect, XAxis, YLimit, PNG_SIZE,
};
use std::collections::BTreeMap;
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
        "entropy": reward.map(|r| 1.0 - r),
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
    let md =
        compare(&dirs, &png, Some(&md_path), &Options::default()).unwrap_or_else(|e| panic!("{e}"));

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

    // Per-run rows: run, group, steps, final eval, best eval, late reward
    // and entropy (the last tenth of 6 rewarded steps: the last one), wall.
    assert_eq!(
        table_row(&md, "bridge-s0"),
        [
            "bridge-s0",
            "bridge",
            "6",
            "0.600",
            "0.700",
            "0.500",
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
            "0.400",
            "72.0"
        ]
    );
    // Never evaluated; the last step had no rollouts' reward, so the last
    // rewarded step counts.
    assert_eq!(
        table_row(&md, "rlzero-s0"),
        [
            "rlzero-s0",
            "rl_zero",
            "3",
            "–",
            "–",
            "-0.250",
            "1.250",
            "15.5"
        ]
    );

    // Per-group aggregate: final eval accuracy 0.6 and 0.8 → 0.700 ± 0.141;
    // best 0.7 and 0.8 → 0.750 ± 0.071; late reward 0.5 and 0.6 →
    // 0.550 ± 0.071; late entropy 0.5 and 0.4 → 0.450 ± 0.071; wall time
    // 60 and 72 → 66.0 ± 8.5 (sample std).
    assert_eq!(
        table_row(&md, "bridge"),
        [
            "bridge",
            "2",
            "0.700 ± 0.141",
            "0.750 ± 0.071",
            "0.550 ± 0.071",
            "0.450 ± 0.071",
            "66.0 ± 8.5"
        ]
    );
    assert_eq!(
        table_row(&md, "rl_zero"),
        [
            "rl_zero",
            "1",
            "–",
            "–",
            "-0.250 ± –",
            "1.250 ± –",
            "15.5 ± –"
        ]
    );
    assert!(md.contains("mean ± sample standard deviation"), "{md}");
}

/// The metric `get` of every row of the runs in `dirs`, by step, read
/// straight from their metrics.jsonl.
fn values_by_step(dirs: &[PathBuf], get: &str) -> BTreeMap<usize, Vec<f64>> {
    let mut out: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for d in dirs {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(x) = v[get].as_f64() {
                out.entry(v["step"].as_u64().unwrap() as usize)
                    .or_default()
                    .push(x);
            }
        }
    }
    out
}

/// The line of `group` in a panel.
fn line<'a>(panel: &'a PanelView, group: &str) -> &'a GroupLine {
    panel
        .lines
        .iter()
        .find(|l| l.group == group)
        .unwrap_or_else(|| panic!("no line for {group} in {}", panel.title))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + a.abs().max(b.abs()))
}

/// Without smoothing, each plotted group point is the mean of its runs'
/// metric at that step, and the min–max band spans them exactly.
#[test]
fn plotted_group_means_are_the_metrics_means() {
    let root = temp_dir("means");
    let dirs = three_runs(&root);
    let opts = Options {
        smooth: 0.0,
        ..Options::default()
    };
    let fig = render(&dirs, (900, 600), &opts).unwrap();
    assert_eq!(fig.panels.len(), 4);
    for (panel, field) in [(0, "eval_accuracy"), (2, "reward_mean"), (3, "sft_loss")] {
        let view = &fig.panels[panel];
        let bridge = line(view, "bridge");
        assert_eq!(bridge.runs, 2);
        let expected = values_by_step(&dirs[..2], field);
        let full: Vec<(&usize, &Vec<f64>)> =
            expected.iter().filter(|(_, v)| v.len() == 2).collect();
        assert_eq!(bridge.points.len(), full.len(), "{}", view.title);
        for (p, (step, vals)) in bridge.points.iter().zip(full) {
            assert_eq!(p.step, *step);
            assert_eq!(p.x, *step as f64);
            assert_eq!(p.runs, 2);
            let mean = vals.iter().sum::<f64>() / 2.0;
            assert!(
                close(p.mean, mean),
                "{}: step {step}: {} vs {mean}",
                view.title,
                p.mean
            );
            assert_eq!(p.lo, vals[0].min(vals[1]));
            assert_eq!(p.hi, vals[0].max(vals[1]));
        }
    }
    // The rl_zero run alone: its rewarded steps 1 and 3, as they are.
    let rz = line(&fig.panels[2], "rl_zero");
    let pts: Vec<(usize, f64)> = rz.points.iter().map(|p| (p.step, p.mean)).collect();
    assert_eq!(pts, [(1, -1.0), (3, -0.25)]);
    // The second eval panel is against wall time: x is the runs' mean wall
    // time at the step (20 and 24 s at step 2).
    let b = line(&fig.panels[1], "bridge");
    assert!(close(b.points[0].x, 22.0), "{:?}", b.points[0]);
}

/// ± one standard deviation bands, smoothing, and the x axis by time.
#[test]
fn std_bands_smoothing_and_time_axis() {
    let root = temp_dir("std");
    let dirs = three_runs(&root);
    let opts = Options {
        smooth: 0.5,
        band: Band::Std,
        x: XAxis::Time,
        ..Options::default()
    };
    let fig = render(&dirs, (900, 600), &opts).unwrap();
    let reward = &fig.panels[2];
    assert!(reward.title.contains("wall time"), "{}", reward.title);
    let b = line(reward, "bridge");
    // Each run smoothed first, then averaged.
    let r0 = smooth_ema(&[-0.8, -0.4, 0.0, 0.2, 0.4, 0.5], 0.5);
    let r1 = smooth_ema(&[-0.6, -0.2, 0.1, 0.3, 0.5, 0.6], 0.5);
    for (i, p) in b.points.iter().enumerate() {
        let mean = (r0[i] + r1[i]) / 2.0;
        let sd = ((r0[i] - mean).powi(2) + (r1[i] - mean).powi(2)).sqrt();
        assert!(close(p.mean, mean) && close(p.lo, mean - sd) && close(p.hi, mean + sd));
        // x: the two runs' mean wall time at this step (10·s and 12·s).
        assert!(close(p.x, 11.0 * (i + 1) as f64), "{p:?}");
    }
    // The evaluations are not smoothed.
    let e = line(&fig.panels[0], "bridge");
    assert!(close(e.points[1].mean, 0.6), "{:?}", e.points[1]);
    // The other eval panel is against meta-steps.
    assert!(
        fig.panels[1].title.contains("meta-step"),
        "{}",
        fig.panels[1].title
    );
}

#[test]
fn tensorboard_smoothing_is_the_debiased_ema() {
    // last = 0.5·0 + 0.5·1 = 0.5, debiased by 1 − 0.5 → 1;
    // last = 0.5·0.5 + 0.5·0 = 0.25, debiased by 1 − 0.25 → 1/3;
    // last = 0.125 + 0.5·4 = 2.125, debiased by 1 − 0.125 → 17/7.
    let s = smooth_ema(&[1.0, 0.0, 4.0], 0.5);
    assert!(
        close(s[0], 1.0) && close(s[1], 1.0 / 3.0) && close(s[2], 17.0 / 7.0),
        "{s:?}"
    );
    assert_eq!(smooth_ema(&[3.0, -1.0], 0.0), [3.0, -1.0]);
    // A constant stays constant at any weight (the debiasing at work).
    assert!(smooth_ema(&[2.0; 5], 0.9).iter().all(|&v| close(v, 2.0)));
}

fn is_coloured(px: &[u8]) -> bool {
    px[0] != px[1] || px[1] != px[2]
}

/// With a y range far narrower than the data, the lines are cut at the
/// panel's edges: no coloured pixel of a panel's cell lies outside its
/// plotting area (beyond the 2-pixel half-width of a line on the edge), and
/// the stretches out of range are not drawn along the edges either (bands
/// are cut by `clip_polygon`, tested below).
#[test]
fn lines_are_cut_at_their_panel_edges() {
    let root = temp_dir("clip");
    let dirs = three_runs(&root);
    let opts = Options {
        smooth: 0.0,
        band: Band::None,
        ylim: vec![
            "reward=-0.1:0.1".parse().unwrap(),
            "sft=0.5:0.6".parse().unwrap(),
        ],
        ..Options::default()
    };
    let fig = render(&dirs, (900, 600), &opts).unwrap();
    let w = fig.width as i32;
    let pixel = |x: i32, y: i32| {
        let i = ((y * w + x) * 3) as usize;
        &fig.pixels[i..i + 3]
    };
    for panel in &fig.panels[2..] {
        let fixed = if panel.title.contains("SFT") {
            (0.5, 0.6)
        } else {
            (-0.1, 0.1)
        };
        assert_eq!(panel.y_range, fixed, "{}", panel.title);
        let (px, py) = &panel.plot_area;
        let (cx, cy) = &panel.cell;
        let (mut inside, mut outside) = (0, 0);
        for y in cy.clone() {
            for x in cx.clone() {
                if !is_coloured(pixel(x, y)) {
                    continue;
                }
                let near =
                    x >= px.start - 2 && x < px.end + 2 && y >= py.start - 2 && y < py.end + 2;
                if near {
                    inside += 1;
                } else {
                    outside += 1;
                }
            }
        }
        assert!(
            inside > 50,
            "{}: only {inside} coloured pixels drawn",
            panel.title
        );
        assert_eq!(
            outside, 0,
            "{}: {outside} coloured pixels outside the plotting area",
            panel.title
        );
        // plotters clamps points to the plotting area, which would draw the
        // out-of-range stretches flat along its top and bottom edges; cut
        // at the edges, the lines only cross them.
        let edge_rows = [py.start, py.start + 1, py.end - 2, py.end - 1];
        let on_edges = edge_rows
            .iter()
            .flat_map(|&y| px.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| is_coloured(pixel(x, y)))
            .count();
        assert!(
            on_edges <= 20,
            "{}: {on_edges} coloured pixels along the edges (clamped, not clipped)",
            panel.title
        );
    }
}

#[test]
fn polylines_and_polygons_are_cut_at_the_rectangle() {
    let r = Rect {
        x0: 0.0,
        x1: 10.0,
        y0: 0.0,
        y1: 1.0,
    };
    // Up through the top edge and back down: two stretches.
    let parts = clip_polyline(&[(0.0, 0.5), (2.0, 1.5), (4.0, 0.5), (6.0, 0.25)], r);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(parts[0], [(0.0, 0.5), (1.0, 1.0)]);
    assert_eq!(parts[1], [(3.0, 1.0), (4.0, 0.5), (6.0, 0.25)]);
    // Wholly outside: nothing.
    assert!(clip_polyline(&[(0.0, 2.0), (5.0, 3.0)], r).is_empty());
    // A band [0.5, 2] over x in [0, 10]: cut at y = 1.
    let band = clip_polygon(&[(0.0, 2.0), (10.0, 2.0), (10.0, 0.5), (0.0, 0.5)], r);
    assert!(
        band.iter()
            .all(|&(x, y)| (0.0..=10.0).contains(&x) && (0.0..=1.0).contains(&y)),
        "{band:?}"
    );
    let area: f64 = band
        .iter()
        .zip(band.iter().cycle().skip(1))
        .map(|(a, b)| a.0 * b.1 - b.0 * a.1)
        .sum::<f64>()
        .abs()
        / 2.0;
    assert!(close(area, 5.0), "area {area}");
}

fn write_spec(dir: &Path, hyper: &str) {
    let spec = serde_json::json!({
        "bilevel": { "method": "bridge", "hypergradient": { "kind": hyper } },
        "train": { "seed": 1 },
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
}

#[test]
fn group_by_splits_groups_by_spec_fields() {
    let root = temp_dir("groupby");
    let dirs = three_runs(&root);
    write_spec(&dirs[0], "first_order");
    write_spec(&dirs[1], "truncated");
    write_spec(&dirs[2], "first_order");
    let opts = Options {
        group_by: vec!["bilevel.hypergradient.kind".into()],
        ..Options::default()
    };
    let fig = render(&dirs, (900, 600), &opts).unwrap();
    let groups: Vec<&str> = fig.panels[0]
        .lines
        .iter()
        .map(|l| l.group.as_str())
        .collect();
    assert_eq!(
        groups,
        [
            "bridge, kind=first_order",
            "bridge, kind=truncated",
            "rl_zero, kind=first_order"
        ]
    );
    assert!(fig.panels[0].lines.iter().all(|l| l.runs == 1));
    assert_eq!(
        table_row(&fig.table, "bridge-s1")[1],
        "bridge, kind=truncated"
    );

    // A field no spec has, and a run without spec.json, are named.
    let bad = Options {
        group_by: vec!["bilevel.nope".into()],
        ..Options::default()
    };
    let err = render(&dirs, (900, 600), &bad).err().unwrap();
    assert!(
        err.contains("bilevel.nope") && err.contains("spec.json"),
        "{err}"
    );
    std::fs::remove_file(dirs[2].join("spec.json")).unwrap();
    let err = render(&dirs, (900, 600), &opts).err().unwrap();
    assert!(
        err.contains(&dirs[2].join("spec.json").display().to_string()),
        "{err}"
    );
}

#[test]
fn flops_axis_needs_the_flops_metric() {
    let root = temp_dir("flops");
    let dirs = three_runs(&root);
    let opts = Options {
        x: XAxis::Flops,
        smooth: 0.0,
        ..Options::default()
    };
    let err = render(&dirs, (900, 600), &opts).err().unwrap();
    assert!(err.contains("FLOP") && err.contains("bridge-s0"), "{err}");
    // With a cumulative count of 1e9 per step, x is that count.
    for d in &dirs {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let rows: Vec<String> = text
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["flops"] = serde_json::json!(v["step"].as_f64().unwrap() * 1e9);
                v.to_string()
            })
            .collect();
        write_run(d, &rows);
    }
    let fig = render(&dirs, (900, 600), &opts).unwrap();
    let b = line(&fig.panels[2], "bridge");
    assert!(b.points.iter().all(|p| p.x == p.step as f64 * 1e9));
    assert!(
        fig.panels[2].title.contains("FLOPs"),
        "{}",
        fig.panels[2].title
    );
}

#[test]
fn bad_options_are_named() {
    for (arg, needle) in [
        ("reward", "QUANTITY=LO:HI"),
        ("loss=0:1", "`loss`"),
        ("eval=1:0", "below"),
        ("sft=a:1", "`a`"),
        ("eval=0:inf", "finite"),
    ] {
        let err = arg.parse::<YLimit>().unwrap_err();
        assert!(err.contains(needle), "{arg}: {err}");
    }
    let y: YLimit = "reward=-1:1".parse().unwrap();
    assert_eq!((y.lo, y.hi), (-1.0, 1.0));
    let root = temp_dir("badopts");
    let dirs = three_runs(&root);
    let err = render(
        &dirs,
        (900, 600),
        &Options {
            smooth: 1.0,
            ..Options::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.contains("--smooth"), "{err}");
}

#[test]
fn no_aggregate_table_when_every_method_has_one_run() {
    let root = temp_dir("single");
    let dirs = three_runs(&root);
    let md = compare(&dirs[1..], &root.join("c.png"), None, &Options::default()).unwrap();
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
    let md = compare(&[dir], &root.join("c.png"), None, &Options::default()).unwrap();
    assert_eq!(
        table_row(&md, "bridge-resumed"),
        [
            "bridge-resumed",
            "bridge",
            "2",
            "0.400",
            "0.400",
            "0.300",
            "0.700",
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
    let err = compare(&dirs, &png, None, &Options::default()).unwrap_err();
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(!png.exists(), "no figure is written when a run is missing");

    let gone = root.join("does-not-exist");
    let err = compare(std::slice::from_ref(&gone), &png, None, &Options::default()).unwrap_err();
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
    let err = compare(
        std::slice::from_ref(&dir),
        &root.join("c.png"),
        None,
        &Options::default(),
    )
    .unwrap_err();
    let file = dir.join("metrics.jsonl").display().to_string();
    assert!(err.contains(&file), "{err}");
    assert!(err.contains("line 3"), "{err}");

    std::fs::write(dir.join("metrics.jsonl"), "\n").unwrap();
    let err = compare(&[dir], &root.join("c.png"), None, &Options::default()).unwrap_err();
    assert!(
        err.contains(&file) && err.contains("no metrics rows"),
        "{err}"
    );
}

#[test]
fn no_runs_is_an_error() {
    let root = temp_dir("none");
    assert!(compare(&[], &root.join("c.png"), None, &Options::default()).is_err());
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
    let md = compare(&dirs, &out, None, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
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

/// A run of 6 steps evaluated at steps 2, 4 and 6, `secs` and `gflop` per
/// step, with a spec.json naming its seed.
fn paired_run(dir: &Path, method: &str, seed: u64, evals: [f64; 3], secs: f64, gflop: f64) {
    let rows: Vec<String> = (1..=6)
        .map(|step| {
            let eval = (step % 2 == 0).then(|| evals[step / 2 - 1]);
            let mut r: serde_json::Value =
                serde_json::from_str(&row(step, method, Some(0.0), eval, secs * step as f64))
                    .unwrap();
            r["flops"] = serde_json::json!(gflop * 1e9 * step as f64);
            r.to_string()
        })
        .collect();
    write_run(dir, &rows);
    let spec = serde_json::json!({ "bilevel": { "method": method }, "train": { "seed": seed } });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
}

#[test]
fn paired_differences_at_equal_steps_time_and_flops_with_threshold_times() {
    let root = temp_dir("paired");
    let runs = [
        ("bridge-s1", "bridge", 1, [0.3, 0.7, 0.6], 10.0, 2.0),
        ("bridge-s2", "bridge", 2, [0.4, 0.5, 0.8], 12.0, 2.0),
        ("sft-s1", "sft", 1, [0.2, 0.5, 0.4], 5.0, 1.5),
        ("sft-s2", "sft", 2, [0.1, 0.3, 0.6], 5.0, 1.5),
        // No partner seed: left out of the pairs, kept in the group tables.
        ("sft-s9", "sft", 9, [0.9, 0.9, 0.9], 5.0, 1.5),
    ];
    let dirs: Vec<PathBuf> = runs
        .iter()
        .map(|&(name, method, seed, evals, secs, gflop)| {
            let d = root.join(name);
            paired_run(&d, method, seed, evals, secs, gflop);
            d
        })
        .collect();
    let opts = Options {
        last: 2,
        baseline: Some("bridge".into()),
        threshold: Some(0.5),
        ..Options::default()
    };
    let md = render(&dirs, (900, 600), &opts).unwrap().table;
    // --last 2: the mean of the last two evaluations.
    assert_eq!(table_row(&md, "bridge-s1")[3], "0.650");
    assert_eq!(table_row(&md, "sft-s2")[3], "0.450");
    assert!(md.contains("final eval accuracy (last 2)"), "{md}");
    let paired = &md[md.find("Paired with `bridge`").expect("a paired table")..];
    let sft = table_row(paired, "sft");
    assert_eq!(sft[1], "2", "seeds 1 and 2 pair; seed 9 has no partner");
    // Equal steps: 0.65 − 0.45 on both seeds.
    assert_eq!(sft[2], "+0.200 [+0.200, +0.200]");
    // Equal wall time, read at the sft run's end (30 s): bridge's last
    // evaluation by then is 0.3 (s1, at 20 s) and 0.4 (s2, at 24 s), sft's
    // final ones 0.4 and 0.6: −0.1 and −0.2.
    assert_eq!(sft[3], "-0.150 [-0.200, -0.100]");
    // Equal FLOPs, at sft's 9 GFLOP: bridge at step 4 (8 GFLOP): 0.7 and
    // 0.5, against 0.4 and 0.6: +0.3 and −0.1.
    assert_eq!(sft[4], "+0.100 [-0.100, +0.300]");
    // Read at an end before the baseline's first evaluation, a pair has no
    // difference, and the cell says how many pairs have one.
    // early-s1 ends at 6 s, before bridge-s1's first evaluation (20 s);
    // early-s2 at 30 s, where bridge-s2 has 0.4 (24 s): −0.1.
    let mut with_early = dirs.clone();
    for (seed, secs) in [(1, 1.0), (2, 5.0)] {
        let d = root.join(format!("early-s{seed}"));
        paired_run(&d, "early", seed, [0.5, 0.5, 0.5], secs, 0.1);
        with_early.push(d);
    }
    let md = render(&with_early, (900, 600), &opts).unwrap().table;
    let paired = &md[md.find("Paired with `bridge`").unwrap()..];
    let row = table_row(paired, "early");
    assert_eq!(row[3], "-0.100 [-0.100, -0.100] (1 of 2)");
    // First evaluation at ≥ 0.5: sft at 20 s (s1, 6 GFLOP), 30 s (s2, 9
    // GFLOP) and 10 s (s9, 3 GFLOP); bridge at 40 s and 48 s, both at 8 GFLOP.
    assert_eq!(&sft[5..7], ["20.0 ± 10.0", "6.0 ± 3.0"]);
    let bridge = table_row(paired, "bridge");
    assert_eq!(&bridge[1..6], ["2", "–", "–", "–", "44.0 ± 5.7"]);
    assert_eq!(bridge[6], "8.0 ± 0.0");
    // A baseline that is not a group is named.
    let err = render(
        &dirs,
        (900, 600),
        &Options {
            baseline: Some("mix".into()),
            ..Options::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.contains("--baseline mix") && err.contains("bridge, sft"),
        "{err}"
    );
    for bad in [
        Options {
            last: 0,
            ..Options::default()
        },
        Options {
            threshold: Some(1.5),
            ..Options::default()
        },
    ] {
        assert!(render(&dirs, (900, 600), &bad).is_err());
    }
}

#[test]
fn bootstrap_interval_brackets_the_mean() {
    let (m, lo, hi) = bootstrap_mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    assert_eq!(m, 3.0);
    // The standard error is sqrt(2 · 4/5) / sqrt(5) ≈ 0.63: a 95 % interval
    // of about ±1.2.
    assert!(lo > 1.5 && lo < 2.1 && hi > 3.9 && hi < 4.5, "[{lo}, {hi}]");
    assert_eq!(bootstrap_mean_ci(&[0.25; 4]), Some((0.25, 0.25, 0.25)));
    assert_eq!(bootstrap_mean_ci(&[]), None);
}
