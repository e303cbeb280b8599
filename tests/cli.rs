//! The command line end to end: `compile` → plan file → `inspect`, a
//! refused corrupt plan, and `grad` on the tiny example (outputs, values
//! against the in-process lowering, and errors for bad inputs).

mod common;

use common::*;
use coopc_compiler::frontend::load_pipeline;
use coopc_compiler::ir::{to_text, DType};
use coopc_compiler::lowering::{lower_meta_step, BatchShapes};
use coopc_compiler::plan::Plan;
use coopc_runtime::safetensors_io::{read_tensors, write_tensors};
use coopc_runtime::{execute, HostTensor};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[test]
fn compile_writes_a_plan_that_reads_back_identically_and_inspects() {
    let dir = tmpdir("plan");
    let plan_path = dir.join("tiny.plan");
    let out = coopc(&[
        "compile",
        example("tiny.toml").to_str().unwrap(),
        "-o",
        plan_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = Plan::read(&plan_path).expect("plan reads back");
    // Same schedule and graphs as compiling again in process.
    let (source, spec) = load_pipeline(&example("tiny.toml")).unwrap();
    plan.check_fresh(&source).expect("fresh");
    let again = coopc_compiler::plan::pipeline_hash(&source);
    assert_eq!(plan.pipeline_hash, again);
    let meta = plan.meta_step();
    let shapes = BatchShapes::from_spec(&spec);
    let mut g = lower_meta_step(&spec, shapes).graph;
    coopc_compiler::passes::Pipeline::standard().run(&mut g);
    assert_eq!(to_text(&meta.graph), to_text(&g));
    assert_eq!(meta.schedule, coopc_compiler::schedule::schedule(&g).order);

    let out = coopc(&["inspect", plan_path.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("meta_step") && text.contains("logprobs"),
        "{text}"
    );

    // One flipped byte in the payload: refused, exit 2, never a panic.
    let mut bytes = std::fs::read(&plan_path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    let bad = dir.join("bad.plan");
    std::fs::write(&bad, &bytes).unwrap();
    let out = coopc(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.plan"), "{err}");
    // Truncated.
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = coopc(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

/// Output into a closed pipe (`coopc compile … | head -1`) ends the
/// process without a panic.
#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    let dir = tmpdir("pipe");
    let plan = dir.join("a.plan");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coopc"))
        .args(["compile", example("addition.toml").to_str().unwrap(), "-o"])
        .arg(&plan)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run coopc");
    // Close the reading end before coopc writes its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for coopc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_plan_whose_pipeline_changed_is_refused_as_stale() {
    let dir = tmpdir("stale");
    let pipeline = dir.join("p.toml");
    std::fs::copy(example("tiny.toml"), &pipeline).unwrap();
    let plan_path = dir.join("p.plan");
    let out = coopc(&[
        "compile",
        pipeline.to_str().unwrap(),
        "-o",
        plan_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Plan::load(&plan_path).expect("fresh plan loads");
    let text = std::fs::read_to_string(&pipeline).unwrap();
    std::fs::write(&pipeline, text.replace("lr = 0.1", "lr = 0.2")).unwrap();
    let err = Plan::load(&plan_path)
        .expect_err("stale plan refused")
        .to_string();
    assert!(err.contains("stale") && err.contains("p.toml"), "{err}");
    let out = coopc(&["inspect", plan_path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHANGED since compile"));
    // Once the pipeline file is gone the plan stands alone.
    std::fs::remove_file(&pipeline).unwrap();
    Plan::load(&plan_path).expect("self-contained plan loads");
}

#[test]
fn compile_of_the_addition_example_succeeds() {
    let out = coopc(&["compile", example("addition.toml").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("meta_step"));
}

/// Random θ, w and a K-step batch for the tiny example, written to files.
fn grad_inputs(dir: &Path, seed: u64) -> (PathBuf, PathBuf, HashMap<String, HostTensor>) {
    let (_, spec) = load_pipeline(&example("tiny.toml")).unwrap();
    let shapes = BatchShapes::from_spec(&spec);
    let ms = lower_meta_step(&spec, shapes);
    let mut r = rng(seed);
    let mut params = BTreeMap::new();
    for (n, s) in ms.theta.iter().chain(&ms.lora) {
        let k: usize = s.iter().product();
        params.insert(n.clone(), f64_tensor(s, &uniform(&mut r, k, -0.5, 0.5)));
    }
    let (bs, br, t) = (shapes.sft_batch, shapes.rl_batch, shapes.seq_len);
    let v = spec.model.vocab_size;
    let ids = |r: &mut rand::rngs::StdRng, b: usize| {
        let x: Vec<f64> = (0..b * t).map(|_| r.gen_range(0..v) as f64).collect();
        HostTensor::from_f64(DType::I32, vec![b, t], &x).unwrap()
    };
    let mask = |b: usize| {
        let x: Vec<f64> = (0..b * t)
            .map(|i| if i % t >= t / 2 { 1.0 } else { 0.0 })
            .collect();
        f64_tensor(&[b, t], &x)
    };
    let mut batch = BTreeMap::new();
    batch.insert("sft.input_ids".to_string(), ids(&mut r, bs));
    batch.insert("sft.loss_mask".to_string(), mask(bs));
    batch.insert("rl.input_ids".to_string(), ids(&mut r, br));
    batch.insert("rl.loss_mask".to_string(), mask(br));
    batch.insert(
        "rl.advantages".to_string(),
        f64_tensor(&[br], &away_from_zero(&mut r, br, 0.5, 1.0)),
    );
    batch.insert(
        "rl.old_logprobs".to_string(),
        f64_tensor(&[br, t], &uniform(&mut r, br * t, -3.0, -2.0)),
    );
    let p = dir.join("params.safetensors");
    let b = dir.join("batch.safetensors");
    write_tensors(&p, &params).unwrap();
    write_tensors(&b, &batch).unwrap();
    // The same inputs as the meta-step graph names them.
    let mut inputs: HashMap<String, HostTensor> = params.clone().into_iter().collect();
    for (n, _) in &ms.theta {
        inputs.insert(format!("shadow.{n}"), params[n].clone());
    }
    for k in 0..spec.bilevel.hypergradient.unroll {
        for (n, x) in &batch {
            inputs.insert(format!("step{k}.{n}"), x.clone());
        }
    }
    (p, b, inputs)
}

#[test]
fn grad_writes_every_documented_output_and_matches_the_lowering() {
    let dir = tmpdir("grad");
    let (p, b, mut inputs) = grad_inputs(&dir, 7);
    let g_path = dir.join("g.safetensors");
    let out = coopc(&[
        "grad",
        example("tiny.toml").to_str().unwrap(),
        "--params",
        p.to_str().unwrap(),
        "--batch",
        b.to_str().unwrap(),
        "--out",
        g_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = read_tensors(&g_path).unwrap();
    let (_, spec) = load_pipeline(&example("tiny.toml")).unwrap();
    let ms = lower_meta_step(&spec, BatchShapes::from_spec(&spec));
    for (n, _) in &ms.theta {
        assert!(got.contains_key(&format!("lower.{n}")), "lower.{n}");
        assert!(got.contains_key(&format!("theta_K.{n}")), "theta_K.{n}");
    }
    for (n, _) in &ms.lora {
        assert!(got.contains_key(&format!("hyper.{n}")), "hyper.{n}");
    }
    for k in ["loss.sft", "loss.rl", "loss.up"] {
        assert!(got[k].shape.is_empty(), "{k} is a scalar");
    }
    // Same numbers as running the lowered graph directly (fresh optimiser state).
    inputs.insert("lambda".into(), f64_tensor(&[], &[spec.lambda_at(0)]));
    for id in ms.graph.node_ids() {
        if let coopc_compiler::ir::Op::Input { name, ty } = ms.graph.op(id) {
            if name.starts_with("opt.") {
                inputs.insert(name.clone(), HostTensor::zeros(ty));
            }
        }
    }
    let want: HashMap<String, HostTensor> =
        execute(&ms.graph, &inputs).unwrap().into_iter().collect();
    for (name, t) in &got {
        let e = rel_err(&t.to_f64_vec(), &want[name].to_f64_vec(), 1e-12);
        assert!(e < 1e-10, "{name}: rel err {e:e}");
    }
}

#[test]
fn init_writes_params_and_a_batch_that_grad_accepts() {
    let dir = tmpdir("init");
    let (p, b, g) = (
        dir.join("p.safetensors"),
        dir.join("b.safetensors"),
        dir.join("g.safetensors"),
    );
    let s = |x: &PathBuf| x.to_str().unwrap().to_string();
    let tiny = s(&example("tiny.toml"));
    let out = coopc(&[
        "init",
        &tiny,
        "--params",
        &s(&p),
        "--batch",
        &s(&b),
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = coopc(&[
        "grad",
        &tiny,
        "--params",
        &s(&p),
        "--batch",
        &s(&b),
        "--out",
        &s(&g),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = read_tensors(&g).unwrap();
    // π_old is the initial policy, so every ratio is 1 and the loss is −mean A·mask.
    let lsft = got["loss.sft"].to_f64_vec()[0];
    assert!(lsft.is_finite() && lsft > 0.0);
    let hyper_norm: f64 = got
        .iter()
        .filter(|(n, _)| n.starts_with("hyper."))
        .flat_map(|(_, t)| t.to_f64_vec())
        .map(|x| x * x)
        .sum();
    assert!(
        hyper_norm > 0.0,
        "B = 0 at init, but A's gradient through B's update is not"
    );
}

#[test]
fn grad_refuses_bad_inputs_with_exit_2_and_a_named_problem() {
    let dir = tmpdir("grad-bad");
    let (p, b, _) = grad_inputs(&dir, 8);
    let run = |params: &Path, batch: &Path| {
        coopc(&[
            "grad",
            example("tiny.toml").to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
            "--batch",
            batch.to_str().unwrap(),
            "--out",
            dir.join("g.safetensors").to_str().unwrap(),
        ])
    };
    // A missing parameter tensor is named.
    let mut params = read_tensors(&p).unwrap();
    params.remove("model.norm.weight");
    let p2 = dir.join("p2.safetensors");
    write_tensors(&p2, &params).unwrap();
    let out = run(&p2, &b);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.norm.weight"));
    // A loss mask that selects position 0.
    let mut batch = read_tensors(&b).unwrap();
    let m = batch.get_mut("sft.loss_mask").unwrap();
    let mut v = m.to_f64_vec();
    v[0] = 1.0;
    *m = f64_tensor(&m.shape.clone(), &v);
    let b2 = dir.join("b2.safetensors");
    write_tensors(&b2, &batch).unwrap();
    let out = run(&p, &b2);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sft.loss_mask"));
    // A missing file.
    let out = run(&dir.join("nope.safetensors"), &b);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.safetensors"));
}

/// Runs coopc with `env` set and the launchers' variables of the test's own
/// environment removed.
fn coopc_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coopc"));
    for var in [
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "PMIX_RANK",
        "COOPC_NCCL_RENDEZVOUS",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run coopc")
}

/// A run started through an NCCL rendezvous file without MPI: a missing
/// rank, a rank outside the world, or (on a machine without NCCL) the
/// missing library, each stop it with exit status 2 and a message naming
/// the problem and the file, before anything is written.
#[test]
fn an_nccl_rendezvous_that_cannot_start_says_why() {
    let dir = tmpdir("nccl-rendezvous");
    let id = dir.join("nccl-id");
    let id_s = id.to_str().unwrap();
    let pipeline = example("addition.toml");
    let out = dir.join("run");
    let args = [
        "run",
        pipeline.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("COOPC_NCCL_RENDEZVOUS", id_s)],
            "set RANK and WORLD_SIZE",
        ),
        (
            vec![
                ("COOPC_NCCL_RENDEZVOUS", id_s),
                ("RANK", "3"),
                ("WORLD_SIZE", "2"),
            ],
            "RANK = 3 is not a rank of WORLD_SIZE = 2",
        ),
        (
            vec![("COOPC_NCCL_RENDEZVOUS", id_s), ("SLURM_PROCID", "1")],
            "SLURM_PROCID is set but SLURM_NTASKS is not",
        ),
        (
            vec![
                ("COOPC_NCCL_RENDEZVOUS", id_s),
                ("RANK", "x"),
                ("WORLD_SIZE", "2"),
            ],
            "RANK = \"x\" is not a number",
        ),
    ];
    let mut cases = cases;
    if !coopc_kernels::nccl::nccl_present() {
        cases.push((
            vec![
                ("COOPC_NCCL_RENDEZVOUS", id_s),
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
            ],
            "libnccl.so.2",
        ));
    }
    for (env, want) in cases {
        let o = coopc_env(&args, &env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{env:?}: {err}");
        assert!(err.contains(want), "{env:?}: expected {want:?} in: {err}");
        assert!(
            err.contains(id_s),
            "{env:?}: the message names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!id.exists() && !out.exists(), "{env:?}: nothing is written");
    }
}

/// A bf16 run trains on the CPU executor (which emulates bf16): its first
/// SFT loss is within bf16 rounding of the f32 run's and not equal to it,
/// every metric is finite, and its checkpoint holds f32 master weights.
/// On wgpu (lavapipe here) the same run's first SFT loss is the CPU's to
/// within the device's other summation order, far nearer than f32's; and
/// its device kernels are emitted, with the rounding in them.
#[test]
fn a_bf16_run_trains_on_the_cpu_and_on_the_device() {
    let dir = tmpdir("bf16-run");
    let losses = |dtype: &str, backend: &str| {
        let pipeline = dir.join(format!("{dtype}.toml"));
        std::fs::write(
            &pipeline,
            format!("{TINY_ADDITION}[backend]\ndtype = \"{dtype}\"\n"),
        )
        .unwrap();
        let out = dir.join(format!("run-{dtype}-{backend}"));
        let o = coopc_ok(&[
            "run",
            pipeline.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 4, "{dtype}: {text}");
        for r in &rows {
            for key in ["sft_loss", "rl_loss", "entropy", "reward_mean"] {
                let v = r[key].as_f64().unwrap_or(f64::NAN);
                assert!(v.is_finite(), "{dtype}: {key} = {v} in {r}");
            }
        }
        (String::from_utf8_lossy(&o.stderr).into_owned(), rows, out)
    };
    let (_, f32_rows, _) = losses("f32", "cpu");
    let (stderr, bf16_rows, out) = losses("bf16", "cpu");
    assert!(stderr.contains("(bf16, f32 master weights)"), "{stderr}");
    let first = |rows: &[serde_json::Value]| rows[0]["sft_loss"].as_f64().unwrap();
    let (a, b) = (first(&bf16_rows), first(&f32_rows));
    assert!(
        a != b && (a - b).abs() < 2e-2 * b,
        "first SFT loss: bf16 {a}, f32 {b}"
    );
    // The checkpoint's θ is f32.
    let ckpt = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("model.safetensors").exists())
        .expect("a checkpoint folder with model.safetensors");
    let theta = read_tensors(&ckpt.join("model.safetensors")).unwrap();
    assert!(!theta.is_empty());
    assert!(theta.values().all(|t| t.dtype() == DType::F32));

    let pipeline = dir.join("bf16.toml");
    let emitted = dir.join("kernels");
    coopc_ok(&[
        "compile",
        pipeline.to_str().unwrap(),
        "--emit",
        "kernels",
        emitted.to_str().unwrap(),
    ]);
    // The rounding to bf16 adds 0x7fff (32767) and sets the quiet-NaN bit
    // (0x400000, 4194304) of the f32 bits, in both languages.
    let rounding = |ext: &str| {
        files_under(&emitted)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .filter(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                text.contains("32767") && text.contains("4194304")
            })
            .count()
    };
    let (cu, wgsl) = (rounding("cu"), rounding("wgsl"));
    assert!(
        cu >= 2 && cu == wgsl,
        "kernels that round to bf16: {cu} CUDA, {wgsl} WGSL"
    );

    if !wgpu_present() {
        return;
    }
    let (stderr, wgpu_rows, _) = losses("bf16", "wgpu");
    assert!(stderr.contains("backend wgpu (bf16"), "{stderr}");
    let (c, w) = (first(&bf16_rows), first(&wgpu_rows));
    assert!(
        (c - w).abs() < 0.25 * (a - b).abs(),
        "first SFT loss: wgpu bf16 {w}, cpu bf16 {c}, cpu f32 {b}"
    );
}
