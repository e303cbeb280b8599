//! Hugging Face model folders: every fixture of `tests/fixtures/hf` (tiny
//! random models saved by `transformers`, written by
//! `scripts/hf-fixtures.sh`) loads, and coopc's token log-probabilities
//! equal the ones `transformers` computed for the same ids.

use coopc_compiler::compile_logprobs;
use coopc_compiler::frontend::parse_pipeline;
use coopc_compiler::plan::{LOGPROBS, TOKEN_IDS};
use coopc_runtime::safetensors_io::read_tensors;
use coopc_runtime::{execute_program, HostTensor};
use coopc_train::init::pretrained_or_init;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 5] = ["llama32", "smollm2", "qwen25", "qwen3", "mistral"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(name)
}

fn pipeline(from: &Path, dtype: &str) -> String {
    format!(
        "[model]\nfrom = {:?}\nmax_seq = 12\n[lora]\nrank = 2\n[task]\nkind = \"addition\"\n\
         [rl]\ngroup_size = 2\nprompts_per_step = 1\n[sft]\nbatch_size = 2\n\
         [backend]\ndtype = \"{dtype}\"\n",
        from.display().to_string()
    )
}

/// coopc's log-probs of the fixture's ids, and the expected tensors.
fn score(name: &str, dtype: &str) -> (Vec<f64>, HashMap<String, HostTensor>) {
    let dir = fixture(name);
    let spec = parse_pipeline(&pipeline(&dir, dtype))
        .unwrap_or_else(|d| panic!("{name}: {}", d.render("pipeline", "")));
    let program = compile_logprobs(&spec);
    let params = pretrained_or_init(&spec, program.signature.parameters(), 0)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: HashMap<String, HostTensor> = read_tensors(&dir.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let mut inputs: HashMap<String, HostTensor> = params.into_iter().collect();
    inputs.insert(TOKEN_IDS.to_string(), expected["input_ids"].clone());
    let out = execute_program(&program, &inputs).unwrap();
    let lp = out
        .into_iter()
        .find(|(n, _)| n == LOGPROBS)
        .map(|(_, t)| t.to_f64_vec())
        .unwrap();
    (lp, expected)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn every_fixture_scores_as_transformers_does_in_f32() {
    for name in FIXTURES {
        let (lp, expected) = score(name, "f32");
        let want = expected["logprobs_f32"].to_f64_vec();
        let d = max_diff(&lp, &want);
        assert!(d < 1e-5, "{name}: max |Δ log p| = {d:e} (f32)");
        // The ids are far from uniformly likely: the check has teeth.
        let spread = want.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(spread < -8.0, "{name}: log-probs too flat ({spread})");
    }
}

/// The f64 pipeline reads the same folders (bf16 and f16 widened to f64).
/// transformers computes RMSNorm, the attention softmax and RoPE's angles
/// in float32 whatever the model's dtype, so its float64 log-probs carry
/// f32 rounding (1e-6 here); the tolerance is the f32 one for that reason.
#[test]
fn every_fixture_scores_as_transformers_does_in_f64() {
    for name in FIXTURES {
        let (lp, expected) = score(name, "f64");
        let d = max_diff(&lp, &expected["logprobs_f64"].to_f64_vec());
        assert!(d < 1e-5, "{name}: max |Δ log p| = {d:e} (f64)");
    }
}

/// A copy of fixture `name` in a fresh temporary folder.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("coopc-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The rendered errors of a pipeline on `dir`.
fn pipeline_error(dir: &Path, extra: &str) -> String {
    let text = pipeline(dir, "f32").replace("max_seq = 12\n", &format!("max_seq = 12\n{extra}"));
    match parse_pipeline(&text) {
        Ok(_) => panic!("the pipeline on {} was accepted", dir.display()),
        Err(d) => d.render("pipeline.toml", &text),
    }
}

#[test]
fn an_unsupported_architecture_is_one_clear_error() {
    let dir = copy_fixture("llama32", "arch");
    edit_config(&dir, |v| {
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let e = pipeline_error(&dir, "");
    assert!(
        e.contains("unsupported architecture GPTNeoXForCausalLM"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
    assert!(e.contains("LlamaForCausalLM, Qwen2ForCausalLM"), "{e}");
    assert_eq!(
        e.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{e}"
    );

    edit_config(&dir, |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["rope_parameters"]["rope_type"] = serde_json::json!("yarn");
    });
    let e = pipeline_error(&dir, "");
    assert!(
        e.contains("rope_scaling of type \"yarn\" is not supported"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_malformed_or_missing_config_names_the_file() {
    let dir = copy_fixture("qwen3", "badcfg");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = pipeline_error(&dir, "");
    assert!(e.contains("config.json: not valid JSON"), "{e}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = pipeline_error(&dir, "");
    assert!(e.contains("no config.json in the model folder"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = pipeline_error(&dir, "");
    assert!(e.contains("no such folder"), "{e}");
}

#[test]
fn config_sizes_beyond_what_coopc_can_allocate_are_refused() {
    let dir = copy_fixture("qwen3", "hugecfg");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["num_hidden_layers"] = 1_000_000.into();
    cfg["intermediate_size"] = (1u64 << 40).into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = pipeline_error(&dir, "");
    assert!(
        e.contains("num_hidden_layers = 1000000 is larger than coopc can compile")
            && e.contains("`model.n_layers` is at most 512"),
        "{e}"
    );
    assert!(e.contains("intermediate_size = 1099511627776"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn explicit_model_keys_must_agree_with_the_config() {
    let dir = fixture("qwen25");
    let e = pipeline_error(&dir, "d_model = 32\nn_layers = 2\n");
    assert!(
        e.contains("`model.d_model` = 32 contradicts") && e.contains("hidden_size = 64"),
        "{e}"
    );
    // n_layers agrees: no error about it.
    assert!(!e.contains("n_layers"), "{e}");
    let e = pipeline_error(&dir, "qkv_bias = false\n");
    assert!(e.contains("Qwen2ForCausalLM"), "{e}");
    let text = pipeline(&dir, "f32").replace("max_seq = 12", "max_seq = 40000");
    let e = parse_pipeline(&text).unwrap_err().render("p", &text);
    assert!(e.contains("max_position_embeddings = 32768"), "{e}");
}

fn load_error(dir: &Path) -> String {
    let spec = parse_pipeline(&pipeline(dir, "f32")).unwrap();
    let program = compile_logprobs(&spec);
    match pretrained_or_init(&spec, program.signature.parameters(), 0) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_shard_or_tensor_is_named() {
    let dir = copy_fixture("qwen25", "shards");
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model-00002-of-00005.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // A shard that lacks one of its tensors (rewritten without it).
    let dir = copy_fixture("qwen25", "tensor");
    let shard = dir.join("model-00001-of-00005.safetensors");
    let mut tensors = read_tensors(&shard).unwrap();
    let dropped = tensors.keys().next().unwrap().clone();
    tensors.remove(&dropped);
    coopc_runtime::safetensors_io::write_tensors(&shard, &tensors).unwrap();
    let e = load_error(&dir);
    assert!(e.contains(&format!("missing tensor `{dropped}`")), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();

    // A tensor of the wrong shape, and one nothing expects.
    let dir = copy_fixture("mistral", "shape");
    let file = dir.join("model.safetensors");
    let mut tensors = read_tensors(&file).unwrap();
    let norm = tensors.remove("model.norm.weight").unwrap();
    tensors.insert(
        "model.norm.weight".into(),
        HostTensor::from_f64(coopc_ir::DType::F32, vec![3], &[1.0, 1.0, 1.0]).unwrap(),
    );
    tensors.insert("model.extra.weight".into(), norm);
    coopc_runtime::safetensors_io::write_tensors(&file, &tensors).unwrap();
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.norm.weight` is f32[3], expected f32[32]"),
        "{e}"
    );
    assert!(e.contains("unexpected tensor `model.extra.weight`"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_templates_render_and_tokenize_as_transformers_does() {
    use coopc_train::tasks::chat::{ChatTemplate, Message};
    use coopc_train::tasks::tokenizer::HfTokenizer;
    use coopc_train::tasks::Tokenizer;
    for name in FIXTURES {
        let dir = fixture(name);
        let chat: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("chat.json")).unwrap()).unwrap();
        let (tok, text) = HfTokenizer::from_folder(&dir).unwrap();
        let template = ChatTemplate::new(
            text.chat_template.as_deref().expect("a chat template"),
            &text,
            &dir.join("chat_template.jinja"),
        )
        .unwrap();
        let messages: Vec<Message> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let rendered = template.render(&messages, true).unwrap();
        assert_eq!(rendered, chat["text"].as_str().unwrap(), "{name}");
        let ids: Vec<i32> = chat["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(tok.encode(&rendered).unwrap(), ids, "{name}");
        // EOS and stop tokens come from the folder's configs.
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        assert!(tok
            .stop_tokens()
            .contains(&(config["eos_token_id"].as_i64().unwrap() as i32)));
    }
    // Qwen's tokenizer has no BOS; Llama's has one.
    let (qwen, _) = HfTokenizer::from_folder(&fixture("qwen3")).unwrap();
    assert_eq!(qwen.bos_prefix(), None);
    let (llama, _) = HfTokenizer::from_folder(&fixture("llama32")).unwrap();
    assert_eq!(llama.bos_prefix(), llama.token_id("<|begin_of_text|>"));
    assert_eq!(llama.eos(), llama.token_id("<|eot_id|>").unwrap());
}

/// θ's tensors by Hugging Face name, as f32 (what `read_model_weights` expects).
fn f32_theta_ports(
    spec: &coopc_compiler::spec::PipelineSpec,
) -> Vec<(String, coopc_ir::TensorType)> {
    coopc_ir::params::theta_shapes(&spec.model)
        .into_iter()
        .map(|(n, s)| (n, coopc_ir::TensorType::new(coopc_ir::DType::F32, s)))
        .collect()
}

/// examples/hf-tiny.toml with its paths made absolute and `edit` applied.
fn example_spec(edit: impl FnOnce(String) -> String) -> coopc_compiler::spec::PipelineSpec {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = edit(std::fs::read_to_string(root.join("examples/hf-tiny.toml")).unwrap());
    let text = text
        .replace("\"tests/", &format!("\"{}/tests/", root.display()))
        .replace("\"examples/", &format!("\"{}/examples/", root.display()));
    parse_pipeline(&text).unwrap_or_else(|d| panic!("{}", d.render("hf-tiny.toml", &text)))
}

#[test]
fn a_run_trains_three_steps_from_a_model_folder_and_checkpoints_hf_folders() {
    use coopc_runtime::hf_weights::read_model_weights;
    use coopc_train::{RunOptions, Trainer};
    let spec = example_spec(|t| {
        t.replace("steps = 20", "steps = 3")
            .replace("eval_every = 10", "eval_every = 3")
    });
    assert!(spec.task.chat_template);
    let out = std::env::temp_dir().join(format!("coopc-hf-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let plan = coopc_compiler::compile(spec.clone());
    let opts = RunOptions {
        out_dir: out.clone(),
        resume: false,
        progress: false,
        eval_limit: 4,
        stop_after: None,
    };
    let mut trainer = Trainer::new(plan, opts).unwrap();
    // θ starts as the folder's weights (bf16 widened exactly).
    let start = trainer.state().unwrap();
    let theta_ports = f32_theta_ports(&spec);
    let folder = read_model_weights(&fixture("qwen25"), &theta_ports, true).unwrap();
    for (name, t) in &folder {
        assert_eq!(&start.tensors[name], t, "{name}");
    }
    let metrics = trainer.run(|_| {}).unwrap();
    assert_eq!(metrics.len(), 3);
    assert!(metrics.iter().all(|m| m.sft_loss.is_finite()));
    assert!(metrics.last().unwrap().eval_accuracy.is_some());
    // The checkpoint is a model folder of θ with a PEFT adapter inside.
    let ckpt = out.join("checkpoints/step-3");
    let end = trainer.state().unwrap();
    let saved = read_model_weights(&ckpt, &theta_ports, true).unwrap();
    for (name, t) in &saved {
        assert_eq!(&end.tensors[name], t, "{name}");
    }
    assert_ne!(saved, folder, "θ trained");
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["lora_alpha"], 8.0);
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "up_proj", "down_proj"])
    );
    let w = read_tensors(&ckpt.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(w.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    for f in ["config.json", "tokenizer.json", "chat_template.jinja"] {
        assert!(ckpt.join(f).exists(), "{f}");
    }
    // The written config describes the same model.
    let c = coopc_ir::hf::read_config(&ckpt).unwrap();
    assert_eq!((c.d_model, c.n_layers, c.vocab_size), (64, 2, 384));
    // And the run resumes from it.
    let plan = coopc_compiler::compile(spec);
    let resumed = Trainer::new(
        plan,
        RunOptions {
            out_dir: out.clone(),
            resume: true,
            progress: false,
            eval_limit: 4,
            stop_after: None,
        },
    )
    .unwrap();
    assert_eq!(resumed.step(), 3);
    assert_eq!(resumed.state().unwrap(), end);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_tokenizer_larger_than_the_configs_vocabulary_is_an_error() {
    use coopc_train::tasks::{build_task, check_vocab};
    let dir = copy_fixture("qwen3", "vocab");
    edit_config(&dir, |v| v["vocab_size"] = serde_json::json!(300));
    let spec = example_spec(|t| t.replace("tests/fixtures/hf/qwen25", &dir.display().to_string()));
    assert_eq!(spec.model.vocab_size, 300);
    let task = build_task(&spec.task, spec.train.seq_len).unwrap();
    let e = check_vocab(task.as_ref(), spec.model.vocab_size)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.vocab_size is 300"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gsm8k_records_become_demonstrations_and_problems() {
    use coopc_train::tasks::{build_task, Verdict};
    let spec = example_spec(|t| t);
    let task = build_task(&spec.task, spec.train.seq_len).unwrap();
    let eval = task.eval_set();
    assert_eq!(eval.len(), 40);
    let p = &eval[0];
    assert!(p.prompt.starts_with("Jo has 46 stickers"), "{}", p.prompt);
    assert_eq!(p.answer, "110");
    // The prompt is the chat template's rendering (as chat.json has it).
    let chat: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen25").join("chat.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<i32> = chat["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap() as i32)
        .collect();
    assert_eq!(task.encode_prompt(p).unwrap(), want);
    // A demonstration: template, solution without calculator notes, EOS.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let ex = task.sft_example(&mut rng);
    assert!(
        ex.response.contains("####") && !ex.response.contains("<<"),
        "{}",
        ex.response
    );
    let row = task.encode_example(&ex).unwrap();
    let eos = task.tokenizer().eos();
    assert_eq!(row.tokens.last(), Some(&eos));
    assert_eq!(row.tokens.len(), row.prompt_len + row.response_len);
    // The verifier and the configured rewards.
    assert_eq!(
        task.verify(p, "so they have 110\n#### 110"),
        Verdict::Correct
    );
    assert_eq!(task.verify(p, "#### 111"), Verdict::Wrong);
    assert_eq!(task.verify(p, "I do not know"), Verdict::Malformed);
    assert_eq!(task.reward(p, "#### 111"), -0.5);
    assert_eq!(task.reward(p, "I do not know"), -1.0);
}

#[test]
fn a_malformed_gsm8k_line_names_the_file_and_line() {
    use coopc_train::tasks::build_task;
    let dir = std::env::temp_dir().join(format!("coopc-gsm8k-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("train.jsonl");
    std::fs::write(
        &file,
        "{\"question\": \"1+1?\", \"answer\": \"2\\n#### 2\"}\n\n{\"question\": \"2+2?\", \"answer\": \"four\"}\n",
    )
    .unwrap();
    let spec = example_spec(|t| {
        t.replace(
            "sft_file = \"",
            &format!("sft_file = \"{}\"\n# \"", file.display()),
        )
    });
    let e = build_task(&spec.task, spec.train.seq_len)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&format!("{}:3:", file.display())), "{e}");
    assert!(e.contains("no final answer after `####`"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_lora_of_theta_at_the_lower_level_trains_and_leaves_the_base_alone() {
    use coopc_runtime::hf_weights::read_model_weights;
    use coopc_train::checkpoint::{load_latest, merge_lora};
    use coopc_train::{RunOptions, Trainer};
    let spec = example_spec(|t| {
        t.replace("steps = 20", "steps = 3")
            .replace("eval_every = 10", "eval_every = 3")
            .replace("max_seq = 176", "max_seq = 176\nlower = { lora_rank = 8 }")
    });
    let lower = spec.model.lower.clone().expect("a lower LoRA");
    assert_eq!((lower.rank, lower.alpha, lower.targets.len()), (8, 16.0, 7));
    let out = std::env::temp_dir().join(format!("coopc-hf-lower-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let opts = |resume| RunOptions {
        out_dir: out.clone(),
        resume,
        progress: false,
        eval_limit: 4,
        stop_after: None,
    };
    let mut trainer = Trainer::new(coopc_compiler::compile(spec.clone()), opts(false)).unwrap();
    let start = trainer.state().unwrap();
    let metrics = trainer.run(|_| {}).unwrap();
    assert_eq!(metrics.len(), 3);
    assert!(metrics.iter().all(|m| m.sft_loss.is_finite()));
    let end = trainer.state().unwrap();
    let theta_ports = f32_theta_ports(&spec);
    // The base is the folder's, before and after; the lower LoRA moved.
    let folder = read_model_weights(&fixture("qwen25"), &theta_ports, true).unwrap();
    for (name, t) in &folder {
        assert_eq!(&start.tensors[name], t, "{name}");
        assert_eq!(&end.tensors[name], t, "{name} changed");
    }
    let b = "lower_lora.model.layers.1.mlp.up_proj.lora_B.weight";
    assert!(start.tensors[b].to_f64_vec().iter().all(|&x| x == 0.0));
    assert!(end.tensors[b].to_f64_vec().iter().any(|&x| x != 0.0));
    // The checkpoint: base θ, w's adapter and the lower LoRA's adapter.
    let ckpt = out.join("checkpoints/step-3");
    assert_eq!(
        read_model_weights(&ckpt, &theta_ports, true).unwrap(),
        folder
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("lower_adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 8);
    let lower_w = read_tensors(&ckpt.join("lower_adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        lower_w["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"],
        end.tensors[b]
    );
    // The merged policy folds both adapters; resuming restores everything.
    let merged = merge_lora(&spec, &end.tensors);
    assert_ne!(
        merged["model.layers.1.mlp.up_proj.weight"],
        folder["model.layers.1.mlp.up_proj.weight"]
    );
    assert_eq!(load_latest(&out).unwrap().tensors, end.tensors);
    let resumed = Trainer::new(coopc_compiler::compile(spec), opts(true)).unwrap();
    assert_eq!(resumed.state().unwrap(), end);
    std::fs::remove_dir_all(&out).unwrap();
}
