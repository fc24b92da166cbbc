"""OCI pull throughput: `kandle-server pull oci://` against `skopeo copy` (to a directory) and
oras-py's pull, for the same artifact in the same registry, same run.

A CNCF distribution registry (Debian's docker-registry) on loopback holds a model of about
1 GiB in five files, pushed once by `kandle-server push` (one layer per file, titled as
ORAS does). Every round runs the three pulls, interleaved in an order rotated round by round,
each after a sync, each into a new folder. kandle and skopeo verify every blob's digest;
oras-py 0.2 writes what the registry sends unchecked. Then the second pull of a pod whose
volume holds the model already: by tag (one manifest request) and by digest (none).
Medians over rounds. Results: bench-results/pull-oci.json. Run by `scripts/bench-pull oci`.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "target/release/kandle-server")
ROUNDS = int(os.environ.get("KANDLE_BENCH_ROUNDS", "5"))
FILE_MIB = int(os.environ.get("KANDLE_BENCH_FILE_MIB", "256"))
SETTLE_S = float(os.environ.get("KANDLE_BENCH_SETTLE_S", "2"))
PORT = 18950
REGISTRY = f"127.0.0.1:{PORT}"
REFERENCE = f"{REGISTRY}/bench/big:v1"


def settle():
    """Each run starts with the last one's writes on disk, not paying for them."""
    os.sync()
    time.sleep(SETTLE_S)


def timed(cmd):
    settle()
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_LOG="warn"))
    if out.returncode:
        raise SystemExit(f"{cmd[0]} failed: {out.stderr[-3000:]}")
    return time.perf_counter() - t, out.stdout


def make_model(folder):
    os.makedirs(folder)
    for i in range(1, 5):
        with open(os.path.join(folder, f"model-0000{i}-of-00004.safetensors"), "wb") as f:
            for _ in range(FILE_MIB):
                f.write(os.urandom(1 << 20))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"model_type": "llama"}')


def main():
    work = tempfile.mkdtemp(prefix="kandle-oci-bench-")
    with open(os.path.join(work, "registry.yml"), "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {work}/registry\nhttp:\n  addr: {REGISTRY}\n")
    registry = subprocess.Popen(["docker-registry", "serve", os.path.join(work, "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    oras = (
        "import sys, oras.client; "
        f"oras.client.OrasClient(hostname={REGISTRY!r}, insecure=True)"
        f".pull(target={REFERENCE!r}, outdir=sys.argv[1])"
    )
    tasks = {
        "kandle": lambda d: [SERVER, "pull", "--model", f"oci://{REFERENCE}", "--dest", d],
        "skopeo": lambda d: ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                             f"docker://{REFERENCE}", f"dir:{d}"],
        "oras": lambda d: [sys.executable, "-c", oras, d],
    }
    runs = {k: [] for k in tasks}
    try:
        time.sleep(1)
        model = os.path.join(work, "model")
        make_model(model)
        total = sum(os.path.getsize(os.path.join(model, n)) for n in os.listdir(model))
        push_s, pinned = timed([SERVER, "push", model, f"oci://{REFERENCE}",
                                "--cache-dir", os.path.join(work, "cache")])
        pinned = pinned.strip()
        order = list(tasks)
        for r in range(ROUNDS):
            for tag in order[r % 3:] + order[:r % 3]:
                dest = os.path.join(work, f"out-{tag}-{r}")
                runs[tag].append(timed(tasks[tag](dest))[0])
            # The second pod: its volume holds the model already.
            again_tag = timed(tasks["kandle"](os.path.join(work, f"out-kandle-{r}")))[0]
            for tag in order:
                shutil.rmtree(os.path.join(work, f"out-{tag}-{r}"), ignore_errors=True)
            os.sync()
            time.sleep(3 * SETTLE_S)
        pinned_dest = os.path.join(work, "pinned")
        timed([SERVER, "pull", "--model", pinned, "--dest", pinned_dest])
        again_digest = timed([SERVER, "pull", "--model", pinned, "--dest", pinned_dest])[0]
    finally:
        registry.terminate()
        registry.wait()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    faster_peer = min(med["skopeo"], med["oras"])
    results = {
        "bytes": total, "rounds": ROUNDS,
        "mib_per_s": {k: total / med[k] / (1 << 20) for k in tasks},
        "kandle_over_skopeo": med["skopeo"] / med["kandle"],
        "kandle_over_oras": med["oras"] / med["kandle"],
        "kandle_over_faster_peer": faster_peer / med["kandle"],
        "push_seconds": push_s,
        "second_pull_seconds": {"by_tag": again_tag, "by_digest": again_digest},
        "seconds": runs,
    }
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results/pull-oci.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
