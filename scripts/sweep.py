#!/usr/bin/env python
"""Why do the preference objectives hurt captions, and which recipe does not?

From the demo's data and warm start (made by scripts/demo_steps.py's own steps if missing), train
`rank` (and `sft`, its caption-quality yardstick) under a small grid of recipes -- learning
rate, beta, NTP weight, NTP normalisation (mean over tokens, as the kernels do, or summed) --
one seed each, and measure on the *validation* videos (never the demo's test set):

  - pairwise ranking accuracy of the policy's log-probs over the validation chains,
  - log p(c0) and log p(c_K) (best and worst caption) at steps 0, the middle and the end,
  - the rules judge's score of greedy captions of the validation videos, and samples of them,
  - the NTP term's share of the training loss (ntp_weight * NTP / loss, from metrics.jsonl).

Writes OUT/SWEEP.md (the table the demo's defaults are chosen from) and OUT/sweep.json.
Resumable like the demo (finished runs and evaluations are kept).

    python scripts/sweep.py --demo_out runs/demo --out runs/sweep
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_steps  # noqa: E402
from demo_steps import PY, run, say  # noqa: E402
from eval_judge import chain_metrics  # noqa: E402
from records import load_jsonl, write_json, write_jsonl  # noqa: E402

# (objective, lr, beta, ntp_weight, ntp_norm); the first is the recipe the demo used before
GRID = [("rank", 1e-3, 0.1, 0.1, "mean"),
        ("rank", 3e-4, 0.1, 0.1, "mean"),
        ("rank", 1e-4, 0.1, 0.1, "mean"),
        ("rank", 3e-4, 0.1, 1.0, "mean"),
        ("rank", 3e-4, 0.1, 0.1, "sum"),
        ("rank", 3e-4, 0.5, 0.1, "mean"),
        ("sft", 1e-3, 0.1, 0.1, "mean"),
        ("sft", 3e-4, 0.1, 0.1, "mean"),
        ("sft", 1e-4, 0.1, 0.1, "mean")]


def slug(cfg) -> str:
    obj, lr, beta, w, norm = cfg
    return f"{obj}-lr{lr:g}-b{beta:g}-ntp{w:g}{norm}"


def one(s, d: demo_steps.argparse.Namespace, cfg) -> dict:
    obj, lr, beta, w, norm = cfg
    name = slug(cfg)
    run_dir, log = os.path.join(s.out, "runs", name), os.path.join(s.out, "logs", name + ".log")
    data = os.path.join(d.out, "data")
    if not os.path.exists(os.path.join(run_dir, ".done")):
        run([PY, "rank_dpo.py", "--model", "tiny", "--output_dir", run_dir, "--resume",
             "--objective", obj, "--data", os.path.join(data, "chains.jsonl"),
             "--init", os.path.join(d.out, "runs", "warm"), "--lr", str(lr), "--beta", str(beta),
             "--ntp_weight", str(w), "--ntp_norm", norm, "--batch_size", str(d.batch_size),
             "--max_steps", str(s.steps), "--warmup_steps", str(max(1, s.steps // 10)),
             "--seed", "0", "--save_every", str(s.steps // 2), "--keep_checkpoints", "2",
             "--log_every", "1"], log)
        open(os.path.join(run_dir, ".done"), "w").close()
    trace = []
    for step in (s.steps // 2, s.steps):
        adapter = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
        stem = os.path.join(s.out, "eval", f"{name}-{step:05d}")
        demo_steps.rank_eval(d, adapter, os.path.join(data, "val_chains.jsonl"), stem, log)
        trace.append({"step": step, **logp_ends(stem)})
    caps, scores = (os.path.join(s.out, "eval", name + ".captions.jsonl"),
                    os.path.join(s.out, "eval", name + ".scores.jsonl"))
    if not os.path.exists(scores + ".results.json"):
        run([PY, "eval_judge.py", "generate", "--adapter", run_dir, "--data",
             os.path.join(data, "val.jsonl"), "--out", caps], log)
        run([PY, "eval_judge.py", "judge", "--judge", "rules", "--pred", caps, "--ref",
             os.path.join(data, "val.jsonl"), "--out", scores, "--results", scores + ".results.json"],
            log)
    metrics = load_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    last = metrics[-10:]
    share = float(np.mean([w * r["ntp"] / r["loss"] for r in last])) if obj != "sft" else 1.0
    judged = load_jsonl(scores)
    return {"name": name, "objective": obj, "lr": lr, "beta": beta, "ntp_weight": w,
            "ntp_norm": norm, "trace": trace, "pairwise": trace[-1]["pairwise"],
            "judge": float(np.mean([np.mean(list(r["scores"].values())) for r in judged])),
            "ntp_loss_share": share if norm == "mean" else float("nan"),
            "samples": [r["caption"] for r in load_jsonl(caps)[:2]]}


def logp_ends(stem: str) -> dict:
    rows = load_jsonl(stem + ".chains.jsonl")
    return {"logp_c0": float(np.mean([r["log-prob"][0] for r in rows])),
            "logp_cK": float(np.mean([r["log-prob"][-1] for r in rows])),
            "pairwise": float(np.mean([chain_metrics(r["log-prob"])["pairwise"] for r in rows]))}


def table(s, d, results: list[dict], warm: dict) -> str:
    lines = ["# Recipe sweep (scripts/sweep.py)", "",
             f"From the demo's warm start (`{d.out}/runs/warm`), {s.steps} steps, batch "
             f"{d.batch_size}, seed 0; measured on the {warm['n']} validation videos (not the "
             "demo's test set). log p(c0) / log p(cK): mean summed log-prob of the best / worst "
             "caption of each validation chain (warm start: "
             f"{warm['logp_c0']:.1f} / {warm['logp_cK']:.1f}, pairwise {warm['pairwise']:.3f}, "
             f"judge {warm['judge']:.2f}). NTP share: ntp_weight x NTP / loss over the last 10 "
             "steps (mean-normalised NTP only).", "",
             "| run | objective | lr | beta | NTP weight | NTP norm | val pairwise | "
             f"log p(c0) @{s.steps // 2} | @{s.steps} | log p(cK) @{s.steps // 2} | @{s.steps} | "
             "judge 1-10 | NTP share of loss |", "|---" * 13 + "|"]
    for r in results:
        t0, t1 = r["trace"]
        lines.append(f"| {r['name']} | {r['objective']} | {r['lr']:g} | {r['beta']:g} | "
                     f"{r['ntp_weight']:g} | {r['ntp_norm']} | {r['pairwise']:.3f} | "
                     f"{t0['logp_c0']:.1f} | {t1['logp_c0']:.1f} | {t0['logp_cK']:.1f} | "
                     f"{t1['logp_cK']:.1f} | {r['judge']:.2f} | {r['ntp_loss_share']:.2f} |")
    lines += ["", "Sample captions (first validation video):", ""]
    lines += [f"- {r['name']}: \"{r['samples'][0]}\"" for r in results]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_out", default="runs/demo", help="the demo's folder: data and warm start")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the demo's smoke settings, 2 grid points")
    s = p.parse_args(argv)
    d = demo_steps.parse_args(["--out", s.demo_out] + (["--smoke"] if s.smoke else []))
    grid = GRID[:1] + GRID[-1:] if s.smoke else GRID
    if s.smoke:
        s.steps = 2
    s.out = os.path.abspath(s.out)
    os.makedirs(os.path.join(s.out, "eval"), exist_ok=True)
    demo_steps.make_data(d)
    demo_steps.warm_start(d)
    data = os.path.join(d.out, "data")
    val_ids = {c["id"] for c in load_jsonl(os.path.join(data, "val_chains.jsonl"))}
    write_jsonl(os.path.join(data, "val.jsonl"),
                     [r for r in load_jsonl(os.path.join(data, "train.jsonl")) if r["id"] in val_ids])
    warm_stem = os.path.join(s.out, "eval", "warm")
    log = os.path.join(s.out, "logs", "warm.log")
    demo_steps.rank_eval(d, os.path.join(d.out, "runs", "warm"), os.path.join(data, "val_chains.jsonl"),
                   warm_stem, log)
    if not os.path.exists(warm_stem + ".scores.jsonl.results.json"):
        run([PY, "eval_judge.py", "generate", "--adapter", os.path.join(d.out, "runs", "warm"),
             "--data", os.path.join(data, "val.jsonl"), "--out", warm_stem + ".captions.jsonl"], log)
        run([PY, "eval_judge.py", "judge", "--judge", "rules", "--pred", warm_stem + ".captions.jsonl",
             "--ref", os.path.join(data, "val.jsonl"), "--out", warm_stem + ".scores.jsonl",
             "--results", warm_stem + ".scores.jsonl.results.json"], log)
    warm = {**logp_ends(warm_stem), "n": len(val_ids),
            "judge": float(np.mean([np.mean(list(r["scores"].values()))
                                    for r in load_jsonl(warm_stem + ".scores.jsonl")]))}
    with ThreadPoolExecutor(s.jobs) as pool:            # results in grid order, whatever finishes first
        results = list(pool.map(lambda cfg: one(s, d, cfg), grid))
    for r in results:
        say(f"{r['name']}: val pairwise {r['pairwise']:.3f}, judge {r['judge']:.2f}")
    text = table(s, d, results, warm)
    with open(os.path.join(s.out, "SWEEP.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(s.out, "sweep.json"), {"warm": warm, "runs": results}, indent=1)
    print("\n" + text)


if __name__ == "__main__":
    main()
