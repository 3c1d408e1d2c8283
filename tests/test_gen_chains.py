"""Tests for gen_chains.py: the HTTP client against a fake server with faults, resumability
(kill -9 in a real subprocess), input errors, the synthetic set, the fact matcher, the rule
backend and every subcommand. Everything runs offline on 127.0.0.1."""
from __future__ import annotations

import json
import os
import time

import pytest

import gen_chains as gc
import synthetic
from fake_llm import FakeLLM, Reply

KEY = "sk-test-SECRET-0123456789abcdef"


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# The HTTP client
# ---------------------------------------------------------------------------------------------

def test_client_retries_each_fault_then_succeeds():
    with FakeLLM(default="fine") as llm:
        llm.push(Reply.error(429, retry_after="0.2"), Reply.error(500), Reply.hang(3.0),
                 Reply.malformed(), Reply.empty(), Reply.error(503), "the answer")
        client = gc.ChatClient(llm.url, "m", api_key=KEY, timeout=0.5, max_tries=8, backoff=0.01)
        t0 = time.monotonic()
        reply = client.chat([{"role": "user", "content": "hi"}])
        assert reply.text == "the answer"
        assert reply.completion_tokens == 2
        assert time.monotonic() - t0 >= 0.2 + 0.5          # waited Retry-After and the timeout
        assert client.usage["requests"] == 7 and client.usage["retries"] == 6
        assert llm.requests[0].headers["Authorization"] == f"Bearer {KEY}"
        assert llm.requests[0].body["model"] == "m"
        assert llm.requests[0].path == "/v1/chat/completions"


def test_client_gives_up_after_max_tries_without_leaking_the_key():
    with FakeLLM() as llm:
        llm.push(*[Reply.error(500, message=f"upstream broke, you sent {KEY}")] * 3)
        client = gc.ChatClient(llm.url, "m", api_key=KEY, max_tries=3, backoff=0.01)
        with pytest.raises(gc.ChatError) as e:
            client.chat([{"role": "user", "content": "hi"}])
        assert "gave up after 3 tries" in str(e.value) and "HTTP 500" in str(e.value)
        assert KEY not in str(e.value) and KEY not in repr(client)
        assert not e.value.fatal
        llm.push(Reply.error(401, message=f"bad key {KEY}"))
        with pytest.raises(gc.ChatError) as e:
            client.chat([{"role": "user", "content": "hi"}])
        assert e.value.fatal and "HTTP 401" in str(e.value) and KEY not in str(e.value)


def test_retry_after_http_date():
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 3))
    assert 1.5 <= gc.retry_after_seconds(date, now=now) <= 3.5
    assert gc.retry_after_seconds("2") == 2.0
    assert gc.retry_after_seconds("soon") is None and gc.retry_after_seconds(None) is None


def test_connection_refused_is_retried_then_fails():
    with FakeLLM() as llm:
        url = llm.url
    client = gc.ChatClient(url, "m", max_tries=2, backoff=0.01, timeout=1)
    with pytest.raises(gc.ChatError, match="connection error"):
        client.chat([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------
# Parsing LLM text
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ('{"a": 1}', {"a": 1}),
    ('Sure! Here it is:\n```json\n{"a": 1, "b": [2, 3],}\n```\nHope this helps.', {"a": 1, "b": [2, 3]}),
    ("The verdict: {'verdict': 'yes', 'score': 4} done", {"verdict": "yes", "score": 4}),
    ('text {"s": "a } brace"} more', {"s": "a } brace"}),
    ("no json here", None),
    ("", None),
])
def test_parse_json_object(text, expected):
    assert gc.parse_json_object(text) == expected


def test_format_mcq():
    s = gc.format_mcq("Which one?", ["first  option", "second"])
    assert s == "Which one?\nA. first option\nB. second\nAnswer with the option's letter."
    with pytest.raises(ValueError):
        gc.format_mcq("q", ["only one"])


# ---------------------------------------------------------------------------------------------
# The synthetic set, match_facts and the rule backend
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    gc.main(["synth", "--out", str(out), "--n", "40", "--seed", "3"])
    return out


def test_synth_writes_videos_captions_and_facts(synth_dir, tmp_path):
    import numpy as np
    train, test = lines(synth_dir / "train.jsonl"), lines(synth_dir / "test.jsonl")
    assert (len(train), len(test)) == (36, 4)
    assert len({r["id"] for r in train + test}) == 40
    vocab = set()
    for rec in train + test:
        video = np.load(synth_dir / rec["video"])
        assert video.shape == (16, 64, 64, 3) and video.dtype == np.uint8
        assert rec["caption"] == synthetic.caption_from_facts(rec["facts"])
        m = synthetic.match_facts(rec["caption"], rec["facts"])
        assert m["correct"] == m["total"] == 2 + 6 * len(rec["facts"]["objects"]) and m["wrong"] == 0
        assert m["order_correct"] is True
        vocab |= set(gc._tokens(rec["caption"]))
    assert len(vocab) < 60                      # a tiny model's vocabulary
    # Deterministic by seed: the same command writes the same bytes.
    gc.main(["synth", "--out", str(tmp_path), "--n", "40", "--seed", "3"])
    assert (tmp_path / "train.jsonl").read_bytes() == (synth_dir / "train.jsonl").read_bytes()
    assert (tmp_path / train[5]["video"]).read_bytes() == (synth_dir / train[5]["video"]).read_bytes()


def test_rendered_video_shows_its_facts():
    import numpy as np
    facts = {"background": "gray", "events": [["appear", 0], ["appear", 1], ["disappear", 0]],
             "frames": [0, 5, 10],
             "objects": [{"count": 1, "size": "large", "color": "red", "shape": "square",
                          "position": "left", "direction": "up"},
                         {"count": 3, "size": "small", "color": "blue", "shape": "circle",
                          "position": "right", "direction": "left"}]}
    video = synthetic.render_scene(facts)
    red = np.all(video == synthetic.COLORS["red"], axis=-1)
    blue = np.all(video == synthetic.COLORS["blue"], axis=-1)
    assert np.all(video[:, 0, 32] == synthetic.BACKGROUNDS["gray"])
    assert red[:10].any(axis=(1, 2)).all() and not red[10:].any()        # visible frames 0..9
    assert not blue[:5].any() and blue[5:].any(axis=(1, 2)).all()        # appears at frame 5
    ys, xs = np.nonzero(red[0])
    assert xs.mean() < 32 and abs(ys.mean() - 32) < 2                     # starts on the left
    assert np.nonzero(red[9])[0].mean() < ys.mean() - 8                   # moved up
    bx0, bx1 = np.nonzero(blue[5])[1].mean(), np.nonzero(blue[15])[1].mean()
    assert bx0 > 40 and bx1 < bx0 - 8                                     # right, moving left
    assert red[0].sum() == 13 * 13                                        # one large square
    assert blue[5].sum() == 3 * synthetic._shape_mask("circle", synthetic.SIZES["small"]).sum()   # three small circles


def test_rules_chains_unconditioned_and_too_long(synth_dir, tmp_path):
    out = tmp_path / "u.jsonl"
    s = gc.main(["chains", "--backend", "rules", "--unconditioned", "--in", str(synth_dir / "test.jsonl"),
                 "--out", str(out), "--length", "5"])
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "test.jsonl")}
    for rec in lines(out):
        assert [synthetic.match_facts(c, facts[rec["id"]])["wrong"] for c in rec["chain"]] == [0, 1, 2, 3, 4, 5]
    assert sum(s["steps_by_type"].values()) == 5 * 4
    # More steps than a scene has facts: written as failed, with the reason.
    s = gc.main(["chains", "--backend", "rules", "--in", str(synth_dir / "test.jsonl"),
                 "--out", str(tmp_path / "long.jsonl"), "--length", "30"])
    reasons = [r["reason"] for r in lines(tmp_path / "long.jsonl")]
    assert s["failed"] == 4 and all(("facts can be changed" in r or "keeps the chain exact" in r) for r in reasons)


def test_rules_chain_kth_caption_has_exactly_k_wrong_facts(synth_dir):
    records = lines(synth_dir / "train.jsonl")
    seen_types = set()
    for rec in records:
        chain, errors = synthetic.rules_chain(rec, 6, seed=0)
        assert len(chain) == 7 and errors[0] is None and len(set(chain)) == 7
        for k, caption in enumerate(chain):
            m = synthetic.match_facts(caption, rec["facts"])
            assert (m["wrong"], m["correct"], m["missing"]) == (k, m["total"] - k, 0), (k, caption)
        seen_types |= {e["type"] for e in errors[1:]}
        assert synthetic.rules_chain(rec, 6, seed=0) == (chain, errors)          # deterministic by seed
    assert seen_types == {"scene", "temporal", "count", "attribute", "color", "object", "spatial", "direction"}
    assert any(synthetic.rules_chain(r, 6, seed=1)[0] != synthetic.rules_chain(r, 6, seed=0)[0] for r in records[:3])


def test_match_facts_on_model_written_text():
    facts = {"background": "black", "frames": [0, 4, 8],
             "events": [["appear", 0], ["appear", 1], ["disappear", 0]],
             "objects": [{"count": 2, "size": "small", "color": "red", "shape": "circle",
                          "position": "left", "direction": "up"},
                         {"count": 1, "size": "large", "color": "blue", "shape": "square",
                          "position": "top", "direction": "right"}]}
    gold = synthetic.caption_from_facts(facts)
    assert synthetic.match_facts(gold, facts)["correct"] == 14
    # Paraphrase with synonyms: every fact still read.
    para = ("Two little red balls enter from the left and head upwards, then a big blue box shows up at the "
            "top and drifts to the right; later the red balls vanish. The backdrop is black.")
    m = synthetic.match_facts(para, facts)
    assert (m["correct"], m["wrong"], m["missing"], m["order_correct"]) == (14, 0, 0, True)
    # Partial: only one object, in other words.
    m = synthetic.match_facts("Two little red balls show up on the left side and slide upwards.", facts)
    assert (m["correct"], m["wrong"], m["missing"]) == (6, 0, 8) and m["order_correct"] is None
    # Repetitive: the same sentence three times counts once.
    rep = "A big blue box appears at the top and moves to the right. " * 3
    m = synthetic.match_facts(rep, facts)
    assert (m["correct"], m["wrong"], m["hallucinated"]) == (6, 0, 0)
    # Wrong facts, a hallucinated object and events out of order.
    bad = ("First, a large blue square appears at the top and moves left. Then two small red circles "
           "appear on the left and move up. Then a green triangle appears. Finally, the red circles "
           "disappear. The background is gray.")
    m = synthetic.match_facts(bad, facts)
    assert m["by_kind"]["direction"] == {"correct": 1, "wrong": 1}
    assert m["by_kind"]["background"] == {"wrong": 1}
    assert m["order_correct"] is False and m["hallucinated"] == 1
    assert m["wrong"] == 1 + 1 + 1 + 1                        # direction, background, order, green triangle
    # Garbled and empty text state nothing.
    for text in ("", "colour colour the the and", "asdf qwer zxcv"):
        m = synthetic.match_facts(text, facts)
        assert (m["correct"], m["wrong"], m["missing"]) == (0, 0, 14)
    # A disappearance that never happens is an order error.
    m = synthetic.match_facts("A large blue square appears at the top. Then the blue square disappears.", facts)
    assert m["order_correct"] is False


def test_error_type_applicability():
    people = "A young man in a red shirt walks to the left, then he picks up two cups in the kitchen."
    types = set(gc.applicable_error_types(people))
    assert {"object", "color", "action", "count", "spatial", "temporal", "direction", "scene", "person"} <= types
    assert "camera" not in types
    assert "camera" in gc.applicable_error_types("The camera zooms in on a dog sleeping.")
    assert gc.applicable_error_types("Hello.") == []


# ---------------------------------------------------------------------------------------------
# Cleaning and checking what the LLM returns
# ---------------------------------------------------------------------------------------------

PREV = "A small red circle appears on the left and moves up, then a blue square appears at the top."
NEW = "A small green circle appears on the left and moves up, then a blue square appears at the top."


@pytest.mark.parametrize("reply", [
    NEW,
    f'{{"caption": "{NEW}"}}',
    f'Sure! Here is the modified caption:\n\n"{NEW}"',
    f"**Modified caption:** {NEW}\n\nExplanation: I changed red to green.",
    f"```\n{NEW}\n```",
    f"Caption: {NEW} (changed red to green)",
    f"Okay, here's the caption with one colour error.\n\n{NEW}\n\nNote: the error is the colour.",
    f"Here you go:\n> {NEW}",
    f"Sure! Here is the edited caption: {NEW}",
])
def test_clean_reply_unwraps(reply):
    caption, _ = gc.clean_reply(reply)
    assert caption.lstrip("> ") == NEW


@pytest.mark.parametrize("caption", ["Great white sharks swim past a diver.", "Okay signs are held up by two men.",
                                     "Sure-footed goats climb a rocky cliff."])
def test_clean_reply_keeps_captions_that_look_like_preambles(caption):
    assert gc.clean_reply(caption)[0] == caption


def test_check_step_reasons():
    lim = gc.StepLimits()
    assert gc.check_step(PREV, NEW, [], lim) is None
    assert gc.check_step(PREV, "", [], lim) == "empty"
    assert gc.check_step(PREV, PREV.upper(), [], lim) == "unchanged"
    assert gc.check_step(PREV, "A small green circle appears.", [], lim) == "too_short"
    assert gc.check_step(PREV, NEW + " It is sunny and a dog barks loudly at everyone nearby.", [], lim) == "too_long"
    rewrite = "Two large yellow squares slide down from the right while the red dot waits in the middle."
    assert gc.check_step(PREV, rewrite, [], lim) == "too_different"
    assert gc.check_step(NEW, NEW.replace("blue", "white"), [["green"]], lim) is None
    assert gc.check_step(NEW, PREV.replace("blue", "white"), [["green"]], lim) == "lost_earlier_error"
    detail, added = gc.word_diff(PREV, NEW)
    assert detail == "red -> green" and added == ["green"]


# ---------------------------------------------------------------------------------------------
# chains over HTTP against the fake server, with faults
# ---------------------------------------------------------------------------------------------

SWAPS = {"red": "purple", "green": "orange", "blue": "pink", "yellow": "brown", "white": "violet",
         "circle": "hexagon", "square": "star", "triangle": "diamond"}


def caption_in(req) -> str:
    return req.user_text.split("Caption:\n", 1)[1].split("\n\n", 1)[0]


def requested_type(req) -> str | None:
    return next((name for name, t in gc.ERROR_TYPES.items() if t.instruction in req.user_text), None)


def one_swap(caption: str, etype: str | None = None) -> str:
    """What a well-behaved LLM does: change one word into one outside the original vocabulary
    (so later steps cannot undo it); which word depends on the requested error type."""
    import re
    present = [w for w in SWAPS if re.search(rf"\b{w}", caption)]
    if not present:
        return caption.replace("moves", "jumps", 1)
    pick = present[sorted(gc.ERROR_TYPES).index(etype) % len(present)] if etype else present[0]
    return re.sub(rf"\b{pick}", SWAPS[pick], caption, count=1)


def is_one_swap(old: str, new: str) -> bool:
    a, b = old.split(), new.split()
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    return len(a) == len(b) and len(diff) == 1 and any(y.startswith(v) for v in SWAPS.values() for y in diff[0][1:])


class ScriptedLLM:
    """A responder that degrades captions correctly, except on the requests listed in `faults`
    (numbered from 1 among the requests that reach it), where it misbehaves."""

    def __init__(self, faults=None):
        import threading
        self.faults, self.n, self.lock = dict(faults or {}), 0, threading.Lock()

    def __call__(self, req):
        with self.lock:                         # the server answers from several threads
            self.n += 1
            n = self.n
        if "caption" not in req.user_text.lower():
            return "?"
        prev = caption_in(req)
        if "FAILME" in prev:
            return Reply.error(500)
        if "STUBBORN" in prev:
            return prev
        good = one_swap(prev, requested_type(req))
        kind = self.faults.get(n)
        return {None: json.dumps({"caption": good}),
                "preamble": f"Sure! Here is the caption with the error:\n\n\"{good}\"\n\nI changed one word.",
                "markdown": f"**Modified caption:** {good}\n\nExplanation: swapped a colour.",
                "unchanged": json.dumps({"caption": prev}),
                "cannot": '{"cannot_apply": true}',
                "rewrite": " ".join(reversed(prev.split())),
                "truncated": " ".join(prev.split()[:4]),
                "plain": good}[kind]


def http_args(llm, *extra):
    return ["--base_url", llm.url, "--model", "fake", "--api_key", KEY, "--timeout", "0.5",
            "--max_tries", "6", "--backoff", "0.01", *extra]


def test_chains_http_with_faults(synth_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", lines(synth_dir / "train.jsonl")[:6])
    out = tmp_path / "chains.jsonl"
    scripted = ScriptedLLM({1: "preamble", 2: "unchanged", 3: "cannot", 4: "rewrite", 5: "markdown",
                            6: "truncated", 8: "plain"})
    with FakeLLM(responder=scripted) as llm:
        llm.push(Reply.error(429, retry_after="0.3"), Reply.error(500), Reply.hang(2.0), Reply.malformed(),
                 Reply.empty(), Reply.error(503, retry_after="0"), Reply.error(408))
        summary = gc.main(["chains", "--in", inp, "--out", str(out), "--length", "3", "--concurrency", "3",
                           *http_args(llm)])
    got = lines(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in lines(inp))
    for rec in got:
        assert rec["status"] == "ok" and len(rec["chain"]) == 4 and rec["errors"][0] is None
        assert rec["prompt"] == gc.DEFAULT_PROMPT and rec["video"].endswith(".npy")
        for k in range(1, 4):
            assert is_one_swap(rec["chain"][k - 1], rec["chain"][k])       # one change per step, kept
            assert rec["errors"][k]["type"] in gc.ERROR_TYPES and " -> " in rec["errors"][k]["detail"]
    assert {"unchanged", "cannot_apply", "too_different", "too_short"} <= set(summary["rejected"])
    assert summary["done"] == 6 and summary["failed"] == 0
    assert summary["requests"]["retries"] >= 7 and summary["tokens"]["completion"] > 0
    assert sum(summary["steps_by_type"].values()) == 18


def test_chains_http_records_failures(synth_dir, tmp_path):
    recs = lines(synth_dir / "train.jsonl")[:3]
    recs[0] = {**recs[0], "caption": recs[0]["caption"] + " FAILME"}
    recs[1] = {**recs[1], "caption": recs[1]["caption"] + " STUBBORN"}
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "chains.jsonl"
    with FakeLLM(responder=ScriptedLLM()) as llm:
        summary = gc.main(["chains", "--in", inp, "--out", str(out), "--length", "2", "--step_tries", "3",
                           *http_args(llm, "--max_tries", "2")])
    got = {r["id"]: r for r in lines(out)}
    assert (summary["done"], summary["failed"]) == (1, 2)
    assert got[recs[0]["id"]]["status"] == "failed"
    assert "gave up after 2 tries: HTTP 500" in got[recs[0]["id"]]["reason"]
    stubborn = got[recs[1]["id"]]
    assert stubborn["status"] == "failed"
    assert stubborn["reason"] == "step 1: every try rejected (unchanged, unchanged, unchanged)"
    assert stubborn["partial_chain"] == [recs[1]["caption"]]
    assert got[recs[2]["id"]]["status"] == "ok"


def test_chains_http_unconditioned_lets_the_llm_choose(synth_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", lines(synth_dir / "train.jsonl")[:2])

    def responder(req):
        assert "a kind you choose" in req.user_text and "one error of this kind" not in req.user_text
        return json.dumps({"caption": one_swap(caption_in(req)), "type": "colour"})
    with FakeLLM(responder=responder) as llm:
        gc.main(["chains", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--length", "2",
                 "--unconditioned", *http_args(llm)])
    for rec in lines(tmp_path / "o.jsonl"):
        assert [e["type"] for e in rec["errors"][1:]] == ["color", "color"]


# ---------------------------------------------------------------------------------------------
# Never lose or duplicate: kill -9 in the middle, then the same command again
# ---------------------------------------------------------------------------------------------

GEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gen_chains.py")


def test_kill9_mid_run_then_resume_gives_every_id_exactly_once(synth_dir, tmp_path):
    import signal
    import subprocess
    import sys
    base = lines(synth_dir / "train.jsonl")
    recs = [{"id": f"k{i:03d}", "caption": base[i % len(base)]["caption"]} for i in range(48)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"

    def count() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    with FakeLLM(responder=ScriptedLLM(), latency=0.03) as llm:
        cmd = [sys.executable, GEN, "chains", "--in", inp, "--out", str(out), "--length", "2",
               "--concurrency", "4", *http_args(llm)]
        for target in (3, 20):                  # two kills at different points
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while count() < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
        killed_at = count()
        assert 20 <= killed_at < 48
        with open(out, "ab") as f:              # as if the kill had landed mid-write
            f.write(b'{"id": "k047", "status": "ok", "chain": ["First, a sm')
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "repaired a torn last line" in done.stderr
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == [r["id"] for r in recs]   # every id, exactly once
    assert all(r["status"] == "ok" and len(r["chain"]) == 3 for r in lines(out))
    # Running the finished job again changes nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and '"skipped": 48' in again.stderr and len(lines(out)) == 48


# ---------------------------------------------------------------------------------------------
# Bad input is named by file, line and field
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,records,message", [
    ("chains", ['{"id": "a", "caption": "x"}', '{"id": "b", "caption": '], r"in.jsonl:2: malformed JSON"),
    ("chains", ['{"id": "a"}'], r"in.jsonl:1: field 'caption': missing"),
    ("chains", ['{"id": "a", "caption": "x"}', '{"id": "b", "caption": "y"}', '{"id": "a", "caption": "z"}'],
     r"in.jsonl:3: field 'id': duplicate id 'a' \(first on line 1\)"),
    ("chains", ['{"caption": "x"}'], r"in.jsonl:1: field 'id': missing or not a non-empty string"),
    ("chains", ['{"id": "a", "caption": ""}'], r"in.jsonl:1: field 'caption': expected a non-empty string"),
    ("chains", ['[1, 2]'], r"in.jsonl:1: expected a JSON object, got list"),
    ("rules", ['{"id": "a", "caption": "x"}'], r"in.jsonl:1: field 'facts': missing"),
    ("reward", ['{"id": "a", "caption": "c", "question": "q", "answers": ["only one"]}'],
     r"in.jsonl:1: field 'answers': expected at least two"),
    ("mcq", ['{"id": "a", "prompt": "p", "chain": ["same", "same"]}'], r"in.jsonl:1: field 'chain': repeated"),
    ("ynq", ['{"id": "a", "prompt": "p", "chain": ["one"]}'], r"in.jsonl:1: field 'chain': expected a list"),
    ("recaption", ['{"id": "a", "captions": []}'], r"in.jsonl:1: field 'captions'"),
])
def test_bad_input_names_file_line_and_field(tmp_path, command, records, message):
    import re
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    argv = {"rules": ["chains", "--backend", "rules"]}.get(command, [command])
    with pytest.raises(SystemExit) as e:
        gc.main([*argv, "--in", inp, "--out", str(tmp_path / "out.jsonl"), "--base_url", "http://127.0.0.1:9"]
                if command not in ("mcq", "ynq") else [*argv, "--in", inp, "--out", str(tmp_path / "o.jsonl")])
    assert re.search(message, str(e.value)), str(e.value)
    assert not (tmp_path / "out.jsonl").exists() or lines(tmp_path / "out.jsonl") == []


def test_missing_input_file(tmp_path):
    with pytest.raises(SystemExit, match="nope.jsonl: input file not found"):
        gc.main(["chains", "--backend", "rules", "--in", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------
# The API key never leaks
# ---------------------------------------------------------------------------------------------

def test_api_key_never_reaches_logs_errors_or_outputs(synth_dir, tmp_path):
    import subprocess
    import sys
    recs = lines(synth_dir / "train.jsonl")[:3]
    recs[0] = {**recs[0], "caption": recs[0]["caption"] + " FAILME"}

    def echo_key(req):                          # a server that echoes the bearer token back
        token = req.headers.get("Authorization", "")
        if "FAILME" in req.user_text:
            return Reply.error(500, message=f"upstream rejected {token}")
        return ScriptedLLM()(req)
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    with FakeLLM(responder=echo_key) as llm:
        llm.push(Reply.error(503, message=f"overloaded, key was {KEY}"))
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": llm.url}
        run = subprocess.run([sys.executable, GEN, "-v", "chains", "--in", inp, "--out", str(out),
                              "--length", "1", "--max_tries", "2", "--backoff", "0.01"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in llm.requests)   # it was used
    assert "retry 2/2" in run.stderr                # -v logs retries ...
    text = out.read_text() + run.stdout + run.stderr
    assert KEY not in text                          # ... but never the key
    failed = [r for r in lines(out) if r["status"] == "failed"]
    assert len(failed) == 1 and "[api key redacted]" in failed[0]["reason"]


def test_client_flags_default_from_the_environment(monkeypatch):
    import argparse
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.invalid/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    p = argparse.ArgumentParser()
    gc.add_client_args(p)
    args = p.parse_args(["--concurrency", "7"])
    assert (args.base_url, args.api_key, args.concurrency) == ("http://example.invalid/v1", KEY, 7)
    client = gc.ChatClient.from_args(args)
    assert client.url == "http://example.invalid/v1/chat/completions" and KEY not in repr(client)


# ---------------------------------------------------------------------------------------------
# The other subcommands
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rules_chains(synth_dir):
    out = synth_dir / "chains_rules.jsonl"
    s = gc.main(["chains", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"), "--out", str(out),
                 "--length", "4", "--seed", "1"])
    assert s["done"] == 36
    return out


def test_inject_rules_gives_k_one_error_negatives(synth_dir, tmp_path):
    out = tmp_path / "inject.jsonl"
    gc.main(["inject", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"), "--out", str(out),
             "--length", "4"])
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "train.jsonl")}
    for rec in lines(out):
        assert rec["ranking"] == "best_only" and len(rec["chain"]) == 5 and len(set(rec["chain"])) == 5
        assert [synthetic.match_facts(c, facts[rec["id"]])["wrong"] for c in rec["chain"]] == [0, 1, 1, 1, 1]


def test_inject_http(synth_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", lines(synth_dir / "train.jsonl")[:3])
    with FakeLLM(responder=ScriptedLLM()) as llm:
        s = gc.main(["inject", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--length", "3", *http_args(llm)])
    assert s["done"] == 3
    for rec in lines(tmp_path / "o.jsonl"):
        gold = rec["chain"][0]
        assert len(set(rec["chain"])) == 4 and all(is_one_swap(gold, c) for c in rec["chain"][1:])


def test_mcq_chains(rules_chains, tmp_path):
    out = tmp_path / "mcq.jsonl"
    gc.main(["mcq", "--in", str(rules_chains), "--out", str(out)])
    chains = {r["id"]: r for r in lines(rules_chains)}
    firsts = set()
    for rec in lines(out):
        src = chains[rec["id"]]
        assert sorted(rec["chain"]) == list("ABCDE") and rec["video"] == src["video"]
        assert [rec["options"][gc.LETTERS.index(x)] for x in rec["chain"]] == src["chain"]
        assert rec["prompt"] == gc.format_mcq("Which caption describes the video best?", rec["options"])
        firsts.add(rec["chain"][0])
    assert len(firsts) >= 3                     # the right letter is not always the same


def test_ynq_chains(rules_chains, tmp_path):
    out = tmp_path / "ynq.jsonl"
    gc.main(["ynq", "--in", str(rules_chains), "--out", str(out)])
    chains = {r["id"]: r for r in lines(rules_chains)}
    for rec in lines(out):
        src = chains[rec["id"]]
        assert rec["response"] == "no" and len(rec["prompts"]) == 5
        assert all(c in p for c, p in zip(reversed(src["chain"]), rec["prompts"]))   # most wrong first
        assert rec["errors"][-1] is None


def test_mcq_leaves_out_failed_chains(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p", "chain": ["x", "y"]},
                                              {"id": "b", "status": "failed", "reason": "r"}])
    s = gc.main(["mcq", "--in", inp, "--out", str(tmp_path / "o.jsonl")])
    assert s["failed_inputs_left_out"] == 1 and [r["id"] for r in lines(tmp_path / "o.jsonl")] == ["a"]


def test_lfmcqa_rules(synth_dir, tmp_path):
    out = tmp_path / "lf.jsonl"
    gc.main(["lfmcqa", "--backend", "rules", "--in", str(synth_dir / "test.jsonl"), "--out", str(out)])
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "test.jsonl")}
    for rec in lines(out):
        assert len(rec["options"]) == 5 and len(set(rec["options"])) == 5 and rec["question"].endswith("?")
        f = facts[rec["id"]]
        right = rec["options"][rec["answer"]]
        assert synthetic.match_facts(right, f)["wrong"] == 0
        assert all(synthetic.match_facts(o, f)["wrong"] >= 1 for i, o in enumerate(rec["options"]) if i != rec["answer"])


def test_lfmcqa_http(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "caption": "A man opens a red door."},
                                              {"id": "b", "caption": "A cat sleeps on a sofa."}])
    opts = ["He opens a red door.", "He opens a blue door.", "He closes a red door.", "He paints a door.",
            "He kicks a door."]
    with FakeLLM() as llm:
        llm.push("I think a good question is about the door.",                        # unreadable: asked again
                 f'```json\n{json.dumps({"question": "What does the man do?", "options": opts, "answer": "A"})}\n```',
                 json.dumps({"question": "Where is the cat?", "options": [f"{x}." for x in "VWXYZ"], "answer": 2}))
        s = gc.main(["lfmcqa", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "1",
                     *http_args(llm)])
    got = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert s["rejected"] == {"unreadable": 1}
    assert got["a"]["options"][got["a"]["answer"]] == "He opens a red door." and sorted(got["a"]["options"]) == sorted(opts)
    assert got["b"]["options"][got["b"]["answer"]] == "X."


def test_reward_ranks_answers_by_the_lm_score(tmp_path):
    recs = [{"id": "q1", "video": "v.npy", "caption": "A red ball rolls left.", "question": "What rolls?",
             "answers": ["a blue cube", "a red ball", "a ball", "a red thing"]},
            {"id": "q2", "caption": "c", "question": "q", "answers": ["same", "same again"]}]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)

    def judge(req):
        text = req.user_text.split("Answer to judge: ", 1)[1].split("\n", 1)[0]
        return {"a blue cube": '{"verdict": "no", "score": 0, "explanation": "wrong object"}',
                "a red ball": 'Sure: {"verdict": "yes", "score": 5}',
                "a ball": "Verdict: yes. Score: 3",
                "a red thing": '{"verdict": "yes", "score": 3}'}.get(text, '{"verdict": "yes", "score": 4}')
    with FakeLLM(responder=judge) as llm:
        gc.main(["reward", "--in", inp, "--out", str(tmp_path / "chain.jsonl"), *http_args(llm)])
        gc.main(["reward", "--in", inp, "--out", str(tmp_path / "pairs.jsonl"), "--pairs", *http_args(llm)])
    got = {r["id"]: r for r in lines(tmp_path / "chain.jsonl")}
    assert got["q1"]["chain"] == ["a red ball", "a ball", "a blue cube"]      # one answer per score
    assert got["q1"]["scores"] == [5, 3, 0] and got["q1"]["prompt"] == "What rolls?"
    assert got["q1"]["video"] == "v.npy" and len(got["q1"]["scored"]) == 4
    assert got["q2"]["status"] == "no_preference" and "chain" not in got["q2"]
    pairs = {r["id"]: r for r in lines(tmp_path / "pairs.jsonl")}
    assert pairs["q1"]["chain"] == ["a red ball", "a blue cube"]


def test_score_answer_reasks_then_fails():
    with FakeLLM() as llm:
        client = gc.ChatClient(llm.url, "m", backoff=0.01)
        llm.push("I cannot say.", '{"verdict": "yes", "score": 9}', '{"verdict": "no", "score": 1}')
        assert gc.score_answer(client, "c", "q", "a") == {"verdict": "no", "score": 1, "explanation": ""}
        llm.push(*["no idea"] * 3)
        with pytest.raises(gc.ChatError, match="unreadable reward reply after 3 tries"):
            gc.score_answer(client, "c", "q", "a")


def asked_first(req) -> str:
    """Which caption a comparison request put first."""
    user = next(m["content"] for m in req.messages if m["role"] == "user")
    return user.split("Caption 1:\n", 1)[1].split("\n\n", 1)[0]


def test_ask_until_parsed_reasks_with_the_problem_then_fails_with_reasons():
    """The one re-ask loop (gen_chains' steps and eval_judge's judge): the conversation goes on
    with the unusable reply and what was wrong with it; every problem is counted; when every
    try fails the result says why, and ask_or_fail turns that into the record's failure."""
    from functools import partial
    parse = partial(gc.read_reply, gc.parse_claims)
    with FakeLLM() as llm:
        client, stats = gc.ChatClient(llm.url, "m", backoff=0.01), gc.RunStats()
        llm.push("I'm sorry, I cannot split this caption.", "Claims: the circle is red",
                 '```json\n{"claims": ["a red circle", "it moves up"]}\n```')
        asked = gc.ask_until_parsed(client, gc.claims_messages("A red circle moves up."), parse,
                                    gc.JSON_REASK, 4, stats, max_tokens=50)
        assert asked.ok and asked.value == ["a red circle", "it moves up"] and asked.tries == 3
        assert asked.rejected == ["refused", "unreadable"]
        third = llm.requests[2].messages
        assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert third[1]["content"].startswith("Caption of a video:\nA red circle moves up.")
        assert third[2]["content"] == "I'm sorry, I cannot split this caption."
        assert third[3]["content"] == f"I could not use your reply: it declines the task. {gc.JSON_REASK}"
        assert third[5]["content"].startswith("I could not use your reply: I could not read the answer")
        assert all(r.body["max_tokens"] == 50 for r in llm.requests)
        llm.push("no idea", "I cannot do that.")
        failed = gc.ask_until_parsed(client, gc.claims_messages("x"), parse, gc.JSON_REASK, 2, stats)
        assert not failed.ok and failed.value is None and failed.tries == 2
        assert failed.rejected == ["unreadable", "refused"] and failed.reply == "I cannot do that."
        assert stats.as_dict() == {"rejected": {"refused": 2, "unreadable": 2}}
        llm.push("no idea", "still no idea")
        with pytest.raises(gc.StepFailed, match=r"^every try rejected \(unreadable, unreadable\)$"):
            gc.ask_or_fail(client, gc.claims_messages("x"), parse, gc.JSON_REASK, 2, stats)


def test_ask_both_orders_agreeing_and_disagreeing_pairs():
    """The one both-orders comparer (gen_chains' compare and eval_judge's compare): a caption
    wins only when both orders pick it; a judge that always picks position 1 gives a tie."""
    from functools import partial

    def judge(req):                             # prefers the caption that says GOOD, wherever it is,
        first = asked_first(req)                # but always picks position 1 when it sees BIASED
        if "BIASED" in first or "GOOD" in first:
            return '{"better": 1}'
        return "Caption 2 is better."
    with FakeLLM(responder=judge) as llm:
        teacher = gc.LLMTeacher(gc.ChatClient(llm.url, "m", backoff=0.01), 2, gc.RunStats())
        pick = partial(teacher.pick, {"caption": "the reference"})
        agree = gc.ask_both_orders(pick, "a plain caption", "a GOOD caption")
        assert (agree.verdicts, agree.a_view, agree.result, agree.tries) == (["2", "1"], ["b", "b"], "loss", 2)
        assert [asked_first(r) for r in llm.requests] == ["a plain caption", "a GOOD caption"]
        won = gc.ask_both_orders(pick, "a GOOD caption", "a plain caption")
        assert (won.verdicts, won.a_view, won.result) == (["1", "2"], ["a", "a"], "win")
        disagree = gc.ask_both_orders(pick, "BIASED one", "BIASED two")
        assert (disagree.verdicts, disagree.a_view, disagree.result) == (["1", "1"], ["a", "b"], "tie")
        assert disagree.failed is None
        # An order with no usable verdict: the other one is not asked, and the failure is kept.
        n = len(llm.requests)
        llm.push("hmm", "hmm")
        failed = gc.ask_both_orders(lambda f, s: gc.ask_until_parsed(
            teacher.client, gc.pick_messages("ref", f, s), partial(gc.read_reply, gc.parse_pick), gc.JSON_REASK, 2),
            "one", "two")
        assert failed.failed is not None and failed.failed.rejected == ["unreadable", "unreadable"]
        assert failed.result == "" and failed.tries == 2 and len(llm.requests) == n + 2
    assert [gc.combine_orders(*v) for v in (("a", "a"), ("b", "b"), ("a", "b"), ("tie", "a"))] == \
        ["win", "loss", "tie", "tie"]


def test_http_path_never_loads_the_toy_world(tmp_path):
    """--backend http goes nowhere near synthetic.py: only toy_world() imports it."""
    import subprocess
    import sys
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "caption": "A man opens a red door."}])
    with FakeLLM(default='{"qa": [{"question": "What opens?", "answer": "A man opens a door."}]}') as llm:
        code = ("import sys, gen_chains; gen_chains.main(sys.argv[1:]); "
                "assert 'synthetic' not in sys.modules, 'synthetic was imported'")
        run = subprocess.run([sys.executable, "-c", code, "qa", "--in", inp, "--out", str(tmp_path / "o.jsonl"),
                              "--n", "1", "--base_url", llm.url, "--model", "m"],
                             capture_output=True, text=True, timeout=60, cwd=os.path.dirname(GEN))
    assert run.returncode == 0, run.stderr
    assert lines(tmp_path / "o.items.jsonl")[0]["question"] == "What opens?"


def test_recaption(tmp_path):
    recs = [{"id": "a", "video": "a.mp4", "captions": ["a man walks", "a dog follows him"]},
            {"id": "b", "caption": "a red car drives away quickly"}]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)

    def writer(req):
        if "a red car" in req.user_text:
            return '```json\n{"caption": "A shiny red car drives away quickly down an empty street."}\n```'
        return "A man walks along a path while a small dog follows closely behind him."
    with FakeLLM(responder=writer) as llm:
        llm.push("Car.", "I cannot describe a video I have not seen, sorry.")  # too short, refused: asked again
        s = gc.main(["recaption", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "1",
                     *http_args(llm)])
    got = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert s["rejected"] == {"too_short": 1, "refused": 1}
    assert got["a"]["caption"].startswith("A man walks") and got["a"]["video"] == "a.mp4"
    assert got["a"]["source_captions"] == recs[0]["captions"]
    assert got["b"]["caption"] == "A shiny red car drives away quickly down an empty street."


def test_text_alone_cannot_tell_gold_from_corrupted():
    """The synthetic set's point: a text-only model (bag-of-bigrams naive Bayes, trained on 2000
    gold/corrupted pairs) picks the gold caption of a held-out pair at chance."""
    import math
    import random
    from collections import Counter

    def feats(c):
        w = c.lower().replace(".", " .").replace(",", " ,").split()
        return w + [a + "_" + b for a, b in zip(w, w[1:])]
    pairs = []
    for s in range(3000):
        facts = synthetic.sample_scene(random.Random(f"nb:{s}"))
        chain, _ = synthetic.rules_chain({"id": str(s), "caption": synthetic.caption_from_facts(facts), "facts": facts}, 2, 0)
        pairs.append((chain[0], chain[random.Random(s).choice((1, 2))]))
    counts = {0: Counter(), 1: Counter()}
    for gold, bad in pairs[:2000]:
        counts[0].update(feats(gold))
        counts[1].update(feats(bad))
    vocab = len(set(counts[0]) | set(counts[1]))
    total = {k: sum(c.values()) + vocab for k, c in counts.items()}

    def gold_score(c):
        return sum(math.log((counts[0][f] + 1) / total[0]) - math.log((counts[1][f] + 1) / total[1]) for f in feats(c))
    acc = sum(gold_score(g) > gold_score(b) for g, b in pairs[2000:]) / 1000
    assert 0.44 < acc < 0.56, acc              # chance is 0.5; one standard error is 0.016


# ---------------------------------------------------------------------------------------------
# MCQ and yes/no chains written by an LLM (mcq|ynq --backend http), and --error_types
# ---------------------------------------------------------------------------------------------

def captions_asked(req) -> list[str]:
    """The chain a statements request lists, best first ("Caption k (...): text"); a re-ask
    carries the first request's text in the conversation."""
    first = next(m["content"] for m in req.messages if m["role"] == "user")
    return [line.split("): ", 1)[1] for line in first.splitlines() if line.startswith("Caption ")]


class StatementsLLM:
    """Writes one statement per caption (the caption itself, as an option or a yes/no question),
    after `bad` misbehaving replies per record: the order reversed, a repeat, or a negation."""

    def __init__(self, bad=(), kind="mcq"):
        self.bad, self.kind, self.seen = list(bad), kind, {}

    def __call__(self, req):
        chain = captions_asked(req)
        n = self.seen[chain[0]] = self.seen.get(chain[0], 0) + 1
        fault = self.bad[n - 1] if n <= len(self.bad) else None
        items = list(chain)
        if fault == "reversed":
            items = items[::-1]
        elif fault == "repeat":
            items[-1] = items[-2]
        if self.kind == "ynq":
            items = [f"Does the video show this: {x.rstrip('.')}?" for x in items]
            if fault == "negated":
                items[1] = items[1].replace("Does the video show", "Doesn't the video show")
            return json.dumps({"questions": items})
        return f"Here you go:\n```json\n{json.dumps({'question': 'What happens in the video?', 'options': [f'{chr(65 + i)}. {x}' for i, x in enumerate(items)]})}\n```"


def test_mcq_http_reasks_a_reply_out_of_order_then_writes_the_chain(rules_chains, tmp_path):
    chains = lines(rules_chains)[:3]
    inp = write_jsonl(tmp_path / "in.jsonl", chains)
    out = tmp_path / "mcq.jsonl"
    with FakeLLM(responder=StatementsLLM(bad=["reversed"])) as llm:
        s = gc.main(["mcq", "--backend", "http", "--in", inp, "--out", str(out), "--concurrency", "1",
                     *http_args(llm)])
        second = llm.requests[1].messages
    assert (s["done"], s["failed"]) == (3, 0) and len(llm.requests) == 6
    # the re-ask shows the model its reply and names what broke the order
    assert second[-2]["role"] == "assistant" and "already has the error of caption" in second[-1]["content"]
    assert s["rejected"]["option N already has the error of caption N"] >= 1
    src = {r["id"]: r for r in chains}
    firsts = set()
    for rec in lines(out):
        assert rec["source"] == "llm" and rec["llm_calls"] == 2 and rec["question"] == "What happens in the video?"
        # the options are stripped of their letters, shuffled, and the letters ranked best first
        assert [rec["options"][gc.LETTERS.index(x)] for x in rec["chain"]] == src[rec["id"]]["chain"]
        assert rec["prompt"] == gc.format_mcq("What happens in the video?", rec["options"])
        firsts.add(rec["chain"][0])
    assert len(firsts) >= 2


def test_mcq_http_fails_with_reasons_when_every_reply_is_rejected(rules_chains, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", lines(rules_chains)[:1])
    with FakeLLM(responder=StatementsLLM(bad=["repeat", "reversed", "repeat"])) as llm:
        s = gc.main(["mcq", "--backend", "http", "--in", inp, "--out", str(tmp_path / "o.jsonl"),
                     "--step_tries", "3", *http_args(llm)])
    rec = lines(tmp_path / "o.jsonl")[0]
    assert (s["done"], s["failed"]) == (0, 1) and rec["status"] == "failed"
    assert rec["reason"].startswith("every try rejected (option 4 repeats option 3")
    assert "already has the error" in rec["reason"]


def test_ynq_http_checks_the_fixed_response_and_ranks_most_wrong_first(rules_chains, tmp_path):
    chains = lines(rules_chains)[:2]
    inp = write_jsonl(tmp_path / "in.jsonl", chains)
    with FakeLLM(responder=StatementsLLM(bad=["negated"], kind="ynq")) as llm:
        s = gc.main(["ynq", "--backend", "http", "--in", inp, "--out", str(tmp_path / "o.jsonl"),
                     "--concurrency", "1", *http_args(llm)])
    assert (s["done"], s["failed"]) == (2, 0)
    assert s["rejected"] == {"question N is negated, which flips its answer": 2}
    src = {r["id"]: r for r in chains}
    for rec in lines(tmp_path / "o.jsonl"):
        chain = src[rec["id"]]["chain"]
        assert rec["response"] == "no" and rec["llm_calls"] == 2
        assert rec["prompts"] == [f"Does the video show this: {c.rstrip('.')}?" for c in reversed(chain)]
        assert rec["errors"][-1] is None and rec["errors"] == list(reversed(src[rec["id"]]["errors"]))


def test_statements_need_chains_whose_errors_accumulate(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "chain": ["x y", "x z"]},
                                              {"id": "b", "chain": ["p q", "p r", "s q"], "ranking": "best_only"}])
    with pytest.raises(SystemExit, match=r"in.jsonl:2: field 'ranking': an error-injection record"):
        gc.main(["ynq", "--backend", "http", "--in", inp, "--out", str(tmp_path / "o.jsonl"),
                 "--base_url", "http://127.0.0.1:9/v1"])


def test_chain_statements_checks_by_hand():
    chain = ["A red ball rolls left.", "A blue ball rolls left.", "A blue ball rolls right quickly."]
    # the words each step brought in ('left' -> 'right' counts: no earlier caption said 'right')
    assert gc.error_markers(chain) == [{"blue"}, {"right", "quickly"}]
    ok = ["red, left", "blue, left", "blue, right quickly"]
    assert gc.check_chain_statements(chain, ok, "option") == []
    assert gc.check_chain_statements(chain, ok[:2], "option") == ["2 options for 3 captions (one per caption, in order)"]
    assert gc.check_chain_statements(chain, ["red", "blue", "blue"], "option") == [
        "option 2 repeats option 1", "option 2 lacks the error of caption 2 ('quickly', 'right')"]
    # a word a later step takes away again ('circles' once the shape changes) proves nothing
    assert gc.error_markers(["A red circle.", "Two red circles.", "Two red squares."]) == [{"two"}, {"squares"}]
    value, problems = gc.parse_chain_ynq(chain, json.dumps({"questions": [
        "Is the ball red?", "The ball is blue?", "Is the blue ball not rolling quickly?"]}))
    assert value is None and problems == [
        "question 1 is not a yes/no question (it must start like 'Is'/'Does' and end with '?')",
        "question 2 is negated, which flips its answer"]


def test_error_types_restrict_the_rules_and_the_llm(synth_dir, tmp_path):
    out = tmp_path / "obj.jsonl"
    s = gc.main(["chains", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"), "--out", str(out),
                 "--length", "2", "--error_types", "object,action"])
    assert s["steps_by_type"] == {"object": 2 * s["done"]} and s["done"] >= 30
    with pytest.raises(SystemExit, match="the synthetic world has no action facts"):
        gc.main(["inject", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"),
                 "--out", str(tmp_path / "x.jsonl"), "--error_types", "action"])
    with pytest.raises(SystemExit):
        gc.main(["chains", "--in", "x", "--out", "y", "--error_types", "object,smell"])

    asked_types = []

    def responder(req):
        asked_types.append(requested_type(req))
        return json.dumps({"caption": one_swap(caption_in(req), requested_type(req))})
    recs = [{"id": "a", "caption": "A man picks up a red cup and moves to the left."},
            {"id": "b", "caption": "The background is gray."}]            # no object or action in it
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    with FakeLLM(responder=responder) as llm:
        s = gc.main(["chains", "--in", inp, "--out", str(tmp_path / "h.jsonl"), "--length", "2",
                     "--error_types", "object,action", *http_args(llm)])
    got = {r["id"]: r for r in lines(tmp_path / "h.jsonl")}
    assert set(asked_types) <= {"object", "action"} and len(asked_types) == 2
    assert {e["type"] for e in got["a"]["errors"][1:]} <= {"object", "action"}
    assert got["b"]["status"] == "failed"
    assert got["b"]["reason"] == "step 1: no error type of the types action, object applies to the caption"
