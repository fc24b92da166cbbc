"""Tiny random decoders of each family kandle runs, with their outputs as transformers gives them.

For Llama (with Llama 3 rope scaling), Mistral (a sliding window shorter than the prompts),
Qwen2 (q/k/v biases, tied embeddings) and Qwen3 (per-head q/k norms, head_dim unlike
hidden/heads) this writes a small checkpoint of random weights (config.json,
model.safetensors, tokenizer.json) under server/tests/data/tiny/<family>/, and reference.json:
for a few prompts, the greedy continuation and the logits at every step of it, computed by
transformers in f32. server/tests/decoders.rs holds kandle to them. The weights are scaled up
from transformers' initialisation so that logits are spread out and greedy choices are not
near ties.

Needs torch and transformers (not in CI; the outputs are committed):
    python -m venv /tmp/tf && /tmp/tf/bin/pip install torch transformers
    /tmp/tf/bin/python scripts/reference/tiny_decoders.py
"""
import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "server", "tests", "data", "tiny")
VOCAB = 96
STEPS = 12
PROMPT_LENGTHS = [3, 10, 21]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=8, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    ),
}


def spread(model, generator):
    """Weights large enough that the logits differ by more than rounding. With tied
    embeddings a large embedding makes every token predict itself; a small one lets the
    layers decide."""
    embed_std = 0.25 if model.config.tie_word_embeddings else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            elif "embed" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 1.5 / p.shape[1] ** 0.5)


def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def main():
    torch.manual_seed(0)
    for family, (config_class, model_class, extra) in FAMILIES.items():
        generator = torch.Generator().manual_seed(sum(map(ord, family)))
        config = config_class(**COMMON, **extra)
        model = model_class(config).eval().to(torch.float32)
        model.config._attn_implementation = "eager"
        spread(model, generator)
        out = os.path.join(ROOT, family)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        for extra_file in ["generation_config.json"]:
            path = os.path.join(out, extra_file)
            if os.path.exists(path):
                os.remove(path)
        tokenizer().save(os.path.join(out, "tokenizer.json"))

        cases = []
        for length in PROMPT_LENGTHS:
            prompt = torch.randint(0, VOCAB, (1, length), generator=generator)
            tokens = prompt
            logits = []
            with torch.no_grad():
                for _ in range(STEPS):
                    last = model(tokens).logits[0, -1]
                    logits.append([round(float(v), 6) for v in last])
                    tokens = torch.cat([tokens, last.argmax().view(1, 1)], dim=1)
            cases.append(
                dict(
                    prompt_ids=prompt[0].tolist(),
                    greedy_ids=tokens[0, length:].tolist(),
                    logits=logits,
                )
            )
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(
                dict(
                    generator=f"transformers {transformers.__version__}, torch {torch.__version__}",
                    family=family,
                    cases=cases,
                ),
                f,
            )
            f.write("\n")
        print(family, [c["greedy_ids"] for c in cases], file=sys.stderr)


if __name__ == "__main__":
    main()
