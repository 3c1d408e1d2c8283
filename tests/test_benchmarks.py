"""The published benchmarks (benchmarks.py and eval_judge.py's tempcompass / vidhal / vdc / argus):
small files written in each benchmark's own layout with tiny H.264 clips, metrics checked against
values worked out by hand, the judge steps against the real (fake) HTTP server, the model steps on
the tiny model, and bad files named by file, line and field."""
import json
import math
import os
import re

import numpy as np
import pytest

import benchmarks as B
import eval_judge as E
from fake_llm import FakeLLM
from forced_logits import fixed_logits, token_id
from records import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4)          # indented, as the benchmarks ship their files
    return str(path)


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_mp4(path, n_frames=8, size=32, seed=0):
    """A tiny H.264 clip of random frames (PyAV), as the benchmarks ship theirs."""
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for _ in range(n_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    from rank_dpo import load_model
    return load_model("tiny")


# ----------------------------------------------------------------------------------------------
# TempCompass: questions/<task>.json, {video_id: {dimension: [{question, answer}]}}
# ----------------------------------------------------------------------------------------------

def tempcompass_folder(root):
    """Two clips (one with its _reverse twin) and questions of all three tasks, as published."""
    for name in ("1034419625", "1034419625_reverse", "1098982673"):
        write_mp4(root / "videos" / f"{name}.mp4", seed=len(name))
    write_json(root / "questions" / "multi-choice.json", {
        "1034419625": {"action": [{"question": "What is the man doing in the video?\nA. dunking a "
                                               "basketball\nB. dribbling a basketball\nC. passing a basketball",
                                   "answer": "A. dunking a basketball"}]},
        "1034419625_reverse": {"direction": [{"question": "What is the direction of the man?\nA. moving "
                                                          "towards the camera\nB. moving from right to left",
                                              "answer": "B. moving from right to left"}]},
        "1098982673": {"speed": [{"question": "What is the speed of the video?\nA. normal speed\nB. slow "
                                              "motion\nC. fast forward\nD. reverse",
                                  "answer": "B. slow motion"}]}})
    write_json(root / "questions" / "yes_no.json", {
        "1034419625": {"action": [{"question": "Is the man dunking?", "answer": "yes"},
                                  {"question": "Is the man dribbling a basketball?", "answer": "no"}]}})
    write_json(root / "questions" / "caption_matching.json", {
        "1034419625_reverse": {"direction": [{
            "question": "Which caption matches the video better?\nCaption A: The man is moving from right "
                        "to left.\nCaption B: The man is moving from left to right.",
            "answer": "Caption A: The man is moving from right to left."}]}})
    return str(root)


def test_tempcompass_reader_parses_the_published_layout(tmp_path):
    folder = tempcompass_folder(tmp_path)
    mc = B.read_tempcompass(folder, "multi-choice")
    assert [(i.id, i.labels, i.gold) for i in mc] == [
        ("1034419625/action/0", ["A", "B", "C"], "A"),
        ("1034419625_reverse/direction/0", ["A", "B"], "B"),       # the reversed clip is its own video
        ("1098982673/speed/0", ["A", "B", "C", "D"], "B")]
    assert mc[0].prompt.endswith("C. passing a basketball\nPlease directly give the best option:")
    assert mc[1].line == 13                                        # the line of its "question"
    yn = B.read_tempcompass(folder, "yes_no")
    assert [(i.gold, i.responses) for i in yn] == [("yes", ["Yes", "No"]), ("no", ["Yes", "No"])]
    assert yn[0].prompt == "Is the man dunking?\nPlease answer yes or no:"
    cm = B.read_tempcompass(folder, "caption_matching")[0]
    assert cm.labels == ["Caption A", "Caption B"] and cm.gold == "Caption A"
    assert cm.texts[1] == "The man is moving from left to right."


@pytest.mark.parametrize("task, reply, label", [
    ("multi-choice", "B", "B"), ("multi-choice", "B. dribbling a basketball", "B"),
    ("multi-choice", "C) passing", "C"), ("multi-choice", "A. dunking a basketball", "A"),
    ("multi-choice", "The man is dunking.", None), ("multi-choice", "E", None),
    ("yes_no", "Yes, he is.", "yes"), ("yes_no", "no", "no"), ("yes_no", "Maybe", None),
    ("caption_matching", "Caption B", "Caption B"), ("caption_matching", "Caption A.", "Caption A"),
    ("caption_matching", "The man is moving from left to right.", "Caption B"),
    ("caption_matching", "Caption A: The man is moving from right to left.", "Caption A"),
    ("caption_matching", "(a) The man is moving from right to left.", "Caption A"),
    ("caption_matching", "I think the first one.", None),
])
def test_tempcompass_matching_rules(tmp_path, task, reply, label):
    items = {"multi-choice": 0, "yes_no": 0, "caption_matching": 0}
    item = B.read_tempcompass(tempcompass_folder(tmp_path), task)[items[task]]
    assert B.match_tempcompass_answer(item, reply) == label


def test_tempcompass_one_item_answered_both_ways(tiny, tmp_path, monkeypatch):
    # Log-prob: the hook puts e^50 on "B" and on the end-of-turn token, 0 elsewhere. Response
    # "B" is [B, <|im_end|>]: log p = 2 log(e^50 / (2 e^50 + V - 2)) ~ -2 log 2; any other letter
    # pays ~ -50 on its first token. So every multi-choice question is answered "B": right for
    # the reversed clip and the speed question (gold B), wrong for the action question (gold A).
    # Generation: "B" at the first step, then the end of the turn: the reply "B", matched to B by
    # the official rule for a bare letter, gives the same answers.
    model, processor = tiny
    folder = tempcompass_folder(tmp_path)
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    b, end = token_id(processor, "B"), token_id(processor, "<|im_end|>")
    common = ["tempcompass", "--data", folder, "--tasks", "multi-choice", "--num_frames", "4",
              "--device", "cpu"]
    with fixed_logits(model, [{b: 50.0, end: 50.0}]):
        res = E.main(common + ["--out", str(tmp_path / "lp.jsonl")])
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "lp.jsonl")}
    assert {rid: r["pred"] for rid, r in recs.items()} == {
        "multi-choice/1034419625/action/0": "B", "multi-choice/1034419625_reverse/direction/0": "B",
        "multi-choice/1098982673/speed/0": "B"}
    assert recs["multi-choice/1098982673/speed/0"]["logps"]["B"] == pytest.approx(-2 * math.log(2), abs=1e-3)
    acc = res["tasks"]["multi-choice"]
    assert acc["overall"]["mean"] == pytest.approx(2 / 3) and acc["overall"]["n"] == 3
    assert acc["action"]["mean"] == 0.0 and acc["direction"]["mean"] == 1.0 and acc["speed"]["mean"] == 1.0
    assert "order" not in acc                                      # no question of that dimension
    assert json.load(open(tmp_path / "lp.results.json"))["answer"] == "logprob"

    out = str(tmp_path / "gen.jsonl")
    with fixed_logits(model, [{b: 50.0}, {end: 50.0}, {b: 50.0}, {end: 50.0}, {b: 50.0}, {end: 50.0}]):
        res = E.main(common + ["--out", out, "--answer", "generate", "--batch_size", "1",
                               "--max_new_tokens", "3"])
    gen = {r["id"]: r for r in read_jsonl(out)}
    assert all(r["reply"] == "B" and r["matched"] for r in gen.values())
    assert res["tasks"]["multi-choice"]["overall"]["mean"] == pytest.approx(2 / 3)
    assert res["tasks"]["multi-choice"]["match_rate"]["mean"] == 1.0
    assert E.main(common + ["--out", out, "--answer", "generate"])["answered_now"] == 0   # resumed
    with pytest.raises(SystemExit, match="answers made another way"):
        E.main(common + ["--out", out])                            # a log-prob run on that file


def test_tempcompass_bad_files_name_file_line_and_field(tmp_path):
    folder = tempcompass_folder(tmp_path)
    path = tmp_path / "questions" / "multi-choice.json"
    doc = json.load(open(path))
    doc["1098982673"]["speed"][0]["answer"] = "E. backwards"
    write_json(path, doc)
    with pytest.raises(DataError, match=r"multi-choice.json:\d+: field '1098982673.speed\[0\].answer': "
                                        r"'E. backwards' is none of the question's options"):
        B.read_tempcompass(folder, "multi-choice")
    write_json(path, {"1034419625": {"colour": []}})
    with pytest.raises(DataError, match=r"multi-choice.json:3: field '1034419625.colour': unknown dimension"):
        B.read_tempcompass(folder, "multi-choice")
    path.write_text('{"1034419625": {"action": [}')
    with pytest.raises(DataError, match=r"multi-choice.json:1: malformed JSON"):
        B.read_tempcompass(folder, "multi-choice")
    os.remove(tmp_path / "videos" / "1034419625_reverse.mp4")
    with pytest.raises(SystemExit, match=r"caption_matching.json:\d+: field '1034419625_reverse': "
                                         r"video not found"):
        E.main(["tempcompass", "--data", folder, "--tasks", "caption_matching",
                "--out", str(tmp_path / "o.jsonl"), "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# VidHal: annotations.json [{video, captions: {"1": best, ...}, aspect}], videos/<video>.mp4
# ----------------------------------------------------------------------------------------------

def test_vidhal_ndcg_by_hand():
    # K = 3: relevance 3, 2, 1 for ranks 0, 1, 2. Ideal DCG 3 + 2/log2(3) + 1/2; reversed
    # 1 + 2/log2(3) + 3/2: their difference is exactly 1. Swapping the best two (relevance
    # 2, 3, 1) gains 2 + 3/log2(3) + 1/2 - (1 + 2/log2(3) + 3/2) = 1/log2(3) over the reversed one.
    assert B.vidhal_ndcg([0, 1, 2]) == pytest.approx(1.0)
    assert B.vidhal_ndcg([2, 1, 0]) == pytest.approx(0.0)
    assert B.vidhal_ndcg([1, 0, 2]) == pytest.approx(1 / math.log2(3))
    assert B.vidhal_ndcg([0, 2, 1]) == pytest.approx(1.5 - 1 / math.log2(3))
    # All scores tied: every order equally likely; each relevance sits at each position equally
    # often, so the mean DCG is 2 (1 + 1/log2(3) + 1/2), 0.5 above the reversed order.
    assert B.vidhal_expected_ndcg([-3.0, -3.0, -3.0]) == pytest.approx(0.5)
    assert B.vidhal_expected_ndcg([-1.0, -2.0, -3.0]) == pytest.approx(1.0)
    assert B.vidhal_expected_ndcg([-2.0, -2.0, -5.0]) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    with pytest.raises(ValueError):
        B.vidhal_ndcg([0, 0, 1])


def vidhal_folder(root):
    """As the repository ships it: vidhal/annotations.json, the clips in vidhal/videos/."""
    for name in ("action_1", "direction_2"):
        write_mp4(root / "vidhal" / "videos" / f"{name}.mp4", seed=len(name))
    write_json(root / "vidhal" / "options.json", {"action_1": {"A": "2", "B": "1", "C": "3"},
                                                  "direction_2": {"A": "1", "B": "3", "C": "2"}})
    # Keys in the shipped (shuffled) order; "1" the best and the shortest, "3" the longest.
    return write_json(root / "vidhal" / "annotations.json", [
        {"video": "action_1", "captions": {"2": "a dog runs left fast", "3": "a dog runs left fast and then it jumps",
                                           "1": "a dog runs"}, "dataset": "mvbench", "aspect": "action"},
        {"video": "direction_2", "captions": {"1": "a car turns", "3": "a car turns right and then it stops",
                                              "2": "a car turns right slowly"},
         "dataset": "tempcompass", "aspect": "direction"}])


def test_vidhal_reader_and_option_order(tmp_path):
    path = vidhal_folder(tmp_path)
    items = B.read_vidhal(path, str(tmp_path / "vidhal" / "options.json"))
    assert items[0].captions == ["a dog runs", "a dog runs left fast", "a dog runs left fast and then it jumps"]
    assert items[0].order == [1, 0, 2] and items[0].gold == "B"    # A shows "2", B shows "1"
    assert items[1].gold == "A" and items[1].line == 13             # the line of its "video"
    assert "A. a dog runs left fast\nB. a dog runs\nC. a dog runs left" in items[0].mcqa_prompt
    free = B.read_vidhal(path)                                     # no options file: a fixed shuffle
    assert sorted(free[0].order) == [0, 1, 2] and free[0].order == B.read_vidhal(path)[0].order


def test_vidhal_cli_on_a_certain_order(tiny, tmp_path, monkeypatch):
    # Uniform logits: a response of n tokens scores -n log V, so the shortest caption ("1")
    # scores highest and the longest ("3") lowest: the right order, NDCG 1 for both videos.
    # The letters tie, so the first letter "A" is picked: right for direction_2 (A shows "1"),
    # wrong for action_1 (B shows "1"): MCQA accuracy 1/2.
    model, processor = tiny
    path = vidhal_folder(tmp_path)
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    with fixed_logits(model):
        res = E.main(["vidhal", "--data", path, "--options", str(tmp_path / "vidhal" / "options.json"),
                      "--out", str(tmp_path / "vidhal.jsonl"), "--num_frames", "4", "--device", "cpu"])
    assert res["ndcg"]["overall"]["mean"] == pytest.approx(1.0) and res["ndcg"]["overall"]["n"] == 2
    assert res["ndcg"]["action"]["n"] == 1
    assert res["mcqa_accuracy"]["overall"]["mean"] == 0.5
    assert res["mcqa_accuracy"]["direction"]["mean"] == 1.0 and res["mcqa_accuracy"]["action"]["mean"] == 0.0
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "vidhal.jsonl")}
    lp = rows["action_1"]["caption_logps"]
    assert lp[0] > lp[1] > lp[2] and rows["action_1"]["mcqa"]["gold"] == "B"
    assert os.path.exists(tmp_path / "vidhal.results.json")


def test_vidhal_bad_files_name_file_line_and_field(tmp_path):
    path = vidhal_folder(tmp_path)
    doc = json.load(open(path))
    doc[1]["captions"] = {"1": "a car turns", "3": "a car stops"}
    write_json(path, doc)
    with pytest.raises(DataError, match=r"annotations.json:13: field '\[1\].captions': expected"):
        B.read_vidhal(path)
    doc[1] = {"captions": {"1": "x", "2": "y"}, "aspect": "direction"}
    write_json(path, doc)
    with pytest.raises(DataError, match=r"field '\[1\].video': missing"):
        B.read_vidhal(path)
    write_json(path, doc[:1])
    write_json(tmp_path / "vidhal" / "options.json", {"action_1": {"A": "2", "B": "2", "C": "3"}})
    with pytest.raises(DataError, match=r"options.json:2: field 'action_1': the options .* do not cover"):
        B.read_vidhal(path, str(tmp_path / "vidhal" / "options.json"))


# ----------------------------------------------------------------------------------------------
# VDC: <dimension>.jsonl, each line {video_id: [{question, answer, category}]}; videos/<id>.mp4
# ----------------------------------------------------------------------------------------------

VIDEO_1, VIDEO_2 = "07309684-1f6e-4977-ab74-f3e63c361f36", "1cd5de7f-b01f-4a70-bdd3-6a4e27ae58fe"


def vdc_folder(root):
    for i, vid in enumerate((VIDEO_1, VIDEO_2)):
        write_mp4(root / "videos" / f"{vid}.mp4", seed=i)
    write_jsonl(root / "camera.jsonl", [
        {VIDEO_1: [{"question": "How is the camera positioned", "answer": "static, eye level",
                    "category": "perspective"},
                   {"question": "Does the camera move", "answer": "no", "category": ""}]},
        {VIDEO_2: [{"question": "Where is the camera", "answer": "inside the car", "category": "location"}]}])
    write_jsonl(root / "short.jsonl", [
        {VIDEO_1: [{"question": "What is on the desk?", "answer": "clutter", "category": "object"}]}])
    return str(root)


def test_vdc_reader_and_prompts_per_dimension(tmp_path):
    folder = vdc_folder(tmp_path)
    items = B.read_vdc(folder, ["camera", "short"])
    assert [(i.id, len(i.qa), i.line) for i in items] == [
        (f"camera/{VIDEO_1}", 2, 1), (f"camera/{VIDEO_2}", 1, 2), (f"short/{VIDEO_1}", 1, 1)]
    args = E.build_parser().parse_args(["vdc", "caption", "--data", folder, "--out", "c.jsonl"])
    args.video_root = os.path.join(folder, "videos")
    jobs = E.caption_jobs(args)
    assert [(rid, prompt) for rid, prompt, _ in jobs] == [     # every dimension the folder has
        (f"short/{VIDEO_1}", "Write a one-sentence summary of the video."),
        (f"camera/{VIDEO_1}", B.VDC_PROMPTS["camera"]), (f"camera/{VIDEO_2}", B.VDC_PROMPTS["camera"])]
    assert jobs[0][2].endswith(f"videos/{VIDEO_1}.mp4")


def vdc_server(req):
    """Answers from the caption (what it says about the camera), grades by word overlap."""
    text = req.user_text
    if text.startswith("Detailed description"):
        return "the camera is static" if "static" in text.split("Question:")[0] else "I cannot tell"
    correct = text.split("Correct answer:")[1].split("\n")[0]
    predicted = text.split("Predicted answer:")[1].split("\n")[0]
    if "static" in correct and "static" in predicted:
        return "{'pred': 'yes', 'score': 4}"                     # the official judge's dict style
    return '```json\n{"pred": "no", "score": 1}\n```'


def test_vdc_caption_then_score_by_hand(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    folder = vdc_folder(tmp_path)
    captions = str(tmp_path / "vdc_captions.jsonl")
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    res = E.main(["vdc", "caption", "--data", folder, "--out", captions, "--max_new_tokens", "3",
                  "--batch_size", "2", "--num_frames", "4", "--device", "cpu", "--dimensions", "camera"])
    assert res["generated"] == 2 and sorted(r["id"] for r in read_jsonl(captions)) == \
        [f"camera/{VIDEO_1}", f"camera/{VIDEO_2}"]
    # The judge step on known captions: video 1's caption says the camera is static, video 2's
    # does not. Video 1: "positioned" -> "the camera is static" vs "static, eye level": yes, 4;
    # "move" -> same answer vs "no": no, 1. Accuracy 1/2, score 5/2. Video 2: one question, no, 1.
    write_jsonl(captions, [{"id": f"camera/{VIDEO_1}", "caption": "A static camera films a desk."},
                           {"id": f"camera/{VIDEO_2}", "caption": "A car drives down a road."}])
    out = str(tmp_path / "vdc_scores.jsonl")
    with FakeLLM(responder=vdc_server) as llm:
        res = E.main(["vdc", "score", "--data", folder, "--captions", captions, "--out", out,
                      "--dimensions", "camera", "--base_url", llm.url, "--concurrency", "1"])
        first = llm.requests[0].user_text
    assert "A static camera films a desk." in first and "How is the camera positioned" in first
    rows = {r["video_id"]: r for r in read_jsonl(out)}
    assert (rows[VIDEO_1]["accuracy"], rows[VIDEO_1]["score"]) == (0.5, 2.5)
    assert (rows[VIDEO_2]["accuracy"], rows[VIDEO_2]["score"]) == (0.0, 1.0)
    assert rows[VIDEO_1]["qa"][0] == {"question": "How is the camera positioned", "answer": "static, eye level",
                                      "response": "the camera is static", "pred": "yes", "score": 4.0}
    assert res["accuracy"]["camera"]["mean"] == 0.25 and res["score"]["overall"]["mean"] == 1.75
    assert res["accuracy"]["overall"]["n"] == 2 and "short" not in res["accuracy"]


def test_vdc_unusable_grade_is_a_failed_record_and_missing_captions_are_named(tmp_path):
    folder = vdc_folder(tmp_path)
    captions = write_jsonl(tmp_path / "c.jsonl", [{"id": f"short/{VIDEO_1}", "caption": "A desk."}])

    def server(req):
        return "clutter" if req.user_text.startswith("Detailed") else "Looks right to me."
    with FakeLLM(responder=server) as llm:
        res = E.main(["vdc", "score", "--data", folder, "--captions", captions, "--dimensions", "short",
                      "--out", str(tmp_path / "s.jsonl"), "--base_url", llm.url, "--reask", "1"])
    assert res["n_failed"] == 1 and "unusable grade reply after 2 tries" in res["failed"][0]["reason"]
    with pytest.raises(SystemExit, match=r"c.jsonl: field 'id': no caption for 2 of the benchmark's ids"):
        E.main(["vdc", "score", "--data", folder, "--captions", captions, "--dimensions", "camera",
                "--out", str(tmp_path / "s2.jsonl")])


def test_vdc_bad_file_names_file_and_line(tmp_path):
    folder = vdc_folder(tmp_path)
    write_jsonl(tmp_path / "short.jsonl", [{VIDEO_1: [{"question": "What?", "answer": "x"}]},
                                           {VIDEO_2: [{"question": "Where?"}]}])
    with pytest.raises(DataError, match=rf"short.jsonl:2: field '{VIDEO_2}\[0\]': expected \{{question"):
        B.read_vdc(folder, ["short"])
    write_jsonl(tmp_path / "short.jsonl", ['{"' + VIDEO_1 + '": [}'])
    with pytest.raises(DataError, match=r"short.jsonl:1: malformed JSON"):
        B.read_vdc(folder, ["short"])


# ----------------------------------------------------------------------------------------------
# ARGUS: {clip_name, human_caption} records, videos/<clip_name>.mp4
# ----------------------------------------------------------------------------------------------

def test_split_sentences_like_argus():
    text = ("A man walks into a kitchen. He opens the fridge; he takes out a bottle of milk!\n"
            "- Then he drinks from it.\n1. Yes. He smiles at the camera.")
    assert B.split_sentences(text) == ["A man walks into a kitchen.", "He opens the fridge;",
                                       "he takes out a bottle of milk!", "Then he drinks from it.",
                                       "Yes. He smiles at the camera."]   # "Yes." too short alone
    assert not B.is_content_line("**Scene Overview**:") and not B.is_content_line("Yes, indeed.")
    assert B.is_content_line("He opens the fridge;")


def J(kind, verdict, evidence=None):
    return B.LineJudgement(kind, verdict, evidence)


def test_argus_cost_three_sentences_by_hand():
    # Source lines S0, S1, S2. Target: T0 an entailed action resting on S1, T1 an entailed action
    # resting on S0 (told after T0, but it happened before it), T2 an entailed visual detail.
    # Base costs: T0 [1, 0, 1], T1 [0, 1, 1], T2 [0, 0, 0]. Aligning T1 at S0 behind T0 at S1
    # costs the order penalty 0.1; any other place for T1 costs at least 1. Optimal cost 0.1.
    # Max cost: one line that is not an entailed action, plus 0.1 for the one pair of entailed
    # actions: 1.1. ArgusCost = 0.1 / 1.1 = 1/11.
    swapped = [J("dynamic-action", "entailment", 1), J("dynamic-action", "entailment", 0),
               J("visual-description", "entailment")]
    cost = B.argus_cost(swapped, 3)
    assert cost.cost == pytest.approx(0.1) and cost.max_cost == pytest.approx(1.1)
    assert cost.normalized == pytest.approx(1 / 11) and cost.path[:2] == [1, 0]
    in_order = [J("dynamic-action", "entailment", 0), J("dynamic-action", "entailment", 1),
                J("visual-description", "entailment")]
    assert B.argus_cost(in_order, 3).normalized == 0.0
    # T2 contradicted instead: it costs 1 wherever it goes: (0.1 + 1) / 1.1 = 1.
    assert B.argus_cost(swapped[:2] + [J("visual-description", "contradiction")], 3).normalized == \
        pytest.approx(1.0)
    # A bigger penalty is still paid once: (0.5) / (1 + 0.5).
    assert B.argus_cost(swapped, 3, order_penalty=0.5).normalized == pytest.approx(1 / 3)
    # Underdetermined lines and an action without evidence cost 1 each: 2 / (3 - 0 + 0).
    assert B.argus_cost([J("summary", "underdetermined"), J("dynamic-action", "contradiction", 0),
                         J("summary", "entailment")], 2).normalized == pytest.approx(2 / 3)


def argus_files(root):
    write_mp4(root / "videos" / "woman_run.mp4", seed=3)
    write_mp4(root / "videos" / "mailman.mp4", seed=4)
    return write_jsonl(root / "argus.jsonl", [
        {"clip_name": "woman_run", "human_caption": "A woman ties her shoes on a bench. She starts running "
                                                   "down the path. She wears a red jacket."},
        {"clip_name": "mailman", "human_caption": "A mailman walks up to a door and leaves a parcel."}])


def nli_server(req):
    """Entails a target line when the source has a line with the same first five words."""
    text = req.user_text
    source = re.findall(r"^S(\d+): (.*)$", text, re.M)
    target = re.findall(r"^Line (\d+): (.*)$", text, re.M)
    lines = []
    for _, t in target:
        hit = next((int(n) for n, s in source if s.split()[:5] == t.split()[:5]), None)
        kind = "visual-description" if "wears" in t else "dynamic-action"
        lines.append({"line": len(lines) + 1, "type": kind, "evidence": hit,
                      "verdict": "entailment" if hit else "underdetermined"})
    return json.dumps({"lines": lines})


def test_argus_score_against_the_http_judge(tmp_path):
    data = argus_files(tmp_path)
    # woman_run, model caption in reverse order of events plus an invented line:
    #   hallucination (target = model lines vs human S1..S3): "She starts running down the path."
    #   -> S2 (action), "A woman ties her shoes on a bench." -> S1 (action, told after: penalty
    #   0.1), "She sings loudly to herself." -> underdetermined (1). Cost 1.1, max 1 + 0.1: 1.0.
    #   omission (target = human lines vs model S1..S3): S1 -> model line 2, S2 -> model line 1
    #   (reverse: 0.1), "She wears a red jacket." -> nothing (1). Cost 1.1 / 1.1 = 1.0.
    # mailman, the same one-line caption: an entailed action at its evidence: 0 both ways.
    captions = write_jsonl(tmp_path / "captions.jsonl", [
        {"id": "woman_run", "caption": "She starts running down the path. A woman ties her shoes on a "
                                       "bench. She sings loudly to herself."},
        {"id": "mailman", "caption": "A mailman walks up to a door and leaves a parcel."}])
    out = str(tmp_path / "argus_scores.jsonl")
    with FakeLLM(responder=nli_server) as llm:
        res = E.main(["argus", "score", "--data", data, "--captions", captions, "--out", out,
                      "--base_url", llm.url, "--concurrency", "1"])
        assert len(llm.requests) == 4                            # two directions per clip
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert rows["woman_run"]["cost_h"] == pytest.approx(1.0) and rows["woman_run"]["cost_o"] == pytest.approx(1.0)
    assert rows["woman_run"]["hallucination"]["raw_cost"] == pytest.approx(1.1)
    assert rows["woman_run"]["hallucination"]["lines"][2]["verdict"] == "underdetermined"
    assert rows["mailman"]["cost_h"] == 0.0 and rows["mailman"]["cost_o"] == 0.0
    assert res["ArgusCost-H"]["mean"] == pytest.approx(0.5) and res["ArgusCost-O"]["n"] == 2
    assert json.load(open(tmp_path / "argus_scores.results.json"))["order_penalty"] == 0.1


def test_argus_judge_reply_checked_and_reasked():
    parse = E.parse_argus_lines
    ok, problems = parse(2, 3, '{"lines": [{"type": "summary", "evidence": null, "verdict": "entailment"}, '
                               '{"type": "dynamic-action", "evidence": "S3", "verdict": "contradiction"}]}')
    assert problems == [] and ok[1] == B.LineJudgement("dynamic-action", "contradiction", 2)
    assert parse(2, 3, '{"lines": []}')[1] == ["0 lines judged, the target has 2"]
    _, problems = parse(1, 2, '{"lines": [{"type": "scene", "evidence": 7, "verdict": "neutral"}]}')
    assert len(problems) == 3 and "evidence 7 is not a source line 1..2" in problems[2]
    reply = '{"lines": [{"type": "summary", "evidence": null, "verdict": "entailment"}]}'
    with FakeLLM(default=reply) as llm:
        llm.push("I think line 1 is fine.")
        args = E.build_parser().parse_args(["argus", "score", "--data", "d", "--captions", "c",
                                            "--out", "o", "--base_url", llm.url, "--backoff", "0.01"])
        lines = E.LLMBenchmarkJudge(args).argus_lines(["A dog runs in a park."], ["A dog runs."])
        assert lines == [B.LineJudgement("summary", "entailment", None)] and len(llm.requests) == 2
        assert "no \"lines\" list" in llm.requests[1].messages[-1]["content"]


def test_argus_caption_step_and_bad_table(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    data = argus_files(tmp_path)
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    out = str(tmp_path / "argus_captions.jsonl")
    res = E.main(["argus", "caption", "--data", data, "--out", out, "--max_new_tokens", "3",
                  "--num_frames", "4", "--device", "cpu"])
    assert res["generated"] == 2 and {r["id"] for r in read_jsonl(out)} == {"woman_run", "mailman"}
    assert E.main(["argus", "caption", "--data", data, "--out", out, "--device", "cpu"])["generated"] == 0
    write_jsonl(tmp_path / "argus.jsonl", [{"clip_name": "woman_run", "human_caption": "A woman runs."},
                                           {"clip_name": "mailman"}])
    with pytest.raises(SystemExit, match=r"argus.jsonl:2: field 'human_caption': expected a string with"):
        E.main(["argus", "caption", "--data", data, "--out", out, "--device", "cpu"])
    write_jsonl(tmp_path / "argus.jsonl", [{"clip_name": "no_such_clip", "human_caption": "A woman runs."}])
    with pytest.raises(SystemExit, match=r"argus.jsonl:1: field 'clip_name': video not found"):
        E.main(["argus", "caption", "--data", data, "--out", out, "--device", "cpu"])


def test_argus_table_as_a_json_list_and_a_pluggable_rules_judge(tmp_path, monkeypatch):
    # The table may come as one JSON list (the dataset viewer's export): errors keep their line.
    argus_files(tmp_path)
    data = write_json(tmp_path / "argus.json", [
        {"clip_name": "woman_run", "human_caption": "A woman ties her shoes on a bench."},
        {"clip_name": "mailman", "human_caption": ""}])
    with pytest.raises(DataError, match=r"argus.json:7: field 'human_caption': expected a string"):
        B.read_argus(data)
    write_json(tmp_path / "argus.json", [{"clip_name": "woman_run",
                                          "human_caption": "A woman ties her shoes on a bench."}])
    assert list(B.read_argus(data)) == ["woman_run"]

    # --judge rules takes whatever the toy world offers with the LLM judge's methods: here one
    # that calls every target line an underdetermined summary, so both costs are 1.
    import synthetic

    class EverythingUnsure:
        def argus_lines(self, source, target):
            return [B.LineJudgement("summary", "underdetermined") for _ in target]
    monkeypatch.setattr(synthetic, "benchmark_rules_judge", EverythingUnsure, raising=False)
    captions = write_jsonl(tmp_path / "c.jsonl", [{"id": "woman_run", "caption": "A man swims in a lake."}])
    res = E.main(["argus", "score", "--judge", "rules", "--data", data, "--captions", captions,
                  "--out", str(tmp_path / "s.jsonl")])
    assert res["ArgusCost-H"]["mean"] == 1.0 and res["ArgusCost-O"]["mean"] == 1.0 and res["judge"] == "rules"
