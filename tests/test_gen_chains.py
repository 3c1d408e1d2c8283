"""Tests for gen_chains.py: the HTTP client against a fake server with faults, resumability
(kill -9 in a real subprocess), input errors, the synthetic set, the fact matcher, the rule
backend and every subcommand. Everything runs offline on 127.0.0.1."""
from __future__ import annotations

import json
import os
import time

import pytest

import gen_chains as gc
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
# Resumable output
# ---------------------------------------------------------------------------------------------

def test_resumable_jsonl_repairs_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x"')
    out = gc.ResumableJsonl(str(path))
    assert out.repaired and out.done_ids == {"a", "b"}
    out.append({"id": "c", "x": 3})
    out.close()
    assert [r["id"] for r in lines(path)] == ["a", "b", "c"]
    # A complete object that only lost its newline is kept, not thrown away.
    path.write_text('{"id": "a"}\n{"id": "b"}')
    out = gc.ResumableJsonl(str(path))
    out.close()
    assert out.done_ids == {"a", "b"} and path.read_text().endswith("}\n")


def test_resumable_jsonl_rejects_damage_in_the_middle(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(gc.DataError, match=r"out.jsonl:2: malformed line"):
        gc.ResumableJsonl(str(path))
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(gc.DataError, match=r"out.jsonl:2: field 'id': duplicate id"):
        gc.ResumableJsonl(str(path))


def test_map_resumable_skips_done_and_records_failures(tmp_path):
    out = str(tmp_path / "out.jsonl")
    recs = [{"id": f"r{i}"} for i in range(10)]

    def fn(rec):
        if rec["id"] == "r3":
            raise gc.ChatError("gave up after 2 tries: HTTP 500: boom")
        return {"id": rec["id"], "y": rec["id"].upper()}

    s = gc.map_resumable(recs[:6], fn, out, concurrency=3, desc="t")
    assert (s["done"], s["failed"], s["skipped"]) == (5, 1, 0)
    s = gc.map_resumable(recs, fn, out, concurrency=3, desc="t")
    assert (s["done"], s["failed"], s["skipped"]) == (4, 0, 6)
    got = lines(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in recs)
    failed = [r for r in got if r.get("status") == "failed"]
    assert failed == [{"id": "r3", "status": "failed", "reason": "gave up after 2 tries: HTTP 500: boom"}]
    # --retry_failed: the failed record is dropped and redone; still one line per id.
    s = gc.map_resumable(recs, lambda r: {"id": r["id"], "y": "again"}, out, 2, "t", drop_failed=True)
    assert (s["done"], s["skipped"]) == (1, 9)
    got = lines(out)
    assert len(got) == 10 and {r["id"]: r for r in got}["r3"]["y"] == "again"


def test_map_resumable_stops_on_a_fatal_error(tmp_path):
    def fn(rec):
        raise gc.ChatError("HTTP 401: bad key", fatal=True)
    with pytest.raises(gc.ChatError, match="401"):
        gc.map_resumable([{"id": "a"}, {"id": "b"}], fn, str(tmp_path / "o.jsonl"), 1, "t")
    assert lines(tmp_path / "o.jsonl") == []


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
        assert rec["caption"] == gc.caption_from_facts(rec["facts"])
        m = gc.match_facts(rec["caption"], rec["facts"])
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
    video = gc.render_scene(facts)
    red = np.all(video == gc.COLORS["red"], axis=-1)
    blue = np.all(video == gc.COLORS["blue"], axis=-1)
    assert np.all(video[:, 0, 32] == gc.BACKGROUNDS["gray"])
    assert red[:10].any(axis=(1, 2)).all() and not red[10:].any()        # visible frames 0..9
    assert not blue[:5].any() and blue[5:].any(axis=(1, 2)).all()        # appears at frame 5
    ys, xs = np.nonzero(red[0])
    assert xs.mean() < 32 and abs(ys.mean() - 32) < 2                     # starts on the left
    assert np.nonzero(red[9])[0].mean() < ys.mean() - 8                   # moved up
    bx0, bx1 = np.nonzero(blue[5])[1].mean(), np.nonzero(blue[15])[1].mean()
    assert bx0 > 40 and bx1 < bx0 - 8                                     # right, moving left
    assert red[0].sum() == 13 * 13                                        # one large square
    assert blue[5].sum() == 3 * gc._shape_mask("circle", gc.SIZES["small"]).sum()   # three small circles


def test_rules_chain_kth_caption_has_exactly_k_wrong_facts(synth_dir):
    records = lines(synth_dir / "train.jsonl")
    seen_types = set()
    for rec in records:
        chain, errors = gc.rules_chain(rec, 6, seed=0)
        assert len(chain) == 7 and errors[0] is None and len(set(chain)) == 7
        for k, caption in enumerate(chain):
            m = gc.match_facts(caption, rec["facts"])
            assert (m["wrong"], m["correct"], m["missing"]) == (k, m["total"] - k, 0), (k, caption)
        seen_types |= {e["type"] for e in errors[1:]}
        assert gc.rules_chain(rec, 6, seed=0) == (chain, errors)          # deterministic by seed
    assert seen_types == {"scene", "temporal", "count", "attribute", "color", "object", "spatial", "direction"}
    assert any(gc.rules_chain(r, 6, seed=1)[0] != gc.rules_chain(r, 6, seed=0)[0] for r in records[:3])


def test_match_facts_on_model_written_text():
    facts = {"background": "black", "frames": [0, 4, 8],
             "events": [["appear", 0], ["appear", 1], ["disappear", 0]],
             "objects": [{"count": 2, "size": "small", "color": "red", "shape": "circle",
                          "position": "left", "direction": "up"},
                         {"count": 1, "size": "large", "color": "blue", "shape": "square",
                          "position": "top", "direction": "right"}]}
    gold = gc.caption_from_facts(facts)
    assert gc.match_facts(gold, facts)["correct"] == 14
    # Partial: only one object, in other words.
    m = gc.match_facts("Two little red balls show up on the left side and slide upwards.", facts)
    assert (m["correct"], m["wrong"], m["missing"]) == (6, 0, 8) and m["order_correct"] is None
    # Repetitive: the same sentence three times counts once.
    rep = "A big blue box appears at the top and moves to the right. " * 3
    m = gc.match_facts(rep, facts)
    assert (m["correct"], m["wrong"], m["hallucinated"]) == (6, 0, 0)
    # Wrong facts, a hallucinated object and events out of order.
    bad = ("First, a large blue square appears at the top and moves left. Then two small red circles "
           "appear on the left and move up. Then a green triangle appears. Finally, the red circles "
           "disappear. The background is gray.")
    m = gc.match_facts(bad, facts)
    assert m["by_kind"]["direction"] == {"correct": 1, "wrong": 1}
    assert m["by_kind"]["background"] == {"wrong": 1}
    assert m["order_correct"] is False and m["hallucinated"] == 1
    assert m["wrong"] == 1 + 1 + 1 + 1                        # direction, background, order, green triangle
    # Garbled and empty text state nothing.
    for text in ("", "colour colour the the and", "asdf qwer zxcv"):
        m = gc.match_facts(text, facts)
        assert (m["correct"], m["wrong"], m["missing"]) == (0, 0, 14)
    # A disappearance that never happens is an order error.
    m = gc.match_facts("A large blue square appears at the top. Then the blue square disappears.", facts)
    assert m["order_correct"] is False


def test_error_type_applicability():
    people = "A young man in a red shirt walks to the left, then he picks up two cups in the kitchen."
    types = set(gc.applicable_error_types(people))
    assert {"object", "color", "action", "count", "spatial", "temporal", "direction", "scene", "person"} <= types
    assert "camera" not in types
    assert "camera" in gc.applicable_error_types("The camera zooms in on a dog sleeping.")
    assert gc.applicable_error_types("Hello.") == []
