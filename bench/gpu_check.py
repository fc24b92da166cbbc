"""The GPU check: one command, on a GPU machine with no Rust toolchain, from the folder that
scripts/pack-gpu-check makes (the CUDA kandle-server, this script, bench/serving.py, the tiny
decoders of server/tests/data/tiny, all-MiniLM-L6-v2 and SmolLM2-135M-Instruct Q4_1 GGUF):

    python3 gpu_check.py

1. Prints the GPU, its driver, and the CUDA libraries the server links against.
2. Correctness, each model served on the CPU and on the GPU by the same binary, greedy:
   the tiny Llama, Mistral, Qwen2 and Qwen3 in f32 must give identical tokens (in bf16 the
   share of identical tokens is reported); SmolLM2 may part from the CPU only where the CPU's
   two best tokens are near a tie; MiniLM's embeddings (f32 and bf16) must be within cosine
   0.999 of the CPU's.
3. Performance through the HTTP server: MiniLM embeddings/s at batch 1, 32 and 128 against
   sentence-transformers on PyTorch on the same GPU (fp32 and bf16, when installed); SmolLM2
   time to first token (a 37- and a 300-token prompt), decode tokens/s at concurrency 1 and
   aggregate tokens/s at concurrency 32 and 128; process start to ready.

Exits 1 when a correctness check fails. Results: gpu-check.json here, and in $OUT when set.
`--device cpu` runs the same check with the CPU standing in for the GPU (its "GPU" server runs
candle's portable operations, `--kernels portable`), to try the check on a machine without one.
"""
import argparse
import glob
import json
import lzma
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from serving import decode_rates, post, start_server, stream_chat  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
GREEDY_TOKENS = 24
NEAR_TIE = 1.0  # logprob gap under which two greedy decoders may pick differently
COSINE_FLOOR = 0.999
SENTENCES = [f"Sentence number {i} talks about kubernetes, gpus and serving models quickly." for i in range(128)]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({cmd[0]}: {e})"


def cuda_library_path():
    """PyTorch's pip CUDA libraries (cuBLAS 13, cuRAND) and the driver's folder."""
    found = []
    for site in sys.path:
        found += glob.glob(os.path.join(site, "nvidia", "cu13", "lib"))
        found += glob.glob(os.path.join(site, "nvidia", "*", "lib"))
    found += [d for d in ("/usr/local/nvidia/lib64", "/usr/local/cuda/lib64") if os.path.isdir(d)]
    return ":".join(dict.fromkeys(found))


def environment(binary):
    libs = [line.strip() for line in run(["ldd", binary]).splitlines()
            if any(n in line for n in ("cuda", "cublas", "curand", "nvrtc", "not found"))]
    info = {"gpu": run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"]),
            "libraries": libs}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    return info


class Servers:
    """Starts servers on distinct ports and stops them all at the end."""

    def __init__(self, binary, env, logs):
        self.binary, self.env, self.logs, self.port, self.procs = binary, env, logs, 18300, {}
        os.makedirs(logs, exist_ok=True)

    def start(self, model, *args):
        self.port += 1
        log = os.path.join(self.logs, f"server-{self.port}.log")
        print(f"port {self.port}: {os.path.basename(model)} {' '.join(args)} (log: {log})", flush=True)
        with open(log, "w") as stderr:
            try:
                proc, seconds = start_server(self.binary, model, self.port, *args, stderr=stderr, env=self.env)
            except SystemExit:
                with open(log) as f:
                    print("".join(f.readlines()[-30:]), file=sys.stderr)
                raise
        self.procs[self.port] = proc
        return self.port, seconds

    def stop(self, port):
        proc = self.procs.pop(port)
        proc.terminate()
        proc.wait()

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait()


def greedy(port, prompt_ids, max_tokens):
    """Tokens of the greedy continuation, and the gap between the best two logprobs at each."""
    out = post(port, "/v1/completions", {"model": "m", "prompt": prompt_ids, "max_tokens": max_tokens,
                                         "temperature": 0, "logprobs": 2})
    lp = out["choices"][0]["logprobs"]
    gaps = []
    for top in lp["top_logprobs"]:
        best = sorted(top.values(), reverse=True) + [-math.inf]
        gaps.append(best[0] - best[1])
    return lp["tokens"], gaps


def compare(reference, candidate):
    """(tokens shared before the first difference, the reference's lead there or None)."""
    ref_tokens, ref_gaps = reference
    tokens, _ = candidate
    step = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    if step is None and len(tokens) == len(ref_tokens):
        return len(tokens), None
    step = min(len(tokens), len(ref_tokens)) if step is None else step
    return step, ref_gaps[step] if step < len(ref_gaps) else math.inf


def prompts_of(family_dir):
    with open(os.path.join(family_dir, "reference.json")) as f:
        return [c["prompt_ids"] for c in json.load(f)["cases"]]


def check_decoders(servers, models, device_args, failures):
    out = {}
    for family in FAMILIES:
        path = os.path.join(models, "tiny", family)
        prompts = prompts_of(path)
        port, _ = servers.start(path, "--device", "cpu", "--dtype", "f32")
        cpu = [greedy(port, p, GREEDY_TOKENS) for p in prompts]
        servers.stop(port)
        result = {}
        for dtype in ("f32", "bf16"):
            port, _ = servers.start(path, *device_args, "--dtype", dtype)
            runs = [greedy(port, p, GREEDY_TOKENS) for p in prompts]
            servers.stop(port)
            identical = sum(r[0] == c[0] for r, c in zip(runs, cpu))
            shared = sum(compare(c, r)[0] for c, r in zip(cpu, runs))
            result[dtype] = {"identical_continuations": f"{identical}/{len(prompts)}",
                             "shared_token_share": shared / sum(len(c[0]) for c in cpu)}
            if dtype == "f32" and identical != len(prompts):
                failures.append(f"tiny {family} f32: {identical} of {len(prompts)} continuations identical")
        out[family] = result
        print(f"tiny {family}: {result}", flush=True)
    return out


def check_smollm2(servers, gguf, device_args, failures):
    with open(os.path.join(os.path.dirname(gguf), "smollm2_reference.json")) as f:
        prompts = [c["prompt_ids"] for c in json.load(f)["cases"]]
    port, _ = servers.start(gguf, "--device", "cpu")
    cpu = [greedy(port, p, 48) for p in prompts]
    servers.stop(port)
    port, _ = servers.start(gguf, *device_args)
    runs = [greedy(port, p, 48) for p in prompts]
    answer = post(port, "/v1/chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 24,
                                                  "temperature": 0})["choices"][0]["message"]["content"]
    servers.stop(port)
    shared = total = 0
    for n, (c, r) in enumerate(zip(cpu, runs)):
        step, lead = compare(c, r)
        shared, total = shared + step, total + len(c[0])
        if lead is not None and lead >= NEAR_TIE:
            failures.append(f"SmolLM2 prompt {n}: parts from the CPU at token {step}, where the CPU led by {lead:.2f}")
    result = {"shared_token_share": shared / total, "capital_of_france": answer}
    print(f"SmolLM2: {result}", flush=True)
    return result


def embeddings(port, sentences):
    data = post(port, "/v1/embeddings", {"model": "m", "input": sentences})["data"]
    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check_minilm(servers, minilm, device_args, failures):
    port, _ = servers.start(minilm, "--device", "cpu")
    cpu = embeddings(port, SENTENCES[:32])
    servers.stop(port)
    out = {}
    for dtype in ("f32", "bf16"):
        port, _ = servers.start(minilm, *device_args, "--dtype", dtype)
        worst = min(cosine(a, b) for a, b in zip(cpu, embeddings(port, SENTENCES[:32])))
        servers.stop(port)
        out[f"{dtype}_lowest_cosine"] = worst
        if worst < COSINE_FLOOR:
            failures.append(f"MiniLM {dtype}: cosine {worst:.5f} to the CPU's embedding")
    print(f"MiniLM: {out}", flush=True)
    return out


def timed(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_minilm(servers, minilm, device_args, device, rounds):
    out = {}
    port, _ = servers.start(minilm, *device_args, "--max-batch-size", "128", "--max-batch-tokens", "65536")
    for n in (1, 32, 128):
        seconds = timed(lambda: embeddings(port, SENTENCES[:n]), rounds)
        out[str(n)] = {"kandle_http_sentences_per_s": n / seconds}
    servers.stop(port)
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print(f"sentence-transformers is not installed: no peer figures. MiniLM embeddings/s: {out}", flush=True)
        return out
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        st = SentenceTransformer(minilm, device=device, model_kwargs={"torch_dtype": dtype})

        def encode(n):
            st.encode(SENTENCES[:n], batch_size=n)
            if device == "cuda":
                torch.cuda.synchronize()

        for n in (1, 32, 128):
            rate = n / timed(lambda: encode(n), rounds)
            out[str(n)][f"st_{name}_sentences_per_s"] = rate
        del st
    for n, row in out.items():
        row["ratio_kandle_over_st_bf16"] = row["kandle_http_sentences_per_s"] / row["st_bf16_sentences_per_s"]
    print(f"MiniLM embeddings/s: {out}", flush=True)
    return out


def bench_smollm2(servers, gguf, device_args, rounds, concurrency):
    port, ready = servers.start(gguf, *device_args, "--max-batch-size", str(max(concurrency)),
                                "--max-concurrent-requests", str(2 * max(concurrency)))
    long_text = " ".join(SENTENCES[:16])  # about 300 tokens with the template
    out = {"start_to_ready_s": ready}
    for name, messages in (("ttft_chat_s", CHAT), ("ttft_long_s", [{"role": "user", "content": long_text}])):
        body = {"model": "m", "messages": messages, "max_tokens": 1, "temperature": 0}
        out[name] = statistics.median(stream_chat(port, body)[2] for _ in range(rounds))
    # Prompt lengths as the server counts them (the chat template included).
    out["prompt_tokens"] = [post(port, "/v1/chat/completions", {"model": "m", "messages": m, "max_tokens": 1})[
        "usage"]["prompt_tokens"] for m in (CHAT, [{"role": "user", "content": long_text}])]
    # Greedy SmolLM2 answers this with 128 tokens or more (bench/run.py's prompt).
    body = {"model": "m", "messages": [{"role": "user", "content": "List the names of 30 fruits, one per line, "
                                        "with a sentence about each."}], "max_tokens": 128, "temperature": 0}
    out["decode_tokens_per_s_c1"] = statistics.median(decode_rates(port, body, 1)[0] for _ in range(rounds))
    for c in concurrency:
        _, out[f"aggregate_tokens_per_s_c{c}"], out[f"mean_completion_tokens_c{c}"] = decode_rates(port, body, c)
    top = max(concurrency)
    out[f"aggregate_c{top}_over_c1"] = out[f"aggregate_tokens_per_s_c{top}"] / out["decode_tokens_per_s_c1"]
    servers.stop(port)
    print(f"SmolLM2: {out}", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", default=HERE, help="the folder scripts/pack-gpu-check made")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="32,128", help="SmolLM2's aggregate rates at these")
    args = parser.parse_args()
    binary = os.path.join(args.pack, "kandle-server")
    if not os.path.exists(binary):
        with lzma.open(binary + ".xz") as packed, open(binary, "wb") as out:
            shutil.copyfileobj(packed, out)
        os.chmod(binary, 0o755)
    models = os.path.join(args.pack, "models")
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [cuda_library_path(),
                                                                    os.environ.get("LD_LIBRARY_PATH")])))
    os.environ["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]
    device_args = ["--device", "cuda"] if args.device == "cuda" else ["--device", "cpu", "--kernels", "portable"]
    results = {"environment": environment(binary), "device": args.device}
    print(json.dumps(results["environment"], indent=1), flush=True)
    failures = []
    servers = Servers(binary, env, os.path.join(args.pack, "logs"))
    started = time.perf_counter()
    try:
        minilm = os.path.join(models, "minilm")
        gguf = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")
        results["tiny_decoders"] = check_decoders(servers, models, device_args, failures)
        results["smollm2_correctness"] = check_smollm2(servers, gguf, device_args, failures)
        results["minilm_correctness"] = check_minilm(servers, minilm, device_args, failures)
        results["minilm_embeddings"] = bench_minilm(servers, minilm, device_args, args.device, args.rounds)
        concurrency = [int(c) for c in args.concurrency.split(",")]
        results["smollm2"] = bench_smollm2(servers, gguf, device_args, args.rounds, concurrency)
    finally:
        servers.close()
    results["failures"] = failures
    results["seconds"] = time.perf_counter() - started
    text = json.dumps(results, indent=1)
    print(text)
    for folder in filter(None, (HERE, os.environ.get("OUT"))):
        with open(os.path.join(folder, "gpu-check.json"), "w") as f:
            f.write(text)
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        sys.exit(1)
    print("GPU check passed")


if __name__ == "__main__":
    main()
