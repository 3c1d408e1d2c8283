#!/usr/bin/env python3
"""The GPU check (make gpu-check): everything that needs a CUDA device, in one run that fits a
short lease on one H100/H200 (about 7.5 minutes), written to bench/GPU.md and bench/gpu.json.

    make gpu-check                      # = python scripts/gpu_check.py (a dry run without a GPU)
    python3 scripts/gpu_check.py --out_dir DIR --budget_s 450
    python scripts/gpu_check.py --dry_run --out_dir /tmp/gpu    # the CPU-side parts only

Sections, in order; each checks the time left and is skipped, with a note, when it would not fit:
  build        the CPU and CUDA loss extensions (kernels/build.py), timed
  tests        the CUDA tests (pytest tests/test_kernels.py tests/test_attention_backends.py -k cuda:
               the kernels, and packed gradients under flex and flash): pass / fail / skip counts
  kernels      bench/bench_kernels.py on the GPU, a short run: the chain loss from logits, and
               the LM head fused in at two Qwen-sized shapes
  liger        Liger-Kernel's fused linear cross-entropy beside ours (fused_linear_sequence_logps
               as a mean token NLL: the same function) where `liger_kernel` imports
  steps        one training step (rank_dpo.chain_loss_step + backward) of each family fixture
               under each attention backend: packed (--shared_prefix auto) and unshared. Step
               time and peak memory in bf16; the packed forward's exactness (log-probs and every
               gradient against the unshared forward) in fp32, where the CPU cannot check flex
               attention (no CPU backward); the same differences for the bf16 step
Every (family, backend) cell and every section is guarded: an exception is recorded with its
message and the run goes on. The tables are printed last (a remote runner may return only the
end of the output).

Without a visible GPU (or with --dry_run) it runs what the CPU can: the kernel and Liger
sections' code at toy sizes (ours alone), every family fixture built, the step runner in fp32
under sdpa for --dry_families; it writes the markdown and JSON (to a temporary folder unless
--out_dir is given) and lists what would run on the GPU. --sections reruns a part.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "tests")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import bench_kernels  # noqa: E402  (bench/: its inputs, steps and measure())
import bench_train  # noqa: E402  (bench/: the synthetic video chains)
import hub_models  # noqa: E402  (tests/: the hub-format tiny families)
import kernels  # noqa: E402
import rank_dpo as R  # noqa: E402
import synthetic  # noqa: E402
from records import load_jsonl, write_jsonl  # noqa: E402

SECTIONS = ("build", "tests", "kernels", "liger", "fixtures", "steps")   # fixtures: dry run only
FAMILIES = ("tiny", "qwen2_5_vl", "qwen3_vl", "perception_lm", "llama")
TEXT_ONLY = {"llama"}                      # causal LMs train on text chains
BACKENDS = ("sdpa", "flex_attention", "flash_attention_2")
BACKEND_PACKAGE = {"flash_attention_2": "flash_attn"}     # needs a package torch does not ship

CUDA_TESTS = ["tests/test_kernels.py", "tests/test_attention_backends.py", "-k", "cuda"]
# The LM head fused in: Qwen2.5-VL's vocabulary at a 2B model's width, 4k and 16k tokens.
LINEAR_SHAPES = [(151936, 2048, 4096), (151936, 2048, 16384)]
# The dry run's toy sizes for the same benchmark code on the CPU.
DRY_LOGITS_SHAPE = dict(n=8, t=32, v=512, dtype=torch.float32)
DRY_LINEAR_SHAPES = [(512, 64, 256)]
KERNEL_REPEATS = 5          # timed rounds of the logits benchmark (it takes the median)
STEP_REPEATS = 3            # timed training steps per cell after one warm-up (the median)
# Rough costs on an H200 (seconds), so a section starts only when it can finish in budget.
NEEDS_S = {"build": 150, "tests": 90, "kernels": 60, "liger": 30}
# ... and per training cell: flex attention compiles its kernels (forward and backward) first.
CELL_NEEDS_S = {"sdpa": 20, "flex_attention": 60, "flash_attention_2": 20}


class Budget:
    """Wall-clock seconds left for the whole check."""

    def __init__(self, total_s: float):
        self.total_s, self.start = total_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def skip_reason(self, need_s: float) -> str | None:
        if self.left() >= need_s:
            return None
        return (f"time budget: {self.left():.0f} s of {self.total_s:.0f} s left, "
                f"this needs about {need_s:.0f} s")


def guarded(fn, *args, **kwargs) -> dict:
    """fn's result dict, or {"error": message} when it raises: one failure never ends the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (any failure is a finding to record)
        if torch.cuda.is_available():        # free what the failed cell held
            torch.cuda.empty_cache()
        first = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first}"[:300]}


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    import peft
    import transformers
    info = dict(python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda, transformers=transformers.__version__,
                peft=peft.__version__, cpu=bench_kernels.cpu_name(), cpu_count=os.cpu_count(),
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                liger_kernel=_version("liger_kernel"), flash_attn=_version("flash_attn"))
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"not available ({e})"
    return info


def _version(module: str) -> str:
    if not importable(module):
        return "not installed"
    try:
        from importlib.metadata import version
        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001  (a module without metadata still imports)
        return "installed"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def section_build() -> dict:
    """Compile (or load from the cache) both loss extensions; later sections reuse them."""
    out = {}
    for backend in ("cpu", "cuda"):
        begin = time.perf_counter()
        out[backend] = dict(path=kernels.build.load(backend),
                            seconds=time.perf_counter() - begin)
    return out


def section_cuda_tests(budget: Budget) -> dict:
    """The CUDA tests in a child pytest (its own process: a crash there is a finding here)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *CUDA_TESTS]
        begin = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(budget.left() - 30, 30))
        except subprocess.TimeoutExpired:
            return {"error": "pytest ran past the time budget and was stopped",
                    "command": " ".join(cmd[2:])}
        seconds = time.perf_counter() - begin
        result = dict(command="python -m pytest -q " + " ".join(CUDA_TESTS), seconds=seconds,
                      returncode=done.returncode, **junit_counts(junit))
    if result.get("failed") or result.get("errors") or done.returncode not in (0, 5):
        result["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return result


def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped and the names of the failing tests, from junit XML."""
    if not os.path.exists(path):
        return {"failed_tests": [], "note": "pytest wrote no report"}
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return dict(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"],
                failed_tests=failing)


def section_kernel_bench(device: str, logits_shape: dict | None, linear_shapes,
                         repeats: int) -> dict:
    """bench/bench_kernels.py's two benchmarks, with fewer rounds and shapes."""
    logits = bench_kernels.bench(device, repeats, logits_shape)
    # naive's fp32 log-softmax of 16k x 152k logits is ~10 GB: it fits an H100/H200
    linear = bench_kernels.bench_linear(device, naive_max_gb=11, shapes=linear_shapes)
    return dict(logits=logits, linear=linear)


def nll_fwd_bwd(loss_fn, hidden, weight, labels) -> torch.Tensor:
    """One forward + backward of a fused linear NLL to both hidden and weight; the loss."""
    loss = loss_fn(hidden.detach().requires_grad_(), weight.detach().requires_grad_(), labels)
    loss.backward()
    return loss.detach().float()


def section_liger(device: str, shapes, repeats: int) -> dict:
    """Liger-Kernel's fused linear cross-entropy beside ours on the same inputs: both compute
    the mean token NLL from hidden states and the head's weight without keeping the logits
    (ours: fused_linear_sequence_logps). Liger is Triton, so GPU only; without it, ours alone."""
    backend = kernels.resolve_backend("auto", device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def ours(h, w, labels):
        logps, counts = kernels.fused_linear_sequence_logps(h, w, labels, backend=backend)
        return -logps.sum() / counts.sum()

    methods = {"ours (fused_linear_sequence_logps)": ours}
    if device != "cuda":
        note = "Liger-Kernel runs on a GPU only (Triton): ours alone"
    elif not importable("liger_kernel"):
        note = "liger_kernel is not installed (it travels as a wheel: README.md, 'GPU check')"
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger (LigerFusedLinearCrossEntropyLoss)"] = \
            lambda h, w, labels: liger(w, h.reshape(-1, h.shape[-1]), labels.reshape(-1))
        note = f"liger_kernel {_version('liger_kernel')}"
    rows = []
    for v, h, tokens in shapes:
        hidden, weight, labels, _, _ = bench_kernels.make_linear_inputs(v, h, tokens, dtype, device)
        losses = {}
        for name, fn in methods.items():
            step = functools.partial(nll_fwd_bwd, fn, hidden, weight, labels)
            step()                                       # warm-up: Triton / extension load
            runs = [bench_kernels.measure(step, device) for _ in range(repeats)]
            losses[name] = runs[-1][0]
            rows.append(dict(v=v, h=h, tokens=tokens, method=name,
                             ms=statistics.median(r[1] for r in runs),
                             peak_extra_mb=max(r[2] for r in runs) / 2 ** 20))
        ours_loss = next(iter(losses.values()))
        for row, loss in zip(rows[-len(losses):], losses.values()):
            row["loss_rel_diff"] = max_rel_diff(loss, ours_loss)
        del hidden, weight
    return dict(note=note, dtype=str(dtype), repeats=repeats, rows=rows)


# ---------------------------------------------------------------------------------------------
# The training-step cells
# ---------------------------------------------------------------------------------------------

def build_tiny_llama():
    """A tiny Llama causal LM with the embedded tokenizer (which then plays the processor)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = synthetic.build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64 * -(-len(tokenizer) // 64), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    return model.eval(), tokenizer


FAMILY_BUILDERS = {"tiny": synthetic.build_tiny, "llama": build_tiny_llama,
                   **{name: (lambda name=name: hub_models.build(name))
                      for name in hub_models.FAMILIES}}


def write_chains(root: str) -> dict:
    """Two video chains of K = 4 captions (bench_train's synthetic clips) and the same chains
    as text: {"video": path, "text": path}."""
    video = bench_train.make_video_chains(root, 2, 4)
    text = os.path.join(root, "text.jsonl")
    write_jsonl(text, [{k: v for k, v in r.items() if k != "video"} for r in load_jsonl(video)])
    return {"video": video, "text": text}


def set_attention(model, backend: str) -> str:
    """Put the language model on `backend` (a vision tower keeps its own: packing concerns the
    LM only); returns how. Where transformers declines a backend for a family (flex attention
    on the Qwen VL text models), it is set on the text config directly, as the packed forward
    would, and the cell says so: the run then shows whether it works."""
    target = {"text_config": backend} if "text_config" in model.config.sub_configs else backend
    try:
        model.set_attn_implementation(target)
        return "set"
    except ValueError:
        model.config.get_text_config()._attn_implementation = backend
        return "forced: transformers declines it for this family"


def lora_policy(model):
    """LoRA on the LM and the vision tower (rank objective), adapters perturbed so the policy
    differs from the reference; returns (policy, args)."""
    args = R.parse_args(["--data", "x", "--output_dir", "x", "--objective", "rank",
                         "--vision", "lora", "--lora_r", "4", "--modules_to_save", "none"])
    policy = R.add_adapters(model, args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return policy, args


def to_trainer_dtype(policy, dtype: torch.dtype) -> None:
    """Frozen weights in `dtype`, trainable ones in fp32: what the trainer holds after
    load_base (bf16 on a GPU) + add_adapters (peft keeps adapter weights in fp32)."""
    policy.to(dtype)
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to b's largest entry (the tests' measure)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def grads_rel_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        differ = sorted(a.keys() ^ b.keys())[:3]
        raise AssertionError(f"different parameters got gradients: {differ}")
    return max(max_rel_diff(a[n], b[n]) for n in b)


def logps_and_grads(model, batch, index, shared: bool):
    """Per-row log-probs of the policy (no autocast, the model's own dtype) and the gradients
    of their weighted sum: the exactness check of one forward + backward."""
    model.zero_grad(set_to_none=True)
    packing = R.pack_model_chains(model, batch, index) if shared else None
    logits, labels = R.chain_logits(model, batch, packing)
    logps, _ = kernels.sequence_logps(logits, labels)
    weights = torch.linspace(1.0, 2.0, len(logps), device=logps.device)
    (logps * weights).sum().backward()
    return logps.detach(), trainable_grads(model)


def timed_step(model, batch, index, args, shared: bool, device: str, repeats: int):
    """(loss, grads, median ms, peak extra MiB) of the trainer's step (chain_loss_step +
    backward), after one untimed warm-up (compilation, kernel loads)."""
    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = R.chain_loss_step(model, batch, index, args, vision_trainable=True,
                                    shared_prefix=shared)
        loss.backward()
        return loss.detach().float()

    step()
    runs = [bench_kernels.measure(step, device) for _ in range(repeats)]
    return (runs[-1][0], trainable_grads(model), statistics.median(r[1] for r in runs),
            max(r[2] for r in runs) / 2 ** 20)


def train_cell(family: str, backend: str, device: str, dtype: torch.dtype, data: dict,
               repeats: int, cell: dict) -> dict:
    """One (family, attention backend) cell: packed vs unshared, exactness in fp32 then the
    trainer's step in `dtype`. Fills `cell` as it goes, so a later stage that raises keeps
    what the earlier ones found."""
    package = BACKEND_PACKAGE.get(backend)
    if package and not importable(package):
        return dict(cell, skipped=f"{package} is not installed")
    model, processor = FAMILY_BUILDERS[family]()
    cell["attention"] = set_attention(model, backend)
    policy, args = lora_policy(model)
    policy.to(device)
    chains, _ = R.load_chains(data["text" if family in TEXT_ONLY else "video"], processor, "rank")
    batch, index = R.collate(chains, processor, 8, 2048)
    batch.to(device)
    packs = R.resolve_shared_prefix(policy, "auto", log=None)
    cell.update(packed=packs, why_not_packed=None if packs else R.shared_prefix_unsupported(policy),
                tokens_unshared=int(batch.attention_mask.sum()))
    modes = (False, True) if packs else (False,)
    if packs:
        cell["tokens_packed"] = R.pack_model_chains(policy, batch, index).tokens()
    exact = {shared: logps_and_grads(policy, batch, index, shared) for shared in modes}
    if packs:
        cell["fp32_logps_rel_diff"] = max_rel_diff(exact[True][0], exact[False][0])
        cell["fp32_grads_rel_diff"] = grads_rel_diff(exact[True][1], exact[False][1])
    del exact
    to_trainer_dtype(policy, dtype)
    steps = {shared: timed_step(policy, batch, index, args, shared, device, repeats)
             for shared in modes}
    for shared, (loss, _, ms, peak) in steps.items():
        name = "packed" if shared else "unshared"
        cell[f"{name}_ms"], cell[f"{name}_peak_mb"], cell[f"{name}_loss"] = ms, peak, float(loss)
    if packs:
        cell["step_loss_rel_diff"] = max_rel_diff(steps[True][0], steps[False][0])
        cell["step_grads_rel_diff"] = grads_rel_diff(steps[True][1], steps[False][1])
    del policy, model, steps
    return cell


def section_steps(budget: Budget, families, backends, device: str, dtype: torch.dtype,
                  repeats: int) -> dict:
    cells = []
    with tempfile.TemporaryDirectory() as root:
        data = write_chains(root)
        for backend in backends:          # every family under sdpa first: the cheapest cells
            for family in families:
                reason = budget.skip_reason(CELL_NEEDS_S[backend])
                begin = time.perf_counter()
                cell = dict(family=family, backend=backend)
                cell.update({"skipped": reason} if reason else guarded(
                    train_cell, family, backend, device, dtype, data, repeats, cell))
                cell["seconds"] = time.perf_counter() - begin
                cells.append(cell)
                print(f"step {family:<14}{backend:<19}packed: {cell_status(cell)} "
                      f"({cell['seconds']:.0f} s)", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return dict(device=device, dtype=str(dtype), repeats=repeats, cells=cells)


def section_fixtures(families) -> dict:
    """Dry run: build every family fixture and say whether it packs under sdpa."""
    rows = []
    for family in families:
        def build(family=family):
            model, _ = FAMILY_BUILDERS[family]()
            set_attention(model, "sdpa")
            packs = R.resolve_shared_prefix(model, "auto", log=None)
            return dict(model_type=model.config.model_type, class_name=type(model).__name__,
                        parameters=sum(p.numel() for p in model.parameters()), packs_sdpa=packs,
                        why_not=None if packs else R.shared_prefix_unsupported(model))
        rows.append(dict(family=family, **guarded(build)))
    return {"rows": rows}


def gpu_plan(families, backends) -> list[str]:
    """What a run on a GPU does, in order (the dry run's last section)."""
    return ["build: kernels.build.load('cpu'), kernels.build.load('cuda')",
            f"tests: python -m pytest -q {' '.join(CUDA_TESTS)}",
            f"kernels: bench_kernels.bench('cuda', repeats={KERNEL_REPEATS}); "
            f"bench_kernels.bench_linear at V:H:tokens {LINEAR_SHAPES}",
            f"liger: LigerFusedLinearCrossEntropyLoss vs kernels.fused_linear_sequence_logps at "
            f"{LINEAR_SHAPES} (liger_kernel: {_version('liger_kernel')})",
            f"steps: bf16, {STEP_REPEATS} timed steps per cell; families {', '.join(families)}; "
            f"backends {', '.join(backends)}"
            + "".join(f" ({b}: {p} {_version(p)})" for b, p in BACKEND_PACKAGE.items())]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def md_table(headers: list[str], rows: list[list]) -> str:
    def text(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.2f}"
        return "" if x is None else str(x).replace("|", "\\|")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(text(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_status(cell: dict) -> str:
    if "error" in cell:
        return f"ERROR {cell['error']}"
    if "skipped" in cell:
        return f"skipped: {cell['skipped']}"
    return "yes" if cell["packed"] else f"no ({cell['why_not_packed']})"


def status_line(section: dict) -> str | None:
    for key in ("error", "skipped"):
        if key in section:
            return f"**{key}**: {section[key]}"
    return None


def markdown(report: dict) -> str:
    m, s = report["machine"], report["sections"]
    title = ("# GPU check: DRY RUN on the CPU (no GPU was visible; no GPU figures)"
             if report["dry_run"] else "# GPU check (`make gpu-check`)")
    gpu = f"{m['gpu']} (compute capability {m['capability']}; nvidia-smi: {m['nvidia_smi']})" \
        if "gpu" in m else "no GPU"
    out = [title, "",
           f"Written by scripts/gpu_check.py on {report['date']} in {report['seconds']:.0f} s "
           f"(budget {report['budget_s']:.0f} s). Machine: {gpu}; CPU {m['cpu']} "
           f"x{m['cpu_count']}; fp32 matmul precision {m['float32_matmul_precision']!r}; "
           f"Python {m['python']}, torch {m['torch']} (CUDA {m['torch_cuda']}), transformers "
           f"{m['transformers']}, peft {m['peft']}, liger_kernel {m['liger_kernel']}, flash_attn "
           f"{m['flash_attn']}."]
    for name, render in SECTION_RENDERERS:
        if name in s:
            out += ["", render_section(name, render, s[name])]
    if report["dry_run"]:
        out += ["", "## What a GPU run does", ""] + [f"- {line}" for line in report["plan"]]
    return "\n".join(out) + "\n"


def render_section(name: str, render, section: dict) -> str:
    """A section's markdown; its status where it failed or was skipped, and a renderer that
    fails costs that section only (gpu.json holds its figures either way)."""
    status = status_line(section)
    if status is None:
        try:
            return render(section)
        except Exception as e:  # noqa: BLE001
            status = f"**not rendered** ({type(e).__name__}: {e}); the figures are in gpu.json"
    return f"## {SECTION_TITLES[name]}\n\n{status}"


def render_build(b: dict) -> str:
    return f"## {SECTION_TITLES['build']}\n\n" + md_table(
        ["extension", "seconds (compile or cache load)"],
        [[k, v["seconds"]] for k, v in b.items()])


def render_tests(t: dict) -> str:
    out = [f"## {SECTION_TITLES['tests']}", "", f"`{t['command']}` ({t['seconds']:.0f} s, "
           f"exit {t['returncode']})", "",
           md_table(["passed", "failed", "errors", "skipped"],
                    [[t.get("passed"), t.get("failed"), t.get("errors"), t.get("skipped")]])]
    if t.get("failed_tests"):
        out += ["", "Failing: " + ", ".join(f"`{x}`" for x in t["failed_tests"])]
    if t.get("output_tail"):
        out += ["", "```", t["output_tail"].strip()[-1500:], "```"]
    return "\n".join(out)


def render_kernels(k: dict) -> str:
    lg, ln = k["logits"], k["linear"]
    shape = lg["shape"]
    naive_ms = lg["results"]["naive"]["ms"]
    floor = (f"; copy bandwidth {lg['copy_bandwidth_gbs']:.0f} GB/s, floor (3 passes over the "
             f"logits) {lg['floor_ms']:.2f} ms" if "floor_ms" in lg else "")
    out = [f"## {SECTION_TITLES['kernels']}", "",
           f"Chain loss from logits: N*T = {shape['n']}*{shape['t']}, V = {shape['v']}, "
           f"{shape['dtype']}, backend {lg['backend']}, median of {lg['repeats']}{floor}.", "",
           md_table(["method", "fwd+bwd ms", "best ms", "vs naive", "peak extra MB",
                     "max abs grad diff vs naive"],
                    [[name, r["ms"], r["min_ms"], f"{naive_ms / r['ms']:.2f}x",
                      r["peak_extra_bytes"] / 1e6, r["max_abs_grad_diff_vs_naive"]]
                     for name, r in lg["results"].items()]),
           "", f"LM head fused in ({ln['dtype']}, backend {ln['backend']}; one fwd+bwd per row):",
           "",
           md_table(["V", "H", "tokens", "head", "method", "ms", "peak extra MB",
                     "beyond grads MB", "max rel diff"],
                    [[r["v"], r["h"], r["tokens"], r["head"], r["method"], r["ms"],
                      r["peak_extra_bytes"] / 1e6, r["beyond_grads_bytes"] / 1e6,
                      r.get("max_rel_diff")] for r in ln["rows"]])]
    return "\n".join(out)


def render_liger(lg: dict) -> str:
    return "\n".join([f"## {SECTION_TITLES['liger']}", "",
                      f"{lg['note']}; {lg['dtype']} hidden states and weight, fwd+bwd to "
                      f"both, median of {lg['repeats']} after a warm-up.", "",
                      md_table(["V", "H", "tokens", "method", "ms", "peak extra MiB",
                                "loss rel diff vs ours"],
                               [[r["v"], r["h"], r["tokens"], r["method"], r["ms"],
                                 r["peak_extra_mb"], r["loss_rel_diff"]] for r in lg["rows"]])])


def render_steps(st: dict) -> str:
    rows = []
    for c in st["cells"]:      # a failed cell keeps the figures of the stages before the failure
        forced = c.get("attention", "set") != "set"
        rows.append([c["family"], c["backend"] + (f" ({c['attention']})" if forced else ""),
                     cell_status(c)] + [c.get(key) for key in (
                         "tokens_unshared", "tokens_packed", "unshared_ms", "packed_ms",
                         "unshared_peak_mb", "packed_peak_mb", "fp32_logps_rel_diff",
                         "fp32_grads_rel_diff", "step_loss_rel_diff", "step_grads_rel_diff")])
    return "\n".join([
        f"## {SECTION_TITLES['steps']}", "",
        f"Device {st['device']}; the step in {st['dtype']} (rank objective, LoRA r=4 on LM and "
        f"vision, 2 chains of K = 4; median of {st['repeats']} after a warm-up; peak = memory "
        "beyond what existed before the step). Exactness: packed against unshared, fp32 "
        "log-probs and every trainable gradient (max |diff| / the tensor's largest entry; the "
        "CPU tests' bounds are 1e-5 and 1e-4); then the same for the trainer's step.", "",
        md_table(["family", "attention", "packed", "tokens unshared", "tokens packed",
                  "unshared ms", "packed ms", "unshared peak MiB", "packed peak MiB",
                  "fp32 logps diff", "fp32 grads diff", "step loss diff", "step grads diff"],
                 rows)])


def render_fixtures(fx: dict) -> str:
    return f"## {SECTION_TITLES['fixtures']}\n\n" + md_table(
        ["family", "model", "parameters", "packs under sdpa"],
        [[r["family"], r.get("class_name", ""), r.get("parameters", ""),
          r["error"] if "error" in r else ("yes" if r["packs_sdpa"] else f"no ({r['why_not']})")]
         for r in fx["rows"]])


SECTION_TITLES = {"build": "Kernel build", "tests": "CUDA tests",
                  "kernels": "Kernel benchmark (bench/bench_kernels.py, short)",
                  "liger": "Liger-Kernel fused linear cross-entropy beside ours",
                  "fixtures": "Family fixtures",
                  "steps": "Training step per family and attention backend"}
SECTION_RENDERERS = [("build", render_build), ("tests", render_tests),
                     ("kernels", render_kernels), ("liger", render_liger),
                     ("fixtures", render_fixtures), ("steps", render_steps)]


def write_report(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu.json"), "w") as f:     # first: the figures are safe
        json.dump(report, f, indent=2, default=str)
    text = markdown(report)
    with open(os.path.join(out_dir, "GPU.md"), "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def run_sections(a, budget: Budget, device: str) -> dict:
    sections = {}

    def run(name, fn, *args):
        if name not in a.sections:
            return
        reason = budget.skip_reason(NEEDS_S.get(name, 0))
        print(f"== {name} ({budget.elapsed():.0f} s elapsed)", flush=True)
        sections[name] = {"skipped": reason} if reason else guarded(fn, *args)

    if device == "cuda":
        run("build", section_build)
        run("tests", section_cuda_tests, budget)
        run("kernels", section_kernel_bench, device, None, LINEAR_SHAPES, KERNEL_REPEATS)
        run("liger", section_liger, device, LINEAR_SHAPES, STEP_REPEATS)
        run("steps", section_steps, budget, a.families, a.backends, device, torch.bfloat16,
            STEP_REPEATS)
    else:       # the same code paths at toy sizes, so the script is known to work
        run("kernels", section_kernel_bench, device, DRY_LOGITS_SHAPE, DRY_LINEAR_SHAPES, 1)
        run("liger", section_liger, device, DRY_LINEAR_SHAPES, 1)
        run("fixtures", section_fixtures, a.families)
        run("steps", section_steps, budget, a.dry_families, ["sdpa"], "cpu", torch.float32, 1)
    return sections


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", help="where GPU.md and gpu.json go (default: bench/ on a GPU, "
                   "a temporary folder in a dry run)")
    p.add_argument("--budget_s", type=float, default=450, help="the whole check's wall clock")
    p.add_argument("--dry_run", action="store_true", help="the CPU-side parts only (the default "
                   "where no GPU is visible)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="run only these (a second run in what is left of a lease)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--dry_families", nargs="+", choices=FAMILIES, default=["tiny"],
                   help="families whose step runs on the CPU (fp32, sdpa) in a dry run")
    a = p.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    if dry:
        print("gpu_check: DRY RUN on the CPU" + ("" if a.dry_run else " (no GPU is visible)")
              + ": no GPU figures are produced", flush=True)
    out_dir = a.out_dir or (tempfile.mkdtemp(prefix="gpu_check_") if dry
                            else os.path.join(ROOT, "bench"))
    device = "cpu" if dry else "cuda"
    budget = Budget(a.budget_s)
    report = dict(dry_run=dry, date=datetime.datetime.now(datetime.timezone.utc)
                  .strftime("%Y-%m-%d %H:%M UTC"), budget_s=a.budget_s,
                  machine=machine_info(device))
    report["sections"] = run_sections(a, budget, device)
    report["plan"] = gpu_plan(a.families, a.backends)
    report["seconds"] = budget.elapsed()
    text = write_report(report, out_dir)
    print("\n" + text + f"\nwrote {os.path.join(out_dir, 'GPU.md')} and gpu.json", flush=True)
    return report


if __name__ == "__main__":
    main()
