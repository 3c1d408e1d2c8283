#!/usr/bin/env python3
"""Benchmark for gen_chains.py (`make bench-gen`).

1. Client throughput: requests/s against a local OpenAI-compatible server that answers every
   request after 200 ms (tests/fake_llm.py), at concurrency 1, 4, 16 and 32. Each request goes
   the way real records go: map_resumable's thread pool -> ChatClient.chat -> one fsynced line
   in a resumable JSONL file. Target: at least 0.8 x concurrency / latency.
2. Offline speed: `synth` (1000 videos) and `chains --backend rules` on them.

Prints a markdown table and writes bench/gen.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import gen_chains as gc          # noqa: E402
from fake_llm import FakeLLM     # noqa: E402
from records import map_resumable  # noqa: E402


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def client_rate(url: str, concurrency: int, n: int, workdir: str) -> float:
    client = gc.ChatClient(url, "bench", timeout=30, max_tries=3)
    records = [{"id": f"r{i}"} for i in range(n)]
    out = os.path.join(workdir, f"c{concurrency}-{time.monotonic_ns()}.jsonl")

    def one(rec):
        reply = client.chat([{"role": "user", "content": f"say hi to {rec['id']}"}], max_tokens=8)
        return {"id": rec["id"], "text": reply.text}

    t0 = time.perf_counter()
    summary = map_resumable(records, one, out, concurrency, desc=f"c={concurrency}")
    elapsed = time.perf_counter() - t0
    assert summary["done"] == n, summary
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--rounds", type=int, default=8, help="requests per level = rounds x concurrency (min 16)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    ap.add_argument("--synth_n", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "gen.json"))
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    rows = []
    with tempfile.TemporaryDirectory() as work, FakeLLM(default="hi", latency=args.latency) as llm:
        client_rate(llm.url, 4, 16, work)                      # warm-up: imports, first sockets
        for c in (int(x) for x in args.levels.split(",")):
            n = max(16, args.rounds * c)
            rates = [client_rate(llm.url, c, n, work) for _ in range(args.repeats)]
            rate = statistics.median(rates)
            target = 0.8 * c / args.latency
            rows.append({"concurrency": c, "requests": n, "requests_per_s": round(rate, 2),
                         "runs": [round(r, 2) for r in rates], "ideal": round(c / args.latency, 2),
                         "target": round(target, 2), "efficiency": round(rate * args.latency / c, 3),
                         "meets_target": rate >= target})

        data = os.path.join(work, "synth")
        t0 = time.perf_counter()
        gc.main(["synth", "--out", data, "--n", str(args.synth_n), "--seed", "0"])
        synth_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = gc.main(["chains", "--backend", "rules", "--in", os.path.join(data, "train.jsonl"),
                     "--out", os.path.join(data, "chains.jsonl"), "--length", "4"])
        rules_s = time.perf_counter() - t0

    result = {"machine": machine(), "latency_s": args.latency, "client": rows,
              "synth": {"videos": args.synth_n, "seconds": round(synth_s, 2)},
              "rules_chains": {"records": s["done"], "length": 4, "seconds": round(rules_s, 2),
                               "records_per_s": round(s["done"] / rules_s, 1)}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    m = result["machine"]
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; "
          f"server latency {args.latency * 1000:.0f} ms\n")
    print("| concurrency | requests | requests/s (median) | ideal c/latency | target 0.8x | efficiency | meets |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['ideal']:.0f} | "
              f"{r['target']:.0f} | {r['efficiency']:.2f} | {'yes' if r['meets_target'] else 'NO'} |")
    print(f"\nsynth: {args.synth_n} videos in {synth_s:.1f} s; chains --backend rules (K=4): "
          f"{s['done']} records in {rules_s:.1f} s\nwrote {args.out}")


if __name__ == "__main__":
    main()
