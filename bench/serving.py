"""Starting kandle-server and measuring it over HTTP: shared by bench/run.py and
bench/gpu_check.py. Standard library only, so it runs on machines with nothing installed."""
import json
import statistics
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def median_of(rounds):
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def wait_ready(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.01)
    raise SystemExit("server not ready")


def start_server(binary, model, port, *extra, stderr=subprocess.DEVNULL, env=None):
    """(process, seconds from start to ready) of `binary serve` on loopback, served as `m`."""
    t = time.perf_counter()
    proc = subprocess.Popen([binary, "serve", "--model", model, "--served-model-name", "m", "--host", "127.0.0.1",
                             "--port", str(port), *extra], stderr=stderr, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, time.perf_counter() - t


def post(port, path, body, timeout=600):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def stream_chat(port, body):
    """One streamed chat completion: (seconds from first to last text, completion tokens,
    seconds from the request to the first text)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    first = last = None
    tokens = 0
    sent = time.perf_counter()
    # Bounded, so a stuck server fails the run instead of holding a GPU lease to its end.
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return last - first, tokens, first - sent


def decode_rates(port, body, concurrency):
    """(Per-sequence decode tokens/s, aggregate tokens/s, mean completion tokens) for
    `concurrency` requests at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: stream_chat(port, body), range(concurrency)))
    wall = time.perf_counter() - start
    per_sequence = statistics.median((tokens - 1) / seconds for seconds, tokens, _ in runs)
    return per_sequence, sum(tokens for _, tokens, _ in runs) / wall, statistics.mean(t for _, t, _ in runs)
