"""The embedded world as published benchmarks: `gen_chains.py benchmarks` writes TempCompass,
VidHal, VDC and ARGUS sets in their authors' layouts, benchmarks.py reads them, and every
eval_judge.py benchmark command runs on them offline (the tiny model, `--judge rules`), with
numbers checked: the rules judge gives the gold caption a perfect score and corrupted ones less,
and answers forced through the model's logits score what the files say they should."""
import json
import os

import pytest

import benchmarks as B
import eval_judge as E
import gen_chains as gc
import synthetic as S
from forced_logits import fixed_logits, token_id
from test_benchmarks import read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_SCENES = 2


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = gc.main(["benchmarks", "--out", str(out), "--n", str(N_SCENES), "--seed", "5"])
    assert summary["scenes"] == N_SCENES
    return out


@pytest.fixture(scope="module")
def scenes(sets):
    return {r["id"]: r for r in read_jsonl(sets / "scenes.jsonl")}


@pytest.fixture(scope="module")
def tiny():
    from rank_dpo import load_model
    return load_model("tiny")


def test_the_sets_are_in_the_published_layouts(sets, scenes):
    tc = str(sets / "tempcompass")
    mc = B.read_tempcompass(tc, "multi-choice")
    # per scene: direction, order, speed, attribute change; its reversed clip: direction
    assert len(mc) == 5 * N_SCENES and len(B.read_tempcompass(tc, "yes_no")) == 10 * N_SCENES
    assert {i.dimension for i in B.read_tempcompass(tc, "caption_matching")} == \
        {"direction", "order", "speed", "attribute_change"}
    for rid, scene in scenes.items():
        forward = next(i for i in mc if i.video_id == rid and i.dimension == "direction")
        reverse = next(i for i in mc if i.video_id == f"{rid}_reverse")
        assert forward.question.splitlines()[0] == reverse.question.splitlines()[0]   # the same group
        said = {"up": "down", "down": "up", "left": "right", "right": "left"}
        assert said[forward.texts[forward.labels.index(forward.gold)]] == reverse.texts[reverse.labels.index(reverse.gold)]
        for clip in (rid, f"{rid}_reverse"):
            assert B.find_video(os.path.join(tc, "videos"), clip)
    vidhal = B.read_vidhal(str(sets / "vidhal" / "annotations.json"), str(sets / "vidhal" / "options.json"))
    for item in vidhal:
        wrong = [S.match_facts(c, scenes[item.id]["facts"])["wrong"] for c in item.captions]
        assert wrong == [0, 1, 2]                               # graded hallucination, best first
    vdc = B.read_vdc(str(sets / "vdc"), ["short", "background", "main_object", "detailed"])
    assert len(vdc) == 4 * N_SCENES and all(item.qa for item in vdc)
    assert set(B.read_argus(str(sets / "argus" / "argus.jsonl"))) == set(scenes)


def test_the_sets_are_the_same_for_the_same_seed(sets, tmp_path):
    gc.main(["benchmarks", "--out", str(tmp_path), "--n", str(N_SCENES), "--seed", "5"])
    for name in ("tempcompass/questions/yes_no.json", "vidhal/annotations.json", "vidhal/options.json",
                 "vdc/detailed.jsonl", "argus/argus.jsonl", "scenes.jsonl"):
        assert open(sets / name).read() == open(tmp_path / name).read(), name


def test_clips_decode_and_show_the_scene(sets, scenes):
    from rank_dpo import load_clip
    rid, scene = next(iter(scenes.items()))
    clip = load_clip(B.find_video(str(sets / "argus" / "videos"), rid), 4)
    corner = clip.frames[0][0, 0].astype(int)                 # the top-left pixel: background
    assert abs(corner - S.BACKGROUNDS[scene["facts"]["background"]]).max() < 24


def test_rules_judge_by_hand():
    judge = S.benchmark_rules_judge()
    caption = ("First, a small red circle appears on the left and moves up. Then two large blue squares "
               "appear at the top and move down. The background is gray.")
    q = "Which way do the red objects move?"
    assert judge.vdc_answer(caption, q) == "up"
    assert judge.vdc_answer(caption, "How many blue objects are there?") == "two"
    assert judge.vdc_answer(caption, "Which appear first, the blue objects or the red objects?") == "the red objects"
    assert judge.vdc_answer(caption, "Which way do the green objects move?") == S.NOT_SAID
    assert judge.vdc_grade(q, "up", "up") == {"pred": "yes", "score": 5}
    assert judge.vdc_grade(q, "up", "It moves down.") == {"pred": "no", "score": 1}
    assert judge.vdc_grade(q, "up", S.NOT_SAID) == {"pred": "no", "score": 0}
    source = B.split_sentences(caption)
    # the two events told in reverse: each line entailed at its evidence, one order penalty:
    # cost 0.1, max cost 1 (the background line) + 0.1 (one pair of actions) -> 1/11
    swapped = ["First, two large blue squares appear at the top and move down.",
               "Then a small red circle appears on the left and moves up.", "The background is gray."]
    lines = judge.argus_lines(source, swapped)
    assert [(x.type, x.verdict, x.evidence) for x in lines] == [
        ("dynamic-action", "entailment", 1), ("dynamic-action", "entailment", 0),
        ("visual-description", "entailment", 2)]
    assert B.argus_cost(lines, 3).normalized == pytest.approx(1 / 11)
    wrong = judge.argus_lines(source, ["A small green circle appears on the left and moves up.",
                                       "A purple star sings.", "The background is black."])
    assert [x.verdict for x in wrong] == ["contradiction", "underdetermined", "contradiction"]


def captions_file(path, ids_to_captions):
    return write_jsonl(path, [{"id": rid, "caption": c} for rid, c in ids_to_captions.items()])


def test_vdc_and_argus_score_with_the_rules_judge_gold_perfect_corrupted_lower(sets, scenes, tmp_path):
    vdc_ids = [item.id for item in B.read_vdc(str(sets / "vdc"), list(S.VDC_FACTS))]
    chains = {rid: S.rules_chain(scene, 3, seed=1)[0] for rid, scene in scenes.items()}
    results = {}
    for k in (0, 3):                                           # the gold caption; three wrong facts
        vdc_caps = captions_file(tmp_path / f"vdc{k}.jsonl", {i: chains[i.split("/", 1)[1]][k] for i in vdc_ids})
        argus_caps = captions_file(tmp_path / f"argus{k}.jsonl", {rid: chains[rid][k] for rid in scenes})
        results[k] = (
            E.main(["vdc", "score", "--judge", "rules", "--data", str(sets / "vdc"), "--captions", vdc_caps,
                    "--out", str(tmp_path / f"vdc_scores{k}.jsonl")]),
            E.main(["argus", "score", "--judge", "rules", "--data", str(sets / "argus" / "argus.jsonl"),
                    "--captions", argus_caps, "--out", str(tmp_path / f"argus_scores{k}.jsonl")]))
    vdc_gold, argus_gold = results[0]
    assert vdc_gold["accuracy"]["overall"]["mean"] == 1.0 and vdc_gold["score"]["overall"]["mean"] == 5.0
    assert vdc_gold["n_scored"] == 4 * N_SCENES and vdc_gold["judge"] == "rules"
    assert argus_gold["ArgusCost-H"]["mean"] == 0.0 and argus_gold["ArgusCost-O"]["mean"] == 0.0
    vdc_bad, argus_bad = results[3]
    assert vdc_bad["score"]["overall"]["mean"] < 5.0 and vdc_bad["accuracy"]["overall"]["mean"] < 1.0
    assert argus_bad["ArgusCost-H"]["mean"] > 0.0 and argus_bad["ArgusCost-O"]["mean"] > 0.0
    # each corrupted caption's per-video score is at most the gold one's (5)
    assert all(r["score"] <= 5.0 for r in read_jsonl(tmp_path / "vdc_scores3.jsonl"))


def test_model_steps_run_on_the_sets_with_the_tiny_model(sets, tiny, tmp_path, monkeypatch):
    model, processor = tiny
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    common = ["--num_frames", "4", "--device", "cpu"]
    a, end = token_id(processor, "A"), token_id(processor, "<|im_end|>")
    # Every answer forced to "A": the accuracy is the share of questions whose answer is A.
    with fixed_logits(model, [{a: 50.0, end: 50.0}]):
        tc = E.main(["tempcompass", "--data", str(sets / "tempcompass"), "--tasks", "multi-choice",
                     "--out", str(tmp_path / "tc.jsonl"), *common])
        vh = E.main(["vidhal", "--data", str(sets / "vidhal" / "annotations.json"),
                     "--options", str(sets / "vidhal" / "options.json"), "--out", str(tmp_path / "vh.jsonl"),
                     *common])
    doc = json.load(open(sets / "tempcompass" / "questions" / "multi-choice.json"))
    answers = [q["answer"] for dims in doc.values() for qs in dims.values() for q in qs]
    assert tc["tasks"]["multi-choice"]["overall"]["n"] == len(answers) == 5 * N_SCENES
    assert tc["tasks"]["multi-choice"]["overall"]["mean"] == pytest.approx(
        sum(x.startswith("A.") for x in answers) / len(answers))
    options = json.load(open(sets / "vidhal" / "options.json"))
    assert vh["mcqa_accuracy"]["overall"]["mean"] == pytest.approx(
        sum(o["A"] == "1" for o in options.values()) / len(options))
    for rec in read_jsonl(tmp_path / "vh.jsonl"):
        assert rec["ndcg"] == pytest.approx(B.vidhal_expected_ndcg(rec["caption_logps"]))
    # The caption steps write one caption per benchmark item, which the rules judge then scores.
    for bench, data in (("vdc", sets / "vdc"), ("argus", sets / "argus" / "argus.jsonl")):
        caps = str(tmp_path / f"{bench}_caps.jsonl")
        res = E.main([bench, "caption", "--data", str(data), "--out", caps, "--max_new_tokens", "8", *common])
        scored = E.main([bench, "score", "--judge", "rules", "--data", str(data), "--captions", caps,
                         "--out", str(tmp_path / f"{bench}_scores.jsonl")])
        assert res["generated"] == scored["n"] == scored["n_scored"] > 0
