"""scripts/demo.py: the plan and the claim verdicts (the full demo is `make demo`, too slow for CI)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import demo  # noqa: E402


def test_plan_covers_every_method_seed_and_chain_length():
    a = demo.parse_args(["--out", "/tmp/unused", "--seeds", "3", "--chain_lengths", "2,3,4"])
    jobs = demo.plan(a)
    names = [j["name"] for j in jobs]
    assert len(names) == len(set(names)) == 3 * (7 + 3)
    rows = {j["row"] for j in jobs}
    assert {"sft", "dpo", "mpo", "hinge", "rank", "rank, vision frozen", "inject + mpo"} <= rows
    frozen = next(j for j in jobs if j["row"] == "rank, vision frozen")
    assert frozen["args"][frozen["args"].index("--vision") + 1] == "frozen"
    inject = next(j for j in jobs if j["row"] == "inject + mpo")
    assert inject["args"][inject["args"].index("--data") + 1].endswith("inject.jsonl")
    k3 = next(j for j in jobs if j["name"] == "rank-k3-s1")
    assert k3["args"][k3["args"].index("--max_chain") + 1] == "3"
    assert all(j["args"][j["args"].index("--init") + 1].endswith(os.path.join("runs", "warm"))
               for j in jobs)


def test_chain_lengths_outside_the_chain_are_refused():
    try:
        demo.parse_args(["--chain_lengths", "2,5", "--length", "4"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--chain_lengths 5 with --length 4 was accepted")


def test_stats_mean_and_sample_std():
    m, sd, n = demo.stats([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and abs(sd - 1.0) < 1e-12       # sample std of 1, 2, 3 is 1
    assert demo.stats([0.5])[1] != demo.stats([0.5])[1]       # one seed: no spread (nan)


def test_claim_verdicts_weigh_the_gap_against_its_standard_error():
    # gap 0.1, SE sqrt(0.01^2/3 * 2) ~ 0.008: far beyond 2 SE
    assert "**reproduced**" in demo.compare("a > b", [0.69, 0.70, 0.71], [0.59, 0.60, 0.61], True)
    # gap 0.01 against SE ~ 0.04: right direction, not significant
    line = demo.compare("a > b", [0.60, 0.65, 0.70], [0.59, 0.64, 0.69], True)
    assert "within noise" in line
    # A worse than B: a strict claim fails; a >= claim within noise counts as a tie
    assert "**not reproduced**" in demo.compare("a > b", [0.5, 0.5, 0.51], [0.6, 0.6, 0.61], True)
    assert "tie" in demo.compare("a >= b", [0.60, 0.65, 0.70], [0.61, 0.66, 0.71], False)
    assert "not testable" in demo.compare("a > b", [0.7], [0.6], True)
