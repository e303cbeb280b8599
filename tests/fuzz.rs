//! Fuzzing what coopc reads from users and from disk: pipelines, Hugging
//! Face model folders (config.json, tokenizer files), plan files,
//! safetensors files and JSONL data. Each target mutates real inputs (the
//! shipped examples and fixtures) — byte flips, cut and repeated stretches,
//! invalid UTF-8, and mutations that know the format: deleted, duplicated,
//! renamed and retyped keys, huge, negative and non-finite numbers, deep
//! nesting, very long strings — and checks that the reader returns
//! (accepts, or refuses with a message naming the problem) without a panic,
//! an abort or an allocation sized by the input, within a time bound.
//!
//! Every target runs for a share of `COOPC_FUZZ_SECONDS` (default 30, so CI
//! runs a short budget) from `COOPC_FUZZ_SEED` (default 0; the seed and
//! each target's case count are printed). An input that fails is written
//! to `$CARGO_TARGET_TMPDIR/fuzz-findings/` and named in the failure.
//! `scripts/fuzz.sh MINUTES` runs longer, from a fresh seed.

use coopc_compiler::frontend::{load_pipeline, parse_pipeline_with, Options};
use coopc_compiler::plan::Plan;
use coopc_runtime::safetensors_io::{read_tensors, write_tensors};
use coopc_runtime::HostTensor;
use coopc_train::tasks::tokenizer::HfTokenizer;
use coopc_train::tasks::JsonlTask;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest one input may take to be read and refused or accepted, in
/// CPU time of the thread reading it (wall time would count the time other
/// processes of a busy machine take).
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// CPU time of the calling thread.
#[cfg(unix)]
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(unix))]
fn thread_cpu_time() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Targets sharing the time budget.
const TARGETS: u32 = 6;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn budget() -> Duration {
    let total: f64 = std::env::var("COOPC_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    Duration::from_secs_f64(total / TARGETS as f64)
}

fn seed(target: &str) -> u64 {
    let base: u64 = std::env::var("COOPC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    target
        .bytes()
        .fold(base, |h, b| h.wrapping_mul(0x100_0000_01b3) ^ b as u64)
}

/// A folder of this target's own for the files a case needs.
fn scratch(target: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `check` on inputs from `generate` until the target's share of the
/// budget is spent. `check` returns Err for a property it found broken; a
/// panic, an error or a case over [`CASE_LIMIT`] fails the test, with the
/// input saved.
fn fuzz(
    target: &str,
    mut generate: impl FnMut(&mut StdRng) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
) {
    let seed = seed(target);
    let mut rng = StdRng::seed_from_u64(seed);
    let share = budget();
    let t0 = Instant::now();
    let mut cases = 0u64;
    // At least a few cases, however small the budget.
    while cases < 8 || t0.elapsed() < share {
        let input = generate(&mut rng);
        let start = thread_cpu_time();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = thread_cpu_time().saturating_sub(start);
        let problem = match outcome {
            Ok(Ok(())) if took <= CASE_LIMIT => None,
            Ok(Ok(())) => Some(format!("took {took:?} (limit {CASE_LIMIT:?})")),
            Ok(Err(e)) => Some(e),
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(problem) = problem {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{target}-seed{seed}-case{cases}"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{target}: case {cases} (seed {seed}): {problem}; input saved to {}",
                path.display()
            );
        }
        cases += 1;
    }
    eprintln!(
        "fuzz {target}: {cases} cases in {:.1?} (seed {seed})",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------- mutators

/// Values that break assumptions, in TOML.
const TOML_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "-0.0",
    "2",
    "3.5",
    "1e308",
    "-1e308",
    "5e-324",
    "nan",
    "inf",
    "-inf",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967297",
    "1000000000000",
    "\"\"",
    "\"x\"",
    "\"../../../etc/passwd\"",
    "\"\\u0000\"",
    "true",
    "false",
    "[]",
    "[1, 2]",
    "[\"q_proj\", \"q_proj\"]",
    "{}",
    "{ start = 0.5 }",
    "{ kind = \"truncated\", unroll = 1000000 }",
    "1979-05-27T07:32:00Z",
    "0x7fffffff",
];

/// Values that break assumptions, in JSON.
fn json_values(rng: &mut StdRng) -> Json {
    let pick = rng.gen_range(0..20);
    match pick {
        0 => Json::Null,
        1 => Json::from(-1),
        2 => Json::from(0),
        3 => Json::from(1e300),
        4 => Json::from(u64::MAX),
        5 => Json::from(i64::MIN),
        6 => Json::from(1_000_000_000_000u64),
        7 => Json::from(""),
        8 => Json::from("x".repeat(rng.gen_range(1..100_000))),
        9 => Json::from(true),
        10 => Json::Array(vec![]),
        11 => Json::Object(Default::default()),
        12 => {
            let depth = [10, 100, 127, 1000][rng.gen_range(0..4)];
            let mut v = Json::from(1);
            for _ in 0..depth {
                v = Json::Array(vec![v]);
            }
            v
        }
        13 => Json::from(0.5),
        14 => Json::from(2),
        15 => Json::from(4294967296u64),
        16 => Json::from("<|endoftext|>"),
        17 => Json::Array(vec![Json::from(1), Json::from("a"), Json::Null]),
        18 => Json::from(-0.0),
        _ => Json::from(65536),
    }
}

/// One random byte-level change.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    let n = bytes.len();
    let at = |rng: &mut StdRng| if n == 0 { 0 } else { rng.gen_range(0..=n) };
    match rng.gen_range(0..9) {
        0 if n > 0 => {
            let i = rng.gen_range(0..n);
            bytes[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if n > 0 => {
            let i = rng.gen_range(0..n);
            bytes[i] = rng.gen();
        }
        2 => {
            let i = at(rng);
            let junk: &[&[u8]] = &[
                b"\xff",
                b"\xc0\x80",
                b"\xed\xa0\x80",
                b"\0",
                b"\n[",
                b"\"",
                b"{",
                b"]]",
            ];
            let j = junk.choose(rng).unwrap();
            bytes.splice(i..i, j.iter().copied());
        }
        3 if n > 0 => {
            let i = rng.gen_range(0..n);
            let len = rng.gen_range(1..=(n - i).min(64));
            bytes.drain(i..i + len);
        }
        4 if n > 0 => {
            let i = rng.gen_range(0..n);
            let len = rng.gen_range(1..=(n - i).min(256));
            let copy: Vec<u8> = bytes[i..i + len].to_vec();
            let j = at(rng);
            bytes.splice(j..j, copy);
        }
        5 => {
            let keep = at(rng);
            bytes.truncate(keep);
        }
        6 => {
            let i = at(rng);
            let long = vec![b'a'; rng.gen_range(1000..200_000)];
            bytes.splice(i..i, long);
        }
        7 if n > 0 => {
            let i = rng.gen_range(0..n);
            bytes[i] = *b"0123456789-.e\n=[]{}\",".choose(rng).unwrap();
        }
        _ => {
            let i = at(rng);
            bytes.splice(i..i, rng.gen::<[u8; 4]>());
        }
    }
}

/// One change to a TOML text that knows its lines, keys and sections.
fn mutate_toml(text: &str, rng: &mut StdRng) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let keyed: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i].trim_start();
            !l.starts_with('#') && !l.starts_with('[') && l.contains('=')
        })
        .collect();
    let pick = |rng: &mut StdRng| {
        keyed
            .choose(rng)
            .copied()
            .unwrap_or_else(|| rng.gen_range(0..lines.len()))
    };
    match rng.gen_range(0..9) {
        // A deleted key.
        0 => {
            let i = pick(rng);
            lines.remove(i);
        }
        // A duplicated key, or one moved to another section.
        1 | 2 => {
            let i = pick(rng);
            let l = lines[i].clone();
            let j = rng.gen_range(0..=lines.len());
            lines.insert(j, l);
        }
        // A retyped or extreme value.
        3 | 4 => {
            let i = pick(rng);
            if let Some((k, _)) = lines[i].split_once('=') {
                let v = TOML_VALUES.choose(rng).unwrap();
                lines[i] = format!("{k}= {v}");
            }
        }
        // A very long string or a deep nesting.
        5 => {
            let i = pick(rng);
            if let Some((k, _)) = lines[i].split_once('=') {
                let depth = [10, 100, 1000, 100_000][rng.gen_range(0..4)];
                lines[i] = if rng.gen() {
                    format!("{k}= \"{}\"", "y".repeat(rng.gen_range(1000..1_000_000)))
                } else if rng.gen() {
                    format!("{k}= {}1{}", "[".repeat(depth), "]".repeat(depth))
                } else {
                    format!("{k}= {}1{}", "{ a = ".repeat(depth), " }".repeat(depth))
                };
            }
        }
        // A renamed key.
        6 => {
            let i = pick(rng);
            if let Some((k, v)) = lines[i].split_once('=') {
                let other = keyed
                    .choose(rng)
                    .and_then(|&j| lines[j].split_once('=').map(|(k, _)| k.to_string()))
                    .unwrap_or_else(|| format!("{}x", k.trim()));
                lines[i] = format!("{other}={v}");
            }
        }
        // A section header: repeated, an array of tables, nested, unknown.
        7 => {
            let headers = [
                "[model]",
                "[[model]]",
                "[model.lower]",
                "[train]",
                "[optim]",
                "[bilevel.hypergradient]",
                "[]",
                "[a.b.c.d]",
            ];
            let j = rng.gen_range(0..=lines.len());
            lines.insert(j, headers.choose(rng).unwrap().to_string());
        }
        // A line cut short.
        _ => {
            let i = pick(rng);
            let cut = rng.gen_range(0..=lines[i].len());
            let cut = (0..=cut)
                .rev()
                .find(|&c| lines[i].is_char_boundary(c))
                .unwrap();
            lines[i].truncate(cut);
        }
    }
    lines.join("\n")
}

/// One change to a JSON value: a node replaced, deleted or repeated.
fn mutate_json(v: &mut Json, rng: &mut StdRng) {
    // Down to a random node (70 % at each level), or a change on the way.
    let descend = rng.gen_bool(0.7);
    match v {
        Json::Object(m) if !m.is_empty() && descend => {
            let k = m.keys().nth(rng.gen_range(0..m.len())).unwrap().clone();
            if rng.gen_bool(0.15) {
                match rng.gen_range(0..3) {
                    0 => {
                        m.remove(&k);
                    }
                    1 => {
                        let val = m[&k].clone();
                        m.insert(format!("{k}_"), val);
                    }
                    _ => {
                        let val = m.remove(&k).unwrap();
                        m.insert(k.to_uppercase(), val);
                    }
                }
            } else {
                mutate_json(m.get_mut(&k).unwrap(), rng);
            }
            return;
        }
        Json::Array(a) if !a.is_empty() && descend => {
            let i = rng.gen_range(0..a.len());
            if rng.gen_bool(0.15) {
                if rng.gen() {
                    a.remove(i);
                } else {
                    let val = a[i].clone();
                    a.insert(i, val);
                }
            } else {
                mutate_json(&mut a[i], rng);
            }
            return;
        }
        _ => {}
    }
    *v = match (v.clone(), rng.gen_range(0..4)) {
        (Json::Number(n), 0) => Json::from(n.to_string()),
        (Json::String(s), 0) => Json::from(s.len()),
        (Json::String(s), 1) => Json::from(format!("{s}{s}")),
        _ => json_values(rng),
    };
}

/// A format-aware change: `None` where the input no longer parses as the
/// format.
type Structured = dyn Fn(&[u8], &mut StdRng) -> Option<Vec<u8>>;

/// `bytes` with 1 to 4 changes, each format-aware (by `structured`) or a
/// byte-level one.
fn mutate(bytes: &[u8], rng: &mut StdRng, structured: &Structured) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_bool(0.7).then(|| structured(&out, rng)).flatten() {
            Some(changed) => out = changed,
            None => mutate_bytes(&mut out, rng),
        }
    }
    out
}

fn toml_aware(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    Some(mutate_toml(text, rng).into_bytes())
}

fn json_aware(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let mut v: Json = serde_json::from_slice(bytes).ok()?;
    mutate_json(&mut v, rng);
    Some(serde_json::to_vec(&v).unwrap())
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).unwrap()
}

/// An error's message must say something.
fn named(message: String, what: &str) -> Result<(), String> {
    if message.trim().is_empty() {
        Err(format!("{what}: an error without a message"))
    } else {
        Ok(())
    }
}

/// An error's message must name the file it is about.
fn names_file(message: String, file: &str) -> Result<(), String> {
    if message.contains(file) {
        Ok(())
    } else {
        Err(format!("the error does not name the file: {message}"))
    }
}

// ----------------------------------------------------------------- targets

fn pipelines() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        "examples/addition.toml",
        "examples/hf-tiny.toml",
        "examples/tiny.toml",
    ]
    .iter()
    .map(|p| read(p))
    .collect();
    for e in std::fs::read_dir(root().join("tests/fixtures/bad"))
        .unwrap()
        .flatten()
    {
        seeds.push(std::fs::read(e.path()).unwrap());
    }
    seeds
}

/// `coopc check` and `compile`'s front end on mutated pipelines: a spec or
/// rendered diagnostics; a spec that passes compiles (a share of them —
/// compiling is the slow part).
#[test]
fn fuzzed_pipelines_are_accepted_or_refused_with_diagnostics() {
    let dir = scratch("pipeline");
    let seeds = pipelines();
    let path = dir.join("pipeline.toml");
    let mut compiled = 0;
    fuzz(
        "pipeline",
        |rng| mutate(seeds.choose(rng).unwrap(), rng, &toml_aware),
        |input| {
            std::fs::write(&path, input).unwrap();
            match load_pipeline(&path) {
                Ok((_, spec)) => {
                    // Every third accepted pipeline (the first always).
                    if compiled % 3 == 0 {
                        let plan = coopc_compiler::compile(spec);
                        plan.validate()
                            .map_err(|e| format!("compiled an invalid plan: {e}"))?;
                    }
                    compiled += 1;
                    Ok(())
                }
                Err(e) => {
                    let text = e.render();
                    if !text.contains("error") {
                        return Err(format!("diagnostics without an error: {text}"));
                    }
                    Ok(())
                }
            }
        },
    );
}

/// The model folder a pipeline names: its config.json, tokenizer files and
/// weight index, mutated one at a time; the rest of the folder linked.
#[test]
fn fuzzed_model_folders_are_accepted_or_refused_clearly() {
    let dir = scratch("model-folder");
    let source = root().join("tests/fixtures/hf/qwen25");
    let pipeline = String::from_utf8(read("examples/hf-tiny.toml")).unwrap();
    let files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ];
    let folder = dir.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    for e in std::fs::read_dir(&source).unwrap().flatten() {
        std::fs::copy(e.path(), folder.join(e.file_name())).unwrap();
    }
    let originals: BTreeMap<&str, Vec<u8>> = files
        .iter()
        .map(|f| (*f, std::fs::read(source.join(f)).unwrap()))
        .collect();
    let mut which = "";
    fuzz(
        "model-folder",
        |rng| {
            which = files.choose(rng).unwrap();
            let mut input = which.as_bytes().to_vec();
            input.push(b'\n');
            input.extend(mutate(&originals[which], rng, &json_aware));
            input
        },
        |input| {
            let split = input.iter().position(|&b| b == b'\n').unwrap();
            let name = std::str::from_utf8(&input[..split]).unwrap();
            for (f, original) in &originals {
                let bytes = if *f == name {
                    &input[split + 1..]
                } else {
                    &original[..]
                };
                std::fs::write(folder.join(f), bytes).unwrap();
            }
            let options = Options {
                model_from: Some(folder.display().to_string()),
            };
            if let Err(d) = parse_pipeline_with(&pipeline, &options) {
                let text = d.render("hf-tiny.toml", &pipeline);
                return named(text, "pipeline with the folder");
            }
            match HfTokenizer::from_folder(&folder) {
                Ok(_) => Ok(()),
                Err(e) => named(e.to_string(), "tokenizer folder"),
            }
        },
    );
}

use coopc_compiler::ir::plan::{PLAN_HEADER_LEN, PLAN_MAGIC};

/// Where a plan header's payload length and checksum are.
const LENGTH_AT: usize = PLAN_MAGIC.len() + 4;
const CHECKSUM_AT: usize = LENGTH_AT + 8;

/// `bytes` with a payload changed through its CBOR structure (or its
/// bytes) and the header's length and checksum made to match, so that
/// the decoder and the plan's validation see it.
fn plan_payload_aware(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let payload = bytes.get(PLAN_HEADER_LEN..)?;
    let mut new_payload = payload.to_vec();
    match ciborium::from_reader::<ciborium::Value, _>(payload) {
        Ok(value) if rng.gen_bool(0.6) => {
            // Through JSON-like structure: CBOR's values map onto it for the
            // mutations we make (numbers, strings, arrays, maps).
            let mut json: Json = match value.deserialized() {
                Ok(j) => j,
                Err(_) => return None,
            };
            mutate_json(&mut json, rng);
            new_payload.clear();
            ciborium::into_writer(&json, &mut new_payload).ok()?;
        }
        _ => mutate_bytes(&mut new_payload, rng),
    }
    let mut out = bytes[..PLAN_HEADER_LEN].to_vec();
    out[LENGTH_AT..CHECKSUM_AT].copy_from_slice(&(new_payload.len() as u64).to_le_bytes());
    out[CHECKSUM_AT..PLAN_HEADER_LEN]
        .copy_from_slice(&coopc_compiler::ir::file::sha256_bytes(&new_payload));
    out.extend(new_payload);
    Some(out)
}

/// `coopc run PLAN` and `coopc inspect PLAN` read plan files: a plan, or
/// an error naming the file and what is wrong.
#[test]
fn fuzzed_plan_files_are_read_or_refused() {
    let dir = scratch("plan");
    let (_, spec) = load_pipeline(&root().join("examples/addition.toml")).unwrap();
    let mut plan = coopc_compiler::compile(spec);
    plan.pipeline_path = String::new();
    let original = plan.encode().unwrap();
    let path = dir.join("p.plan");
    fuzz(
        "plan",
        |rng| mutate(&original, rng, &plan_payload_aware),
        |input| match Plan::decode(input, &path) {
            Ok(p) => p
                .validate()
                .map_err(|e| format!("decoded an invalid plan: {e}")),
            Err(e) => named(e.to_string(), "plan"),
        },
    );
}

/// A safetensors file's bytes with its JSON header changed (or its length
/// prefix), the data left as it was.
fn safetensors_header_aware(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(len)?)?;
    let data = &bytes[8 + len..];
    let mut new_header = json_aware(header, rng)?;
    if rng.gen_bool(0.1) {
        new_header.extend(std::iter::repeat_n(b' ', rng.gen_range(0..16)));
    }
    let mut prefix = (new_header.len() as u64).to_le_bytes();
    if rng.gen_bool(0.1) {
        prefix =
            [u64::MAX, 1 << 40, 0, new_header.len() as u64 + 1][rng.gen_range(0..4)].to_le_bytes();
    }
    let mut out = prefix.to_vec();
    out.extend(new_header);
    out.extend_from_slice(data);
    Some(out)
}

/// `--resume`, `grad --params` and model loading read safetensors: each
/// tensor as its header says, or an error — never an allocation the
/// header asks for (a 10¹²-element shape) or an out-of-range read.
#[test]
fn fuzzed_safetensors_files_are_read_or_refused() {
    let dir = scratch("safetensors");
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "a.weight".into(),
        HostTensor::from_f64(coopc_compiler::ir::DType::F32, vec![3, 4], &[0.5; 12]).unwrap(),
    );
    tensors.insert(
        "b".into(),
        HostTensor::from_f64(coopc_compiler::ir::DType::F64, vec![5], &[1.5; 5]).unwrap(),
    );
    tensors.insert("ids".into(), HostTensor::i32(vec![2, 2], vec![1, 2, 3, 4]));
    let base = dir.join("base.safetensors");
    write_tensors(&base, &tensors).unwrap();
    let mut seeds = vec![std::fs::read(&base).unwrap()];
    seeds.push(read(
        "tests/fixtures/hf/qwen25/model-00005-of-00005.safetensors",
    ));
    let path = dir.join("t.safetensors");
    fuzz(
        "safetensors",
        |rng| mutate(seeds.choose(rng).unwrap(), rng, &safetensors_header_aware),
        |input| {
            std::fs::write(&path, input).unwrap();
            match read_tensors(&path) {
                Ok(read) => {
                    for (name, t) in &read {
                        if t.data.len() != t.numel() {
                            return Err(format!(
                                "`{name}`: {} values for shape {:?}",
                                t.data.len(),
                                t.shape
                            ));
                        }
                    }
                    Ok(())
                }
                Err(e) => names_file(e.to_string(), "t.safetensors"),
            }
        },
    );
}

/// JSONL data (every record format): records read, or an error naming the
/// file and the line.
#[test]
fn fuzzed_jsonl_data_is_read_or_refused_naming_the_line() {
    let dir = scratch("jsonl");
    let (_, spec) = load_pipeline(&root().join("examples/hf-tiny.toml")).unwrap();
    let text = String::from_utf8(read("examples/data/gsm8k-sample/train.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(24).collect();
    let original = lines.join("\n") + "\n";
    let path = dir.join("data.jsonl");
    let formats = [
        coopc_compiler::spec::DataFormat::Gsm8k,
        coopc_compiler::spec::DataFormat::PromptResponse,
        coopc_compiler::spec::DataFormat::Math,
    ];
    let mut format_at = 0usize;
    fuzz(
        "jsonl",
        |rng| {
            format_at = rng.gen_range(0..formats.len());
            let line_aware = |bytes: &[u8], rng: &mut StdRng| -> Option<Vec<u8>> {
                let text = std::str::from_utf8(bytes).ok()?;
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                if lines.is_empty() {
                    return None;
                }
                let i = rng.gen_range(0..lines.len());
                match rng.gen_range(0..4) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    2 => lines[i] = String::new(),
                    _ => {
                        let changed = json_aware(lines[i].as_bytes(), rng)?;
                        lines[i] = String::from_utf8(changed).ok()?;
                    }
                }
                Some((lines.join("\n") + "\n").into_bytes())
            };
            let mut input = vec![format_at as u8];
            input.extend(mutate(original.as_bytes(), rng, &line_aware));
            input
        },
        |input| {
            std::fs::write(&path, &input[1..]).unwrap();
            let mut task = spec.task.clone();
            task.format = formats[input[0] as usize % formats.len()];
            task.chat_template = false;
            task.tokenizer = None;
            task.sft_file = Some(path.display().to_string());
            task.rl_file = Some(path.display().to_string());
            task.eval_file = Some(path.display().to_string());
            match JsonlTask::load(&task, 4096, &dir) {
                Ok(_) => Ok(()),
                Err(e) => names_file(e.to_string(), "data.jsonl"),
            }
        },
    );
}

/// The command line on mutated pipelines: `coopc check` exits 0 or 2 (with
/// a message), never by a signal or with a panic's 101.
#[test]
fn fuzzed_pipelines_through_the_command_line_exit_0_or_2() {
    let dir = scratch("cli");
    let seeds = pipelines();
    let mut rng = StdRng::seed_from_u64(seed("cli"));
    for case in 0..12 {
        let input = mutate(seeds.choose(&mut rng).unwrap(), &mut rng, &toml_aware);
        let path = dir.join(format!("case-{case}.toml"));
        std::fs::write(&path, &input).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_coopc"))
            .arg("check")
            .arg(&path)
            .current_dir(root())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(2) => assert!(
                err.contains("error"),
                "case {case}: exit 2 without an error: {err}"
            ),
            other => panic!("case {case} ({}): exit {other:?}: {err}", path.display()),
        }
    }
}

/// Allocation bounds, stated directly: a safetensors header claiming a
/// 10¹²-element tensor, and a plan payload claiming a 2⁴⁰-element array,
/// are errors (not an abort on a failed allocation).
#[test]
fn sizes_claimed_by_a_file_do_not_allocate() {
    let dir = scratch("claims");
    let header =
        br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    let path = dir.join("huge.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let e = read_tensors(&path).unwrap_err().to_string();
    assert!(e.contains("huge.safetensors"), "{e}");
    // A header length past the file.
    let mut bytes = (1u64 << 50).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).unwrap();
    let e = read_tensors(&path).unwrap_err().to_string();
    assert!(e.contains("huge.safetensors"), "{e}");

    // CBOR: an array header announcing 2^40 items, then nothing.
    let (_, spec) = load_pipeline(&root().join("examples/addition.toml")).unwrap();
    let good = coopc_compiler::compile(spec).encode().unwrap();
    let mut payload = vec![0x9b];
    payload.extend_from_slice(&(1u64 << 40).to_be_bytes());
    let mut bytes = good[..PLAN_HEADER_LEN].to_vec();
    bytes[LENGTH_AT..CHECKSUM_AT].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes[CHECKSUM_AT..PLAN_HEADER_LEN]
        .copy_from_slice(&coopc_compiler::ir::file::sha256_bytes(&payload));
    bytes.extend(payload);
    let e = Plan::decode(&bytes, Path::new("huge.plan"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("huge.plan"), "{e}");
}

/// What fuzzing found, kept as regression tests: the tokenizers library
/// panics on a tokenizer.json cut short inside its decoder and on a BPE
/// whose subword prefix is longer than a merge's second token; coopc
/// reports both as a malformed file. And tokenizers 0.22 took 70 s to load
/// a tokenizer whose special token was 40 000 characters long (0.23: ms).
#[test]
fn fuzzing_findings_stay_fixed() {
    let dir = scratch("findings");
    let original = String::from_utf8(read("tests/fixtures/hf/qwen25/tokenizer.json")).unwrap();
    let path = dir.join("tokenizer.json");
    let cut = original.find("\"decoder\"").unwrap() + 40;
    std::fs::write(&path, &original[..cut]).unwrap();
    let e = HfTokenizer::from_file(&path)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not valid JSON"),
        "{e}"
    );

    let mut v: Json = serde_json::from_str(&original).unwrap();
    assert!(!v["model"]["merges"].as_array().unwrap().is_empty());
    v["model"]["continuing_subword_prefix"] = Json::from("#".repeat(64));
    std::fs::write(&path, v.to_string()).unwrap();
    let e = HfTokenizer::from_file(&path)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizers library failed"),
        "{e}"
    );

    let mut v: Json = serde_json::from_str(&original).unwrap();
    v["added_tokens"][2]["content"] = Json::from("x".repeat(40_000));
    std::fs::write(&path, v.to_string()).unwrap();
    let t0 = thread_cpu_time();
    let _ = HfTokenizer::from_file(&path);
    let took = thread_cpu_time().saturating_sub(t0);
    assert!(took < CASE_LIMIT, "took {took:?}");
}

/// Found by the pipeline target (the fuzzing process was killed for
/// memory at 23.8 GB): sizes a pipeline accepted made `compile` allocate
/// hundreds of GB (`max_seq = 4294967297`: RoPE tables), build graphs of
/// millions of layers, or run without end (a batch of 10¹² rows). They are
/// refused now, naming the key and the bound.
#[test]
fn sizes_past_what_compiles_are_refused_by_the_front_end() {
    let tiny = String::from_utf8(read("examples/tiny.toml")).unwrap();
    let dir = scratch("sizes");
    let path = dir.join("p.toml");
    for (section, key, value) in [
        ("model", "max_seq", "4294967297"),
        ("model", "d_model", "4294967296"),
        ("model", "d_ff", "1000000000000"),
        ("model", "n_layers", "1000000"),
        ("model", "vocab_size", "1000000000000"),
        ("rl", "group_size", "1000000000000"),
        ("rl", "prompts_per_step", "4294967297"),
        ("sft", "batch_size", "1000000000000"),
        ("lora", "rank", "1000000000000"),
    ] {
        let header = format!("[{section}]");
        let at = tiny.find(&header).unwrap() + header.len();
        let mut text = tiny.clone();
        // The key again at the top of its section: a duplicate where the
        // example sets it, else the only one.
        let line = format!("\n{key} = {value}");
        let dup = tiny[at..]
            .split("\n[")
            .next()
            .unwrap()
            .contains(&format!("\n{key} ="));
        if dup {
            let start = at + tiny[at..].find(&format!("\n{key} =")).unwrap();
            let end = start + 1 + tiny[start + 1..].find('\n').unwrap();
            text.replace_range(start..end, &line);
        } else {
            text.insert_str(at, &line);
        }
        std::fs::write(&path, &text).unwrap();
        let e = load_pipeline(&path).expect_err("refused").render();
        assert!(
            e.contains(&format!("`{section}.{key}` must be at most")),
            "{key}: {e}"
        );
    }
}
