"""eval_judge.py: statistics against hand-computed values, judge parsing, the LLM judge over a
real (fake) HTTP server with faults, the rules judge, and mcq / rank / generate on the tiny model
in cases built so the right answer is certain."""
import json
import math
import os

import numpy as np
import pytest

import eval_judge as E
import synthetic
from fake_llm import FakeLLM, Reply
from forced_logits import fixed_logits, token_id

GOOD = '{"relevance": 8, "descriptiveness": 7, "temporal_consistency": 9, "fluency": 10}'


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def test_average_ranks_share_ties():
    assert E.average_ranks([10, 20, 20, 5]).tolist() == [2, 3.5, 3.5, 1]
    assert E.average_ranks([7, 7, 7]).tolist() == [2, 2, 2]


def test_spearman_hand_computed():
    # y's ranks with the tie averaged: [1, 2, 3.5, 5, 3.5]; centred x ranks [-2, -1, 0, 1, 2],
    # centred y ranks [-2, -1, .5, 2, .5]: rho = 8 / sqrt(10 * 9.5) = 0.82078...
    assert E.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert E.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert E.spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)  # d^2 = 4+1+1: 1 - 6*6/24
    assert math.isnan(E.spearman([1, 2, 3], [4, 4, 4]))            # undefined, not 0
    assert math.isnan(E.spearman([1], [2]))


def test_kendall_tau_b_hand_computed():
    # Pairs of x=[12,2,1,12,2], y=[1,4,7,1,0]: concordant (0,4),(3,4); discordant (0,1),(0,2),
    # (1,2),(1,3),(2,3),(2,4); tied in x (0,3),(1,4); tied in y (0,3). tau_b = (2-6)/sqrt(8*9).
    assert E.kendall_tau_b([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-4 / math.sqrt(72))
    assert E.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # C=2, D=1, no ties
    assert E.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(E.kendall_tau_b([1, 2, 3], [5, 5, 5]))


def test_chain_metrics_and_ties_as_coin_flips():
    assert E.chain_metrics([3.0, 2.0, 1.0]) == {"pairwise": 1.0, "kendall": 1.0, "top1": 1.0}
    assert E.chain_metrics([1.0, 2.0, 3.0]) == {"pairwise": 0.0, "kendall": -1.0, "top1": 0.0}
    m = E.chain_metrics([1.0, 1.0, 0.0])   # best two tied: half a pair, half a top-1
    assert m["pairwise"] == pytest.approx(2.5 / 3)
    assert m["top1"] == 0.5
    assert m["kendall"] == pytest.approx(2 / math.sqrt(3 * 2))  # C=2, D=0, one tie in the scores
    with pytest.raises(ValueError):
        E.chain_metrics([1.0])


def test_bootstrap_ci():
    values = np.random.default_rng(1).normal(5.0, 1.0, size=400)
    lo, hi = E.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.2)  # ~ normal theory
    assert E.bootstrap_ci(values) == (lo, hi)                          # seeded: reproducible
    assert E.bootstrap_ci([7, 7, 7]) == (7.0, 7.0)
    assert E.mean_ci([1, 2, 3, 4, 5])["mean"] == 3.0


# ----------------------------------------------------------------------------------------------
# Reading judge replies
# ----------------------------------------------------------------------------------------------

FULL = {"relevance": 8.0, "descriptiveness": 7.0, "temporal_consistency": 9.0, "fluency": 10.0}


@pytest.mark.parametrize("reply", [
    GOOD,
    "Sure! Here is my evaluation:\n```json\n" + GOOD + "\n```\nLet me know if you need more.",
    "Scores: {'relevance': 8, 'descriptiveness': 7, 'temporal_consistency': 9, 'fluency': 10,}",
    '{"Relevance": "8/10", "Descriptiveness": 7, "Temporal Consistency": "9", "Fluency": {"score": 10}}',
    '{"scores": {"relevance": 8, "descriptiveness": 7, "temporal": 9, "fluency": 10}, "reason": "ok"}',
    "**Relevance**: 8/10\n**Descriptiveness** (1-10): 7\nTemporal consistency - 9 out of 10\n"
    "Fluency score is 10.",
    "The description is vague. Relevance: 8, Descriptiveness: 7, Temporal Consistency: 9, Fluency: 10",
    'Relevance: 3 at first glance... {"relevance": 8, "descriptiveness": 7, "temporal_consistency": 9} '
    "and Fluency: 10",                                     # JSON wins; the missing axis from prose
    "Relevance: 4/5, Descriptiveness: 3.5/5, Temporal consistency: 4.5 out of 5, Fluency: 5/5",
])
def test_parse_axis_scores_messy_but_usable(reply):
    scores, problems = E.parse_axis_scores(reply)
    assert problems == []
    assert scores == FULL


@pytest.mark.parametrize("reply, problem", [
    ('{"relevance": 11, "descriptiveness": 7, "temporal_consistency": 9, "fluency": 10}',
     "relevance=11 is outside 1-10"),
    ('{"relevance": 0, "descriptiveness": 7, "temporal_consistency": 9, "fluency": 10}',
     "relevance=0 is outside 1-10"),
    ('{"relevance": 80, "descriptiveness": 70, "temporal_consistency": 90, "fluency": 100}',
     "fluency=100 is outside 1-10"),                       # another scale is not clamped to 10
    ('{"relevance": 8, "descriptiveness": 7, "fluency": 10}', "no score for temporal_consistency"),
    ("Relevance: 8-9, Descriptiveness: 7, Temporal consistency: 9, Fluency: 10",
     "no score for relevance"),                            # a range is not a score
    ("I cannot rate this caption.", "no score for fluency"),
    ("", "no score for relevance"),
])
def test_parse_axis_scores_problems(reply, problem):
    _, problems = E.parse_axis_scores(reply)
    assert problem in problems


@pytest.mark.parametrize("reply, verdict", [
    ('{"better": "1"}', "1"), ('{"better": 2}', "2"), ('{"winner": "Caption 2"}', "2"),
    ('```json\n{"better": "tie"}\n```', "tie"), ("Caption 1 is better because it is precise.", "1"),
    ("Both are close, but overall the better one is caption 2.", "2"), ("It's a tie.", "tie"),
])
def test_parse_verdict(reply, verdict):
    assert E.parse_verdict(reply) == (verdict, [])


def test_parse_verdict_unusable():
    assert E.parse_verdict("Hard to say.")[0] is None


# ----------------------------------------------------------------------------------------------
# The LLM judge over HTTP, with faults (the client is gen_chains.ChatClient)
# ----------------------------------------------------------------------------------------------

def client_for(llm, **kw):
    from gen_chains import ChatClient
    return ChatClient(llm.url, "fake", max_tries=kw.get("max_tries", 3), backoff=0.01)


@pytest.mark.parametrize("fault", [Reply.error(429, retry_after=0), Reply.error(500),
                                   Reply.malformed(), Reply.empty()])
def test_judge_llm_survives_transport_faults(fault):
    with FakeLLM(default=GOOD) as llm:
        llm.push(fault)
        out = E.judge_llm(client_for(llm), "a red ball rolls left", "a red ball moves left")
        assert out["scores"] == FULL and out["tries"] == 1   # the client retried, not the judge
        assert len(llm.requests) == 2
        body = llm.requests[-1].body
        assert "a red ball rolls left" in body["messages"][-1]["content"]


def test_judge_llm_reasks_with_the_problem():
    with FakeLLM(default=GOOD) as llm:
        llm.push("Looks fine to me!", '{"relevance": 12, "descriptiveness": 7}')
        out = E.judge_llm(client_for(llm), "ref", "cand")
        assert out["scores"] == FULL and out["tries"] == 3
        third = llm.requests[2].messages                     # the whole conversation is kept
        assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert third[2]["content"] == "Looks fine to me!"
        assert "no score for relevance" in third[3]["content"]
        assert "relevance=12 is outside 1-10" in third[5]["content"]


def test_judge_llm_unparseable_is_recorded_not_guessed():
    with FakeLLM(default="no idea") as llm:
        out = E.judge_llm(client_for(llm), "ref", "cand", reask=1)
        assert out["status"] == "failed" and "unparseable" in out["reason"]
        assert out["reply"] == "no idea" and len(llm.requests) == 2


def test_judge_cli_llm_with_permanent_failure(tmp_path):
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": f"v{i}", "caption": f"caption {i}"} for i in range(4)])
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"id": f"v{i}", "caption": f"reference {i}"} for i in range(4)])
    out = str(tmp_path / "scores.jsonl")

    def responder(req):  # the server always fails the request about caption 2
        return Reply.error(500) if "caption 2" in req.user_text else GOOD
    with FakeLLM(responder=responder) as llm:
        args = ["judge", "--judge", "llm", "--pred", pred, "--ref", ref, "--out", out,
                "--base_url", llm.url, "--max_tries", "2", "--backoff", "0.01", "--concurrency", "2"]
        res = E.main(args)
        assert llm.requests[0].body["temperature"] == 0.0    # a judge is asked to be repeatable
    recs = {r["id"]: r for r in read_jsonl(out)}
    assert recs["v2"]["status"] == "failed" and "HTTP 500" in recs["v2"]["reason"]
    assert recs["v0"]["scores"] == FULL
    assert res["n_scored"] == 3 and res["n_failed"] == 1 and res["failed"][0]["id"] == "v2"
    assert res["axes"]["relevance"]["mean"] == 8.0 and res["axes"]["relevance"]["n"] == 3
    saved = json.load(open(tmp_path / "scores.results.json"))
    assert saved["overall"]["mean"] == pytest.approx(8.5)

    # Re-running with --retry_failed asks only for the failed caption; now it succeeds.
    with FakeLLM(default=GOOD) as llm:
        args[args.index("--base_url") + 1] = llm.url
        res = E.main(args + ["--retry_failed"])
        assert len(llm.requests) == 1 and "caption 2" in llm.requests[0].user_text
    assert res["n_scored"] == 4 and res["n_failed"] == 0


def test_compare_llm_asks_both_orders_and_cancels_position_bias(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "caption": "GOOD one"}, {"id": "y", "caption": "meh"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "caption": "plain"}, {"id": "y", "caption": "GOOD two"}])
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"id": "x", "caption": "r"}, {"id": "y", "caption": "r"}])

    def fair(req):   # prefers the caption that says GOOD, wherever it stands
        first = req.user_text.split("Caption 1:")[1].split("Caption 2:")[0]
        return '{"better": "1"}' if "GOOD" in first else '{"better": "2"}'
    with FakeLLM(responder=fair) as llm:
        res = E.main(["compare", "--judge", "llm", "--a", a, "--b", b, "--ref", ref,
                      "--out", str(tmp_path / "c.jsonl"), "--base_url", llm.url, "--concurrency", "1"])
        firsts = [r.user_text.split("Caption 1:")[1].split("Caption 2:")[0].strip() for r in llm.requests]
    assert sorted(firsts) == sorted(["GOOD one", "plain", "meh", "GOOD two"])  # each caption once first
    assert res["win"]["mean"] == 0.5 and res["loss"]["mean"] == 0.5 and res["order_agreement"] == 1.0

    with FakeLLM(default='{"better": "1"}') as llm:      # a judge that only ever picks position 1
        res = E.main(["compare", "--judge", "llm", "--a", a, "--b", b, "--ref", ref,
                      "--out", str(tmp_path / "c2.jsonl"), "--base_url", llm.url])
    assert res["tie"]["mean"] == 1.0 and res["first_position_rate"] == 1.0


# ----------------------------------------------------------------------------------------------
# agree, and errors that name file and line
# ----------------------------------------------------------------------------------------------

def score_rec(rid, r, d=5, t=5, f=5):
    return {"id": rid, "scores": {"relevance": r, "descriptiveness": d, "temporal_consistency": t, "fluency": f}}


def test_agree_spearman_per_axis(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [score_rec(f"v{i}", r) for i, r in enumerate([1, 2, 3, 4, 5])]
                    + [{"id": "v9", "status": "failed", "reason": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [score_rec(f"v{i}", r, d=i) for i, r in enumerate([5, 6, 7, 8, 7])])
    res = E.main(["agree", "--a", a, "--b", b])
    assert res["axes"]["relevance"]["spearman"] == pytest.approx(8 / math.sqrt(95))
    assert res["n_common"] == 5
    saved = json.load(open(tmp_path / "a.agree.results.json"))
    assert saved["axes"]["fluency"]["spearman"] is None     # constant: undefined, written as null


@pytest.mark.parametrize("make, where", [
    (lambda p: write_jsonl(p, [score_rec("v0", 5), "{not json", score_rec("v2", 5)]), ":2: malformed JSON"),
    (lambda p: write_jsonl(p, [score_rec("v0", 5), score_rec("v0", 6)]), ":2: field 'id': duplicate id 'v0' (first on line 1)"),
    (lambda p: write_jsonl(p, [score_rec("v0", 5), {"id": "v1", "scores": {"relevance": 3}}]),
     ":2: field 'scores.descriptiveness'"),
    (lambda p: write_jsonl(p, [score_rec("v0", 5), score_rec("v1", "high")]), ":2: field 'scores.relevance'"),
])
def test_bad_score_file_names_file_and_line(tmp_path, make, where):
    bad = str(tmp_path / "bad.jsonl")
    make(bad)
    good = write_jsonl(tmp_path / "good.jsonl", [score_rec(f"v{i}", i + 1) for i in range(3)])
    with pytest.raises(SystemExit) as e:
        E.main(["agree", "--a", good, "--b", bad])
    assert f"bad.jsonl{where}" in str(e.value)


def test_judge_errors_name_file_and_line(tmp_path):
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"id": "v0", "caption": "r"}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "v0", "caption": "c"}, {"id": "v7", "caption": "c"}])
    with pytest.raises(SystemExit, match=r"pred.jsonl:2: field 'id': id 'v7' has no reference"):
        E.main(["judge", "--pred", pred, "--ref", ref, "--out", str(tmp_path / "s.jsonl"), "--judge", "llm"])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "v0", "caption": 3}])
    with pytest.raises(SystemExit, match=r"pred.jsonl:1: field 'caption': expected a string"):
        E.main(["judge", "--pred", pred, "--ref", ref, "--out", str(tmp_path / "s.jsonl"), "--judge", "llm"])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "v0", "caption": "c"}])
    with pytest.raises(SystemExit, match=r"ref.jsonl:1: field 'facts': missing"):
        E.main(["judge", "--pred", pred, "--ref", ref, "--out", str(tmp_path / "s.jsonl")])  # rules


# ----------------------------------------------------------------------------------------------
# mcq / rank / generate on the tiny model. A randomly initialised model has no "right" answer,
# so the certain cases replace the output layer's logits through a forward hook: the whole
# pipeline (chat template, video, label masking of the prompt, letters, argmax, metrics) runs
# as usual, but the next-token distribution is one whose answers can be worked out by hand.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from rank_dpo import load_model
    return load_model("tiny")


def save_video(path, seed=0):
    np.save(path, np.random.default_rng(seed).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8))
    return os.path.basename(path)


OPTIONS = ["a red circle moves left", "a blue square moves up", "a green triangle appears",
           "two white circles move down", "the background is gray"]


def mcq_file(tmp_path):
    from gen_chains import format_mcq
    video = save_video(tmp_path / "v.npy")
    return write_jsonl(tmp_path / "mcq.jsonl", [
        {"id": "q1", "video": video, "question": "What happens?", "options": OPTIONS, "answer": 2},  # C
        {"id": "q2", "question": "What happens?", "options": OPTIONS, "answer": 0},                  # A
        {"id": "q3", "video": video, "prompt": format_mcq("Which one?", OPTIONS[:3]),
         "chain": ["C", "A", "B"], "errors": [None, {"type": "color"}, {"type": "shape"}]},
    ])


def test_mcq_picks_the_letter_with_the_highest_logprob(tiny, tmp_path):
    # The hook puts e^50 on "C" and on the end-of-turn token, 1 on every other token. The
    # response "C" is [C, <|im_end|>]: log p = 2 * log(e^50 / (2 e^50 + V - 2)) ~ -2 log 2;
    # any other letter X costs log p(X) ~ -50 - log 2 on its first token. So "C" wins every
    # item: q1 (answer C) and q3 (chain[0] = C) are right, q2 (answer A) is wrong.
    from rank_dpo import VideoSampling
    model, processor = tiny
    items, _ = E.load_mcq(mcq_file(tmp_path), str(tmp_path))
    boost = {token_id(processor, "C"): 50.0, token_id(processor, "<|im_end|>"): 50.0}
    with fixed_logits(model, [boost]):
        preds = E.mcq_predictions(model, processor, items, VideoSampling(8))
    assert [p["pred"] for p in preds] == ["C", "C", "C"]
    assert [p["correct"] for p in preds] == [True, False, True]
    assert preds[0]["logps"]["C"] == pytest.approx(-2 * math.log(2), abs=1e-3)
    assert sorted(preds[2]["logps"]) == ["A", "B", "C"]          # the chain's letters only


def test_mcq_cli(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    data = mcq_file(tmp_path)
    monkeypatch.setattr(E, "_load", lambda args, adapter: (model, processor))
    boost = {token_id(processor, "C"): 50.0, token_id(processor, "<|im_end|>"): 50.0}
    with fixed_logits(model, [boost]):
        res = E.main(["mcq", "--data", data, "--out", str(tmp_path / "preds.jsonl"), "--device", "cpu"])
    assert res["accuracy"]["mean"] == pytest.approx(2 / 3) and res["accuracy"]["n"] == 3
    assert res["predicted_letters"] == {"C": 3}
    assert res["chance"] == pytest.approx((1 / 5 + 1 / 5 + 1 / 3) / 3)
    assert os.path.exists(tmp_path / "mcq.mcq.results.json")
    assert len(read_jsonl(tmp_path / "preds.jsonl")) == 3


def test_mcq_bad_items_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mcq.jsonl", [
        {"id": "q1", "question": "?", "options": OPTIONS, "answer": 1},
        {"id": "q2", "question": "?", "options": OPTIONS, "answer": 5}])
    with pytest.raises(E.DataError, match=r"mcq.jsonl:2: field 'answer': expected an option index 0..4"):
        E.load_mcq(path, str(tmp_path))
    path = write_jsonl(tmp_path / "mcq.jsonl", [{"id": "q1", "prompt": "?", "chain": ["C", "not a letter"]}])
    with pytest.raises(E.DataError, match=r"mcq.jsonl:1: field 'chain'"):
        E.load_mcq(path, str(tmp_path))
    path = write_jsonl(tmp_path / "mcq.jsonl", [{"id": "q1", "video": "nope.npy", "question": "?",
                                                 "options": OPTIONS, "answer": 1}])
    with pytest.raises(E.DataError, match=r"mcq.jsonl:1: field 'video': video not found: .*nope.npy"):
        E.load_mcq(path, str(tmp_path))


GROWING = ["a red circle", "a red circle moves left", "a red circle moves left and then disappears"]


def chains_file(tmp_path):
    video = save_video(tmp_path / "v.npy")
    return write_jsonl(tmp_path / "chains.jsonl", [
        {"id": "best-first", "video": video, "prompt": "Describe this video in detail.", "chain": GROWING},
        {"id": "worst-first", "prompt": "Describe this video in detail.", "chain": GROWING[::-1]},
        {"id": "yes-no", "video": video, "prompts": ["Is it red?", "Is it blue?", "Is it green?"],
         "response": "no"},
        {"id": "lost", "status": "failed", "reason": "HTTP 500"},   # as gen_chains writes a failure
    ])


def test_rank_on_chains_with_a_certain_order(tiny, tmp_path):
    # Uniform logits: every token has log p = -log V, so a response of n tokens (its words plus
    # the end-of-turn token) scores exactly -n log V. Each entry of GROWING is the previous one
    # plus more words, hence more tokens, hence strictly lower: the order is certain. The yes/no
    # chain has one response ("no") under three prompts: three equal scores, a tie.
    from rank_dpo import VideoSampling, tokenizer_of
    model, processor = tiny
    chains, _ = E.load_eval_chains(chains_file(tmp_path), str(tmp_path))
    with fixed_logits(model):
        scores = E.chain_logps(model, processor, chains, VideoSampling(8))
    vocab = model.lm_head.out_features
    n_tokens = [len(tokenizer_of(processor)(c + "<|im_end|>", add_special_tokens=False).input_ids)
                for c in GROWING]
    assert scores[0] == pytest.approx([-n * math.log(vocab) for n in n_tokens], rel=1e-5)
    per = [E.chain_metrics(s) for s in scores]
    assert per[0] == {"pairwise": 1.0, "kendall": 1.0, "top1": 1.0}
    assert per[1] == {"pairwise": 0.0, "kendall": -1.0, "top1": 0.0}
    assert per[2]["pairwise"] == 0.5 and per[2]["top1"] == pytest.approx(1 / 3) and math.isnan(per[2]["kendall"])
    summary = E.ranking_summary(scores)
    assert summary["pairwise"]["mean"] == pytest.approx(0.5)
    assert summary["kendall"]["mean"] == 0.0 and summary["kendall"]["n"] == 2  # the tie has no tau
    assert summary["n_chains"] == 3


def test_rank_cli_implicit_reward_of_a_no_op_adapter_is_zero(tmp_path):
    # A LoRA adapter straight from initialisation has B = 0: merged, it changes no weight, so
    # log pi = log pi_ref for every caption and the implicit reward ties every chain.
    from peft import LoraConfig, get_peft_model
    from rank_dpo import load_model
    base, _ = load_model("tiny")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "adapter"))
    data = chains_file(tmp_path)
    res = E.main(["rank", "--data", data, "--adapter", str(tmp_path / "adapter"), "--device", "cpu",
                  "--out", str(tmp_path / "scores.jsonl")])
    reward = res["scorers"]["implicit reward"]
    assert reward["pairwise"]["mean"] == 0.5 and reward["top1"]["mean"] == pytest.approx(1 / 3)
    assert reward["kendall"]["n"] == 0                              # all ties: tau undefined
    assert res["scorers"]["log-prob"]["n_chains"] == 3 and res["failed_records_skipped"] == 1
    assert res["reference"] == "base model"
    rows = read_jsonl(tmp_path / "scores.jsonl")
    assert rows[0]["implicit reward"] == [0.0, 0.0, 0.0] and len(rows[0]["log-prob"]) == 3
    saved = json.load(open(tmp_path / "chains.rank.results.json"))
    assert saved["scorers"]["implicit reward"]["kendall"]["mean"] is None

    # A run warm-started with rank_dpo.py --init keeps that adapter under init/ and names it in
    # its run file; that warm start is the run's reference model, so it is rank's too.
    from rank_dpo import RUN_META
    os.rename(tmp_path / "adapter", tmp_path / "init")
    base, _ = load_model("tiny")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "run"))
    os.rename(tmp_path / "init", tmp_path / "run" / "init")
    (tmp_path / "run" / RUN_META).write_text(json.dumps({"init": "init"}))
    res = E.main(["rank", "--data", data, "--adapter", str(tmp_path / "run"), "--device", "cpu"])
    assert res["reference"] == str(tmp_path / "run" / "init")
    assert res["scorers"]["implicit reward"]["pairwise"]["mean"] == 0.5


def test_rank_bad_chain_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "c1", "prompt": "p", "chain": ["a", "b"]},
                                             {"id": "c2", "prompt": "p", "chain": ["only one"]}])
    with pytest.raises(E.DataError, match=r"c.jsonl:2: field 'chain': expected a list of at least two"):
        E.load_eval_chains(path, str(tmp_path))


def test_generate_resumes_and_is_greedy(tmp_path):
    videos = [save_video(tmp_path / f"v{i}.npy", seed=i) for i in range(3)]
    data = write_jsonl(tmp_path / "test.jsonl", [{"id": f"v{i}", "video": v, "caption": "gold"}
                                                 for i, v in enumerate(videos)])
    out = tmp_path / "captions.jsonl"
    # A run killed mid-write: v1 finished, v2's line torn.
    out.write_text(json.dumps({"id": "v1", "caption": "KEEP"}) + '\n{"id": "v2", "capt')
    args = ["generate", "--data", data, "--out", str(out), "--max_new_tokens", "6", "--batch_size", "2",
            "--num_frames", "4", "--device", "cpu"]
    res = E.main(args)
    assert res["generated"] == 2 and res["skipped"] == 1
    recs = read_jsonl(out)
    assert sorted(r["id"] for r in recs) == ["v0", "v1", "v2"]
    assert {r["id"]: r["caption"] for r in recs}["v1"] == "KEEP"
    assert E.main(args)["generated"] == 0                           # nothing left to do
    again = E.main(args[:4] + [str(tmp_path / "again.jsonl")] + args[5:])
    assert again["generated"] == 3
    first = {r["id"]: r["caption"] for r in recs}
    assert {r["id"]: r["caption"] for r in read_jsonl(tmp_path / "again.jsonl")}["v0"] == first["v0"]


def test_generate_missing_video_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", [{"id": "v0"}, {"id": "v1", "video": "missing.npy"}])
    with pytest.raises(SystemExit, match=r"test.jsonl:2: field 'video'"):
        E.main(["generate", "--data", data, "--out", str(tmp_path / "c.jsonl"), "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# The rules judge (offline, from the synthetic scene's facts via gen_chains.match_facts)
# ----------------------------------------------------------------------------------------------

FACTS = {"background": "gray", "objects": [
    {"count": 1, "size": "small", "color": "red", "shape": "circle", "position": "left", "direction": "up"},
    {"count": 2, "size": "large", "color": "blue", "shape": "square", "position": "right", "direction": "down"}],
    "events": [["appear", 0], ["appear", 1], ["disappear", 0]], "frames": [0, 5, 10]}
GOLD = ("First, a small red circle appears on the left and moves up. Then two large blue squares appear "
        "on the right and move down. Finally, the red circle disappears. The background is gray.")
# A chain in the rules backend's style: each caption corrupts one more fact of the previous one.
CHAIN = [
    GOLD,
    GOLD.replace("a small red", "a large red"),                                         # size
    GOLD.replace("a small red", "a large red").replace("move down", "move up"),         # + direction
    GOLD.replace("a small red", "a large red").replace("move down", "move up")
        .replace("is gray", "is black"),                                                # + background
    "First, a large red circle appears on the left and moves up. Then the red circle disappears. "
    "Finally, two large blue squares appear on the right and move up. The background is black.",  # + order
]


def test_rules_judge_gold_gets_ten_and_corruption_lowers_scores():
    scores = [synthetic.rules_scores(c, FACTS) for c in CHAIN]
    assert scores[0][0] == {axis: 10.0 for axis in E.AXES}
    assert scores[0][1]["correct"] == scores[0][1]["total"]
    for k, (s, counts) in enumerate(scores):
        assert counts["wrong"] == k                                   # the chain is what we meant
    means = [np.mean(list(s.values())) for s, _ in scores]
    assert all(a > b for a, b in zip(means, means[1:]))               # strictly worse down the chain
    for axis in ("relevance", "descriptiveness", "temporal_consistency"):
        assert all(a[0][axis] > b[0][axis] for a, b in zip(scores, scores[1:]))
    assert scores[4][0]["temporal_consistency"] < scores[4][0]["relevance"]   # the order error
    assert all(s["fluency"] == 10.0 for s, _ in scores)              # factual errors read fine


def test_rules_judge_omission_repetition_and_empty():
    first_sentence = GOLD.split(". ")[0] + "."
    s, _ = synthetic.rules_scores(first_sentence, FACTS)       # true but incomplete
    assert s["relevance"] == 10.0 and s["descriptiveness"] < 6
    s, _ = synthetic.rules_scores(first_sentence + " " + GOLD, FACTS)   # complete, but says one thing twice
    assert s["relevance"] == 10.0 and s["descriptiveness"] == 10.0 and s["fluency"] < 10.0
    assert synthetic.rules_scores("", FACTS)[0] == {axis: 1.0 for axis in E.AXES}
    assert synthetic.repetition_free("a red red red circle") == pytest.approx(3 / 5)


def test_judge_and_compare_cli_with_rules(tmp_path):
    ref = write_jsonl(tmp_path / "test.jsonl", [{"id": f"s{k}", "caption": GOLD, "facts": FACTS} for k in range(5)])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": f"s{k}", "caption": c} for k, c in enumerate(CHAIN)])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": f"s{k}", "caption": GOLD} for k in range(5)])
    res = E.main(["judge", "--pred", pred, "--ref", ref, "--out", str(tmp_path / "scores.jsonl")])
    assert res["judge"] == "rules" and res["n_scored"] == 5
    recs = read_jsonl(tmp_path / "scores.jsonl")
    assert recs[0]["scores"]["relevance"] == 10.0 and recs[3]["facts"]["wrong"] == 3
    assert res["axes"]["relevance"]["ci95"][0] <= res["axes"]["relevance"]["mean"] <= 10.0
    assert os.path.exists(tmp_path / "scores.results.json")

    res = E.main(["compare", "--a", gold, "--b", pred, "--ref", ref])
    assert res["win"]["mean"] == pytest.approx(4 / 5) and res["tie"]["mean"] == pytest.approx(1 / 5)
    assert res["out"].endswith("gold.vs.pred.compare.jsonl")

    other = write_jsonl(tmp_path / "other.jsonl", [{"id": f"s{k}", "caption": c} for k, c in enumerate(CHAIN[::-1])])
    E.main(["judge", "--pred", other, "--ref", ref, "--out", str(tmp_path / "scores2.jsonl")])
    res = E.main(["agree", "--a", str(tmp_path / "scores.jsonl"), "--b", str(tmp_path / "scores2.jsonl")])
    assert res["axes"]["relevance"]["spearman"] == pytest.approx(-1.0)   # same judge, reversed captions


# ----------------------------------------------------------------------------------------------
# reward: the LM reward of QA answers (gen_chains.score_answer) over the fake server
# ----------------------------------------------------------------------------------------------

def test_reward_cli(tmp_path):
    captions = write_jsonl(tmp_path / "captions.jsonl", [{"id": "vid1", "caption": "A red circle moves left."}])
    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": "q1", "caption_id": "vid1", "question": "What colour is the circle?", "answer": "red"},
        {"id": "q2", "caption_id": "vid1", "question": "Where does it move?", "answer": "right"},
        {"id": "q3", "caption": "A blue square.", "question": "What shape?", "answer": "a square"},
        {"id": "q4", "caption": "A blue square.", "question": "What shape?", "answer": "UNREADABLE"},
    ])

    def grader(req):
        text = next(m["content"] for m in req.messages if m["role"] == "user")   # re-asks follow it
        assert "Video description" in text
        if "UNREADABLE" in text:
            return "hmm"
        if "A red circle moves left." in text and "Answer to judge: red" in text or "a square" in text:
            return '{"verdict": "yes", "score": 5, "explanation": "matches"}'
        return 'Verdict: no. Score: 1'
    with FakeLLM(responder=grader) as llm:
        res = E.main(["reward", "--data", data, "--captions", captions, "--out", str(tmp_path / "r.jsonl"),
                      "--base_url", llm.url, "--concurrency", "2"])
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "r.jsonl")}
    assert recs["q1"]["verdict"] == "yes" and recs["q2"]["score"] == 1
    assert recs["q4"]["status"] == "failed" and "unreadable" in recs["q4"]["reason"]
    assert res["n_scored"] == 3 and res["n_failed"] == 1
    assert res["yes_rate"]["mean"] == pytest.approx(2 / 3)
    assert res["score"]["mean"] == pytest.approx((5 + 1 + 5) / 3)
    assert res["score_histogram"] == {0: 0, 1: 1, 2: 0, 3: 0, 4: 0, 5: 2}


def test_reward_missing_caption_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"id": "q1", "caption": "c", "question": "?", "answer": "a"},
                                               {"id": "q2", "question": "?", "answer": "a"}])
    with pytest.raises(SystemExit, match=r"qa.jsonl:2: field 'caption': no caption"):
        E.main(["reward", "--data", data, "--out", str(tmp_path / "r.jsonl")])
