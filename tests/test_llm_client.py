"""Tests for gen_chains.ChatClient at scale: several servers behind one client (least-loaded
routing, a dead server's records finished by the others, set aside and probed back),
structured output (a schema per step, a refusal detected once per server), the shared request
rate limit and the progress bar. Real HTTP on 127.0.0.1 (tests/fake_llm.py); seconds in all."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from collections import Counter

import pytest

import eval_judge as E
import gen_chains as gc
from fake_llm import FakeLLM, Reply

HI = [{"role": "user", "content": "hi"}]
LONG_CAPTION = "a red ball rolls slowly from the left side of the table to the right side and stops"
SCHEMA = gc.json_schema("answer", {"answer": {"type": "string"}})


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def served(llm) -> int:
    """Requests a fake server answered or refused (it logs each one it read)."""
    return len(llm.requests)


# ---------------------------------------------------------------------------------------------
# --base_url: one, a comma list, @file
# ---------------------------------------------------------------------------------------------

def test_base_url_forms(tmp_path):
    assert gc.parse_base_urls("http://a/v1/") == ["http://a/v1"]
    assert gc.parse_base_urls("http://a/v1, http://b/v1") == ["http://a/v1", "http://b/v1"]
    urls = tmp_path / "servers.txt"
    urls.write_text("# two servers\nhttp://a/v1\n\nhttp://b/v1  # the second\n")
    assert gc.parse_base_urls(f"@{urls}") == ["http://a/v1", "http://b/v1"]
    client = gc.ChatClient(f"@{urls}", "m")
    assert [s.url for s in client.servers] == ["http://a/v1/chat/completions", "http://b/v1/chat/completions"]
    for bad, says in (("http://a/v1,,http://b/v1", "empty entry"), ("http://a/v1,http://a/v1/", "more than once"),
                      (f"@{tmp_path / 'missing.txt'}", "cannot read"), ("", "no --base_url")):
        with pytest.raises(ValueError, match=says):
            gc.parse_base_urls(bad)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no URL"):
        gc.parse_base_urls(f"@{tmp_path / 'empty.txt'}")


def test_client_flags_reach_the_client(tmp_path):
    p = argparse.ArgumentParser()
    gc.add_client_args(p)
    args = p.parse_args(["--base_url", "http://a/v1,http://b/v1", "--structured", "off", "--max_requests_per_s",
                         "4", "--set_aside_after", "2", "--server_cooldown", "7"])
    client = gc.ChatClient.from_args(args)
    assert len(client.servers) == 2 and client.structured == "off"
    assert (client.set_aside_after, client.cooldown, client._rate.interval) == (2, 7.0, 0.25)
    args.base_url = "http://a/v1,"
    with pytest.raises(SystemExit, match="empty entry"):
        gc.ChatClient.from_args(args)


# ---------------------------------------------------------------------------------------------
# Routing, failover, set aside and back
# ---------------------------------------------------------------------------------------------

def run_threads(n: int, threads: int, fn) -> None:
    todo = iter(range(n))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            fn(i)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def test_least_loaded_routing_spreads_and_favours_the_faster_server():
    with FakeLLM(latency=0.05) as a, FakeLLM(latency=0.05) as b:
        client = gc.ChatClient(f"{a.url},{b.url}", "m")
        run_threads(24, 6, lambda i: client.chat(HI))
        assert served(a) + served(b) == 24 and 9 <= served(a) <= 15      # even servers: an even split
        report = client.report()
        assert [s["requests"] for s in report["servers"]] == [served(a), served(b)]
        assert all(s["failures"] == 0 and s["set_aside"] == 0 and s["tokens"] > 0 for s in report["servers"])
    # Least loaded, not round robin: the server that answers 15x faster frees its slots sooner
    # and takes most of the requests.
    with FakeLLM(latency=0.01) as fast, FakeLLM(latency=0.15) as slow:
        client = gc.ChatClient(f"{slow.url},{fast.url}", "m")
        run_threads(30, 4, lambda i: client.chat(HI))
        assert served(fast) > 2 * served(slow)


def test_a_dead_server_records_are_finished_by_the_other_each_id_once(tmp_path):
    recs = [{"id": f"v{i}", "captions": ["a red ball rolls", "the ball moves right"]} for i in range(30)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", recs), tmp_path / "recaptioned.jsonl"
    # `dying` stops itself on its 6th request, with that one and others in flight (latency).
    with FakeLLM(default=LONG_CAPTION, latency=0.05) as alive, \
            FakeLLM(default=LONG_CAPTION, latency=0.05, die_after=6) as dying:
        summary = gc.main(["recaption", "--in", inp, "--out", str(out), "--concurrency", "6",
                           "--base_url", f"{dying.url},{alive.url}", "--backoff", "0.01",
                           "--set_aside_after", "2", "--server_cooldown", "60"])
    got = lines(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in recs)      # every id, once
    assert all(r["status"] == "ok" and r["caption"] == LONG_CAPTION for r in got)
    dead, survivor = summary["servers"]
    assert dead["set_aside"] == 1 and dead["failures"] >= 2 and dead["requests"] <= 6 + 6
    assert survivor["failures"] == 0 and survivor["requests"] >= 30 - 5
    assert summary["done"] == summary["kept"] == 30 and summary["failed"] == 0
    assert summary["tokens"]["per_record"] > 0 and summary["tokens"]["per_kept"] == summary["tokens"]["per_record"]


@pytest.mark.parametrize("fault", [Reply.hang(3.0), Reply.error(503), Reply.error(429, retry_after="5")],
                         ids=["timeout", "5xx", "429"])
def test_a_failed_try_goes_to_the_other_server_at_once(fault):
    with FakeLLM() as a, FakeLLM(default="from b") as b:
        a.push(fault)
        client = gc.ChatClient(f"{a.url},{b.url}", "m", timeout=0.5, backoff=5.0)
        t0 = time.monotonic()
        assert client.chat(HI).text == "from b"
        assert time.monotonic() - t0 < 2.5                # no backoff, no Retry-After wait: b was free
        assert (served(a), served(b)) == (1, 1) and client.usage["retries"] == 1
        assert client.report()["servers"][0]["failures"] == 1


def test_set_aside_then_probed_back_after_the_cooldown():
    with FakeLLM() as b:
        with FakeLLM() as a:
            port = a.port
        client = gc.ChatClient(f"{a.url},{b.url}", "m", set_aside_after=2, cooldown=1.0, backoff=0.01)
        for _ in range(6):
            assert client.chat(HI).text == "ok"          # each request that hit `a` went on to `b`
        down, up = client.report()["servers"]
        assert (down["requests"], down["failures"], down["set_aside"]) == (2, 2, 1)
        assert up["requests"] == 6 and served(b) == 6
        with FakeLLM(port=port) as a_again:
            time.sleep(1.05)                              # the cool-down is over: the next request probes `a`
            client.chat(HI)
            assert served(a_again) == 1
            for _ in range(6):
                client.chat(HI)
            assert served(a_again) >= 3                   # back in the rotation
        assert client.servers[0].set_aside_until is None and client.report()["servers"][0]["set_aside"] == 1


def test_a_probe_that_fails_sets_the_server_aside_again():
    with FakeLLM() as b:
        with FakeLLM() as a:
            pass
        client = gc.ChatClient(f"{a.url},{b.url}", "m", set_aside_after=1, cooldown=0.5, backoff=0.01)
        client.chat(HI)
        time.sleep(0.55)
        client.chat(HI)                                   # the probe: refused, then answered by `b`
        client.chat(HI)                                   # `a` rests again: straight to `b`
        down = client.report()["servers"][0]
        assert (down["requests"], down["failures"]) == (2, 2) and served(b) == 3


def test_fatal_status_stays_fatal_with_several_servers():
    with FakeLLM() as a, FakeLLM() as b:
        a.push(Reply.error(401, message="bad key"))
        b.push(Reply.error(401, message="bad key"))
        client = gc.ChatClient(f"{a.url},{b.url}", "m")
        with pytest.raises(gc.ChatError) as e:
            client.chat(HI)
        assert e.value.fatal and "HTTP 401" in str(e.value) and served(a) + served(b) == 1


# ---------------------------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------------------------

def test_structured_output_is_sent_well_formed():
    with FakeLLM(default='{"answer": "yes"}', structured="check") as llm:
        client = gc.ChatClient(llm.url, "m")
        assert client.chat(HI, schema=SCHEMA).text == '{"answer": "yes"}'
        client.chat(HI)                                   # no schema: no response_format
    fmt = llm.requests[0].body["response_format"]
    assert fmt == {"type": "json_schema", "json_schema": {**SCHEMA, "strict": True}}
    assert llm.requests[0].schema["required"] == ["answer"] and "response_format" not in llm.requests[1].body
    assert client.report()["servers"][0]["structured"] == "json_schema"


def test_llama_cpp_python_server_gets_its_own_form():
    with FakeLLM(default='{"answer": "yes"}', structured="llama-cpp") as llm:
        client = gc.ChatClient(llm.url, "m")
        for _ in range(3):
            assert client.chat(HI, schema=SCHEMA).text == '{"answer": "yes"}'
    assert [r.body["response_format"]["type"] for r in llm.requests] == ["json_schema"] + ["json_object"] * 3
    assert all(r.schema == SCHEMA["schema"] for r in llm.requests)
    assert client.report()["servers"][0]["structured"] == "json_object+schema"
    assert client.report()["structured"] == {"mode": "auto", "refused_by": [], "refusals": 1}


def test_a_refusal_is_detected_once_per_server_then_the_prompt_path():
    with FakeLLM(default='{"answer": "yes"}', structured="refuse") as refusing, \
            FakeLLM(default='{"answer": "yes"}', structured="check") as taking:
        client = gc.ChatClient(f"{refusing.url},{taking.url}", "m", max_tries=1)
        run_threads(20, 4, lambda i: client.chat(HI, schema=SCHEMA))   # max_tries 1: the refusal is free
        refused = [r for r in refusing.requests if r.schema is not None]
        assert 2 <= len(refused) <= 8          # each form once, and those in flight before its refusal came back
        assert all(r.schema is not None and r.body["response_format"]["type"] == "json_schema"
                   for r in taking.requests)
        report = client.report()
        assert report["structured"]["refused_by"] == [client.servers[0].url]
        assert [s["structured"] for s in report["servers"]] == ["refused", "json_schema"]
        assert client.servers[0].counts["structured_refused"] == 2 == report["structured"]["refusals"]
        before = len(refusing.requests)
        client.chat(HI, schema=SCHEMA)
        assert all(r.schema is None for r in refusing.requests[before:])
    with FakeLLM(structured="refuse") as llm:
        with pytest.raises(gc.ChatError, match="refuses structured output") as e:
            gc.ChatClient(llm.url, "m", structured="on").chat(HI, schema=SCHEMA)
        assert e.value.fatal
        gc.ChatClient(llm.url, "m", structured="off").chat(HI, schema=SCHEMA)
        assert llm.requests[-1].schema is None


def respond_by_schema(req):
    """A reply the step's parser can read where that matters to reach the next step."""
    required = set((req.schema or {}).get("required", []))
    if required == {"claims"}:
        return '{"claims": ["a ball rolls"]}'
    if required == {"verdict"}:
        return '{"verdict": "yes"}'
    return '{"nothing": "useful"}'


STEP_SCHEMAS = [
    (["recaption"], {"caption"}),
    (["chains", "--length", "1"], {"caption", "cannot_apply"}),
    (["chains", "--length", "1", "--unconditioned"], {"caption", "cannot_apply", "type"}),
    (["inject", "--length", "1"], {"caption", "cannot_apply"}),
    (["mcq", "--backend", "http"], {"question", "options"}),
    (["ynq", "--backend", "http"], {"questions"}),
    (["lfmcqa"], {"question", "options", "answer"}),
    (["reward"], {"verdict", "score", "explanation"}),
    (["qa", "--n", "2"], {"qa"}),
    (["improve"], {"caption", "already_correct"}),
    (["compare"], {"better"}),
    (["rlaifv"], {"claims", "verdict"}),
]


@pytest.mark.parametrize("command,required", STEP_SCHEMAS, ids=[" ".join(c) for c, _ in STEP_SCHEMAS])
def test_every_json_step_sends_its_schema(tmp_path, command, required):
    caption = "a red ball rolls to the left of a blue cube"
    rec = {"id": "v0", "caption": caption, "captions": ["a red ball", "a ball rolls"],
           "chain": [caption, "a blue ball rolls to the left of a blue cube"], "question": "What rolls?",
           "answers": ["a red ball rolls", "a green cube jumps"]}
    inp = write_jsonl(tmp_path / "in.jsonl", [rec])
    extra = ["--ref", inp] if command[0] in ("improve", "compare", "rlaifv") else []
    with FakeLLM(responder=respond_by_schema, structured="check") as llm:
        gc.main([*command, "--in", inp, "--out", str(tmp_path / "out.jsonl"), *extra, "--base_url", llm.url,
                 "--step_tries", "1", "--max_tries", "1"])
    assert llm.requests and all(r.schema is not None for r in llm.requests)   # "check" refused none
    assert set().union(*(r.schema["required"] for r in llm.requests)) == required
    for r in llm.requests:
        assert r.schema["additionalProperties"] is False and set(r.schema["properties"]) == set(r.schema["required"])
    if command[0] in ("mcq", "ynq"):
        key = "options" if command[0] == "mcq" else "questions"
        assert llm.requests[0].schema["properties"][key]["minItems"] == 2 == len(rec["chain"])


def judge_args(url):
    p = argparse.ArgumentParser()
    gc.add_client_args(p)
    return argparse.Namespace(**vars(p.parse_args(["--base_url", url])), reask=0, max_tokens=64)


def test_judge_schemas_match_their_parsers():
    replies = {"caption_scores": '{"relevance": 8, "descriptiveness": 7, "temporal_consistency": 9, "fluency": 9}',
               "caption_verdict": '{"better": "1"}', "vdc_grade": '{"pred": "yes", "score": 4}',
               "argus_lines": '{"lines": [{"line": 1, "type": "summary", "evidence": 2, "verdict": "entailment"}]}'}
    names = []

    def by_schema(req):
        name = req.body["response_format"]["json_schema"]["name"]
        names.append(name)
        return replies[name]
    with FakeLLM(responder=by_schema, structured="check") as llm:
        client = gc.ChatClient(llm.url, "m")
        assert E.judge_llm(client, "ref", "cand")["scores"]["relevance"] == 8
        assert E.compare_llm(client, "ref", "a", "b")["verdicts"] == ["1", "1"]
        judge = E.LLMBenchmarkJudge(judge_args(llm.url))
        assert judge.vdc_grade("q", "a", "r") == {"pred": "yes", "score": 4.0}
        assert judge.argus_lines(["s1", "s2"], ["t1"])[0].evidence == 1
    assert names == ["caption_scores", "caption_verdict", "caption_verdict", "vdc_grade", "argus_lines"]
    run = E.with_client_report({"done": 4, "failed": 1, "kept": 2}, client)
    assert run["tokens"]["per_record"] == pytest.approx(client.tokens / 5, abs=0.1)
    assert run["tokens"]["per_kept"] == pytest.approx(client.tokens / 2, abs=0.1) and len(run["servers"]) == 1
    scores = llm.requests[0].schema
    assert set(scores["required"]) == set(E.AXES) and scores["properties"]["fluency"]["maximum"] == E.SCORE_MAX
    lines_schema = llm.requests[-1].schema["properties"]["lines"]
    assert (lines_schema["minItems"], lines_schema["maxItems"]) == (1, 1)
    assert lines_schema["items"]["properties"]["evidence"]["maximum"] == 2


# ---------------------------------------------------------------------------------------------
# Rate limit and progress
# ---------------------------------------------------------------------------------------------

def test_max_requests_per_s_bounds_the_rate_over_all_threads():
    rate, n = 25.0, 26
    with FakeLLM() as a, FakeLLM() as b:
        client = gc.ChatClient(f"{a.url},{b.url}", "m", max_requests_per_s=rate)
        t0 = time.monotonic()
        run_threads(n, 8, lambda i: client.chat(HI))
        elapsed = time.monotonic() - t0
    # n requests spaced 1/rate apart take at least (n - 1) / rate (1 s) however many threads ask;
    # unlimited, 8 threads would send them in a few hundredths of a second.
    assert elapsed >= 0.95 * (n - 1) / rate
    assert elapsed < 10                                   # and it does not stall
    with pytest.raises(ValueError, match="must be positive"):
        gc.RateLimit(0)


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_records_tokens_and_eta(tmp_path, monkeypatch):
    recs = [{"id": f"v{i}", "caption": "a red ball rolls"} for i in range(8)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    err = TTY()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with FakeLLM(default=LONG_CAPTION, latency=0.02) as llm:
        summary = gc.main(["recaption", "--in", inp, "--out", str(tmp_path / "out.jsonl"), "--base_url", llm.url,
                           "--concurrency", "2"])
    bar = err.getvalue()
    assert "recaption" in bar and "8/8" in bar
    assert "rec/s" in bar and "tok/s=" in bar and "<" in bar          # rate, tokens/s, elapsed<remaining
    assert summary["tokens"]["per_record"] == pytest.approx(
        (summary["tokens"]["prompt"] + summary["tokens"]["completion"]) / 8, abs=0.1)
    assert Counter(s["structured"] for s in summary["servers"]) == {"json_schema": 1}


# ---------------------------------------------------------------------------------------------
# The benchmark's multi-server part (bench/bench_gen.py), small
# ---------------------------------------------------------------------------------------------

def test_bench_gen_servers_part_scales_and_writes_its_block(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_gen
    args = argparse.Namespace(servers="1,2", server_latency=0.1, server_slots=2, server_concurrency=4,
                              rounds=3, repeats=1, load_before=0.0)
    rows = bench_gen.servers_rates(args, str(tmp_path))
    one, two = rows
    # One server of 2 slots serves at most 20 requests/s; two serve 40, and least-loaded routing
    # splits the 12 measured requests between them.
    assert one["requests_per_s"] <= 1.05 * one["ideal"] and one["requests_per_server"] == [12]
    assert two["scaling"] >= 1.4 and sum(two["requests_per_server"]) == 12 and min(two["requests_per_server"]) >= 4
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Chain generation (`make bench-gen`)\n\ntext\n\n## Next\n\nmore\n")
    table = bench_gen.servers_table(args, rows, bench_gen.machine())
    bench_gen.write_block(table, str(results))
    bench_gen.write_block(table, str(results))                 # replaced, not appended twice
    text = results.read_text()
    assert text.count(bench_gen.SERVERS_BLOCK[0]) == 1
    assert text.index("text") < text.index("| 2 | 12 |") < text.index("## Next")


def test_bench_gen_frames_part_measures_what_frames_add(tmp_path):
    """Part 4: a larger cap sends more bytes; its table names every row and the text-only one."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_gen
    args = argparse.Namespace(frames=2, frame_sizes="32,96", frames_video="128x96")
    rows = bench_gen.frames_rows(args, str(tmp_path))
    text_only, small, large = rows
    assert text_only["frames"] == 0 and small["frames"] == large["frames"] == 2
    assert text_only["bytes"] < small["bytes"] < large["bytes"]
    table = bench_gen.frames_table(args, rows, bench_gen.machine())
    assert "| 0 | - |" in table and "| 2 | 32 |" in table and "| 2 | 96 |" in table
