"""scripts/gpu_check.py without a GPU: the dry run builds every family fixture, runs the step
runner on the CPU (fp32, sdpa), writes GPU.md and gpu.json with every section and family row,
and records a cell that raises instead of stopping."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dry_run_writes_every_section_and_records_a_failing_cell(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("the fixture broke")

    monkeypatch.setitem(gpu_check.FAMILY_BUILDERS, "qwen3_vl", broken)
    report = gpu_check.main(["--dry_run", "--out_dir", str(tmp_path),
                             "--dry_families", "qwen2_5_vl", "qwen3_vl", "llama"])
    text = (tmp_path / "GPU.md").read_text()
    assert text.startswith("# GPU check: DRY RUN on the CPU")
    for name in ("kernels", "liger", "fixtures", "steps"):     # the GPU sections' renderers too
        assert f"## {gpu_check.SECTION_TITLES[name]}\n\n" in text
        assert "**error**" not in text and "not rendered" not in text
    assert "## What a GPU run does" in text
    fixtures = text.split("## Family fixtures")[1].split("\n## ")[0]
    for family in gpu_check.FAMILIES:
        assert f"\n| {family} |" in fixtures
    assert "| qwen3_vl |  |  | RuntimeError: the fixture broke |" in fixtures

    cells = {c["family"]: c for c in report["sections"]["steps"]["cells"]}
    assert cells["qwen3_vl"]["error"] == "RuntimeError: the fixture broke"
    assert "| qwen3_vl | sdpa | ERROR RuntimeError: the fixture broke |" in text
    assert "| qwen2_5_vl | sdpa | yes |" in text
    # the cells after the failing one ran; each packs and agrees with the unshared forward
    assert cells["llama"]["unshared_ms"] > 0
    for family in ("qwen2_5_vl", "llama"):
        packed = cells[family]
        assert packed["packed"] and packed["tokens_packed"] < packed["tokens_unshared"], family
        assert packed["fp32_logps_rel_diff"] < 1e-5 and packed["fp32_grads_rel_diff"] < 1e-4
        assert packed["step_grads_rel_diff"] < 1e-4
    assert json.loads((tmp_path / "gpu.json").read_text())["dry_run"] is True
    # the plan names every GPU section
    assert [line.split(":")[0] for line in report["plan"]] == \
        ["build", "tests", "kernels", "liger", "steps"]


def test_a_cell_failing_late_keeps_its_earlier_figures(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(gpu_check, "timed_step", broken)
    report = gpu_check.main(["--dry_run", "--out_dir", str(tmp_path), "--sections", "steps",
                             "--dry_families", "qwen2_5_vl"])
    (cell,) = report["sections"]["steps"]["cells"]
    assert cell["error"] == "RuntimeError: the step broke"
    assert cell["packed"] and cell["fp32_logps_rel_diff"] < 1e-5    # the exactness stage ran
    row = [line for line in (tmp_path / "GPU.md").read_text().splitlines()
           if line.startswith("| qwen2_5_vl | sdpa |")]
    assert len(row) == 1 and "ERROR RuntimeError: the step broke" in row[0]
    assert f"| {cell['tokens_unshared']} | {cell['tokens_packed']} |" in row[0]


def test_a_section_past_the_budget_is_skipped_with_the_reason(tmp_path):
    report = gpu_check.main(["--dry_run", "--out_dir", str(tmp_path), "--budget_s", "0"])
    assert all("time budget" in s["skipped"] for s in report["sections"].values())
    text = (tmp_path / "GPU.md").read_text()
    assert "## Training step per family and attention backend\n\n**skipped**: time budget" in text


def test_attention_backend_goes_on_the_language_model():
    model, _ = gpu_check.FAMILY_BUILDERS["qwen2_5_vl"]()
    assert gpu_check.set_attention(model, "sdpa") == "set"
    # transformers declines flex attention for the Qwen VL text models: set on the text config
    assert gpu_check.set_attention(model, "flex_attention").startswith("forced")
    assert model.config.get_text_config()._attn_implementation == "flex_attention"
    assert model.config.vision_config._attn_implementation == "sdpa"
    llama, _ = gpu_check.FAMILY_BUILDERS["llama"]()
    assert gpu_check.set_attention(llama, "flex_attention") == "set"
    assert llama.config._attn_implementation == "flex_attention"


def test_the_tests_section_counts_a_child_pytest(monkeypatch):
    """The CUDA tests section's child pytest and its junit counts, on two quick tests (without a
    GPU the CUDA one skips)."""
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", [
        "tests/test_kernels.py", "-k",
        "test_auto_picks_the_compiled_backend or test_vocabulary_of_one_as_a_transposed_view"])
    result = gpu_check.section_cuda_tests(gpu_check.Budget(300))
    assert result["returncode"] == 0 and result["failed"] == result["errors"] == 0
    assert result["passed"] + result["skipped"] == 3 and result["passed"] >= 2
    text = gpu_check.render_tests(result)
    assert f"| {result['passed']} | 0 | 0 | {result['skipped']} |" in text
