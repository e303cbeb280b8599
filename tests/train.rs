//! The training loop end to end through `coopc run`: every method on a tiny
//! addition model, bit-exact resume, and a non-finite loss stopping the run
//! with the last good checkpoint kept.

use coopc_train::checkpoint::load_latest;
use coopc_train::train::{read_metrics, Metrics};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{coopc, coopc_ok as run, tmpdir, wgpu_present, TINY_ADDITION as TINY};

fn pipeline(dir: &Path, text: &str) -> String {
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A run's metrics without what may differ between a resumed and an
/// uninterrupted run ([`Metrics::without_timing`]).
fn untimed_metrics(dir: &Path) -> Vec<Metrics> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(Metrics::without_timing)
        .collect()
}

#[test]
fn every_method_trains_end_to_end() {
    let dir = tmpdir("methods");
    let p = pipeline(&dir, TINY);
    for method in [
        "bridge",
        "rl_zero",
        "sft",
        "cold_start",
        "mix",
        "alternating",
    ] {
        let out = dir.join(method);
        run(&[
            "run",
            &p,
            "--method",
            method,
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--eval-limit",
            "4",
        ]);
        let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
        assert_eq!(m.len(), 4, "{method}: one metrics line per meta-step");
        for (i, row) in m.iter().enumerate() {
            assert_eq!(row.step, i);
            assert_eq!(row.method, method);
            // A step without signal computes no SFT loss.
            assert!(
                row.sft_loss.is_finite() != row.no_signal,
                "{method}: {row:?}"
            );
        }
        assert!(
            m[1].eval_accuracy.is_some() && m[3].eval_accuracy.is_some(),
            "{method}: evals at 2 and 4"
        );
        let lam: Vec<f64> = m.iter().map(|r| r.lambda).collect();
        match method {
            "sft" => {
                assert!(lam.iter().all(|&l| l == 0.0) && m.iter().all(|r| r.reward_mean.is_none()))
            }
            "rl_zero" => {
                assert!(lam.iter().all(|&l| l == 1.0) && m.iter().all(|r| r.reward_mean.is_some()))
            }
            "cold_start" => assert_eq!(lam, vec![0.0, 0.0, 1.0, 1.0]),
            "alternating" => assert_eq!(lam, vec![0.0, 1.0, 0.0, 1.0]),
            "bridge" => assert!(m.iter().all(|r| r.coop_gain.is_some())),
            _ => {}
        }
        assert_flops_counted(&p, method, &m);
        assert_eq!(load_latest(&out).unwrap().step, 4);
        // `coopc eval` reads the run folder.
        let e = run(&["eval", out.to_str().unwrap(), "--eval-limit", "4"]);
        assert!(String::from_utf8_lossy(&e.stdout).contains("held-out accuracy"));
    }
}

/// The `flops` metric is the cumulative plan count of what training ran:
/// for `sft` (no rollouts) exactly one meta-step program per step; for
/// `rl_zero` at least that, one log-prob scoring call per unrolled batch
/// and the LoRA merge before sampling, plus the decode steps.
fn assert_flops_counted(pipeline: &str, method: &str, m: &[Metrics]) {
    use coopc_compiler::spec::Method;
    use coopc_ir::cost::program_flops;
    let (_, mut spec) =
        coopc_compiler::frontend::load_pipeline_with(Path::new(pipeline), &Default::default())
            .unwrap();
    let kind = match method {
        "sft" => Method::Sft,
        "rl_zero" => Method::RlZero,
        _ => {
            let f: Vec<f64> = m.iter().map(|r| r.flops.expect("flops recorded")).collect();
            assert!(
                f.windows(2).all(|w| w[1] > w[0]) && f[0] > 0.0,
                "{method}: {f:?}"
            );
            return;
        }
    };
    spec.bilevel.method = kind;
    let plan = coopc_compiler::compile(spec.clone());
    let cost = |p: &coopc_ir::plan::Program| program_flops(&p.graph, &p.schedule) as f64;
    let meta = cost(plan.meta_step());
    let mut prev = 0.0;
    for row in m {
        let step = row.flops.expect("flops recorded") - prev;
        prev = row.flops.unwrap();
        if kind == Method::Sft {
            assert_eq!(step, meta, "sft: step {}", row.step);
        } else {
            let k = spec.bilevel.hypergradient.unroll.max(1) as f64;
            let merge = plan.lora_merge().map_or(0.0, cost);
            // A step without signal runs no meta-step program.
            let meta = if row.no_signal { 0.0 } else { meta };
            let least = meta + k * (cost(plan.logprobs()) + merge);
            assert!(
                step >= least + cost(plan.decode_step()),
                "rl_zero: step {}: {step} < {least} + a decode step",
                row.step
            );
        }
    }
}

/// RL alone from a random policy: no rollout is ever correct, every reward
/// is the same, so every advantage is 0. With `rl.skip_no_signal` (the
/// default) such a step changes nothing — θ, w and the optimiser state
/// (AdamW's step count included) stay the initial ones; without it, AdamW
/// counts the steps and weight decay moves θ.
#[test]
fn a_step_without_signal_changes_nothing() {
    use coopc_train::train::{RunOptions, Trainer};
    let dir = tmpdir("nosignal");
    let text = TINY.replace(
        "[optim.lower]\nkind = \"adamw\"",
        "[optim.lower]\nkind = \"adamw\"\nweight_decay = 0.1",
    );
    assert!(text.contains("weight_decay"));
    let p = pipeline(&dir, &text);
    let (_, mut spec) =
        coopc_compiler::frontend::load_pipeline_with(Path::new(&p), &Default::default()).unwrap();
    spec.bilevel.method = coopc_compiler::spec::Method::RlZero;
    let initial = Trainer::new(
        coopc_compiler::compile(spec),
        RunOptions {
            out_dir: dir.join("unused"),
            resume: false,
            progress: false,
            eval_limit: 0,
            stop_after: None,
        },
    )
    .unwrap()
    .state()
    .unwrap();
    let train = |name: &str, extra: &str| {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let p = pipeline(
            &dir.join(name),
            &text.replace("[rl]\n", &format!("[rl]\n{extra}")),
        );
        let out = dir.join(name).join("run");
        run(&[
            "run",
            &p,
            "--method",
            "rl_zero",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--eval-limit",
            "2",
        ]);
        let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
        (m, load_latest(&out).unwrap())
    };
    let (m, state) = train("skip", "");
    assert!(
        m.iter().all(|r| r.no_signal && r.accuracy == Some(0.0)),
        "{m:?}"
    );
    assert_eq!(state.step, 3);
    assert_eq!(state.tensors, initial.tensors, "nothing moved");

    let (m, state) = train("noskip", "skip_no_signal = false\n");
    assert!(
        m.iter().all(|r| !r.no_signal && r.sft_loss.is_finite()),
        "{m:?}"
    );
    let moved: Vec<&String> = state
        .tensors
        .iter()
        .filter(|(name, t)| initial.tensors.get(*name) != Some(*t))
        .map(|(name, _)| name)
        .collect();
    assert!(moved.iter().any(|n| n.contains("step")), "{moved:?}");
    assert!(moved.iter().any(|n| !n.starts_with("opt.")), "{moved:?}");
}

/// A scheduled, clipped run: each step's metrics carry the lower
/// learning rate its schedule gives and both levels' gradient norms; the
/// run resumes bit-exactly (the multipliers are a function of the step).
#[test]
fn scheduled_and_clipped_training_reports_its_rates_and_norms() {
    use coopc_compiler::spec::{LrSchedule, ScheduleKind};
    let dir = tmpdir("schedule");
    let text = TINY.replace(
        "[optim.lower]\nkind = \"adamw\"\nlr = 1e-2\n",
        "[optim.lower]\nkind = \"adamw\"\nlr = 1e-2\nschedule = \"cosine\"\nwarmup_steps = 1\nmax_grad_norm = 0.5\n[optim.upper]\nschedule = \"linear\"\nmax_grad_norm = 0.1\n",
    );
    assert!(text.contains("cosine"));
    let p = pipeline(&dir, &text);
    let out = dir.join("run");
    let args = |o: &Path| {
        vec![
            "run".to_string(),
            p.clone(),
            "--out".into(),
            o.to_str().unwrap().into(),
            "--quiet".into(),
            "--eval-limit".into(),
            "2".into(),
        ]
    };
    let a = args(&out);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let m = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let sched = LrSchedule {
        kind: ScheduleKind::Cosine,
        warmup_steps: 1,
    };
    for r in &m {
        let want = 1e-2 * sched.scale(r.step, 4);
        assert!((r.lr.unwrap() - want).abs() < 1e-15, "{r:?}");
        assert!(
            r.grad_norm_lower.unwrap() > 0.0 && r.grad_norm_upper.unwrap() > 0.0,
            "{r:?}"
        );
    }
    assert_eq!(m[0].lr, Some(0.0), "warm-up starts at 0");
    // Stopped after 2 steps and resumed: the same metrics and state.
    let part = dir.join("part");
    let mut b = args(&part);
    b.extend(["--stop-after".into(), "2".into()]);
    run(&b.iter().map(String::as_str).collect::<Vec<_>>());
    run(&[
        "run",
        "--resume",
        part.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "2",
    ]);
    assert_eq!(untimed_metrics(&out), untimed_metrics(&part));
    assert_eq!(load_latest(&out).unwrap(), load_latest(&part).unwrap());
}

#[test]
fn a_steps_override_keeps_the_default_cold_start_switch_half_way() {
    let dir = tmpdir("cold");
    let p = pipeline(&dir, &TINY.replace("cold_start_steps = 2\n", ""));
    let out = dir.join("run");
    run(&[
        "run",
        &p,
        "--method",
        "cold_start",
        "--steps",
        "6",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "2",
    ]);
    let lam: Vec<f64> = read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| m.lambda)
        .collect();
    assert_eq!(lam, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_exactly() {
    let dir = tmpdir("resume");
    let p = pipeline(&dir, TINY);
    let (full, part) = (dir.join("full"), dir.join("part"));
    run(&[
        "run",
        &p,
        "--out",
        full.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "4",
    ]);
    // Stopped after 3 steps (between checkpoints), then resumed.
    run(&[
        "run",
        &p,
        "--out",
        part.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "4",
        "--stop-after",
        "3",
    ]);
    assert_eq!(read_metrics(&part.join("metrics.jsonl")).unwrap().len(), 3);
    run(&[
        "run",
        "--resume",
        part.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "4",
    ]);
    assert_eq!(untimed_metrics(&full), untimed_metrics(&part));
    let (a, b) = (load_latest(&full).unwrap(), load_latest(&part).unwrap());
    assert_eq!(a.step, 4);
    assert_eq!(a, b, "weights and optimiser state are bit-identical");

    // TensorBoard's copy of the resumed run: one event file, the format's
    // first event, then one event per step holding that step's metrics.
    let files: Vec<PathBuf> = std::fs::read_dir(&part)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = coopc_train::tensorboard::read_events(&files[0]).unwrap();
    assert_eq!(events[0].2.as_deref(), Some("brain.Event:2"));
    let rows = read_metrics(&part.join("metrics.jsonl")).unwrap();
    assert_eq!(events.len(), 1 + rows.len());
    for (e, m) in events[1..].iter().zip(&rows) {
        assert_eq!(e.1, Some(m.step as i64));
        let value = |tag: &str| e.3.iter().find(|(t, _)| t == tag).map(|&(_, v)| v);
        assert_eq!(
            value("loss/sft"),
            Some(m.sft_loss as f32),
            "step {}",
            m.step
        );
        assert_eq!(value("bilevel/lambda"), Some(m.lambda as f32));
        assert_eq!(value("eval/accuracy"), m.eval_accuracy.map(|a| a as f32));
        let gflops = m.flops.expect("flops recorded") / 1e9;
        assert_eq!(value("compute/gflops"), Some(gflops as f32));
    }
}

/// A run of [`TINY`] in `DIR/run` stopped after 2 of its 4 meta-steps.
fn two_of_four_steps(name: &str) -> PathBuf {
    let dir = tmpdir(name);
    let p = pipeline(&dir, TINY);
    let out_dir = dir.join("run");
    let o = out_dir.to_str().unwrap();
    run(&[
        "run",
        &p,
        "--out",
        o,
        "--quiet",
        "--eval-limit",
        "2",
        "--stop-after",
        "2",
    ]);
    out_dir
}

/// Edits the specification a run was started with, as if it had always
/// been so: in the run folder's spec.json and in its latest checkpoint's
/// (whose checksum in meta.txt follows), so that a resume accepts it.
fn rewrite_history(out_dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let ckpt = coopc_train::checkpoint::latest_dir(out_dir).unwrap();
    for path in [out_dir.join("spec.json"), ckpt.join("spec.json")] {
        let mut spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut spec);
        std::fs::write(&path, spec.to_string()).unwrap();
    }
    let sum = coopc_compiler::ir::file::sha256_file(&ckpt.join("spec.json")).unwrap();
    let meta_path = ckpt.join("meta.txt");
    let meta: String = std::fs::read_to_string(&meta_path)
        .unwrap()
        .lines()
        .map(|l| match l.strip_suffix(" spec.json") {
            Some(_) => format!("sha256 {sum} spec.json\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&meta_path, meta).unwrap();
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let out_dir = two_of_four_steps("nan");
    let o = out_dir.to_str().unwrap();
    let before = load_latest(&out_dir).unwrap();
    // The run diverges from here on: an absurd learning rate in its specification.
    rewrite_history(&out_dir, |spec| {
        assert_eq!(spec["optim"]["lower"]["lr"], serde_json::json!(0.01));
        spec["optim"]["lower"]["lr"] = serde_json::json!(1e30);
    });
    let out = coopc(&["run", "--resume", o, "--quiet", "--eval-limit", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("meta-step") && err.contains("last good checkpoint, after meta-step 2"),
        "{err}"
    );
    assert_eq!(
        load_latest(&out_dir).unwrap(),
        before,
        "the last good checkpoint is untouched"
    );
    assert_eq!(
        read_metrics(&out_dir.join("metrics.jsonl")).unwrap().len(),
        2,
        "no metrics line for the failed step"
    );
}

/// JSON has no NaN: serde writes a NaN metric as `null`. Every row the
/// trainer writes must read back — `--resume` reads and rewrites
/// metrics.jsonl, and `coopc compare` reads the same rows.
#[test]
fn a_null_loss_in_the_metrics_stops_neither_resume_nor_compare() {
    let out_dir = two_of_four_steps("null-loss");
    let dir = out_dir.parent().unwrap();
    let o = out_dir.to_str().unwrap();
    // A NaN SFT loss, as serde_json writes it.
    let metrics = out_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let first = text.lines().next().unwrap();
    let mut row: serde_json::Value = serde_json::from_str(first).unwrap();
    let nan = Metrics {
        sft_loss: f64::NAN,
        ..serde_json::from_value(row.clone()).unwrap()
    };
    assert_eq!(
        serde_json::to_value(&nan).unwrap()["sft_loss"],
        serde_json::Value::Null
    );
    row["sft_loss"] = serde_json::Value::Null;
    std::fs::write(&metrics, text.replacen(first, &row.to_string(), 1)).unwrap();

    run(&["run", "--resume", o, "--quiet", "--eval-limit", "2"]);
    let rows = read_metrics(&metrics).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows[0].sft_loss.is_nan());
    assert!(rows[1..].iter().all(|m| m.sft_loss.is_finite()));
    let png = dir.join("c.png");
    run(&["compare", o, "--png", png.to_str().unwrap()]);
    assert!(png.exists());
}

/// The whole loop (sampling, scoring, meta-step, evaluation) on the GPU
/// path — wgpu through lavapipe here, CUDA with `COOPC_TEST_CUDA=1`. The
/// first meta-step starts from the same state, so it gives the CPU run's
/// metrics: the same rollouts (sampling draws from the same seeds over
/// logits equal to f32 rounding) and losses within f32 noise. Later steps
/// start from parameters that differ by rounding, which AdamW (lr 1e-2)
/// and sampling amplify, so they are only checked to run and stay finite.
#[test]
fn training_on_the_device_matches_the_cpu() {
    let cuda = std::env::var("COOPC_TEST_CUDA").is_ok_and(|v| v == "1");
    if !cuda && !wgpu_present() {
        return;
    }
    let dir = tmpdir("device");
    let p = pipeline(&dir, TINY);
    let device = if std::env::var("COOPC_TEST_CUDA").is_ok_and(|v| v == "1") {
        "cuda"
    } else {
        "wgpu"
    };
    let mut runs = vec![];
    for backend in ["cpu", device] {
        let out = dir.join(backend);
        let o = out.to_str().unwrap();
        run(&[
            "run",
            &p,
            "--steps",
            "2",
            "--backend",
            backend,
            "--out",
            o,
            "-q",
            "--eval-limit",
            "4",
        ]);
        runs.push(read_metrics(&out.join("metrics.jsonl")).unwrap());
    }
    let (cpu, dev) = (&runs[0], &runs[1]);
    assert_eq!(cpu.len(), 2);
    assert_eq!(cpu.len(), dev.len());
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0);
    let (c, d) = (&cpu[0], &dev[0]);
    assert_eq!(c.reward_mean, d.reward_mean, "same rollouts");
    assert_eq!(c.response_len, d.response_len);
    assert!(
        close(c.sft_loss, d.sft_loss),
        "sft {} vs {}",
        c.sft_loss,
        d.sft_loss
    );
    let (cr, dr) = (c.rl_loss.unwrap(), d.rl_loss.unwrap());
    assert!(close(cr, dr), "rl {cr} vs {dr}");
    let (cg, dg) = (c.coop_gain.unwrap(), d.coop_gain.unwrap());
    assert!(close(cg, dg), "gain {cg} vs {dg}");
    for m in dev {
        assert!(
            m.sft_loss.is_finite() && m.rl_loss.unwrap().is_finite(),
            "step {}",
            m.step
        );
    }
    assert!(
        dev.last().unwrap().eval_accuracy.is_some(),
        "evaluated on the device"
    );
    // The run folder is checkpointed as on the CPU.
    assert!(dir.join(device).join("checkpoints/latest").exists());
    // The state stays on the device: after the first meta-step (which
    // uploads θ, w, shadow and the AdamW moments once), a step moves only
    // its batches and per decoded token the ids and draws up, the chosen
    // tokens and the losses down — far less than the state it updates,
    // which a host round trip would copy both ways (and the logits, which
    // host sampling would read back).
    let state = load_latest(&dir.join(device)).unwrap();
    let state_bytes: u64 = state.tensors.values().map(|t| 4 * t.numel() as u64).sum();
    assert!(c.bytes_to_device.is_none() && c.bytes_from_device.is_none());
    let (up0, up1) = (d.bytes_to_device.unwrap(), dev[1].bytes_to_device.unwrap());
    let down1 = dev[1].bytes_from_device.unwrap();
    assert!(
        up0 > state_bytes,
        "step 0 uploads the state: {up0} of {state_bytes} bytes"
    );
    assert!(
        up1 < state_bytes / 4 && down1 < state_bytes / 20,
        "step 1 moved {up1} bytes up and {down1} down; the state is {state_bytes} bytes"
    );
}

#[test]
fn an_f64_pipeline_on_a_gpu_backend_is_refused_clearly() {
    let dir = tmpdir("device-f64");
    let p = pipeline(&dir, &format!("{TINY}\n[backend]\ndtype = \"f64\"\n"));
    let out = coopc(&["run", &p, "--backend", "wgpu", "--steps", "1", "-q"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("computes in f32") && err.contains("backend.dtype"),
        "{err}"
    );
}

/// Rows of `DIR/metrics.jsonl` written so far (0 while it does not exist).
fn rows_written(dir: &Path) -> usize {
    read_metrics(&dir.join("metrics.jsonl")).map_or(0, |m| m.len())
}

/// SIGINT and SIGTERM stop a run after the meta-step it is in, with a
/// checkpoint of exactly the steps its metrics record, exit 130 and 143,
/// and a message saying how to continue; the run then resumes.
#[cfg(unix)]
#[test]
fn a_signal_stops_the_run_after_its_meta_step_with_a_checkpoint() {
    let dir = tmpdir("signal");
    let p = pipeline(&dir, &TINY.replace("steps = 4", "steps = 1000"));
    let out_dir = dir.join("run");
    let o = out_dir.to_str().unwrap();
    let mut expected_code = 130;
    for (signal, args) in [
        (libc::SIGINT, vec!["run", &p, "--out", o]),
        (libc::SIGTERM, vec!["run", "--resume", o]),
    ] {
        let before = rows_written(&out_dir);
        let child = Command::new(env!("CARGO_BIN_EXE_coopc"))
            .args(&args)
            .args(["--quiet", "--eval-limit", "2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while rows_written(&out_dir) < before + 1 {
            assert!(t0.elapsed().as_secs() < 300, "no meta-step finished");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(expected_code), "{err}");
        let rows = rows_written(&out_dir);
        let name = if signal == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        assert!(
            err.contains(&format!("interrupted by {name} after meta-step {rows}"))
                && err.contains("--resume"),
            "{err}"
        );
        assert_eq!(load_latest(&out_dir).unwrap().step, rows);
        expected_code = 143;
    }
}

/// `kill -9` at random moments of short runs (while sampling, stepping,
/// evaluating, or writing metrics or a checkpoint): each run, resumed from
/// what the kill left (or restarted, when no checkpoint was written yet),
/// ends bit-equal to the run that was never interrupted.
#[cfg(unix)]
#[test]
fn a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result() {
    use rand::{Rng, SeedableRng};
    let dir = tmpdir("kill9");
    let p = pipeline(&dir, TINY);
    let full = dir.join("full");
    let args = |out: &Path, resume: bool| -> Vec<String> {
        let o = out.to_str().unwrap().to_string();
        let mut a: Vec<String> = if resume {
            vec!["run".into(), "--resume".into(), o]
        } else {
            vec!["run".into(), p.clone(), "--out".into(), o]
        };
        a.extend(["--quiet", "--eval-limit", "2"].map(String::from));
        a
    };
    let t0 = std::time::Instant::now();
    let a: Vec<String> = args(&full, false);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let whole = t0.elapsed();
    let expected = load_latest(&full).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for trial in 0..5 {
        let out = dir.join(format!("killed-{trial}"));
        let at = whole.mul_f64(rng.gen_range(0.05..0.95));
        let mut child = Command::new(env!("CARGO_BIN_EXE_coopc"))
            .args(args(&out, false))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        let resume = load_latest(&out).is_ok();
        let a = args(&out, resume);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            load_latest(&out).unwrap(),
            expected,
            "killed after {at:?} (resumed: {resume})"
        );
        assert_eq!(untimed_metrics(&out), untimed_metrics(&full));
    }
}

/// A checkpoint write that fails (here: files may not grow past 32 KiB,
/// as on a full disk; the state file needs 69 KB) stops the run with exit 1
/// and a message naming the file and the cause; the previous checkpoint
/// stays current and loadable, and no partial folder is left.
#[cfg(unix)]
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    use std::os::unix::process::CommandExt;
    let out_dir = two_of_four_steps("disk-full");
    let before = load_latest(&out_dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coopc"));
    cmd.args(["run", "--resume", out_dir.to_str().unwrap()])
        .args(["--quiet", "--eval-limit", "2"]);
    // SAFETY: setrlimit and signal are async-signal-safe, as pre_exec needs.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 32 << 10,
                rlim_max: 32 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("state.safetensors")
            && err.contains("too large")
            && err.contains("last good checkpoint, after meta-step 2"),
        "{err}"
    );
    assert_eq!(load_latest(&out_dir).unwrap(), before);
    let left: Vec<String> = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        left.iter().all(|n| n == "latest" || n == "step-2"),
        "{left:?}"
    );
    // With room again, the run resumes from the kept checkpoint.
    run(&[
        "run",
        "--resume",
        out_dir.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "2",
    ]);
    assert_eq!(load_latest(&out_dir).unwrap().step, 4);
}

/// `train.on_nonfinite = "skip_step"`: a meta-step whose update is not
/// finite is discarded (the state stays bit-equal to what it was) and
/// recorded; `max_nonfinite_in_row` such steps in a row stop the run.
#[test]
fn skip_step_discards_non_finite_updates_and_stops_after_too_many_in_a_row() {
    for (max_in_row, completes) in [(3, true), (2, false)] {
        let out_dir = two_of_four_steps(&format!("skip-{max_in_row}"));
        let o = out_dir.to_str().unwrap();
        let before = load_latest(&out_dir).unwrap();
        // An update that overflows: a learning rate past f32's range.
        rewrite_history(&out_dir, |spec| {
            spec["optim"]["lower"]["lr"] = serde_json::json!(1e39);
            spec["train"]["on_nonfinite"] = serde_json::json!("skip_step");
            spec["train"]["max_nonfinite_in_row"] = serde_json::json!(max_in_row);
        });
        let out = coopc(&["run", "--resume", o, "--quiet", "--eval-limit", "2"]);
        let err = String::from_utf8_lossy(&out.stderr);
        let rows = read_metrics(&out_dir.join("metrics.jsonl")).unwrap();
        if completes {
            assert!(out.status.success(), "{err}");
            assert_eq!(rows.len(), 4);
            assert!(rows[2].skipped_nonfinite && rows[3].skipped_nonfinite);
            assert!(rows[..2].iter().all(|m| !m.skipped_nonfinite));
            let after = load_latest(&out_dir).unwrap();
            assert_eq!(after.step, 4);
            assert_eq!(
                after.tensors, before.tensors,
                "skipped updates change nothing"
            );
        } else {
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(
                err.contains("2 meta-steps in a row") && err.contains("after meta-step 2"),
                "{err}"
            );
            assert_eq!(rows.len(), 3, "the first skipped step is recorded");
            assert!(rows[2].skipped_nonfinite);
        }
    }
}

/// A resume whose specification differs from the checkpoint's is refused
/// with the keys that changed; `--force` accepts changes of how long and
/// where the run goes, never of what a meta-step computes.
#[test]
fn a_resume_with_a_changed_specification_is_refused_with_the_keys_that_changed() {
    let out_dir = two_of_four_steps("changed");
    let dir = out_dir.parent().unwrap();
    let o = out_dir.to_str().unwrap();
    let before = load_latest(&out_dir).unwrap();
    let changed = pipeline(
        dir,
        &TINY
            .replace("eval_every = 2", "eval_every = 1")
            .replace("lr = 1e-2", "lr = 2e-2"),
    );
    let args = ["--quiet", "--eval-limit", "2"];
    for force in [false, true] {
        let mut a = vec!["run", changed.as_str(), "--resume", o];
        a.extend(args);
        if force {
            a.push("--force");
        }
        let out = coopc(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("train.eval_every: 2 → 1") && err.contains("optim.lower.lr: 0.01 → 0.02"),
            "{err}"
        );
        assert!(
            err.contains("`optim.lower.lr` changes what a meta-step computes"),
            "{err}"
        );
        assert!(err.contains("--model") && err.contains("step-2"), "{err}");
    }
    // Changed in safe keys only: refused without --force, accepted with it.
    let safe = pipeline(
        dir,
        &TINY
            .replace("eval_every = 2", "eval_every = 1")
            .replace("steps = 4", "steps = 5"),
    );
    let mut a = vec!["run", safe.as_str(), "--resume", o];
    a.extend(args);
    let out = coopc(&a);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("train.steps: 4 → 5") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(load_latest(&out_dir).unwrap(), before, "nothing ran");
    a.push("--force");
    run(&a);
    let rows = read_metrics(&out_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 5);
    assert!(
        rows[2..].iter().all(|m| m.eval_accuracy.is_some()),
        "eval every step now"
    );
    // The same pipeline again is no change; neither is --steps on the command line.
    run(&[
        "run",
        &safe,
        "--resume",
        o,
        "--steps",
        "6",
        "--quiet",
        "--eval-limit",
        "2",
    ]);
    assert_eq!(load_latest(&out_dir).unwrap().step, 6);
}

/// A device failure mid-run — here an out-of-memory, injected on wgpu by a
/// device memory limit below what the programs need — stops the run with
/// exit 1 and a message naming the backend, the program, the kernel and
/// the bytes it asked for; the last checkpoint is kept.
#[test]
fn a_device_out_of_memory_names_program_kernel_and_bytes_and_keeps_the_checkpoint() {
    if !wgpu_present() {
        return;
    }
    let out_dir = two_of_four_steps("device-oom");
    let o = out_dir.to_str().unwrap();
    let before = load_latest(&out_dir).unwrap();
    let resume = |limit: &str| {
        Command::new(env!("CARGO_BIN_EXE_coopc"))
            .args(["run", "--resume", o, "--backend", "wgpu", "--quiet"])
            .args(["--eval-limit", "2"])
            .env("COOPC_DEVICE_MEMORY_LIMIT", limit)
            .output()
            .unwrap()
    };
    let out = resume("64KiB");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("wgpu backend, program `")
            && err.contains("out of device memory at kernel")
            && err.contains("bytes")
            && err.contains("over the limit of 65536 bytes")
            && err.contains("last good checkpoint, after meta-step 2"),
        "{err}"
    );
    assert_eq!(load_latest(&out_dir).unwrap(), before);
    // A limit that does not parse is bad input, named.
    let out = resume("lots");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("COOPC_DEVICE_MEMORY_LIMIT"), "{err}");
}

/// Every `rl.advantage` against its definition, computed here directly:
/// GRPO's group z-score, Dr. GRPO's group-mean baseline, TRL's batch-scaled
/// one and RLOO's leave-one-out baseline.
#[test]
fn each_advantage_kind_computes_its_definition() {
    use coopc_compiler::spec::Advantage;
    use coopc_train::train::advantages;
    let rewards = [1.0, 0.0, 0.0, -0.5, 1.0, 1.0, 1.0, 0.0];
    let g = 4;
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let std = |xs: &[f64]| {
        let m = mean(xs);
        (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    let mut seen = Vec::new();
    for kind in [
        Advantage::GroupStd,
        Advantage::GroupMean,
        Advantage::BatchStd,
        Advantage::Rloo,
    ] {
        let got = advantages(&rewards, g, kind);
        let expected: Vec<f64> = (0..rewards.len())
            .map(|i| {
                let grp = &rewards[i / g * g..i / g * g + g];
                let r = rewards[i];
                match kind {
                    Advantage::GroupStd => (r - mean(grp)) / (std(grp) + 1e-6),
                    Advantage::GroupMean => r - mean(grp),
                    Advantage::BatchStd => (r - mean(grp)) / (std(&rewards) + 1e-6),
                    Advantage::Rloo => {
                        let others: Vec<f64> = (0..g)
                            .filter(|&j| i / g * g + j != i)
                            .map(|j| grp[j])
                            .collect();
                        r - mean(&others)
                    }
                }
            })
            .collect();
        assert!(close(&got, &expected), "{kind:?}: {got:?} vs {expected:?}");
        assert!(
            !seen.iter().any(|s: &Vec<f64>| close(s, &got)),
            "{kind:?} equals another kind"
        );
        seen.push(got);
    }
}

/// `rl.mask_truncated`: a completion that did not stop carries no loss
/// (its row's loss length is 0); one that stopped keeps all of its tokens
/// and its advantage. Where none stopped, the rows keep their tokens (a
/// loss over no token is 0/0) and lose their advantages instead.
#[test]
fn mask_truncated_takes_the_loss_off_completions_that_did_not_stop() {
    use coopc_train::train::mask_truncated;
    let row = |len| (vec![1, 5, 6, 7, 8], 2, len);
    let mut rows = vec![row(3), row(3), row(2)];
    let mut adv = vec![0.5, -0.5, 1.0];
    mask_truncated(&mut rows, &mut adv, &[true, false, false]);
    assert_eq!(rows.iter().map(|r| r.2).collect::<Vec<_>>(), [3, 0, 0]);
    assert_eq!(adv, [0.5, -0.5, 1.0]);
    let mut rows = vec![row(3), row(3)];
    let mut adv = vec![0.5, -0.5];
    mask_truncated(&mut rows, &mut adv, &[false, false]);
    assert_eq!(rows.iter().map(|r| r.2).collect::<Vec<_>>(), [3, 3]);
    assert_eq!(adv, [0.0, 0.0]);
}

/// `rl.kl_in_reward`: each completion's reward loses β times its summed
/// per-token estimate, weighted by the mask, with the chosen estimator.
#[test]
fn kl_in_the_reward_subtracts_the_summed_estimate() {
    use coopc_compiler::spec::KlEstimator;
    use coopc_train::train::kl_penalty;
    // Two rows of three tokens; κ = ref − old = ln 2 on row 0's tokens 1
    // and 2 (the second with weight 0.5), −1 on row 1's token 2.
    let old = [0.0, -1.0, -2.0, 0.0, 0.0, -1.0];
    let l2 = 2f64.ln();
    let reference = [5.0, -1.0 + l2, -2.0 + l2, 5.0, 5.0, -2.0];
    let mask = [0.0, 1.0, 0.5, 0.0, 0.0, 1.0];
    for (est, row0, row1) in [
        (KlEstimator::K1, -1.5 * l2, 1.0),
        (KlEstimator::K2, 1.5 * l2 * l2 / 2.0, 0.5),
        (
            KlEstimator::K3,
            1.5 * (2.0 - l2 - 1.0),
            (-1.0f64).exp() + 1.0 - 1.0,
        ),
    ] {
        let mut rewards = [1.0, -1.0];
        kl_penalty(&mut rewards, &old, &reference, &mask, 0.1, est);
        let want = [1.0 - 0.1 * row0, -1.0 - 0.1 * row1];
        for (a, b) in rewards.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{est:?}: {rewards:?} vs {want:?}");
        }
    }
}

/// The policy loss options together (CISPO, GSPO's ratio, Dr. GRPO's
/// normaliser, the k2 estimator with the penalty in the reward, top-k
/// sampling, two epochs of two mini-batches per rollout batch) compile
/// and train: the plan has no reference log-prob input (the loss has no KL
/// term), the KL metric is still measured, and every loss is finite.
#[test]
fn policy_loss_options_train_end_to_end() {
    let dir = tmpdir("policy-loss");
    let text = TINY
        .replace(
            "max_new_tokens = 32",
            "max_new_tokens = 32\nloss = \"cispo\"\nratio_level = \"sequence\"\n\
             loss_agg = \"seq_mean_token_sum_norm\"\nkl_coef = 0.05\nkl_estimator = \"k2\"\n\
             kl_in_reward = true\ntop_k = 5\nupdates_per_batch = 2\nmini_batches = 2",
        )
        .replace("steps = 4", "steps = 2");
    let p = pipeline(&dir, &text);
    let plan = dir.join("p.plan");
    run(&["compile", &p, "-o", plan.to_str().unwrap()]);
    let shown = coopc(&["inspect", plan.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(
            "rl loss        cispo · sequence ratio · clip [0.8, 1.28] · \
             seq_mean_token_sum_norm (/ 32) · KL k2 × 0.05 in the reward · \
             2 epochs × 2 mini-batches per rollout batch · \
             advantage group_std · temperature 1, top_k 5"
        ),
        "{shown}"
    );
    let loaded = coopc_ir::plan::Plan::read(&plan).unwrap();
    let inputs: Vec<&str> = loaded
        .programs
        .iter()
        .flat_map(|p| p.signature.inputs.iter().map(|i| i.name.as_str()))
        .collect();
    assert!(
        inputs.iter().any(|n| n.contains("old_logprobs")),
        "{inputs:?}"
    );
    assert!(
        !inputs.iter().any(|n| n.contains("ref_logprobs")),
        "{inputs:?}"
    );
    let out = dir.join("run");
    run(&["run", &p, "--out", out.to_str().unwrap(), "--quiet"]);
    let rows = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 2);
    for m in &rows {
        assert!(m.kl.is_some(), "{m:?}");
        assert!(m.rl_loss.is_some_and(f64::is_finite), "{m:?}");
    }
}

/// `rl.kl_in_reward`, `rl.top_k` and `rl.entropy_coef` reach the trainer:
/// against the same run without them, the penalty changes the advantages
/// once the policy has moved from the reference (so the RL loss of step 1),
/// `top_k = 1` changes what is sampled (each group's completions all
/// alike), and the bonus takes the entropy off the RL loss.
#[test]
fn kl_in_the_reward_top_k_and_the_entropy_bonus_change_the_run() {
    let dir = tmpdir("kl-reward");
    let run_with = |name: &str, keys: &str| {
        let text = TINY
            .replace(
                "max_new_tokens = 32",
                &format!("max_new_tokens = 32\n{keys}"),
            )
            .replace("steps = 4", "steps = 2");
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let p = pipeline(&dir.join(name), &text);
        let out = dir.join(name).join("run");
        run(&["run", &p, "--out", out.to_str().unwrap(), "--quiet"]);
        read_metrics(&out.join("metrics.jsonl")).unwrap()
    };
    let plain = run_with("plain", "");
    let penalised = run_with("penalised", "kl_coef = 0.5\nkl_in_reward = true");
    let greedy = run_with("top1", "top_k = 1");
    let bonus = run_with("bonus", "entropy_coef = 0.5");
    assert_eq!(
        plain[0].rl_loss, penalised[0].rl_loss,
        "π = π_ref at step 0"
    );
    assert_ne!(plain[1].rl_loss, penalised[1].rl_loss);
    assert!(
        penalised[1].kl.is_some_and(|k| k > 0.0),
        "{:?}",
        penalised[1]
    );
    assert_ne!(
        (plain[0].response_len, plain[1].response_len),
        (greedy[0].response_len, greedy[1].response_len)
    );
    // The sampling policy's entropy over the task's 24 tokens: at most
    // ln 24, and the tiny random policy is far from peaked.
    let ln_v = 24f64.ln();
    for m in plain.iter().chain(&bonus) {
        let e = m.entropy.expect("an entropy on steps with rollouts");
        assert!(e > 1.0 && e <= ln_v + 1e-5, "step {}: entropy {e}", m.step);
    }
    // Same rollouts at step 0: the bonus takes 0.5 × the first lower
    // step's token-mean entropy (in (0, ln 24]) off the RL loss.
    assert_eq!(plain[0].entropy, bonus[0].entropy);
    let taken = plain[0].rl_loss.unwrap() - bonus[0].rl_loss.unwrap();
    assert!(taken > 0.5 && taken <= 0.5 * ln_v + 1e-5, "{taken}");
}

/// `rl.dynamic_sampling`: groups whose rewards are all equal are dropped
/// and more prompts sampled, up to `max_sampling_rounds` batches per lower
/// step; the metrics count both. The tiny random policy's completions are
/// all unreadable (one reward), so every group is dropped and every lower
/// step samples its cap; the truncated fraction is recorded either way.
#[test]
fn dynamic_sampling_resamples_groups_without_signal_up_to_its_cap() {
    let dir = tmpdir("dynamic");
    let text = TINY
        .replace(
            "max_new_tokens = 32",
            "max_new_tokens = 32\ndynamic_sampling = true\nmax_sampling_rounds = 3",
        )
        .replace("steps = 4", "steps = 2")
        .replace(
            "seed = 5",
            "seed = 5\neval_samples = 3\neval_temperature = 0.7",
        );
    let p = pipeline(&dir, &text);
    let out = dir.join("run");
    run(&[
        "run",
        &p,
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "2",
    ]);
    let rows = read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 2);
    let (k, prompts, max_rounds) = (2, 2, 3);
    for m in &rows {
        let rounds = m
            .sampling_rounds
            .expect("dynamic sampling counts its batches");
        let dropped = m.dropped_groups.expect("and the groups it dropped");
        assert!((k..=k * max_rounds).contains(&rounds), "{m:?}");
        assert!(dropped <= rounds * prompts, "{m:?}");
        if m.reward_mean == Some(-1.0) {
            // Every completion unreadable: nothing kept, every cap reached.
            assert_eq!(
                (rounds, dropped),
                (k * max_rounds, k * max_rounds * prompts)
            );
        }
        assert!(m.truncated.is_some_and(|t| (0.0..=1.0).contains(&t)));
        // train.eval_samples: sampled accuracy beside greedy, at evaluations.
        let sampled = [m.eval_pass_at_1, m.eval_pass_at_k, m.eval_maj_at_k];
        if m.eval_accuracy.is_some() {
            let [p1, pk, maj] = sampled.map(|x| x.expect("sampled accuracy at evaluations"));
            assert!(p1 <= pk && maj <= pk, "{m:?}");
        } else {
            assert_eq!(sampled, [None; 3]);
        }
    }
    // Without it, neither count is written.
    let plain = dir.join("plain");
    let p2 = pipeline(&dir, TINY);
    run(&[
        "run",
        &p2,
        "--out",
        plain.to_str().unwrap(),
        "--quiet",
        "--eval-limit",
        "2",
        "--stop-after",
        "1",
    ]);
    let m = &read_metrics(&plain.join("metrics.jsonl")).unwrap()[0];
    assert_eq!((m.sampling_rounds, m.dropped_groups), (None, None));
}

/// pass@k and maj@k judge a problem's sampled answers: the count correct,
/// whether any is, and whether the most frequent readable answer is (ties
/// to the first seen; unreadable answers do not vote; `jsonl` compares
/// answers by value).
#[test]
fn majority_voting_counts_answers_by_value() {
    use coopc_compiler::spec::TaskSpec;
    use coopc_train::tasks::{build_task, Problem};
    use coopc_train::train::{vote, Vote};
    let (_, spec) = coopc_compiler::frontend::load_pipeline(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/addition.toml"
    )))
    .unwrap();
    let addition = build_task(&spec.task, spec.train.seq_len).unwrap();
    let p = Problem {
        prompt: "12+30=".into(),
        answer: "42".into(),
    };
    let s = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let v = |task: &dyn coopc_train::tasks::Task, p: &Problem, xs: &[&str]| vote(task, p, &s(xs));
    assert_eq!(
        v(addition.as_ref(), &p, &["#42", "#41", "#41", "junk"]),
        Vote {
            correct: 1,
            any_correct: true,
            majority_correct: false
        }
    );
    assert_eq!(
        v(addition.as_ref(), &p, &["#41", "#42", "#42", "x", "y", "z"]),
        Vote {
            correct: 2,
            any_correct: true,
            majority_correct: true
        }
    );
    // A tie goes to the answer seen first; nothing readable votes for nothing.
    assert!(v(addition.as_ref(), &p, &["#42", "#41"]).majority_correct);
    assert!(!v(addition.as_ref(), &p, &["#41", "#42"]).majority_correct);
    assert_eq!(
        v(addition.as_ref(), &p, &["a", "b"]),
        Vote {
            correct: 0,
            any_correct: false,
            majority_correct: false
        }
    );
    // jsonl: "1,000" and "1000" are one vote.
    let dir = tmpdir("vote");
    let data = dir.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"q\", \"response\": \"1000\", \"answer\": \"1000\"}\n",
    )
    .unwrap();
    let jsonl = TaskSpec {
        kind: coopc_compiler::spec::TaskKind::Jsonl,
        sft_file: Some(data.display().to_string()),
        rl_file: Some(data.display().to_string()),
        ..spec.task.clone()
    };
    let task = build_task(&jsonl, 64).unwrap();
    let q = Problem {
        prompt: "q".into(),
        answer: "1000".into(),
    };
    let w = v(
        task.as_ref(),
        &q,
        &[
            "The answer is 7",
            "The answer is 1,000",
            "The answer is 1000",
        ],
    );
    assert!(w.majority_correct && w.correct == 2, "{w:?}");
}
