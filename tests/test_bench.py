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


def test_row_packing_batches_and_their_block_in_results(tmp_path):
    """The row-packing table's batches are what its text says (yes/no chains of K=2, caption
    chains of K 4-6, -1 padded), auto packs short chains beside long ones, and its block is a
    section of its own that a rewrite of the Training section leaves alone."""
    import numpy as np
    import bench_train
    import rank_dpo as R
    import synthetic
    _, processor = synthetic.build_tiny()
    shape = bench_train.ROW_PACKING["quick"]
    rng = np.random.default_rng(0)
    [(batch, index)] = bench_train.mixed_chain_batches(processor, rng, 1, shape)
    k, yesno = (index >= 0).sum(-1).tolist(), shape["yesno"]
    assert k[:yesno] == [2] * yesno and all(4 <= n <= 6 for n in k[yesno:])
    assert len(R.pack_chains(batch, index, row_tokens="auto").segment) < len(index)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Training (`make bench-train`)\n\nold\n\n## Kernels\n\nk\n")
    for n in (1, 2):
        block = "\n".join([bench_train.ROW_BLOCK[0], f"table {n}", bench_train.ROW_BLOCK[1]])
        bench_train.write_block(str(md), block, bench_train.ROW_BLOCK, heading="## Rows")
    bench_train.write_section(str(md), "new")
    text = md.read_text()
    assert text.count("## Rows") == 1 and "table 2" in text and "table 1" not in text
    assert "\n\nnew\n" in text and "old" not in text and "## Kernels\n\nk" in text
