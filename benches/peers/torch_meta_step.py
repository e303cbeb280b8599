#!/usr/bin/env python3
"""PyTorch peer of `coopc grad`: one BRIDGE meta-step on fixed data.

Computes, for a pipeline file, a parameter file P and a batch file B (the
inputs `coopc grad` takes, see docs/cli.md), the same outputs `coopc grad`
writes, with the same names:

- `loss.sft`, `loss.rl`: the losses at the initial θ on step 0's batch;
- `lower.<θ>`: ∇θ [(1−λ) L_SFT + λ L_RL] there (λ at meta-step 0);
- `theta_K.<θ>`: θ after the K lower steps;
- for `method = "bridge"`: `loss.up` = (1−λ) L_SFT(θ_K, w) +
  λ [L_RL(θ_K, w) − L_RL(θ̂_K, w)] on the last step's batch, and
  `hyper.<w>`, its hypergradient: `first_order` holds θ_K and θ̂_K fixed;
  `truncated` differentiates through the last T lower and shadow steps by
  plain reverse mode (`torch.autograd.grad(..., create_graph=True)` on the
  inner steps, AdamW's preconditioner detached), which is the exact
  derivative the adjoint recurrence of coopc's lowering forms.

The model is written out as a PyTorch user would write a Llama/Qwen2 decoder
with PEFT-style LoRA (pre-norm RMSNorm blocks, rotate-half RoPE, grouped-query
attention, SwiGLU, tied embeddings), over plain tensors so that the inner
steps can be unrolled functionally. Semantics: docs/semantics.md and
compiler/src/{model,losses,lowering}.rs.

Attention is F.scaled_dot_product_attention wherever only first derivatives
are taken, and the explicit softmax(QKᵀ/√d + causal mask)·V inside the
differentiated inner steps (SDPA's CPU kernel has no double backward).
`--compile` puts every loss evaluation through torch.compile; a truncated
hypergradient then needs the double backward of AOTAutograd's graphs, which
PyTorch does not support: the run reports `unsupported: <reason>` (exit 3).
`--compile outer` compiles only the losses that are differentiated once (the
lower and shadow steps of first_order, L_up, the steps before the truncation
window) and keeps the differentiated inner steps eager.

With `--repeat N` the meta-step runs N more times after the first (warm-up)
one; the median and minimum per meta-step, the peak memory (RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU) and the thread count are printed on
a line starting with `timing:`, and everything as JSON on a line starting
with `result:` (what benches/compare.sh reads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."
BUILTIN_VOCAB = {"addition": 24, "countdown": 32}
BATCH_KEYS = (
    "sft.input_ids",
    "sft.loss_mask",
    "rl.input_ids",
    "rl.loss_mask",
    "rl.advantages",
    "rl.old_logprobs",
)


class SpecError(Exception):
    """A pipeline or input file this peer cannot use."""


# ---------------------------------------------------------------------------
# The pipeline: the keys that decide the meta-step, defaults from
# docs/pipeline.md. Validation is coopc's job (`coopc check`); this reads a
# pipeline that coopc accepts.
# ---------------------------------------------------------------------------


@dataclass
class Optim:
    kind: str = "adamw"
    lr: float = 3e-4
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class Spec:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple
    clip_low: float
    clip_high: float
    kl_coef: float
    loss_agg: str
    method: str
    lambda0: float
    shadow: str
    hyper_kind: str
    unroll: int
    backprop: int
    lower: Optim
    dtype: str
    steps: int
    cold_start_steps: int = 0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    ratio_level: str = "token"
    loss: str = "ppo_clip"
    max_new_tokens: int = 32
    entropy_coef: float = 0.0
    updates_per_batch: int = 1
    mini_batches: int = 1
    notes: list = field(default_factory=list)

    @property
    def loss_kl_coef(self) -> float:
        """β of the KL term in the loss (0 when the penalty is in the reward)."""
        return 0.0 if self.kl_in_reward else self.kl_coef

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


def _table(doc: dict, key: str) -> dict:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise SpecError(f"`{key}` must be a table")
    return v


def load_spec(path: str) -> Spec:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    model = _table(doc, "model")
    lora = _table(doc, "lora")
    task = _table(doc, "task")
    rl = _table(doc, "rl")
    sft = _table(doc, "sft")
    bilevel = _table(doc, "bilevel")
    optim = _table(doc, "optim")
    train = _table(doc, "train")
    backend = _table(doc, "backend")

    for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq"):
        if key not in model:
            raise SpecError(f"{path}: `model.{key}` is required")
    task_kind = task.get("kind", "addition")
    vocab = model.get("vocab_size", BUILTIN_VOCAB.get(task_kind))
    if vocab is None:
        raise SpecError(f"{path}: `model.vocab_size` is required for task.kind = {task_kind!r}")

    rank = int(lora.get("rank", 8))
    method = bilevel.get("method", "bridge")
    steps = int(train.get("steps", 100))

    lam = bilevel.get("lambda", 0.5)
    if isinstance(lam, dict):
        # `start` at meta-step 0; the schedule's other steps are not needed here.
        lam_bridge = float(lam["start"])
    else:
        lam_bridge = float(lam)
    cold_start_steps = int(sft.get("cold_start_steps", steps // 2))
    lambda0 = {
        "bridge": lam_bridge,
        "mix": lam_bridge,
        "rl_zero": 1.0,
        "sft": 0.0,
        "cold_start": 0.0 if cold_start_steps > 0 else 1.0,
        "alternating": 0.0,
    }[method]

    hg = bilevel.get("hypergradient", {})
    kind = hg.get("kind", "first_order")
    unroll = int(hg.get("unroll", 1))
    backprop = int(hg.get("backprop", 0 if kind == "first_order" else unroll))

    def optim_of(which: str, default_lr: float) -> Optim:
        t = optim.get(which, {})
        o = Optim(kind=t.get("kind", "adamw"), lr=float(t.get("lr", default_lr)))
        for k in ("momentum", "beta1", "beta2", "eps", "weight_decay"):
            if k in t:
                setattr(o, k, float(t[k]))
        return o

    return Spec(
        vocab_size=int(vocab),
        d_model=int(model["d_model"]),
        n_layers=int(model["n_layers"]),
        n_heads=int(model["n_heads"]),
        n_kv_heads=int(model.get("n_kv_heads", model["n_heads"])),
        d_ff=int(model["d_ff"]),
        max_seq=int(model["max_seq"]),
        rope_theta=float(model.get("rope_theta", 10000.0)),
        rms_eps=float(model.get("rms_eps", 1e-6)),
        tie_embeddings=bool(model.get("tie_embeddings", True)),
        qkv_bias=bool(model.get("qkv_bias", False)),
        lora_rank=rank,
        lora_alpha=float(lora.get("alpha", 2 * rank)),
        lora_targets=tuple(lora.get("targets", PROJECTIONS)),
        clip_low=float(rl.get("clip_low", 0.2)),
        clip_high=float(rl.get("clip_high", 0.28)),
        kl_coef=float(rl.get("kl_coef", 0.0)),
        loss_agg=rl.get("loss_agg", "token_mean"),
        kl_estimator=rl.get("kl_estimator", "k3"),
        kl_in_reward=bool(rl.get("kl_in_reward", False)),
        ratio_level=rl.get("ratio_level", "token"),
        loss=rl.get("loss", "ppo_clip"),
        max_new_tokens=int(rl.get("max_new_tokens", 32)),
        entropy_coef=float(rl.get("entropy_coef", 0.0)),
        updates_per_batch=int(rl.get("updates_per_batch", 1)),
        mini_batches=int(rl.get("mini_batches", 1)),
        method=method,
        lambda0=lambda0,
        shadow=bilevel.get("shadow", "persistent"),
        hyper_kind=kind,
        unroll=max(unroll, 1),
        backprop=backprop,
        lower=optim_of("lower", 3e-4),
        dtype=backend.get("dtype", "f32"),
        steps=steps,
        cold_start_steps=cold_start_steps,
    )


# ---------------------------------------------------------------------------
# Parameter names (Hugging Face for θ, PEFT for w), in coopc's order.
# ---------------------------------------------------------------------------


def module_path(layer: int, proj: str) -> str:
    block = "self_attn" if proj in ATTN_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def proj_dims(s: Spec, proj: str) -> tuple[int, int]:
    hd = s.head_dim
    return {
        "q_proj": (s.n_heads * hd, s.d_model),
        "k_proj": (s.n_kv_heads * hd, s.d_model),
        "v_proj": (s.n_kv_heads * hd, s.d_model),
        "o_proj": (s.d_model, s.n_heads * hd),
        "gate_proj": (s.d_ff, s.d_model),
        "up_proj": (s.d_ff, s.d_model),
        "down_proj": (s.d_model, s.d_ff),
    }[proj]


def theta_shapes(s: Spec) -> list[tuple[str, tuple]]:
    v = [("model.embed_tokens.weight", (s.vocab_size, s.d_model))]
    for i in range(s.n_layers):
        v.append((f"model.layers.{i}.input_layernorm.weight", (s.d_model,)))
        for p in PROJECTIONS:
            o, inp = proj_dims(s, p)
            v.append((f"{module_path(i, p)}.weight", (o, inp)))
            if s.qkv_bias and p in ("q_proj", "k_proj", "v_proj"):
                v.append((f"{module_path(i, p)}.bias", (o,)))
        v.append((f"model.layers.{i}.post_attention_layernorm.weight", (s.d_model,)))
    v.append(("model.norm.weight", (s.d_model,)))
    if not s.tie_embeddings:
        v.append(("lm_head.weight", (s.vocab_size, s.d_model)))
    return v


def lora_name(layer: int, proj: str, which: str) -> str:
    return f"{PEFT_PREFIX}{module_path(layer, proj)}.lora_{which}.weight"


def lora_shapes(s: Spec) -> list[tuple[str, tuple]]:
    v = []
    for i in range(s.n_layers):
        for p in PROJECTIONS:
            if p in s.lora_targets:
                o, inp = proj_dims(s, p)
                v.append((lora_name(i, p, "A"), (s.lora_rank, inp)))
                v.append((lora_name(i, p, "B"), (o, s.lora_rank)))
    return v


# ---------------------------------------------------------------------------
# The policy: Llama/Qwen2 decoder with LoRA, over dicts of tensors.
# ---------------------------------------------------------------------------


class Policy:
    def __init__(self, s: Spec, dtype: torch.dtype, device: torch.device, attention: str):
        self.s = s
        self.dtype = dtype
        self.device = device
        # "sdpa": F.scaled_dot_product_attention wherever only first
        # derivatives are taken (its CPU kernel has no double backward);
        # "eager": softmax(QKᵀ/√d + causal mask) V everywhere.
        self.attention = attention
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, t: int):
        if t not in self._rope:
            # HF Llama's rotate-half tables, computed in f64 as coopc does.
            hd = self.s.head_dim
            inv = 1.0 / (self.s.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            pos = torch.arange(t, dtype=torch.float64)
            freqs = torch.outer(pos, inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._rope[t] = (
                emb.cos().to(self.dtype).to(self.device),
                emb.sin().to(self.dtype).to(self.device),
            )
        return self._rope[t]

    def rms_norm(self, x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.s.rms_eps) * g

    def linear(self, x, theta, w, layer, proj):
        path = module_path(layer, proj)
        y = x @ theta[f"{path}.weight"].T
        bias = theta.get(f"{path}.bias")
        if bias is not None:
            y = y + bias
        if proj in self.s.lora_targets:
            a = w[lora_name(layer, proj, "A")]
            b = w[lora_name(layer, proj, "B")]
            y = y + ((x @ a.T) @ b.T) * self.s.lora_scale
        return y

    @staticmethod
    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], dim=-1)

    def attend(self, q, k, v, double_backward: bool):
        if self.attention == "sdpa" and not double_backward:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def token_logprobs(self, theta, w, ids, double_backward=False, with_entropy=False):
        """[B, T]: entry t is log π(ids[t] | ids[<t]) from the logits at t − 1; entry 0 is 0.
        With `with_entropy`, also the entropy of each of those distributions [B, T]."""
        s = self.s
        b, t = ids.shape
        hd = s.head_dim
        cos, sin = self.rope(t)
        x = F.embedding(ids, theta["model.embed_tokens.weight"])
        for i in range(s.n_layers):
            h = self.rms_norm(x, theta[f"model.layers.{i}.input_layernorm.weight"])
            q = self.linear(h, theta, w, i, "q_proj").view(b, t, s.n_heads, hd).transpose(1, 2)
            k = self.linear(h, theta, w, i, "k_proj").view(b, t, s.n_kv_heads, hd).transpose(1, 2)
            v = self.linear(h, theta, w, i, "v_proj").view(b, t, s.n_kv_heads, hd).transpose(1, 2)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            if s.n_kv_heads != s.n_heads:
                rep = s.n_heads // s.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            a = self.attend(q, k, v, double_backward)
            a = a.transpose(1, 2).reshape(b, t, s.n_heads * hd)
            x = x + self.linear(a, theta, w, i, "o_proj")
            h = self.rms_norm(x, theta[f"model.layers.{i}.post_attention_layernorm.weight"])
            act = F.silu(self.linear(h, theta, w, i, "gate_proj")) * self.linear(h, theta, w, i, "up_proj")
            x = x + self.linear(act, theta, w, i, "down_proj")
        x = self.rms_norm(x, theta["model.norm.weight"])
        head = theta.get("lm_head.weight", theta["model.embed_tokens.weight"])
        logits = x[:, :-1] @ head.T
        lp = torch.log_softmax(logits, dim=-1)
        picked = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            entropy = -(lp.exp() * lp).sum(-1)
            return F.pad(picked, (1, 0)), F.pad(entropy, (1, 0))
        return F.pad(picked, (1, 0))


# ---------------------------------------------------------------------------
# Losses (docs/semantics.md §4).
# ---------------------------------------------------------------------------


def sft_loss(lp, mask):
    return -(lp * mask).sum() / mask.sum()


class CispoTerm(torch.autograd.Function):
    """`clip(exp(lp − old), lo, hi) · lp` with the clipped ratio a constant
    of the value's gradient (a stop-gradient), while the gradient itself,
    `clip(exp(lp − old))`, stays a differentiable function of lp: the lower
    step depends on θ through it, and a second-order hypergradient
    differentiates that, as coopc does (docs/semantics.md §4.2)."""

    @staticmethod
    def forward(ctx, lp, ratio, lo, hi):
        ctx.save_for_backward(ratio)
        ctx.lo, ctx.hi = lo, hi
        return ratio.detach().clamp(lo, hi) * lp

    @staticmethod
    def backward(ctx, g):
        (ratio,) = ctx.saved_tensors
        # `ratio` carries its graph to lp (a differentiable backward).
        return g * ratio.clamp(ctx.lo, ctx.hi), None, None, None


def kl_estimate(kind: str, diff):
    if kind == "k1":
        return -diff
    if kind == "k2":
        return 0.5 * diff * diff
    if kind == "k3":
        return diff.exp() - diff - 1.0
    raise SpecError(f"rl.kl_estimator = {kind!r} is not known")


def grpo_loss(s: Spec, lp, batch, entropy=None):
    mask = batch["rl.loss_mask"]
    on = mask > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    # Masked positions: ratio 1, KL 0, weight 0 (garbage there is dropped).
    d = torch.where(on, lp - batch["rl.old_logprobs"], zero)
    if s.ratio_level == "token":
        ratio = d.exp()
    elif s.ratio_level == "sequence":
        # GSPO: exp of the mask-weighted mean log-ratio of each sequence.
        cnt = mask.sum(1, keepdim=True)
        safe = torch.where(cnt > 0, cnt, torch.ones_like(cnt))
        ratio = ((d * mask).sum(1, keepdim=True) / safe).exp().expand_as(lp)
    else:
        raise SpecError(f"rl.ratio_level = {s.ratio_level!r} is not known")
    adv = batch["rl.advantages"].unsqueeze(1)
    lo, hi = 1.0 - s.clip_low, 1.0 + s.clip_high
    if s.loss == "ppo_clip":
        unclipped = ratio * adv
        clipped = ratio.clamp(lo, hi) * adv
        # min, crediting the unclipped term on a tie.
        surrogate = torch.where(unclipped <= clipped, unclipped, clipped)
        per_token = -surrogate
    elif s.loss == "cispo":
        lp_on = torch.where(on, lp, zero)
        per_token = -adv * CispoTerm.apply(lp_on, ratio, lo, hi)
    else:
        raise SpecError(f"rl.loss = {s.loss!r} is not known")
    if s.loss_kl_coef > 0:
        diff = torch.where(on, batch["rl.ref_logprobs"] - lp, zero)
        per_token = per_token + s.loss_kl_coef * kl_estimate(s.kl_estimator, diff)
    loss = aggregate(s, per_token, mask)
    if s.entropy_coef > 0:
        # The entropy bonus, aggregated as the loss is.
        loss = loss - s.entropy_coef * aggregate(s, entropy, mask)
    return loss


def aggregate(s: Spec, per_token, mask):
    """Σ w ∘ per_token with the weights of `rl.loss_agg`."""
    weighted = per_token * mask
    if s.loss_agg == "token_mean":
        return weighted.sum() / mask.sum()
    if s.loss_agg == "seq_mean":
        cnt = mask.sum(1)
        has = cnt > 0
        per_seq = weighted.sum(1) / torch.where(has, cnt, torch.ones_like(cnt))
        hasf = has.to(per_token.dtype)
        return (per_seq * hasf).sum() / hasf.sum()
    if s.loss_agg == "seq_mean_token_sum_norm":
        # Dr. GRPO: token sums over a constant, the mean over all rows.
        return weighted.sum() / (mask.shape[0] * s.max_new_tokens)
    raise SpecError(f"rl.loss_agg = {s.loss_agg!r} is not known")


class Objective:
    """The losses of the meta-step on one step's batch (a dict of tensors)."""

    def __init__(self, s: Spec, policy: Policy, lam: float):
        self.s = s
        self.policy = policy
        self.lam = lam

    def sft(self, theta, w, batch, double_backward=False):
        lp = self.policy.token_logprobs(theta, w, batch["sft.input_ids"], double_backward)
        return sft_loss(lp, batch["sft.loss_mask"])

    def rl(self, theta, w, batch, double_backward=False):
        ids = batch["rl.input_ids"]
        if self.s.entropy_coef > 0:
            lp, entropy = self.policy.token_logprobs(theta, w, ids, double_backward, with_entropy=True)
            return grpo_loss(self.s, lp, batch, entropy)
        lp = self.policy.token_logprobs(theta, w, ids, double_backward)
        return grpo_loss(self.s, lp, batch)

    def lower(self, theta, w, batch, double_backward=False):
        """((1−λ) L_SFT + λ L_RL, L_SFT, L_RL); both terms are always evaluated."""
        sft = self.sft(theta, w, batch, double_backward)
        rl = self.rl(theta, w, batch, double_backward)
        return (1.0 - self.lam) * sft + self.lam * rl, sft, rl


# ---------------------------------------------------------------------------
# Optimisers, PyTorch conventions, written functionally so that a step can be
# differentiated through. AdamW's preconditioner is detached (frozen).
# ---------------------------------------------------------------------------


def zero_state(opt: Optim, params: list[torch.Tensor]) -> dict:
    if opt.kind == "sgd":
        return {}
    if opt.kind == "momentum":
        return {"momentum_buffer": [torch.zeros_like(p) for p in params]}
    if opt.kind == "adamw":
        return {
            "exp_avg": [torch.zeros_like(p) for p in params],
            "exp_avg_sq": [torch.zeros_like(p) for p in params],
            "step": 0,
        }
    raise SpecError(f"optimiser kind {opt.kind!r} is not known")


def opt_step(opt: Optim, params, grads, state):
    lr = opt.lr
    if opt.kind == "sgd":
        return [p - lr * g for p, g in zip(params, grads)], {}
    if opt.kind == "momentum":
        bufs = [opt.momentum * b + g for b, g in zip(state["momentum_buffer"], grads)]
        return [p - lr * b for p, b in zip(params, bufs)], {"momentum_buffer": bufs}
    # AdamW.
    t = state["step"] + 1
    c1 = 1.0 - opt.beta1**t
    c2 = 1.0 - opt.beta2**t
    new, ms, vs = [], [], []
    for p, g, m, v in zip(params, grads, state["exp_avg"], state["exp_avg_sq"]):
        m2 = opt.beta1 * m + (1.0 - opt.beta1) * g
        gd = g.detach()
        v2 = opt.beta2 * v + (1.0 - opt.beta2) * gd * gd
        d = lr / (((v2 / c2).sqrt() + opt.eps) * c1)
        decayed = p * (1.0 - lr * opt.weight_decay) if opt.weight_decay != 0.0 else p
        new.append(decayed - d * m2)
        ms.append(m2)
        vs.append(v2)
    return new, {"exp_avg": ms, "exp_avg_sq": vs, "step": t}


def detach_state(state: dict) -> dict:
    return {k: [x.detach() for x in v] if isinstance(v, list) else v for k, v in state.items()}


# ---------------------------------------------------------------------------
# The meta-step.
# ---------------------------------------------------------------------------


class MetaStep:
    def __init__(self, s: Spec, policy: Policy, compile: str | None):
        self.s = s
        self.theta_names = [n for n, _ in theta_shapes(s)]
        self.w_names = [n for n, _ in lora_shapes(s)]
        self.bridge = s.method == "bridge"
        if self.bridge and s.hyper_kind not in ("first_order", "truncated"):
            raise SpecError(
                f"unsupported: hypergradient kind {s.hyper_kind!r} (this peer implements first_order and truncated)"
            )
        self.backprop = min(s.backprop, s.unroll) if (self.bridge and s.hyper_kind == "truncated") else 0
        obj = Objective(s, policy, s.lambda0)
        # The losses as used where only first derivatives are taken, and as
        # used inside the differentiated inner steps, whose gradients are
        # differentiated again. compile = "all" puts both through
        # torch.compile; "outer" only the first (AOTAutograd's backward is not
        # differentiable again).
        self.lower_fn = torch.compile(obj.lower) if compile in ("all", "outer") else obj.lower
        self.rl_fn = torch.compile(obj.rl) if compile in ("all", "outer") else obj.rl
        self.lower_fn2 = torch.compile(obj.lower) if compile == "all" else obj.lower
        self.rl_fn2 = torch.compile(obj.rl) if compile == "all" else obj.rl

    def update_batches(self, batches: list[dict]) -> list[dict]:
        """Each step's batch as `updates_per_batch` epochs of `mini_batches`
        equal row slices: one optimiser update each."""
        s = self.s
        out = []
        for b in batches:
            minis = [
                {k: v[m * v.shape[0] // s.mini_batches : (m + 1) * v.shape[0] // s.mini_batches] for k, v in b.items()}
                for m in range(s.mini_batches)
            ]
            for _ in range(s.updates_per_batch):
                out.extend(minis)
        return out

    def unroll(self, chain: str, theta0: list, w: dict, batches: list[dict]):
        """The K steps' optimiser updates of a chain from theta0; the last T
        steps' updates keep their graph."""
        s = self.s
        batches = self.update_batches(batches)
        k_steps = len(batches)
        backprop = self.backprop * s.updates_per_batch * s.mini_batches
        theta = [t.detach() for t in theta0]
        state = zero_state(s.lower, theta)
        w_const = {n: x.detach() for n, x in w.items()}
        first = None
        for k in range(k_steps):
            differentiated = k + backprop >= k_steps
            if not differentiated or not any(t.requires_grad for t in theta):
                theta = [t.detach().requires_grad_(True) for t in theta]
                state = detach_state(state)
            tp = dict(zip(self.theta_names, theta))
            if chain == "lower":
                if differentiated:
                    loss, sft, rl = self.lower_fn2(tp, w, batches[k], True)
                else:
                    loss, sft, rl = self.lower_fn(tp, w_const, batches[k], False)
            else:
                if differentiated:
                    loss = self.rl_fn2(tp, w, batches[k], True)
                else:
                    loss = self.rl_fn(tp, w_const, batches[k], False)
            grads = torch.autograd.grad(loss, theta, create_graph=differentiated)
            if k == 0 and chain == "lower":
                first = (sft.detach(), rl.detach(), [g.detach() for g in grads])
            if differentiated:
                theta, state = opt_step(s.lower, theta, grads, state)
            else:
                with torch.no_grad():
                    theta, state = opt_step(s.lower, [t.detach() for t in theta], grads, state)
        return theta, first

    def __call__(self, theta0: dict, w0: dict, shadow0: dict | None, batches: list[dict]):
        s = self.s
        th0 = [theta0[n] for n in self.theta_names]
        w = {n: w0[n].detach().requires_grad_(self.bridge) for n in self.w_names}
        out = {}
        theta_k, first = self.unroll("lower", th0, w, batches)
        sft0, rl0, lower_grads = first
        out["loss.sft"] = sft0
        out["loss.rl"] = rl0
        for n, g in zip(self.theta_names, lower_grads):
            out[f"lower.{n}"] = g
        if self.bridge:
            if s.shadow == "persistent" and shadow0 is not None:
                sh0 = [shadow0[n] for n in self.theta_names]
            else:
                sh0 = th0
            shadow_k, _ = self.unroll("shadow", sh0, w, batches)
            if self.backprop == 0:
                theta_k = [t.detach() for t in theta_k]
                shadow_k = [t.detach() for t in shadow_k]
            # L_up at θ_K, θ̂_K on the last step's batch; only first
            # derivatives of this forward pass are taken.
            last = batches[s.unroll - 1]
            at_theta, _, _ = self.lower_fn(dict(zip(self.theta_names, theta_k)), w, last, False)
            rl_shadow = self.rl_fn(dict(zip(self.theta_names, shadow_k)), w, last, False)
            l_up = at_theta - s.lambda0 * rl_shadow
            hyper = torch.autograd.grad(l_up, [w[n] for n in self.w_names])
            out["loss.up"] = l_up.detach()
            for n, h in zip(self.w_names, hyper):
                out[f"hyper.{n}"] = h
        for n, t in zip(self.theta_names, theta_k):
            out[f"theta_K.{n}"] = t.detach()
        return out


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file")


def load_params(s: Spec, path: str, dtype, device):
    raw = read_safetensors(path)
    expected = dict(theta_shapes(s))
    expected.update(lora_shapes(s))
    has_shadow = any(k.startswith("shadow.") for k in raw)
    if has_shadow:
        expected.update({f"shadow.{n}": sh for n, sh in theta_shapes(s)})
    for n, sh in expected.items():
        if n not in raw:
            raise SpecError(f"parameter file {path}: missing tensor `{n}`")
        if tuple(raw[n].shape) != tuple(sh):
            raise SpecError(f"parameter file {path}: `{n}` has shape {list(raw[n].shape)}, expected {list(sh)}")
    extra = sorted(set(raw) - set(expected))
    if extra:
        raise SpecError(f"parameter file {path}: unexpected tensor `{extra[0]}`")
    conv = {n: raw[n].to(device=device, dtype=dtype) for n in expected}
    theta = {n: conv[n] for n, _ in theta_shapes(s)}
    w = {n: conv[n] for n, _ in lora_shapes(s)}
    shadow = {n: conv[f"shadow.{n}"] for n, _ in theta_shapes(s)} if has_shadow else None
    return theta, w, shadow


def load_batches(s: Spec, path: str, dtype, device) -> list[dict]:
    raw = read_safetensors(path)
    keys = list(BATCH_KEYS) + (["rl.ref_logprobs"] if s.loss_kl_coef > 0 else [])
    prefixed = any(
        k.startswith("step") and k[4:].split(".", 1)[0].isdigit() and "." in k for k in raw
    )
    batches = []
    for k in range(s.unroll):
        b = {}
        for key in keys:
            src = f"step{k}.{key}" if prefixed else key
            if src not in raw:
                raise SpecError(f"{path}: missing tensor `{src}`")
            x = raw[src]
            if key.endswith("input_ids"):
                x = x.to(device=device, dtype=torch.long)
            else:
                x = x.to(device=device, dtype=dtype)
            b[key] = x
        for key in ("sft.loss_mask", "rl.loss_mask"):
            if (b[key][:, 0] != 0).any():
                raise SpecError(f"{path}: `{key}`[:, 0] must be 0 (position 0 has no log-probability)")
        batches.append(b)
    return batches


def write_safetensors(path: str, tensors: dict):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--params", required=True, help="P.safetensors (θ by HF names, w by PEFT names, optional shadow.*)")
    ap.add_argument("--batch", required=True, help="B.safetensors (sft.*, rl.*, optionally step{k}.-prefixed)")
    ap.add_argument("--out", help="G.safetensors to write (same names as `coopc grad`)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the pipeline's backend.dtype")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="all",
        choices=["all", "outer"],
        help="run the loss functions through torch.compile: all of them (default), or only those "
        "differentiated once (`outer`; the inner steps of a truncated hypergradient stay eager)",
    )
    ap.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="sdpa: F.scaled_dot_product_attention where only first derivatives are taken (default); eager: explicit softmax everywhere",
    )
    ap.add_argument("--repeat", type=int, default=0, help="time N meta-steps after one warm-up")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: the CPUs this process may use)")
    ap.add_argument("--label", default="", help="free text copied into the result line")
    ap.add_argument("--dry-run", action="store_true", help="read and check the inputs, then stop")
    args = ap.parse_args(argv)

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is false", file=sys.stderr)
        return 2

    try:
        spec = load_spec(args.pipeline)
        dtype = DTYPES[args.dtype or spec.dtype]
        theta, w, shadow = load_params(spec, args.params, dtype, device)
        batches = load_batches(spec, args.batch, dtype, device)
        policy = Policy(spec, dtype, device, args.attention)
        step = MetaStep(spec, policy, args.compile)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    mode = f"compile-{args.compile}" if args.compile else "eager"
    desc = (
        f"torch {torch.__version__} · {device.type} · {args.dtype or spec.dtype} · {mode} · "
        f"{threads} threads · {spec.method}"
        + (f" · {spec.hyper_kind} hypergradient" if spec.method == "bridge" else "")
        + f", K = {spec.unroll} · λ = {spec.lambda0}"
    )
    print(f"torch_meta_step: {desc}")
    if args.dry_run:
        n_theta = sum(x.numel() for x in theta.values())
        n_w = sum(x.numel() for x in w.values())
        b0 = batches[0]
        print(
            f"  inputs ok: θ {n_theta:,} and w {n_w:,} parameters"
            + (", shadow.* given" if shadow is not None else "")
            + f"; {len(batches)} step batch(es) of SFT {list(b0['sft.input_ids'].shape)}, RL {list(b0['rl.input_ids'].shape)}"
        )
        return 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_once():
        out = step(theta, w, shadow, batches)
        sync()
        return out

    result = {
        "peer": "torch",
        "torch": torch.__version__,
        "device": device.type,
        "dtype": args.dtype or spec.dtype,
        "mode": mode,
        "threads": threads,
        "method": spec.method,
        "hypergradient": spec.hyper_kind if spec.method == "bridge" else None,
        "label": args.label,
    }
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        out = run_once()
    except Exception as e:  # noqa: BLE001 — a torch.compile failure is a result, not a crash
        if not args.compile:
            raise
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"unsupported: torch.compile on this meta-step fails ({reason})")
        result.update({"status": "unsupported", "reason": reason})
        print("result: " + json.dumps(result))
        return 3
    first_s = time.perf_counter() - t0

    for k in ("loss.sft", "loss.rl", "loss.up"):
        if k in out:
            print(f"  {k:<9} = {out[k].item():.9f}")

    def norm(prefix):
        return math.sqrt(sum(float(v.double().pow(2).sum()) for n, v in out.items() if n.startswith(prefix)))

    print(f"  ‖lower‖   = {norm('lower.'):.9f}")
    if spec.method == "bridge":
        print(f"  ‖hyper‖   = {norm('hyper.'):.9f}")
    if args.out:
        write_safetensors(args.out, out)
        print(f"  {len(out)} tensors written to {args.out} (first meta-step {first_s * 1e3:.1f} ms)")

    result.update({"status": "ok", "first_ms": first_s * 1e3})
    if args.repeat > 0:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            run_once()
            times.append(time.perf_counter() - t)
        peak = peak_memory_bytes(device)
        median = statistics.median(times)
        what = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
        print(
            f"  timing: {len(times)} runs, median {median * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms, "
            f"{what} {peak / 2**20:.1f} MiB, {threads} threads"
        )
        result.update(
            {
                "runs": len(times),
                "median_ms": median * 1e3,
                "min_ms": min(times) * 1e3,
                "peak_mib": peak / 2**20,
                "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "rss",
            }
        )
    print("result: " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
