#!/usr/bin/env python
"""The whole method, end to end, on the embedded tiny model and synthetic videos (issue 6).

Every step calls the project's real command lines as subprocesses, exactly as a user would:

  1. data      gen_chains.py synth -> chains --backend rules (train and held-out test)
               and inject (the error-injection baseline's training set)
  2. warm      rank_dpo.py --objective sft: one SFT warm start of the tiny model
  3. methods   from that warm start (--init, so it is also the reference): sft, dpo, mpo, hinge,
               rank, rank --vision frozen, and mpo on the injected negatives, each over --seeds
  4. length    rank with --max_chain 2, 3, ... (the chain-length study) over the same seeds
  5. eval      eval_judge.py rank (held-out chains), generate + judge --judge rules, per run
  6. report    OUT/RESULTS.md (mean, std and n per method; the chain-length table; one line per
               claim of the paper saying whether it reproduced) and, with matplotlib, OUT/plots.png

Resumable: a training run is done when its OUT/runs/NAME/.done marker exists (written after
rank_dpo.py exits 0; an interrupted run continues from its checkpoint with --resume), and an
evaluation is done when its results JSON exists, so re-running after a kill finishes the job.
Jobs run --jobs at a time with one torch thread each (one per core).

    python scripts/demo.py --out runs/demo            # what `make demo` runs
    python scripts/demo.py --out /tmp/smoke --smoke   # a handful of steps, to check the plumbing
    python scripts/demo.py --onpolicy                 # the on-policy comparison (scripts/demo_onpolicy.py)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
T0 = time.time()
PRINT_LOCK = threading.Lock()


def say(msg: str) -> None:
    m, s = divmod(int(time.time() - T0), 60)
    with PRINT_LOCK:
        print(f"[{m:02d}:{s:02d}] {msg}", flush=True)


def run(cmd: list[str], log: str, threads: int) -> None:
    """One CLI call, output appended to `log`; a failure stops the demo with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


# ---------------------------------------------------------------------------------------------
# The plan: every training run and its evaluation
# ---------------------------------------------------------------------------------------------

def plan(a) -> list[dict]:
    """All runs after the warm start, longest first (so the two workers finish together)."""
    d = os.path.join(a.out, "data")
    common = ["--batch_size", str(a.batch_size), "--max_steps", str(a.steps),
              "--warmup_steps", str(max(1, a.steps // 10)), "--beta", str(a.beta),
              "--init", os.path.join(a.out, "runs", "warm")]
    methods = [  # (row name, objective, data, lr, extra flags)
        ("rank", "rank", "chains.jsonl", a.lr, []),
        ("rank, vision frozen", "rank", "chains.jsonl", a.lr, ["--vision", "frozen"]),
        ("mpo", "mpo", "chains.jsonl", a.lr, []),
        ("hinge", "hinge", "chains.jsonl", a.lr, []),
        ("inject + mpo", "mpo", "inject.jsonl", a.lr, []),
        ("dpo", "dpo", "chains.jsonl", a.lr, []),
        ("sft", "sft", "chains.jsonl", a.lr, []),
    ]
    jobs = []
    for seed in range(a.seeds):
        for row, obj, data, lr, extra in methods:
            slug = row.replace(", vision frozen", "-frozen").replace(" + ", "-")
            jobs.append(dict(name=f"{slug}-s{seed}", row=row, seed=seed, study="methods",
                             args=["--objective", obj, "--data", os.path.join(d, data),
                                   "--lr", str(lr), "--seed", str(seed)] + common + extra))
        for k in a.chain_lengths:   # the full chain (length + 1) is the "rank" row itself
            jobs.append(dict(name=f"rank-k{k}-s{seed}", row=f"rank, max_chain {k}", seed=seed,
                             study="length", k=k,
                             args=["--objective", "rank", "--data", os.path.join(d, "chains.jsonl"),
                                   "--lr", str(a.lr), "--seed", str(seed), "--max_chain", str(k)]
                             + common))
    return jobs


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def make_data(a) -> None:
    d = os.path.join(a.out, "data")
    log = os.path.join(a.out, "logs", "data.log")
    if not os.path.exists(os.path.join(d, ".synth_done")):
        run([PY, "gen_chains.py", "synth", "--out", d, "--n", str(a.videos),
             "--test_frac", str(a.test_frac), "--seed", str(a.data_seed)], log, 1)
        open(os.path.join(d, ".synth_done"), "w").close()
    # chains and inject append and skip ids already written: re-running them resumes
    for cmd, inp, out in [("chains", "train.jsonl", "chains.jsonl"),
                          ("chains", "test.jsonl", "test_chains.jsonl"),
                          ("inject", "train.jsonl", "inject.jsonl")]:
        run([PY, "gen_chains.py", cmd, "--backend", "rules", "--in", os.path.join(d, inp),
             "--out", os.path.join(d, out), "--length", str(a.length), "--seed", str(a.data_seed)],
            log, 1)
    # captions are generated for the first --gen_videos held-out videos (decoding is the slow part)
    with open(os.path.join(d, "test.jsonl")) as f:
        lines = [ln for ln in f if ln.strip()]
    with open(os.path.join(d, "gen_test.jsonl"), "w") as f:
        f.writelines(lines[:a.gen_videos])
    n = {k: sum(1 for ln in open(os.path.join(d, k)) if ln.strip())
         for k in ("chains.jsonl", "test_chains.jsonl", "inject.jsonl")}
    say(f"data: {n['chains.jsonl']} training chains of {a.length + 1} captions, "
        f"{n['test_chains.jsonl']} held-out chains, {n['inject.jsonl']} injected sets "
        f"(logs/data.log)")


def train(a, name: str, args: list[str], threads: int) -> None:
    out = os.path.join(a.out, "runs", name)
    if os.path.exists(os.path.join(out, ".done")):
        return
    run([PY, "rank_dpo.py", "--model", "tiny", "--output_dir", out, "--resume",
         "--save_every", str(a.save_every), "--keep_checkpoints", "1", "--log_every", "1"] + args,
        os.path.join(a.out, "logs", name + ".log"), threads)
    open(os.path.join(out, ".done"), "w").close()


def evaluate(a, name: str, threads: int) -> None:
    d, ev = os.path.join(a.out, "data"), os.path.join(a.out, "eval")
    adapter, log = os.path.join(a.out, "runs", name), os.path.join(a.out, "logs", name + ".log")
    rank_json = os.path.join(ev, name + ".rank.json")
    if not os.path.exists(rank_json):
        run([PY, "eval_judge.py", "rank", "--adapter", adapter, "--data",
             os.path.join(d, "test_chains.jsonl"), "--results", rank_json], log, threads)
    caps, scores = os.path.join(ev, name + ".captions.jsonl"), os.path.join(ev, name + ".scores.jsonl")
    if a.gen_videos and not os.path.exists(scores + ".results.json"):
        run([PY, "eval_judge.py", "generate", "--adapter", adapter, "--data",
             os.path.join(d, "gen_test.jsonl"), "--out", caps], log, threads)
        run([PY, "eval_judge.py", "judge", "--judge", "rules", "--pred", caps, "--ref",
             os.path.join(d, "test.jsonl"), "--out", scores,
             "--results", scores + ".results.json"], log, threads)


def progress_of(a, name: str) -> str:
    """The trainer's progress bar position, read from the tail of the run's log."""
    try:
        with open(os.path.join(a.out, "logs", name + ".log"), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 400))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "starting"
    if os.path.exists(os.path.join(a.out, "runs", name, ".done")):
        return "evaluating"
    m = re.findall(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", tail)
    return f"step {m[-1][0]}/{m[-1][1]}" if m else "loading"


def run_all(a, jobs: list[dict]) -> None:
    running: dict[str, float] = {}
    done = [0]
    stop = threading.Event()

    def one(job):
        running[job["name"]] = time.time()
        t = time.time()
        train(a, job["name"], job["args"], 1)
        evaluate(a, job["name"], 1)
        del running[job["name"]]
        with PRINT_LOCK:
            done[0] += 1
            k = done[0]
        acc = read_rank(a, job["name"])["pairwise"]
        say(f"{k:2d}/{len(jobs)} {job['name']:<22s} held-out pairwise acc {acc:.3f}"
            f"  ({time.time() - t:.0f} s)")

    def heartbeat():
        while not stop.wait(a.heartbeat):
            now = list(running)
            if now:
                say("running: " + ", ".join(f"{n} ({progress_of(a, n)})" for n in now))

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with ThreadPoolExecutor(a.jobs) as pool:
            for fut in as_completed([pool.submit(one, j) for j in jobs]):
                fut.result()
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def read_rank(a, name: str) -> dict:
    with open(os.path.join(a.out, "eval", name + ".rank.json")) as f:
        r = json.load(f)["scorers"]
    lp, ir = r["log-prob"], r.get("implicit reward", {})
    out = {"pairwise": lp["pairwise"]["mean"], "kendall": lp["kendall"]["mean"],
           "top1": lp["top1"]["mean"], "n_chains": lp["n_chains"],
           "reward_pairwise": ir.get("pairwise", {}).get("mean", float("nan"))}
    judge = os.path.join(a.out, "eval", name + ".scores.jsonl.results.json")
    if os.path.exists(judge):
        with open(judge) as f:
            out["judge"] = json.load(f)["overall"]["mean"]
    return out


def stats(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x == x]
    n = len(xs)
    if not n:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd, n


def fmt(m: float, sd: float, digits: int = 3) -> str:
    if m != m:
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if sd == sd else f"{m:.{digits}f}"


def compare(name: str, a_xs: list[float], b_xs: list[float], strict: bool) -> str:
    """One claim 'A > B' (strict) or 'A >= B': the gap of the means against its standard error."""
    ma, sa, na = stats(a_xs)
    mb, sb, nb = stats(b_xs)
    d = ma - mb
    se = math.sqrt((sa ** 2 if na > 1 else 0) / na + (sb ** 2 if nb > 1 else 0) / nb)
    z = d / se if se > 0 else float("nan")
    if na < 2 or nb < 2:
        verdict = "not testable (needs at least 2 seeds for a spread)"
    elif d > 2 * se:
        verdict = "**reproduced**"
    elif d > 0:
        verdict = "same direction, within noise (gap < 2 SE)"
    elif not strict and -d <= 2 * se:
        verdict = "**reproduced as a tie** (A is not significantly worse; gap within 2 SE)"
    else:
        verdict = "**not reproduced**"
    return (f"- {name}: {verdict}. Gap {d:+.3f} (SE of the gap {se:.3f}, {z:+.1f} SE; "
            f"{ma:.3f} vs {mb:.3f}, n = {na}, {nb} seeds).")


def report(a, jobs: list[dict], wall: float) -> str:
    rows: dict[str, list[dict]] = {}
    for j in jobs:
        rows.setdefault(j["row"], []).append(read_rank(a, j["name"]))
    warm = read_rank(a, "warm")
    n_test = warm["n_chains"]
    keys = [("pairwise", "pairwise acc (log-prob)"), ("kendall", "Kendall tau"),
            ("top1", "top-1"), ("reward_pairwise", "pairwise acc (implicit reward)"),
            ("judge", "rules judge, overall 1-10")]
    lines = ["# Demo results", "",
             f"Machine: {a.machine}. Wall time of this run of `scripts/demo.py`: {wall / 60:.1f} min "
             f"({a.jobs} jobs in parallel, 1 torch thread each; set-up and pip excluded; resumed "
             f"steps count only the time they took in this run).", "",
             f"Setting: `gen_chains.py synth --n {a.videos} --test_frac {a.test_frac:.3g}`, rules chains "
             f"of {a.length + 1} captions (`--length {a.length}`); SFT warm start "
             f"{a.warm_steps} steps at lr {a.warm_lr}; every method then {a.steps} steps from it "
             f"(`--init`, also the reference) at lr {a.lr}, batch {a.batch_size}, beta {a.beta}; "
             f"seeds 0..{a.seeds - 1}. Held-out: {n_test} test chains scored by `eval_judge.py rank`; "
             f"captions of the first {a.gen_videos} test videos by `generate`, scored by "
             f"`judge --judge rules`.", "",
             "Cells are mean ± std over seeds (n = seeds). The ranking accuracy of the claims is the "
             "held-out pairwise accuracy of the policy's summed log-probs (chance 0.5); the implicit "
             "reward column scores log pi - log pi_ref against the warm start.", "",
             "| method | n | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]

    def row(name, rs):
        cells = [fmt(*stats([r.get(k, float("nan")) for r in rs])[:2], digits=2 if k == "judge" else 3)
                 for k, _ in keys]
        return f"| {name} | {len(rs)} | " + " | ".join(cells) + " |"

    lines.append(row("warm start (SFT, no preference step)", [warm]))
    for name in ["sft", "dpo", "mpo", "hinge", "rank", "rank, vision frozen", "inject + mpo"]:
        lines.append(row(name, rows[name]))
    acc = {name: [r["pairwise"] for r in rs] for name, rs in rows.items()}

    lines += ["", "## Chain length (rank, `--max_chain K`, K captions per training chain)", "",
              "| K | n | pairwise acc (log-prob) | Kendall tau | top-1 |", "|---|---|---|---|---|"]
    lengths = list(a.chain_lengths) + [a.length + 1]
    by_k = {k: rows[f"rank, max_chain {k}"] for k in a.chain_lengths}
    by_k[a.length + 1] = rows["rank"]
    for k in lengths:
        rs = by_k[k]
        lines.append(f"| {k} | {len(rs)} | " + " | ".join(
            fmt(*stats([r[m] for r in rs])[:2]) for m in ("pairwise", "kendall", "top1")) + " |")

    lines += ["", "## The paper's claims, on held-out pairwise accuracy", "",
              "A gap counts as reproduced when it exceeds twice its standard error "
              "(sqrt(sd_A^2/n_A + sd_B^2/n_B), spread over seeds). All runs share one test set, so "
              "this is training noise only: which held-out chains were drawn is a further source of "
              "error, shown per run as the bootstrap 95% interval in eval/NAME.rank.json.", ""]
    lines.append(compare("rank >= mpo", acc["rank"], acc["mpo"], strict=False))
    lines.append(compare("mpo >= dpo", acc["mpo"], acc["dpo"], strict=False))
    lines.append(compare("dpo > sft", acc["dpo"], acc["sft"], strict=True))
    lines.append(compare("rank (vision encoder trained, LoRA) > rank (vision frozen)",
                         acc["rank"], acc["rank, vision frozen"], strict=True))
    means = [stats([r["pairwise"] for r in by_k[k]])[0] for k in lengths]
    steps_up = sum(1 for x, y in zip(means, means[1:]) if y > x)
    lines.append(compare(f"accuracy grows with chain length (K = {lengths[-1]} > K = {lengths[0]})",
                         [r["pairwise"] for r in by_k[lengths[-1]]],
                         [r["pairwise"] for r in by_k[lengths[0]]], strict=True)
                 + f" Means by K: {', '.join(f'{m:.3f}' for m in means)} "
                   f"({steps_up} of {len(means) - 1} steps up).")
    lines.append(compare("rank (chains) > inject + mpo (independent one-error negatives)",
                         acc["rank"], acc["inject + mpo"], strict=True))
    lines += ["", "Per-run numbers: `eval/NAME.rank.json` and `eval/NAME.scores.jsonl.results.json`; "
              "training curves: `runs/NAME/metrics.jsonl`; logs: `logs/NAME.log`.", ""]
    return "\n".join(lines)


def plot(a, jobs: list[dict]) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: matplotlib is not installed (optional: `pip install matplotlib`); skipped"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {}
    for j in jobs:
        if j["study"] != "methods":
            continue
        path = os.path.join(a.out, "runs", j["name"], "metrics.jsonl")
        with open(path) as f:
            m = [json.loads(ln) for ln in f if ln.strip()]
        c = colours.setdefault(j["row"], f"C{len(colours)}")
        ax1.plot([r["step"] for r in m], [r["loss"] for r in m], color=c, alpha=0.6, lw=1,
                 label=j["row"] if j["seed"] == 0 else None)
    ax1.set(xlabel="step", ylabel="training loss", title="loss curves (all seeds)", yscale="log")
    ax1.legend(fontsize=8)
    ks = list(a.chain_lengths) + [a.length + 1]
    names = {k: [j["name"] for j in jobs if j.get("k") == k] for k in a.chain_lengths}
    names[a.length + 1] = [j["name"] for j in jobs if j["row"] == "rank"]
    ms = [stats([read_rank(a, n)["pairwise"] for n in names[k]]) for k in ks]
    ax2.errorbar(ks, [m[0] for m in ms], yerr=[m[1] if m[1] == m[1] else 0 for m in ms],
                 marker="o", capsize=4)
    ax2.set(xlabel="chain length K (captions per training chain)",
            ylabel="held-out pairwise accuracy", title="rank: accuracy vs chain length",
            xticks=ks)
    fig.tight_layout()
    path = os.path.join(a.out, "plots.png")
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 torch thread each)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--videos", type=int, default=450, help="synthetic videos (train + test)")
    p.add_argument("--test_frac", type=float, default=1 / 3)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--length", type=int, default=4, help="degradation steps: chains of length+1")
    p.add_argument("--chain_lengths", default="2,3,4", help="--max_chain values besides the full chain")
    p.add_argument("--warm_steps", type=int, default=100)
    p.add_argument("--warm_lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--gen_videos", type=int, default=40, help="held-out videos captioned and judged")
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--heartbeat", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--machine", default=None, help="named in RESULTS.md (default: CPU model and cores)")
    p.add_argument("--smoke", action="store_true",
                   help="a handful of steps on a few videos: checks the plumbing, not the claims")
    a = p.parse_args(argv)
    a.chain_lengths = [int(k) for k in a.chain_lengths.split(",") if k.strip()]
    if any(k < 2 or k > a.length for k in a.chain_lengths):
        p.error(f"--chain_lengths must lie in 2..{a.length} (the full chain, {a.length + 1}, is the rank row)")
    if a.smoke:
        a.videos, a.test_frac, a.seeds, a.warm_steps, a.steps = 24, 0.25, 2, 3, 2
        a.batch_size, a.chain_lengths, a.gen_videos, a.heartbeat = 2, [2], 2, 10.0
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


def main(argv=None) -> None:
    a = parse_args(argv)
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    jobs = plan(a)
    say(f"demo -> {a.out}: data, 1 warm start, {len(jobs)} runs ({a.jobs} at a time), evaluation")
    make_data(a)
    t = time.time()
    say(f"warm start: sft, {a.warm_steps} steps (logs/warm.log)")
    train(a, "warm", ["--objective", "sft", "--data", os.path.join(a.out, "data", "chains.jsonl"),
                      "--lr", str(a.warm_lr), "--batch_size", str(a.batch_size),
                      "--max_steps", str(a.warm_steps), "--warmup_steps", str(max(1, a.warm_steps // 10)),
                      "--seed", "0"], a.jobs)
    evaluate(a, "warm", a.jobs)
    say(f"warm start done ({time.time() - t:.0f} s): held-out pairwise acc "
        f"{read_rank(a, 'warm')['pairwise']:.3f}")
    run_all(a, jobs)
    text = report(a, jobs, time.time() - T0)
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    say(plot(a, jobs))
    say(f"done: {os.path.join(a.out, 'RESULTS.md')}")


if __name__ == "__main__":
    if "--onpolicy" in sys.argv[1:]:           # the on-policy comparison (Table 1): its own script
        import demo_onpolicy
        demo_onpolicy.main([x for x in sys.argv[1:] if x != "--onpolicy"])
    else:
        main()
