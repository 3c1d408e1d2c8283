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
