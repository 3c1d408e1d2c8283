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
import torch  # noqa: E402

from eval_judge import bootstrap_ci  # noqa: E402
from kernels.reference import dpo_loss, mpo_loss, rank_loss  # noqa: E402
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
    can round differently from run to run; with it, a run is bit-for-bit repeatable.
    OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so a 2-thread job on
    a machine busy with other work does not stall on its own spinning threads (same numbers)."""
    COMPUTED.set()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE", MKL_CBWR="AUTO,STRICT", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
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
    """The preference step's recipe (chosen by scripts/sweep.py; see RESULTS.md). The lr is
    constant after a short warm-up, so training in segments (train_to_plateau) is one run."""
    return ["--batch_size", str(a.batch_size), "--lr_schedule", "constant",
            "--warmup_steps", str(max(1, a.eval_every // 5)), "--beta", str(a.beta),
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


def rank_eval(a, adapter: str, data: str, stem: str, log: str, threads: int = 1) -> None:
    """eval_judge.py rank: per-chain scores to STEM.chains.jsonl, summary to STEM.rank.json."""
    if not os.path.exists(stem + ".rank.json"):
        run([PY, "eval_judge.py", "rank", "--adapter", adapter, "--data", data,
             "--out", stem + ".chains.jsonl", "--results", stem + ".rank.json"], log, threads)


def generate_and_judge(adapter: str, data: str, ref: str, stem: str, log: str, threads: int = 1,
                       device: str | None = None) -> None:
    """eval_judge.py generate (greedy captions of `data`'s videos) to STEM.captions.jsonl, then
    judge --judge rules against `ref` to STEM.scores.jsonl; done when its results JSON exists."""
    caps, scores = stem + ".captions.jsonl", stem + ".scores.jsonl"
    if os.path.exists(scores + ".results.json"):
        return
    run([PY, "eval_judge.py", "generate", "--adapter", adapter, "--data", data, "--out", caps]
        + (["--device", device] if device else []), log, threads)
    run([PY, "eval_judge.py", "judge", "--judge", "rules", "--pred", caps, "--ref", ref,
         "--out", scores, "--results", scores + ".results.json"], log, threads)


# ---------------------------------------------------------------------------------------------
# Training to the validation plateau: the warm start and every method, by one rule
# ---------------------------------------------------------------------------------------------

def no_information_loss(objective: str, k: int) -> float | None:
    """The preference loss when every caption of a K-chain scores the same (the model knows
    nothing): log K! for rank, log 2 for dpo, log K for mpo. hinge is 0 there (it is a margin,
    not a likelihood) and sft has no preference term: None."""
    loss = {"rank": rank_loss, "dpo": dpo_loss, "mpo": mpo_loss}.get(objective)
    if loss is None:
        return None
    zeros, mask = torch.zeros(1, k, dtype=torch.float64), torch.ones(1, k, dtype=torch.bool)
    return float(loss(zeros, mask)[0])


def train_to_plateau(a, name: str, args: list[str], *, val: str, every: int, max_steps: int,
                     min_gain: float, patience: int, threads: int = 1) -> list[dict]:
    """One rank_dpo.py run (OUT/runs/NAME) that scores the validation chains `val` every
    `every` steps (--val_data), keeps the adapter of the point with the lowest validation loss
    of its own objective (--select_by loss: the preference term without the NTP anchor; sft:
    its NLL) in OUT/runs/NAME/best, and stops after `patience` points without one lower by more
    than `min_gain` (relative), or at `max_steps`. Returns the validation curve (the trainer's
    OUT/validation.jsonl, with each segment's mean training numbers and the chosen point
    marked; also written to OUT/runs/NAME/curve.jsonl). Resumable: an interrupted run
    continues from its checkpoint."""
    out = os.path.join(a.out, "runs", name)
    if not os.path.exists(os.path.join(out, ".done")):
        run([PY, "rank_dpo.py", "--model", "tiny", "--output_dir", out, "--resume",
             "--max_steps", str(max_steps), "--val_data", val, "--val_every", str(every),
             "--select_by", "loss", "--min_gain", str(min_gain), "--patience", str(patience),
             "--save_every", str(every), "--keep_checkpoints", "1", "--log_every", "1"] + args,
            os.path.join(a.out, "logs", name + ".log"), threads)
        open(os.path.join(out, ".done"), "w").close()
    metrics, curve = load_jsonl(os.path.join(out, "metrics.jsonl")), load_jsonl(os.path.join(out, "validation.jsonl"))
    chosen = [r["step"] for r in curve if r["best"]][-1]
    for r, start in zip(curve, [0] + [r["step"] for r in curve]):
        seg = [m for m in metrics if start < m["step"] <= r["step"]]
        r.update(chosen=r["step"] == chosen, **{f"train_{k}": float(np.mean([m[k] for m in seg]))
                                                 for k in ("loss", "pref_loss", "ntp")})
    write_jsonl(os.path.join(out, "curve.jsonl"), curve)     # what the reports and plots read
    return curve


def best_adapter(a, name: str) -> str:
    """The adapter a run's validation chose (OUT/runs/NAME/best)."""
    return os.path.join(a.out, "runs", name, "best")


def warm_start(a) -> list[dict]:
    """SFT on c0, the vision tower trained in full, until the validation caption loss stops
    improving (by --warm_min_gain, relative) or --warm_max_steps; the best segment is the warm
    start (OUT/runs/warm/best) every method starts from and is compared to."""
    d = os.path.join(a.out, "data")
    args = ["--objective", "sft", "--data", os.path.join(d, "chains.jsonl"), "--lr", str(a.warm_lr),
            "--lr_schedule", "constant", "--warmup_steps", str(a.warm_eval_every // 5),
            "--batch_size", str(a.warm_batch_size), "--seed", "0", "--vision", a.warm_vision]
    say(f"warm start: sft (vision {a.warm_vision}) until the validation caption loss stops improving "
        "(logs/warm.log)")
    curve = train_to_plateau(a, "warm", args, val=os.path.join(d, "val_chains.jsonl"),
                             every=a.warm_eval_every, max_steps=a.warm_max_steps,
                             min_gain=a.warm_min_gain, patience=a.patience, threads=a.jobs)
    for r in curve:
        say(f"warm start step {r['step']}: validation caption NLL {r['nll']:.2f} nats, "
            f"pairwise acc {r['logp_acc']:.3f}{'  <- chosen' if r['chosen'] else ''}")
    return curve


def selection_rule(a) -> str:
    return (f"The rule, the same for every method and seed (`rank_dpo.py --val_data`): every "
            f"{a.eval_every} steps (at most {a.steps}), the trainer scores the {a.val_videos} "
            "validation chains (never the test set); the checkpoint kept is the one with the "
            "**lowest validation loss of the method's own objective** (the preference term alone, "
            "without the NTP anchor; sft: its NLL per token), and training stops after "
            f"{a.patience} validation points without one lower by more than {a.min_gain:g} "
            "(relative). Every held-out number is that checkpoint's.")


def chosen_checkpoints(runs: dict[str, tuple[str, int, list[list[dict]]]], warm: dict) -> list[str]:
    """A table of what validation said at each row's chosen checkpoints (mean over seeds), rows
    given as {label: (objective, chain length K, one train_to_plateau curve per seed)}."""
    lines = ["At the chosen checkpoints (mean over seeds): the validation preference loss without "
             "the NTP term, its no-information value (log K! for rank, log 2 for dpo, log K for "
             "mpo: every caption scored alike; hinge has none) and their ratio; the NTP side as "
             "-log p(c0) (nats per caption); the margin (beta x mean implicit-reward gap between "
             "neighbours; the log-prob gap for hinge and sft); pairwise accuracy; log p(c0) and "
             "log p(cK) of the validation chains. Curves: plots.png.", "",
             "| method | chosen step (per seed) | val preference loss | no-information | ratio "
             "| -log p(c0) | margin | val pairwise | log p(c0) | log p(cK) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| warm start | {warm['step']} | – | – | – | {warm['nll']:.2f} | "
             f"{warm['margin']:.2f} | {warm['logp_acc']:.3f} | {warm['logp_c0']:.2f} | "
             f"{warm['logp_cK']:.2f} |"]
    for row, (objective, k, seeds) in runs.items():
        chosen = [next(r for r in c if r["chosen"]) for c in seeds]
        mean = lambda key: float(np.mean([r[key] for r in chosen]))
        none = no_information_loss(objective, k)
        pref = "–" if objective == "sft" else f"{mean('pref_loss'):.3f}"
        ratio = f"{mean('pref_loss') / none:.2f}" if none else "–"
        lines.append(f"| {row} | {', '.join(str(r['step']) for r in chosen)} | {pref} | "
                     f"{f'{none:.3f}' if none else '–'} | {ratio} | {mean('nll'):.2f} | "
                     f"{mean('margin'):.2f} | {mean('logp_acc'):.3f} | "
                     f"{mean('logp_c0'):.2f} | {mean('logp_cK'):.2f} |")
    return lines


def learning_curves(ax, runs: list[tuple[str, str, str, str]], k: int, warm: dict) -> None:
    """Six panels (ax: 2 x 3) of runs trained by train_to_plateau, one line per run (label,
    objective, run folder, colour): training (10-step mean) and validation preference loss
    without the NTP term against its no-information value (dashed), the training NTP term,
    validation log p(c0) / log p(cK), margin and pairwise accuracy; black: the warm start's."""
    smooth = lambda xs: np.convolve(xs, np.ones(10) / 10, mode="valid") if len(xs) >= 10 else np.array(xs)
    for label, objective, run_dir, c in runs:
        m, v = load_jsonl(os.path.join(run_dir, "metrics.jsonl")), load_jsonl(os.path.join(run_dir, "curve.jsonl"))
        steps, vsteps = [r["step"] for r in m], [r["step"] for r in v]
        tail = steps[len(steps) - len(smooth(steps)):]
        if objective != "sft":
            ax[0, 0].plot(tail, smooth([r["pref_loss"] for r in m]), color=c, lw=1, label=label)
            ax[0, 1].plot(vsteps, [r["pref_loss"] for r in v], color=c, marker="o", label=label)
            none = no_information_loss(objective, k)
            for axis in (ax[0, 0], ax[0, 1]):
                if none:
                    axis.axhline(none, color=c, ls="--", lw=0.8)
        ax[0, 2].plot(tail, smooth([r["ntp"] for r in m]), color=c, lw=1, label=label)
        ax[1, 0].plot(vsteps, [r["logp_c0"] for r in v], color=c, marker="o", label=label)
        ax[1, 0].plot(vsteps, [r["logp_cK"] for r in v], color=c, marker="x", ls=":")
        ax[1, 1].plot(vsteps, [r["margin"] for r in v], color=c, marker="o", label=label)
        ax[1, 2].plot(vsteps, [r["logp_acc"] for r in v], color=c, marker="o", label=label)
        chosen = next(r for r in v if r["chosen"])
        ax[1, 2].plot([chosen["step"]], [chosen["logp_acc"]], marker="*", ms=14, color=c)
    ax[0, 0].set(xlabel="step", ylabel="preference loss (no NTP), 10-step mean",
                 title="training preference loss (dashed: no-information value)", yscale="log")
    ax[0, 1].set(xlabel="step", ylabel="preference loss (no NTP)",
                 title="validation preference loss (dashed: no-information value)", yscale="log")
    ax[0, 2].set(xlabel="step", ylabel="NLL of c0 per token, 10-step mean",
                 title="training NTP term (unweighted)")
    ax[1, 0].axhline(warm["logp_c0"], color="k", ls="--", lw=0.8)
    ax[1, 0].axhline(warm["logp_cK"], color="k", ls=":", lw=0.8)
    ax[1, 0].set(xlabel="step", ylabel="summed log-prob (nats)",
                 title="validation log p(c0) (o) and log p(cK) (x); black: warm start")
    ax[1, 1].set(xlabel="step", ylabel="mean score gap c_i - c_i+1",
                 title="validation margin (implicit reward; log-prob for sft, hinge)", yscale="symlog")
    ax[1, 2].axhline(warm["logp_acc"], color="k", ls="--", lw=0.8)
    ax[1, 2].set(xlabel="step", ylabel="pairwise accuracy (log-prob)",
                 title="validation pairwise accuracy (star: chosen; black: warm start)")
    ax[0, 2].legend(fontsize=7)


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
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--videos", type=int, default=1400, help="synthetic videos (train + test)")
    p.add_argument("--test_frac", type=float, default=0.25)
    p.add_argument("--val_videos", type=int, default=50, help="training videos kept for validation")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--length", type=int, default=4, help="degradation steps: chains of length+1")
    p.add_argument("--chain_lengths", default="", help="--max_chain values besides 2 (= dpo) "
                   "and the full chain (= rank), e.g. 3,4 (3 runs each; off by default to keep "
                   "the demo inside 20 minutes on 2 cores)")
    p.add_argument("--warm_lr", type=float, default=1e-3)
    p.add_argument("--warm_batch_size", type=int, default=8)
    p.add_argument("--warm_vision", choices=("lora", "full"), default="full",
                   help="the warm start trains the vision tower in full: a randomly initialised "
                        "tower learns to see through LoRA far too slowly (docs/demo_sweep.md)")
    p.add_argument("--warm_eval_every", type=int, default=100)
    p.add_argument("--warm_max_steps", type=int, default=800)
    p.add_argument("--warm_min_gain", type=float, default=0.02,
                   help="a warm-start segment improves when it lowers the validation caption loss "
                        "by more than this (relative)")
    p.add_argument("--steps", type=int, default=150,
                   help="the most preference steps any method trains (validation may stop it sooner)")
    p.add_argument("--eval_every", type=int, default=25,
                   help="preference steps between validation points (the checkpoint candidates)")
    p.add_argument("--min_gain", type=float, default=0.01,
                   help="a validation point improves when it lowers the run's validation loss "
                        "by more than this (relative)")
    p.add_argument("--patience", type=int, default=2,
                   help="stop after this many segments without improvement (warm start and methods)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--ntp_weight", type=float, default=1.0)
    p.add_argument("--ntp_norm", choices=("mean", "sum"), default="sum",
                   help="sum: the NTP term on the scale of the summed log-probs the preference terms "
                        "use (docs/demo_sweep.md: with the per-token mean it is 1-2%% of the loss "
                        "and does not stop log p(c0) from falling)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--gen_videos", type=int, default=40, help="held-out videos captioned and judged")
    p.add_argument("--bench_scenes", type=int, default=10, help="new scenes rendered as VidHal and "
                   "TempCompass sets (gen_chains.py benchmarks) and scored per run; 0: none")
    p.add_argument("--full", action="store_true", help="the longer study: 3 seeds, at most 200 "
                   "preference steps, 20 benchmark scenes (about 31 minutes on 2 cores; "
                   "docs/demo_full.md)")
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
    if a.full:
        a.seeds, a.steps, a.bench_scenes = 3, 200, 20
    if a.smoke:
        a.videos, a.test_frac, a.val_videos, a.seeds, a.steps, a.eval_every = 28, 0.3, 4, 1, 4, 2
        a.warm_eval_every, a.warm_max_steps = 2, 4
        a.batch_size, a.warm_batch_size, a.chain_lengths, a.gen_videos, a.bench_scenes = 2, 2, [], 2, 1
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


RUN_INDEPENDENT = ("out", "jobs", "heartbeat", "machine", "readme", "full")  # full: stored as what it sets


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
