#!/usr/bin/env python3
"""Checks that what coopc writes loads in transformers and PEFT and means
what coopc computed: a run's latest checkpoint (a Hugging Face model folder
of θ with w as a PEFT adapter in adapter/) and a `coopc export --merged`
folder must give coopc's own token log-probs.

Run through scripts/hf-fixtures.sh, which makes the virtual environment:

    coopc run examples/hf-tiny.toml --steps 3 --out runs/rt
    coopc export runs/rt --merged runs/rt-merged --dtype f32
    scripts/hf-fixtures.sh roundtrip runs/rt runs/rt-merged target/release/coopc

Prints each comparison and exits non-zero when one fails.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def token_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp[:, :-1, :].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(picked, (1, 0))


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    run, merged, coopc = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    # The run's dtype (the checkpoint's config says it): f32, or f64.
    dtype = torch.float64 if '"float64"' in (ckpt / "config.json").read_text() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype,
                                                attn_implementation="eager").eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.safetensors", Path(tmp) / "lp.safetensors"
        save_file({"input_ids": ids}, str(ids_file))
        subprocess.run([coopc, "score", str(run), "--ids", str(ids_file), "--out", str(out_file)],
                       check=True)
        ours = load_file(str(out_file))["logprobs"].double()

    theta_only = token_logprobs(base, ids)
    peft = PeftModel.from_pretrained(base, ckpt / "adapter", adapter_name="w").eval()
    if (ckpt / "lower_adapter").exists():
        # The lower level trained a LoRA of θ: both adapters are active.
        peft.load_adapter(ckpt / "lower_adapter", adapter_name="lower")
        peft.base_model.set_adapter(["w", "lower"])
        print("checkpoint θ is the frozen base; adapters: adapter/ (w) and lower_adapter/ (θ's LoRA)")
    with_adapter = token_logprobs(peft, ids)
    exported = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype,
                                                    attn_implementation="eager").eval()
    from_merged = token_logprobs(exported, ids)

    # transformers' two paths to the same policy differ by f32 rounding;
    # coopc must agree with each within 1e-5, or within twice that
    # difference where the log-probs are large enough for it to exceed 1e-5.
    hf_spread = (with_adapter - from_merged).abs().max().item()
    tol = max(1e-5, 2 * hf_spread)
    print(f"{dtype}; log-probs between {ours.min().item():.2f} and {ours.max().item():.2f}; "
          f"PEFT vs merged export: {hf_spread:.3e}")
    checks = [
        ("PEFT (checkpoint θ + its adapters) vs coopc", (with_adapter - ours).abs().max().item(), tol, "<"),
        ("merged export vs coopc", (from_merged - ours).abs().max().item(), tol, "<"),
        ("the adapters' effect (θ alone vs θ + adapters)",
         (theta_only - with_adapter).abs().max().item(), 1e-4, ">"),
    ]
    failed = False
    for name, value, bound, op in checks:
        ok = value < bound if op == "<" else value > bound
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |Δ log p| = {value:.3e} (want {op} {bound:.3g})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
