#!/usr/bin/env python3
"""Builds tiny, randomly initialised Hugging Face model folders of every
architecture coopc loads, with `transformers`' own classes and
`save_pretrained`, and the reference values coopc's tests compare against.

Run it through scripts/hf-fixtures.sh (which makes the virtual environment):

    scripts/hf-fixtures.sh                 # writes tests/fixtures/hf/

Each folder NAME/ holds what `save_pretrained` writes (config.json,
model.safetensors or shards with model.safetensors.index.json,
generation_config.json), a tokenizer (tokenizer.json,
tokenizer_config.json with a chat template) and expected.safetensors:

  input_ids      [2, 12] i64   fixed token ids (some past the tokenizer's size)
  logits_f32     [2, 12, V]    transformers' logits, the folder loaded in f32
  logprobs_f32   [2, 12]       log p(ids[t] | ids[<t]) in f32, entry 0 = 0
  logprobs_f64   [2, 12]       the same with the model in float64 (transformers
                               still computes RMSNorm, softmax and RoPE angles
                               in float32)

and chat.json: a conversation, the text transformers' apply_chat_template
renders for it (add_generation_prompt=True) and that text's token ids.
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 384  # config vocab_size; the tokenizers have fewer (as Qwen's do)
TOKENIZER_VOCAB = 360

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

QWEN_SPECIAL = dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN_TEMPLATE)
LLAMA_SPECIAL = dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                               "<|end_header_id|>", "<|eot_id|>"],
                     bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, template=LLAMA_TEMPLATE)
MISTRAL_SPECIAL = dict(specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                       bos="<s>", eos="</s>", pad=None, template=MISTRAL_TEMPLATE)

# Field values as the real models' configs have them, at toy width.
FIXTURES = {
    # Llama 3.2: llama3 RoPE scaling, θ 500000, tied embeddings.
    "llama32": dict(
        config=lambda: LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu"),
        dtype=torch.float32, tokens=LLAMA_SPECIAL, shard=None),
    # SmolLM2: Llama, θ 100000, tied, stored in f16.
    "smollm2": dict(
        config=lambda: LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu"),
        dtype=torch.float16, tokens=QWEN_SPECIAL, shard=None),
    # Qwen2.5: q/k/v biases, θ 1e6, tied, bf16, sharded.
    "qwen25": dict(
        config=lambda: Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            use_sliding_window=False, sliding_window=32768, max_window_layers=21,
            hidden_act="silu"),
        dtype=torch.bfloat16, tokens=QWEN_SPECIAL, shard="60KB"),
    # Qwen3: q/k RMSNorm per head, head_dim 32 ≠ 64 / 4, no biases.
    "qwen3": dict(
        config=lambda: Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
            hidden_act="silu"),
        dtype=torch.float32, tokens=QWEN_SPECIAL, shard=None),
    # Mistral v0.3: no sliding window, untied LM head.
    "mistral": dict(
        config=lambda: MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
            sliding_window=None, tie_word_embeddings=False, hidden_act="silu"),
        dtype=torch.float32, tokens=MISTRAL_SPECIAL, shard=None),
}


def corpus(data_dir):
    texts = []
    for name in ["train.jsonl", "test.jsonl"]:
        for line in open(data_dir / name):
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return texts


def build_tokenizer(texts, spec):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
        pad_token=spec["pad"], additional_special_tokens=[])
    fast.chat_template = spec["template"]
    return fast


def randomise(model, seed):
    """Weights large enough that the logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.3 * noise
            elif "embed_tokens" in name:
                value = 0.5 * noise
            else:
                value = noise / math.sqrt(p.shape[-1]) * 1.5
            p.copy_(value.to(p.dtype))


def token_logprobs(logits, ids):
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp[:, :-1, :].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(picked, (1, 0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/hf")
    ap.add_argument("--data", default="examples/data/gsm8k-sample")
    args = ap.parse_args()
    out, data = Path(args.out), Path(args.data)
    texts = corpus(data)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    conversation = [
        {"role": "user", "content": json.loads(open(data / "test.jsonl").readline())["question"]},
    ]
    for seed, (name, f) in enumerate(FIXTURES.items()):
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        torch.manual_seed(seed)
        config = f["config"]()
        tokenizer = build_tokenizer(texts, f["tokens"])
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        randomise(model, 1000 + seed)
        model = model.to(f["dtype"])
        kwargs = {"max_shard_size": f["shard"]} if f["shard"] else {}
        model.save_pretrained(d, **kwargs)
        tokenizer.save_pretrained(d)

        expected = {"input_ids": ids.clone()}
        for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
            m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager")
            m.eval()
            with torch.no_grad():
                logits = m(input_ids=ids).logits
            expected[f"logprobs_{tag}"] = token_logprobs(logits, ids).contiguous()
            if tag == "f32":
                expected["logits_f32"] = logits.contiguous()
        save_file(expected, str(d / "expected.safetensors"))

        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
        chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with open(d / "chat.json", "w") as fh:
            json.dump({"messages": conversation, "add_generation_prompt": True,
                       "text": text, "ids": chat_ids}, fh, indent=1)
        files = sorted(p.name for p in d.iterdir())
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"{name}: {config.architectures or type(model).__name__}, {f['dtype']}, "
              f"{size / 1024:.0f} KiB: {', '.join(files)}")


if __name__ == "__main__":
    main()
