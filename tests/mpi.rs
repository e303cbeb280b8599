//! `mpirun -np 2 coopc run …`: two MPI processes, each with its share of
//! every batch, train what one process trains on the whole batch; a run
//! resumes on another number of processes; a process that dies ends the
//! job with an error naming it instead of a hang. Built with `--features
//! mpi` and run where `mpirun` is on the PATH (`.ci/run` installs Open MPI).
#![cfg(feature = "mpi")]

mod common;

use common::{coopc_ok, tiny_addition_f64, tmpdir};
use coopc_train::checkpoint::load_latest;
use coopc_train::train::{read_metrics, Metrics};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The tiny addition run in f64, its KL term in the reward and its
/// advantages normalised over the whole batch (statistics that span the
/// processes).
fn pipeline_text() -> String {
    tiny_addition_f64().replace(
        "max_new_tokens = 32\n",
        "max_new_tokens = 32\nkl_coef = 0.5\nkl_in_reward = true\nadvantage = \"batch_std\"\n",
    )
}

/// `mpirun` with what Open MPI needs to start more processes than cores,
/// as root in a container.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ]);
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

/// `coopc args` under `mpirun -np np` (alone for 0), which must succeed.
fn coopc_on(np: usize, args: &[&str]) -> Output {
    if np == 0 {
        return coopc_ok(args);
    }
    let out = mpirun(np)
        .arg(env!("CARGO_BIN_EXE_coopc"))
        .args(args)
        .output()
        .expect("start coopc");
    assert!(
        out.status.success(),
        "coopc {args:?} on {np} processes failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn untimed(dir: &Path) -> Vec<Metrics> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(Metrics::without_timing)
        .collect()
}

/// Metrics and final parameters of two runs agree to `tol` (relative, or
/// absolute near 0).
fn assert_close_runs(a: &Path, b: &Path, tol: f64) {
    let (ma, mb) = (untimed(a), untimed(b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        let (x, y) = (
            serde_json::to_value(x).unwrap(),
            serde_json::to_value(y).unwrap(),
        );
        for (k, vx) in x.as_object().unwrap() {
            // Work done differs: each process's programs have their own
            // (half-size) shapes and the sums over processes.
            if k == "flops" {
                continue;
            }
            let vy = &y[k];
            match (vx.as_f64(), vy.as_f64()) {
                (Some(p), Some(q)) => assert!(
                    (p - q).abs() <= tol * p.abs().max(q.abs()).max(1.0),
                    "{k}: {p} and {q}"
                ),
                _ => assert_eq!(vx, vy, "{k}"),
            }
        }
    }
    let (sa, sb) = (load_latest(a).unwrap(), load_latest(b).unwrap());
    assert_eq!(sa.step, sb.step);
    for (name, t) in &sa.tensors {
        let (p, q) = (t.to_f64_vec(), sb.tensors[name].to_f64_vec());
        let diff: f64 = p
            .iter()
            .zip(&q)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = p.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            diff <= tol * norm.max(1e-12),
            "`{name}` differs by {diff:.3e} (norm {norm:.3e})"
        );
    }
}

#[test]
fn two_mpi_processes_train_what_one_process_trains() {
    let dir = tmpdir("equal");
    let p = dir.join("p.toml");
    std::fs::write(&p, pipeline_text()).unwrap();
    let p = p.to_str().unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    let flags = ["-q", "--eval-limit", "4", "--out"];
    let mut a: Vec<&str> = vec!["run", p];
    a.extend(flags);
    coopc_on(0, &[a.as_slice(), &[one.to_str().unwrap()]].concat());
    let out = coopc_on(2, &[a.as_slice(), &[two.to_str().unwrap()]].concat());
    // Rank 0 alone reports.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("held-out accuracy")
            .count(),
        1
    );
    assert_close_runs(&one, &two, 1e-9);
    // Without -q, rank 0 says how the run is split.
    let shown = coopc_on(
        2,
        &[
            "run",
            p,
            "--eval-limit",
            "4",
            "--steps",
            "1",
            "--out",
            dir.join("shown").to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&shown.stderr);
    assert_eq!(
        err.matches("data parallel over 2 processes (mpi), each with 1/2 of every batch")
            .count(),
        1,
        "{err}"
    );
    // Commands other than `run` are one process's work: under the launcher
    // rank 0 does it alone, as one process would.
    let eval = ["eval", one.to_str().unwrap(), "--eval-limit", "4"];
    let (e1, e2) = (coopc_on(0, &eval), coopc_on(2, &eval));
    assert!(String::from_utf8_lossy(&e1.stdout).contains("held-out accuracy"));
    assert_eq!(
        String::from_utf8_lossy(&e1.stdout),
        String::from_utf8_lossy(&e2.stdout)
    );
    // A run started on two processes resumes on one, and on two again.
    let three = dir.join("three");
    let t = three.to_str().unwrap();
    coopc_on(2, &[a.as_slice(), &[t, "--stop-after", "2"]].concat());
    assert_eq!(load_latest(&three).unwrap().step, 2);
    coopc_on(
        0,
        &[
            "run",
            "--resume",
            t,
            "-q",
            "--eval-limit",
            "4",
            "--stop-after",
            "3",
        ],
    );
    coopc_on(2, &["run", "--resume", t, "-q", "--eval-limit", "4"]);
    assert_close_runs(&one, &three, 1e-9);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn batches_that_do_not_split_over_the_processes_are_refused() {
    let dir = tmpdir("split");
    let p = dir.join("p.toml");
    std::fs::write(
        &p,
        pipeline_text().replace("batch_size = 2", "batch_size = 3"),
    )
    .unwrap();
    let out = mpirun(2)
        .arg(env!("CARGO_BIN_EXE_coopc"))
        .args(["run", p.to_str().unwrap(), "-q", "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sft.batch_size is 3 rows") && err.contains("2 processes"),
        "{err}"
    );
}

/// The process of rank `rank` among the children of `launcher`.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        let ours = env
            .split('\0')
            .any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}"))
            && env.split('\0').any(|v| v == "COOPC_MPI_TEST=1");
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if ours && exe.ends_with("coopc") && pid != launcher {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_process_that_dies_ends_the_job_with_an_error_naming_it() {
    let dir = tmpdir("dies");
    let p = dir.join("p.toml");
    std::fs::write(&p, pipeline_text().replace("steps = 4", "steps = 100000")).unwrap();
    let mut child = mpirun(2)
        .env("COOPC_MPI_TEST", "1")
        .arg(env!("CARGO_BIN_EXE_coopc"))
        .args([
            "run",
            p.to_str().unwrap(),
            "-q",
            "--eval-limit",
            "1",
            "--out",
        ])
        .arg(dir.join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (rank 0 has written a metrics row).
    let t0 = Instant::now();
    let metrics = dir.join("run").join("metrics.jsonl");
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(child.id(), 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the other process hung after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rank 1") || text.contains(&format!("PID {pid}")),
        "the launcher's message does not name the process:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
