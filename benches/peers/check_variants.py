#!/usr/bin/env python3
"""Checks the PyTorch peer against `coopc grad` over many pipeline variants.

    check_variants.py [--coopc target/release/coopc] [--only NAME] [--keep DIR]

Each variant is a small pipeline (d_model 32, two layers, grouped-query
attention) with one feature switched on: every hypergradient kind the peer
implements, each lower optimiser, K > T, both shadow modes (and a persistent
shadow read from `shadow.*` tensors), the k3 KL term, `seq_mean`, q/k/v
biases, untied embeddings, a subset of LoRA targets, the baseline methods and
step-prefixed batches, and the policy loss family (CISPO, GSPO's sequence
ratio, Dr. GRPO's aggregation, k1/k2 KL estimators, KL in the reward).
Inputs are made harder than `coopc init`'s: LoRA B is
random (so `hyper.*lora_A` is not zero), advantages are random (not ±1 per
group, which often cancels to zero), π_old and π_ref are perturbed so that
ratios leave the clip range, and masked positions of the log-prob inputs hold
NaN (which both sides must ignore). Every variant runs in f64 (tolerance
1e-9 by default) and a few in f32 (1e-4). Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

BASE = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq": 16},
    "lora": {"rank": 4, "alpha": 8.0},
    "rl": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6},
    "sft": {"batch_size": 3},
    "bilevel": {"method": "bridge", "lambda": 0.4, "hypergradient": {"kind": "truncated", "unroll": 2}},
    "optim": {"lower": {"kind": "sgd", "lr": 0.5}},
    "train": {"steps": 10, "seq_len": 12},
    "backend": {"kind": "cpu", "dtype": "f64"},
}


def variant(name, *, prefixed=False, shadow_tensors=False, f32=False, **changes):
    return {"name": name, "prefixed": prefixed, "shadow_tensors": shadow_tensors, "f32": f32, "changes": changes}


VARIANTS = [
    variant("first_order_sgd_k1", bilevel={"hypergradient": {"kind": "first_order", "unroll": 1}}, f32=True),
    variant(
        "first_order_adamw_k2",
        bilevel={"hypergradient": {"kind": "first_order", "unroll": 2}},
        optim={"lower": {"kind": "adamw", "lr": 1e-2, "weight_decay": 0.1}},
        prefixed=True,
    ),
    variant("truncated_sgd_k2", f32=True),
    variant("truncated_sgd_k2_prefixed", prefixed=True, f32=True),
    variant(
        "truncated_momentum_k3_t2",
        bilevel={"hypergradient": {"kind": "truncated", "unroll": 3, "backprop": 2}},
        optim={"lower": {"kind": "momentum", "lr": 0.3, "momentum": 0.8}},
        prefixed=True,
    ),
    variant(
        "truncated_momentum_k2_t2",
        optim={"lower": {"kind": "momentum", "lr": 0.3, "momentum": 0.9}},
    ),
    variant(
        "truncated_adamw_k2",
        optim={"lower": {"kind": "adamw", "lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.1}},
        prefixed=True,
    ),
    variant("truncated_k3_t1", bilevel={"hypergradient": {"kind": "truncated", "unroll": 3, "backprop": 1}}, prefixed=True),
    variant("truncated_t0", bilevel={"hypergradient": {"kind": "truncated", "unroll": 2, "backprop": 0}}),
    variant("one_step_shadow", bilevel={"shadow": "one_step"}, shadow_tensors=True),
    variant("persistent_shadow_tensors", shadow_tensors=True, prefixed=True),
    variant(
        "kl_seq_mean_bias_untied",
        model={"qkv_bias": True, "tie_embeddings": False, "vocab_size": 30, "rope_theta": 500.0, "rms_eps": 1e-5},
        rl={"kl_coef": 0.05, "loss_agg": "seq_mean", "clip_low": 0.1, "clip_high": 0.2},
        prefixed=True,
        f32=True,
    ),
    variant(
        "lora_subset_lambda_schedule",
        lora={"rank": 3, "alpha": 5.0, "targets": ["q_proj", "v_proj", "down_proj"]},
        bilevel={"lambda": {"start": 0.7, "end": 0.1}},
    ),
    # The policy loss family (docs/semantics.md §4.2): ratios pushed out of
    # GSPO's narrow range by the perturbed π_old.
    variant("cispo_k1", rl={"loss": "cispo", "kl_coef": 0.05, "kl_estimator": "k1"}, f32=True),
    variant(
        "gspo_seq_mean_k2",
        rl={
            "ratio_level": "sequence",
            "clip_low": 0.02,
            "clip_high": 0.03,
            "kl_coef": 0.05,
            "kl_estimator": "k2",
            "loss_agg": "seq_mean",
        },
        prefixed=True,
    ),
    variant(
        "gspo_cispo_dr_grpo",
        rl={"loss": "cispo", "ratio_level": "sequence", "clip_low": 0.02, "clip_high": 0.03, "loss_agg": "seq_mean_token_sum_norm"},
        f32=True,
    ),
    variant(
        "dr_grpo_first_order_adamw",
        rl={"loss_agg": "seq_mean_token_sum_norm", "kl_coef": 0.02},
        bilevel={"hypergradient": {"kind": "first_order", "unroll": 2}},
        optim={"lower": {"kind": "adamw", "lr": 1e-2, "weight_decay": 0.1}},
    ),
    variant("kl_in_reward", rl={"kl_coef": 0.05, "kl_in_reward": True}),
    # The entropy bonus, through the truncated hypergradient's second order.
    variant("entropy_bonus_seq_mean", rl={"entropy_coef": 0.3, "loss_agg": "seq_mean"}, f32=True),
    variant(
        "entropy_bonus_cispo_first_order",
        rl={"entropy_coef": 0.1, "loss": "cispo"},
        bilevel={"hypergradient": {"kind": "first_order", "unroll": 2}},
    ),
    # Several updates per rollout batch, π_old the sampling policy's: the
    # later updates see ratios ≠ 1, and the clip acts.
    variant(
        "updates_2x2_truncated",
        rl={"updates_per_batch": 2, "mini_batches": 2, "clip_low": 0.05, "clip_high": 0.05},
        sft={"batch_size": 4},
        optim={"lower": {"kind": "momentum", "lr": 0.1, "momentum": 0.5}},
        f32=True,
    ),
    variant(
        "updates_3x1_mix_adamw",
        rl={"updates_per_batch": 3, "loss": "cispo", "clip_low": 0.05, "clip_high": 0.05},
        bilevel={"method": "mix"},
        optim={"lower": {"kind": "adamw", "lr": 1e-2}},
    ),
    variant("method_mix", bilevel={"method": "mix"}),
    variant("method_rl_zero", bilevel={"method": "rl_zero"}),
    variant("method_sft", bilevel={"method": "sft"}),
    variant("method_cold_start", bilevel={"method": "cold_start"}),
]


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "hypergradient" and k != "lambda":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    lines = []

    def section(prefix, table):
        scalars = {k: v for k, v in table.items() if not (isinstance(v, dict) and k not in ("hypergradient", "lambda"))}
        subs = {k: v for k, v in table.items() if k not in scalars}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in subs.items():
            section(f"{prefix}.{k}", v)

    for k, v in doc.items():
        section(k, v)
    return "\n".join(lines)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def harden_params(path: str, shadow: bool, gen: torch.Generator):
    t = load_file(path)
    for k in list(t):
        if k.endswith("lora_B.weight"):
            t[k] = 0.05 * torch.randn(t[k].shape, generator=gen, dtype=torch.float64).to(t[k].dtype)
    if shadow:
        for k in list(t):
            if not k.startswith("base_model."):
                t[f"shadow.{k}"] = t[k] + 0.01 * torch.randn(t[k].shape, generator=gen, dtype=torch.float64).to(t[k].dtype)
    save_file(t, path)


def harden_batch(t: dict, prefix: str, gen: torch.Generator):
    mask = t[f"{prefix}rl.loss_mask"] > 0
    # Small groups of ±1 rewards often give all-zero advantages (and then an
    # RL loss that depends on nothing); use arbitrary advantages instead.
    adv = t[f"{prefix}rl.advantages"]
    t[f"{prefix}rl.advantages"] = torch.randn(adv.shape, generator=gen, dtype=torch.float64).to(adv.dtype)
    for key in ("rl.old_logprobs", "rl.ref_logprobs"):
        k = prefix + key
        if k in t:
            x = t[k].double() + 0.4 * torch.randn(t[k].shape, generator=gen, dtype=torch.float64)
            x = torch.where(mask, x, torch.full_like(x, float("nan")))
            t[k] = x.to(t[k].dtype)


def make_batch(coopc, pipeline, work, k_steps, prefixed, gen):
    if not prefixed:
        run([coopc, "init", pipeline, "--params", f"{work}/tmp.safetensors", "--batch", f"{work}/B.safetensors", "--seed", "7"])
        t = load_file(f"{work}/B.safetensors")
        harden_batch(t, "", gen)
        save_file(t, f"{work}/B.safetensors")
        return
    out = {}
    for k in range(k_steps):
        run([coopc, "init", pipeline, "--params", f"{work}/tmp.safetensors", "--batch", f"{work}/b{k}.safetensors", "--seed", str(11 + k)])
        for name, x in load_file(f"{work}/b{k}.safetensors").items():
            out[f"step{k}.{name}"] = x
        harden_batch(out, f"step{k}.", gen)
    # Unprefixed keys beside prefixed ones are ignored by both sides.
    run([coopc, "init", pipeline, "--params", f"{work}/tmp.safetensors", "--batch", f"{work}/b_extra.safetensors", "--seed", "99"])
    out.update(load_file(f"{work}/b_extra.safetensors"))
    save_file(out, f"{work}/B.safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coopc", default=os.path.join(ROOT, "target", "release", "coopc"))
    ap.add_argument("--only", help="run only variants whose name contains this")
    ap.add_argument("--keep", help="work in this folder and keep it")
    ap.add_argument("--tol64", type=float, default=1e-9)
    ap.add_argument("--tol32", type=float, default=1e-4)
    args = ap.parse_args(argv)
    peer = os.path.join(HERE, "torch_meta_step.py")
    compare = os.path.join(HERE, "compare_grads.py")
    root = args.keep or tempfile.mkdtemp(prefix="coopc-variants-")
    failures = 0
    passed = 0
    for v in VARIANTS:
        if args.only and args.only not in v["name"]:
            continue
        doc = merge(BASE, v["changes"])
        k_steps = doc["bilevel"]["hypergradient"].get("unroll", 1)
        for dtype in ["f64"] + (["f32"] if v["f32"] else []):
            doc = merge(doc, {"backend": {"dtype": dtype}})
            name = f"{v['name']}/{dtype}"
            work = os.path.join(root, v["name"], dtype)
            os.makedirs(work, exist_ok=True)
            pipeline = os.path.join(work, "pipeline.toml")
            with open(pipeline, "w") as f:
                f.write(to_toml(doc))
            gen = torch.Generator().manual_seed(1234)
            try:
                run([args.coopc, "check", pipeline])
                run([args.coopc, "init", pipeline, "--params", f"{work}/P.safetensors", "--seed", "3"])
                harden_params(f"{work}/P.safetensors", v["shadow_tensors"], gen)
                make_batch(args.coopc, pipeline, work, k_steps, v["prefixed"], gen)
                common = ["--params", f"{work}/P.safetensors", "--batch", f"{work}/B.safetensors"]
                run([args.coopc, "grad", pipeline, *common, "--out", f"{work}/G_coopc.safetensors"])
                run([sys.executable, peer, pipeline, *common, "--out", f"{work}/G_torch.safetensors", "--threads", "1"])
                tol = args.tol64 if dtype == "f64" else args.tol32
                r = subprocess.run(
                    [sys.executable, compare, f"{work}/G_coopc.safetensors", f"{work}/G_torch.safetensors",
                     "--params", f"{work}/P.safetensors", "--tol", str(tol), "--quiet"],
                    capture_output=True, text=True,
                )
                summary = r.stdout.strip().splitlines()
                ok = r.returncode == 0
                print(f"{'ok  ' if ok else 'FAIL'} {name:<38} {summary[0] if summary else r.stderr.strip()}")
                if not ok:
                    print("\n".join("      " + s for s in summary[1:]) + r.stderr)
                    failures += 1
                else:
                    passed += 1
            except RuntimeError as e:
                print(f"FAIL {name}: {e}")
                failures += 1
    print(f"{passed} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
