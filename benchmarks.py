"""benchmarks.py: published video benchmarks, read as their authors ship them, and their metrics.

One role: the file formats and the scoring rules of VDC, ARGUS, TempCompass and VidHal, as pure
functions (no model, no LLM, no torch), so every number can be checked by hand. eval_judge.py
runs the model and the LLM judge and calls into this file.

    TempCompass  questions/{multi-choice,yes_no,caption_matching}.json   (llyx97/TempCompass)
                 {video_id: {dimension: [{"question", "answer"}]}}; videos/<video_id>.mp4, the
                 reversed clips as videos/<video_id>_reverse.mp4
    VidHal       vidhal/annotations.json: [{"video", "captions": {"1": best, "2", "3": worst},
                 "aspect", "dataset"}]; videos/<video>.mp4; an optional option-order file
                 {video: {"A": "2", "B": "1", "C": "3"}}                      (Lookuz/VidHal)
    VDC          <dimension>.jsonl, one line per video {video_id: [{"question", "answer",
                 "category"}]}, dimension in short/detailed/camera/background/main_object;
                 videos/<video_id>.mp4                       (rese1f/aurora, post_eval/)
    ARGUS        records {"clip_name", "human_caption"} (the tomg-group-umd/argus table as JSONL
                 or a JSON list); videos/<clip_name>.mp4                    (JARVVVIS/argus)

Errors in these files are records.DataError naming file, line and field (for a JSON document,
the line where the offending entry starts).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import string
from dataclasses import dataclass, field

from records import DataError, read_jsonl

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")


def find_video(folder: str, name: str) -> str | None:
    """<folder>/<name>.mp4 (or .MP4/.mkv/.webm, as the benchmarks' own readers try), else None."""
    for suffix in VIDEO_SUFFIXES:
        path = os.path.join(folder, name + suffix)
        if os.path.exists(path):
            return path
    return None


def load_json_document(path: str) -> tuple[object, str]:
    """A whole JSON file and its text (the text gives entries a line number in errors)."""
    if not os.path.exists(path):
        raise DataError(path, None, "file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None


def line_of(text: str, needle: str, start_line: int = 1) -> int | None:
    """The first line at or after start_line that holds `needle` (None when absent)."""
    for number, line in enumerate(text.splitlines()[start_line - 1:], start=start_line):
        if needle in line:
            return number
    return None


def stable_shuffle(items: list, key: str) -> list:
    """`items` in an order fixed by `key` (sha256), the same on every machine and run."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{key}:{x}".encode()).hexdigest())


# =============================================================================================
# TempCompass: multi-choice, yes/no and caption matching (one format, one reader)
# =============================================================================================

TEMPCOMPASS_TASKS = ("multi-choice", "yes_no", "caption_matching")
TEMPCOMPASS_DIMENSIONS = ("action", "speed", "direction", "order", "attribute_change")
# What the official inference scripts append to each question before the model answers.
TEMPCOMPASS_ANSWER_PROMPT = {"multi-choice": "\nPlease directly give the best option:",
                             "yes_no": "\nPlease answer yes or no:",
                             "caption_matching": "\nPlease directly give the best option:"}
_MC_OPTION = re.compile(r"^([A-Z])\.\s+(.*\S)\s*$")
_CM_OPTION = re.compile(r"^((?:Caption|Sentence|Option)\s+\w+):\s+(.*\S)\s*$")


@dataclass
class TempCompassItem:
    id: str                      # "<video_id>/<dimension>/<k>"
    video_id: str
    dimension: str
    task: str
    question: str
    answer: str                  # as published: "B. text", "yes", "Caption A: text"
    labels: list[str]            # what the model may answer: "A", "B"; "Caption A", ...; "yes", "no"
    texts: list[str]             # the option texts, aligned with labels
    gold: str                    # the label of the right answer
    line: int | None = None      # where the question sits in its file

    @property
    def prompt(self) -> str:
        return self.question + TEMPCOMPASS_ANSWER_PROMPT[self.task]

    @property
    def responses(self) -> list[str]:
        """The response scored for each label by log-probability: the label itself (the
        LF-MCQA rule), "Yes"/"No" as a chat model starts its answer."""
        return ["Yes", "No"] if self.task == "yes_no" else list(self.labels)


def tempcompass_path(folder: str, task: str) -> str:
    return os.path.join(folder, "questions", f"{task}.json")


def read_tempcompass(folder: str, task: str) -> list[TempCompassItem]:
    """Every question of one task, checked: a dimension TempCompass knows, a question whose
    options parse, an answer that is one of them."""
    if task not in TEMPCOMPASS_TASKS:
        raise ValueError(f"unknown TempCompass task {task!r} (one of {', '.join(TEMPCOMPASS_TASKS)})")
    path = tempcompass_path(folder, task)
    doc, text = load_json_document(path)
    if not isinstance(doc, dict):
        raise DataError(path, 1, "expected an object {video_id: {dimension: [questions]}}")
    items = []
    for video_id, dims in doc.items():
        where = line_of(text, json.dumps(video_id))
        if not isinstance(dims, dict):
            raise DataError(path, where, "expected an object {dimension: [questions]}", field=video_id)
        for dim, questions in dims.items():
            dim_line = line_of(text, json.dumps(dim), where or 1) or where
            name = f"{video_id}.{dim}"
            if dim not in TEMPCOMPASS_DIMENSIONS:
                raise DataError(path, dim_line, f"unknown dimension (one of "
                                f"{', '.join(TEMPCOMPASS_DIMENSIONS)})", field=name)
            if not isinstance(questions, list):
                raise DataError(path, dim_line, "expected a list of questions", field=name)
            for k, q in enumerate(questions):
                field_name = f"{name}[{k}]"
                q_line = (line_of(text, json.dumps(q.get("question", ""))[1:-1], dim_line or 1)
                          if isinstance(q, dict) and isinstance(q.get("question"), str) else dim_line)
                items.append(_tempcompass_item(path, q_line, field_name, task, video_id, dim, k, q))
    return items


def _tempcompass_item(path, line, name, task, video_id, dim, k, q) -> TempCompassItem:
    if not isinstance(q, dict):
        raise DataError(path, line, "expected an object {question, answer}", field=name)
    for key in ("question", "answer"):
        if not isinstance(q.get(key), str) or not q[key].strip():
            raise DataError(path, line, "missing or not a non-empty string", field=f"{name}.{key}")
    question, answer = q["question"], q["answer"].strip()
    if task == "yes_no":
        if answer.lower() not in ("yes", "no"):
            raise DataError(path, line, f"expected 'yes' or 'no', got {answer!r}", field=f"{name}.answer")
        labels, texts, gold = ["yes", "no"], ["yes", "no"], answer.lower()
    else:
        pattern = _MC_OPTION if task == "multi-choice" else _CM_OPTION
        options = [m.groups() for m in map(pattern.match, question.split("\n")[1:]) if m]
        if len(options) < 2:
            raise DataError(path, line, "fewer than two options in the question's lines "
                            f"({'A. text' if task == 'multi-choice' else 'Caption A: text'})",
                            field=f"{name}.question")
        labels, texts = [o[0] for o in options], [o[1] for o in options]
        gold = next((lab for lab, txt in options
                     if answer in (f"{lab}. {txt}", f"{lab}: {txt}", lab)), None)
        if gold is None:
            raise DataError(path, line, f"{answer!r} is none of the question's options",
                            field=f"{name}.answer")
    return TempCompassItem(f"{video_id}/{dim}/{k}", video_id, dim, task, question, answer,
                           labels, texts, gold, line)


def match_tempcompass_answer(item: TempCompassItem, reply: str) -> str | None:
    """The label a generated reply picks, by the official scripts' matching rules, or None when
    no rule matches (the official scripts then ask gpt-3.5-turbo; we count it wrong, as their
    --disable_llm mode does).

    yes/no: the reply starts with yes or no (any case). multi-choice: the whole answer, a bare
    letter, or a reply starting "B." or "B)". caption matching: a whole option line, an option's
    sentence (also after a "(x) " prefix), or an option label ("Caption A", also with a dot)."""
    reply = reply.replace("</s>", "").strip()
    if item.task == "yes_no":
        low = reply.lower()
        return "yes" if low.startswith("yes") else "no" if low.startswith("no") else None
    if item.task == "multi-choice":
        if reply == item.answer:
            return item.gold
        m = re.match(r"^([A-Z])(?:$|[.)])", reply)
        return m.group(1) if m and m.group(1) in item.labels else None
    for label, text in zip(item.labels, item.texts):
        sentence = reply.split(") ", 1)[1] if ") " in reply else None
        if reply in (f"{label}: {text}", text, label, label + ".") or sentence == text:
            return label
    return None


# =============================================================================================
# VidHal: caption ordering (NDCG) and multiple choice over captions of graded hallucination
# =============================================================================================

# The official MCQA instructions (pipelines/inference/base.py), in one user turn.
VIDHAL_MCQA_PROMPT = (
    "You are provided with a video and a set of several captions. Your task is to watch the video "
    "provided carefully, and select the caption that best describes the video. Provide your answer "
    "only as a single letter representing the option whose caption that best describes the video, "
    "without any explanation.\nWatch the video provided, and choose the option whose caption "
    "describes the video most accurately.\n{options}")


@dataclass
class VidHalItem:
    id: str                      # the video name
    aspect: str
    captions: list[str]          # best first: captions["1"], captions["2"], ...
    order: list[int]             # display order: option letter i shows captions[order[i]]
    line: int | None = None

    @property
    def letters(self) -> list[str]:
        return list(string.ascii_uppercase[:len(self.captions)])

    @property
    def gold(self) -> str:
        return self.letters[self.order.index(0)]

    @property
    def mcqa_prompt(self) -> str:
        options = "\n".join(f"{letter}. {self.captions[rank]}"
                            for letter, rank in zip(self.letters, self.order))
        return VIDHAL_MCQA_PROMPT.format(options=options)


def read_vidhal(path: str, options_path: str | None = None) -> list[VidHalItem]:
    """annotations.json, checked: each entry a video name, an aspect and captions keyed "1".."K"
    (K >= 2, "1" the best). The option letters follow the options file when given (the
    benchmark's fixed random order), else a per-video order fixed by the video name."""
    doc, text = load_json_document(path)
    if not isinstance(doc, list):
        raise DataError(path, 1, "expected a list of {video, captions, aspect}")
    orders = read_vidhal_options(options_path) if options_path else {}
    items, seen, line = [], set(), 1
    for k, entry in enumerate(doc):
        name = f"[{k}]"
        video = entry.get("video") if isinstance(entry, dict) else None
        line = (line_of(text, f'"video": {json.dumps(video)}', line) or line) if isinstance(video, str) else line
        if not isinstance(entry, dict):
            raise DataError(path, line, "expected an object {video, captions, aspect}", field=name)
        if not isinstance(video, str) or not video:
            raise DataError(path, line, "missing or not a non-empty string", field=f"{name}.video")
        if video in seen:
            raise DataError(path, line, f"duplicate video {video!r}", field=f"{name}.video")
        seen.add(video)
        caps = entry.get("captions")
        if not isinstance(caps, dict) or len(caps) < 2 or \
                sorted(caps) != [str(i) for i in range(1, len(caps) + 1)] or \
                not all(isinstance(c, str) and c.strip() for c in caps.values()):
            raise DataError(path, line, 'expected {"1": best caption, "2": ..., ...}: at least two '
                            "non-empty captions keyed 1..K", field=f"{name}.captions")
        aspect = entry.get("aspect")
        if not isinstance(aspect, str) or not aspect:
            raise DataError(path, line, "missing or not a non-empty string", field=f"{name}.aspect")
        captions = [caps[str(i)] for i in range(1, len(caps) + 1)]
        if video in orders:
            order = orders[video][1]
            if sorted(order) != list(range(len(captions))):
                raise DataError(options_path, orders[video][0], f"the options of {video!r} do not "
                                f"cover ranks 1..{len(captions)}", field=video)
        else:
            order = stable_shuffle(list(range(len(captions))), video)
        items.append(VidHalItem(video, aspect, captions, order, line))
    return items


def read_vidhal_options(path: str) -> dict[str, tuple[int | None, list[int]]]:
    """{video: {"A": "2", "B": "1", ...}} -> {video: (line, [rank index shown as A, as B, ...])}."""
    doc, text = load_json_document(path)
    if not isinstance(doc, dict):
        raise DataError(path, 1, 'expected {video: {"A": "<rank>", ...}}')
    out = {}
    for video, letters in doc.items():
        line = line_of(text, json.dumps(video))
        if not isinstance(letters, dict) or not all(
                isinstance(v, (str, int)) and str(v).isdigit() for v in letters.values()):
            raise DataError(path, line, 'expected {"A": "<rank>", ...}', field=video)
        ranks = [int(letters[k]) - 1 for k in sorted(letters)]
        out[video] = (line, ranks)
    return out


def dcg(relevance: list[float]) -> float:
    """Discounted cumulative gain: sum of rel_i / log2(i + 2) over positions i = 0, 1, ..."""
    return sum(r / math.log2(i + 2) for i, r in enumerate(relevance))


def vidhal_ndcg(predicted: list[int]) -> float:
    """NDCG of a predicted order as VidHal normalises it: `predicted` lists the true ranks
    (0 = the best caption) in the order the model put them. A caption of rank r has relevance
    K - r; the DCG is rescaled so the reversed order scores 0 and the right order 1."""
    k = len(predicted)
    if sorted(predicted) != list(range(k)) or k < 2:
        raise ValueError(f"expected a permutation of 0..{k - 1}, got {predicted}")
    ideal = dcg([k - r for r in range(k)])
    worst = dcg([k - r for r in reversed(range(k))])
    return (dcg([k - r for r in predicted]) - worst) / (ideal - worst)


def vidhal_expected_ndcg(scores: list[float]) -> float:
    """The NDCG of ordering captions (best first in `scores`' index order) by score, highest
    first. Tied scores are coin flips: the mean NDCG over every order the ties allow, so a
    scorer that cannot tell captions apart gets chance, not the right order."""
    groups: dict[float, list[int]] = {}
    for rank, s in enumerate(scores):
        groups.setdefault(s, []).append(rank)
    ordered = [groups[s] for s in sorted(groups, reverse=True)]
    orders = [[]]
    for tied in ordered:
        orders = [o + list(p) for o in orders for p in itertools.permutations(tied)]
    return sum(vidhal_ndcg(o) for o in orders) / len(orders)


# =============================================================================================
# VDC: per-dimension captions, then the QA-based VDCscore
# =============================================================================================

VDC_DIMENSIONS = ("short", "detailed", "camera", "background", "main_object")
# The first of each dimension's caption prompts in the benchmark's lmms-eval task (the official
# task draws one at random per video; a fixed one keeps runs comparable).
VDC_PROMPTS = {
    "short": "Write a one-sentence summary of the video.",
    "detailed": "Please imagine the video based on the sequence of frames, and provide a "
                "faithfully detailed description of this video in more than three sentences.",
    "camera": "Summary of the view shot, camera movement and changes in shooting angles in the "
              "sequence of video frames.",
    "background": "Summary of the background. This should also include the objects, location, "
                  "weather, and time.",
    "main_object": "Description of the main subject actions or status sequence. This suggests "
                   "including the main subjects (person, object, animal, or none) and their "
                   "attributes, their action, their position, and movements during the video frames.",
}


@dataclass
class VdcItem:
    id: str                      # "<dimension>/<video_id>"
    video_id: str
    dimension: str
    qa: list[dict]               # [{"question", "answer"}]
    line: int


def vdc_path(folder: str, dimension: str) -> str:
    return os.path.join(folder, f"{dimension}.jsonl")


def read_vdc(folder: str, dimensions: list[str]) -> list[VdcItem]:
    """The QA files of the given dimensions: each line one object {video_id: [{"question",
    "answer", "category"?}, ...]} (several videos on one line are allowed)."""
    items = []
    for dim in dimensions:
        if dim not in VDC_DIMENSIONS:
            raise ValueError(f"unknown VDC dimension {dim!r} (one of {', '.join(VDC_DIMENSIONS)})")
        path, seen = vdc_path(folder, dim), set()
        if not os.path.exists(path):
            raise DataError(path, None, "file not found (the benchmark's QA file for this dimension)")
        for line, rec in read_jsonl(path):
            for video_id, qa in rec.items():
                if video_id in seen:
                    raise DataError(path, line, f"duplicate video id {video_id!r}", field=video_id)
                seen.add(video_id)
                if not isinstance(qa, list) or not qa:
                    raise DataError(path, line, "expected a non-empty list of {question, answer}",
                                    field=video_id)
                for k, pair in enumerate(qa):
                    ok = isinstance(pair, dict) and all(isinstance(pair.get(key), str)
                                                        for key in ("question", "answer"))
                    if not ok:
                        raise DataError(path, line, "expected {question: string, answer: string}",
                                        field=f"{video_id}[{k}]")
                items.append(VdcItem(f"{dim}/{video_id}", video_id, dim,
                                     [{"question": p["question"], "answer": p["answer"]} for p in qa],
                                     line))
    return items


def vdc_video_score(graded: list[dict]) -> dict:
    """One video's VDCscore from its graded questions [{"pred": "yes"|"no", "score": 0-5}]:
    accuracy = share of "yes", score = mean score."""
    if not graded:
        raise ValueError("no graded questions")
    return {"accuracy": sum(g["pred"] == "yes" for g in graded) / len(graded),
            "score": sum(float(g["score"]) for g in graded) / len(graded)}


# =============================================================================================
# ARGUS: hallucination and omission costs from line-by-line entailment
# =============================================================================================

ARGUS_PROMPT = "Describe the video in great detail."      # the official captioning prompt
ARGUS_TYPES = ("summary", "visual-description", "dynamic-action")
ARGUS_VERDICTS = ("entailment", "contradiction", "underdetermined")
ARGUS_ORDER_PENALTY = 0.1                                   # the official default
_MIN_SENTENCE_CHARS = 20


def read_argus(path: str) -> dict[str, tuple[int, dict]]:
    """The ARGUS table, {clip_name: (line, {"clip_name", "human_caption"})}, from JSONL or one
    JSON list; every clip named once, with a caption of at least one sentence."""
    if path.endswith(".json"):
        doc, text = load_json_document(path)
        if not isinstance(doc, list):
            raise DataError(path, 1, "expected a list of {clip_name, human_caption}")
        rows, line = [], 1
        for rec in doc:
            name = rec.get("clip_name") if isinstance(rec, dict) else None
            line = (line_of(text, json.dumps(name), line) or line) if isinstance(name, str) else line
            rows.append((line, rec))
    else:
        if not os.path.exists(path):
            raise DataError(path, None, "input file not found")
        rows = list(read_jsonl(path))
    out: dict[str, tuple[int, dict]] = {}
    for line, rec in rows:
        if not isinstance(rec, dict):
            raise DataError(path, line, "expected an object {clip_name, human_caption}")
        name, caption = rec.get("clip_name"), rec.get("human_caption")
        if not isinstance(name, str) or not name:
            raise DataError(path, line, "missing or not a non-empty string", field="clip_name")
        if name in out:
            raise DataError(path, line, f"duplicate clip {name!r} (first on line {out[name][0]})",
                            field="clip_name")
        if not isinstance(caption, str) or not split_sentences(caption):
            raise DataError(path, line, "expected a string with at least one sentence",
                            field="human_caption")
        out[name] = (line, rec)
    return out


def split_sentences(text: str) -> list[str]:
    """Caption -> lines the way ARGUS splits both captions: after . ! ? followed by a capital,
    after semicolons, at list bullets and numbers; a piece shorter than 20 characters is joined
    to the next one, so fragments ("Yes.", "1.") do not become lines of their own."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"([.!?])\s+([A-Z])", r"\1\n\2", text)
    text = re.sub(r";\s+", ";\n", text)
    text = re.sub(r"(?m)^\s*(?:[-•*]|\d+[.)])\s+", "\n", text)
    pieces = [p.strip() for p in text.split("\n") if p.strip()]
    lines: list[str] = []
    for piece in pieces:
        if lines and len(lines[-1]) < _MIN_SENTENCE_CHARS:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
    return lines


def is_content_line(line: str) -> bool:
    """False for a line that carries no claim: under three words, or a bold heading ("**Scene**:"),
    which ARGUS scores as a free summary line."""
    words = re.sub(r"\*+", "", line).split()
    return len(words) >= 3 and not re.fullmatch(r"\s*\*\*[^*]+\*\*\s*:?\s*", line)


@dataclass
class LineJudgement:
    """The judge's decision on one target line: its type, the source line it rests on (0-based;
    None when it gave none) and the verdict."""
    type: str
    verdict: str
    evidence: int | None = None


@dataclass
class ArgusCost:
    cost: float                  # the optimal alignment cost
    max_cost: float
    normalized: float            # cost / max_cost: ArgusCost-H or -O, 0 (best) .. 1
    path: list[int] = field(default_factory=list)   # the source line each target line is aligned to


def argus_cost(lines: list[LineJudgement], n_sources: int,
               order_penalty: float = ARGUS_ORDER_PENALTY) -> ArgusCost:
    """ARGUS's alignment cost of target lines against n_sources source lines.

    A line costs 1 unless entailed; an entailed summary or visual description costs 0 wherever it
    is aligned, an entailed dynamic action 0 only at its evidence line. Aligning an entailed
    action before (at a lower source line than) an entailed action told earlier adds
    `order_penalty` per such earlier action. A dynamic programme over (target line, source
    line) keeps, for each cell, the cheapest path into it (as the official implementation does:
    the path decides later penalties, so this is its greedy optimum, not an exhaustive one).
    Normalised by the largest cost the lines could have: 1 per line that is not an entailed
    action, plus the penalty for every pair of entailed actions told in reverse.
    """
    if n_sources < 1 or not lines:
        raise ValueError("argus_cost needs at least one source line and one target line")

    def action(j: int) -> bool:
        return lines[j].type == "dynamic-action" and lines[j].verdict == "entailment"

    def base(i: int, s: int) -> float:
        line = lines[i]
        if line.verdict != "entailment":
            return 1.0
        return 0.0 if line.type != "dynamic-action" or line.evidence == s else 1.0

    # cost[s] / path[s]: the cheapest alignment of the lines so far whose last line sits at s
    cost = [base(0, s) for s in range(n_sources)]
    path = [[s] for s in range(n_sources)]
    for i in range(1, len(lines)):
        new_cost, new_path = [], []
        for s in range(n_sources):
            best, best_path = math.inf, []
            for prev in range(n_sources):
                earlier = path[prev]
                penalty = order_penalty * sum(1 for j, at in enumerate(earlier) if action(j) and at > s) \
                    if action(i) else 0.0
                total = cost[prev] + base(i, s) + penalty
                if total < best:
                    best, best_path = total, earlier + [s]
            new_cost.append(best)
            new_path.append(best_path)
        cost, path = new_cost, new_path
    end = min(range(n_sources), key=lambda s: cost[s])
    n_actions = sum(action(j) for j in range(len(lines)))
    max_cost = (len(lines) - n_actions) + order_penalty * n_actions * (n_actions - 1) / 2
    # Every line an entailed action with its evidence found: nothing can go wrong, cost 0
    # (the official code divides 0 by 0 there).
    normalized = cost[end] / max_cost if max_cost > 0 else (0.0 if cost[end] == 0 else 1.0)
    return ArgusCost(cost[end], max_cost, min(normalized, 1.0), path[end])
