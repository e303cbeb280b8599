//! Checkpoints: save → load gives the same state; only the latest
//! checkpoint is kept; a half-written checkpoint never becomes current; the
//! merged copy (LoRA folded into θ) computes the same log-probs as θ + w.

mod common;

use common::*;
use coopc_compiler::ir::DType;
use coopc_compiler::model::{lora_shapes, theta_shapes, Decoder, Params};
use coopc_runtime::HostTensor;
use coopc_train::checkpoint::{checkpoints_dir, load_latest, merge_lora, save, TrainState};
use std::collections::BTreeMap;

fn state(step: usize, seed: u64) -> TrainState {
    let spec = tiny_spec();
    let mut r = rng(seed);
    let mut tensors = BTreeMap::new();
    for (n, s) in theta_shapes(&spec.model)
        .into_iter()
        .chain(lora_shapes(&spec.model, &spec.lora))
    {
        let k: usize = s.iter().product();
        tensors.insert(n.clone(), f64_tensor(&s, &uniform(&mut r, k, -0.5, 0.5)));
        if !n.starts_with("base_model") {
            tensors.insert(
                format!("shadow.{n}"),
                f64_tensor(&s, &uniform(&mut r, k, -0.5, 0.5)),
            );
        }
    }
    tensors.insert("opt.lower.step".into(), f64_tensor(&[], &[step as f64]));
    TrainState { step, tensors }
}

#[test]
fn save_then_load_round_trips_and_keeps_only_the_latest() {
    let dir = std::env::temp_dir().join(format!("coopc-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = tiny_spec();
    save(&dir, &spec, &state(3, 1)).unwrap();
    let s5 = state(5, 2);
    save(&dir, &spec, &s5).unwrap();
    assert_eq!(load_latest(&dir).unwrap(), s5);
    let folders: Vec<String> = std::fs::read_dir(checkpoints_dir(&dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(folders, vec!["step-5".to_string()]);
    // A crash while writing step 7 (folder present, pointer not moved) leaves step 5 current.
    std::fs::create_dir_all(checkpoints_dir(&dir).join("step-7")).unwrap();
    assert_eq!(load_latest(&dir).unwrap().step, 5);
    // A corrupt tensor file is an error naming the file, not a panic.
    std::fs::write(
        checkpoints_dir(&dir).join("step-5/state.safetensors"),
        b"garbage",
    )
    .unwrap();
    let err = load_latest(&dir).unwrap_err().to_string();
    assert!(err.contains("state.safetensors"), "{err}");
}

#[test]
fn merged_weights_compute_the_adapted_model() {
    let spec = tiny_spec();
    let st = state(0, 3);
    let merged = merge_lora(&spec, &st.tensors);
    let mut g = coopc_compiler::ir::Graph::new();
    let declare = |g: &mut coopc_compiler::ir::Graph,
                   names: &[(String, Vec<usize>)],
                   prefix: &str|
     -> Params {
        names
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    g.input(format!("{prefix}{n}"), DType::F64, s.clone()),
                )
            })
            .collect()
    };
    let th = theta_shapes(&spec.model);
    let lo = lora_shapes(&spec.model, &spec.lora);
    let theta = declare(&mut g, &th, "");
    let w = declare(&mut g, &lo, "");
    let theta_m = declare(&mut g, &th, "merged.");
    let w_zero: Params = lo
        .iter()
        .map(|(n, s)| (n.clone(), g.full(0.0, DType::F64, s.clone())))
        .collect();
    let ids = g.input("ids", DType::I32, vec![2, 5]);
    let dec = Decoder {
        model: &spec.model,
        lora: &spec.lora,
        dtype: DType::F64,
    };
    let a = dec.token_logprobs(&mut g, &theta, &w, ids);
    let b = dec.token_logprobs(&mut g, &theta_m, &w_zero, ids);
    let mut inputs = Inputs::new();
    for (n, t) in &st.tensors {
        inputs.insert(n.clone(), t.clone());
    }
    for (n, t) in &merged {
        inputs.insert(format!("merged.{n}"), t.clone());
    }
    inputs.insert(
        "ids".into(),
        HostTensor::i32(vec![2, 5], vec![1, 3, 5, 7, 9, 2, 4, 6, 8, 10]),
    );
    let v = eval(&g, &inputs, &[a, b]);
    assert!(
        rel_err(&v[1], &v[0], 1e-9) < 1e-12,
        "{:?} vs {:?}",
        v[1],
        v[0]
    );
}

#[test]
fn a_changed_byte_in_any_checkpoint_file_is_named_and_not_loaded() {
    let dir = std::env::temp_dir().join(format!("coopc-ckpt-sum-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = tiny_spec();
    let s = state(4, 5);
    let folder = save(&dir, &spec, &s).unwrap();
    let meta = std::fs::read_to_string(folder.join("meta.txt")).unwrap();
    let listed: Vec<&str> = meta
        .lines()
        .filter_map(|l| l.strip_prefix("sha256 "))
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    for file in [
        "model.safetensors",
        "adapter/adapter_model.safetensors",
        "state.safetensors",
        "merged.safetensors",
        "config.json",
    ] {
        assert!(listed.contains(&file), "{file} not in {listed:?}");
    }
    for file in &listed {
        let path = folder.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let at = bytes.len() - 1;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = load_latest(&dir).unwrap_err().to_string();
        assert!(
            err.contains(file) && err.contains("sha256"),
            "{file}: {err}"
        );
        std::fs::write(&path, &original).unwrap();
        assert_eq!(load_latest(&dir).unwrap(), s);
    }
    // A malformed checksum line and a pointer outside the folder are named.
    let meta_path = folder.join("meta.txt");
    std::fs::write(&meta_path, meta.replacen("sha256 ", "sha256 zz", 1)).unwrap();
    let err = load_latest(&dir).unwrap_err().to_string();
    assert!(err.contains("meta.txt line 3"), "{err}");
    std::fs::write(&meta_path, &meta).unwrap();
    std::fs::write(checkpoints_dir(&dir).join("latest"), "../../etc\n").unwrap();
    let err = load_latest(&dir).unwrap_err().to_string();
    assert!(err.contains("not a `step-N` folder"), "{err}");
}

#[test]
fn a_crash_mid_save_leaves_the_previous_checkpoint_current_and_is_cleaned_up() {
    let dir = std::env::temp_dir().join(format!("coopc-ckpt-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = tiny_spec();
    let s2 = state(2, 7);
    save(&dir, &spec, &s2).unwrap();
    let root = checkpoints_dir(&dir);
    // What a killed writer leaves: a partial folder, and a renamed step-6
    // whose pointer never moved.
    std::fs::create_dir_all(root.join(".step-6.partial-1/adapter")).unwrap();
    std::fs::write(root.join(".step-6.partial-1/model.safetensors"), b"half").unwrap();
    std::fs::create_dir_all(root.join("step-6")).unwrap();
    std::fs::write(root.join("step-6/model.safetensors"), b"half").unwrap();
    assert_eq!(load_latest(&dir).unwrap(), s2);
    // The next save of step 6 replaces both.
    let s6 = state(6, 8);
    save(&dir, &spec, &s6).unwrap();
    assert_eq!(load_latest(&dir).unwrap(), s6);
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, vec!["latest".to_string(), "step-6".to_string()]);
}
