#!/usr/bin/env python3
"""A real-size model on the CPU: a Qwen2.5-0.5B-shaped model (Qwen2.5-0.5B's
config.json values, random weights saved in bf16 by transformers) is loaded
and scores one 512-token row, by coopc (`coopc score --model`) and by
PyTorch eager (transformers, float32), each in its own process; prints load
and scoring time, peak RSS, and the largest log-prob difference.

    benches/hf-real-size.sh            # makes the environment, builds, runs this
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 21, "hidden_act": "silu", "bos_token_id": 151643,
    "eos_token_id": 151643, "attention_dropout": 0.0, "initializer_range": 0.02,
}


def make_model(dest: Path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    if (dest / "config.json").exists():
        return
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k != "architectures"})
    config.architectures = QWEN25_05B["architectures"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)


def torch_score(dest: Path, ids_file: Path, out_file: Path, threads: int):
    """Run in a child process: load in f32, one forward, log-probs."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    ids = load_file(str(ids_file))["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        picked = lp[:, :-1, :].gather(-1, ids[:, 1:, None])[..., 0]
        picked = torch.nn.functional.pad(picked, (1, 0))
    t2 = time.perf_counter()
    save_file({"logprobs": picked.contiguous()}, str(out_file))
    print(json.dumps({"load_s": t1 - t0, "score_s": t2 - t1}))


def measure(cmd, env=None):
    """Wall time and the child's peak RSS (MiB) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stdout}\n{p.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far (KiB on Linux).
    return wall, max(after, before) / 1024, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coopc", default="target/release/coopc")
    ap.add_argument("--work", default="target/bench-hf")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--meta-step", action="store_true",
                    help="also time one LoRA-θ BRIDGE meta-step (coopc run --steps 1)")
    ap.add_argument("--torch-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        torch_score(Path(args.torch_child[0]), Path(args.torch_child[1]),
                    Path(args.torch_child[2]), args.threads)
        return
    import torch
    from safetensors.torch import load_file, save_file
    work = Path(args.work)
    model_dir = work / "qwen2.5-0.5b-shape"
    work.mkdir(parents=True, exist_ok=True)
    make_model(model_dir)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    params = weights // 2  # bf16
    ids = torch.randint(0, QWEN25_05B["vocab_size"], (1, args.tokens),
                        generator=torch.Generator().manual_seed(0))
    ids_file = work / "ids.safetensors"
    save_file({"input_ids": ids}, str(ids_file))

    # Each side runs once to warm the page cache, then is measured.
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    coopc_cmd = [args.coopc, "score", "--model", str(model_dir), "--ids", str(ids_file),
                 "--out", str(work / "coopc.safetensors")]
    torch_cmd = [sys.executable, __file__, "--threads", str(args.threads),
                 "--torch-child", str(model_dir), str(ids_file), str(work / "torch.safetensors")]
    measure(coopc_cmd, env)
    # RUSAGE_CHILDREN keeps the maximum over all children, so each side is
    # measured in a fresh Python process of its own.
    results = {}
    for name, cmd in [("coopc", coopc_cmd), ("torch", torch_cmd)]:
        wrapper = [sys.executable, "-c",
                   "import json,resource,subprocess,sys,time;"
                   "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
                   "w=time.perf_counter()-t;"
                   "print(json.dumps({'wall':w,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
                   "'out':p.stdout,'err':p.stderr,'rc':p.returncode}))"] + cmd
        p = subprocess.run(wrapper, env=env, capture_output=True, text=True, check=True)
        r = json.loads(p.stdout)
        if r["rc"] != 0:
            sys.exit(f"{name} failed:\n{r['out']}\n{r['err']}")
        results[name] = r
    ours = load_file(str(work / "coopc.safetensors"))["logprobs"].double()
    theirs = load_file(str(work / "torch.safetensors"))["logprobs"].double()
    diff = (ours - theirs).abs().max().item()
    t = json.loads(results["torch"]["out"].strip().splitlines()[-1])
    c_line = results["coopc"]["out"].strip().splitlines()[-1]
    c_load = float(c_line.split("load ")[1].split(" s")[0])
    c_score = float(c_line.split("score ")[1].split(" s")[0])
    f32_mib = params * 4 / 2**20
    print(f"model: Qwen2.5-0.5B shape, {params / 1e6:.0f} M parameters, bf16 files "
          f"{weights / 2**20:.0f} MiB (f32: {f32_mib:.0f} MiB); one row of {args.tokens} tokens; "
          f"{args.threads} threads")
    print("| | load (s) | score (s) | process wall (s) | peak RSS (MiB) | RSS / f32 weights |")
    print("|---|---|---|---|---|---|")
    for name, load, score in [("coopc score --model (f32)", c_load, c_score),
                              ("PyTorch eager, transformers (f32)", t["load_s"], t["score_s"])]:
        r = results["coopc" if name.startswith("coopc") else "torch"]
        print(f"| {name} | {load:.2f} | {score:.2f} | {r['wall']:.2f} | {r['rss']:.0f} | "
              f"{r['rss'] / f32_mib:.2f}× |")
    print(f"max |Δ log p| coopc vs PyTorch: {diff:.2e}")
    if args.meta_step:
        meta_step(args, model_dir, work, env)


PIPELINE = '''[model]
from = "{model}"
max_seq = {tokens}
lower = {{ lora_rank = 16 }}

[lora]
rank = 16
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[task]
kind = "jsonl"
format = "gsm8k"
chat_template = true
sft_file = "{data}/train.jsonl"
rl_file = "{data}/train.jsonl"
eval_file = "{data}/test.jsonl"

[rl]
group_size = 2
prompts_per_step = 1
max_new_tokens = 16

[sft]
batch_size = 1

[bilevel]
method = "bridge"
hypergradient = {{ kind = "first_order" }}

[train]
steps = 1
eval_every = 1000

[backend]
kind = "cpu"
dtype = "f32"
'''


def meta_step(args, model_dir: Path, work: Path, env):
    """One BRIDGE meta-step with the lower level as a LoRA of θ (rank 16)
    and w a rank-16 LoRA on every projection, sequences of `--tokens`:
    `coopc run --steps 1` (the fixture tokenizer and chat template copied
    beside the weights; one SFT row, one prompt × 2 rollouts of ≤ 16 tokens)."""
    import shutil
    root = Path(__file__).resolve().parents[2]
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(root / "tests/fixtures/hf/qwen25" / f, model_dir / f)
    pipe = work / "meta-step.toml"
    pipe.write_text(PIPELINE.format(model=model_dir.resolve(), tokens=args.tokens,
                                    data=(root / "examples/data/gsm8k-sample").resolve()))
    out = work / "meta-step-run"
    shutil.rmtree(out, ignore_errors=True)
    wrapper = [sys.executable, "-c",
               "import json,resource,subprocess,sys,time;"
               "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
               "w=time.perf_counter()-t;"
               "print(json.dumps({'wall':w,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
               "'out':p.stdout,'err':p.stderr,'rc':p.returncode}))",
               args.coopc, "run", str(pipe), "--out", str(out), "-q", "--eval-limit", "0"]
    p = subprocess.run(wrapper, env=env, capture_output=True, text=True, check=True)
    r = json.loads(p.stdout)
    if r["rc"] != 0:
        sys.exit(f"coopc run failed:\n{r['out']}\n{r['err']}")
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    print(f"one LoRA-θ BRIDGE meta-step (rank 16 below and above, {args.tokens}-token rows, "
          f"first-order hypergradient): step {m['step_time_s']:.1f} s (sampling included), "
          f"whole command {r['wall']:.1f} s (compiling, loading, checkpoint included), "
          f"peak RSS {r['rss']:.0f} MiB; sft loss {m['sft_loss']:.3f}")


if __name__ == "__main__":
    main()
