"""Tests for on-policy preference data: `eval_judge.py sample`, `gen_chains.py qa`,
the paper's on-policy baselines (improve, compare, rlaifv) with the fake LLM server and the
rules backend, LLaVA-Hound's whole loop on the tiny model, and the one-writer lock on outputs
(real processes)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import eval_judge as E
import gen_chains as gc
import synthetic
from fake_llm import FakeLLM, Reply
from test_gen_chains import lines, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "gen_chains.py")


def http_args(llm, *extra):
    return ["--base_url", llm.url, "--model", "fake", "--timeout", "2", "--max_tries", "2",
            "--backoff", "0.01", "--step_tries", "3", *extra]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    gc.main(["synth", "--out", str(out), "--n", "8", "--seed", "5", "--frames", "8", "--test_frac", "0.25"])
    return out


@pytest.fixture(scope="module")
def samples(synth_dir, tmp_path_factory):
    """Sampled captions stand-in: for each training video, its rules chain's captions (1..3
    errors) worst first, so the truth of every preference is known."""
    d = tmp_path_factory.mktemp("samples")
    gc.main(["chains", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"),
             "--out", str(d / "chains.jsonl"), "--length", "3"])
    recs = [{"id": r["id"], "video": r["video"], "prompt": r["prompt"], "answers": r["chain"][:0:-1]}
            for r in lines(d / "chains.jsonl")]
    return write_jsonl(d / "samples.jsonl", recs)


def quality(caption, facts):
    return synthetic.caption_quality(caption, facts)


# ---------------------------------------------------------------------------------------------
# rules backends (the facts play the teacher)
# ---------------------------------------------------------------------------------------------

def test_rules_backends_prefer_the_caption_with_fewer_wrong_facts(synth_dir, samples, tmp_path):
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "train.jsonl")}
    for step in ("improve", "compare", "rlaifv"):
        out = tmp_path / f"{step}.jsonl"
        summary = gc.main([step, "--backend", "rules", "--in", samples, "--ref",
                           str(synth_dir / "train.jsonl"), "--out", str(out)])
        assert summary["done"] == len(facts) and summary["failed"] == 0
        recs = [r for r in lines(out) if r["status"] == "ok"]
        assert recs and all(r["source"] == step and r["llm_calls"] >= 1 for r in recs)
        for r in recs:
            q = [quality(c, facts[r["id"]]) for c in r["chain"]]
            assert q == sorted(q, reverse=True) and q[0] > q[-1], (step, r["chain"])
    # compare: the two asks of each record count as two calls; rlaifv: 1 + claims per sample
    assert all(r["llm_calls"] == 2 for r in lines(tmp_path / "compare.jsonl"))
    for r in lines(tmp_path / "rlaifv.jsonl"):
        assert r["llm_calls"] == sum(1 + s["claims"] for s in r["support"])
        assert [s["supported"] / s["claims"] for s in r["support"]] == \
            sorted(s["supported"] / s["claims"] for s in r["support"])   # worst-first input


def test_qa_rules_writes_items_for_sft_sample_and_reward(synth_dir, tmp_path):
    out = tmp_path / "qa.jsonl"
    gc.main(["qa", "--backend", "rules", "--in", str(synth_dir / "train.jsonl"), "--out", str(out), "--n", "2"])
    items = lines(tmp_path / "qa.items.jsonl")
    assert len(items) == 2 * len(lines(out))
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "train.jsonl")}
    for it in items:
        vid = it["id"].rsplit("-q", 1)[0]
        m = synthetic.match_facts(it["answer"], facts[vid])
        assert m["correct"] >= 1 and m["wrong"] == 0, it          # answers are true
        assert it["prompt"] == it["question"] and it["chain"] == [it["answer"]] and it["caption"]


# ---------------------------------------------------------------------------------------------
# LLM backends against the fake server: good replies, preambles, refusals, malformed JSON
# ---------------------------------------------------------------------------------------------

def question(req):
    """The request's first user message: what was asked (a re-ask goes on in the same
    conversation, after the model's unusable reply)."""
    return next(m["content"] for m in req.messages if m["role"] == "user")


def ref_of(req):
    return re.search(r"\(correct\):\n(.*?)\n\n", question(req), re.S).group(1)


def test_improve_http(synth_dir, samples, tmp_path):
    recs = lines(samples)
    bad = {recs[0]["answers"][0]: "refuse", recs[1]["answers"][0]: "garbage", recs[2]["answers"][0]: "same"}
    seen: dict[str, int] = {}

    def responder(req):
        cap = re.search(r"same video:\n(.*?)\n\n", question(req), re.S).group(1)
        seen[cap] = seen.get(cap, 0) + 1
        kind = bad.get(cap)
        if kind == "refuse" and seen[cap] == 1:
            return "I'm sorry, I cannot help with rewriting this caption."
        if kind == "garbage":
            return "{'caption': "                            # malformed, every time
        if kind == "same":             # the sample given back unchanged (rejected), then said plainly
            return json.dumps({"caption": cap} if seen[cap] == 1 else {"already_correct": True})
        return f"Sure! Here is the corrected caption:\n\n\"{ref_of(req)}\"\n\nI fixed the colours."

    with FakeLLM(responder=responder) as llm:
        summary = gc.main(["improve", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                           "--out", str(tmp_path / "o.jsonl"), *http_args(llm)])
    reask = [r.messages for r in llm.requests if recs[0]["answers"][0] in question(r)][1]
    assert [m["role"] for m in reask] == ["system", "user", "assistant", "user"]     # the refusal, shown back
    assert reask[2]["content"].startswith("I'm sorry") and "declines the task" in reask[3]["content"]
    by_id = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    refs = {r["id"]: r["caption"] for r in lines(synth_dir / "train.jsonl")}
    assert by_id[recs[0]["id"]]["chain"] == [refs[recs[0]["id"]], recs[0]["answers"][0]]   # after a refusal
    assert by_id[recs[0]["id"]]["llm_calls"] == 2
    assert by_id[recs[1]["id"]]["status"] == "failed" and "rejected" in by_id[recs[1]["id"]]["reason"]
    assert by_id[recs[2]["id"]]["status"] == "no_preference"
    assert by_id[recs[2]["id"]]["llm_calls"] == 2
    assert summary["rejected"]["refused"] == 1 and summary["rejected"]["unchanged"] == 1
    assert summary["failed"] == 1
    for r in recs[3:]:                                         # the preamble was stripped
        assert by_id[r["id"]]["chain"][0] == refs[r["id"]] and by_id[r["id"]]["source"] == "improve"


def test_compare_http_cancels_position_bias(synth_dir, samples, tmp_path):
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "train.jsonl")}
    recs = lines(samples)
    biased = recs[0]["answers"][0]
    calls = {"n": 0}

    def responder(req):
        text = question(req)
        one = re.search(r"Caption 1:\n(.*?)\n\n", text, re.S).group(1)
        two = re.search(r"Caption 2:\n(.*?)\n\n", text, re.S).group(1)
        if biased in (one, two):
            return '{"better": 1}'                            # always the first: position bias
        calls["n"] += 1
        if calls["n"] == 1:
            return "not json at all"                          # unreadable: asked again
        rid = next(r["id"] for r in recs if one in r["answers"])
        best = "1" if quality(one, facts[rid]) > quality(two, facts[rid]) else "2"
        return f"After careful thought, Caption {best} is better." if calls["n"] % 2 else \
            json.dumps({"better": int(best)})

    with FakeLLM(responder=responder) as llm:
        summary = gc.main(["compare", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                           "--out", str(tmp_path / "o.jsonl"), *http_args(llm, "--concurrency", "1")])
    by_id = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert by_id[recs[0]["id"]]["status"] == "no_preference"
    assert summary["no_preference"]["orders disagree"] == 1 and summary["rejected"]["unreadable"] == 1
    for r in recs[1:]:
        out = by_id[r["id"]]
        assert out["status"] == "ok" and out["source"] == "compare"
        assert quality(out["chain"][0], facts[r["id"]]) > quality(out["chain"][1], facts[r["id"]])


def test_rlaifv_http_ranks_by_supported_share(synth_dir, samples, tmp_path):
    facts = {r["id"]: r["facts"] for r in lines(synth_dir / "train.jsonl")}
    caption_to_id = {a: r["id"] for r in lines(samples) for a in r["answers"]}
    refs = {r["caption"]: r["id"] for r in lines(synth_dir / "train.jsonl")}
    failing = lines(samples)[0]["answers"][1]

    def responder(req):
        text = question(req)
        if text.startswith("Caption of a video"):
            cap = text.split("\n", 2)[1]
            if cap == failing:
                return "Here are the claims: claims = first one, second one"    # no JSON, ever
            return "Sure! ```json\n" + json.dumps({"claims": synthetic.rules_claims(cap)}) + "\n```"
        claim = re.search(r"Claim: (.*?)\n\n", text, re.S).group(1)
        ok = synthetic.rules_supported(claim, facts[refs[ref_of(req)]])
        return json.dumps({"verdict": "yes" if ok else "no"})

    with FakeLLM(responder=responder) as llm:
        gc.main(["rlaifv", "--in", samples, "--ref", str(synth_dir / "train.jsonl"),
                 "--out", str(tmp_path / "o.jsonl"), *http_args(llm)])
    out = lines(tmp_path / "o.jsonl")
    assert out[0]["status"] == "failed" and "rejected" in out[0]["reason"]
    for r in out[1:]:
        rid = caption_to_id[r["chain"][0]]
        q = [quality(c, facts[rid]) for c in r["chain"]]
        assert r["status"] == "ok" and q == sorted(q, reverse=True) and len(q) >= 2


@pytest.mark.parametrize("step,records,message", [
    ("improve", ['{"id": "syn-5-000000", "prompt": "p"}'], r"s.jsonl:1: field 'answers': missing"),
    ("compare", ['{"id": "syn-5-000000", "answers": ["only one"]}'], r"s.jsonl:1: field 'answers': expected at least 2"),
    ("rlaifv", ['{"id": "syn-5-000000", "answers": ["a", "b"]}', '{"id": "nope", "answers": ["a", "b"]}'],
     r"s.jsonl:2: field 'id': no reference caption with id 'nope'"),
])
def test_onpolicy_bad_input_names_file_and_line(synth_dir, tmp_path, step, records, message):
    inp = write_jsonl(tmp_path / "s.jsonl", records)
    with pytest.raises(SystemExit, match=message):
        gc.main([step, "--backend", "rules", "--in", inp, "--ref", str(synth_dir / "train.jsonl"),
                 "--out", str(tmp_path / "o.jsonl")])


def test_reward_question_without_caption_names_file_and_line(tmp_path):
    inp = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "caption": "c", "question": "q", "answers": ["x", "y"]},
                                             {"id": "b", "question": "q", "answers": ["x", "y"]}])
    with pytest.raises(SystemExit, match=r"s.jsonl:2: field 'caption': missing"):
        gc.main(["reward", "--in", inp, "--out", str(tmp_path / "o.jsonl"), "--base_url", "http://127.0.0.1:9"])


# ---------------------------------------------------------------------------------------------
# sample: determinism under a seed, resume after a kill
# ---------------------------------------------------------------------------------------------

def test_sample_is_seeded_per_record_and_resumes(synth_dir, tmp_path):
    data = str(synth_dir / "test.jsonl")
    args = ["sample", "--data", data, "--num_samples", "3", "--max_new_tokens", "8", "--num_frames", "4",
            "--device", "cpu", "--seed", "7"]
    full = E.main(args + ["--out", str(tmp_path / "full.jsonl")])
    assert full["sampled"] == 2
    recs = lines(tmp_path / "full.jsonl")
    assert all(len(r["answers"]) == 3 and r["prompt"] and r["video"] for r in recs)
    assert len(set(recs[0]["answers"])) > 1                      # samples, not one greedy caption three times
    # A run killed after its first record (second one torn), resumed: the same output.
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps(recs[0]) + '\n{"id": "' + recs[1]["id"] + '", "answ')
    resumed = E.main(args + ["--out", str(part)])
    assert resumed["sampled"] == 1 and lines(part) == recs
    other = E.main(args[:-1] + ["8", "--out", str(tmp_path / "other.jsonl")])
    assert other["sampled"] == 2 and lines(tmp_path / "other.jsonl") != recs
    greedy = E.main(["sample", "--data", data, "--num_samples", "1", "--temperature", "0", "--max_new_tokens",
                     "8", "--num_frames", "4", "--device", "cpu", "--out", str(tmp_path / "g.jsonl")])
    assert greedy["sampled"] == 2
    with pytest.raises(SystemExit, match="greedy"):
        E.main(["sample", "--data", data, "--num_samples", "2", "--temperature", "0",
                "--out", str(tmp_path / "g2.jsonl"), "--device", "cpu"])


# ---------------------------------------------------------------------------------------------
# LLaVA-Hound-DPO's whole loop on the tiny model
# ---------------------------------------------------------------------------------------------

def test_llava_hound_loop_on_the_tiny_model(synth_dir, tmp_path):
    import rank_dpo
    d = tmp_path
    train, test = str(synth_dir / "train.jsonl"), str(synth_dir / "test.jsonl")
    vroot = ["--video_root", str(synth_dir)]
    gc.main(["qa", "--backend", "rules", "--in", train, "--out", str(d / "qa.jsonl"), "--n", "2"])
    gc.main(["qa", "--backend", "rules", "--in", test, "--out", str(d / "qa_test.jsonl"), "--n", "2"])
    common = ["--model", "tiny", "--num_frames", "4", "--batch_size", "2", "--lr", "1e-3",
              "--save_every", "0", "--log_every", "1", *vroot]
    rank_dpo.main(["--objective", "sft", "--data", str(d / "qa.items.jsonl"), "--max_steps", "3",
                   "--output_dir", str(d / "sft"), *common])
    E.main(["sample", "--adapter", str(d / "sft"), "--data", str(d / "qa.items.jsonl"), *vroot,
            "--num_samples", "3", "--max_new_tokens", "8", "--num_frames", "4", "--device", "cpu",
            "--out", str(d / "samples.jsonl")])

    def score(req):                 # the judge: how many of the answer's words the caption has
        cap = re.search(r"evidence about the video\):\n(.*?)\n\n", req.user_text, re.S).group(1).lower()
        ans = re.search(r"Answer to judge: (.*?)\n\n", req.user_text, re.S).group(1).lower().split()
        s = min(5, sum(w in cap for w in ans))
        return json.dumps({"verdict": "yes" if s >= 3 else "no", "score": s, "explanation": "."})

    with FakeLLM(responder=score) as llm:
        gc.main(["reward", "--in", str(d / "samples.jsonl"), "--out", str(d / "ranked.jsonl"), "--pairs",
                 *http_args(llm)])
        ranked = lines(d / "ranked.jsonl")
        assert {r["id"] for r in ranked} == {r["id"] for r in lines(d / "samples.jsonl")}
        ok = [r for r in ranked if r["status"] == "ok"]
        assert ok, ranked
        assert all(len(r["chain"]) == 2 and r["scores"][0] > r["scores"][1] for r in ok)
        rank_dpo.main(["--objective", "dpo", "--data", str(d / "ranked.jsonl"), "--max_steps", "2",
                       "--init", str(d / "sft"), "--output_dir", str(d / "dpo"), *common])
        E.main(["sample", "--adapter", str(d / "dpo"), "--data", str(d / "qa_test.items.jsonl"), *vroot,
                "--num_samples", "1", "--temperature", "0", "--max_new_tokens", "8", "--num_frames", "4",
                "--device", "cpu", "--out", str(d / "answers.jsonl")])
        res = E.main(["reward", "--data", str(d / "answers.jsonl"), "--out", str(d / "reward.jsonl"),
                      "--base_url", llm.url, "--model", "fake", "--max_tries", "2"])
    assert res["n_scored"] == len(lines(d / "qa_test.items.jsonl")) and 0 <= res["score"]["mean"] <= 5


# ---------------------------------------------------------------------------------------------
# One writer per output file (real processes)
# ---------------------------------------------------------------------------------------------

def test_a_second_writer_stops_at_once_and_a_killed_one_blocks_nothing(synth_dir, tmp_path):
    base = lines(synth_dir / "train.jsonl")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"k{i:02d}", "caption": base[i % len(base)]["caption"]}
                                              for i in range(30)])
    out = tmp_path / "out.jsonl"

    def reply(req):                 # a slow server: one word changed per step
        cap = re.search(r"Caption:\n(.*?)\n\n", req.user_text, re.S).group(1)
        words = cap.split()
        return json.dumps({"caption": " ".join(words[:-2] + ["purple", words[-1]])}) if "purple" not in cap \
            else json.dumps({"caption": cap.replace("purple", "orange", 1)})

    with FakeLLM(responder=reply, latency=0.1) as llm:
        cmd = [sys.executable, GEN, "chains", "--in", inp, "--out", str(out), "--length", "1",
               "--unconditioned", "--concurrency", "1", "--base_url", llm.url, "--model", "fake"]
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert time.monotonic() - t0 < 20 and second.returncode != 0
        assert f"{out}: another run (pid {first.pid}) is writing this file" in second.stderr
        assert first.poll() is None                             # the first one goes on
        first.send_signal(signal.SIGKILL)
        first.wait()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)   # not blocked
        assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == [f"k{i:02d}" for i in range(30)]      # every id exactly once


def test_sample_on_a_hub_format_model_from_a_local_path(tmp_path):
    """A model saved in the hub's format (here a text-only Qwen2 causal LM with its tokenizer),
    loaded by path: one answer set per question record, text-only records need no video."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    synthetic.build_tiny_tokenizer().save_pretrained(tmp_path / "lm")
    data = write_jsonl(tmp_path / "qa.jsonl", [{"id": f"q{i}", "question": f"What moves {d}?", "caption": "c"}
                                               for i, d in enumerate(("left", "up"))])
    res = E.main(["sample", "--model", str(tmp_path / "lm"), "--data", data, "--num_samples", "2",
                  "--max_new_tokens", "6", "--device", "cpu", "--out", str(tmp_path / "s.jsonl")])
    recs = lines(tmp_path / "s.jsonl")
    assert res["sampled"] == 2 and [r["question"] for r in recs] == ["What moves left?", "What moves up?"]
    assert all(len(r["answers"]) == 2 and r["caption"] == "c" and "video" not in r for r in recs)


def test_eval_steps_take_the_same_lock(synth_dir, tmp_path):
    """`eval_judge.py judge` (like generate and sample) writes through the same locked output."""
    out = tmp_path / "scores.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, records as g; "
                               f"g.lock_output({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        preds = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "caption": r["caption"]}
                                                   for r in lines(synth_dir / "test.jsonl")])
        argv = ["judge", "--judge", "rules", "--pred", preds, "--ref", str(synth_dir / "test.jsonl"),
                "--out", str(out)]
        with pytest.raises(SystemExit, match=rf"another run \(pid {holder.pid}\)"):
            E.main(argv)
    finally:
        holder.kill()
        holder.wait()
    assert E.main(argv)["n_scored"] == len(lines(synth_dir / "test.jsonl"))    # a dead holder blocks nothing
