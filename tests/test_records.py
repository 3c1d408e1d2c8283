"""Tests for records.py: reading with file:line errors, id and status checks, atomic writes,
the run metadata, and the resumable output (kill -9 in a real subprocess is tested with the
commands that use it, in test_gen_chains.py)."""
from __future__ import annotations

import json
import math

import pytest

import records
from records import DataError


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def write_text_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def test_read_jsonl_names_file_and_line(tmp_path):
    path = write_text_lines(tmp_path / "in.jsonl", [{"id": "a"}, "", "{not json", {"id": "c"}])
    with pytest.raises(DataError, match=r"in.jsonl:3: malformed JSON"):
        list(records.read_jsonl(path))
    path = write_text_lines(tmp_path / "in.jsonl", [{"id": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"in.jsonl:2: expected a JSON object, got list"):
        list(records.read_jsonl(path))


@pytest.mark.parametrize("rows, pattern", [
    ([{"caption": "x"}], r"in.jsonl:1: field 'id': missing or not a non-empty string"),
    ([{"id": "", "caption": "x"}], r"in.jsonl:1: field 'id': missing or not a non-empty string"),
    ([{"id": "a", "caption": "x"}, {"id": "a", "caption": "y"}],
     r"in.jsonl:2: field 'id': duplicate id 'a' \(first on line 1\)"),
    ([{"id": "a"}], r"in.jsonl:1: field 'caption': missing"),
    ([{"id": "a", "caption": 3}], r"in.jsonl:1: field 'caption': expected a non-empty string"),
    ([{"id": "a", "caption": ""}], r"in.jsonl:1: field 'caption': expected a non-empty string"),
])
def test_read_records_checks_ids_and_fields(tmp_path, rows, pattern):
    path = write_text_lines(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError, match=pattern):
        records.read_records(path, {"caption": str})


def test_read_records_counts_records_that_are_not_ok(tmp_path):
    # A record an earlier step wrote as failed (or no_preference) has no caption: counted, not an error.
    path = write_text_lines(tmp_path / "rc.jsonl", [{"id": "a", "caption": "x", "status": "ok"},
                                                    {"id": "b", "status": "failed", "reason": "HTTP 500"},
                                                    {"id": "c", "status": "no_preference"},
                                                    {"id": "d", "caption": "y"}])
    found, left_out = records.read_records(path, {"caption": str})
    assert [r["id"] for _, r in found] == ["a", "d"] and left_out == 2
    assert [line for line, _ in found] == [1, 4]
    assert set(records.records_by_id(path)) == {"a", "d"}
    # allow_empty: an empty generated caption is real output, not bad input.
    path = write_text_lines(tmp_path / "e.jsonl", [{"id": "a", "caption": ""}])
    assert records.records_by_id(path, {"caption": str}, allow_empty=True)["a"] == (1, {"id": "a", "caption": ""})
    with pytest.raises(DataError, match=r"nope.jsonl: input file not found"):
        records.read_records(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------
# Whole files and the run metadata
# ---------------------------------------------------------------------------------------------

def test_whole_file_writes_are_atomic_and_strict_json(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records.write_jsonl(str(path), [{"id": "a", "t": "café"}, {"id": "b"}])
    assert path.read_text(encoding="utf-8") == '{"id": "a", "t": "café"}\n{"id": "b"}\n'
    assert not (tmp_path / "sub" / "out.jsonl.tmp").exists()
    res = tmp_path / "r.json"
    records.write_json(str(res), {"rho": math.nan, "ci": [1.0, math.inf]})
    assert json.loads(res.read_text()) == {"rho": None, "ci": [1.0, None]}


def test_run_meta_round_trip(tmp_path):
    assert records.read_run_meta(str(tmp_path)) == {}
    records.write_run_meta(str(tmp_path), {"base_model": "tiny", "init": "init"})
    assert (tmp_path / records.RUN_META).is_file()
    assert records.read_run_meta(str(tmp_path)) == {"base_model": "tiny", "init": "init"}


# ---------------------------------------------------------------------------------------------
# Resumable output
# ---------------------------------------------------------------------------------------------

def test_resumable_jsonl_repairs_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x"')
    out = records.ResumableJsonl(str(path))
    assert out.repaired and out.done_ids == {"a", "b"}
    out.append({"id": "c", "x": 3})
    out.close()
    assert [r["id"] for r in lines(path)] == ["a", "b", "c"]
    # A complete object that only lost its newline is kept, not thrown away.
    path.write_text('{"id": "a"}\n{"id": "b"}')
    out = records.ResumableJsonl(str(path))
    out.close()
    assert out.done_ids == {"a", "b"} and path.read_text().endswith("}\n")


def test_resumable_jsonl_rejects_damage_in_the_middle(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(records.DataError, match=r"out.jsonl:2: malformed line"):
        records.ResumableJsonl(str(path))
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(records.DataError, match=r"out.jsonl:2: field 'id': duplicate id"):
        records.ResumableJsonl(str(path))


def test_map_resumable_skips_done_and_records_failures(tmp_path):
    out = str(tmp_path / "out.jsonl")
    recs = [{"id": f"r{i}"} for i in range(10)]

    def fn(rec):
        if rec["id"] == "r3":
            raise records.RecordFailed("gave up after 2 tries: HTTP 500: boom")
        return {"id": rec["id"], "y": rec["id"].upper()}

    s = records.map_resumable(recs[:6], fn, out, concurrency=3, desc="t")
    assert (s["done"], s["failed"], s["skipped"]) == (5, 1, 0)
    s = records.map_resumable(recs, fn, out, concurrency=3, desc="t")
    assert (s["done"], s["failed"], s["skipped"]) == (4, 0, 6)
    got = lines(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in recs)
    failed = [r for r in got if r.get("status") == "failed"]
    assert failed == [{"id": "r3", "status": "failed", "reason": "gave up after 2 tries: HTTP 500: boom"}]
    # --retry_failed: the failed record is dropped and redone; still one line per id.
    s = records.map_resumable(recs, lambda r: {"id": r["id"], "y": "again"}, out, 2, "t", drop_failed=True)
    assert (s["done"], s["skipped"]) == (1, 9)
    got = lines(out)
    assert len(got) == 10 and {r["id"]: r for r in got}["r3"]["y"] == "again"


def test_map_resumable_stops_on_a_fatal_error(tmp_path):
    def fn(rec):
        raise records.RecordFailed("HTTP 401: bad key", fatal=True)
    with pytest.raises(records.RecordFailed, match="401"):
        records.map_resumable([{"id": "a"}, {"id": "b"}], fn, str(tmp_path / "o.jsonl"), 1, "t")
    assert lines(tmp_path / "o.jsonl") == []


def test_output_lock_names_the_live_writer(tmp_path):
    path = str(tmp_path / "o.jsonl")
    with records.ResumableJsonl(path):
        with pytest.raises(records.OutputLocked, match=r"o.jsonl: another run \(pid \d+\) is writing"):
            records.ResumableJsonl(path)
    records.ResumableJsonl(path).close()          # released on close


def test_collect_outputs_prefers_a_later_success(tmp_path):
    path = write_text_lines(tmp_path / "o.jsonl", [{"id": "a", "status": "failed"}, {"id": "b", "v": 1},
                                                   {"id": "a", "v": 2}, {"id": "z", "v": 3}])
    assert records.collect_outputs(path, ["a", "b"]) == {"a": {"id": "a", "v": 2}, "b": {"id": "b", "v": 1}}
    assert records.collect_outputs(str(tmp_path / "none.jsonl"), ["a"]) == {}


# ---------------------------------------------------------------------------------------------
# Shared caches: many writers, checked lines, first line wins
# ---------------------------------------------------------------------------------------------

def test_shared_cache_writers_see_each_other_and_the_first_line_wins(tmp_path):
    path = str(tmp_path / "cache.jsonl")
    a, b = records.SharedCache(path), records.SharedCache(path)
    a.add({"x": -1.25, "y": -2.5})
    b.add({"y": -99.0, "z": -3.0 / 7})         # b had not read y yet: both lines are in the file
    assert b.get("y") == -2.5 and b.get("x") == -1.25     # b read a's lines when it wrote
    assert a.get("z") is None and a.refresh() == 1 and a.get("z") == -3.0 / 7    # exact float
    assert a.get("y") == -2.5                  # the later duplicate is never read
    assert [r["key"] for r in lines(path)] == ["x", "y", "y", "z"]
    assert records.SharedCache(path).values == {"x": -1.25, "y": -2.5, "z": -3.0 / 7}


def test_shared_cache_never_reads_a_torn_or_garbled_line_as_a_value(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    records.SharedCache(str(path)).add({"a": -1.5, "b": -2.5, "c": -3.5, "d": -4.5})
    text = path.read_text().splitlines(keepends=True)
    text[1] = text[1].replace("-2.5", "-2.7")     # valid JSON, wrong number: its checksum fails
    text[2] = "{garbage\n"
    path.write_text("".join(text) + text[3][:30])  # plus a torn copy of a line, no newline
    with caplog.at_level("WARNING", logger="records"):
        cache = records.SharedCache(str(path))
    assert cache.values == {"a": -1.5, "d": -4.5} and cache.skipped == 2
    assert "cache.jsonl:2: skipped" in caplog.text and "cache.jsonl:3: skipped" in caplog.text
    cache.add({"b": -2.5, "e": -5.5})          # the torn tail is cut before the new lines
    assert path.read_text().endswith("\n")
    again = records.SharedCache(str(path))
    assert again.values == {"a": -1.5, "d": -4.5, "b": -2.5, "e": -5.5} and again.skipped == 2


def _add_many(path, writer, n):
    cache = records.SharedCache(path)
    for i in range(n):
        cache.add({f"{writer}-{i}": float(i), "shared": float(writer)})


def test_shared_cache_concurrent_processes_append_whole_lines(tmp_path):
    import multiprocessing
    path = str(tmp_path / "cache.jsonl")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_add_many, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = records.SharedCache(path)
    assert cache.skipped == 0 and len(cache.values) == 4 * 40 + 1
    assert all(cache.get(f"{w}-{i}") == float(i) for w in range(4) for i in range(40))
    assert cache.get("shared") == lines(path)[[r["key"] for r in lines(path)].index("shared")]["value"]
