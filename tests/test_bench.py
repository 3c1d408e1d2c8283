"""The benchmarks run (their figures are measured by `make bench...`, not here): each part once
on shapes small enough for CI, its JSON written, its methods agreeing with each other."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_kernels  # noqa: E402


def test_bench_kernels_linear_part_runs_and_its_methods_agree(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--device", "cpu", "--part", "linear", "--linear_shapes", "512:64:256,256:32:128",
                        "--out", str(out)])
    rows = json.loads(out.read_text())["linear_cpu"]["rows"]
    assert {(r["v"], r["head"], r["method"]) for r in rows} == {
        (v, head, m) for v in (512, 256) for head in ("trained", "frozen")
        for m in bench_kernels.LINEAR_METHODS}
    assert all(r["max_rel_diff"] < 1e-4 and r["ms"] > 0 for r in rows)
