#!/usr/bin/env python3
"""eval_judge.py: evaluation for caption-chain ranking.

Subcommands (each writes a results JSON and prints a markdown table):

    generate  batched greedy decoding of a detailed caption per video        -> {"id", "caption"}
    sample    N sampled responses per video / question (on-policy data)     -> {"id", "answers"}
    judge     reference-based judge on four axes, 1-10 each (an LLM, or the offline `rules`
              judge of synthetic.py that checks a caption against a synthetic video's facts)
    agree     Spearman (and Kendall) correlation per axis between two judges' score files
    compare   head-to-head win/tie/loss of two caption files, judged in both orders
    mcq       multiple-choice accuracy: the answer whose letter has the highest log-probability
    rank      held-out chains: pairwise accuracy, Kendall tau and top-1 of the model's
              sequence log-probs (and of the implicit reward against the base model)
    reward    LLaVA-Hound-style LM reward: an LLM scores QA answers with the caption as evidence

The paper's benchmarks, read from the folders their authors publish (benchmarks.py holds the
formats and the metrics):

    tempcompass  multi-choice, yes/no and caption matching: accuracy per temporal dimension, the
                 answer by option log-probability or by generation + the official matching rules
    vidhal       caption ordering (VidHal's NDCG) and MCQA from the model's log-probs
    vdc          `caption`: a caption per dimension (the benchmark's prompts); `score`: VDCscore,
                 each question answered from the caption and graded by a judge (accuracy, 0-5)
    argus        `caption`, then `score`: ArgusCost-H / ArgusCost-O from a judge's line-by-line
                 entailment, aligned with ARGUS's order penalty

The statistics (average ranks, Spearman, Kendall tau-b, bootstrap intervals, ranking metrics)
are a few lines of numpy each, below, so the numbers in a results file can be checked by hand.
HTTP goes through gen_chains.ChatClient (the project's one client); models load through
rank_dpo.load_model (the project's one loader), imported only by the subcommands that need a model.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

import benchmarks
from gen_chains import (DEFAULT_PROMPT, Asked, ChatClient, Frames, add_client_args, add_frame_args,
                        ask_both_orders, ask_until_parsed, format_mcq, json_schema,
                        parse_json_object, score_answer, text_only)
from records import (DataError, OutputLocked, RecordFailed, ResumableJsonl, collect_outputs,
                     map_resumable, read_records, read_run_meta, records_by_id,
                     write_json, write_jsonl)

if TYPE_CHECKING:                  # the trainer (and torch) load only with a model-side command
    from rank_dpo import VideoSampling

AXES = ("relevance", "descriptiveness", "temporal_consistency", "fluency")
SCORE_MIN, SCORE_MAX = 1, 10


# ----------------------------------------------------------------------------------------------
# Statistics (numpy only: scipy is not a dependency)
# ----------------------------------------------------------------------------------------------

def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span ([10, 20, 20] -> [1, 2.5, 2.5])."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # mean of positions i..j, 1-based
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho = Pearson correlation of the average ranks (the tie-correct form).

    NaN when undefined: fewer than two pairs, or either side constant.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b = (C - D) / sqrt((P - Tx) (P - Ty)).

    C / D count concordant / discordant pairs, P = n(n-1)/2 all pairs, Tx / Ty the pairs tied in
    x / y. O(n^2) memory via a sign matrix: fine for chains and for a few thousand judged captions.
    NaN when undefined (fewer than two items, or either side constant).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau_b: lengths differ ({len(x)} vs {len(y)})")
    n = len(x)
    if n < 2:
        return math.nan
    iu = np.triu_indices(n, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    pairs = n * (n - 1) / 2
    untied_x, untied_y = pairs - np.sum(sx == 0), pairs - np.sum(sy == 0)
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float(np.sum(sx * sy)) / math.sqrt(untied_x * untied_y)  # sx*sy = +1 C, -1 D, 0 tie


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean (resample items with replacement; fixed seed).

    `values` 1-D: items. 2-D [runs, items] (seeds x held-out chains): runs and items are both
    resampled, so the interval covers training noise and test-set sampling together."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    if v.ndim == 1:
        means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    else:  # [runs, items]: resample both, one item draw for all runs (a paired A - B stays paired)
        runs = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
        items = rng.integers(0, v.shape[1], size=(n_boot, v.shape[1]))
        means = np.array([v[r][:, c].mean() for r, c in zip(runs, items)])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], **kw) -> dict:
    """{"mean", "ci95": [lo, hi], "n"} for a results file."""
    v = [float(a) for a in values]
    lo, hi = bootstrap_ci(v, **kw)
    return {"mean": float(np.mean(v)) if v else math.nan, "ci95": [lo, hi], "n": len(v)}


def chain_metrics(scores: Sequence[float]) -> dict:
    """How well `scores` order one chain whose true order is best first (index 0 = best).

    pairwise: fraction of pairs i < j with scores[i] > scores[j];
    kendall:  tau-b between the true order and the scores;
    top1:     1 if scores[0] is the unique maximum.
    A tie counts as a coin flip (half a pair; 1/m of a top-1 shared by m), so a scorer gains
    nothing from being unable to tell captions apart.
    """
    s = np.asarray(scores, dtype=np.float64)
    k = len(s)
    if k < 2:
        raise ValueError("a chain needs at least two entries to be ranked")
    iu = np.triu_indices(k, k=1)
    diff = np.sign(s[:, None] - s[None, :])[iu]  # +1 where the earlier (better) one scores higher
    pairwise = float(np.mean((diff + 1) / 2))
    top = np.flatnonzero(s == s.max())
    top1 = 1.0 / len(top) if 0 in top else 0.0
    true_quality = -np.arange(k, dtype=np.float64)  # best first -> highest quality first
    return {"pairwise": pairwise, "kendall": kendall_tau_b(true_quality, s), "top1": top1}


# ----------------------------------------------------------------------------------------------
# Reading a judge's reply: JSON first, then "Relevance: 8/10"-style patterns
# ----------------------------------------------------------------------------------------------

# A judge may write "Temporal Consistency", "temporal-consistency", "Temporal" or "descriptive":
# an axis is recognised by the start of its normalised name.
_AXIS_PREFIX = {"relev": "relevance", "descri": "descriptiveness", "tempor": "temporal_consistency",
                "fluen": "fluency"}
_NUMBER = r"(\d+(?:\.\d+)?)"
_SCALE = r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?"
# label, a gap of punctuation / markdown / "(1-10)" / "score is", then the number.
# The gap holds no other words, so "the description is vague. Relevance: 8" gives no
# descriptiveness score; a number followed by "-9" or "to 10" is a range, not a score.
_AXIS_PATTERN = re.compile(
    r"\b(relevan\w*|descriptiv\w*|temporal(?:[\s_-]*(?:consistency|coherence|order))?|fluen\w*)"
    r"(?:[\s*_:=|\"'`\-–]|\([^)\n]*\)|score|rating|is)*?"
    + _NUMBER + r"(?!\d|\.\d|\s*(?:-|–|to)\s*\d)" + _SCALE,
    re.IGNORECASE)


def _axis_of(key: str) -> str | None:
    norm = re.sub(r"[^a-z]", "", key.lower())
    return next((axis for prefix, axis in _AXIS_PREFIX.items() if norm.startswith(prefix)), None)


def _to_score(value) -> float | None:
    """8 / 8.5 / "8" / "8/10" / "4 out of 5" / {"score": 8} -> a number on the 1-10 scale, or None."""
    if isinstance(value, dict):
        inner = [v for k, v in value.items() if k.lower() in ("score", "rating", "value")]
        return _to_score(inner[0]) if inner else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*" + _NUMBER + _SCALE + r"\s*\.?\s*", value, re.IGNORECASE)
        if m:
            return _rescale(m.group(1), m.group(2))
    return None


def _rescale(number: str, scale: str | None) -> float:
    """"8" -> 8; "8/10" -> 8; "4/5" -> 8 (a judge that switched scales still means the same)."""
    x = float(number)
    return x * 10 / float(scale) if scale and float(scale) > 0 else x


def parse_axis_scores(text: str) -> tuple[dict[str, float], list[str]]:
    """Scores on the four axes out of a judge's reply, and the problems that stop it being usable.

    Order of trust: the JSON object we asked for (also when wrapped in prose or code fences, and
    one level of nesting such as {"scores": {...}}); axes it lacks are looked for as
    "Relevance: 8/10" patterns in the text (the last mention wins: judges summarise at the end).
    A score outside 1-10 is a problem, not clamped: a reply on some other scale must not pass
    as a confident 10. The scores are usable only when the problem list is empty.
    """
    from_json: dict[str, float] = {}
    obj = parse_json_object(text or "")
    if isinstance(obj, dict):
        items = list(obj.items())
        for v in obj.values():
            if isinstance(v, dict) and _to_score(v) is None:
                items += list(v.items())  # one level of nesting: {"scores": {"relevance": 8, ...}}
        for key, value in items:
            axis, score = _axis_of(str(key)), _to_score(value)
            if axis and score is not None:
                from_json.setdefault(axis, score)
    from_text = {_axis_of(m.group(1)): _rescale(m.group(2), m.group(3))
                 for m in _AXIS_PATTERN.finditer(text or "")}  # later mentions overwrite earlier
    found = {**from_text, **from_json}
    scores = {a: found[a] for a in AXES if a in found}
    problems = [f"no score for {a}" for a in AXES if a not in scores]
    problems += [f"{a}={s:g} is outside {SCORE_MIN}-{SCORE_MAX}" for a, s in scores.items()
                 if not SCORE_MIN <= s <= SCORE_MAX]
    return scores, problems


def parse_verdict(text: str) -> tuple[str | None, list[str]]:
    """A head-to-head verdict, "1", "2" or "tie", out of a judge's reply (JSON first, then prose)."""
    def norm(v) -> str | None:
        v = str(v).strip().lower()
        if re.fullmatch(r"(caption\s*)?1|first|a", v):
            return "1"
        if re.fullmatch(r"(caption\s*)?2|second|b", v):
            return "2"
        if re.fullmatch(r"tie|draw|equal|equally good|same|both|neither|0", v):
            return "tie"
        return None

    obj = parse_json_object(text or "")
    if isinstance(obj, dict):
        for key in ("better", "winner", "preferred", "choice", "verdict"):
            if key in obj and norm(obj[key]) is not None:
                return norm(obj[key]), []
    mentions = re.findall(r"caption\s*([12])\s+is\s+(?:the\s+)?better|better[^\d\n]{0,20}?\b([12])\b"
                          r"|\b(tie|equally good)\b", text or "", re.IGNORECASE)
    if mentions:
        one, two, tie = mentions[-1]  # the conclusion comes last
        return (one or two or "tie"), []
    return None, ['no verdict ("1", "2" or "tie")']


# ----------------------------------------------------------------------------------------------
# The LLM judge: prompts and the ask / re-ask loop
# ----------------------------------------------------------------------------------------------

JUDGE_SYSTEM = ("You are a strict, consistent evaluator of video captions. You cannot see the video; "
                "the reference caption, written by someone who watched it, is the ground truth.")

AXIS_GUIDE = "\n".join([
    "- relevance: does it describe what the reference describes, without contradicting it or "
    "adding things that are not there?",
    "- descriptiveness: how much of the reference's detail (objects, attributes, actions, "
    "positions, setting) does it cover?",
    "- temporal_consistency: are events and changes told in the order the reference gives, "
    "without swapping or inventing steps?",
    "- fluency: is it grammatical, clear and free of repetition? (judge the language only)"])

SCORE_JSON = ('{"relevance": <1-10>, "descriptiveness": <1-10>, '
              '"temporal_consistency": <1-10>, "fluency": <1-10>}')

SCORE_PROMPT = """Reference caption (ground truth):
{reference}

Candidate caption:
{candidate}

Rate the candidate against the reference on four axes, each an integer from 1 (worst) to 10 (best):
{guide}

Reply with only this JSON object and no other text:
{json}"""

COMPARE_PROMPT = """Reference caption (ground truth):
{reference}

Caption 1:
{first}

Caption 2:
{second}

Which caption describes the video better, judged against the reference on these axes?
{guide}

Reply with only a JSON object and no other text:
{{"better": "1"}}, {{"better": "2"}} or {{"better": "tie"}}"""

VERDICT_JSON = '{"better": "1" | "2" | "tie"}'

# The same formats as structured-output schemas (sent where the server takes them; the parsers
# above still check every reply).
SCORE_SCHEMA = json_schema("caption_scores", {axis: {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX}
                                              for axis in AXES})
VERDICT_SCHEMA = json_schema("caption_verdict", {"better": {"type": "string", "enum": ["1", "2", "tie"]}})


def ask_judge(client, prompt: str, parse, json_hint: str, reask: int = 2, look=text_only, **params) -> Asked:
    """The judge's prompt, asked again up to `reask` times while parse(reply) reports problems,
    saying what was wrong (gen_chains.ask_until_parsed: the judge sees its own unusable reply).
    look(messages) is what is sent (gen_chains.Frames.look: the video's frames with the prompt).
    A ChatError (the request itself failed for good) propagates to map_resumable, which records it."""
    messages = look([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}])
    return ask_until_parsed(client, messages, parse, f"Reply again with only the JSON object: {json_hint}",
                            reask + 1, **params)


def judge_failure(asked: Asked) -> dict:
    """An unusable judge is recorded as failed, never silently dropped or replaced by a default score."""
    return {"status": "failed", "reason": f"unparseable judge reply after {asked.tries} tries: "
            + "; ".join(asked.problems), "reply": asked.reply}


def judge_llm(client, reference: str, candidate: str, reask: int = 2, look=text_only, **params) -> dict:
    """Four axis scores for one candidate caption from the LLM judge: {"scores", "tries", "reply"},
    or a failed record (judge_failure)."""
    prompt = SCORE_PROMPT.format(reference=reference, candidate=candidate, guide=AXIS_GUIDE,
                                 json=SCORE_JSON)
    out = ask_judge(client, prompt, parse_axis_scores, SCORE_JSON, reask, look, schema=SCORE_SCHEMA,
                    **params)
    if not out.ok:
        return judge_failure(out)
    return {"scores": out.value, "tries": out.tries, "reply": out.reply}


def ask_verdict(client, reference: str, first: str, second: str, reask: int = 2, look=text_only,
                **params) -> Asked:
    """Which of two captions is better against the reference: "1", "2" or "tie"."""
    prompt = COMPARE_PROMPT.format(reference=reference, first=first, second=second, guide=AXIS_GUIDE)
    return ask_judge(client, prompt, parse_verdict, VERDICT_JSON, reask, look, schema=VERDICT_SCHEMA,
                     **params)


def compare_llm(client, reference: str, a: str, b: str, reask: int = 2, look=text_only, **params) -> dict:
    """Head-to-head of captions a and b, asked in both orders (gen_chains.ask_both_orders: a
    caption wins only if it wins in both orders, loses only if it loses in both, else a tie,
    which cancels a pure position bias instead of averaging it into the result)."""
    both = ask_both_orders(partial(ask_verdict, client, reference, reask=reask, look=look, **params), a, b)
    if both.failed is not None:
        return judge_failure(both.failed)
    return {"result": both.result, "verdicts": both.verdicts, "a_view": both.a_view, "tries": both.tries}


# ----------------------------------------------------------------------------------------------
# Files: records keyed by id, results JSON, markdown tables
# ----------------------------------------------------------------------------------------------

def require_text(path: str, line: int, rec: dict, field: str) -> str:
    value = rec.get(field)
    if not isinstance(value, str):
        raise DataError(path, line, f"expected a string, got {type(value).__name__}", field=field)
    return value


def require_scores(path: str, line: int, rec: dict) -> dict[str, float]:
    """The four axis scores of a score record, each a number."""
    scores = rec.get("scores")
    if not isinstance(scores, dict):
        raise DataError(path, line, "expected an object with the four axes", field="scores")
    out = {}
    for axis in AXES:
        v = scores.get(axis)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(path, line, f"expected a number, got {v!r}", field=f"scores.{axis}")
        out[axis] = float(v)
    return out


def sibling(path: str, suffix: str) -> str:
    """runs/captions.jsonl + ".results.json" -> runs/captions.results.json"""
    return os.path.splitext(path)[0] + suffix


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def fmt_ci(stat: dict, digits: int = 2) -> str:
    lo, hi = stat["ci95"]
    return f"{fmt(stat['mean'], digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: dict, table: str, path: str) -> dict:
    """Write the results JSON and print the table (what every subcommand ends with)."""
    write_json(path, results)
    print(table)
    print(f"\nresults: {path}")
    return results


def failure_summary(records: Iterable[dict]) -> dict:
    failed = [r for r in records if r.get("status") == "failed"]
    return {"n_failed": len(failed),
            "failed": [{"id": r["id"], "reason": r.get("reason", "")} for r in failed[:20]]}


# ----------------------------------------------------------------------------------------------
# judge / agree / compare
# ----------------------------------------------------------------------------------------------

def _judge_inputs(args, pred_path: str, preds: dict, refs: dict) -> dict[str, object]:
    """id -> what the judge compares against: the reference caption (llm) or the facts (rules)."""
    out = {}
    for rid, (line, _) in preds.items():
        if rid not in refs:
            raise DataError(pred_path, line, f"id {rid!r} has no reference in {args.ref}", field="id")
        ref_line, ref = refs[rid]
        if args.judge == "rules":
            if not isinstance(ref.get("facts"), dict):
                raise DataError(args.ref, ref_line, "missing or not an object: the rules judge "
                                "needs the facts that `gen_chains.py synth` stores (use --judge llm "
                                "for other data)", field="facts")
            out[rid] = ref["facts"]
        else:
            out[rid] = require_text(args.ref, ref_line, ref, "caption")
    return out


def client_progress(client: ChatClient | None) -> dict:
    """map_resumable's live tokens/s for an LLM judge's run (nothing for the rules judge)."""
    return {"postfix": client.progress} if client is not None else {}


def with_client_report(run: dict, client: ChatClient | None) -> dict:
    """A run's summary with the LLM client's tokens (also per record and per kept record),
    requests and per-server counts."""
    if client is None:
        return run
    return {**run, **client.report(run)}


def _chat_params(args) -> dict:
    return {"max_tokens": args.max_tokens}  # temperature travels in the client's default_params


def _judge_frames(args, ids, refs: dict) -> Frames:
    """--frames for the LLM judge: the videos of the references it judges against."""
    frames = Frames.from_args(args)
    if frames.n and args.judge != "llm":
        raise SystemExit(f"{args.command}: --frames is for --judge llm (the rules judge reads the facts)")
    frames.find_videos(args.ref, [refs[rid] for rid in ids])
    return frames


def rules_judge():
    """The offline judge, synthetic.rules_scores (a caption against a synthetic video's stored
    facts): the one place this file reaches the toy world."""
    import synthetic
    return synthetic.rules_scores


def cmd_judge(args) -> dict:
    preds = records_by_id(args.pred)
    refs = records_by_id(args.ref)
    reference = _judge_inputs(args, args.pred, preds, refs)
    jobs = [{"id": rid, "caption": require_text(args.pred, line, rec, "caption")}
            for rid, (line, rec) in preds.items()]
    client = None
    frames = _judge_frames(args, preds, refs)
    if args.judge == "rules":
        rules_scores = rules_judge()

        def judge_one(job):
            scores, counts = rules_scores(job["caption"], reference[job["id"]])
            return {"id": job["id"], "judge": "rules", "scores": scores, "facts": counts}
        concurrency = 1  # pure Python, microseconds a caption
    else:
        client = ChatClient.from_args(args)

        def judge_one(job):
            out = judge_llm(client, reference[job["id"]], job["caption"], args.reask,
                            look=frames.look(job["id"]), **_chat_params(args))
            return {"id": job["id"], "judge": "llm", **out}
        concurrency = args.concurrency
    run = map_resumable(jobs, judge_one, args.out, concurrency, desc=f"judge ({args.judge})",
                        drop_failed=args.retry_failed, **client_progress(client))

    done = collect_outputs(args.out, preds)
    scored = [r for r in done.values() if r.get("status") != "failed"]
    per_axis = {axis: mean_ci([r["scores"][axis] for r in scored]) for axis in AXES}
    overall = mean_ci([np.mean([r["scores"][a] for a in AXES]) for r in scored])
    results = {"command": "judge", "judge": args.judge, "pred": args.pred, "ref": args.ref,
               "out": args.out, "n": len(jobs), "n_scored": len(scored),
               **failure_summary(done.values()), "axes": per_axis, "overall": overall,
               "run": with_client_report(run, client), **frames.summary()}
    rows = [(axis, fmt_ci(per_axis[axis]), per_axis[axis]["n"]) for axis in AXES]
    rows.append(("**overall** (mean of axes)", fmt_ci(overall), overall["n"]))
    table = markdown_table((f"axis ({args.judge} judge)", "mean [95% CI]", "n"), rows)
    if results["n_failed"]:
        table += (f"\n\n{results['n_failed']} of {len(jobs)} captions could not be judged "
                  f"(see {args.out})")
    return report(results, table, args.results or sibling(args.out, ".results.json"))


def cmd_agree(args) -> dict:
    a = records_by_id(args.a, {"scores": dict})
    b = records_by_id(args.b, {"scores": dict})
    common = [rid for rid in a if rid in b]
    if len(common) < 2:
        raise SystemExit(f"agree: {args.a} and {args.b} share {len(common)} scored ids; need at least 2")
    sa = {rid: require_scores(args.a, *a[rid]) for rid in common}
    sb = {rid: require_scores(args.b, *b[rid]) for rid in common}
    for scores in (sa, sb):
        for s in scores.values():
            s["overall"] = float(np.mean([s[axis] for axis in AXES]))
    per_axis = {}
    for axis in AXES + ("overall",):
        xa, xb = [sa[r][axis] for r in common], [sb[r][axis] for r in common]
        per_axis[axis] = {"spearman": spearman(xa, xb), "kendall": kendall_tau_b(xa, xb),
                          "n": len(common)}
    results = {"command": "agree", "a": args.a, "b": args.b, "n_common": len(common),
               "only_in_a": len(a) - len(common), "only_in_b": len(b) - len(common), "axes": per_axis}
    rows = [(axis, fmt(v["spearman"]), fmt(v["kendall"]), v["n"]) for axis, v in per_axis.items()]
    table = markdown_table(("axis", "Spearman rho", "Kendall tau-b", "n"), rows)
    return report(results, table, args.results or sibling(args.a, ".agree.results.json"))


def cmd_head_to_head(args) -> dict:
    a = records_by_id(args.a, {"caption": str}, allow_empty=True)
    b = records_by_id(args.b, {"caption": str}, allow_empty=True)
    both = {rid: a[rid] for rid in a if rid in b}
    refs = records_by_id(args.ref)
    reference = _judge_inputs(args, args.a, both, refs)
    jobs = [{"id": rid, "a": require_text(args.a, *a[rid], "caption"),
             "b": require_text(args.b, *b[rid], "caption")} for rid in both]
    client = None
    frames = _judge_frames(args, both, refs)
    if args.judge == "rules":
        rules_scores = rules_judge()
        # Deterministic and symmetric: no position to be biased by, one scoring of each caption.
        def compare_one(job):
            sa, _ = rules_scores(job["a"], reference[job["id"]])
            sb, _ = rules_scores(job["b"], reference[job["id"]])
            ma, mb = np.mean(list(sa.values())), np.mean(list(sb.values()))
            result = "win" if ma > mb else "loss" if mb > ma else "tie"
            return {"id": job["id"], "judge": "rules", "a_scores": sa, "b_scores": sb, "result": result}
        concurrency = 1
    else:
        client = ChatClient.from_args(args)

        def compare_one(job):
            out = compare_llm(client, reference[job["id"]], job["a"], job["b"], args.reask,
                              look=frames.look(job["id"]), **_chat_params(args))
            return {"id": job["id"], "judge": "llm", **out}
        concurrency = args.concurrency
    out_path = args.out or sibling(args.a, f".vs.{os.path.basename(sibling(args.b, ''))}.compare.jsonl")
    run = map_resumable(jobs, compare_one, out_path, concurrency, desc=f"compare ({args.judge})",
                        drop_failed=args.retry_failed, **client_progress(client))

    done = collect_outputs(out_path, both)
    decided = [r for r in done.values() if r.get("status") != "failed"]
    outcome = {k: [1.0 if r["result"] == k else 0.0 for r in decided] for k in ("win", "tie", "loss")}
    results = {"command": "compare", "judge": args.judge, "a": args.a, "b": args.b, "ref": args.ref,
               "out": out_path, "n": len(jobs), "n_decided": len(decided),
               **failure_summary(done.values()),
               **{k: mean_ci(v) for k, v in outcome.items()},
               # +1 win, 0 tie, -1 loss: its interval excludes 0 when a is really better (or worse)
               "net": mean_ci([w - l for w, l in zip(outcome["win"], outcome["loss"])]),
               "run": with_client_report(run, client), **frames.summary()}
    if args.judge == "llm" and decided:
        views = [r["a_view"] for r in decided]
        decisive = [v for r in decided for v in r["verdicts"] if v in ("1", "2")]
        results["order_agreement"] = float(np.mean([v[0] == v[1] for v in views]))
        results["first_position_rate"] = (float(np.mean([v == "1" for v in decisive]))
                                          if decisive else None)  # 0.5 = no position bias
    rows = [(k, fmt_ci(results[k], 3), int(sum(outcome[k]))) for k in ("win", "tie", "loss")]
    rows.append(("net (win - loss)", fmt_ci(results["net"], 3), len(decided)))
    table = markdown_table((f"A vs B ({args.judge} judge)", "rate [95% CI]", "count"), rows)
    if "order_agreement" in results:
        table += (f"\n\nthe two orders agreed on {results['order_agreement']:.1%} of pairs; "
                  f"position 1 won {fmt(results['first_position_rate'])} of decisive verdicts")
    return report(results, table, args.results or sibling(out_path, ".results.json"))


# ----------------------------------------------------------------------------------------------
# Model-side evaluation: generate, mcq, rank (rank_dpo's loader; torch only imported here)
# ----------------------------------------------------------------------------------------------

def _load(args, adapter: str | None):
    import torch
    from rank_dpo import load_model, run_attn_implementation
    dtype = getattr(torch, args.dtype) if args.dtype else None
    # the backend of the run being evaluated, for its reference model too
    attention = run_attn_implementation(args, getattr(args, "adapter", None))
    return load_model(args.model, adapter, device=args.device, dtype=dtype,
                      attn_implementation=attention)


def _sampling(args):
    """The video flags given, else the ones the adapter's run trained with, else the defaults."""
    from rank_dpo import run_video_sampling
    return run_video_sampling(args, args.adapter)


def generate_texts(model, processor, prompts: list[str], videos: list, video_sampling,
                   copies: int = 1, **decoding) -> list[str]:
    """The new text of each prompt's `copies` generated rows (a prompt's copies adjacent): each
    video encoded by the vision tower once (build_generation_inputs with the model), the rows
    left padded, so every prompt ends at the same column and the rest is new text."""
    import torch
    from rank_dpo import build_generation_inputs
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = build_generation_inputs(processor, prompts, videos, video_sampling, model=model,
                                     copies=copies)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    with torch.no_grad():
        ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **decoding)
    return tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def decoding_results(args, n: int, new: int, done: str, seconds: float, n_words: list[int],
                     **settings) -> dict:
    """The results fields generate and sample share: the run, how many records were decoded now
    (`done`) and skipped as already done, the settings given, the time and the mean length."""
    return {"command": args.command, "model": args.model, "adapter": args.adapter,
            "data": args.data, "out": args.out, "n": n, done: new, "skipped": n - new, **settings,
            "seconds": round(seconds, 3), "mean_words": float(np.mean(n_words)) if n_words else None}


def decode_blocks(args, jobs: list[tuple[str, str, str | None]], out: ResumableJsonl,
                  to_record, desc: str = "generate") -> list[int]:
    """Greedy decoding of jobs (id, prompt, video path) not yet in `out`, --batch_size at a time;
    out.append(to_record(id, text)) for each. Returns the word counts of the new texts.

    Batches are fixed blocks of the input, whatever was done before a kill: left padding
    depends on the batch, so a resumed run decodes exactly what an uninterrupted one does."""
    from rank_dpo import load_clip

    blocks = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    blocks = [b for b in blocks if any(job[0] not in out.done_ids for job in b)]
    n_words: list[int] = []
    if not blocks:
        return n_words
    model, processor = _load(args, args.adapter)
    sampling = _sampling(args)
    for i, batch in enumerate(blocks):
        videos = [load_clip(v, sampling) if v else None for _, _, v in batch]
        texts = generate_texts(model, processor, [p for _, p, _ in batch], videos, sampling,
                               max_new_tokens=args.max_new_tokens, do_sample=False)
        for (rid, _, _), text in zip(batch, texts):
            if rid not in out.done_ids:
                out.append(to_record(rid, text.strip()))
                n_words.append(len(text.split()))
        print(f"{desc}: block {i + 1}/{len(blocks)}", file=sys.stderr)
    return n_words


def cmd_generate(args) -> dict:
    from rank_dpo import resolve_video

    data = records_by_id(args.data)
    jobs = [(rid, args.prompt or rec.get("prompt") or DEFAULT_PROMPT,
             resolve_video(args.data, line, rec, args.video_root))
            for rid, (line, rec) in data.items()]  # every video checked before the model loads
    for rid, prompt, _ in jobs:
        if not isinstance(prompt, str):
            raise DataError(args.data, data[rid][0], "expected a string", field="prompt")
    return write_captions(args, jobs)


def write_captions(args, jobs: list[tuple[str, str, str | None]], **settings) -> dict:
    """{"id", "caption"} for each job (id, prompt, video) into args.out, resumably (generate,
    and the caption step of the benchmarks); the results file and table of a decoding run."""
    out = ResumableJsonl(args.out)
    todo = [job for job in jobs if job[0] not in out.done_ids]
    start = time.monotonic()
    try:
        n_words = decode_blocks(args, jobs, out, lambda rid, text: {"id": rid, "caption": text},
                                desc=" ".join(filter(None, (args.command, getattr(args, "step", None)))))
    finally:
        out.close()
    seconds = time.monotonic() - start
    results = {**decoding_results(args, len(jobs), len(todo), "generated", seconds, n_words),
               **settings, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    table = markdown_table(("records", "generated now", "already done", "seconds", "mean words"),
                           [(len(jobs), len(todo), len(jobs) - len(todo), fmt(seconds, 1),
                             fmt(results["mean_words"], 1))])
    return report(results, table, args.results or sibling(args.out, ".results.json"))


def record_seed(seed: int, rid: str) -> int:
    """The sampling seed of one record: a hash of --seed and its id, so a resumed run draws exactly
    what an uninterrupted one would (no dependence on which records came before)."""
    import hashlib
    return int.from_bytes(hashlib.sha256(f"{seed}:{rid}".encode()).digest()[:8], "little") % 2 ** 63


def cmd_sample(args) -> dict:
    """N sampled responses per record (per video; per question when the record has one):
    {"id", "video"?, "prompt" | "question", "caption"? (passed through), "answers": [N]}.

    The N samples of a record are one generate call over N copies of its prompt: the video is
    read, preprocessed and encoded by the vision tower once for its N samples. Seeded per record (record_seed), so the output does not
    depend on where a run was killed and resumed. --temperature 0 is greedy decoding (N must be 1).
    """
    import torch
    from rank_dpo import load_clip, resolve_video

    if args.num_samples < 1:
        raise SystemExit("sample: --num_samples must be at least 1")
    if args.temperature == 0 and args.num_samples != 1:
        raise SystemExit("sample: --temperature 0 is greedy decoding; it gives one answer (--num_samples 1)")
    data = records_by_id(args.data)
    jobs = []
    for rid, (line, rec) in data.items():    # every record checked before the model loads
        key = "question" if rec.get("question") is not None else "prompt"
        prompt = rec.get(key) if key == "question" else (args.prompt or rec.get("prompt") or DEFAULT_PROMPT)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(args.data, line, "expected a non-empty string", field=key)
        jobs.append({"id": rid, "key": key, "prompt": prompt, "record": rec,
                     "video_path": resolve_video(args.data, line, rec, args.video_root)})
    out = ResumableJsonl(args.out)
    todo = [job for job in jobs if job["id"] not in out.done_ids]
    start, n_words = time.monotonic(), []
    try:
        if todo:
            model, processor = _load(args, args.adapter)
            video_sampling = _sampling(args)
            decoding = {"do_sample": False} if args.temperature == 0 else {
                "do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
            for n, job in enumerate(todo, 1):
                video = load_clip(job["video_path"], video_sampling) if job["video_path"] else None
                torch.manual_seed(record_seed(args.seed, job["id"]))
                texts = [t.strip() for t in generate_texts(
                    model, processor, [job["prompt"]], [video], video_sampling,
                    copies=args.num_samples, max_new_tokens=args.max_new_tokens, **decoding)]
                rec = job["record"]
                result = {"id": job["id"], job["key"]: job["prompt"], "answers": texts}
                for passthrough in ("video", "caption", "caption_id"):  # not "answer": the gold one
                    if rec.get(passthrough) is not None:
                        result[passthrough] = rec[passthrough]
                out.append(result)
                n_words += [len(t.split()) for t in texts]
                if n % 10 == 0 or n == len(todo):
                    print(f"sample: {n}/{len(todo)}", file=sys.stderr)
    finally:
        out.close()
    seconds = time.monotonic() - start
    results = decoding_results(args, len(jobs), len(todo), "sampled", seconds, n_words,
                               num_samples=args.num_samples, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed)
    table = markdown_table(("records", "sampled now", "already done", "answers each", "seconds",
                            "mean words"),
                           [(len(jobs), len(todo), len(jobs) - len(todo), args.num_samples,
                             fmt(seconds, 1), fmt(results["mean_words"], 1))])
    return report(results, table, args.results or sibling(args.out, ".results.json"))


def letter(i: int) -> str:
    return chr(ord("A") + i)


def load_mcq(path: str, video_root: str) -> tuple[list[dict], int]:
    """Multiple-choice items as {"id", "video", "prompt", "letters", "answer"} from either

    an LF-MCQA item  {"id", "video"?, "question", "options": [...], "answer": int}, prompted with
                     gen_chains.format_mcq (the format the mcq chains were trained on), or
    an mcq chain     {"id", "video"?, "prompt", "chain": ["C", "A", ...]} whose chain[0] is right;
                     the candidates are the chain's letters.
    Also returns how many records gen_chains wrote as failed ({"status": "failed"}); they hold
    no item and are counted in the results, not silently dropped.
    """
    from rank_dpo import resolve_video

    found, failed = read_records(path)     # failed or no_preference records: no item to score
    items = []
    for line, rec in found:
        rid = rec["id"]
        if "chain" in rec:
            prompt, chain = require_text(path, line, rec, "prompt"), rec["chain"]
            if not (isinstance(chain, list) and len(chain) >= 2 and
                    all(isinstance(c, str) and re.fullmatch(r"[A-Z]", c.strip()) for c in chain)):
                raise DataError(path, line, "an mcq chain is a list of at least two option letters",
                                field="chain")
            letters, answer = [c.strip() for c in chain], chain[0].strip()
        else:
            question, options, answer = rec.get("question"), rec.get("options"), rec.get("answer")
            if not isinstance(question, str):
                raise DataError(path, line, "missing or not a string", field="question")
            if not (isinstance(options, list) and 2 <= len(options) <= 26
                    and all(isinstance(o, str) for o in options)):
                raise DataError(path, line, "expected a list of 2-26 strings", field="options")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
                raise DataError(path, line, f"expected an option index 0..{len(options) - 1}, "
                                f"got {answer!r}", field="answer")
            prompt = format_mcq(question, options)
            letters, answer = [letter(i) for i in range(len(options))], letter(answer)
        items.append({"id": rid, "video": resolve_video(path, line, rec, video_root), "prompt": prompt,
                      "where": (path, line),
                      "letters": sorted(set(letters)), "answer": answer})
    return items, failed


def chain_logps(model, processor, chains: list[dict], sampling: VideoSampling) -> list[np.ndarray]:
    """Sequence log-prob of every entry of every item {"video", "prompts", "responses"}
    (the video encoded once per item). Serves rank (chains) and mcq (one entry per letter).
    `sampling`: how frames are taken (--num_frames/--fps/--max_pixels)."""
    from rank_dpo import load_clip, response_logps

    out = []
    for chain in chains:
        try:
            video = load_clip(chain["video"], sampling) if chain["video"] else None
        except (OSError, ValueError) as e:       # an undecodable file: name the record
            raise DataError(*(chain.get("where") or (chain["video"], None)), str(e), field="video") from None
        lp = response_logps(model, processor, video, chain["prompts"], chain["responses"],
                            sampling=sampling)
        out.append(lp.double().cpu().numpy())
    return out


def mcq_predictions(model, processor, items: list[dict], sampling: VideoSampling) -> list[dict]:
    """For each item, the log-probability of every option letter as the response; the prediction
    is the letter with the highest one (no sampling, no parsing of free text)."""
    options = [{"video": item["video"], "prompts": [item["prompt"]] * len(item["letters"]),
                "responses": item["letters"], "where": item.get("where")} for item in items]
    out = []
    for item, lp in zip(items, chain_logps(model, processor, options, sampling)):
        letters = item["letters"]
        pred = letters[int(lp.argmax())]
        out.append({"id": item["id"], "pred": pred, "answer": item["answer"],
                    "correct": pred == item["answer"],
                    "logps": {c: float(v) for c, v in zip(letters, lp.tolist())}})
    return out


def items_and_model(args, load_items, what: str):
    """(items, failed records, model, processor) for a scoring command: the data file's usable
    items (a stop naming the file when it has none), then the model with --adapter merged."""
    items, n_failed = load_items(args.data, args.video_root)
    if not items:
        raise SystemExit(f"{args.command}: {args.data} holds no usable {what} "
                         f"({n_failed} failed records)")
    return (items, n_failed, *_load(args, args.adapter))


def cmd_mcq(args) -> dict:
    items, n_failed, model, processor = items_and_model(args, load_mcq, "item")
    preds = mcq_predictions(model, processor, items, _sampling(args))
    if args.out:
        write_jsonl(args.out, preds)
    acc = mean_ci([float(p["correct"]) for p in preds])
    chance = float(np.mean([1 / len(i["letters"]) for i in items])) if items else math.nan
    picked = {c: sum(p["pred"] == c for p in preds) for c in sorted({p["pred"] for p in preds})}
    results = {"command": "mcq", "model": args.model, "adapter": args.adapter, "data": args.data,
               "failed_records_skipped": n_failed, "accuracy": acc, "chance": chance,
               "predicted_letters": picked}
    table = markdown_table(("model", "accuracy [95% CI]", "chance", "n"),
                           [(_model_name(args), fmt_ci(acc, 3), fmt(chance), acc["n"])])
    table += "\n\npredicted letters: " + ", ".join(f"{c} {n}" for c, n in picked.items())
    return report(results, table, args.results or sibling(args.data, ".mcq.results.json"))


def load_eval_chains(path: str, video_root: str) -> tuple[list[dict], int]:
    """Held-out chains as {"id", "video", "prompts", "responses"}, best first, from either

    a caption (or mcq) chain  {"prompt", "chain": [best, ..., worst]}  (one prompt, K responses), or
    a yes/no chain            {"prompts": [best, ...], "response": "no"} (K prompts, one response).
    Also returns the number of records written as failed (see load_mcq).
    """
    from rank_dpo import chain_record

    found, failed = read_records(path)     # failed or no_preference records: no item to score
    chains = []
    for line, rec in found:
        rid = rec["id"]
        field, prompts, responses, video = chain_record(path, line, rec, video_root)
        if len(prompts) < 2:
            raise DataError(path, line, "expected a list of at least two strings", field=field)
        chains.append({"id": rid, "video": video, "prompts": prompts, "responses": responses,
                       "where": (path, line)})
    return chains, failed


def ranking_summary(scores: list[np.ndarray]) -> dict:
    """Mean over chains of chain_metrics, each with a bootstrap interval over chains.
    Kendall's tau is undefined for a chain the scorer rates all equal; such chains are counted
    in pairwise and top-1 (as coin flips) and left out of the tau mean."""
    per = [chain_metrics(s) for s in scores]
    out = {m: mean_ci([p[m] for p in per if math.isfinite(p[m])])
           for m in ("pairwise", "kendall", "top1")}
    out["n_chains"] = len(per)
    return out


def cmd_rank(args) -> dict:
    chains, n_failed, model, processor = items_and_model(args, load_eval_chains, "chain")
    policy = chain_logps(model, processor, chains, _sampling(args))
    scorers = {"log-prob": policy}
    reference = reference_adapter(args) if args.adapter else None
    if args.adapter:
        # The implicit reward of DPO-style training: r = beta * (log pi - log pi_ref); beta > 0
        # does not change an order, so the difference itself is ranked.
        del model  # one model in memory at a time
        ref_model, processor = _load(args, reference)
        ref = chain_logps(ref_model, processor, chains, _sampling(args))
        scorers["implicit reward"] = [p - r for p, r in zip(policy, ref)]
    if args.out:
        write_jsonl(args.out, [{"id": c["id"], **{name: s[i].tolist() for name, s in scorers.items()}}
                               for i, c in enumerate(chains)])
    summary = {name: ranking_summary(s) for name, s in scorers.items()}
    chance_top1 = float(np.mean([1 / len(c["responses"]) for c in chains])) if chains else math.nan
    results = {"command": "rank", "model": args.model, "adapter": args.adapter, "data": args.data,
               "reference": (reference or "base model") if args.adapter else None,
               "failed_records_skipped": n_failed, "scorers": summary,
               "chance": {"pairwise": 0.5, "kendall": 0.0, "top1": chance_top1}}
    rows = [(f"{_model_name(args)}: {name}", fmt_ci(v["pairwise"], 3), fmt_ci(v["kendall"], 3),
             fmt_ci(v["top1"], 3), v["n_chains"]) for name, v in summary.items()]
    rows.append(("chance", "0.500", "0.000", fmt(chance_top1), ""))
    table = markdown_table(("scorer", "pairwise acc", "Kendall tau", "top-1", "chains"), rows)
    return report(results, table, args.results or sibling(args.data, ".rank.results.json"))


def reference_adapter(args) -> str | None:
    """The model the adapter's implicit reward is measured against: the one it was trained
    against. That is the run's warm start when rank_dpo.py was given --init (recorded in the
    adapter's run file), else the base model (None). --ref_adapter overrides ("none" = base)."""
    if args.ref_adapter:
        return None if args.ref_adapter == "none" else args.ref_adapter
    init = read_run_meta(args.adapter).get("init")
    return os.path.normpath(os.path.join(args.adapter, init)) if init else None


def _model_name(args) -> str:
    return f"{args.model} + {args.adapter}" if args.adapter else args.model


# ----------------------------------------------------------------------------------------------
# reward: the LM reward of LLaVA-Hound-DPO (the caption stands in for the video)
# ----------------------------------------------------------------------------------------------

def cmd_reward(args) -> dict:
    """Score QA answers with gen_chains.score_answer: an LLM reads caption + question + answer and
    returns a yes/no correctness verdict and a 0-5 score (the same call that ranks sampled answers
    for training, so evaluation and data generation use one definition of the reward).

    Input records: {"id", "question", "answer" | "answers": [one], "caption"?, "caption_id"?}: a
    `sample --num_samples 1` file scores the model's answer. The caption is the record's own, or
    the one with id caption_id (else id) in --captions.
    """
    captions = records_by_id(args.captions, {"caption": str}) if args.captions else {}
    jobs = []
    for line, rec in read_records(args.data)[0]:
        rid = rec["id"]
        if rec.get("caption") is not None:
            caption = require_text(args.data, line, rec, "caption")
        else:
            key = rec.get("caption_id", rid)
            if key not in captions:
                raise DataError(args.data, line, f"no caption: none in the record and no id {key!r} in "
                                f"{args.captions or '--captions (not given)'}", field="caption")
            caption = require_text(args.captions, *captions[key], "caption")
        if rec.get("answers") is not None:   # `sample --num_samples 1` output: the model's answer
            answers = rec["answers"]
            if not (isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)):
                raise DataError(args.data, line, "expected one answer string (sample with "
                                "--num_samples 1 for evaluation)", field="answers")
            answer = answers[0]
        else:
            answer = require_text(args.data, line, rec, "answer")
        jobs.append({"id": rid, "caption": caption,
                     "question": require_text(args.data, line, rec, "question"), "answer": answer})
    client = ChatClient.from_args(args)

    def reward_one(job):
        return {"id": job["id"], **score_answer(client, job["caption"], job["question"], job["answer"])}
    run = map_resumable(jobs, reward_one, args.out, args.concurrency, desc="reward",
                        drop_failed=args.retry_failed, **client_progress(client))

    done = collect_outputs(args.out, [j["id"] for j in jobs])
    scored = [r for r in done.values() if r.get("status") != "failed"]
    score = mean_ci([float(r["score"]) for r in scored])
    yes = mean_ci([float(r["verdict"] == "yes") for r in scored])
    histogram = {s: sum(int(r["score"]) == s for r in scored) for s in range(6)}
    results = {"command": "reward", "data": args.data, "out": args.out, "n": len(jobs),
               "n_scored": len(scored), **failure_summary(done.values()), "score": score,
               "yes_rate": yes, "score_histogram": histogram,
               "run": with_client_report(run, client)}
    table = markdown_table(("metric", "mean [95% CI]", "n"),
                           [("score (0-5)", fmt_ci(score), score["n"]),
                            ("verdict yes (accuracy)", fmt_ci(yes, 3), yes["n"])])
    table += "\n\nscores: " + ", ".join(f"{s}: {n}" for s, n in histogram.items())
    return report(results, table, args.results or sibling(args.out, ".results.json"))


# ----------------------------------------------------------------------------------------------
# The published benchmarks (benchmarks.py reads their files and holds their metrics):
#   tempcompass, vidhal  the model's log-probs (or generation + matching), like mcq and rank
#   vdc, argus           `caption`: the model writes captions (resumable, batched, as generate);
#                        `score`: a judge (an LLM over the one HTTP client, or a rules judge)
# ----------------------------------------------------------------------------------------------

def benchmark_video(args, path: str, line: int | None, name: str, field: str) -> str:
    """The clip <video_root>/<name>.mp4 (or .MP4/.mkv/.webm), checked before the model loads."""
    video = benchmarks.find_video(args.video_root, name)
    if video is None:
        raise DataError(path, line, f"video not found: {os.path.join(args.video_root, name)}.mp4 "
                        "(clips are looked for under --video_root, default <benchmark>/videos)",
                        field=field)
    return video


def score_resumable(args, items: list[dict], to_record, desc: str) -> int:
    """Sequence log-probs (chain_logps) of each item {"id", "video", "prompts", "responses",
    "where"} not yet in args.out, appended as to_record(item, logps). Returns how many were new."""
    out = ResumableJsonl(args.out)
    try:
        todo = [item for item in items if item["id"] not in out.done_ids]
        if todo:
            model, processor = _load(args, args.adapter)
            sampling = _sampling(args)
            for n, item in enumerate(todo, 1):
                out.append(to_record(item, chain_logps(model, processor, [item], sampling)[0]))
                if n % 20 == 0 or n == len(todo):
                    print(f"{desc}: {n}/{len(todo)}", file=sys.stderr)
    finally:
        out.close()
    return len(todo)


def grouped_ci(records: list[dict], group: str, value: str, groups: Sequence[str] | None = None) -> dict:
    """{group name: mean_ci of `value`} over records, plus "overall" over all of them."""
    names = groups or sorted({r[group] for r in records})
    out = {g: mean_ci([float(r[value]) for r in records if r[group] == g]) for g in names}
    out = {g: v for g, v in out.items() if v["n"]}
    out["overall"] = mean_ci([float(r[value]) for r in records])
    return out


def cmd_tempcompass(args) -> dict:
    """TempCompass (questions/<task>.json, videos/<video_id>.mp4 incl. the _reverse clips):
    each question answered by option log-probability (--answer logprob: the label with the
    highest log-prob, as mcq does) or by greedy generation matched with the official rules
    (--answer generate; a reply no rule matches is wrong, the official --disable_llm mode).
    Accuracy per temporal dimension and overall, per task."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        if task not in benchmarks.TEMPCOMPASS_TASKS:
            raise SystemExit(f"tempcompass: unknown task {task!r} (one of "
                             f"{', '.join(benchmarks.TEMPCOMPASS_TASKS)})")
    items = {}
    for task in tasks:
        path = benchmarks.tempcompass_path(args.data, task)
        for item in benchmarks.read_tempcompass(args.data, task):
            video = benchmark_video(args, path, item.line, item.video_id, item.video_id)
            items[f"{task}/{item.id}"] = (item, video, path)
    if not items:
        raise SystemExit(f"tempcompass: {args.data} holds no questions for {', '.join(tasks)}")

    def base(rid):
        item = items[rid][0]
        return {"id": rid, "task": item.task, "dimension": item.dimension, "video_id": item.video_id,
                "gold": item.gold, "answer_by": args.answer}

    start = time.monotonic()
    if args.answer == "logprob":
        scored = [{"id": rid, "video": video, "prompts": [item.prompt] * len(item.labels),
                   "responses": item.responses, "where": (path, item.line)}
                  for rid, (item, video, path) in items.items()]

        def to_record(job, logps):
            item = items[job["id"]][0]
            pred = item.labels[int(np.argmax(logps))]
            return {**base(job["id"]), "pred": pred, "correct": pred == item.gold,
                    "logps": {lab: float(v) for lab, v in zip(item.labels, logps)}}
        new = score_resumable(args, scored, to_record, "tempcompass")
    else:
        jobs = [(rid, item.prompt, video) for rid, (item, video, _) in items.items()]

        def to_record(rid, text):
            pred = benchmarks.match_tempcompass_answer(items[rid][0], text)
            return {**base(rid), "reply": text, "pred": pred, "matched": pred is not None,
                    "correct": pred == items[rid][0].gold}
        out = ResumableJsonl(args.out)
        new = len([j for j in jobs if j[0] not in out.done_ids])
        try:
            decode_blocks(args, jobs, out, to_record, desc="tempcompass")
        finally:
            out.close()
    done = collect_outputs(args.out, items)
    wrong_mode = [r["id"] for r in done.values() if r.get("answer_by") != args.answer]
    if wrong_mode:
        raise SystemExit(f"tempcompass: {args.out} holds answers made another way "
                         f"({wrong_mode[0]!r}...); use a new --out for --answer {args.answer}")
    per_task = {}
    for task in tasks:
        recs = [r for r in done.values() if r["task"] == task]
        per_task[task] = grouped_ci(recs, "dimension", "correct", benchmarks.TEMPCOMPASS_DIMENSIONS)
        if args.answer == "generate":
            per_task[task]["match_rate"] = mean_ci([float(r["matched"]) for r in recs])
    results = {"command": "tempcompass", "model": args.model, "adapter": args.adapter,
               "data": args.data, "out": args.out, "answer": args.answer, "n": len(items),
               "answered_now": new, "seconds": round(time.monotonic() - start, 3), "tasks": per_task}
    rows = [(task, dim, fmt_ci(v, 3), v["n"]) for task, acc in per_task.items()
            for dim, v in acc.items()]
    table = markdown_table(("task", f"dimension ({args.answer})", "accuracy [95% CI]", "n"), rows)
    return report(results, table, args.results or sibling(args.out, ".results.json"))


def cmd_vidhal(args) -> dict:
    """VidHal (annotations.json, videos/<video>.mp4): caption ordering by the model's sequence
    log-prob of each caption (the scoring path of `rank`), scored by VidHal's NDCG (ties are
    coin flips: the mean NDCG over the orders they allow); and MCQA over the same captions
    shown as options A, B, C (the official prompt and option order) by letter log-prob. Both
    tasks of a video are one item of chain_logps, so its clip is encoded once."""
    vidhal = benchmarks.read_vidhal(args.data, args.options)
    if not vidhal:
        raise SystemExit(f"vidhal: {args.data} holds no videos")
    items = {it.id: (it, benchmark_video(args, args.data, it.line, it.id, "video"))
             for it in vidhal}
    jobs = []
    for rid, (item, video) in items.items():
        where = (args.data, item.line)
        jobs.append({"id": rid, "video": video, "where": where,
                     "prompts": [args.prompt] * len(item.captions) + [item.mcqa_prompt] * len(item.letters),
                     "responses": item.captions + item.letters})

    def to_record(job, logps):
        item = items[job["id"]][0]
        k = len(item.captions)
        caption_lp, letter_lp = logps[:k], logps[k:]
        pred = item.letters[int(np.argmax(letter_lp))]
        return {"id": job["id"], "aspect": item.aspect, "caption_logps": caption_lp.tolist(),
                "ndcg": benchmarks.vidhal_expected_ndcg(caption_lp.tolist()),
                "pairwise": chain_metrics(caption_lp)["pairwise"],
                "mcqa": {"pred": pred, "gold": item.gold,
                         "logps": {c: float(v) for c, v in zip(item.letters, letter_lp)}},
                "mcqa_correct": pred == item.gold}
    new = score_resumable(args, jobs, to_record, "vidhal")
    recs = list(collect_outputs(args.out, items).values())
    results = {"command": "vidhal", "model": args.model, "adapter": args.adapter, "data": args.data,
               "options": args.options, "out": args.out, "n": len(items), "scored_now": new,
               "ndcg": grouped_ci(recs, "aspect", "ndcg"),
               "mcqa_accuracy": grouped_ci(recs, "aspect", "mcqa_correct"),
               "pairwise": grouped_ci(recs, "aspect", "pairwise")}
    rows = [(aspect, fmt_ci(results["ndcg"][aspect], 3), fmt_ci(results["mcqa_accuracy"][aspect], 3),
             results["ndcg"][aspect]["n"]) for aspect in results["ndcg"]]
    table = markdown_table(("aspect", "caption ordering NDCG [95% CI]", "MCQA accuracy [95% CI]", "n"),
                           rows)
    return report(results, table, args.results or sibling(args.out, ".results.json"))


# -- judge-side: captions written by the model, then a judge --------------------------------------

def caption_jobs(args) -> list[tuple[str, str, str]]:
    """(caption id, prompt, video) for `vdc caption` / `argus caption`, every clip checked."""
    if args.command == "vdc":
        dims = vdc_dimensions(args)
        jobs = {}
        for item in benchmarks.read_vdc(args.data, dims):
            path = benchmarks.vdc_path(args.data, item.dimension)
            video = benchmark_video(args, path, item.line, item.video_id, item.video_id)
            jobs[item.id] = (item.id, args.prompt or benchmarks.VDC_PROMPTS[item.dimension], video)
        return list(jobs.values())
    return [(rid, args.prompt or benchmarks.ARGUS_PROMPT,
             benchmark_video(args, args.data, line, rid, "clip_name"))
            for rid, (line, _) in benchmarks.read_argus(args.data).items()]


def cmd_benchmark_captions(args) -> dict:
    return write_captions(args, caption_jobs(args), step="caption")


def vdc_dimensions(args) -> list[str]:
    """--dimensions, else every dimension whose QA file the folder holds."""
    if args.dimensions:
        dims = [d.strip() for d in args.dimensions.split(",") if d.strip()]
        unknown = [d for d in dims if d not in benchmarks.VDC_DIMENSIONS]
        if unknown:
            raise SystemExit(f"vdc: unknown dimension {unknown[0]!r} (one of "
                             f"{', '.join(benchmarks.VDC_DIMENSIONS)})")
        return dims
    found = [d for d in benchmarks.VDC_DIMENSIONS if os.path.exists(benchmarks.vdc_path(args.data, d))]
    if not found:
        raise SystemExit(f"vdc: {args.data} holds none of "
                         f"{', '.join(d + '.jsonl' for d in benchmarks.VDC_DIMENSIONS)}")
    return found


def benchmark_captions(args, ids: Iterable[str]) -> dict[str, str]:
    """The model's captions for the benchmark's ids ({"id", "caption"}, from `<bench> caption`);
    an id without one is an error naming the captions file."""
    found = records_by_id(args.captions, {"caption": str}, allow_empty=True)
    missing = [rid for rid in ids if rid not in found]
    if missing:
        raise DataError(args.captions, None, f"no caption for {len(missing)} of the benchmark's ids "
                        f"(first: {missing[0]!r}); run `{args.command} caption` first", field="id")
    return {rid: found[rid][1]["caption"] for rid in ids}


class LLMBenchmarkJudge:
    """The LLM judge of vdc and argus, over gen_chains' client (any OpenAI-compatible server).
    A rules judge offers the same methods (see benchmark_judge)."""

    def __init__(self, args):
        self.client, self.reask, self.params = ChatClient.from_args(args), args.reask, _chat_params(args)

    def _ask(self, system: str, prompt: str, parse, hint: str, schema: dict | None = None) -> Asked:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return ask_until_parsed(self.client, messages, parse, hint, self.reask + 1, schema=schema, **self.params)

    def _value(self, asked: Asked, what: str):
        if not asked.ok:
            raise RecordFailed(f"unusable {what} reply after {asked.tries} tries: "
                               + "; ".join(asked.problems), details={"reply": asked.reply})
        return asked.value

    def vdc_answer(self, caption: str, question: str) -> str:
        """Step 1 of VDCscore: the question answered from the caption alone."""
        asked = self._ask(VDC_ANSWER_SYSTEM, VDC_ANSWER_PROMPT.format(caption=caption, question=question),
                          parse_short_answer, "Reply again with only a short answer.")
        return self._value(asked, "answer")

    def vdc_grade(self, question: str, answer: str, response: str) -> dict:
        """Step 2: the answer graded against the benchmark's: {"pred": "yes"|"no", "score": 0-5}."""
        asked = self._ask(VDC_GRADE_SYSTEM, VDC_GRADE_PROMPT.format(question=question, answer=answer,
                                                                    response=response) + VDC_GRADE_JSON,
                          parse_vdc_grade, f"Reply again with only the JSON object: {VDC_GRADE_JSON}",
                          VDC_GRADE_SCHEMA)
        return self._value(asked, "grade")

    def argus_lines(self, source: list[str], target: list[str]) -> list[benchmarks.LineJudgement]:
        """Each target line's type, evidence (a source line) and verdict against the source."""
        prompt = ARGUS_NLI_PROMPT.format(
            source="\n".join(f"S{i + 1}: {s}" for i, s in enumerate(source)),
            target="\n".join(f"Line {i + 1}: {t}" for i, t in enumerate(target))) + ARGUS_JSON
        asked = self._ask(ARGUS_NLI_SYSTEM, prompt, partial(parse_argus_lines, len(target), len(source)),
                          f"Reply again with only the JSON object: {ARGUS_JSON}",
                          argus_schema(len(target), len(source)))
        return self._value(asked, "entailment")


def benchmark_judge(args):
    """--judge llm: LLMBenchmarkJudge. --judge rules: the toy world's rules judge for the
    benchmarks (synthetic.benchmark_rules_judge(), with the same methods; it understands the
    questions and captions of `gen_chains.py benchmarks` sets)."""
    if args.judge == "llm":
        return LLMBenchmarkJudge(args)
    import synthetic
    return synthetic.benchmark_rules_judge()


# VDCscore's two prompts, in our words: the official ones (AuroraCap post_eval) ask the same two
# questions (answer from the caption only; yes/no plus a 0-5 match score as a dict).
VDC_ANSWER_SYSTEM = ("You answer questions about a video from a detailed description of it. The "
                     "description is all you know about the video.")
VDC_ANSWER_PROMPT = """Detailed description of the video:
{caption}

Question: {question}

Answer only from the description, as a short sentence or phrase, with no explanation."""
VDC_GRADE_SYSTEM = ("You check whether a predicted answer to a question about a video means the same "
                    "as the correct answer. Synonyms and paraphrases count as matches.")
VDC_GRADE_JSON = '{"pred": "yes" or "no", "score": <integer 0-5>}'
VDC_GRADE_SCHEMA = json_schema("vdc_grade", {"pred": {"type": "string", "enum": ["yes", "no"]},
                                             "score": {"type": "number", "minimum": 0, "maximum": 5}})
VDC_GRADE_PROMPT = """Question: {question}
Correct answer: {answer}
Predicted answer: {response}

Does the predicted answer match the correct answer in meaning? Give "yes" or "no" and a score from
0 (no match) to 5 (a full match). Reply with only this JSON object:
"""


def parse_short_answer(text: str) -> tuple[str | None, list[str]]:
    answer = " ".join((text or "").split())
    return (answer, []) if answer else (None, ["empty"])


def parse_vdc_grade(text: str) -> tuple[dict | None, list[str]]:
    """{"pred": "yes"|"no", "score": 0..5} (the official judge may write 4.8: kept as a number)."""
    obj = parse_json_object(text or "")
    if not isinstance(obj, dict):
        return None, ["no JSON object"]
    pred, score = str(obj.get("pred", "")).strip().lower(), obj.get("score")
    problems = [] if pred in ("yes", "no") else ['"pred" is not "yes" or "no"']
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 5:
        problems.append('"score" is not a number from 0 to 5')
    return ({"pred": pred, "score": float(score)}, []) if not problems else (None, problems)


# ARGUS's line-by-line entailment, in our words. The official prompt (assets/prompts/
# base_prompt.txt, with in-context examples) lets the judge split the target caption and quote
# its evidence, which is then matched back to a source line by string similarity; here both
# captions arrive split into numbered lines and the judge names the evidence line by number.
ARGUS_NLI_SYSTEM = ("You compare two descriptions of the same video line by line. The source "
                    "description is the premise; each target line is a hypothesis.")
ARGUS_JSON = ('{"lines": [{"line": 1, "type": "summary" | "visual-description" | "dynamic-action", '
              '"evidence": <source line number or null>, "verdict": "entailment" | "contradiction" '
              '| "underdetermined"}, ...]}')
ARGUS_NLI_PROMPT = """Source description (premise), one sentence a line:
{source}

Target description (hypotheses), one sentence a line:
{target}

For every target line decide:
- type: "summary" (an overall statement), "visual-description" (a static detail such as a colour or
  a place) or "dynamic-action" (an event, a movement, a change of state or relation);
- evidence: the number of the source line the decision rests on, or null if there is none;
- verdict: "entailment" if the source supports the line (paraphrases, synonyms and minor attribute
  variants count; so does a claim that something stayed the same or did not happen where the source
  is silent), "contradiction" if it conflicts with the source, "underdetermined" if the source
  neither supports nor contradicts it (extra details, unclear which entity or event is meant).

Reply with only this JSON object, one entry per target line in order:
"""


def argus_schema(n_target: int, n_source: int) -> dict:
    """What parse_argus_lines reads: one decision per target line, evidence a source line or null."""
    line = json_schema("argus_line", {
        "line": {"type": "integer", "minimum": 1, "maximum": n_target},
        "type": {"type": "string", "enum": list(benchmarks.ARGUS_TYPES)},
        "evidence": {"type": ["integer", "null"], "minimum": 1, "maximum": n_source},
        "verdict": {"type": "string", "enum": list(benchmarks.ARGUS_VERDICTS)}})["schema"]
    return json_schema("argus_lines", {"lines": {"type": "array", "items": line,
                                                 "minItems": n_target, "maxItems": n_target}})


def parse_argus_lines(n_target: int, n_source: int, text: str):
    """The judge's decisions on n_target lines, checked: every line once, in order, with a known
    type and verdict and an evidence number within the source's lines (or none)."""
    obj = parse_json_object(text or "")
    lines = obj.get("lines") if isinstance(obj, dict) else None
    if not isinstance(lines, list):
        return None, ['no "lines" list']
    if len(lines) != n_target:
        return None, [f"{len(lines)} lines judged, the target has {n_target}"]
    out, problems = [], []
    for i, entry in enumerate(lines, 1):
        entry = entry if isinstance(entry, dict) else {}
        kind = str(entry.get("type", "")).strip().lower()
        verdict = str(entry.get("verdict", "")).strip().lower()
        evidence = entry.get("evidence")
        if kind not in benchmarks.ARGUS_TYPES:
            problems.append(f"line {i}: type {kind!r} is not one of {', '.join(benchmarks.ARGUS_TYPES)}")
        if verdict not in benchmarks.ARGUS_VERDICTS:
            problems.append(f"line {i}: verdict {verdict!r} is not one of "
                            f"{', '.join(benchmarks.ARGUS_VERDICTS)}")
        if isinstance(evidence, str) and re.fullmatch(r"S?\d+", evidence.strip()):
            evidence = int(evidence.strip().lstrip("S"))
        if evidence is not None and (isinstance(evidence, bool) or not isinstance(evidence, int)
                                     or not 1 <= evidence <= n_source):
            problems.append(f"line {i}: evidence {evidence!r} is not a source line 1..{n_source} or null")
            evidence = None
        out.append(benchmarks.LineJudgement(kind, verdict, evidence - 1 if evidence else None))
    return (out, []) if not problems else (None, problems)


def argus_direction(judge, source: str, target: str, order_penalty: float) -> dict:
    """One ARGUS cost: target lines judged against the source. Lines without a claim (headings,
    fragments) are not asked about; like the official code they count as entailed summaries."""
    src, tgt = benchmarks.split_sentences(source), benchmarks.split_sentences(target)
    content = [i for i, t in enumerate(tgt) if benchmarks.is_content_line(t)]
    judged = judge.argus_lines(src, [tgt[i] for i in content]) if content else []
    lines = [benchmarks.LineJudgement("summary", "entailment") for _ in tgt]
    for i, j in zip(content, judged):
        lines[i] = j
    cost = benchmarks.argus_cost(lines, len(src), order_penalty)
    return {"cost": cost.normalized, "raw_cost": cost.cost, "max_cost": cost.max_cost,
            "path": cost.path, "source": src,
            "lines": [{"text": t, "type": j.type, "verdict": j.verdict, "evidence": j.evidence}
                      for t, j in zip(tgt, lines)]}


def cmd_benchmark_score(args) -> dict:
    """vdc score / argus score: the captions of `<bench> caption` through the judge."""
    judge = benchmark_judge(args)
    if args.command == "vdc":
        items = {it.id: it for it in benchmarks.read_vdc(args.data, vdc_dimensions(args))}
        captions = benchmark_captions(args, items)

        def score_one(job):
            item, caption = items[job["id"]], captions[job["id"]]
            graded = []
            for pair in item.qa:
                response = judge.vdc_answer(caption, pair["question"])
                graded.append({**pair, "response": response,
                               **judge.vdc_grade(pair["question"], pair["answer"], response)})
            return {"id": item.id, "dimension": item.dimension, "video_id": item.video_id,
                    **benchmarks.vdc_video_score(graded), "qa": graded}
    else:
        rows = benchmarks.read_argus(args.data)
        captions = benchmark_captions(args, rows)

        def score_one(job):
            human, model = rows[job["id"]][1]["human_caption"], captions[job["id"]]
            if not benchmarks.split_sentences(model):
                raise RecordFailed("the model's caption is empty")
            hallucination = argus_direction(judge, human, model, args.order_penalty)
            omission = argus_direction(judge, model, human, args.order_penalty)
            return {"id": job["id"], "cost_h": hallucination["cost"], "cost_o": omission["cost"],
                    "hallucination": hallucination, "omission": omission}
    jobs = [{"id": rid} for rid in captions]
    run = map_resumable(jobs, score_one, args.out, args.concurrency if args.judge == "llm" else 1,
                        desc=f"{args.command} ({args.judge})", drop_failed=args.retry_failed,
                        **client_progress(getattr(judge, "client", None)))
    done = collect_outputs(args.out, captions)
    scored = [r for r in done.values() if r.get("status") != "failed"]
    results = {"command": args.command, "step": "score", "judge": args.judge, "data": args.data,
               "captions": args.captions, "out": args.out, "n": len(jobs), "n_scored": len(scored),
               **failure_summary(done.values()), "run": with_client_report(run, getattr(judge, "client", None))}
    if args.command == "vdc":
        results["accuracy"] = grouped_ci(scored, "dimension", "accuracy", benchmarks.VDC_DIMENSIONS)
        results["score"] = grouped_ci(scored, "dimension", "score", benchmarks.VDC_DIMENSIONS)
        rows_out = [(dim, fmt_ci(results["accuracy"][dim], 3), fmt_ci(results["score"][dim]),
                     results["accuracy"][dim]["n"]) for dim in results["accuracy"]]
        table = markdown_table(("dimension", "VDC accuracy [95% CI]", "VDC score 0-5 [95% CI]", "videos"),
                               rows_out)
    else:
        results["order_penalty"] = args.order_penalty
        results["ArgusCost-H"] = mean_ci([r["cost_h"] for r in scored])
        results["ArgusCost-O"] = mean_ci([r["cost_o"] for r in scored])
        table = markdown_table(("measure (lower is better)", "mean [95% CI]", "clips"),
                               [(m, fmt_ci(results[m], 3), results[m]["n"])
                                for m in ("ArgusCost-H", "ArgusCost-O")])
    if results["n_failed"]:
        table += f"\n\n{results['n_failed']} of {len(jobs)} could not be scored (see {args.out})"
    return report(results, table, args.results or sibling(args.out, ".results.json"))


def cmd_benchmark_two_steps(args) -> dict:
    return cmd_benchmark_captions(args) if args.step == "caption" else cmd_benchmark_score(args)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def results_arg(sp, default: str):
        sp.add_argument("--results", default=None, help=f"results JSON (default: {default})")

    def model_args(sp, data_help: str | None = None,
                   video_help: str = "videos are relative to this (default: the data file's folder)"):
        sp.add_argument("--model", default="tiny",
                        help="'tiny' (embedded, the default), a local path or hub name")
        sp.add_argument("--adapter", default=None, help="adapter directory saved by rank_dpo.py")
        sp.add_argument("--data", required=True, help=data_help)
        sp.add_argument("--video_root", default=None, help=video_help)
        from rank_dpo import add_attention_flag, add_video_flags   # one definition of each
        add_video_flags(sp, from_run=True)
        add_attention_flag(sp, from_run=True)
        sp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        sp.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the loader's choice)")

    def judge_args(sp, default="rules", max_tokens=512,
                   rules="offline, from the synthetic set's stored facts"):
        sp.add_argument("--judge", choices=("rules", "llm"), default=default,
                        help=f"rules: {rules}; llm: an OpenAI-compatible server (--base_url, "
                             f"--model); default {default}")
        sp.add_argument("--reask", type=int, default=2, help="re-asks after an unusable judge reply")
        sp.add_argument("--max_tokens", type=int, default=max_tokens, help="judge reply length limit")
        llm_args(sp)

    def llm_args(sp):
        sp.add_argument("--retry_failed", action="store_true",
                        help="retry records that failed in an earlier run")
        add_client_args(sp)
        sp.set_defaults(temperature=0.0)  # a judge should be repeatable

    sp = sub.add_parser("generate", help="greedy captions, one per video (resumable)")
    model_args(sp)
    sp.add_argument("--out", required=True, help="captions JSONL: {id, caption}")
    sp.add_argument("--prompt", default=None,
                    help=f"default: the record's prompt, else {DEFAULT_PROMPT!r}")
    sp.add_argument("--batch_size", type=int, default=8)
    sp.add_argument("--max_new_tokens", type=int, default=128)
    results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("sample", help="N sampled responses per video / question (resumable)")
    model_args(sp)
    sp.add_argument("--out", required=True,
                    help="samples JSONL: {id, video?, prompt | question, caption?, answers: [N]}")
    sp.add_argument("--num_samples", type=int, default=4, help="responses per record")
    sp.add_argument("--temperature", type=float, default=1.0, help="0: greedy (one response)")
    sp.add_argument("--top_p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (per record: hash of seed + id)")
    sp.add_argument("--prompt", default=None,
                    help=f"for records without a question: default the record's prompt, else {DEFAULT_PROMPT!r}")
    sp.add_argument("--max_new_tokens", type=int, default=128)
    results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("judge", help="score captions against references on four axes")
    sp.add_argument("--pred", required=True, help="captions JSONL: {id, caption}")
    sp.add_argument("--ref", required=True,
                    help="references: {id, caption} (llm) or {id, facts} (rules)")
    sp.add_argument("--out", required=True, help="scores JSONL: {id, scores: {axis: 1-10}}")
    judge_args(sp)
    add_frame_args(sp, "each judge request (--judge llm; the --ref record's video)")
    results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("agree", help="Spearman correlation per axis between two score files")
    sp.add_argument("--a", required=True)
    sp.add_argument("--b", required=True)
    results_arg(sp, "<a>.agree.results.json")

    sp = sub.add_parser("compare", help="head-to-head win/tie/loss of captions A against B")
    sp.add_argument("--a", required=True)
    sp.add_argument("--b", required=True)
    sp.add_argument("--ref", required=True)
    sp.add_argument("--out", default=None, help="verdicts JSONL (default: <a>.vs.<b>.compare.jsonl)")
    judge_args(sp)
    add_frame_args(sp, "each judge request (--judge llm; the --ref record's video)")
    results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("mcq", help="multiple-choice accuracy by answer-letter log-probability")
    model_args(sp)
    sp.add_argument("--out", default=None, help="per-item predictions JSONL (optional)")
    results_arg(sp, "<data>.mcq.results.json")

    sp = sub.add_parser("rank", help="how well the model's log-probs order held-out chains")
    model_args(sp)
    sp.add_argument("--ref_adapter", default=None,
                    help="reference for the implicit reward (default: the adapter's --init warm "
                         "start if it had one, else the base model; 'none' = the base model)")
    sp.add_argument("--out", default=None, help="per-chain scores JSONL (optional)")
    results_arg(sp, "<data>.rank.results.json")

    def benchmark_model_args(sp, data_help: str):
        model_args(sp, data_help, "folder of the clips (default: <benchmark folder>/videos)")
        sp.set_defaults(benchmark_videos=True)

    sp = sub.add_parser("tempcompass", help="TempCompass multi-choice, yes/no and caption matching")
    benchmark_model_args(sp, "the TempCompass folder (questions/<task>.json, videos/)")
    sp.add_argument("--tasks", default=",".join(benchmarks.TEMPCOMPASS_TASKS),
                    help="comma-separated, of: " + ", ".join(benchmarks.TEMPCOMPASS_TASKS))
    sp.add_argument("--answer", choices=("logprob", "generate"), default="logprob",
                    help="logprob: the option label with the highest log-prob (default); generate: "
                         "greedy reply matched to an option by the official rules")
    sp.add_argument("--out", required=True, help="per-question JSONL (resumable; one --answer per file)")
    sp.add_argument("--batch_size", type=int, default=8, help="--answer generate: prompts per batch")
    sp.add_argument("--max_new_tokens", type=int, default=32, help="--answer generate: reply length")
    results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("vidhal", help="VidHal caption ordering (NDCG) and MCQA by log-probs")
    benchmark_model_args(sp, "VidHal's annotations.json (clips in videos/ beside it)")
    sp.add_argument("--options", default=None,
                    help="the benchmark's option-order file {video: {A: rank, ...}} (default: a "
                         "fixed per-video shuffle)")
    sp.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt the captions are scored under")
    sp.add_argument("--out", required=True, help="per-video JSONL (resumable)")
    results_arg(sp, "<out>.results.json")

    for name, data_help, what in (
            ("vdc", "the VDC folder (<dimension>.jsonl QA files, videos/)", "VDC: captions per "
             "dimension, then VDCscore (QA accuracy and 0-5 score) by a judge"),
            ("argus", "the ARGUS table: JSONL or a JSON list of {clip_name, human_caption} (clips "
             "in videos/ beside it)", "ARGUS: captions, then ArgusCost-H / ArgusCost-O by a judge")):
        bench = sub.add_parser(name, help=what)
        steps = bench.add_subparsers(dest="step", required=True)
        sp = steps.add_parser("caption", help="the model writes the captions (resumable, batched)")
        benchmark_model_args(sp, data_help)
        sp.add_argument("--out", required=True, help="captions JSONL: {id, caption}")
        sp.add_argument("--prompt", default=None, help="default: the benchmark's own prompt")
        sp.add_argument("--batch_size", type=int, default=8)
        sp.add_argument("--max_new_tokens", type=int, default=512)
        if name == "vdc":
            sp.add_argument("--dimensions", default=None,
                            help="comma-separated (default: every <dimension>.jsonl in --data)")
        results_arg(sp, "<out>.results.json")
        sp = steps.add_parser("score", help="score the captions with a judge")
        sp.add_argument("--data", required=True, help=data_help)
        sp.add_argument("--captions", required=True, help=f"captions JSONL from `{name} caption`")
        sp.add_argument("--out", required=True, help="per-item scores JSONL (resumable)")
        judge_args(sp, default="llm", max_tokens=1024,
                   rules="the toy world's rules judge, where it has one")
        if name == "vdc":
            sp.add_argument("--dimensions", default=None,
                            help="comma-separated (default: every <dimension>.jsonl in --data)")
        else:
            sp.add_argument("--order_penalty", type=float, default=benchmarks.ARGUS_ORDER_PENALTY,
                            help="cost per pair of events told in reverse order (official: 0.1)")
        results_arg(sp, "<out>.results.json")

    sp = sub.add_parser("reward", help="LM reward of QA answers with the caption as evidence")
    sp.add_argument("--data", required=True,
                    help="QA JSONL: {id, question, answer, caption? | caption_id?}")
    sp.add_argument("--captions", default=None, help="captions JSONL: {id, caption}")
    sp.add_argument("--out", required=True, help="rewards JSONL: {id, verdict, score, ...}")
    llm_args(sp)
    results_arg(sp, "<out>.results.json")
    return p


COMMANDS = {"generate": cmd_generate, "sample": cmd_sample, "judge": cmd_judge, "agree": cmd_agree, "compare": cmd_head_to_head,
            "mcq": cmd_mcq, "rank": cmd_rank, "reward": cmd_reward, "tempcompass": cmd_tempcompass,
            "vidhal": cmd_vidhal, "vdc": cmd_benchmark_two_steps, "argus": cmd_benchmark_two_steps}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if getattr(args, "data", None) and hasattr(args, "video_root") and args.video_root is None:
        if getattr(args, "benchmark_videos", False):   # a benchmark's clips: <folder>/videos
            folder = args.data if os.path.isdir(args.data) else os.path.dirname(os.path.abspath(args.data))
            args.video_root = os.path.join(folder, "videos")
        else:
            args.video_root = os.path.dirname(os.path.abspath(args.data))
    if hasattr(args, "device") and args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return COMMANDS[args.command](args)
    except (DataError, OutputLocked) as e:
        raise SystemExit(f"error: {e}") from None
    except (ImportError, ValueError) as e:
        # The trainer's errors (a missing optional package, an unusable model directory) can only
        # come from a command that imported it; the judge-only commands never load torch.
        trainer = sys.modules.get("rank_dpo")
        if trainer and isinstance(e, (trainer.MissingDependency, trainer.ModelError)):
            raise SystemExit(f"error: {e}") from None
        raise


if __name__ == "__main__":
    main()
