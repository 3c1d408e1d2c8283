#!/usr/bin/env python
"""Which preference recipe lets the preference terms work without hurting captions?

From the demo's data and warm start (made by scripts/demo_steps.py's own steps if missing), train
`rank` (and `sft`, its caption-quality yardstick) under a small grid of recipes -- learning
rate, beta, NTP weight and normalisation -- one seed each, each to its validation plateau by
the demo's own rule (demo_steps.train_to_plateau: segments, a validation point after each, the
checkpoint with the best validation pairwise accuracy kept), and measure on the *validation*
videos only (never the demo's test set), at the chosen checkpoint and along the way:

  - rank's Plackett-Luce loss without the NTP term, against its no-information value log K!,
  - pairwise ranking accuracy of the policy's log-probs over the validation chains,
  - log p(c0) and log p(c_K) (best and worst caption), against the warm start's,
  - the rules judge's score of greedy captions of the validation videos, and a sample.

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
from demo_steps import say  # noqa: E402
from records import load_jsonl, write_json, write_jsonl  # noqa: E402

# (objective, lr, beta, ntp_weight, ntp_norm); the first is the recipe the demo used before
GRID = [("rank", 3e-4, 0.1, 0.1, "sum"),
        ("rank", 3e-4, 0.5, 0.1, "sum"),
        ("rank", 3e-4, 0.5, 1.0, "sum"),
        ("rank", 3e-4, 0.5, 3.0, "sum"),
        ("rank", 3e-4, 1.0, 3.0, "sum"),
        ("rank", 1e-4, 0.5, 1.0, "sum"),
        ("sft", 3e-4, 0.1, 0.1, "sum")]


def slug(cfg) -> str:
    obj, lr, beta, w, norm = cfg
    return f"{obj}-lr{lr:g}-b{beta:g}-ntp{w:g}{norm}"


def one(s, d: argparse.Namespace, cfg) -> dict:
    obj, lr, beta, w, norm = cfg
    name = slug(cfg)
    data, log = os.path.join(d.out, "data"), os.path.join(s.out, "logs", name + ".log")
    curve = demo_steps.train_to_plateau(
        s, name, ["--objective", obj, "--data", os.path.join(data, "chains.jsonl"),
                  "--init", demo_steps.best_adapter(d, "warm"), "--lr", str(lr), "--beta", str(beta),
                  "--ntp_weight", str(w), "--ntp_norm", norm, "--batch_size", str(d.batch_size),
                  "--lr_schedule", "constant", "--warmup_steps", str(max(1, d.eval_every // 5)),
                  "--seed", "0"],
        val=os.path.join(data, "val_chains.jsonl"), every=d.eval_every, max_steps=d.steps,
        min_gain=d.min_gain, patience=d.patience)
    judge, samples = judged(s, name, demo_steps.best_adapter(s, name), data, log)
    return {"name": name, "objective": obj, "lr": lr, "beta": beta, "ntp_weight": w,
            "ntp_norm": norm, "curve": curve, "chosen": next(r for r in curve if r["chosen"]),
            "judge": judge, "samples": samples}


def judged(s, name: str, adapter: str, data: str, log: str) -> tuple[float, list[str]]:
    """Greedy captions of the validation videos, the rules judge's mean overall score of them."""
    stem = os.path.join(s.out, "eval", name)
    val = os.path.join(data, "val.jsonl")
    demo_steps.generate_and_judge(adapter, val, val, stem, log)
    scores = load_jsonl(stem + ".scores.jsonl")
    return (float(np.mean([np.mean(list(r["scores"].values())) for r in scores])),
            [r["caption"] for r in load_jsonl(stem + ".captions.jsonl")[:2]])


def table(s, d, results: list[dict], warm: dict) -> str:
    k = d.length + 1
    none = demo_steps.no_information_loss("rank", k)
    lines = ["# Recipe sweep (scripts/sweep.py)", "",
             f"From the demo's warm start (`{os.path.relpath(demo_steps.best_adapter(d, 'warm'))}`), "
             f"batch {d.batch_size}, seed 0, constant lr; each run trained by the demo's rule "
             f"(`--val_data`: a validation point every {d.eval_every} steps, at most {d.steps}; the "
             "checkpoint with the lowest validation loss of its own objective kept; stop after "
             f"{d.patience} points without a lower one), measured on the {warm['n']} validation "
             "videos (not the demo's test set). PL loss: rank's Plackett-Luce loss on the validation "
             f"chains without the NTP term, beta x implicit reward (no-information value log {k}! = "
             f"{none:.3f}), at the chosen checkpoint and at every validation point. log p(c0) / log "
             "p(cK): mean summed log-prob of the best / worst caption of each validation chain (warm "
             f"start: {warm['logp_c0']:.2f} / {warm['logp_cK']:.2f}, pairwise "
             f"{warm['logp_acc']:.3f}, judge {warm['judge']:.2f}). Pairwise: share of ordered pairs "
             "the log-probs rank right. Judge: the rules judge's overall score (1-10) of greedy "
             "captions of the validation videos.", "",
             "| run | lr | beta | NTP weight (norm) | steps trained | chosen | PL loss | / log K! | "
             "PL loss at each point | val pairwise | log p(c0) | log p(cK) | judge 1-10 |",
             "|---" * 13 + "|"]
    for r in results:
        c, rank = r["chosen"], r["objective"] == "rank"
        pl = f"{c['pref_loss']:.3f} | {c['pref_loss'] / none:.2f}" if rank else "– | –"
        along = ", ".join(f"{x['pref_loss']:.2f}" for x in r["curve"]) if rank else "–"
        lines.append(f"| {r['name']} | {r['lr']:g} | {r['beta']:g} | {r['ntp_weight']:g} ({r['ntp_norm']}) "
                     f"| {r['curve'][-1]['step']} | {c['step']} | {pl} | {along} | {c['logp_acc']:.3f} | "
                     f"{c['logp_c0']:.2f} | {c['logp_cK']:.2f} | {r['judge']:.2f} |")
    lines += ["", "Sample captions (first validation video, chosen checkpoint):", ""]
    lines += [f"- {r['name']}: \"{r['samples'][0]}\"" for r in results]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_out", default="runs/demo", help="the demo's folder: data and warm start")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the demo's smoke settings, 2 grid points")
    s = p.parse_args(argv)
    d = demo_steps.parse_args(["--out", s.demo_out] + (["--smoke"] if s.smoke else []))
    grid = GRID[:1] + GRID[-1:] if s.smoke else GRID
    s.out = os.path.abspath(s.out)
    os.makedirs(os.path.join(s.out, "eval"), exist_ok=True)
    demo_steps.make_data(d)
    os.makedirs(os.path.join(d.out, "eval"), exist_ok=True)
    curve = demo_steps.warm_start(d)
    data = os.path.join(d.out, "data")
    val_ids = {c["id"] for c in load_jsonl(os.path.join(data, "val_chains.jsonl"))}
    write_jsonl(os.path.join(data, "val.jsonl"),
                [r for r in load_jsonl(os.path.join(data, "train.jsonl")) if r["id"] in val_ids])
    judge, _ = judged(s, "warm", demo_steps.best_adapter(d, "warm"), data, os.path.join(s.out, "logs", "warm.log"))
    warm = {**next(r for r in curve if r["chosen"]), "n": len(val_ids), "judge": judge}
    with ThreadPoolExecutor(s.jobs) as pool:            # results in grid order, whatever finishes first
        results = list(pool.map(lambda cfg: one(s, d, cfg), grid))
    for r in results:
        say(f"{r['name']}: step {r['chosen']['step']} chosen, val preference loss "
            f"{r['chosen']['pref_loss']:.3f}, pairwise {r['chosen']['logp_acc']:.3f}, judge {r['judge']:.2f}")
    text = table(s, d, results, warm)
    with open(os.path.join(s.out, "SWEEP.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(s.out, "sweep.json"), {"warm": warm, "runs": results}, indent=1)
    print("\n" + text)


if __name__ == "__main__":
    main()
