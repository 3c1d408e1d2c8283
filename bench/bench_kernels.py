"""Benchmark of kernels/: fwd+bwd time and peak extra memory of the chain loss from logits.

    make bench-kernels            (= python bench/bench_kernels.py)
    python bench/bench_kernels.py --device cpu --repeats 5

Methods, all computing the same loss (objective "rank", 2 chains of 4 over N = 8 sequences)
and its gradient with respect to the logits, timed side by side in one run:
  naive          what most trainers do: log_softmax(logits.float()) + gather, masked sum,
                 then the chain loss (kernels.reference.chain_loss)
  reference      kernels.reference.fused_chain_loss (the spec; the same algorithm as naive)
  fused          kernels.fused_chain_loss with the compiled backend
  fused_inplace  the same, with the gradient written over the logits (inplace_backward=True)
Shapes: CPU N*T = 8*256 tokens, V = 32000, fp32 logits; GPU (when one is present)
N*T = 8*1024, V = 151936, bf16 logits.

Time: median (and best) over --repeats rounds; each round runs every method once, in turn,
on a fresh copy of the same logits (the copy is made outside the timed region). The gradient
comes from torch.autograd.grad, as it does for a trainer's logits (an intermediate).
Peak extra memory: the most memory the op holds at once beyond what existed before it
(the logits, labels, ...), the gradient of the logits included, since every method must
produce it; the next column subtracts it (in-place methods never allocate one).
  GPU: torch.cuda.max_memory_allocated() minus memory_allocated() before the op.
  CPU: torch has no peak counter for CPU memory, so the op runs once more under
  torch.profiler with profile_memory=True, which records every allocation and free made
  through c10's CPU allocator (ATen ops, autograd, and our C++ extension alike) together
  with the allocator's running total of live bytes; the peak of that total during the op,
  minus its value when the op began, is the figure (a tracemalloc for tensors).

Part 2, the LM head fused in (kernels.fused_linear_chain_loss): from hidden states [N, T, H]
and the head's weight [V, H] to the loss and the gradients of both, three methods side by
side in one run, each shape (V, H, tokens = N*T, N = 8, the first T/8 tokens of each sequence
a prompt) run once per method:
  fused_linear       kernels.fused_linear_chain_loss: the logits a chunk of real tokens at a
                     time (default chunk: 2**25 logits), recomputed in the backward
  logits_then_fused  logits = hidden @ W^T, then kernels.fused_chain_loss with
                     inplace_backward=True (the cheapest way from materialised logits)
  naive              logits = hidden @ W^T, then the naive log_softmax + gather (above); only
                     where its logits fit --naive_max_gb
Time: one fwd+bwd (to hidden and weight) per method and shape, under the memory profiler
(these steps are a few large ops, so the profiler's cost is noise). Peak extra memory as
above, the gradients of hidden and weight included; "beyond grads" subtracts them.
The figures of the last shape's methods are checked against each other (loss, gradients).

Writes tables to stdout and the figures to bench/kernels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profile need not log to stderr
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

SHAPES = {"cpu": dict(n=8, t=256, v=32000, dtype=torch.float32),
          "cuda": dict(n=8, t=1024, v=151936, dtype=torch.bfloat16)}
METHODS = ("naive", "reference", "fused", "fused_inplace")


def naive_chain_loss(logits, labels, chains, ref_logps, ignore_index=-100):
    """The usual trainer code: fp32 log-probs of the whole vocabulary, then a gather."""
    real = labels != ignore_index
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token = logprobs.gather(-1, labels.masked_fill(~real, 0).unsqueeze(-1)).squeeze(-1)
    logps = (token * real).sum(-1)
    loss = reference.chain_loss(logps, real.sum(-1), chains, ref_logps, "rank")
    return loss, logps


def make_inputs(n, t, v, dtype, device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, t, v, generator=gen) * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, : t // 8] = -100  # a prompt, as in training
    chains = torch.arange(n).view(2, n // 2)
    ref_logps = torch.randn(n, generator=gen) * 10 - 5 * t
    return logits, labels.to(device), chains.to(device), ref_logps.to(device)


def step(method, logits, labels, chains, ref_logps, backend):
    """One fwd+bwd; returns (loss, gradient of the logits)."""
    x = logits.requires_grad_()
    if method == "naive":
        loss, _ = naive_chain_loss(x, labels, chains, ref_logps)
    elif method == "reference":
        loss, _ = reference.fused_chain_loss(x, labels, chains, ref_logps, "rank")
    else:
        loss, _ = kernels.fused_chain_loss(x, labels, chains, ref_logps, "rank", backend=backend,
                                           inplace_backward=method == "fused_inplace")
    # autograd.grad, not backward(): a leaf's .grad would copy an in-place gradient (it
    # aliases the leaf), which a trainer's logits, an intermediate, never do.
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def time_ms(method, base, args, backend, device):
    logits = base.clone()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(method, logits, *args, backend)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step(method, logits, *args, backend)
    return (time.perf_counter() - begin) * 1e3


def peak_extra_bytes(method, base, args, backend, device):
    logits = base.clone()
    return measure(lambda: step(method, logits, *args, backend), device)[2]


# ----------------------------------------------------------------------------------------------
# Part 2: the LM head fused in
# ----------------------------------------------------------------------------------------------

# (V, H, tokens): the flat line at V = 32000, H = 1024 over 2k..16k tokens; Qwen2.5-VL's
# V = 151936 with H = 2048 at two token counts (its matmuls are ~10x dearer on 2 cores).
LINEAR_SHAPES = {"cpu": [(32000, 1024, t) for t in (2048, 4096, 8192, 16384)]
                 + [(151936, 2048, t) for t in (1024, 2048)],
                 "cuda": [(v, h, t) for v, h in ((32000, 1024), (151936, 2048))
                          for t in (2048, 4096, 8192, 16384)]}
LINEAR_METHODS = ("fused_linear", "logits_then_fused", "naive")


def make_linear_inputs(v, h, tokens, dtype, device, n=8):
    gen = torch.Generator().manual_seed(1)
    t = tokens // n
    hidden = torch.randn(n, t, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, : t // 8] = -100
    chains = torch.arange(n).view(2, n // 2)
    ref_logps = torch.randn(n, generator=gen) * 10 - 5 * t
    return hidden, weight, labels.to(device), chains.to(device), ref_logps.to(device)


def linear_step(method, hidden, weight, labels, chains, ref_logps, backend, head="trained"):
    """One fwd+bwd from hidden states; returns (loss, grad hidden, grad weight). head="frozen":
    the weight takes no gradient (a pretrained head under LoRA); grad weight is then None."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(head == "trained")
    if method == "fused_linear":
        loss, _ = kernels.fused_linear_chain_loss(h, w, labels, chains, ref_logps, "rank",
                                                  backend=backend)
    elif method == "logits_then_fused":
        loss, _ = kernels.fused_chain_loss(F.linear(h, w), labels, chains, ref_logps, "rank",
                                           backend=backend, inplace_backward=True)
    else:
        loss, _ = naive_chain_loss(F.linear(h, w), labels, chains, ref_logps)
    if head == "frozen":
        return loss.detach(), torch.autograd.grad(loss, h)[0], None
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), grad_h, grad_w


def measure(fn, device):
    """(fn's result, ms, peak extra bytes) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        begin = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - begin) * 1e3
        return out, ms, torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        begin = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - begin) * 1e3
    allocations = []

    def walk(events):
        for e in events:
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                f = e.extra_fields
                allocations.append((e.start_time_ns, f.alloc_size, f.total_allocated))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    allocations.sort()
    if not allocations:
        return out, ms, 0
    _, first_size, first_total = allocations[0]
    return out, ms, max(total for _, _, total in allocations) - (first_total - first_size)


def bench_linear(device, naive_max_gb, shapes=None):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    backend = kernels.resolve_backend("auto", device)
    warm = make_linear_inputs(512, 64, 256, dtype, device)
    for m in LINEAR_METHODS:  # load the extension, warm the BLAS
        linear_step(m, *warm, backend)
    rows = []
    for v, h, tokens in shapes or LINEAR_SHAPES[device]:
        inputs = make_linear_inputs(v, h, tokens, dtype, device)
        logits_bytes = tokens * v * inputs[0].element_size()
        for head in ("trained", "frozen"):   # the head's weight trained, or frozen (LoRA)
            grads = [inputs[0]] + ([inputs[1]] if head == "trained" else [])
            grad_bytes = sum(g.numel() for g in grads) * inputs[0].element_size()
            outs = {}
            for m in LINEAR_METHODS:
                if m == "naive" and logits_bytes > naive_max_gb * 1e9:
                    continue
                outs[m], ms, peak = measure(lambda: linear_step(m, *inputs, backend, head), device)
                rows.append(dict(v=v, h=h, tokens=tokens, head=head,
                                 real_tokens=int((inputs[2] != -100).sum()), method=m, ms=ms,
                                 peak_extra_bytes=peak, beyond_grads_bytes=peak - grad_bytes,
                                 logits_bytes=logits_bytes))
                print(_linear_row(rows[-1]), flush=True)
            base = outs["logits_then_fused"]
            for m, o in outs.items():  # every method's loss and gradients against logits_then_fused
                rows[-len(outs) + list(outs).index(m)]["max_rel_diff"] = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(o, base) if a is not None)
            del outs
        del inputs
    by = {(r["v"], r["h"], r["tokens"], r["head"], r["method"]): r for r in rows}
    ratios = {f"{v}x{h}x{t} head {head}": by[(v, h, t, head, "fused_linear")]["ms"]
              / by[(v, h, t, head, "logits_then_fused")]["ms"]
              for v, h, t, head, m in by if m == "fused_linear"}
    return dict(dtype=str(dtype), backend=backend, rows=rows,
                fused_linear_time_over_logits_then_fused=ratios)


def _linear_row(r):
    return (f"V={r['v']:<7} H={r['h']:<5} tokens={r['tokens']:<6} head {r['head']:<8} {r['method']:<18}"
            f"{r['ms'] / 1e3:>8.2f} s  peak extra {r['peak_extra_bytes'] / 1e6:>9.1f} MB  "
            f"beyond grads {r['beyond_grads_bytes'] / 1e6:>9.1f} MB  "
            f"(logits would be {r['logits_bytes'] / 1e6:.0f} MB)")


def print_linear_table(device, r):
    print(f"\n{device}: LM head fused in, {r['dtype']}, backend {r['backend']!r} "
          "(one fwd+bwd per row; MB = 1e6 bytes)")
    print(f"{'V':>7}{'H':>6}{'tokens':>8}  {'head':<8}{'method':<18}{'s':>8}{'vs l-t-f':>10}"
          f"{'peak extra MB':>15}{'beyond grads MB':>17}{'max rel diff':>14}")
    by = {(x["v"], x["h"], x["tokens"], x["head"], x["method"]): x for x in r["rows"]}
    for x in r["rows"]:
        base = by[(x["v"], x["h"], x["tokens"], x["head"], "logits_then_fused")]["ms"]
        print(f"{x['v']:>7}{x['h']:>6}{x['tokens']:>8}  {x['head']:<8}{x['method']:<18}{x['ms'] / 1e3:>8.2f}"
              f"{x['ms'] / base:>9.2f}x{x['peak_extra_bytes'] / 1e6:>15.1f}"
              f"{x['beyond_grads_bytes'] / 1e6:>17.1f}{x.get('max_rel_diff', 0):>14.1e}")


def bandwidth_gbs(nbytes):
    """Device copy bandwidth (read + write) on a tensor of nbytes, GB/s."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (start.elapsed_time(end) / 1e3) / 1e9


def bench(device, repeats, shape=None):
    """The op from logits at SHAPES[device] (or `shape`: a short check's smaller one)."""
    shape = shape or SHAPES[device]
    base, *args = make_inputs(device=device, **shape)
    backend = kernels.resolve_backend("auto", device)
    grad_bytes = base.numel() * base.element_size()
    # correctness first: every method's loss and gradient against naive
    _, naive_grad = step("naive", base.clone(), *args, backend)
    agree = {}
    for m in METHODS[1:]:
        loss_m, grad_m = step(m, base.clone(), *args, backend)
        agree[m] = (grad_m.float() - naive_grad.float()).abs().max().item()
    del naive_grad, grad_m
    times = {m: [] for m in METHODS}
    for _ in range(1 + repeats):  # the first round warms up and is dropped
        for m in METHODS:
            times[m].append(time_ms(m, base, args, backend, device))
    results = {}
    for m in METHODS:
        peak = peak_extra_bytes(m, base, args, backend, device)
        results[m] = dict(ms=statistics.median(times[m][1:]), min_ms=min(times[m][1:]),
                          ms_all=times[m][1:],
                          peak_extra_bytes=peak,
                          extra_beyond_grad_bytes=peak - (0 if m == "fused_inplace" else grad_bytes),
                          max_abs_grad_diff_vs_naive=agree.get(m, 0.0))
    naive, fused, inplace = results["naive"], results["fused"], results["fused_inplace"]
    out = dict(shape=dict(n=shape["n"], t=shape["t"], v=shape["v"], dtype=str(shape["dtype"])),
               backend=backend, repeats=repeats, logits_bytes=grad_bytes, results=results,
               ratios=dict(
                   naive_time_over_fused=naive["ms"] / fused["ms"],
                   naive_time_over_fused_inplace=naive["ms"] / inplace["ms"],
                   naive_best_over_fused_best=naive["min_ms"] / fused["min_ms"],
                   fused_extra_over_naive=fused["peak_extra_bytes"] / naive["peak_extra_bytes"],
                   fused_inplace_extra_over_naive=inplace["peak_extra_bytes"] / naive["peak_extra_bytes"],
                   fused_beyond_grad_over_naive=fused["extra_beyond_grad_bytes"]
                   / naive["extra_beyond_grad_bytes"]))
    if device == "cuda":
        bw = bandwidth_gbs(grad_bytes)
        floor_ms = 3 * grad_bytes / (bw * 1e9) * 1e3  # read (fwd) + read and write (bwd)
        out.update(device_name=torch.cuda.get_device_name(), copy_bandwidth_gbs=bw,
                   floor_ms=floor_ms, fused_over_floor=fused["ms"] / floor_ms,
                   fused_inplace_over_floor=inplace["ms"] / floor_ms,
                   tokens=shape["n"] * shape["t"])
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(device, r):
    s = r["shape"]
    print(f"\n{device}: N*T = {s['n']}*{s['t']}, V = {s['v']}, {s['dtype']} logits "
          f"({r['logits_bytes'] / 1e6:.0f} MB), backend {r['backend']!r}, median of {r['repeats']}")
    print(f"{'method':<15}{'fwd+bwd ms':>12}{'best ms':>9}{'vs naive':>10}{'peak extra MB':>15}"
          f"{'beyond grad MB':>16}{'max |dgrad|':>13}")
    naive_ms = r["results"]["naive"]["ms"]
    for m, x in r["results"].items():
        print(f"{m:<15}{x['ms']:>12.1f}{x['min_ms']:>9.1f}{naive_ms / x['ms']:>9.2f}x"
              f"{x['peak_extra_bytes'] / 1e6:>15.1f}{x['extra_beyond_grad_bytes'] / 1e6:>16.2f}"
              f"{x['max_abs_grad_diff_vs_naive']:>13.1e}")
    q = r["ratios"]
    print(f"fused is {q['naive_time_over_fused']:.2f}x faster than naive "
          f"({q['naive_time_over_fused_inplace']:.2f}x in place; best against best "
          f"{q['naive_best_over_fused_best']:.2f}x); extra memory "
          f"{q['fused_extra_over_naive']:.3f} of naive's with the gradient counted, "
          f"{q['fused_beyond_grad_over_naive']:.5f} beyond it, "
          f"{q['fused_inplace_extra_over_naive']:.5f} in place")
    if device == "cuda":
        print(f"{r['device_name']}: copy bandwidth {r['copy_bandwidth_gbs']:.0f} GB/s, floor "
              f"(3 passes over the logits) {r['floor_ms']:.2f} ms; fused = "
              f"{r['fused_over_floor']:.2f}x floor, in place {r['fused_inplace_over_floor']:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, and the GPU too when there is one")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (CPU; GPU x4)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "kernels.json"))
    parser.add_argument("--part", choices=("all", "logits", "linear"), default="all",
                        help="logits: the op from logits only; linear: the LM head fused in only")
    parser.add_argument("--naive_max_gb", type=float, default=1.1,
                        help="run naive only where the logits take at most this many GB")
    parser.add_argument("--linear_shapes", default=None,
                        help="V:H:tokens,... instead of the default shapes (e.g. 512:64:1024)")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("--device cuda: no GPU here")
        devices.remove("cuda")
    report = dict(machine=dict(cpu=cpu_name(), cpu_count=os.cpu_count(),
                               torch_threads=torch.get_num_threads(), torch=torch.__version__,
                               thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
                               python=platform.python_version()),
                  cuda="not measured: no GPU on this machine")
    shapes = ([tuple(int(x) for x in s.split(":")) for s in args.linear_shapes.split(",")]
              if args.linear_shapes else None)
    for device in devices:
        if args.part in ("all", "logits"):
            r = bench(device, args.repeats * (4 if device == "cuda" else 1))
            report[device] = r
            print_table(device, r)
        if args.part in ("all", "linear"):
            r = bench_linear(device, args.naive_max_gb, shapes)
            report[f"linear_{device}"] = r
            print_linear_table(device, r)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
