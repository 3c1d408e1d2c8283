"""What the demos share (scripts/demo.py, scripts/demo_onpolicy.py, scripts/sweep.py): the runner
(one CLI call per step, as a subprocess, logged; the wall-clock ledger), the main demo's settings,
its first stages (the data and the SFT warm start, which every demo starts from), training and
ranking-evaluation steps, and the cells and verdicts of the reports. The demos import this module
and never each other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval_judge import bootstrap_ci  # noqa: E402
from records import load_jsonl, write_json, write_jsonl  # noqa: E402

PY = sys.executable
T0 = time.time()
PRINT_LOCK = threading.Lock()
COMPUTED = threading.Event()   # set when this invocation trained or evaluated anything


def say(msg: str) -> None:
    m, s = divmod(int(time.time() - T0), 60)
    with PRINT_LOCK:
        print(f"[{m:02d}:{s:02d}] {msg}", flush=True)


def run(cmd: list[str], log: str, threads: int = 1) -> None:
    """One CLI call, output appended to `log`; a failure stops the demo with the log's tail.
    MKL_CBWR=AUTO,STRICT: MKL otherwise picks code paths by buffer alignment, so the same GEMM
    can round differently from run to run; with it, a run is bit-for-bit repeatable."""
    COMPUTED.set()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MKL_CBWR="AUTO,STRICT", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    if WALL["path"]:
        wall_time()


def recipe_args(a) -> list[str]:
    """The preference step's recipe (chosen by scripts/sweep.py; see RESULTS.md)."""
    return ["--batch_size", str(a.batch_size), "--max_steps", str(a.steps),
            "--warmup_steps", str(max(1, a.steps // 10)), "--beta", str(a.beta),
            "--lr", str(a.lr), "--ntp_weight", str(a.ntp_weight), "--ntp_norm", a.ntp_norm]


# ---------------------------------------------------------------------------------------------
# The first stages: data and warm start; a training run; a ranking evaluation
# ---------------------------------------------------------------------------------------------

def make_data(a) -> None:
    d = os.path.join(a.out, "data")
    log = os.path.join(a.out, "logs", "data.log")
    if not os.path.exists(os.path.join(d, ".synth_done")):
        run([PY, "gen_chains.py", "synth", "--out", d, "--n", str(a.videos),
             "--test_frac", str(a.test_frac), "--seed", str(a.data_seed)], log)
        open(os.path.join(d, ".synth_done"), "w").close()
    # chains and inject append and skip ids already written: re-running them resumes
    if not os.path.exists(os.path.join(d, ".chains_done")):
        for cmd, inp, out in [("chains", "train.jsonl", "all_train_chains.jsonl"),
                              ("chains", "test.jsonl", "test_chains.jsonl"),
                              ("inject", "train.jsonl", "all_inject.jsonl")]:
            run([PY, "gen_chains.py", cmd, "--backend", "rules", "--in", os.path.join(d, inp),
                 "--out", os.path.join(d, out), "--length", str(a.length), "--seed", str(a.data_seed)],
                log)
        open(os.path.join(d, ".chains_done"), "w").close()
    # the last --val_videos training videos are the warm start's validation set, in no training set
    chains = load_jsonl(os.path.join(d, "all_train_chains.jsonl"))
    val_ids = {c["id"] for c in chains[len(chains) - a.val_videos:]}
    write_jsonl(os.path.join(d, "val_chains.jsonl"), [c for c in chains if c["id"] in val_ids])
    write_jsonl(os.path.join(d, "chains.jsonl"), [c for c in chains if c["id"] not in val_ids])
    write_jsonl(os.path.join(d, "inject.jsonl"),
                [c for c in load_jsonl(os.path.join(d, "all_inject.jsonl")) if c["id"] not in val_ids])
    # captions are generated for the first --gen_videos held-out videos (decoding is the slow part)
    write_jsonl(os.path.join(d, "gen_test.jsonl"), load_jsonl(os.path.join(d, "test.jsonl"))[:a.gen_videos])
    n = {k: len(load_jsonl(os.path.join(d, k)))
         for k in ("chains.jsonl", "val_chains.jsonl", "test_chains.jsonl", "inject.jsonl")}
    say(f"data: {n['chains.jsonl']} training chains of {a.length + 1} captions, "
        f"{n['val_chains.jsonl']} validation, {n['test_chains.jsonl']} held-out test chains, "
        f"{n['inject.jsonl']} injected sets (logs/data.log)")


def train_run(a, name: str, args: list[str], threads: int = 1) -> None:
    out = os.path.join(a.out, "runs", name)
    if os.path.exists(os.path.join(out, ".done")):
        return
    run([PY, "rank_dpo.py", "--model", "tiny", "--output_dir", out, "--resume",
         "--save_every", str(a.save_every), "--keep_checkpoints", "1", "--log_every", "1"] + args,
        os.path.join(a.out, "logs", name + ".log"), threads)
    open(os.path.join(out, ".done"), "w").close()


def rank_eval(a, adapter: str, data: str, stem: str, log: str, threads: int = 1) -> None:
    """eval_judge.py rank: per-chain scores to STEM.chains.jsonl, summary to STEM.rank.json."""
    if not os.path.exists(stem + ".rank.json"):
        run([PY, "eval_judge.py", "rank", "--adapter", adapter, "--data", data,
             "--out", stem + ".chains.jsonl", "--results", stem + ".rank.json"], log, threads)


def caption_nll(stem: str) -> float:
    """Held-out caption loss: mean over chains of -log p(c0 | video), nats per caption."""
    return float(np.mean([-r["log-prob"][0] for r in load_jsonl(stem + ".chains.jsonl")]))


def warm_start(a) -> list[dict]:
    """SFT on c0 in segments; after each, the caption loss on the validation chains. Stops at the
    first segment that lowers it by less than --warm_min_gain (relative), or at --warm_max_steps.
    Resumable: the trainer continues from its checkpoint, finished evaluations are kept."""
    d, out = os.path.join(a.out, "data"), os.path.join(a.out, "runs", "warm")
    log, curve = os.path.join(a.out, "logs", "warm.log"), []
    if os.path.exists(os.path.join(out, ".done")):
        return load_jsonl(os.path.join(out, "curve.jsonl"))
    step = 0
    while step < a.warm_max_steps:
        step = min(step + a.warm_eval_every, a.warm_max_steps)
        run([PY, "rank_dpo.py", "--model", "tiny", "--output_dir", out, "--resume", "--objective",
             "sft", "--data", os.path.join(d, "chains.jsonl"), "--lr", str(a.warm_lr),
             "--lr_schedule", "constant", "--warmup_steps", str(a.warm_eval_every // 5),
             "--batch_size", str(a.warm_batch_size), "--max_steps", str(step), "--seed", "0",
             "--save_every", str(a.warm_eval_every), "--keep_checkpoints", "1", "--log_every", "5"],
            log)
        stem = os.path.join(a.out, "eval", f"warm-val-{step:05d}")
        rank_eval(a, out, os.path.join(d, "val_chains.jsonl"), stem, log)
        train_loss = [r["loss"] for r in load_jsonl(os.path.join(out, "metrics.jsonl"))
                      if r["step"] > step - a.warm_eval_every]
        curve.append({"step": step, "train_ntp": float(np.mean(train_loss)),
                      "val_nll": caption_nll(stem), "val_pairwise": read_rank(stem)["pairwise"]})
        say(f"warm start step {step}: validation caption NLL {curve[-1]['val_nll']:.2f} nats, "
            f"pairwise acc {curve[-1]['val_pairwise']:.3f}")
        if len(curve) > 1 and curve[-1]["val_nll"] > curve[-2]["val_nll"] * (1 - a.warm_min_gain):
            break
    write_jsonl(os.path.join(out, "curve.jsonl"), curve)
    open(os.path.join(out, ".done"), "w").close()
    return curve


def read_rank(stem: str) -> dict:
    with open(stem + ".rank.json") as f:
        lp = json.load(f)["scorers"]["log-prob"]
    return {"pairwise": lp["pairwise"]["mean"], "n_chains": lp["n_chains"]}



def cell(values: np.ndarray, digits: int = 3) -> str:
    """Mean [95% interval], the bootstrap over items and seeds together."""
    lo, hi = bootstrap_ci(values)
    return f"{values.mean():.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def verdict(diff: np.ndarray) -> tuple[float, float, float, str]:
    """A claim 'A > B' from the paired differences A - B [seeds, items]: reproduced when the
    whole 95% interval is above 0, not reproduced when it is below, else inconclusive."""
    lo, hi = bootstrap_ci(diff)
    word = "**reproduced**" if lo > 0 else "**not reproduced** (reversed)" if hi < 0 else \
        "inconclusive (the interval holds 0)"
    return float(diff.mean()), lo, hi, word


WALL = {"path": None, "since": 0.0}    # this invocation's entry in OUT/wall_time.json
WALL_LOCK = threading.Lock()


def start_wall_clock(out: str, since: float) -> None:
    WALL.update(path=os.path.join(out, "wall_time.json"), since=since)


def wall_time() -> tuple[float, int]:
    """(total seconds, invocations) over the invocations that computed something for OUT. This
    invocation's entry (keyed by its start) is rewritten after every finished step, so a killed
    run keeps its time up to its last step, a resume adds its own, and a report-only re-run
    (`make demo-readme`) adds nothing."""
    with WALL_LOCK:
        ledger = {}
        if os.path.exists(WALL["path"]):
            with open(WALL["path"]) as f:
                ledger = json.load(f)
        if COMPUTED.is_set():
            ledger[f"{WALL['since']:.3f}"] = round(time.time() - WALL["since"], 1)
            write_json(WALL["path"], ledger)
        return sum(ledger.values()), len(ledger)



# ---------------------------------------------------------------------------------------------
# Settings and the README
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None, description: str | None = None):
    """The main demo's settings (the on-policy demo and the sweep build on its data and warm start)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 torch thread each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--videos", type=int, default=700, help="synthetic videos (train + test)")
    p.add_argument("--test_frac", type=float, default=0.5)
    p.add_argument("--val_videos", type=int, default=50, help="training videos kept for validation")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--length", type=int, default=4, help="degradation steps: chains of length+1")
    p.add_argument("--chain_lengths", default="", help="--max_chain values besides 2 (= dpo) "
                   "and the full chain (= rank), e.g. 3,4 (3 runs each; off by default to keep "
                   "the demo inside 20 minutes on 2 cores)")
    p.add_argument("--warm_lr", type=float, default=1e-3)
    p.add_argument("--warm_batch_size", type=int, default=8)
    p.add_argument("--warm_eval_every", type=int, default=100)
    p.add_argument("--warm_max_steps", type=int, default=800)
    p.add_argument("--warm_min_gain", type=float, default=0.02,
                   help="stop when a segment lowers the validation caption loss by less than this")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--ntp_weight", type=float, default=0.1)
    p.add_argument("--ntp_norm", choices=("mean", "sum"), default="sum",
                   help="sum: the NTP term on the scale of the summed log-probs the preference terms "
                        "use (docs/demo_sweep.md: with the per-token mean it is 1-2%% of the loss "
                        "and does not stop log p(c0) from falling)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--gen_videos", type=int, default=40, help="held-out videos captioned and judged")
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("--machine", default=None, help="named in RESULTS.md (default: CPU model and cores)")
    p.add_argument("--readme", metavar="README.md", help="also write RESULTS.md verbatim into this "
                   "file's demo section and copy plots.png to docs/demo_plots.png beside it")
    p.add_argument("--smoke", action="store_true",
                   help="a handful of steps on a few videos: checks the plumbing, not the claims")
    a = p.parse_args(argv)
    a.chain_lengths = [int(k) for k in a.chain_lengths.split(",") if k.strip()]
    if any(k < 3 or k > a.length for k in a.chain_lengths):
        p.error(f"--chain_lengths must lie in 3..{a.length} (2 is dpo; the full chain, "
                f"{a.length + 1}, is the rank row)")
    if a.smoke:
        a.videos, a.test_frac, a.val_videos, a.seeds, a.steps = 28, 0.3, 4, 1, 2
        a.warm_eval_every, a.warm_max_steps = 2, 4
        a.batch_size, a.warm_batch_size, a.chain_lengths, a.gen_videos = 2, 2, [], 2
        a.heartbeat = 10.0
    if a.machine is None:
        cpu = "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
        a.machine = f"{cpu}, {os.cpu_count()} cores, no GPU used"
    a.out = os.path.abspath(a.out)
    return a


RUN_INDEPENDENT = ("out", "jobs", "heartbeat", "machine", "readme")


def check_settings(a) -> None:
    """Resuming reuses finished runs, so OUT must hold runs of these very settings."""
    path = os.path.join(a.out, "settings.json")
    now = {k: v for k, v in sorted(vars(a).items()) if k not in RUN_INDEPENDENT}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            raise SystemExit(f"{a.out} holds a demo run with other settings ({', '.join(changed)}); "
                             "use a new --out")
    else:
        write_json(path, now, indent=1)


def replace_readme_section(readme: str, name: str, text: str) -> str:
    """Swap the text between README's <!-- SECTION:name --> and <!-- END:name --> markers."""
    start, end = f"<!-- SECTION:{name} -->", f"<!-- END:{name} -->"
    with open(readme) as f:
        body = f.read()
    if start not in body or end not in body:
        raise SystemExit(f"{readme}: no {start} ... {end} section to replace")
    head, rest = body.split(start, 1)
    with open(readme + ".tmp", "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    os.replace(readme + ".tmp", readme)
    return f"readme: {readme} {name} section rewritten from RESULTS.md"
