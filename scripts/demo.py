#!/usr/bin/env python
"""The whole method, end to end, on the embedded tiny model and synthetic videos.

Every step calls the project's real command lines as subprocesses, exactly as a user would:

  1. data      gen_chains.py synth -> chains --backend rules (train, validation, held-out test)
               and inject (the error-injection baseline's training set, same training videos)
  2. warm      rank_dpo.py --objective sft (vision tower trained in full) with --val_data: the
               caption loss on the validation chains every --warm_eval_every steps; the best
               point is kept, and training stops when that loss stops improving
  3. methods   from that warm start (--init, so it is also the reference): sft, dpo, mpo, hinge,
               rank, rank --vision frozen, and mpo on the injected negatives, each over --seeds,
               by one rule: a validation point every --eval_every steps (at most --steps), the
               checkpoint with the lowest validation loss of the method's own objective kept,
               stop after --patience points without a lower one
  4. length    K = 2 captions per chain is dpo (the same loss); --chain_lengths 3,4 adds
               rank with --max_chain 3, 4 over the same seeds
  5. eval      eval_judge.py rank (held-out chains, per-chain scores), generate + judge --judge
               rules, argus score --judge rules (ArgusCost-H/-O of those captions), and vidhal and
               tempcompass on the same world rendered in those benchmarks' layouts
               (gen_chains.py benchmarks), per run
  6. report    OUT/RESULTS.md: every cell with a 95% interval from a bootstrap over held-out
               chains and seeds together; the chosen checkpoints and their validation numbers
               against each loss's no-information value; one line per claim of the paper with the
               paired difference, its interval and the verdict, and the smallest difference the
               test set resolves; OUT/plots.png (matplotlib): training and validation curves

Resumable: a training run is done when its OUT/runs/NAME/.done marker exists (written after
rank_dpo.py exits 0; an interrupted run continues from its checkpoint with --resume, its
validation points in runs/NAME/validation.jsonl), and an evaluation is done when its results
JSON exists, so re-running after a kill finishes the job.
Deterministic: every job runs with one torch thread and MKL's strict reproducible mode, and
nothing depends on the order jobs finish.

    python scripts/demo.py --out runs/demo            # what `make demo` runs
    python scripts/demo.py --out /tmp/smoke --smoke   # a handful of steps, to check the plumbing
    python scripts/demo.py --onpolicy                 # the on-policy comparison (scripts/demo_onpolicy.py)
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_steps import (PRINT_LOCK, PY, T0, best_adapter, cell, check_settings,  # noqa: E402
                        chosen_checkpoints, generate_and_judge, learning_curves, make_data,
                        parse_args,
                        selection_rule, rank_eval, read_rank,
                        recipe_args, replace_readme_section, run, say, start_wall_clock,
                        train_to_plateau, verdict, wall_time, warm_start)
from eval_judge import bootstrap_ci, chain_metrics  # noqa: E402
from records import load_jsonl, write_jsonl  # noqa: E402

METHODS = ["sft", "dpo", "mpo", "hinge", "rank", "rank, vision frozen", "inject + mpo"]


# ---------------------------------------------------------------------------------------------
# The plan: every training run and its evaluation
# ---------------------------------------------------------------------------------------------

def plan(a) -> list[dict]:
    """All runs after the warm start, longest first (so the workers finish together)."""
    d = os.path.join(a.out, "data")
    common = recipe_args(a) + ["--init", best_adapter(a, "warm")]
    methods = [  # (row name, objective, data, extra flags)
        ("rank", "rank", "chains.jsonl", []),
        ("rank, vision frozen", "rank", "chains.jsonl", ["--vision", "frozen"]),
        ("mpo", "mpo", "chains.jsonl", []),
        ("hinge", "hinge", "chains.jsonl", []),
        ("inject + mpo", "mpo", "inject.jsonl", []),
        ("dpo", "dpo", "chains.jsonl", []),
        ("sft", "sft", "chains.jsonl", []),
    ]
    jobs = []
    for seed in range(a.seeds):
        for row, obj, data, extra in methods:
            slug = row.replace(", vision frozen", "-frozen").replace(" + ", "-")
            jobs.append(dict(name=f"{slug}-s{seed}", row=row, seed=seed, study="methods", objective=obj,
                             args=["--objective", obj, "--data", os.path.join(d, data),
                                   "--seed", str(seed)] + common + extra))
        for k in a.chain_lengths:   # K = 2 is dpo (same loss), the full chain is the rank row
            jobs.append(dict(name=f"rank-k{k}-s{seed}", row=f"rank, max_chain {k}", seed=seed,
                             study="length", k=k, objective="rank",
                             args=["--objective", "rank", "--data", os.path.join(d, "chains.jsonl"),
                                   "--seed", str(seed), "--max_chain", str(k)] + common))
    return jobs


def train(a, job: dict) -> list[dict]:
    """One method's run, to its validation plateau (the same budget and rule for every method)."""
    return train_to_plateau(a, job["name"], job["args"], val=os.path.join(a.out, "data", "val_chains.jsonl"),
                            every=a.eval_every, max_steps=a.steps, min_gain=a.min_gain,
                            patience=a.patience)


def make_benchmarks(a) -> None:
    """The benchmark-style sets: this world as VidHal and TempCompass (gen_chains.py benchmarks,
    --bench_scenes new scenes), and an ARGUS table of the judged test videos (human caption:
    the gold one), whose captions `generate` writes anyway."""
    d = os.path.join(a.out, "data")
    if not os.path.exists(os.path.join(d, "bench", ".done")):
        run([PY, "gen_chains.py", "benchmarks", "--out", os.path.join(d, "bench"), "--n",
             str(a.bench_scenes), "--seed", str(a.data_seed)],
            os.path.join(a.out, "logs", "data.log"))
        open(os.path.join(d, "bench", ".done"), "w").close()
    write_jsonl(os.path.join(d, "argus_test.jsonl"),
                [{"clip_name": r["id"], "human_caption": r["caption"]}
                 for r in load_jsonl(os.path.join(d, "gen_test.jsonl"))])


def evaluate(a, name: str, threads: int = 1) -> None:
    """The held-out evaluation of the checkpoint a run's validation chose."""
    d, ev = os.path.join(a.out, "data"), os.path.join(a.out, "eval")
    adapter, log = best_adapter(a, name), os.path.join(a.out, "logs", name + ".log")
    stem = os.path.join(ev, name)
    rank_eval(a, adapter, os.path.join(d, "test_chains.jsonl"), stem, log, threads)
    if not a.gen_videos:
        return
    generate_and_judge(adapter, os.path.join(d, "gen_test.jsonl"), os.path.join(d, "test.jsonl"),
                       stem, log, threads)
    bench = os.path.join(d, "bench")
    for out, cmd in [] if not a.bench_scenes else [
            (stem + ".argus.jsonl", ["argus", "score", "--judge", "rules", "--data",
                                     os.path.join(d, "argus_test.jsonl"), "--captions", stem + ".captions.jsonl"]),
            (stem + ".vidhal.jsonl", ["vidhal", "--adapter", adapter, "--data",
                                      os.path.join(bench, "vidhal", "annotations.json"), "--options",
                                      os.path.join(bench, "vidhal", "options.json")]),
            (stem + ".tempcompass.jsonl", ["tempcompass", "--adapter", adapter, "--data",
                                           os.path.join(bench, "tempcompass")])]:
        if not os.path.exists(out + ".results.json"):
            run([PY, "eval_judge.py", *cmd, "--out", out, "--results", out + ".results.json"], log, threads)


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
        curve = train(a, job)
        evaluate(a, job["name"])
        del running[job["name"]]
        with PRINT_LOCK:
            done[0] += 1
            k = done[0]
        acc = read_rank(os.path.join(a.out, "eval", job["name"]))["pairwise"]
        chosen = next(r for r in curve if r["chosen"])
        say(f"{k:2d}/{len(jobs)} {job['name']:<22s} step {chosen['step']} of {curve[-1]['step']} chosen "
            f"(validation loss {chosen['loss']:.3f}); held-out pairwise acc {acc:.3f}"
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
# Statistics: per-item numbers of every run, cells and claims with bootstrap intervals
# ---------------------------------------------------------------------------------------------

def per_item(a, name: str) -> dict[str, np.ndarray]:
    """One number per held-out chain (pairwise, kendall, top1 of the policy's log-probs; reward:
    pairwise of the implicit reward) and per judged video (judge: rules overall), in id order."""
    ev = os.path.join(a.out, "eval", name)
    rows = sorted(load_jsonl(ev + ".chains.jsonl"), key=lambda r: r["id"])
    out = {m: np.array([chain_metrics(r["log-prob"])[m] for r in rows])
           for m in ("pairwise", "kendall", "top1")}
    if rows and "implicit reward" in rows[0]:
        out["reward"] = np.array([chain_metrics(r["implicit reward"])["pairwise"] for r in rows])
    if os.path.exists(ev + ".scores.jsonl"):
        scores = sorted(load_jsonl(ev + ".scores.jsonl"), key=lambda r: r["id"])
        out["judge"] = np.array([np.mean(list(r["scores"].values())) for r in scores])
    for suffix, fields in ((".argus.jsonl", {"argus_h": "cost_h", "argus_o": "cost_o"}),
                           (".vidhal.jsonl", {"vidhal_ndcg": "ndcg", "vidhal_mcqa": "mcqa_correct"}),
                           (".tempcompass.jsonl", {"tempcompass": "correct"})):
        if os.path.exists(ev + suffix + ".results.json"):
            recs = sorted((r for r in load_jsonl(ev + suffix) if r.get("status", "ok") == "ok"),
                          key=lambda r: r["id"])
            out.update({key: np.array([float(r[field]) for r in recs]) for key, field in fields.items()})
    return out


def grid(runs: list[dict[str, np.ndarray]], metric: str) -> np.ndarray:
    """[seeds, items] for one metric (Kendall's tau is nan on a chain scored all equal: 0)."""
    return np.nan_to_num(np.stack([r[metric] for r in runs]), nan=0.0)


def claim(text: str, a_runs: list[dict], b_runs: list[dict], metric: str = "pairwise",
          digits: int = 3) -> str:
    """Paired over seeds (seed s of A against seed s of B) and items (the same chain or video)."""
    n = min(len(a_runs), len(b_runs))
    diff = grid(a_runs[:n], metric) - grid(b_runs[:n], metric)
    d, lo, hi, word = verdict(diff)
    return (f"- {text}: {word}. Difference {d:+.{digits}f}, 95% interval [{lo:+.{digits}f}, "
            f"{hi:+.{digits}f}] ({grid(a_runs, metric).mean():.{digits}f} vs "
            f"{grid(b_runs, metric).mean():.{digits}f}; {n} seeds x {diff.shape[1]} "
            f"{'videos' if metric == 'judge' else 'chains'}).")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def by_row(a, jobs: list[dict]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for j in sorted(jobs, key=lambda j: j["seed"]):
        rows.setdefault(j["row"], []).append(per_item(a, j["name"]))
    rows["rank, max_chain 2"] = rows["dpo"]          # the same loss on the same pairs
    rows[f"rank, max_chain {a.length + 1}"] = rows["rank"]
    return rows


BENCHMARK_KEYS = [("argus_h", "ArgusCost-H (lower: fewer wrong statements)"),
                  ("argus_o", "ArgusCost-O (lower: fewer omissions)"),
                  ("vidhal_ndcg", "VidHal caption ordering, NDCG"),
                  ("vidhal_mcqa", "VidHal MCQA accuracy"),
                  ("tempcompass", "TempCompass-format accuracy (3 tasks)")]


def benchmark_table(a, rows: dict[str, list[dict]], warm: list[dict]) -> list[str]:
    """The paper's other measures on this world: ARGUS costs of the judged captions (rules
    judge), VidHal and TempCompass on scenes rendered in those benchmarks' layouts."""
    if "argus_h" not in warm[0]:
        return []
    n = {k: len(warm[0][k]) for k, _ in BENCHMARK_KEYS}
    lines = ["", "## Benchmark-style measures (eval_judge.py argus, vidhal, tempcompass)", "",
             f"ArgusCost-H / -O: `argus score --judge rules` of the {n['argus_h']} judged captions "
             "against the gold caption (0 = every sentence entailed, nothing left out; 1 = the worst). "
             f"VidHal and TempCompass: `gen_chains.py benchmarks` renders {n['vidhal_ndcg']} new scenes "
             "of this world in those benchmarks' published layouts (VidHal: captions with 0, 1, 2 wrong "
             "facts of one aspect; TempCompass: multi-choice, yes/no and caption matching on direction, "
             "order, speed and attribute change, with reversed clips), scored by option log-probability "
             f"({n['tempcompass']} TempCompass questions). Chance: NDCG 0.5, MCQA 1/3. Speed is a fact the "
             "training captions never state. Cells as above.", "",
             "| method | seeds | " + " | ".join(k[1] for k in BENCHMARK_KEYS) + " |",
             "|---|---|" + "---|" * len(BENCHMARK_KEYS)]
    for name, rs in [("warm start", warm)] + [(m, rows[m]) for m in METHODS]:
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cell(grid(rs, k)) for k, _ in BENCHMARK_KEYS) + " |")
    return lines


def preference_phase(a, jobs: list[dict], warm: dict) -> list[str]:
    """The selection rule and the chosen checkpoints of every row (all seeds)."""
    runs: dict[str, tuple[str, list[list[dict]]]] = {}
    for j in sorted(jobs, key=lambda j: j["seed"]):
        curve = load_jsonl(os.path.join(a.out, "runs", j["name"], "curve.jsonl"))
        # validation chains are whole (K = --length + 1) whatever --max_chain a run trains on
        runs.setdefault(j["row"], (j["objective"], a.length + 1, []))[2].append(curve)
    return ["", "## The preference phase: trained to the validation plateau", "",
            selection_rule(a), ""] + chosen_checkpoints(runs, warm)


def power(rows: dict[str, list[dict]], a) -> str:
    """The smallest paired difference in held-out pairwise accuracy this test set resolves at
    95%: the typical half-width of the claims' intervals (a true difference smaller than it
    leaves the interval holding 0)."""
    pairs = [("rank", "mpo"), ("mpo", "dpo"), ("dpo", "sft"), ("rank", "rank, vision frozen"),
             ("rank", "hinge"), ("rank", "inject + mpo")]
    halves = []
    for x, y in pairs:
        n = min(len(rows[x]), len(rows[y]))
        lo, hi = bootstrap_ci(grid(rows[x][:n], "pairwise") - grid(rows[y][:n], "pairwise"))
        halves.append((hi - lo) / 2)
    return (f"Power: the pairwise-accuracy claims' 95% intervals have a median half-width of "
            f"{np.median(halves):.3f} (from {min(halves):.3f} to {max(halves):.3f}): with "
            f"{a.seeds} seeds of this test set, a paired difference smaller than about "
            f"{np.median(halves):.3f} cannot be told from 0.")


def report(a, jobs: list[dict], curve: list[dict], wall: tuple[float, int]) -> str:
    rows = by_row(a, jobs)
    warm = [per_item(a, "warm")]
    n_test = len(warm[0]["pairwise"])
    chosen_warm = next(c for c in curve if c["chosen"])
    keys = [("pairwise", "pairwise acc (log-prob)"), ("kendall", "Kendall tau"),
            ("top1", "top-1"), ("reward", "pairwise acc (implicit reward)"),
            ("judge", "rules judge, overall 1-10")]
    lines = ["# Demo results", "",
             f"Machine: {a.machine}. Wall time of `scripts/demo.py` for these numbers: "
             f"{wall[0] / 60:.1f} min over {wall[1]} invocation{'s' if wall[1] != 1 else ''} "
             f"({a.jobs} jobs in parallel, 1 torch thread each; the warm start, which runs alone, "
             f"{a.jobs} threads; set-up and pip excluded; a resumed run adds the time each "
             "invocation took).", "",
             f"Setting: `gen_chains.py synth --n {a.videos} --test_frac {a.test_frac:.3g}`, rules chains "
             f"of {a.length + 1} captions (`--length {a.length}`), {a.val_videos} training videos kept "
             f"apart for validation. Warm start: SFT with the vision tower trained in full "
             f"(`--vision {a.warm_vision}`), lr {a.warm_lr} (constant), batch {a.warm_batch_size}, "
             f"until the validation caption loss stops improving (step {chosen_warm['step']} chosen "
             f"of {curve[-1]['step']}, curve below). Every method then trains from it (`--init`, "
             f"also the reference) by the same rule (next section): lr {a.lr} (constant), batch "
             f"{a.batch_size}, beta {a.beta}, NTP weight {a.ntp_weight} ({a.ntp_norm} over tokens), "
             f"at most {a.steps} steps; seeds 0..{a.seeds - 1}. Held-out: {n_test} test chains scored "
             f"by `eval_judge.py rank`; captions of the first {a.gen_videos} test videos by "
             "`generate`, scored by `judge --judge rules`.", "",
             "For numbers that repeat bit for bit, after a kill too, every job runs on a fixed "
             "number of torch threads with MKL's reproducible mode (`MKL_CBWR=AUTO,STRICT`), and "
             "`generate` decodes fixed blocks of the input however a resume splits it.", "",
             "Cells: mean [95% interval], a bootstrap over held-out chains (videos for the judge) "
             "and seeds together. Chance: pairwise 0.5, Kendall 0, top-1 0.2. The implicit reward "
             "scores log pi - log pi_ref against the warm start.", "",
             "| method | seeds | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]

    def row(name, rs):
        cells = [cell(grid(rs, k), 2 if k == "judge" else 3) if k in rs[0] else "–" for k, _ in keys]
        return f"| {name} | {len(rs)} | " + " | ".join(cells) + " |"

    lines.append(row("warm start (SFT, before any preference step)", warm))
    for name in METHODS:
        lines.append(row(name, rows[name]))

    lines += benchmark_table(a, rows, warm)
    lines += preference_phase(a, jobs, chosen_warm)
    lines += ["", "## Warm start: learning curve (SFT on c0)", "",
              "| step | train NLL (nats/token) | validation caption NLL (nats/caption) | "
              "validation pairwise acc |", "|---|---|---|---|"]
    lines += [f"| {c['step']}{' (chosen)' if c['chosen'] else ''} | {c['train_ntp']:.3f} | "
              f"{c['nll']:.2f} | {c['logp_acc']:.3f} |" for c in curve]

    lengths = [2] + list(a.chain_lengths) + [a.length + 1]
    lines += ["", "## Chain length (rank, `--max_chain K`, K captions per training chain; "
              "K = 2 is the dpo row)", "",
              "| K | seeds | pairwise acc (log-prob) | Kendall tau | top-1 |", "|---|---|---|---|---|"]
    for k in lengths:
        rs = rows[f"rank, max_chain {k}"]
        lines.append(f"| {k} | {len(rs)} | " + " | ".join(cell(grid(rs, m)) for m in
                                                          ("pairwise", "kendall", "top1")) + " |")

    lines += ["", "## The paper's claims", "",
              "Each line: the paired difference A - B of held-out pairwise accuracy (per chain, per "
              "seed; the same resample of chains and seeds for A and B) with its 95% bootstrap "
              "interval. Reproduced: the interval lies above 0; not reproduced: below 0; "
              "inconclusive: it holds 0.", ""]
    lines.append(claim("rank > mpo", rows["rank"], rows["mpo"]))
    lines.append(claim("mpo > dpo", rows["mpo"], rows["dpo"]))
    lines.append(claim("dpo > sft", rows["dpo"], rows["sft"]))
    lines.append(claim("rank (vision encoder trained, LoRA) > rank (vision frozen)",
                       rows["rank"], rows["rank, vision frozen"]))
    lines.append(claim(f"longer chains help (K = {lengths[-1]} > K = 2)",
                       rows[f"rank, max_chain {lengths[-1]}"], rows["rank, max_chain 2"]))
    lines.append(claim("Plackett-Luce > hinge (rank > hinge)", rows["rank"], rows["hinge"]))
    lines.append(claim("chains > error injection (rank > inject + mpo)", rows["rank"],
                       rows["inject + mpo"]))
    lines.append(claim("caption quality: rank > sft (rules judge)", rows["rank"], rows["sft"],
                       metric="judge", digits=2))
    lines.append(claim("caption quality: rank > warm start (rules judge)", rows["rank"],
                       warm * len(rows["rank"]), metric="judge", digits=2))
    lines += ["", power(rows, a)]
    lines += ["", "The same claims for the objectives with a reference, scored by what they train: "
              "held-out pairwise accuracy of the implicit reward (log pi - log pi_ref; sft and hinge "
              "train no reward, so they are left out here). These lines were added after a `--full` "
              "run showed the log-prob column level and this column spread; read them as a second "
              "look, not a pre-registered test.", ""]
    for text, x, y in [("rank > mpo", "rank", "mpo"), ("mpo > dpo", "mpo", "dpo"),
                       ("rank (vision encoder trained, LoRA) > rank (vision frozen)", "rank",
                        "rank, vision frozen"),
                       ("chains > error injection (rank > inject + mpo)", "rank", "inject + mpo")]:
        lines.append(claim(text + ", implicit reward", rows[x], rows[y], metric="reward"))
    lines += ["", "Per-run numbers: `eval/NAME.rank.json`, `eval/NAME.chains.jsonl` (per-chain "
              "scores) and `eval/NAME.scores.jsonl`; training curves: `runs/NAME/metrics.jsonl`; "
              "logs: `logs/NAME.log`; plots: `plots.png`.", ""]
    return "\n".join(lines)


def plot(a, jobs: list[dict], curve: list[dict]) -> str:
    """plots.png: seed 0 of every method, its training (thin) and validation (markers) curves;
    dashed lines: each loss's no-information value and the warm start's validation numbers."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: `pip install matplotlib` (make setup installs it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(3, 3, figsize=(18, 14))
    colours = {row: f"C{i}" for i, row in enumerate(METHODS)}
    warm = next(c for c in curve if c["chosen"])
    learning_curves(ax[:2], [(j["row"], j["objective"], os.path.join(a.out, "runs", j["name"]),
                              colours[j["row"]]) for j in jobs
                             if j["study"] == "methods" and j["seed"] == 0], a.length + 1, warm)
    ax[2, 0].plot([c["step"] for c in curve], [c["nll"] for c in curve], marker="o")
    ax[2, 0].plot([warm["step"]], [warm["nll"]], marker="*", ms=14, color="k")
    ax[2, 0].set(xlabel="warm-start step", ylabel="validation caption NLL (nats/caption)",
                 title="warm start: validation caption loss (star: chosen)")
    rows, held = by_row(a, jobs), [per_item(a, "warm")]
    names = ["warm start"] + METHODS
    for axis, metric, title in [(ax[2, 1], "pairwise", "held-out pairwise accuracy (log-prob)"),
                                (ax[2, 2], "judge", "rules judge, overall 1-10")]:
        for i, name in enumerate(names):
            g = grid(held if name == "warm start" else rows[name], metric)
            lo, hi = bootstrap_ci(g)
            axis.errorbar([g.mean()], [i], xerr=[[g.mean() - lo], [hi - g.mean()]], fmt="o",
                          capsize=4, color="k" if i == 0 else colours[name])
        axis.set_yticks(range(len(names)), names, fontsize=8)
        axis.invert_yaxis()
        axis.set(title=title + ", 95% interval")
    ax[2, 1].axvline(0.5, color="grey", ls=":", lw=1)
    fig.tight_layout()
    path = os.path.join(a.out, "plots.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot: {path}"


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    a = parse_args(argv, __doc__)
    try:
        import matplotlib  # noqa: F401  (checked before an hour of training, not after)
    except ImportError:
        raise SystemExit("scripts/demo.py draws plots.png with matplotlib: `pip install matplotlib`")
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    check_settings(a)
    start_wall_clock(a.out, T0)
    jobs = plan(a)
    say(f"demo -> {a.out}: data, warm start, {len(jobs)} runs ({a.jobs} at a time), evaluation")
    make_data(a)
    if a.gen_videos and a.bench_scenes:
        make_benchmarks(a)
    t = time.time()
    curve = warm_start(a)
    evaluate(a, "warm")
    say(f"warm start done ({time.time() - t:.0f} s, {curve[-1]['step']} steps): held-out pairwise "
        f"acc {read_rank(os.path.join(a.out, 'eval', 'warm'))['pairwise']:.3f}")
    run_all(a, jobs)
    text = report(a, jobs, curve, wall_time())
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    say(plot(a, jobs, curve))
    if a.readme:
        say(write_readme(a, text))
    say(f"done: {os.path.join(a.out, 'RESULTS.md')}")


def write_readme(a, results: str) -> str:
    """The README's demo section = RESULTS.md as printed (headings one level down), the plot,
    and a pointer to the recipe sweep; nothing in it is typed by hand."""
    import shutil
    docs = os.path.join(os.path.dirname(os.path.abspath(a.readme)), "docs")
    os.makedirs(docs, exist_ok=True)
    shutil.copyfile(os.path.join(a.out, "plots.png"), os.path.join(docs, "demo_plots.png"))
    body = results.replace("\n## ", "\n#### ").replace("# Demo results", "## Demo results (`make demo`)", 1)
    lead = ("Written by `make demo-readme` from the `runs/demo/RESULTS.md` that `make demo` "
            "(`scripts/demo.py` with its committed defaults) printed: every number below is that "
            "run's. The demo is a miniature (a ~1M-parameter model, about a thousand synthetic chains): "
            "it says which way each effect goes on this toy task, not how large it is on real "
            "videos.\n\n")
    body = body.replace("\n\n", "\n\n" + lead, 1)
    return replace_readme_section(a.readme, "demo", (
        f"{body}\n![demo plots](docs/demo_plots.png)\n\nThe recipe "
        "(lr, beta, NTP weight and normalisation) comes from `scripts/sweep.py`; its table "
        "and what it shows: [docs/demo_sweep.md](docs/demo_sweep.md). The longer study "
        "(`python scripts/demo.py --full`: 3 seeds, up to 200 preference steps, 20 benchmark "
        "scenes; its wall time is in it): [docs/demo_full.md](docs/demo_full.md).\n\nBenchmarks (kernel "
        "speed and memory, training throughput, chain generation), with the machine each ran "
        "on: [bench/RESULTS.md](bench/RESULTS.md)."))


if __name__ == "__main__":
    if "--onpolicy" in sys.argv[1:]:           # the on-policy comparison (Table 1): its own script
        import demo_onpolicy
        demo_onpolicy.main([x for x in sys.argv[1:] if x != "--onpolicy"])
    else:
        main()
