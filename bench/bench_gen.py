#!/usr/bin/env python3
"""Benchmark for gen_chains.py (`make bench-gen`).

1. Client throughput: requests/s against a local OpenAI-compatible server that answers every
   request after 200 ms (tests/fake_llm.py), at concurrency 1, 4, 16 and 32. Each request goes
   the way real records go: map_resumable's thread pool -> ChatClient.chat -> one fsynced line
   in a resumable JSONL file. Target: at least 0.8 x concurrency / latency.
2. Offline speed: `synth` (1000 videos) and `chains --backend rules` on them.
3. Several servers behind one client: requests/s against 1, 2 and 4 servers at the same total
   concurrency, each server answering after a fixed latency with a few slots (requests beyond
   them wait), so one server caps the rate and k servers should give k times it (least-loaded
   routing). Target: at least 0.8 x min(k x slots, concurrency) / latency. Written into its own
   block of bench/RESULTS.md.
4. What frames cost a request (`--frames`): the JSON size of a recaption request, text only and
   with 8 frames of an H.264 clip at each --frame_size cap, and the time to build its image parts
   (decode with the trainer's reader, resize, JPEG, base64). Written into its own block.

Prints markdown tables and writes bench/gen.json (--parts picks which to run).
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
import results_md                  # noqa: E402   (bench/, this script's own folder)

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
SERVERS_BLOCK = ("<!-- multi-server table (bench_gen.py) -->", "<!-- end multi-server table -->")
FRAMES_BLOCK = ("<!-- frames table (bench_gen.py) -->", "<!-- end frames table -->")


def merge_json(path: str, part: dict) -> None:
    """bench/gen.json with these keys replaced (each part rewrites only its own)."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **part}, f, indent=2)


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def client_rate(url: str, concurrency: int, n: int, workdir: str) -> float:
    """url: one API root or several (comma-separated: one client over all of them)."""
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


def servers_rates(args, workdir: str) -> list[dict]:
    """Part 3: the same total concurrency against 1, 2, 4 ... servers of `slots` slots each."""
    rows = []
    per_server = args.server_slots / args.server_latency
    for k in (int(x) for x in args.servers.split(",")):
        fakes = [FakeLLM(default="hi", latency=args.server_latency, slots=args.server_slots).start()
                 for _ in range(k)]
        try:
            urls = ",".join(f.url for f in fakes)
            n = args.rounds * args.server_concurrency
            client_rate(urls, args.server_concurrency, args.server_concurrency, workdir)   # warm-up
            warm = [len(f.requests) for f in fakes]
            rates = [client_rate(urls, args.server_concurrency, n, workdir) for _ in range(args.repeats)]
            shares = [len(f.requests) - w for f, w in zip(fakes, warm)]     # all measured runs
        finally:
            for f in fakes:
                f.stop()
        rate = statistics.median(rates)
        ideal = min(k * args.server_slots, args.server_concurrency) / args.server_latency
        rows.append({"servers": k, "requests": n, "requests_per_s": round(rate, 2),
                     "runs": [round(r, 2) for r in rates], "ideal": round(ideal, 2),
                     "target": round(0.8 * ideal, 2), "efficiency": round(rate / ideal, 3),
                     "scaling": round(rate / per_server, 2), "requests_per_server": shares,
                     "meets_target": rate >= 0.8 * ideal})
    return rows


def servers_table(args, rows: list[dict], m: dict) -> str:
    head = (f"Machine: {m['cpu']}, {m['cores']} cores (load average {args.load_before:.1f} before the run, "
            f"shared with other jobs), Python {m['python']}. Command: "
            f"`.venv/bin/python bench/bench_gen.py --parts servers` (raw figures: `bench/gen.json`, "
            f"key `servers`). Each fake server (`tests/fake_llm.py`, in the same process) answers after "
            f"{args.server_latency * 1000:.0f} ms with {args.server_slots} slots (more requests wait), so "
            f"one serves at most {args.server_slots / args.server_latency:.0f} requests/s; the client runs "
            f"{args.server_concurrency} requests in flight over all servers (`--base_url URL1,URL2,...`), "
            f"{args.rounds} x {args.server_concurrency} requests per run, median of {args.repeats} runs. "
            "Target: >= 0.8 x min(servers x slots, concurrency) / latency.\n\n")
    table = ["| servers | requests | requests/s (median) | ideal | target (0.8x) | efficiency | x one server "
             "| requests per server (all runs) | meets target |", "|---:|---:|---:|---:|---:|---:|---:|---|:---:|"]
    for r in rows:
        table.append(f"| {r['servers']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['ideal']:.0f} | "
                     f"{r['target']:.0f} | {r['efficiency']:.2f} | {r['scaling']:.2f} | "
                     f"{' / '.join(map(str, r['requests_per_server']))} | {'yes' if r['meets_target'] else 'NO'} |")
    return head + "\n".join(table)


def frames_rows(args, workdir: str) -> list[dict]:
    """Part 4: one recaption request's JSON size, text only and with `frames` frames of a clip
    of args.frames_video size at each cap, and the time to build its parts (best of 3)."""
    import numpy as np
    import synthetic
    width, height = (int(x) for x in args.frames_video.split("x"))
    rng = np.random.default_rng(0)
    # a textured clip (noise over a gradient): JPEG sizes near a real video's, unlike flat colour
    base = np.linspace(0, 255, width, dtype=np.float32)[None, None, :, None]
    video = np.clip(base + rng.normal(0, 40, (32, height, width, 3)), 0, 255).astype(np.uint8)
    path = os.path.join(workdir, "clip.mp4")
    synthetic.write_mp4(path, video)
    messages = gc.recaption_messages(["A man walks a dog in a park.", "A dog runs after a ball."])
    rows = [{"frames": 0, "frame_size": None, "bytes": len(json.dumps(messages).encode()),
             "build_s": 0.0}]
    for cap in (int(x) for x in args.frame_sizes.split(",")):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            parts = gc.frame_parts(path, args.frames, cap)
            times.append(time.perf_counter() - t0)
        sent = gc.with_frames(messages, parts)
        rows.append({"frames": args.frames, "frame_size": cap, "bytes": len(json.dumps(sent).encode()),
                     "build_s": round(min(times), 4)})
    return rows


def frames_table(args, rows: list[dict], m: dict) -> str:
    head = (f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}. Command: "
            "`.venv/bin/python bench/bench_gen.py --parts frames` (raw figures: `bench/gen.json`, key "
            f"`frames`). One `recaption` request (two short captions), its messages' JSON size, text only "
            f"and with {args.frames} frames of a {args.frames_video} H.264 clip (32 frames of a gradient under Gaussian noise: hard for JPEG, so sizes at the high end) "
            "at each `--frame_size` cap; build = decoding the frames with the trainer's reader, resizing, "
            "JPEG and base64, best of 3.\n\n")
    table = ["| frames | --frame_size | request (KiB) | x text only | build (ms) |", "|---:|---:|---:|---:|---:|"]
    text = rows[0]["bytes"]
    for r in rows:
        table.append(f"| {r['frames']} | {r['frame_size'] or '-'} | {r['bytes'] / 1024:.1f} | "
                     f"{r['bytes'] / text:.0f} | {1000 * r['build_s']:.0f} |")
    return head + "\n".join(table)


def write_block(table: str, path: str = RESULTS, markers: tuple[str, str] = SERVERS_BLOCK,
                title: str = "Several servers behind one client.") -> None:
    """Replace a marked block of the chain-generation section (appended there if absent)."""
    block = f"{markers[0]}\n**{title}** {table}\n{markers[1]}"
    results_md.write_block(path, block, markers, "## Chain generation (`make bench-gen`)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--rounds", type=int, default=8, help="requests per level = rounds x concurrency (min 16)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    ap.add_argument("--synth_n", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "gen.json"))
    ap.add_argument("--parts", default="client,servers,frames",
                    help="comma list: client (parts 1 and 2), servers (part 3), frames (part 4)")
    ap.add_argument("--servers", default="1,2,4", help="part 3: server counts")
    ap.add_argument("--server_latency", type=float, default=0.2, help="part 3: seconds per request")
    ap.add_argument("--server_slots", type=int, default=4, help="part 3: requests one server serves at once")
    ap.add_argument("--server_concurrency", type=int, default=16, help="part 3: requests in flight in all")
    ap.add_argument("--results", default=RESULTS, help="parts 3 and 4 write their blocks here ('' for none)")
    ap.add_argument("--frames", type=int, default=8, help="part 4: frames per request")
    ap.add_argument("--frame_sizes", default="224,448", help="part 4: --frame_size caps")
    ap.add_argument("--frames_video", default="640x360", help="part 4: the clip's WIDTHxHEIGHT")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    parts = set(args.parts.split(","))
    if "servers" in parts:
        args.load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as work:
            rows = servers_rates(args, work)
        table = servers_table(args, rows, machine())
        print("\n" + table)
        if args.results:
            write_block(table, args.results)
        merge_json(args.out, {"machine": machine(), "servers": {
            "latency_s": args.server_latency, "slots": args.server_slots,
            "concurrency": args.server_concurrency, "rows": rows}})
    if "frames" in parts:
        with tempfile.TemporaryDirectory() as work:
            rows = frames_rows(args, work)
        table = frames_table(args, rows, machine())
        print("\n" + table)
        if args.results:
            write_block(table, args.results, FRAMES_BLOCK, "What frames cost a request.")
        merge_json(args.out, {"frames": {"video": args.frames_video, "rows": rows}})
    if "client" not in parts:
        return

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
    merge_json(args.out, result)

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
