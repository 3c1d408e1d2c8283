#!/usr/bin/env python
"""The paper's Table 1 on the embedded world: caption chains against the on-policy pipelines.
Every step is the project's real command line, run as a subprocess:

  1. base      the main demo's data and SFT warm start (scripts/demo.py): reused from
               --warm_from (default runs/demo) when it finished there, else built here by the
               same commands
  2. sample    eval_judge.py sample: --num_samples captions per training video from the warm start
               (the main demo's training videos, or the first --train_videos of them; every method
               below uses only those)
  3. data      gen_chains.py improve / compare / rlaifv --backend rules over the samples (the
               synthetic facts play the teacher); chains and inject restricted to the same videos
  4. train     from the same warm start (--init, also the reference) with the main demo's recipe
               (scripts/sweep.py's lr, beta, NTP weight and norm) and its selection rule (the
               checkpoint with the lowest validation loss of the method's own objective on the
               main demo's validation chains; stop when it stops falling), over --seeds:
               inject + mpo (error injection), chains + rank (caption chains), improve + dpo,
               compare + dpo, rlaifv + rank (its ranked list; a pair is DPO)
  5. eval      eval_judge.py generate on the first --gen_videos held-out videos, judge --judge rules
  6. report    OUT/RESULTS.md: Table 1 (mean overall 1-10 and a 95% interval from a bootstrap over
               seeds and videos), the verdict on "chains beat every on-policy pipeline" (paired by
               video), and each method's data cost (LLM calls and model samples per training example)

Resumable like scripts/demo.py: a finished step leaves its output (a .done marker, a results
JSON) and is skipped; an interrupted one resumes. Jobs run --jobs at a time, 1 torch thread each.

    python scripts/demo.py --onpolicy                      # = python scripts/demo_onpolicy.py
    python scripts/demo_onpolicy.py --out /tmp/op --smoke  # a few steps: checks the plumbing
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_steps  # noqa: E402  (the runner, the main demo's data and warm start, training steps)
from demo_steps import PY, ROOT, run, say  # noqa: E402
from records import is_ok, load_jsonl, write_jsonl  # noqa: E402

# (row, objective, data file) in Table 1's order; the first two are the paper's own data
METHODS = [("error injection (inject + mpo)", "mpo", "inject.jsonl"),
           ("caption chains (rank)", "rank", "chains.jsonl"),
           ("response improvement (improve + dpo)", "dpo", "improve.jsonl"),
           ("response comparison (compare + dpo)", "dpo", "compare.jsonl"),
           ("RLAIF-V (rlaifv + rank)", "rank", "rlaifv.jsonl")]
CHAINS = METHODS[1][0]


def slug(row: str) -> str:
    """'caption chains (rank)' -> 'chains': the data file's name, which names the run."""
    return next(data for r, _, data in METHODS if r == row).removesuffix(".jsonl")


# ---------------------------------------------------------------------------------------------

def base(a) -> argparse.Namespace:
    """The main demo's data and warm start: --warm_from's when finished there, else built in
    OUT/base by the main demo's own steps (scripts/demo_steps.py make_data, warm_start)."""
    for out in (a.warm_from, os.path.join(a.out, "base")):
        b = demo_steps.parse_args(["--out", out] + (["--smoke"] if a.smoke else []))
        if os.path.exists(os.path.join(b.out, "runs", "warm", ".done")):
            say(f"base: reusing the data and warm start in {b.out}")
            return b
    say(f"base: building the main demo's data and warm start in {b.out} (scripts/demo.py's steps)")
    os.makedirs(os.path.join(b.out, "eval"), exist_ok=True)
    demo_steps.check_settings(b)
    demo_steps.make_data(b)
    demo_steps.warm_start(b)
    return b


def make_data(a, b) -> None:
    d, bd = os.path.join(a.out, "data"), os.path.join(b.out, "data")
    log = os.path.join(a.out, "logs", "data.log")
    os.makedirs(d, exist_ok=True)
    # the main demo's training chains (its validation videos stay out), the first --train_videos
    ids = [r["id"] for r in load_jsonl(os.path.join(bd, "chains.jsonl"))][:a.train_videos or None]
    train = [r for r in load_jsonl(os.path.join(bd, "train.jsonl")) if r["id"] in set(ids)]
    write_jsonl(os.path.join(d, "train.jsonl"), [{**r, "video": os.path.join(bd, r["video"])} for r in train])
    write_jsonl(os.path.join(d, "gen_test.jsonl"), [{**r, "video": os.path.join(bd, r["video"])}
                                              for r in load_jsonl(os.path.join(bd, "test.jsonl"))[:a.gen_videos]])
    for name in ("chains.jsonl", "inject.jsonl"):
        write_jsonl(os.path.join(d, name), [{**r, "video": os.path.join(bd, r["video"])}
                                      for r in load_jsonl(os.path.join(bd, name)) if r["id"] in ids])
    if os.path.exists(os.path.join(d, ".done")):
        return
    t = time.time()
    run([PY, "eval_judge.py", "sample", "--adapter", demo_steps.best_adapter(b, "warm"),
         "--data", os.path.join(d, "train.jsonl"), "--video_root", "/", "--out",
         os.path.join(d, "samples.jsonl"), "--num_samples", str(a.num_samples), "--temperature",
         str(a.temperature), "--max_new_tokens", str(a.max_new_tokens), "--seed", "0", "--device", "cpu"],
        log, a.jobs)
    say(f"sample: {a.num_samples} captions x {len(train)} videos from the warm start ({time.time() - t:.0f} s)")
    for step in ("improve", "compare", "rlaifv"):
        run([PY, "gen_chains.py", step, "--backend", "rules", "--in", os.path.join(d, "samples.jsonl"),
             "--ref", os.path.join(d, "train.jsonl"), "--out", os.path.join(d, f"{step}.jsonl")], log, 1)
    counts = {n: sum(is_ok(r) for r in load_jsonl(os.path.join(d, n + ".jsonl")))
              for n in ("chains", "inject", "improve", "compare", "rlaifv")}
    say("data (training examples): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    open(os.path.join(d, ".done"), "w").close()


def evaluate(a, b, name: str, adapter: str, threads: int) -> None:
    demo_steps.generate_and_judge(adapter, os.path.join(a.out, "data", "gen_test.jsonl"),
                                  os.path.join(b.out, "data", "test.jsonl"),
                                  os.path.join(a.out, "eval", name),
                                  os.path.join(a.out, "logs", name + ".log"), threads, device="cpu")


def recipe(a, b) -> argparse.Namespace:
    """The main demo's preference recipe (lr, beta, NTP weight and norm, batch: scripts/sweep.py's
    choice) and selection rule, with this stage's step budget when given."""
    smoke = {"batch_size": 1} if a.smoke else {}   # a few videos can leave one rlaifv chain
    return argparse.Namespace(**{**vars(b), "steps": a.steps or b.steps, **smoke})


def jobs_of(a, b) -> list[dict]:
    d = os.path.join(a.out, "data")
    common = demo_steps.recipe_args(recipe(a, b)) + ["--init", demo_steps.best_adapter(b, "warm")]
    return [dict(name=f"{slug(row)}-s{seed}", row=row, seed=seed, objective=obj,
                 args=["--objective", obj, "--data", os.path.join(d, data), "--seed", str(seed)] + common)
            for seed in range(a.seeds) for row, obj, data in METHODS]


def run_all(a, b, jobs: list[dict]) -> None:
    def one(job):
        t = time.time()
        r = recipe(a, b)
        curve = demo_steps.train_to_plateau(a, job["name"], job["args"],
                                            val=os.path.join(b.out, "data", "val_chains.jsonl"),
                                            every=r.eval_every, max_steps=r.steps,
                                            min_gain=r.min_gain, patience=r.patience)
        evaluate(a, b, job["name"], demo_steps.best_adapter(a, job["name"]), 1)
        chosen = next(c for c in curve if c["chosen"])
        say(f"{job['name']:<14s} done, step {chosen['step']} of {curve[-1]['step']} chosen "
            f"({time.time() - t:.0f} s)")

    with ThreadPoolExecutor(a.jobs) as pool:
        for fut in as_completed([pool.submit(one, j) for j in jobs]):
            fut.result()


# ---------------------------------------------------------------------------------------------
# Report: intervals from a bootstrap over seeds and videos
# ---------------------------------------------------------------------------------------------

def overall_by_video(a, name: str) -> dict[str, float]:
    recs = load_jsonl(os.path.join(a.out, "eval", name + ".scores.jsonl"))
    return {r["id"]: float(np.mean(list(r["scores"].values()))) for r in recs if r.get("status") != "failed"}


def score_matrix(a, names: list[str], videos: list[str]) -> np.ndarray:
    """[seeds, videos] overall rules-judge score of each run's caption of each held-out video."""
    return np.array([[overall_by_video(a, n)[v] for v in videos] for n in names])


def data_cost(a, b, data: str) -> tuple[int, float, int]:
    """(training examples, LLM calls per example, model samples per example) of one data file.
    Rules chains/inject records carry no call count: one teacher call per degradation (the
    LLM backend's cost when no reply is rejected). On-policy records count their own calls,
    failed and no_preference ones included (paid for, yet no example)."""
    recs = load_jsonl(os.path.join(a.out, "data", data))
    ok = [r for r in recs if r.get("status", "ok") == "ok"]
    if data in ("chains.jsonl", "inject.jsonl"):
        calls, samples = sum(len(r["chain"]) - 1 for r in ok), 0
    else:
        calls, samples = sum(r.get("llm_calls", 0) for r in recs), a.num_samples * len(recs)
    return len(ok), calls / max(1, len(ok)), round(samples / max(1, len(ok)), 2)


def report(a, b, jobs: list[dict], wall: tuple[float, int]) -> str:
    videos = sorted(overall_by_video(a, "warm"))
    names = {row: [j["name"] for j in jobs if j["row"] == row] for row, _, _ in METHODS}
    mats = {row: score_matrix(a, names[row], videos) for row in names}
    warm = score_matrix(a, ["warm"], videos)
    r = recipe(a, b)
    lines = ["# On-policy comparison (the paper's Table 1) on the embedded world", "",
             f"Machine: {b.machine}. Wall time of `scripts/demo_onpolicy.py` for these numbers: "
             f"{wall[0] / 60:.1f} min over {wall[1]} invocation{'s' if wall[1] != 1 else ''} ({a.jobs} "
             "jobs in parallel, 1 torch thread each; the main demo's data and warm start not counted).", "",
             f"Setting: the main demo's synthetic set and SFT warm start (`{os.path.relpath(b.out, ROOT)}`); "
             f"its {len(load_jsonl(os.path.join(a.out, 'data', 'chains.jsonl')))} training videos; "
             f"{a.num_samples} samples per video from the "
             f"warm start (`eval_judge.py sample --temperature {a.temperature} --max_new_tokens "
             f"{a.max_new_tokens}`); the on-policy data by `gen_chains.py improve|compare|rlaifv --backend "
             "rules` (the scene's facts play the teacher). Every method: the main demo's recipe "
             f"from the warm start (`--init`, also the reference): lr {r.lr}, batch "
             f"{r.batch_size}, beta {r.beta}, NTP weight {r.ntp_weight} ({r.ntp_norm} over tokens), "
             f"at most {r.steps} steps, and its selection rule (next section); seeds "
             f"0..{a.seeds - 1}. Metric: the rules judge's overall score (mean of its four axes, 1-10) of "
             f"greedy captions of {len(videos)} held-out videos; 95% interval by a bootstrap over seeds "
             "and videos together.", "",
             "| training data (objective) | examples | LLM calls / example | model samples / example "
             "| rules judge overall [95% CI] |", "|---|---|---|---|---|",
             f"| warm start (SFT, no preference step) | - | - | - | {demo_steps.cell(warm, 2)} |"]
    for row, _, data in METHODS:
        n, calls, samples = data_cost(a, b, data)
        lines.append(f"| {row} | {n} | {calls:.1f} | {samples:g} | {demo_steps.cell(mats[row], 2)} |")
    runs = {}
    for j in sorted(jobs, key=lambda j: j["seed"]):
        curve = load_jsonl(os.path.join(a.out, "runs", j["name"], "curve.jsonl"))
        runs.setdefault(j["row"], (j["objective"], b.length + 1, []))[2].append(curve)
    lines += ["", "## The preference phase: trained to the validation plateau", "",
              demo_steps.selection_rule(r).replace(f"the {r.val_videos} validation chains",
                                                   f"the main demo's {r.val_videos} validation chains"),
              ""] + demo_steps.chosen_checkpoints(runs, warm_point(b))
    lines += ["", "## Verdict: do caption chains beat every on-policy pipeline?", "",
              "Each line: the paired difference chains - method (the same held-out video, the same "
              "seed index) with its 95% bootstrap interval. Reproduced: the interval lies above 0; not "
              "reproduced: below 0; inconclusive: it holds 0.", ""]
    verdicts = []
    for row, _, _ in METHODS[2:] + METHODS[:1]:
        d, lo, hi, word = demo_steps.verdict(mats[CHAINS] - mats[row])
        verdicts.append((row, lo, hi))
        lines.append(f"- chains > {row}: {word}. Difference {d:+.2f}, 95% interval [{lo:+.2f}, {hi:+.2f}].")
    on_policy = verdicts[:3]
    won, lost = sum(lo > 0 for _, lo, _ in on_policy), sum(hi < 0 for _, _, hi in on_policy)
    overall = "**reproduced**" if won == 3 else "**not reproduced**" if lost else "**inconclusive**"
    lines += ["", f"Chains beat every on-policy pipeline: {overall} (ahead of {won} of 3 with the interval "
              f"above 0, behind {lost} with it below).", "",
              "Data cost: LLM calls per training example count every teacher query a record needed (the "
              "rules backend answers the same queries an LLM would: K degradations per chain, 1 correction, "
              "2 comparisons (both orders), 1 claim extraction + 1 verification per claim per sample), "
              "divided by the examples kept; model samples are the policy's own generations it needed.", "",
              "Reading it: on this toy world the teachers and the judge are one fact matcher "
              "(synthetic.match_facts). RLAIF-V's claim check (`rules_supported`) is the judge's precision "
              "test applied per sentence, so ranking samples by supported share optimises two of the judge's "
              "four axes directly; improve's correction is the gold caption itself. With an LLM teacher and "
              "an LLM judge (README, recipe 7) they are separate models and this shortcut is gone.", ""]
    return "\n".join(lines)


def warm_point(b) -> dict:
    """The main demo's warm start at its chosen validation point."""
    return next(c for c in load_jsonl(os.path.join(b.out, "runs", "warm", "curve.jsonl")) if c["chosen"])


def plot(a, b, jobs: list[dict]) -> str:
    """plots.png: seed 0 of every method, its training and validation curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(18, 9.5))
    demo_steps.learning_curves(ax, [(j["row"], j["objective"], os.path.join(a.out, "runs", j["name"]),
                                     f"C{i}") for i, j in enumerate(j for j in jobs if j["seed"] == 0)],
                               b.length + 1, warm_point(b))
    fig.tight_layout()
    path = os.path.join(a.out, "plots.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot: {path}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_onpolicy")
    p.add_argument("--warm_from", default="runs/demo", help="a finished main demo whose warm start to reuse")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train_videos", type=int, default=300,
                   help="the first N of the main demo's training videos (all methods; sampling "
                        "--num_samples captions of each is this stage's slow part); 0: all")
    p.add_argument("--gen_videos", type=int, default=100, help="held-out videos captioned and judged")
    p.add_argument("--num_samples", type=int, default=4, help="samples per video for the on-policy data")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=72)
    p.add_argument("--steps", type=int, default=0, help="the most training steps per method (from "
                   "the warm start; validation may stop it sooner); 0: the main demo's --steps")
    p.add_argument("--readme", metavar="README.md", help="also write RESULTS.md into this file's "
                   "onpolicy section")
    p.add_argument("--smoke", action="store_true", help="a few steps on a few videos (plumbing only)")
    a = p.parse_args(argv)
    if a.smoke:
        a.train_videos, a.num_samples, a.steps, a.seeds, a.max_new_tokens, a.gen_videos = 6, 3, 4, 1, 16, 2
    a.out, a.warm_from = os.path.abspath(a.out), os.path.abspath(a.warm_from)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    demo_steps.check_settings(a)      # resuming reuses finished runs: OUT must hold these settings' runs
    b = base(a)
    demo_steps.start_wall_clock(a.out, time.time())   # the base is the main demo's: not this stage's time
    demo_steps.COMPUTED.clear()
    make_data(a, b)
    evaluate(a, b, "warm", demo_steps.best_adapter(b, "warm"), a.jobs)
    jobs = jobs_of(a, b)
    say(f"train: {len(jobs)} runs ({len(METHODS)} methods x {a.seeds} seeds), {a.jobs} at a time")
    run_all(a, b, jobs)
    text = report(a, b, jobs, demo_steps.wall_time())
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    say(plot(a, b, jobs))
    if a.readme:
        body = text.replace("\n## ", "\n#### ").replace(
            "# On-policy comparison (the paper's Table 1) on the embedded world",
            "## On-policy comparison: the paper's Table 1 (`python scripts/demo.py --onpolicy`)", 1)
        import shutil
        docs = os.path.join(os.path.dirname(os.path.abspath(a.readme)), "docs")
        os.makedirs(docs, exist_ok=True)
        shutil.copyfile(os.path.join(a.out, "plots.png"), os.path.join(docs, "demo_onpolicy_plots.png"))
        body = body.rstrip() + "\n\n![on-policy demo plots](docs/demo_onpolicy_plots.png)"
        say(demo_steps.replace_readme_section(a.readme, "onpolicy", body + "\n\n" + (
            "Written by `make demo-readme` from the `runs/demo_onpolicy/RESULTS.md` that `make "
            "demo-onpolicy` (`python scripts/demo.py --onpolicy`) printed: every number above is that "
            "run's. `--smoke` checks the plumbing in a few steps.")))
    say(f"done: {os.path.join(a.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
