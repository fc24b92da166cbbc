"""Pull throughput: kandle against curl and huggingface_hub on the same files, same run.

A local hub (nginx serving the hub's model-info and resolve routes from static files) holds
a model of about 1 GiB in four files, served twice: as fast as loopback goes, and paced to
PACED_MB_S per connection as CDNs pace them (nginx limit_rate). For each, every round,
interleaved (in an order rotated round by round, each after a sync): curl fetching the
files one after another, `kandle-server pull`, and huggingface_hub's snapshot_download with
HF_ENDPOINT pointed at the local hub; and the same three for one file. Then what a second
pod on the node does with `cache.volume: node`: kandle's pull again into the folder it filled
(it must fetch nothing), against huggingface_hub's snapshot_download again into its own.
Medians over rounds, plus kandle's peak resident memory.
Results: bench-results/pull.json. Run by scripts/bench-pull (needs nginx and the
.venv-bench peers).
"""
import hashlib
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
# Each round runs the six downloads in another order (rotated), so that no tool always
# follows the heaviest writer: on a small VM, a run right after gigabytes of writes is slower.
ROUNDS = int(os.environ.get("KANDLE_BENCH_ROUNDS", "6"))
FILE_MIB = int(os.environ.get("KANDLE_BENCH_FILE_MIB", "256"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PORT = 18900
SETTLE_S = float(os.environ.get("KANDLE_BENCH_SETTLE_S", "2"))
PACED_MB_S = int(os.environ.get("KANDLE_BENCH_PACED_MB_S", "100"))
SCENARIOS = {
    name: server
    for name, server in {"loopback": (PORT, ""), "paced": (PORT + 1, f"limit_rate {PACED_MB_S}m;")}.items()
    if name in os.environ.get("KANDLE_BENCH_SCENARIOS", "loopback,paced").split(",")
}
NGINX_CONF = """
user root;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/error.log;
daemon off;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  types {{ }}
  default_type application/octet-stream;
  client_body_temp_path {work}/tmp;
  proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
{servers}
}}
"""
SERVER_BLOCK = """
  server {{
    listen 127.0.0.1:{port};
    {limit}
    location /api/models/org/big/revision/ {{
      default_type application/json;
      root {work};
      try_files /info.json =404;
    }}
    location /api/models/org/big/tree/ {{
      default_type application/json;
      root {work};
      try_files /tree.json =404;
    }}
    location ~ ^/org/big/resolve/[^/]+/(.+)$ {{
      alias {work}/files/$1;
      add_header X-Repo-Commit {commit};
    }}
  }}
"""


def make_model(work):
    files = os.path.join(work, "files")
    os.makedirs(files)
    siblings = []
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    for name in names:
        path = os.path.join(files, name)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(FILE_MIB):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
        size = FILE_MIB << 20
        siblings.append({"rfilename": name, "size": size, "lfs": {"sha256": h.hexdigest(), "size": size, "pointerSize": 134}})
    config = b'{"model_type": "llama"}'
    with open(os.path.join(files, "config.json"), "wb") as f:
        f.write(config)
    blob = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    siblings.append({"rfilename": "config.json", "size": len(config), "blobId": blob})
    tree = [
        {"type": "file", "path": s["rfilename"], "size": s["size"], "oid": s.get("blobId", "0" * 40)}
        | ({"lfs": {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134}} if "lfs" in s else {})
        for s in siblings
    ]
    with open(os.path.join(work, "tree.json"), "w") as f:
        json.dump(tree, f)
    with open(os.path.join(work, "info.json"), "w") as f:
        json.dump({"id": "org/big", "modelId": "org/big", "sha": COMMIT, "siblings": siblings}, f)
    return names + ["config.json"]


def settle():
    """Each run starts with the last one's writes on disk, not paying for them."""
    os.sync()
    time.sleep(SETTLE_S)


def timed(cmd, env=None):
    settle()
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{cmd[0]} failed: {out.stderr[-3000:]}")
    return time.perf_counter() - t


def kandle_again(port, dest):
    """The node's second pod: the pull finds the first one's files and fetches nothing."""
    report = dest + "-report.json"
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", RUST_LOG="warn")
    seconds = timed([SERVER, "pull", "--model", "hf://org/big", "--dest", dest, "--report-file", report], env)
    with open(report) as f:
        fetched = json.load(f)["pulledBytes"]
    if fetched:
        raise SystemExit(f"the second pull fetched {fetched} bytes")
    return seconds


def kandle(port, dest, include=None):
    cmd = ["/usr/bin/time", "-f", "%M", SERVER, "pull", "--model", "hf://org/big", "--dest", dest]
    if include:
        cmd += ["--include", include]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", RUST_LOG="warn")
    settle()
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds = time.perf_counter() - t
    return seconds, int(out.stderr.strip().splitlines()[-1]) / 1024


def curl(port, dest, names):
    os.makedirs(dest, exist_ok=True)
    cmd = ["curl", "-sf"]
    for n in names:
        cmd += ["-o", os.path.join(dest, n), f"http://127.0.0.1:{port}/org/big/resolve/main/{n}"]
    return timed(cmd)


def hf(port, dest, pattern=None):
    code = (
        "import sys; from huggingface_hub import snapshot_download; "
        f"snapshot_download('org/big', local_dir={dest!r}, max_workers=8"
        + (f", allow_patterns=[{pattern!r}]" if pattern else "") + ")"
    )
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="30", HF_HOME=os.path.join(dest + "-home"))
    return timed([sys.executable, "-c", code], env)


def main():
    work = tempfile.mkdtemp(prefix="kandle-pull-bench-")
    os.makedirs(os.path.join(work, "tmp"))
    names = make_model(work)
    total = sum(os.path.getsize(os.path.join(work, "files", n)) for n in names)
    one = names[0]
    servers = "".join(
        SERVER_BLOCK.format(work=work, port=port, commit=COMMIT, limit=limit)
        for port, limit in SCENARIOS.values()
    )
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(work=work, servers=servers))
    nginx = subprocess.Popen(["nginx", "-c", os.path.join(work, "nginx.conf")])
    time.sleep(1)
    kinds = ("curl_all", "kandle_all", "hf_all", "curl_one", "kandle_one", "hf_one")
    again = ("kandle_again", "hf_again")
    runs = {s: {k: [] for k in kinds + again} for s in SCENARIOS}
    peak_mib = []
    try:
        for r in range(ROUNDS):
            for scenario, (port, _) in SCENARIOS.items():
                d = lambda tag: os.path.join(work, f"out-{scenario}-{tag}-{r}")
                tasks = {
                    "curl_all": lambda: (curl(port, d("curl_all"), names), None),
                    "kandle_all": lambda: kandle(port, d("kandle_all")),
                    "hf_all": lambda: (hf(port, d("hf_all")), None),
                    "curl_one": lambda: (curl(port, d("curl_one"), [one]), None),
                    "kandle_one": lambda: kandle(port, d("kandle_one"), one),
                    "hf_one": lambda: (hf(port, d("hf_one"), one), None),
                }
                for tag in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    seconds, mem = tasks[tag]()
                    runs[scenario][tag].append(seconds)
                    if mem is not None:
                        peak_mib.append(mem)
                runs[scenario]["kandle_again"].append(kandle_again(port, d("kandle_all")))
                runs[scenario]["hf_again"].append(hf(port, d("hf_all")))
                # Deleted between rounds, then a long settle: the filesystem's discards
                # stall whoever writes next.
                for tag in kinds:
                    shutil.rmtree(d(tag), ignore_errors=True)
                    shutil.rmtree(d(tag) + "-home", ignore_errors=True)
                os.sync()
                time.sleep(5 * SETTLE_S)
    finally:
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(work, ignore_errors=True)
    one_bytes = FILE_MIB << 20
    results = {"bytes_all": total, "bytes_one": one_bytes, "rounds": ROUNDS,
               "paced_mb_s_per_connection": PACED_MB_S, "kandle_peak_rss_mib": max(peak_mib)}
    for scenario, run in runs.items():
        med = {k: statistics.median(v) for k, v in run.items()}
        size = lambda k: total if k.endswith("_all") else one_bytes
        results[scenario] = {
            "mib_per_s": {k: size(k) / med[k] / (1 << 20) for k in kinds},
            "kandle_over_curl": {"all": med["curl_all"] / med["kandle_all"], "one": med["curl_one"] / med["kandle_one"]},
            "kandle_over_hf": {"all": med["hf_all"] / med["kandle_all"], "one": med["hf_one"] / med["kandle_one"]},
            # Runs of a quarter second on a shared VM: the best of each is steadier than the median.
            "best_kandle_over_curl": {n: min(run[f"curl_{n}"]) / min(run[f"kandle_{n}"]) for n in ("all", "one")},
            # The second pod on a node (cache.volume: node): the pull step, nothing fetched.
            "second_pull_seconds": {"kandle": med["kandle_again"], "hf": med["hf_again"]},
            "seconds": run,
        }
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results/pull.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
