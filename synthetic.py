#!/usr/bin/env python3
"""synthetic.py: the embedded toy world, kept apart from the real tools.

Everything here exists so that the whole method runs offline, on CPU, with nothing downloaded:

  scenes      coloured shapes that appear, move and disappear: facts, frames, a gold caption
  matcher     which facts a caption states rightly or wrongly (`match_facts`)
  rules       the offline degrader: change one fact at a time (`rules_chain`, `inject_negatives`),
              long-form multiple choice from facts (`lfmcqa_from_facts`), the data set (`write_dataset`)
  judge       the offline caption judge from the facts (`rules_scores`)
  tiny model  a ~1M-parameter Qwen2.5-VL built from a config, with its own BPE tokenizer and a
              processor shaped like the hub's (`build_tiny`, `TinyProcessor`, `TinyPreset`)

The tools reach it through their usual command lines: `gen_chains.py synth`, `--backend rules`,
`rank_dpo.py --model tiny`, `eval_judge.py judge --judge rules`. The tiny model comes in through
one hook, `rank_dpo.embedded_preset` (a `TinyPreset`, for the trainer and the evaluator alike).
None of the tools needs this file to work on real data and real models, and this file imports
none of them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from records import write_json, write_jsonl

TINY_PROCESSOR_FILE = "tiny_processor.json"     # marks a saved tiny model directory
# The tiny preset's modules trained in full beside LoRA (`rank_dpo.py --modules_to_save auto`
# reads them from the model's `default_modules_to_save`):
# a randomly initialised model cannot learn through LoRA alone, because its frozen random lm_head
# (rows of norm ~0.2) caps how confident any next-token prediction can get (SFT stalls near
# 5 nats/token; with these two trained it reaches ~1.6 in 100 steps).
TINY_FULL_MODULES = ["lm_head", "model.language_model.norm"]

# =============================================================================================
# The synthetic scenes: coloured shapes that appear, move and disappear
# =============================================================================================
# Every fact is drawn uniformly and independently from a small closed set (colours without
# replacement, so "the red circle" names one object), and event orders uniformly among the
# valid ones. So any caption, gold or corrupted, is an equally likely text: only the video
# can tell them apart. Captions are rendered from the facts by one template, so a corrupted
# fact set renders to a caption with the same wording and structure.

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 100, 235),
          "yellow": (235, 215, 40), "white": (240, 240, 240)}
SIZES = {"small": 8, "large": 13}
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110)}
OBJECT_FACTS = ("count", "size", "color", "shape", "position", "direction")
CHOICES = {"count": COUNTS, "size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES,
           "position": tuple(POSITIONS), "direction": tuple(DIRECTIONS)}
MOTION_PIXELS = 12                         # how far a group travels while visible
# A scene may carry "speed" (the benchmark sets' speed questions): the distance scales with it.
# The caption template does not state it, so match_facts and the chains never see it.
SPEEDS = {"slow": 0.5, "normal": 1.0, "fast": 2.0}


def sample_scene(rng: random.Random, num_frames: int = 16) -> dict:
    """Facts of one scene: background, 2-3 object groups, and the order of their events."""
    n = rng.choice((2, 3))
    colors = rng.sample(list(COLORS), n)
    objects = [{"count": rng.choice(COUNTS), "size": rng.choice(list(SIZES)), "color": colors[i],
                "shape": rng.choice(SHAPES), "position": rng.choice(list(POSITIONS)),
                "direction": rng.choice(list(DIRECTIONS))} for i in range(n)]
    leaves = [rng.random() < 0.5 for _ in range(n)]
    events = [("appear", i) for i in range(n)] + [("disappear", i) for i in range(n) if leaves[i]]
    while True:                            # a uniform valid order: each group appears before it leaves
        rng.shuffle(events)
        if all(events.index(("appear", i)) < events.index(("disappear", i)) for i in range(n) if leaves[i]):
            break
    # Number the groups by when they appear, so the gold caption introduces them in index order.
    first = sorted(range(n), key=lambda i: events.index(("appear", i)))
    rename = {old: new for new, old in enumerate(first)}
    objects = [objects[old] for old in first]
    events = [[kind, rename[i]] for kind, i in events]
    # Events are spread over the first ~70% of the clip so the last group is seen moving.
    last = max(1, round(0.7 * (num_frames - 1)))
    frames = [round(e * last / max(1, len(events) - 1)) for e in range(len(events))]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects, "events": events,
            "frames": frames}


def _shape_mask(shape: str, size: int):
    import numpy as np
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":                # pointing up: wider towards the bottom
        return np.abs(xx - size / 2) <= yy / 2
    return np.ones((size, size), bool)


def _group_offsets(count: int, size: int) -> list[tuple[float, float]]:
    d = size + 3                           # a tight cluster: side by side, or a little pyramid
    return {1: [(0, 0)], 2: [(-d / 2, 0), (d / 2, 0)],
            3: [(-d / 2, d / 2), (d / 2, d / 2), (0, -d / 2)]}[count]


def render_scene(facts: dict, num_frames: int = 16, size: int = 64):
    """uint8 [T, H, W, 3]: each group is drawn from its appear frame until its disappear frame,
    moving MOTION_PIXELS in its direction at constant speed."""
    import numpy as np
    video = np.empty((num_frames, size, size, 3), np.uint8)
    video[:] = BACKGROUNDS[facts["background"]]
    scale = size / 64
    span = {}
    for (kind, i), t in zip(facts["events"], facts["frames"]):
        span.setdefault(i, [None, num_frames])[0 if kind == "appear" else 1] = t
    for i, obj in enumerate(facts["objects"]):
        start, stop = span[i]
        px = max(2, round(SIZES[obj["size"]] * scale))
        mask = _shape_mask(obj["shape"], px)
        color = np.array(COLORS[obj["color"]], np.uint8)
        cx0, cy0 = (c * scale for c in POSITIONS[obj["position"]])
        dx, dy = DIRECTIONS[obj["direction"]]
        travel = MOTION_PIXELS * SPEEDS[facts.get("speed", "normal")] * scale
        for t in range(start, stop):
            frac = (t - start) / max(1, stop - start - 1)
            cx, cy = cx0 + dx * travel * frac, cy0 + dy * travel * frac
            for ox, oy in _group_offsets(obj["count"], px):
                x0, y0 = round(cx + ox - px / 2), round(cy + oy - px / 2)
                xs, ys = slice(max(0, x0), min(size, x0 + px)), slice(max(0, y0), min(size, y0 + px))
                if xs.start >= xs.stop or ys.start >= ys.stop:
                    continue               # moved fully out of the frame
                m = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
                video[t, ys, xs][m] = color
    return video


def _plural(obj: dict) -> bool:
    return obj["count"] > 1


def noun_phrase(obj: dict) -> str:
    noun = obj["shape"] + ("s" if _plural(obj) else "")
    return f"{COUNT_WORDS[obj['count']]} {obj['size']} {obj['color']} {noun}"


def caption_from_facts(facts: dict) -> str:
    """The detailed caption: one sentence per event in order, then the background. Connectives
    depend only on the sentence's position, so swapping two events keeps the wording."""
    objects, events = facts["objects"], facts["events"]
    sentences = []
    for e, (kind, i) in enumerate(events):
        lead = "First," if e == 0 else "Finally," if e == len(events) - 1 else "Then"
        obj = objects[i]
        many = _plural(obj)
        if kind == "appear":
            body = (f"{noun_phrase(obj)} {'appear' if many else 'appears'} {POSITION_PHRASES[obj['position']]}"
                    f" and {'move' if many else 'moves'} {obj['direction']}")
        else:
            body = (f"the {obj['color']} {obj['shape']}{'s' if many else ''} "
                    f"{'disappear' if many else 'disappears'}")
        sentences.append(f"{lead} {body}.")
    sentences.append(f"The background is {facts['background']}.")
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# match_facts: which of a scene's facts a caption states correctly, wrongly, or not at all
# ---------------------------------------------------------------------------------------------
# A tolerant reader for the template's vocabulary plus common synonyms. It finds object
# mentions (a shape word with the count/size/colour words before it and the position and
# motion phrases after it), aligns them to the scene's objects (the assignment that agrees on
# most facts), and checks the order of the appear/disappear events it can place. Repeated
# sentences describe the same object once; mentions that match no object are hallucinations.

SHAPE_SYNONYMS = {"circle": "circle", "disc": "circle", "disk": "circle", "ball": "circle", "dot": "circle",
                  "square": "square", "box": "square", "block": "square", "rectangle": "square",
                  "triangle": "triangle"}
SIZE_SYNONYMS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
                 "huge": "large"}
COUNT_SYNONYMS = {"a": 1, "an": 1, "one": 1, "single": 1, "1": 1, "two": 2, "2": 2, "pair": 2,
                  "three": 3, "3": 3, "four": 4, "4": 4, "five": 5, "5": 5}
LOCATION_SYNONYMS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
                     "centre": "center", "middle": "center", "upper": "top", "lower": "bottom"}
DIRECTION_SYNONYMS = {"left": "left", "leftward": "left", "leftwards": "left", "right": "right",
                      "rightward": "right", "rightwards": "right", "up": "up", "upward": "up",
                      "upwards": "up", "down": "down", "downward": "down", "downwards": "down"}
APPEAR_WORDS = set("appear appears appeared appearing enter enters entered emerge emerges emerged".split())
DISAPPEAR_WORDS = set("disappear disappears disappeared disappearing vanish vanishes vanished leave leaves "
                      "exit exits fade fades".split())
MOVE_WORDS = {stem + end for stem in ("move", "slide", "go", "head", "travel", "drift")
              for end in ("", "s", "es", "d", "ed", "ing")} | {"goes", "went", "moving", "sliding"}
PLACE_PREPOSITIONS = {"on", "at", "in", "from", "near"}
NP_WORDS = set(COUNT_SYNONYMS) | set(SIZE_SYNONYMS) | set(COLORS) | {"the", "another"}
BACKGROUND_SYNONYMS = {"black": "black", "gray": "gray", "grey": "gray", "white": "white",
                       "dark": "black"}


def _sentences(text: str) -> list[list[str]]:
    return [w for w in (re.findall(r"[a-z]+|\d+", s) for s in re.split(r"[.!?;\n]+", text.lower())) if w]


def _shape_word(word: str) -> tuple[str, bool] | None:
    """("circle", plural?) for circle / circles / boxes / ...; None for other words."""
    for stem, plural in ((word, False), (word[:-1], True), (word[:-2], True)):
        if stem in SHAPE_SYNONYMS and (not plural or word.endswith("s")):
            return SHAPE_SYNONYMS[stem], plural
    return None


def _mentions(caption: str) -> list[dict]:
    """Object mentions in text order: {"kind": appear|disappear|None, "facts": {...}, "pos": n}."""
    mentions, pos = [], 0
    for words in _sentences(caption):
        shape_at = [i for i, w in enumerate(words) if _shape_word(w)]
        starts = []
        for i in shape_at:                 # a noun phrase: the shape and the NP words before it
            j = i
            while j > 0 and words[j - 1] in NP_WORDS and (not starts or j - 1 > shape_at[len(starts) - 1]):
                j -= 1
            starts.append(j)
        sentence_mentions = []
        for n, i in enumerate(shape_at):
            shape, plural = _shape_word(words[i])
            np_words = words[starts[n]:i]
            tail = words[i + 1:starts[n + 1] if n + 1 < len(shape_at) else len(words)]
            facts = {"shape": shape, "count": None, "size": None, "color": None,
                     "position": None, "direction": None}
            for w in np_words:
                if w in COUNT_SYNONYMS and facts["count"] is None:
                    facts["count"] = COUNT_SYNONYMS[w]
                elif w in SIZE_SYNONYMS and facts["size"] is None:
                    facts["size"] = SIZE_SYNONYMS[w]
                elif w in COLORS and facts["color"] is None:
                    facts["color"] = w
            if facts["count"] is None and not plural:
                facts["count"] = 1         # "the red circle": singular says one
            used = set()
            for k, w in enumerate(tail):   # direction: a motion verb, then (to the) left/right/up/down
                if w in MOVE_WORDS:
                    for m in range(k + 1, min(k + 5, len(tail))):
                        if tail[m] in DIRECTION_SYNONYMS:
                            facts["direction"] = DIRECTION_SYNONYMS[tail[m]]
                            used.add(m)
                            break
                        if tail[m] not in {"to", "the", "towards", "toward", "slowly", "quickly", "steadily"}:
                            break
                    if facts["direction"]:
                        break
            for k, w in enumerate(tail):   # position: on/at/in/from (the) left/top/center/...
                if k not in used and w in LOCATION_SYNONYMS and PLACE_PREPOSITIONS & set(tail[max(0, k - 3):k]):
                    facts["position"] = LOCATION_SYNONYMS[w]
                    break
            kind = ("disappear" if DISAPPEAR_WORDS & set(tail) else
                    "appear" if APPEAR_WORDS & set(tail) else None)
            sentence_mentions.append({"kind": kind, "facts": facts, "pos": pos})
            pos += 1
        # "The red circle and the blue square disappear": a verbless mention takes the next verb.
        for n in range(len(sentence_mentions) - 2, -1, -1):
            if sentence_mentions[n]["kind"] is None:
                sentence_mentions[n]["kind"] = sentence_mentions[n + 1]["kind"]
        mentions += sentence_mentions
    return mentions


def _background_said(caption: str) -> str | None:
    for words in _sentences(caption):
        if "background" in words or "backdrop" in words:
            for w in words:
                if w in BACKGROUND_SYNONYMS:
                    return BACKGROUND_SYNONYMS[w]
    return None


def _agreement(said: dict, true: dict) -> tuple[int, int]:
    right = sum(said[k] is not None and said[k] == true[k] for k in OBJECT_FACTS)
    wrong = sum(said[k] is not None and said[k] != true[k] for k in OBJECT_FACTS)
    return right, wrong


def _described_groups(mentions: list[dict]) -> list[dict]:
    """The groups a caption describes, in the order it first mentions them: descriptions (not
    disappearances), repeats merged (same colour and shape = same group). Each is
    {"facts", "pos" (its first mention), "appear" (whether the caption says it appears)}."""
    groups: list[dict] = []
    for m in mentions:
        if m["kind"] == "disappear":
            continue
        key = (m["facts"]["color"], m["facts"]["shape"])
        same = next((g for g in groups if key[0] and (g["facts"]["color"], g["facts"]["shape"]) == key), None)
        if same is None:
            groups.append({"facts": dict(m["facts"]), "pos": m["pos"], "appear": m["kind"] == "appear"})
        else:
            for k, v in m["facts"].items():
                if same["facts"][k] is None:
                    same["facts"][k] = v
            same["appear"] = same["appear"] or m["kind"] == "appear"
    return groups


def match_facts(caption: str, facts: dict) -> dict:
    """Count a scene's facts that `caption` states correctly, wrongly, or not at all.

    Facts: the background, six per object group (count, size, colour, shape, position,
    direction) and the order of events, so total = 2 + 6 * groups. The gold caption gives
    correct == total; the rule backend's k-th chain caption gives wrong == k. Also returned:
    order_correct (None when fewer than two events are placed), hallucinated (object mentions
    that match nothing, each also counted in wrong) and by_kind {fact: {correct, wrong, missing}}.
    """
    objects = facts["objects"]
    mentions = _mentions(caption or "")
    groups = _described_groups(mentions)[:8]

    # The alignment of groups to objects that agrees on the most facts (few objects: brute force).
    best, best_key = {}, (-1, 0)

    def search(i: int, used: frozenset, assign: dict, right: int, wrong: int) -> None:
        nonlocal best, best_key
        if i == len(objects):
            if (right, -wrong) > best_key:
                best, best_key = dict(assign), (right, -wrong)
            return
        search(i + 1, used, assign, right, wrong)
        for g, grp in enumerate(groups):
            if g not in used:
                r, w = _agreement(grp["facts"], objects[i])
                if r:
                    assign[i] = g
                    search(i + 1, used | {g}, assign, right + r, wrong + w)
                    del assign[i]

    search(0, frozenset(), {}, 0, 0)

    by_kind = {k: Counter() for k in ("background", *OBJECT_FACTS, "order")}
    said_bg = _background_said(caption or "")
    by_kind["background"]["missing" if said_bg is None else
                          "correct" if said_bg == facts["background"] else "wrong"] += 1
    for i, obj in enumerate(objects):
        said = groups[best[i]]["facts"] if i in best else {}
        for k in OBJECT_FACTS:
            v = said.get(k)
            by_kind[k]["missing" if v is None else "correct" if v == obj[k] else "wrong"] += 1
    hallucinated = len(groups) - len(best)

    # Events the caption places in time: appearances of aligned groups, and disappearances of
    # the object named by the same colour and shape as an aligned group (or by its true ones).
    group_to_obj = {g: i for i, g in best.items()}
    placed = []
    for m in mentions:
        if m["kind"] == "appear":
            g = next((g for g, grp in enumerate(groups) if grp["pos"] == m["pos"]), None)
            if g in group_to_obj:
                placed.append(("appear", group_to_obj[g]))
        elif m["kind"] == "disappear":
            key = (m["facts"]["color"], m["facts"]["shape"])
            i = next((group_to_obj[g] for g, grp in enumerate(groups)
                      if g in group_to_obj and (grp["facts"]["color"], grp["facts"]["shape"]) == key), None)
            if i is None:
                hits = [i for i, o in enumerate(objects) if key[0] == o["color"] and key[1] == o["shape"]]
                i = hits[0] if len(hits) == 1 else None
            if i is not None:
                placed.append(("disappear", i))
    placed = list(dict.fromkeys(placed))   # a repeated sentence places an event once
    truth = {tuple(e): n for n, e in enumerate(facts["events"])}
    if len(placed) < 2:
        order_correct = None
    elif any(e not in truth for e in placed):
        order_correct = False              # a disappearance that never happens
    else:
        ranks = [truth[e] for e in placed]
        order_correct = ranks == sorted(ranks)
    by_kind["order"]["missing" if order_correct is None else "correct" if order_correct else "wrong"] += 1

    totals = Counter()
    for c in by_kind.values():
        totals.update(c)
    return {"correct": totals["correct"], "wrong": totals["wrong"] + hallucinated,
            "missing": totals["missing"], "total": 2 + 6 * len(objects), "order_correct": order_correct,
            "hallucinated": hallucinated, "by_kind": {k: dict(v) for k, v in by_kind.items()}}


# =============================================================================================
# The rule backend: offline, deterministic degradation of synthetic captions via their facts
# =============================================================================================
# One step changes one fact not changed before (so errors accumulate and never cancel) and
# re-renders the caption from the changed facts, so wording and structure stay. The fact's
# type is sampled uniformly among the types that still have an unchanged fact, then the fact.
# Every step is checked with match_facts: the k-th caption states exactly k facts wrongly.

FACT_TYPES = {"background": "scene", "order": "temporal", "count": "count", "size": "attribute",
              "color": "color", "shape": "object", "position": "spatial", "direction": "direction"}


def _fact_slots(facts: dict) -> list[tuple]:
    """Every corruptible fact: ("background",), ("order",), (object index, fact name)."""
    slots = [("background",)]
    if any(facts["events"][e][1] != facts["events"][e + 1][1] for e in range(len(facts["events"]) - 1)):
        slots.append(("order",))
    slots += [(i, k) for i in range(len(facts["objects"])) for k in OBJECT_FACTS]
    return slots


def _slot_type(slot: tuple) -> str:
    return FACT_TYPES[slot[-1]]


def _allowed_slots(facts: dict, error_types: set[str] | None) -> list[tuple]:
    return [s for s in _fact_slots(facts) if error_types is None or _slot_type(s) in error_types]


RULES_ERROR_TYPES = sorted(set(FACT_TYPES.values()))     # the error types the rules degrader can make


def _describe(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}{'s' if obj['count'] > 1 else ''}"


def corrupt_fact(facts: dict, slot: tuple, rng: random.Random) -> tuple[dict, str]:
    """A copy of facts with the slot's fact changed, and a short description of the change."""
    new = json.loads(json.dumps(facts))
    if slot == ("background",):
        old = new["background"]
        new["background"] = rng.choice([b for b in BACKGROUNDS if b != old])
        return new, f"background: {old} -> {new['background']}"
    if slot == ("order",):
        ev = new["events"]
        pairs = [e for e in range(len(ev) - 1) if ev[e][1] != ev[e + 1][1]]
        e = rng.choice(pairs)
        names = [f"{_describe(new['objects'][i])} {kind}" for kind, i in ev[e:e + 2]]
        ev[e], ev[e + 1] = ev[e + 1], ev[e]
        return new, f"order: '{names[0]}' and '{names[1]}' swapped"
    i, key = slot
    obj = new["objects"][i]
    old = obj[key]
    options = [v for v in CHOICES[key] if v != old]
    if key == "color":                     # colours stay unique so "the red circle" names one group
        options = [v for v in options if all(o["color"] != v for o in new["objects"])]
    obj[key] = rng.choice(options)
    return new, f"{_describe(facts['objects'][i])}: {key} {old} -> {obj[key]}"


def rules_chain(record: dict, length: int, seed: int, unconditioned: bool = False,
                error_types: set[str] | None = None) -> tuple[list[str], list[dict | None]]:
    """c0..cK for a synthetic record, ck holding exactly k wrong facts (checked).
    unconditioned: sample the fact uniformly (types with more facts come up more often).
    error_types: change only facts of these types (None: any)."""
    facts, gold = record["facts"], record["caption"]
    rng = random.Random(f"{seed}:{record['id']}")
    chain, errors, current, used = [gold], [None], facts, set()
    for k in range(1, length + 1):
        for _ in range(50):
            free = [s for s in _allowed_slots(facts, error_types) if s not in used]
            types = sorted({_slot_type(s) for s in free})
            if not types:
                raise ValueError(f"record {record['id']!r}: only {k - 1} facts"
                                 f"{' of types ' + ','.join(sorted(error_types)) if error_types else ''}"
                                 f" can be changed, --length {length} asks for more")
            if unconditioned:
                slot = rng.choice(free)
                etype = _slot_type(slot)
            else:
                etype = rng.choice(types)
                slot = rng.choice([s for s in free if _slot_type(s) == etype])
            candidate, detail = corrupt_fact(current, slot, rng)
            caption = caption_from_facts(candidate)
            m = match_facts(caption, facts)
            if m["wrong"] == k and m["correct"] == m["total"] - k:
                break
            # Rare: enough changes to one group make it look like another group to the matcher.
            # Try another fact rather than emit a chain whose order the matcher cannot confirm.
        else:
            raise ValueError(f"record {record['id']!r}: no change at step {k} keeps the chain exact "
                             "(after this many changes the groups become hard to tell apart)")
        used.add(slot)
        current = candidate
        chain.append(caption)
        errors.append({"type": etype, "detail": detail})
    return chain, errors

def _event_sentence(obj: dict) -> str:
    many = obj["count"] > 1
    text = (f"{noun_phrase(obj)} {'appear' if many else 'appears'} {POSITION_PHRASES[obj['position']]} "
            f"and {'move' if many else 'moves'} {obj['direction']}.")
    return text[0].upper() + text[1:]


def lfmcqa_from_facts(facts: dict, rng: random.Random) -> tuple[str, list[str], int]:
    """A question about one group's entrance with five long answers, one correct, each wrong one
    a single changed fact of the same sentence (so the text alone does not give it away)."""
    appear = [i for kind, i in facts["events"] if kind == "appear"]
    nth = rng.randrange(len(appear))
    ordinal = "last" if nth == len(appear) - 1 else ["first", "second"][nth]
    obj = facts["objects"][appear[nth]]
    question = f"Which shapes are the {ordinal} to appear in the video, and what do they do?"
    correct = _event_sentence(obj)
    wrong = []
    keys = list(OBJECT_FACTS)
    rng.shuffle(keys)
    for key in keys:
        if len(wrong) == 4:
            break
        options = [v for v in CHOICES[key] if v != obj[key]]
        if key == "color":
            options = [v for v in options if all(o["color"] != v for o in facts["objects"])]
        if options:
            wrong.append(_event_sentence({**obj, key: rng.choice(options)}))
    options = [correct, *wrong]
    rng.shuffle(options)
    return question, options, options.index(correct)


def inject_negatives(record: dict, length: int, rng: random.Random, error_types: set[str] | None = None
                     ) -> tuple[list[str], list[dict]] | None:
    """The error-injection baseline from facts: `length` distinct captions, each the gold caption
    with ONE fact changed (type sampled first, as in chains, among error_types when given);
    None if there are too few."""
    negatives, errors = [], []
    free = _allowed_slots(record["facts"], error_types)
    while free and len(negatives) < length:
        etype = rng.choice(sorted({_slot_type(s) for s in free}))
        slot = rng.choice([s for s in free if _slot_type(s) == etype])
        free.remove(slot)
        facts, detail = corrupt_fact(record["facts"], slot, rng)
        caption = caption_from_facts(facts)
        if match_facts(caption, record["facts"])["wrong"] == 1 and caption not in negatives:
            negatives.append(caption)
            errors.append({"type": etype, "detail": detail})
    return (negatives, errors) if len(negatives) == length else None


def write_dataset(out: str, n: int, seed: int = 0, test_frac: float = 0.1, frames: int = 16,
                  size: int = 64) -> tuple[int, int]:
    """Synthetic videos + gold captions + facts -> OUT/train.jsonl, OUT/test.jsonl, OUT/videos/.

    Deterministic by seed; each file is written whole then renamed, so a re-run after a kill
    simply redoes the set. Returns (train, test) counts."""
    video_dir = os.path.join(out, "videos")
    os.makedirs(video_dir, exist_ok=True)
    n_test = min(n - 1, round(n * test_frac)) if n > 1 else 0
    records = []
    for i in range(n):
        facts = sample_scene(random.Random(f"synth:{seed}:{i}"), frames)
        rid = f"syn-{seed}-{i:06d}"
        rel = f"videos/{rid}.npy"
        tmp = os.path.join(out, rel + ".tmp.npy")
        np.save(tmp, render_scene(facts, frames, size))
        os.replace(tmp, os.path.join(out, rel))
        records.append({"id": rid, "caption": caption_from_facts(facts), "video": rel, "facts": facts})
    write_jsonl(os.path.join(out, "train.jsonl"), records[:n - n_test])
    write_jsonl(os.path.join(out, "test.jsonl"), records[n - n_test:])
    return n - n_test, n_test


# =============================================================================================
# The rules judge: the offline caption judge for the synthetic set, from the video's stored facts
# =============================================================================================

SCORE_MIN, SCORE_MAX = 1, 10                # the LLM judge's scale, so the two judges compare

# ---------------------------------------------------------------------------------------------
# Rules backends of the on-policy steps (gen_chains.py qa / improve / compare / rlaifv): the
# stored facts play the teacher LLM, and match_facts is its reading of any caption.
# ---------------------------------------------------------------------------------------------

def qa_from_facts(facts: dict, rng: random.Random, n: int) -> list[dict]:
    """Up to n question-answer pairs about a scene, answers in the captions' own wording (so
    match_facts can check a model's answer): what enters where, which way a group moves, the
    background."""
    pool = []
    for obj in facts["objects"]:
        what = f"the {obj['color']} {obj['shape']}{'s' if obj['count'] > 1 else ''}"
        pool.append({"question": f"What appears {POSITION_PHRASES[obj['position']]} of the video?",
                     "answer": _event_sentence(obj)})
        pool.append({"question": f"Which way do {what} move?",
                     "answer": f"{what[0].upper() + what[1:]} {'move' if obj['count'] > 1 else 'moves'} "
                               f"{obj['direction']}."})
    pool.append({"question": "What colour is the background?",
                 "answer": f"The background is {facts['background']}."})
    rng.shuffle(pool)
    seen, out = set(), []
    for item in pool:                      # two groups at one position: keep one question about it
        if item["question"] not in seen:
            seen.add(item["question"])
            out.append(item)
    return out[:n]


def caption_quality(caption: str, facts: dict) -> float:
    """One number for a caption against the facts (the rules judge's mean of its four axes)."""
    scores, _ = rules_scores(caption, facts)
    return sum(scores.values()) / len(scores)


def rules_improve(caption: str, facts: dict) -> str:
    """The rules teacher's correction of a caption: what a perfect teacher writes given the
    reference, the scene's detailed caption (every wrong fact fixed, every missing one added)."""
    return caption_from_facts(facts)


def rules_claims(caption: str) -> list[str]:
    """Atomic claims of a caption: its sentences (the template states one event per sentence)."""
    return [c.strip() for c in re.split(r"(?<=[.!?])\s+|\n+", caption) if c.strip()]


def rules_supported(claim: str, facts: dict) -> bool:
    """A claim is supported when it states at least one fact and none wrongly."""
    m = match_facts(claim, facts)
    return m["correct"] > 0 and m["wrong"] == 0


def _scale(fraction: float) -> float:
    """[0, 1] -> [1, 10], the LLM judge's scale (eval_judge.py)."""
    return round(SCORE_MIN + (SCORE_MAX - SCORE_MIN) * min(max(fraction, 0.0), 1.0), 2)


def repetition_free(caption: str) -> float:
    """Share of the caption's words that are not repeats; 0.0 for an empty caption.

    A repeat is what degenerate generation produces: a sentence said before, or a span of one to
    four words said twice in a row ("red red", "a ball a ball"). A description of different
    things may reuse phrases ("on the left and" for two groups on the left), so phrase reuse
    alone is not counted.
    """
    sentences = [re.findall(r"\w+", s.lower()) for s in re.split(r"[.!?;\n]+", caption)]
    sentences = [words for words in sentences if words]
    total = sum(len(w) for w in sentences)
    if total == 0:
        return 0.0
    seen, repeated = set(), 0
    for words in sentences:
        if tuple(words) in seen:
            repeated += len(words)
            continue
        seen.add(tuple(words))
        marked = set()
        for n in range(1, 5):
            for i in range(len(words) - 2 * n + 1):
                if words[i:i + n] == words[i + n:i + 2 * n]:
                    marked.update(range(i + n, i + 2 * n))
        repeated += len(marked)
    return 1 - repeated / total


def rules_scores(caption: str, facts) -> tuple[dict[str, float], dict]:
    """Score a caption against the video's facts on the four axes; also return match_facts' counts.

    relevance            precision: correct / (correct + wrong)  (nothing stated -> 1)
    descriptiveness      recall:    correct / total
    temporal_consistency precision again, halved when the events are told in the wrong order
                         (so equal to relevance when the order is right or not stated)
    fluency              repetition_free(caption): the one language fault a rule can see
    Each fraction maps linearly onto 1..10, so the gold caption gets 10 on every axis and
    every corrupted fact lowers relevance and descriptiveness.
    """
    m = match_facts(caption, facts)
    stated = m["correct"] + m["wrong"]
    precision = m["correct"] / stated if stated else 0.0
    recall = m["correct"] / m["total"] if m["total"] else 0.0
    order_factor = 0.5 if m.get("order_correct") is False else 1.0
    scores = {"relevance": _scale(precision), "descriptiveness": _scale(recall),
              "temporal_consistency": _scale(precision * order_factor),
              "fluency": _scale(repetition_free(caption))}
    return scores, m


# =============================================================================================
# The published benchmarks on the toy world: TempCompass, VidHal, VDC and ARGUS sets rendered
# from scenes in their authors' layouts (write_benchmarks), and the rules judge of VDCscore and
# ARGUS (benchmark_rules_judge), so eval_judge.py's benchmark commands all run offline
# ---------------------------------------------------------------------------------------------
# The judge reads captions with match_facts' reader (_mentions, _described_groups): it answers a
# VDC question from what the caption says, grades an answer by the fact it states, and judges an
# ARGUS line by comparing the facts it states with those the source lines state.

ORDINALS = ("first", "second", "third")
SAY_COUNT = {1: "one", 2: "two", 3: "three"}
# VDC questions, one template per fact; the judge parses them back (_vdc_question).
VDC_QUESTIONS = {
    "background": "What colour is the background?",
    "color": "What colour are the shapes that appear {ordinal}?",
    "shape": "What shape are the {color} objects?",
    "count": "How many {color} objects are there?",
    "size": "What size are the {color} objects?",
    "position": "Where do the {color} objects appear?",
    "direction": "Which way do the {color} objects move?",
    "order": "Which appear first, the {color} objects or the {other} objects?",
}
# Which VDC dimension file asks about which facts (the toy camera never moves: no camera.jsonl).
VDC_FACTS = {"short": ("color",), "background": ("background",), "main_object": ("shape", "count", "size"),
             "detailed": ("position", "direction", "order")}
NOT_SAID = "The description does not say."


def _vdc_question(question: str) -> tuple[str, dict] | None:
    """(fact, slots) of a question written from VDC_QUESTIONS, None for any other question."""
    for fact, template in VDC_QUESTIONS.items():
        pattern = re.escape(template).replace(r"\{ordinal\}", "(?P<ordinal>first|second|third)")
        pattern = pattern.replace(r"\{color\}", r"(?P<color>\w+)").replace(r"\{other\}", r"(?P<other>\w+)")
        m = re.fullmatch(pattern, question.strip(), re.I)
        if m:
            return fact, m.groupdict()
    return None


def _say(fact: str, value) -> str:
    """A fact's value as an answer phrase."""
    if value is None:
        return NOT_SAID
    return {"count": lambda v: SAY_COUNT.get(v, str(v)), "position": lambda v: POSITION_PHRASES[v],
            "order": lambda v: f"the {v} objects"}.get(fact, str)(value)


def _value_in(fact: str, text: str):
    """The value of `fact` an answer phrase states (its first word of that kind), else None."""
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        if fact in ("background", "color", "order") and (w in COLORS or w in BACKGROUND_SYNONYMS):
            return BACKGROUND_SYNONYMS.get(w, w)
        if fact == "shape" and _shape_word(w):
            return _shape_word(w)[0]
        if fact == "count" and w in COUNT_SYNONYMS and w not in ("a", "an"):
            return COUNT_SYNONYMS[w]
        if fact == "size" and w in SIZE_SYNONYMS:
            return SIZE_SYNONYMS[w]
        if fact == "position" and w in LOCATION_SYNONYMS:
            return LOCATION_SYNONYMS[w]
        if fact == "direction" and w in DIRECTION_SYNONYMS:
            return DIRECTION_SYNONYMS[w]
    return None


def _answer_from_caption(caption: str, fact: str, slots: dict):
    """What the caption says about one fact (None: it does not say)."""
    if fact == "background":
        return _background_said(caption)
    groups = _described_groups(_mentions(caption))
    if fact == "color":
        appearing = [g for g in groups if g["appear"]] or groups
        n = ORDINALS.index(slots["ordinal"].lower())
        return appearing[n]["facts"]["color"] if n < len(appearing) else None
    by_color = {g["facts"]["color"]: g for g in groups if g["facts"]["color"]}
    if fact == "order":
        a, b = by_color.get(slots["color"].lower()), by_color.get(slots["other"].lower())
        if a is None or b is None or not (a["appear"] and b["appear"]):
            return None
        return (a if a["pos"] < b["pos"] else b)["facts"]["color"]
    group = by_color.get(slots["color"].lower())
    return group["facts"][fact] if group else None


def vdc_questions(facts: dict, dimension: str) -> list[dict]:
    """The VDC questions of one dimension about a scene, with their answers from the facts."""
    objects, out = facts["objects"], []
    appear_order = [i for kind, i in facts["events"] if kind == "appear"]
    for fact in VDC_FACTS[dimension]:
        if fact == "background":
            out.append((fact, {}, facts["background"]))
        elif fact == "color":
            out.append((fact, {"ordinal": "first"}, objects[appear_order[0]]["color"]))
        elif fact == "order":
            for a, b in zip(appear_order, appear_order[1:]):
                out.append((fact, {"color": objects[b]["color"], "other": objects[a]["color"]},
                            objects[a]["color"]))
        else:
            out += [(fact, {"color": obj["color"]}, obj[fact]) for obj in objects]
    return [{"question": VDC_QUESTIONS[fact].format(**slots), "answer": _say(fact, value), "category": fact}
            for fact, slots, value in out]


def _line_claims(line: str) -> tuple[list[dict], str | None]:
    """The object mentions of one line and the background it states."""
    return _mentions(line), _background_said(line)


def _shared_facts(a: dict, b: dict) -> tuple[int, int]:
    """(agreeing, disagreeing) facts among those both mentions state."""
    both = [k for k in OBJECT_FACTS if a[k] is not None and b[k] is not None]
    return sum(a[k] == b[k] for k in both), sum(a[k] != b[k] for k in both)


def _judge_mention(m: dict, sources: list[tuple[list[dict], str | None]]) -> tuple[str, int | None]:
    """A target mention against the source lines: (verdict, the source line it rests on)."""
    key = (m["facts"]["color"], m["facts"]["shape"])
    if m["kind"] == "disappear":           # the same group said to disappear in the source
        hit = next((s for s, (ms, _) in enumerate(sources) for x in ms
                    if x["kind"] == "disappear" and (x["facts"]["color"], x["facts"]["shape"]) == key), None)
        return ("entailment", hit) if hit is not None else ("underdetermined", None)
    best, best_key = None, (0, 0)          # the source mention that agrees on the most facts
    for s, (ms, _) in enumerate(sources):
        for x in ms:
            if x["kind"] != "disappear":
                right, wrong = _shared_facts(m["facts"], x["facts"])
                if (right, -wrong) > best_key:
                    best, best_key = (s, right, wrong), (right, -wrong)
    if best is None:
        return "underdetermined", None
    return ("contradiction" if best[2] else "entailment"), best[0]


class BenchmarkRulesJudge:
    """The offline judge of `eval_judge.py vdc score` and `argus score --judge rules`: the LLM
    judge's three methods, answered with match_facts' reader instead of a language model."""

    def vdc_answer(self, caption: str, question: str) -> str:
        parsed = _vdc_question(question)
        return _say(parsed[0], _answer_from_caption(caption, *parsed)) if parsed else NOT_SAID

    def vdc_grade(self, question: str, answer: str, response: str) -> dict:
        """yes and 5 when the response states the answer's value; no and 1 when it states another
        value; no and 0 when it states none."""
        parsed = _vdc_question(question)
        if parsed is None:                  # not a question of these sets: nothing to compare
            return {"pred": "no", "score": 0}
        right, said = _value_in(parsed[0], answer), _value_in(parsed[0], response)
        if said is None or right is None:
            return {"pred": "no", "score": 0}
        return {"pred": "yes", "score": 5} if said == right else {"pred": "no", "score": 1}

    def argus_lines(self, source_lines: list[str], target_lines: list[str]) -> list:
        """Each target line: dynamic-action when it tells an event or a motion (else a
        visual-description), entailed when every group and background it states agrees with
        the source lines, a contradiction when one disagrees, underdetermined when the source
        does not state it; the evidence is the source line of its first claim."""
        from benchmarks import LineJudgement     # the judgement type eval_judge.py reads
        sources = [_line_claims(s) for s in source_lines]
        out = []
        for line in target_lines:
            mentions, background = _line_claims(line)
            verdicts = [_judge_mention(m, sources) for m in mentions]
            if background is not None:
                said = next(((s, bg) for s, (_, bg) in enumerate(sources) if bg is not None), None)
                verdicts.append(("underdetermined", None) if said is None else
                                ("entailment" if said[1] == background else "contradiction", said[0]))
            dynamic = any(m["kind"] in ("appear", "disappear") or m["facts"]["direction"] for m in mentions)
            kinds = {v for v, _ in verdicts}
            verdict = ("contradiction" if "contradiction" in kinds else
                       "underdetermined" if "underdetermined" in kinds or not verdicts else "entailment")
            evidence = next((s for _, s in verdicts if s is not None), None)
            out.append(LineJudgement("dynamic-action" if dynamic else "visual-description", verdict, evidence))
        return out


def benchmark_rules_judge() -> BenchmarkRulesJudge:
    """eval_judge.py's seam for `vdc score` / `argus score --judge rules`."""
    return BenchmarkRulesJudge()


# -- the sets ---------------------------------------------------------------------------------

def write_mp4(path: str, video, fps: int = 8) -> None:
    """uint8 [T, H, W, 3] -> an H.264 clip (PyAV), written whole then renamed."""
    try:
        import av
    except ImportError:
        raise ImportError("writing the benchmark clips needs PyAV: pip install av") from None
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "12"})
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)


def _group_name(obj: dict) -> str:
    return f"the {_describe(obj)}"


LETTERS_AB = "ABCDEFGH"


def _choices(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], str]:
    options = [right, *wrong]
    rng.shuffle(options)
    return options, LETTERS_AB[options.index(right)]

REVERSED_DIRECTION = {"up": "down", "down": "up", "left": "right", "right": "left"}


def tempcompass_questions(facts: dict, rng: random.Random, moving: int, reverse: bool = False) -> dict:
    """{task: {dimension: [{"question", "answer"}]}} about one clip in TempCompass's wording; the
    direction questions ask about group `moving`. The reversed clip gets the direction questions
    only, with the motion reversed (as TempCompass pairs a clip with its reversed twin)."""
    objects = facts["objects"]
    appear = [i for kind, i in facts["events"] if kind == "appear"]
    tasks = {"multi-choice": {}, "yes_no": {}, "caption_matching": {}}

    def add(dim: str, question: str, right: str, wrong: list[str], yes_no: tuple[str, str],
            captions: tuple[str, str]):
        options, letter = _choices(rng, right, wrong)
        lines = "\n".join(f"{LETTERS_AB[i]}. {o}" for i, o in enumerate(options))
        tasks["multi-choice"].setdefault(dim, []).append({"question": f"{question}\n{lines}",
                                                          "answer": f"{letter}. {right}"})
        tasks["yes_no"].setdefault(dim, []).extend([{"question": yes_no[0], "answer": "yes"},
                                                    {"question": yes_no[1], "answer": "no"}])
        shown, letter = _choices(rng, captions[0], [captions[1]])
        lines = "\n".join(f"Caption {LETTERS_AB[i]}: {c}" for i, c in enumerate(shown))
        tasks["caption_matching"].setdefault(dim, []).append({
            "question": f"Which caption matches the video better?\n{lines}",
            "answer": f"Caption {letter}: {captions[0]}"})

    def does(o: dict) -> str:              # verb agreement with a group of one or more
        return "Does" if o["count"] == 1 else "Do"

    def says(o: dict, verb: str) -> str:
        return verb + "s" if o["count"] == 1 else verb

    obj = objects[moving]
    name = _group_name(obj)
    right = REVERSED_DIRECTION[obj["direction"]] if reverse else obj["direction"]
    wrong = REVERSED_DIRECTION[right]
    add("direction", f"Which way {does(obj).lower()} {name} move?", right, [d for d in DIRECTIONS if d != right],
        (f"{does(obj)} {name} move {right}?", f"{does(obj)} {name} move {wrong}?"),
        (f"{name.capitalize()} {says(obj, 'move')} {right}.", f"{name.capitalize()} {says(obj, 'move')} {wrong}."))
    if reverse:
        return tasks
    (a, first), (b, second) = ((objects[i], _group_name(objects[i])) for i in appear[:2])
    add("order", "Which shapes appear first?", first, [second],
        (f"{does(a)} {first} appear before {second}?", f"{does(b)} {second} appear before {first}?"),
        (f"{first.capitalize()} {says(a, 'appear')} before {second}.",
         f"{second.capitalize()} {says(b, 'appear')} before {first}."))
    fast = facts.get("speed", "normal") == "fast"
    pace, other = ("quickly", "slowly") if fast else ("slowly", "quickly")
    add("speed", "How fast do the shapes move?", pace, [other],
        (f"Do the shapes move {pace}?", f"Do the shapes move {other}?"),
        (f"The shapes move {pace}.", f"The shapes move {other}."))
    i = rng.randrange(len(objects))
    obj, name = objects[i], _group_name(objects[i])
    leaves = ["disappear", i] in facts["events"]
    gone, stays = f"{says(obj, 'disappear')} before the end", f"{says(obj, 'stay')} until the end"
    happens, other = (gone, stays) if leaves else (stays, gone)
    add("attribute_change", f"What happens to {name}?", f"{'it' if obj['count'] == 1 else 'they'} {happens}",
        [f"{'it' if obj['count'] == 1 else 'they'} {other}"],
        (f"{does(obj)} {name} {'disappear before the end' if leaves else 'stay until the end'}?",
         f"{does(obj)} {name} {'stay until the end' if leaves else 'disappear before the end'}?"),
        (f"{name.capitalize()} {happens}.", f"{name.capitalize()} {other}."))
    return tasks


VIDHAL_ASPECTS = ("color", "object", "count", "attribute", "spatial", "direction")


def write_benchmarks(out: str, n: int, seed: int = 0, frames: int = 16, size: int = 64) -> dict:
    """n synthetic scenes written as four benchmark folders in their published layouts:
    OUT/tempcompass (questions/<task>.json, videos/<id>.mp4 and <id>_reverse.mp4),
    OUT/vidhal (annotations.json with captions of 0, 1 and 2 wrong facts of one aspect,
    options.json, videos/), OUT/vdc (<dimension>.jsonl, videos/), OUT/argus (argus.jsonl with
    the gold caption as the human caption, videos/); plus OUT/scenes.jsonl (id, caption, facts).
    Deterministic by seed; each file is written whole then renamed. Returns counts."""
    folders = {name: os.path.join(out, name) for name in ("tempcompass", "vidhal", "vdc", "argus")}
    for folder in folders.values():
        os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    os.makedirs(os.path.join(folders["tempcompass"], "questions"), exist_ok=True)
    scenes, annotations, options, argus = [], [], {}, []
    questions = {task: {} for task in ("multi-choice", "yes_no", "caption_matching")}
    vdc = {dim: [] for dim in VDC_FACTS}
    for k in range(n):
        rng = random.Random(f"benchmarks:{seed}:{k}")
        facts = sample_scene(rng, frames)
        facts["speed"] = rng.choice(("slow", "fast"))
        scene = {"id": f"synb-{seed}-{k:04d}", "caption": caption_from_facts(facts), "facts": facts}
        rid = scene["id"]
        scenes.append(scene)
        video = render_scene(facts, frames, size)
        for folder in folders.values():
            write_mp4(os.path.join(folder, "videos", f"{rid}.mp4"), video)
        write_mp4(os.path.join(folders["tempcompass"], "videos", f"{rid}_reverse.mp4"), video[::-1])
        moving = rng.randrange(len(facts["objects"]))
        for clip, reverse in ((rid, False), (f"{rid}_reverse", True)):
            for task, dims in tempcompass_questions(facts, rng, moving, reverse).items():
                questions[task][clip] = dims
        # VidHal: captions with 0, 1 and 2 wrong facts of one aspect (any aspect if that fails)
        aspect = VIDHAL_ASPECTS[k % len(VIDHAL_ASPECTS)]
        try:
            chain, errors = rules_chain(scene, 2, seed, error_types={aspect})
        except ValueError:
            chain, errors = rules_chain(scene, 2, seed)
            aspect = errors[1]["type"]
        annotations.append({"video": rid, "captions": {str(j + 1): c for j, c in enumerate(chain)},
                            "aspect": aspect, "dataset": "synthetic"})
        shown = list(range(len(chain)))
        rng.shuffle(shown)
        options[rid] = {LETTERS_AB[j]: str(r + 1) for j, r in enumerate(shown)}
        for dim in VDC_FACTS:
            vdc[dim].append({rid: vdc_questions(facts, dim)})
        argus.append({"clip_name": rid, "human_caption": scene["caption"]})
    for task, doc in questions.items():
        write_json(os.path.join(folders["tempcompass"], "questions", f"{task}.json"), doc, indent=4)
    write_json(os.path.join(folders["vidhal"], "annotations.json"), annotations, indent=4)
    write_json(os.path.join(folders["vidhal"], "options.json"), options, indent=4)
    for dim, rows in vdc.items():
        write_jsonl(os.path.join(folders["vdc"], f"{dim}.jsonl"), rows)
    write_jsonl(os.path.join(folders["argus"], "argus.jsonl"), argus)
    write_jsonl(os.path.join(out, "scenes.jsonl"), scenes)
    return {"scenes": n, "tempcompass_questions": sum(len(q) for doc in questions.values()
                                                      for dims in doc.values() for q in dims.values()),
            "vidhal_videos": len(annotations), "vdc_questions": sum(len(q) for rows in vdc.values()
                                                                    for row in rows for q in row.values()),
            "argus_clips": len(argus)}


# =============================================================================================
# The embedded "tiny" preset: a Qwen2.5-VL-architecture model built from a config, with its
# own small byte-level BPE tokenizer trained at build time. Nothing is downloaded; the same
# seed gives the same weights and the same tokenizer every time (every DDP rank builds it).
# ================================================================================================

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The corpus the tiny tokenizer learns its merges from: the words of synthetic scene captions,
# prompts and questions, so they encode in few tokens. Byte-level BPE still encodes any text.
_TINY_WORDS = """
a an the this that these those there here it its is are was were be being been has have had
and or but not no yes of in on at to from into onto over under above below near next beside
between across along around through toward towards away behind front back while then after
before first second third last later finally again still also only both each every all some
red green blue yellow orange purple pink white black gray grey brown cyan magenta gold silver
dark light bright pale
circle circles square squares triangle triangles star stars ball balls box boxes ring rings
cross crosses diamond diamonds rectangle rectangles disk disks dot dots shape shapes object
objects block blocks line lines hexagon heart
small large big tiny huge medium little larger smaller bigger
left right top bottom center centre middle upper lower corner corners side edge edges frame
screen background foreground scene picture image video clip
moves moving move moved slides sliding slide bounces bouncing rotates rotating spins spinning
stays staying stay remains still stationary static grows growing shrinks shrinking fades fading
appears appearing disappears disappearing jumps falls rises drifts travels goes comes enters
leaves exits stops starts turns changes becomes flashes blinks follows chases passes
appear disappear
up down upward downward leftward rightward diagonally horizontally vertically slowly quickly
fast slow steadily smoothly
one two three four five six seven eight nine ten zero once twice
color colour colors colours position positions motion direction speed size count number
describe this video in detail what is the color of which where how many does do did move
question answer true false correct wrong option options choose best letter user assistant system
caption captions describe describes showing shows shown show depicts contains visible
A B C D E
"""
_TINY_SENTENCES = [
    "Describe this video in detail.",
    "Describe the video.",
    "A red circle moves from the left to the right while a blue square stays in the center.",
    "A small green triangle slides from the top left corner toward the bottom right corner.",
    "Two yellow stars bounce up and down on a black background.",
    "The large purple box grows and then shrinks in the middle of the frame.",
    "First a white ring appears at the top, then it moves down to the bottom.",
    "First, two small red circles appear at the bottom and move left. Then three large yellow "
    "squares appear on the right and move down. Then the white squares disappear. Finally, "
    "the red circles disappear. The background is gray.",
    "First, a large green triangle appears in the center and moves up. Then one small blue "
    "square appears at the top and moves right. The background is black.",
    "Is there a red circle in the video? Answer yes or no.",
    "Does the blue square move to the left? Answer yes or no.",
    "How many shapes are in the video?",
    "What color is the triangle?",
    "Which option best describes the video? Answer with the letter.",
    "A. a red circle\nB. a blue square\nC. a green triangle\nD. a yellow star\nE. a purple box",
    "yes", "no", "Yes.", "No.",
]


def tiny_corpus() -> list[str]:
    words = _TINY_WORDS.split()
    return _TINY_SENTENCES + [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)] + \
        [" " + w for w in words] + [w.capitalize() for w in words]


# Qwen's chat format (<|im_start|>role ... <|im_end|>) without the default system prompt,
# which would only make the tiny model's sequences longer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Sized for CPU: ~1M parameters. Vision: 8x8 patches of 64x64 frames, merged 2x2 into 4x4 tokens
# per pair of frames (temporal patch 2), so an 8-frame clip is 64 video tokens that still carry
# colour (per-pixel RGB in the patch), position (2-D rotary positions) and motion (time).
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=4, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=64,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [4, 6, 6]})
TINY_IMAGE_SIZE = 64
TINY_VOCAB = 1024


class TinyVideoProcessor:
    """Frames -> the tiny vision tower's input, with the interface of transformers' Qwen2-VL
    video processor (`__call__(videos=..., return_tensors="pt")`, `merge_size`,
    `get_num_of_video_patches`), so the tools treat the tiny model like any hub VLM.

    Every clip is resized to image_size x image_size: the tiny model sees one frame size, so the
    video flags that choose a resolution (--max_pixels, --fps) do not apply to it.
    """

    def __init__(self, patch_size: int, temporal_patch_size: int, merge_size: int,
                 image_size: int = TINY_IMAGE_SIZE):
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.merge_size, self.image_size = merge_size, image_size

    def settings(self) -> dict:
        return dict(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                    merge_size=self.merge_size, image_size=self.image_size)

    def __call__(self, videos, return_tensors: str = "pt", **_ignored) -> dict:
        if return_tensors != "pt":
            raise ValueError("the tiny video processor returns torch tensors only")
        outs = [patchify_video(np.asarray(v), **self.settings()) for v in videos]
        return {"pixel_values_videos": torch.cat([o["pixel_values_videos"] for o in outs]),
                "video_grid_thw": torch.cat([o["video_grid_thw"] for o in outs])}

    def get_num_of_video_patches(self, num_frames: int, height: int = 0, width: int = 0,
                                 videos_kwargs=None) -> int:
        """Patches of one clip (before merging), whatever its frame size (it is resized)."""
        side = self.image_size // self.patch_size
        return math.ceil(num_frames / self.temporal_patch_size) * side * side


class TinyProcessor:
    """The tiny preset's processor: its tokenizer (with the chat template) and its video processor.

    Shaped like a hub processor (tokenizer, video_processor, video_token, apply_chat_template,
    replace_video_token, save_pretrained / from_pretrained), so the tools need no special case
    for it; it names its video family itself (the model is a Qwen2.5-VL). It does not build on
    Qwen2_5_VLProcessor so that the tiny path runs without torchvision.
    """

    video_family = "qwen2_5_vl"        # rank_dpo.VIDEO_FAMILIES: how the tools feed its videos

    def __init__(self, tokenizer, patch_size: int, temporal_patch_size: int, merge_size: int,
                 image_size: int = TINY_IMAGE_SIZE):
        self.tokenizer = tokenizer
        self.video_processor = TinyVideoProcessor(patch_size, temporal_patch_size, merge_size,
                                                  image_size)
        self.video_token = "<|video_pad|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def replace_video_token(self, video_inputs: dict, video_idx: int) -> str:
        """What the prompt's video placeholder becomes: one video token per merged patch."""
        merged = int(video_inputs["video_grid_thw"][video_idx].prod())
        return self.video_token * (merged // self.video_processor.merge_size ** 2)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, TINY_PROCESSOR_FILE), "w") as f:
            json.dump(self.video_processor.settings(), f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "TinyProcessor":
        from transformers import AutoTokenizer
        with open(os.path.join(path, TINY_PROCESSOR_FILE)) as f:
            settings = json.load(f)
        return cls(AutoTokenizer.from_pretrained(path), **settings)


def build_tiny_tokenizer():
    """Byte-level BPE trained on the embedded corpus (deterministic: no randomness in training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>",
                                        extra_special_tokens={"video_token": "<|video_pad|>"})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny(seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """The tiny Qwen2.5-VL: random weights from `seed`, its tokenizer and processor. `text` and
    `vision` override entries of TINY_TEXT / TINY_VISION (a sized-up model for benchmarks)."""
    text, vision = dict(TINY_TEXT, **(text or {})), dict(TINY_VISION, **(vision or {}))
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    config = Qwen2_5_VLConfig(
        text_config=dict(text, vocab_size=vocab, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.default_modules_to_save = list(TINY_FULL_MODULES)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = TinyProcessor(tokenizer, vision["patch_size"], vision["temporal_patch_size"],
                              vision["spatial_merge_size"])
    return model, processor


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under a fixed torch seed without disturbing the caller's RNG stream."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def patchify_video(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int,
                   image_size: int) -> dict:
    """uint8 [T, H, W, 3] -> Qwen2-VL vision input: flat patches and the (t, h, w) patch grid.

    Frames are resized to image_size x image_size, scaled to [0, 1], normalised with CLIP's
    mean/std, and cut into temporal_patch_size x patch_size x patch_size patches ordered so
    that each merge_size x merge_size block of neighbours is contiguous (the patch merger
    concatenates them). The layout matches transformers' Qwen2VLVideoProcessor.patchify.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if video.shape[-2:] != (image_size, image_size):
        video = F.interpolate(video, size=(image_size, image_size), mode="bilinear",
                              antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    video = (video - mean) / std
    if pad := -video.shape[0] % temporal_patch_size:          # repeat the last frame
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, c = video.shape[0] // temporal_patch_size, video.shape[1]
    h = w = image_size // patch_size
    m, p = merge_size, patch_size
    patches = video.view(t, temporal_patch_size, c, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)     # t, bh, bw, mh, mw, c, tp, ph, pw
    patches = patches.reshape(t * h * w, c * temporal_patch_size * p * p)
    return {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([[t, h, w]])}


class TinyPreset:
    """The tiny model as the tools see it, through rank_dpo.embedded_preset (their one hook into
    this file): "tiny", built from the config, or a directory a tiny model was saved to."""

    def __init__(self, model: str = "tiny"):
        self.model = model
        self.built = model == "tiny"        # no directory holds it: a run saves it (save_base)

    def load(self):
        """(model in fp32, processor)."""
        if self.built:
            return build_tiny()
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model, dtype=torch.float32)
        model.default_modules_to_save = list(TINY_FULL_MODULES)
        return model, TinyProcessor.from_pretrained(self.model)

    def save_base(self, path: str) -> None:
        """The untrained model and its processor, saved so that `--model PATH` reloads it."""
        model, processor = self.load()
        model.save_pretrained(path)
        processor.save_pretrained(path)
