"""Tests for what the teacher sees and what it may write: --frames (the trainer's own frames
sent as image parts, checked after decoding), the image-rejecting server, and the checks on
every teacher output (recaption, improve, qa, rlaifv, reward) with re-asks, failures and
summary counts. Real HTTP on 127.0.0.1 (tests/fake_llm.py), real H.264 clips."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import eval_judge as E
import gen_chains as gc
import synthetic
from fake_llm import FakeLLM
from test_gen_chains import lines, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a 135M llama.cpp model answered to `improve`, and the pipeline took as the better caption.
GARBAGE = ('[Reply with JSON, please see the JSON example: { "caption": <the corrected caption> }], '
           '[JSON 2] { "subj" : "a red circle", "source": https://example.com/captions/1 }')
# Two more it wrote (llama-cpp-python 0.3.36, SmolLM2-135M-Instruct), clean text about nothing.
SEEN = ["1. Provide detailed feedback with numbered corrections on each instance of incorrect information; "
        "2. Offer an alternative solution that could have been used instead of multiple-step process.",
        "I'm sorry for any confusion. You're welcome, and I'll make sure to explain it in a more "
        "understandable way."]


def http_args(llm, *extra):
    return ["--base_url", llm.url, "--model", "fake", "--timeout", "5", "--max_tries", "3",
            "--backoff", "0.01", "--step_tries", "3", *extra]


def first_user(req) -> dict:
    return next(m for m in req.messages if m["role"] == "user")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 10-frame H.264 clip, 96 wide and 64 high: smooth gradients whose brightness rises frame
    by frame and a soft blob that moves, so every frame differs and JPEG keeps it close."""
    d = tmp_path_factory.mktemp("clip")
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    frames = []
    for t in range(10):
        blob = 120 * np.exp(-((x - 10 - 8 * t) ** 2 + (y - 32) ** 2) / 120)
        rgb = np.stack([x * 1.2 + 10 * t, y * 2.0 + blob, 200 - x - 5 * t + blob], -1)
        frames.append(np.clip(rgb, 0, 255).astype(np.uint8))
    synthetic.write_mp4(str(d / "clip.mp4"), np.stack(frames))
    return d


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    gc.main(["synth", "--out", str(out), "--n", "6", "--seed", "3", "--frames", "8", "--test_frac", "0.34"])
    return out


# ---------------------------------------------------------------------------------------------
# --frames: what the server receives
# ---------------------------------------------------------------------------------------------

def test_recaption_frames_are_the_trainers_frames_shrunk_to_the_cap(clip):
    """--frames 3 --frame_size 48: three image parts, in the video's order, each the frame the
    trainer's reader gives (rank_dpo.load_clip) shrunk to 48 x 32 (aspect kept) and JPEG
    encoded; the captions travel as the text part."""
    from rank_dpo import VideoSampling, load_clip
    inp = write_jsonl(clip / "in.jsonl", [{"id": "v", "video": "clip.mp4",
                                           "captions": ["a blob moves right", "colours brighten"]}])
    with FakeLLM(default="A soft blob moves from left to right while the colours slowly brighten.") as llm:
        s = gc.main(["recaption", "--in", inp, "--out", str(clip / "o.jsonl"), "--frames", "3",
                     "--frame_size", "48", *http_args(llm)])
    assert s["done"] == 1 and s["request_bytes"]["frames"] == 3 and s["request_bytes"]["questions"] == 1
    req = llm.requests[0]
    assert s["request_bytes"]["mean"] == len(json.dumps(req.body["messages"]).encode())
    content = first_user(req)["content"]
    assert [p["type"] for p in content] == ["image_url"] * 3 + ["text"]
    assert "- a blob moves right\n- colours brighten" in content[-1]["text"] and "3 images" in content[-1]["text"]
    frames = load_clip(str(clip / "clip.mp4"), VideoSampling(3)).frames     # [3, 64, 96, 3]
    # The reference: each frame shrunk 2x by averaging 2x2 blocks (not the code's resampler).
    expected = frames.reshape(3, 32, 2, 48, 2, 3).astype(np.float32).mean(axis=(2, 4))
    got = [np.asarray(img.convert("RGB"), dtype=np.float32) for img in req.images()]
    assert all(img.format == "JPEG" and img.size == (48, 32) for img in req.images())
    for i, g in enumerate(got):
        errors = [np.abs(g - e).mean() for e in expected]
        assert errors[i] < 4.0, errors                  # close to its own frame (JPEG, resampling)
        assert int(np.argmin(errors)) == i, errors      # and closer to it than to any other
    assert lines(clip / "o.jsonl")[0]["caption"].startswith("A soft blob")


def test_recaption_with_frames_over_two_servers(synth_dir, tmp_path):
    """The README's command, `recaption --frames 8 --base_url URL1,URL2`, on the synthetic set:
    every record once, each request to one of the two servers with 8 image parts."""
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [{**rec, "video": os.path.join(str(synth_dir), rec["video"])}
                       for rec in lines(synth_dir / "train.jsonl")])
    def reply(req):          # the short captions, joined: long enough, and from them
        text = first_user(req)["content"][-1]["text"]
        return " ".join(line[2:] for line in text.splitlines() if line.startswith("- "))
    with FakeLLM(responder=reply) as one, FakeLLM(responder=reply) as two:
        s = gc.main(["recaption", "--in", inp, "--out", str(tmp_path / "out.jsonl"), "--frames", "8",
                     *http_args(one), "--base_url", f"{one.url},{two.url}", "--concurrency", "2"])
    records = lines(tmp_path / "out.jsonl")
    assert s["done"] == len(records) == len(lines(inp)) and s["failed"] == 0
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in lines(inp))
    requests = one.requests + two.requests
    assert len(requests) == len(records) and one.requests and two.requests
    assert all(len(r.images()) == 8 for r in requests)
    assert [srv["requests"] for srv in s["servers"]] == [len(one.requests), len(two.requests)]


def test_frames_smaller_than_the_cap_are_sent_as_they_are(clip):
    inp = write_jsonl(clip / "in2.jsonl", [{"id": "v", "video": "clip.mp4", "caption": "a blob moves right"}])
    with FakeLLM(default="A soft blob moves from the left side to the right side.") as llm:
        gc.main(["recaption", "--in", inp, "--out", str(clip / "o2.jsonl"), "--frames", "5", *http_args(llm)])
    assert [img.size for img in llm.requests[0].images()] == [(96, 64)] * 5


def test_text_only_without_frames_and_never_imports_torch(tmp_path):
    """No --frames: the content is a plain string and neither rank_dpo nor torch is loaded."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "video": "missing.mp4", "captions": ["a man walks"]}])
    with FakeLLM(default="A man in a coat walks slowly along a quiet street.") as llm:
        code = ("import sys, gen_chains; gen_chains.main(sys.argv[1:]); "
                "assert 'torch' not in sys.modules and 'rank_dpo' not in sys.modules, 'torch was imported'")
        run = subprocess.run([sys.executable, "-c", code, "recaption", "--in", inp, "--out",
                              str(tmp_path / "o.jsonl"), "--base_url", llm.url, "--model", "m"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert isinstance(first_user(llm.requests[0])["content"], str) and not llm.requests[0].image_urls
    assert re.search(r"request size: \d+ bytes of JSON messages\n", run.stderr)


def test_chains_and_the_judges_send_frames_when_asked(synth_dir, tmp_path):
    """chains --frames 2: every degradation request carries the record's two frames;
    eval_judge judge/compare --frames 2: every judge request (both orders) the reference's."""
    train, test = synth_dir / "train.jsonl", synth_dir / "test.jsonl"

    def degrade(req):
        cap = re.search(r"Caption:\n(.*?)\n\n", req.user_text, re.S).group(1)
        color = next(c for c in ("red", "green", "blue", "yellow", "white") if c in cap)
        new = next(c for c in ("purple", "orange") if c not in cap)
        return json.dumps({"caption": cap.replace(color, new, 1)})
    with FakeLLM(responder=degrade) as llm:
        s = gc.main(["chains", "--in", str(train), "--out", str(tmp_path / "c.jsonl"), "--length", "2",
                     "--error_types", "color", "--frames", "2", *http_args(llm)])
    assert s["done"] == len(lines(train)) and len(llm.requests) == 2 * s["done"]
    assert all(len(r.images()) == 2 and r.images()[0].size == (64, 64) for r in llm.requests)
    assert s["request_bytes"]["questions"] == len(llm.requests)

    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "caption": r["caption"]} for r in lines(test)])
    score = '{"relevance": 7, "descriptiveness": 6, "temporal_consistency": 8, "fluency": 9}'
    with FakeLLM(responder=lambda req: '{"better": "1"}' if "Caption 1:" in req.user_text else score) as llm:
        res = E.main(["judge", "--judge", "llm", "--pred", preds, "--ref", str(test), "--out",
                      str(tmp_path / "j.jsonl"), "--frames", "2", "--frame_size", "32",
                      "--base_url", llm.url, "--model", "m"])
        assert res["n_scored"] == len(lines(test)) and res["request_bytes"]["frames"] == 2
        assert all(len(r.images()) == 2 and r.images()[0].size == (32, 32) for r in llm.requests)
        n = len(llm.requests)
        res = E.main(["compare", "--judge", "llm", "--a", preds, "--b", preds, "--ref", str(test), "--out",
                      str(tmp_path / "cmp.jsonl"), "--frames", "1", "--base_url", llm.url, "--model", "m",
                      "--max_tokens", "16"])
    assert len(llm.requests) - n == 2 * len(lines(test))             # both orders, each with the frame
    assert all(len(r.images()) == 1 for r in llm.requests[n:])


def test_frames_need_a_video_and_an_llm(synth_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "captions": ["x y"]}])
    with pytest.raises(SystemExit, match=r"in.jsonl:1: field 'video': --frames 2 needs the record's video"):
        gc.main(["recaption", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--frames", "2",
                 "--base_url", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="--frames is for --backend http"):
        gc.main(["chains", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"), "--out",
                 str(tmp_path / "c.jsonl"), "--frames", "2"])


def test_a_server_that_rejects_images_stops_the_run_with_one_clear_error(clip):
    """llama-cpp-python without a vision projector answers image parts with HTTP 500 (seen on
    a real one): the run stops at the first request with what to do, no retries."""
    inp = write_jsonl(clip / "in3.jsonl", [{"id": f"v{i}", "video": "clip.mp4", "caption": f"blob number {i}"}
                                           for i in range(6)])
    with FakeLLM(vision=False) as llm:
        url = llm.url
        with pytest.raises(SystemExit) as e:
            gc.main(["recaption", "--in", inp, "--out", str(clip / "o3.jsonl"), "--frames", "2",
                     "--concurrency", "1", *http_args(llm)])
    asked = [re.search(r"blob number \d", r.user_text).group(0) for r in llm.requests]
    assert len(asked) == len(set(asked)) <= 2        # no request retried; the record queued behind stops too
    assert f"the server at {url}/chat/completions does not accept images" in str(e.value)
    assert "drop --frames or serve a vision model" in str(e.value)
    # Only an error about images, to a request that has some, is taken for a refusal of images;
    # any other 500 is retried as before.
    with_image = gc.with_frames([{"role": "user", "content": "t"}],
                                [gc.image_part(gc.frame_image(np.zeros((4, 4, 3), np.uint8), 4))])
    assert gc.refuses_images(400, "HTTP 400: image input is not supported by this model", with_image)
    assert not gc.refuses_images(500, 'HTTP 500: can only concatenate str (not "list") to str',
                                 [{"role": "user", "content": "text only"}])
    assert not gc.refuses_images(500, "HTTP 500: out of memory", with_image)


# ---------------------------------------------------------------------------------------------
# Checking what the teacher writes
# ---------------------------------------------------------------------------------------------

REF = "A small red circle appears on the left and moves up, then a large blue square enters from the right."
SAMPLE = "A small green circle appears on the left and moves down, then a large blue square enters."


def kinds(problems):
    return [gc.problem_kind(p) for p in problems]


def correction_problems(reply: str) -> list[str]:
    messages = gc.improve_messages(REF, SAMPLE)
    check = lambda v: gc.check_correction(REF, SAMPLE, gc.instruction_words(messages, REF, SAMPLE),
                                          gc.length_bounds(REF, SAMPLE), v)
    return gc.checked_reply(gc.parse_correction, check, reply)[1]


def test_the_garbage_a_small_model_wrote_is_rejected_for_improve():
    assert gc.parse_caption_reply(GARBAGE) is not None           # it parses: the checks must catch it
    assert kinds(correction_problems(GARBAGE)) == ["markup", "template remnant", "chat talk", "off_topic"]
    assert kinds(correction_problems(SEEN[0])) == ["markup", "off_topic"]
    assert kinds(correction_problems(SEEN[1])) == ["chat talk", "off_topic"]


@pytest.mark.parametrize("reply,expected", [
    ('{"caption": "' + REF + '"}', []),
    ('Sure! Here is the corrected caption: "' + REF + '"', []),
    ('{"already_correct": true}', []),
    ('{"caption": "' + SAMPLE + '"}', ["unchanged"]),
    ('{"caption": "See https://example.com for the corrected caption of the red circle"}', ["markup", "off_topic"]),
    ('{"caption": "A small red circle appears on the left and moves up, then a large blue square enters '
     'from the right. Please let me know."}', ["chat talk"]),
    ('## Corrected\n' + REF, ["markup"]),
    ('{"caption": "<b>A small red circle</b> appears on the left and moves up."}', ["markup"]),
    # accepted from SmolLM2-135M before a string assignment counted as code
    ('new_text = f"A small red circle appears on the left and moves up, then a large blue square enters.',
     ["markup"]),
    ('{"caption": "Rewrite the model\'s caption so that it is correct: fix every statement."}',
     ["prompt echo", "off_topic"]),
    ('{"caption": "A red circle."}', ["too_short"]),
    ('{"caption": "' + " ".join([REF] * 4) + '"}', ["too_long"]),
])
def test_improve_checks(reply, expected):
    assert kinds(correction_problems(reply)) == expected


def test_qa_claims_reward_and_recaption_checks():
    qa_msgs = gc.qa_messages(REF, 2)
    instruction = gc.instruction_words(qa_msgs, REF)
    good = {"question": "What colour is the circle?", "answer": "The circle is red."}
    check_qa = lambda item: kinds(gc.check_qa(REF, instruction, [item]))
    assert check_qa(good) == []
    assert check_qa({"question": "The circle colour", "answer": "red"}) == ["question N is not a plain question"]
    assert check_qa({"question": "What moves?", "answer": "What moves?"}) == ["answer N repeats its question"]
    assert check_qa({"question": "What moves?", "answer": "..."}) == ["answer N: empty"]
    assert check_qa({"question": "What moves?", "answer": "{\"answer\": \"circle\"}"}) == ["answer N: markup"]
    assert check_qa({"question": "What moves?", "answer": "<your answer here>"}) == \
        ["answer N: markup", "answer N: template remnant", "answer N: off_topic"]
    assert check_qa({"question": "What moves?", "answer": "each with its correct answer in one or two full sentences"}) \
        == ["answer N: prompt echo", "answer N: off_topic"]
    assert check_qa({"question": "What moves?", "answer": "A purple hexagon dances."}) == ["answer N: off_topic"]

    assert gc.check_claims(REF, ["A small red circle appears on the left.", "The circle moves up."]) == []
    assert kinds(gc.check_claims(REF, ["A green circle appears.", "The circle moves up."])) == \
        ["claim N is not from the caption"]
    assert kinds(gc.check_claims(REF, ["...", "the circle moves up", "The circle moves up."])) == \
        ["claim N is not from the caption", "repeated claims"]
    assert kinds(gc.check_claims(REF, ['{"claims": ["a red circle"]}'])) == ["claim N is not plain text"]

    assert gc.check_reward({"score": 5}) == [] and kinds(gc.check_reward({"score": 9})) == ["score out of range"]
    # seen from SmolLM2-135M with the schema form: verdict and score each valid, together a guess
    assert gc.check_reward({"verdict": "yes", "score": 5}) == gc.check_reward({"verdict": "no", "score": 2}) == []
    assert kinds(gc.check_reward({"verdict": "no", "score": 5})) == ["verdict contradicts score"]
    assert kinds(gc.check_reward({"verdict": "yes", "score": 0})) == ["verdict contradicts score"]

    srcs = ["a red circle moves up", "a blue square enters"]
    parse = lambda t: gc.parse_recaption(5, gc.instruction_words(gc.recaption_messages(srcs), *srcs), 30, srcs, t)
    assert parse("A small red circle moves up, then a blue square enters from the right.")[1] == []
    assert kinds(parse("Write one detailed caption of the video that states every fact.")[1]) == \
        ["prompt echo", "off_topic"]
    assert kinds(parse(SEEN[1])[1]) == ["chat talk", "off_topic"]
    assert kinds(parse(" ".join(["a red circle moves up"] * 8))[1]) == ["too_long"]
    assert parse("Circle.")[1] == ["too_short"]
    # accepted from SmolLM2-135M before "you've" counted as chat talk
    assert "chat talk" in kinds(parse("A red circle moves up and a blue square enters. The description does not "
                                      "invent anything. So that's all you've got to add.")[1])


def test_improve_reasks_then_fails_and_a_failed_correction_is_never_a_pair(synth_dir, tmp_path):
    """Garbage is asked again with what was wrong, then accepted once clean; a record whose every
    reply is garbage is written failed with the reasons, and no pair of it reaches the output."""
    refs = {r["id"]: r["caption"] for r in lines(synth_dir / "train.jsonl")}
    ids = sorted(refs)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "answers": [refs[i].replace("appears", "shows up", 1)
                                                                       + " The end."]} for i in ids])
    always_bad, once_bad = ids[0], ids[1]

    def teacher(req):
        rid = next(i for i in ids if refs[i] in gc_text(req))
        if rid == always_bad or (rid == once_bad and len(req.messages) == 2):
            return GARBAGE
        return json.dumps({"caption": refs[rid]})
    with FakeLLM(responder=teacher) as llm:
        s = gc.main(["improve", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                     "--out", str(tmp_path / "o.jsonl"), *http_args(llm)])
    out = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert out[always_bad]["status"] == "failed" and "chain" not in out[always_bad]
    assert out[always_bad]["reply"] == GARBAGE                      # the last rejected reply, to read
    assert out[always_bad]["reason"].startswith("every try rejected (markup (JSON braces")
    assert out[always_bad]["reason"].count("template remnant") == 3 and "off_topic" in out[always_bad]["reason"]
    assert out[once_bad]["status"] == "ok" and out[once_bad]["llm_calls"] == 2
    reask = [r for r in llm.requests if refs[once_bad] in gc_text(r)][1].messages
    assert reask[2]["content"] == GARBAGE and reask[3]["content"].startswith("I could not use your reply: markup")
    pairs = [r for r in out.values() if r["status"] == "ok"]
    assert len(pairs) == len(ids) - 1 and all(r["chain"][0] == refs[r["id"]] for r in pairs)
    assert all("{" not in r["chain"][0] for r in pairs)
    assert s["failed"] == 1
    assert s["rejected"] == {"markup": 4, "template remnant": 4, "chat talk": 4, "off_topic": 4}


def gc_text(req) -> str:
    return "\n".join(m["content"] for m in req.messages if isinstance(m["content"], str))


def test_rlaifv_claims_not_in_the_sample_fail_the_record_and_reward_counts_its_range(synth_dir, tmp_path):
    refs = {r["id"]: r["caption"] for r in lines(synth_dir / "train.jsonl")}
    ids = sorted(refs)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "answers": [refs[i], refs[i].replace("appears", "is", 1)]}
                                                 for i in ids])

    def teacher(req):
        text = first_user(req)["content"]
        if text.startswith("Caption of a video"):
            cap = text.split("\n", 2)[1]
            sentences = [x.strip() + "." for x in cap.split(".") if x.strip()]
            if refs[ids[0]] in text:
                sentences[0] = "A purple hexagon dances."             # invented: not from the caption
            return json.dumps({"claims": sentences})
        return '{"verdict": "yes"}'
    with FakeLLM(responder=teacher) as llm:
        s = gc.main(["rlaifv", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                     "--out", str(tmp_path / "o.jsonl"), *http_args(llm)])
    out = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert out[ids[0]]["status"] == "failed" and "claim 1 is not from the caption (purple, hexagon, dances)" \
        in out[ids[0]]["reason"] and "chain" not in out[ids[0]]
    assert s["rejected"] == {"claim N is not from the caption": 3}

    inp = write_jsonl(tmp_path / "r.jsonl", [{"id": "q", "caption": "c", "question": "q?", "answers": ["a", "b"]}])
    with FakeLLM() as llm:
        llm.push('{"verdict": "yes", "score": 7}', '{"verdict": "yes", "score": 4}', '{"verdict": "no", "score": 1}')
        s = gc.main(["reward", "--in", inp, "--out", str(tmp_path / "ro.jsonl"), *http_args(llm)])
    assert s["rejected"] == {"score out of range": 1} and lines(tmp_path / "ro.jsonl")[0]["scores"] == [4, 1]


def test_the_on_policy_teacher_looks_at_the_reference_video(synth_dir, tmp_path):
    """rlaifv --frames 1: checking a claim against the reference carries the reference record's
    frame; splitting a sample into claims is about its text and carries none."""
    refs = {r["id"]: r["caption"] for r in lines(synth_dir / "train.jsonl")}
    rid = sorted(refs)[0]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": rid, "answers": [refs[rid], "A circle appears."]}])

    def teacher(req):
        text = req.user_text
        if text.startswith("Caption of a video"):
            return json.dumps({"claims": [text.split("\n", 2)[1]]})
        claim = re.search(r"Claim: (.*?)\n\n", text, re.S).group(1)
        return '{"verdict": "yes"}' if claim == refs[rid] else '{"verdict": "no"}'
    with FakeLLM(responder=teacher) as llm:
        s = gc.main(["rlaifv", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                     "--out", str(tmp_path / "o.jsonl"), "--frames", "1", *http_args(llm)])
    split = [r for r in llm.requests if r.user_text.startswith("Caption of a video")]
    checked = [r for r in llm.requests if r not in split]
    assert len(split) == 2 and not any(r.image_urls for r in split)
    assert len(checked) == 2 and all(len(r.images()) == 1 for r in checked)
    assert s["request_bytes"]["questions"] == 4 and lines(tmp_path / "o.jsonl")[0]["status"] == "ok"


def test_mcq_options_must_say_what_the_captions_say():
    """SmolLM2-135M's accepted mcq record: both steps only moved words ('right' was already said,
    an order swap), so no error marker tied the options to the captions."""
    chain = ["Two red circles appear at the bottom and move right. Then three white squares appear at the center.",
             "Two red circles appear at the bottom and move right. Then three white squares appear at the right.",
             "Three white squares appear at the right. Then two red circles appear at the bottom and move right."]
    assert gc.error_markers(chain) == [set(), set()]
    garbage = json.dumps({"question": "Is the video caption I gave you contains multiple-choice questions?",
                          "options": ["*", "yes", "no"]})
    value, problems = gc.parse_chain_mcq(chain, garbage)
    assert value is None and kinds(problems) == ["option N says nothing the captions say"] * 3
    good = json.dumps({"question": "Where are the white squares?",
                       "options": ["white squares at the center", "white squares at the right",
                                   "white squares first, then red circles"]})
    assert gc.parse_chain_mcq(chain, good)[1] == []
    value, problems = gc.parse_chain_ynq(chain, json.dumps({"questions": [
        "Is the sky blue?", "Are the squares at the right?", "Do the circles come last?"]}))
    assert kinds(problems) == ["question N says nothing the captions say"]


def test_reward_asks_each_answer_step_tries_times(tmp_path):
    inp = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "caption": "A red ball rolls left.",
                                              "question": "What rolls?", "answers": ["A red ball.", "A cube."]}])
    with FakeLLM(default="I cannot grade this.") as llm:
        s = gc.main(["reward", "--in", inp, "--out", str(tmp_path / "r.jsonl"), *http_args(llm, "--step_tries", "2")])
    assert s["failed"] == 1 and s["requests"]["sent"] == 2      # the first answer's two tries, then the record fails
