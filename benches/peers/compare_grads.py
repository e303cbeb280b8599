#!/usr/bin/env python3
"""Compares two `coopc grad`-style outputs (G files) tensor by tensor.

    compare_grads.py G_REF G_OTHER [--params P] [--tol 1e-4] [--floor 1e-3]

G_REF is the reference (coopc's output), G_OTHER the file to check (a peer's).
Per tensor the relative error is ‖other − ref‖ / max(‖ref‖, floor · scale),
where scale is the largest ‖ref‖ of the tensor's group (`loss`, `lower`,
`theta_K`, `hyper`): a tensor that is near zero at the group's scale (say
`loss.rl` on a fresh batch, whose advantages cancel, or `hyper.*lora_A` while
every LoRA B is zero) is measured against the group's scale instead of its own
roundoff-sized norm. With `--params P` the update θ_K − θ is compared as well
(group `delta_K`), since θ_K itself is dominated by θ; there an error within
the rounding of θ_K to the file's dtype (4 ε ‖θ_K‖) is not counted.

Prints, per group, the largest relative error and where it occurs, and the
error of the group as one concatenated vector; exits with 1 when a tensor
exceeds --tol, 2 when the files do not hold the same tensors.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from safetensors.torch import load_file

GROUPS = ("loss", "lower", "theta_K", "delta_K", "hyper")


def group_of(name: str) -> str:
    return name.split(".", 1)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="reference G file (coopc grad's output)")
    ap.add_argument("other", help="G file to check")
    ap.add_argument("--params", help="P file the meta-step started from: also compare θ_K − θ")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed relative error per tensor")
    ap.add_argument("--floor", type=float, default=1e-3, help="near-zero floor, as a fraction of the group's scale")
    ap.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = ap.parse_args(argv)

    raw_ref = load_file(args.ref)
    ref = {k: v.double() for k, v in raw_ref.items()}
    other = {k: v.double() for k, v in load_file(args.other).items()}
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    if missing or extra:
        for n in missing:
            print(f"error: {args.other} lacks `{n}`", file=sys.stderr)
        for n in extra:
            print(f"error: {args.other} has `{n}`, which {args.ref} lacks", file=sys.stderr)
        return 2
    for n in ref:
        if ref[n].shape != other[n].shape:
            print(f"error: `{n}` has shape {list(other[n].shape)}, reference {list(ref[n].shape)}", file=sys.stderr)
            return 2

    # θ_K − θ can be no more exact than θ_K's rounding to the file's dtype:
    # an error below 4 ε ‖θ_K‖ is never counted against the update.
    rounding: dict[str, float] = {}
    if args.params:
        p = {k: v.double() for k, v in load_file(args.params).items()}
        for n in list(ref):
            if n.startswith("theta_K."):
                base = p[n[len("theta_K.") :]]
                d = "delta_K." + n[len("theta_K.") :]
                ref[d] = ref[n] - base
                other[d] = other[n] - base
                eps = torch.finfo(raw_ref[n].dtype).eps if raw_ref[n].dtype.is_floating_point else 0.0
                rounding[d] = 4.0 * eps * float(ref[n].norm()) / args.tol

    groups: dict[str, list[str]] = {}
    for n in sorted(ref):
        groups.setdefault(group_of(n), []).append(n)

    worst_all = 0.0
    failures = []
    lines = []
    for g in sorted(groups, key=lambda g: GROUPS.index(g) if g in GROUPS else len(GROUPS)):
        names = groups[g]
        scale = max(float(ref[n].norm()) for n in names)
        floor = max(args.floor * scale, 1e-300)
        worst, worst_name, near_zero = 0.0, names[0], []
        diff_sq, ref_sq = 0.0, 0.0
        for n in names:
            d = float((other[n] - ref[n]).norm())
            r = float(ref[n].norm())
            diff_sq += d * d
            ref_sq += r * r
            if r < floor:
                near_zero.append(n)
            err = d / max(r, floor, rounding.get(n, 0.0))
            if not math.isfinite(err):
                err = math.inf
            if err > worst:
                worst, worst_name = err, n
            if err > args.tol:
                failures.append((n, err))
        overall = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-300)
        worst_all = max(worst_all, worst)
        line = (
            f"  {g:<8} {len(names):>4} tensors  max rel err {worst:.3e} ({worst_name})  "
            f"group rel err {overall:.3e}"
        )
        if near_zero:
            line += f"  [{len(near_zero)} near zero, measured against {floor:.2e}]"
        lines.append(line)
    if not args.quiet:
        print(f"compare_grads: {args.other} against {args.ref} (tolerance {args.tol:g})")
        for n in ("loss.sft", "loss.rl", "loss.up"):
            if n in ref:
                print(f"  {n:<9} ref {float(ref[n]):+.9e}  other {float(other[n]):+.9e}")
        print("\n".join(lines))
    status = "ok" if not failures else f"FAIL ({len(failures)} tensors above {args.tol:g})"
    n_delta = sum(1 for n in ref if n.startswith("delta_K."))
    counted = f"{len(ref) - n_delta} tensors" + (f" (+{n_delta} updates θ_K − θ)" if n_delta else "")
    print(f"compare_grads: max rel err {worst_all:.3e} over {counted}: {status}")
    for n, e in failures[:10]:
        print(f"  above tolerance: {n}: {e:.3e}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
