"""kernels/: every compiled backend against the pure-PyTorch reference (kernels/reference.py),
the reference against autograd (gradcheck) and against the Plackett-Luce product formula.

Tolerances (compiled backend vs reference, same inputs; both compute in fp32 for
fp32/bf16/fp16 logits and in fp64 for fp64, but with different exp implementations and
summation orders):
  values (logps, loss):  fp64 atol 1e-10 rtol 1e-10; fp32/bf16/fp16 atol 1e-4 rtol 1e-5
  gradients (dtype of the logits): fp64 1e-10; fp32 atol 1e-6 rtol 1e-4;
      bf16 atol 1e-5 rtol 1e-2 and fp16 atol 1e-6 rtol 2e-3 (one rounding step of the dtype:
      the two sides may round a value on either side of a bf16/fp16 boundary)
The fused-linear tests (LM head fused in) add their own bf16 tolerance: see their section.
CUDA tests skip without a GPU; building and loading the CUDA extension is tested whenever a
CUDA toolkit and a CUDA build of torch are present, GPU or not.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kernels
from kernels import build, reference

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU: CUDA kernels cannot run here")
COMPILED = ["cpu", pytest.param("cuda", marks=needs_gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

VALUE_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}
GRAD_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-6, rtol=1e-4),
            torch.bfloat16: dict(atol=1e-5, rtol=1e-2), torch.float16: dict(atol=1e-6, rtol=2e-3)}


def value_tol(dtype):
    return VALUE_TOL.get(dtype, dict(atol=1e-4, rtol=1e-5))


def make_batch(seed, n, t, v, dtype=torch.float32, device="cpu", scale=3.0):
    """Random logits and labels with prompt tokens ignored and one sequence fully ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    for i in range(n):  # a prompt of random length, left out of every sum
        labels[i, : int(torch.randint(0, t, (), generator=gen))] = -100
    labels[n - 1] = -100  # a sequence with no real token at all
    return logits.to(device), labels.to(device)


def run(fn, logits, weights):
    """fn(logits) -> (loss or None, logps [N], ...): its outputs, detached, and the gradient
    of loss + sum(weights * logps) with respect to the logits."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x)
    total = (out[1] * weights).sum()
    if out[0] is not None:
        total = total + out[0]
    total.backward()
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in out], x.grad


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.cpu(), expected.cpu(), equal_nan=True, **tol)


# ----------------------------------------------------------------------------------------------
# sequence_logps
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 1), (4, 9, 37), (2, 6, 515), (5, 3, 1030)])
def test_sequence_logps_matches_reference(backend, dtype, shape):
    # V = 515 and 1030 cross the CPU's 512-logit chunks and leave tails after 16-byte packs.
    logits, labels = make_batch(sum(shape), *shape, dtype=dtype, device=backend)
    weights = torch.randn(shape[0], dtype=torch.float64).to(backend)
    (_, logps, counts), grad = run(
        lambda x: (None, *kernels.sequence_logps(x, labels, backend=backend)), logits, weights)
    (_, logps_r, counts_r), grad_r = run(
        lambda x: (None, *reference.sequence_logps(x, labels)), logits, weights)
    assert logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts.cpu(), counts_r.cpu()) and counts.dtype == torch.int64
    assert_close(logps, logps_r, **value_tol(dtype))
    assert grad.dtype == dtype
    assert_close(grad, grad_r, **GRAD_TOL[dtype])
    # the fully ignored sequence: logp 0, count 0, zero gradient
    assert logps[-1].item() == 0 and counts[-1].item() == 0
    assert not grad[-1].any()


def test_sequence_logps_is_deterministic():
    logits, labels = make_batch(0, 4, 33, 700)
    first = kernels.sequence_logps(logits, labels, backend="cpu")[0]
    again = kernels.sequence_logps(logits, labels, backend="cpu")[0]
    assert torch.equal(first, again)


@pytest.mark.parametrize("backend", COMPILED)
def test_masked_vocabulary_and_nan(backend):
    """-inf logits (a masked vocabulary) are fine and get zero gradient; a NaN poisons only
    its own sequence, as in the reference."""
    logits, labels = make_batch(1, 3, 4, 600, device=backend)
    labels[2] = torch.arange(4, device=backend)  # make the last sequence real again
    logits[:, :, 300:] = float("-inf")
    labels[:2] = labels[:2] % 300
    labels[:2, 0] = -100
    logits[2, 1, 7] = float("nan")
    weights = torch.ones(3, dtype=torch.float64, device=backend)
    (_, logps, _), grad = run(
        lambda x: (None, *kernels.sequence_logps(x, labels, backend=backend)), logits, weights)
    (_, logps_r, _), grad_r = run(lambda x: (None, *reference.sequence_logps(x, labels)),
                                  logits, weights)
    assert torch.isnan(logps[2]) and torch.isnan(logps_r[2])
    assert_close(logps[:2], logps_r[:2], **value_tol(torch.float32))
    assert_close(grad[:2], grad_r[:2], **GRAD_TOL[torch.float32])
    assert not grad[:2, :, 300:].any()


# ----------------------------------------------------------------------------------------------
# fused_chain_loss
# ----------------------------------------------------------------------------------------------

# Rows 0..7 of an 8-sequence batch; row 7 has no real token. Chains of length 4, 3, 2 and 1
# share one [B, K] tensor (-1 = padding), rows recur across chains (their gradients add up),
# and one chain's best response is the empty row 7.
CHAINS = [[0, 1, 2, 3], [4, 5, 6, -1], [7, 2, -1, -1], [3, -1, -1, -1], [5, 0, 1, 6]]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", kernels.OBJECTIVES)
def test_fused_chain_loss_matches_reference(backend, dtype, objective):
    logits, labels = make_batch(7, 8, 11, 203, dtype=dtype, device=backend)
    chains = torch.tensor(CHAINS, device=backend)
    gen = torch.Generator().manual_seed(3)
    ref_logps = (reference.sequence_logps(logits, labels)[0].cpu()
                 + torch.randn(8, generator=gen) * 4).to(backend)
    weights = torch.randn(8, generator=gen, dtype=torch.float64).to(backend)
    kwargs = dict(objective=objective, beta=0.5, ntp_weight=0.3)
    (loss, logps), grad = run(lambda x: kernels.fused_chain_loss(
        x, labels, chains, ref_logps, backend=backend, **kwargs), logits, weights)
    (loss_r, logps_r), grad_r = run(lambda x: reference.fused_chain_loss(
        x, labels, chains, ref_logps, **kwargs), logits, weights)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, loss_r, **value_tol(dtype))
    assert_close(logps, logps_r, **value_tol(dtype))
    assert_close(grad, grad_r, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", COMPILED)
def test_hinge_tie_gets_no_gradient(backend):
    """Two different rows with exactly equal logps tie: max(0, 0) contributes no gradient,
    as torch's clamp_min gives none at 0 (a >= test would push the two rows apart)."""
    logits, labels = make_batch(5, 3, 4, 50, dtype=torch.float64, device=backend)
    logits[1], labels[1] = logits[0], labels[0]  # rows 0 and 1: the same sequence
    labels[0, -1] = labels[1, -1] = 3
    chains = torch.tensor([[0, 1, 2]], device=backend)
    ref = torch.zeros(3, dtype=torch.float64, device=backend)
    no_weights = torch.zeros(3, dtype=torch.float64, device=backend)
    kwargs = dict(objective="hinge", ntp_weight=0.0)
    (loss, logps), grad = run(lambda x: kernels.fused_chain_loss(
        x, labels, chains, ref, backend=backend, **kwargs), logits, no_weights)
    (loss_r, _), grad_r = run(lambda x: reference.fused_chain_loss(
        x, labels, chains, ref, **kwargs), logits, no_weights)
    assert logps[0] == logps[1]
    assert_close(loss, loss_r, **value_tol(torch.float64))
    assert_close(grad, grad_r, **GRAD_TOL[torch.float64])
    assert torch.equal(grad[0], grad[1])  # the tie pushed neither row


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("objective", kernels.OBJECTIVES)
def test_gradcheck_fp64(objective, backend):
    """Gradients against finite differences: autograd through the reference, and the C++ op's
    hand-derived backward."""
    logits, labels = make_batch(12, 5, 3, 6, dtype=torch.float64, scale=1.0)
    chains = torch.tensor([[0, 1, 2], [3, 1, -1], [2, -1, -1]])
    ref = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(x):
        return kernels.fused_chain_loss(x, labels, chains, ref, objective, beta=0.7,
                                        ntp_weight=0.2, backend=backend)

    assert torch.autograd.gradcheck(f, (logits.requires_grad_(),))


def plackett_luce_probability(rewards):
    """P(the order given) = prod_i exp(r_i) / sum_{j >= i} exp(r_j), by the product formula."""
    p = 1.0
    for i in range(len(rewards)):
        p *= math.exp(rewards[i]) / sum(math.exp(r) for r in rewards[i:])
    return p


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=needs_gpu)])
def test_rank_is_plackett_luce_by_brute_force(backend):
    """rank loss (ntp_weight 0) = mean over chains of -log P_PL(chain); P_PL sums to 1 over
    all orderings (checked by enumerating them), and padding changes nothing."""
    device = "cuda" if backend == "cuda" else "cpu"
    logits, labels = make_batch(21, 6, 5, 40, dtype=torch.float64, device=device)
    labels[-1, 0] = 3  # every row real here
    chains = torch.tensor([[0, 1, 2, 3], [4, 5, 1, -1], [2, 0, -1, -1], [5, -1, -1, -1]],
                          device=device)
    ref = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device)
    beta = 0.3
    loss, logps = kernels.fused_chain_loss(logits, labels, chains, ref, "rank", beta=beta,
                                           ntp_weight=0.0, backend=backend)
    nll = []
    for chain in chains.tolist():
        rows = [r for r in chain if r >= 0]
        rewards = [beta * (logps[r].item() - ref[r].item()) for r in rows]
        total = sum(plackett_luce_probability([rewards[i] for i in perm])
                    for perm in itertools.permutations(range(len(rows))))
        assert total == pytest.approx(1.0, abs=1e-12)
        nll.append(-math.log(plackett_luce_probability(rewards)))
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=needs_gpu)])
def test_other_objectives_closed_form(backend):
    """dpo, mpo, hinge and sft written out by hand for one chain of three."""
    device = "cuda" if backend == "cuda" else "cpu"
    logits, labels = make_batch(31, 3, 6, 30, dtype=torch.float64, device=device)
    labels[-1, 2:] = 5
    chains = torch.tensor([[0, 1, 2]], device=device)
    ref = torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64, device=device)
    beta, w = 0.4, 0.25
    logps, counts = kernels.sequence_logps(logits, labels, backend=backend)
    s = logps.tolist()
    r = [beta * (s[i] - ref[i].item()) for i in range(3)]
    ntp = -s[0] / counts[0].item()
    expected = {
        "dpo": math.log1p(math.exp(-(r[0] - r[1]))) + w * ntp,
        "mpo": math.log(sum(math.exp(x) for x in r)) - r[0] + w * ntp,
        "hinge": sum(max(0.0, s[j] - s[i]) for i in range(3) for j in range(i + 1, 3)) + w * ntp,
        "sft": ntp,
    }
    for objective, value in expected.items():
        loss, _ = kernels.fused_chain_loss(logits, labels, chains, ref, objective, beta=beta,
                                           ntp_weight=w, backend=backend)
        assert loss.item() == pytest.approx(value, rel=1e-10), objective


def test_dpo_with_one_response_per_chain_is_only_ntp():
    """K = 1: no pairs (the reference used to fail on this shape)."""
    logits, labels = make_batch(41, 2, 4, 20)
    labels[-1, 0] = 1
    chains = torch.tensor([[0], [1]])
    ref = torch.zeros(2)
    for backend in ("reference", "cpu"):
        dpo, _ = kernels.fused_chain_loss(logits, labels, chains, ref, "dpo", backend=backend)
        sft, _ = kernels.fused_chain_loss(logits, labels, chains, ref, "sft", backend=backend)
        assert dpo.item() == pytest.approx(0.1 * sft.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Layouts: views read in place, the in-place gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("layout", ["shifted", "time_major", "vocab_strided"])
def test_strided_logits(backend, layout):
    """logits[:, :-1] (what a trainer shifts), a [T, N, V] buffer seen as [N, T, V], and a
    layout without stride 1 over V (which gets copied) all give the contiguous results."""
    full, labels = make_batch(51, 3, 8, 64, device=backend)
    if layout == "shifted":
        base, view, labels = full, (lambda b: b[:, :-1]), labels[:, 1:]
    elif layout == "time_major":
        base, view = full.transpose(0, 1).contiguous(), (lambda b: b.transpose(0, 1))
    else:
        base, view = full.transpose(1, 2).contiguous(), (lambda b: b.transpose(1, 2))
    base = base.clone().requires_grad_()
    x = view(base)
    assert not x.is_contiguous()
    weights = torch.randn(3, dtype=torch.float64).to(backend)
    logps, _ = kernels.sequence_logps(x, labels, backend=backend)
    (logps * weights).sum().backward()
    (_, logps_c, _), grad_c = run(
        lambda y: (None, *kernels.sequence_logps(y, labels, backend=backend)),
        x.detach().contiguous(), weights)
    assert_close(logps.detach(), logps_c, atol=0, rtol=0)
    assert_close(view(base.grad), grad_c, atol=0, rtol=0)


def test_inplace_into_a_shifted_view():
    """The shifted view is read and written where it lies: the gradient lands in the buffer."""
    full, labels = make_batch(52, 3, 8, 64)
    weights = torch.randn(3, dtype=torch.float64)
    _, expected = run(lambda y: (None, *kernels.sequence_logps(y, labels[:, 1:], backend="cpu")),
                      full[:, :-1].contiguous(), weights)
    leaf = full.clone().requires_grad_()
    buffer = leaf * 1
    logps, _ = kernels.sequence_logps(buffer[:, :-1], labels[:, 1:], backend="cpu",
                                      inplace_backward=True)
    (logps * weights).sum().backward()
    assert_close(buffer.detach()[:, :-1], expected, atol=0, rtol=0)
    assert_close(leaf.grad[:, :-1], expected, atol=0, rtol=0)
    assert not leaf.grad[:, -1].any()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward(backend, dtype):
    """The gradient written over the logits equals the ordinary one, and the buffer holds it."""
    logits, labels = make_batch(61, 4, 6, 129, dtype=dtype, device=backend)
    chains = torch.tensor([[0, 1, 2], [3, 1, -1]], device=backend)
    ref = torch.randn(4).to(backend)
    weights = torch.randn(4, dtype=torch.float64).to(backend)
    _, expected = run(lambda x: kernels.fused_chain_loss(x, labels, chains, ref, backend=backend),
                      logits, weights)
    base = logits.detach().clone().requires_grad_()
    buffer = base * 1  # an intermediate, like the LM head's output
    loss, logps = kernels.fused_chain_loss(buffer, labels, chains, ref, backend=backend,
                                           inplace_backward=True)
    (loss + (logps * weights).sum()).backward()
    assert_close(base.grad, expected, atol=0, rtol=0)
    assert_close(buffer.detach(), expected, atol=0, rtol=0)


def test_inplace_backward_refuses_overwriting_saved_logits():
    """If another autograd node saved the logits and still needs them, torch raises instead
    of computing a wrong gradient."""
    logits, labels = make_batch(62, 2, 3, 16)
    base = logits.clone().requires_grad_()
    buffer = base * 1
    other = (buffer ** 2).sum()  # pow saves `buffer`; its backward runs after ours
    loss, _ = kernels.fused_chain_loss(buffer, labels, torch.tensor([[0, 1]]), torch.zeros(2),
                                       backend="cpu", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other * 1e-3 + loss).backward()


# ----------------------------------------------------------------------------------------------
# int64 indexing
# ----------------------------------------------------------------------------------------------

def _token_logps(logits, labels, positions):
    """Reference log-prob of each (n, t) token, computed on that row alone."""
    v = logits.shape[-1]
    return {pos: reference.sequence_logps(logits[pos].reshape(1, 1, v).float(),
                                          labels[pos].reshape(1, 1))[0].item()
            for pos in positions}


def _sparse_batch(n, t, v, device, labels_at):
    """An uninitialised [n, t, v] bf16 buffer with random rows only where labels_at says."""
    logits = torch.empty(n, t, v, dtype=torch.bfloat16, device=device)
    labels = torch.full((n, t), -100, device=device)
    gen = torch.Generator().manual_seed(0)
    for pos, label in labels_at.items():
        logits[pos] = (torch.randn(v, generator=gen) * 3).to(torch.bfloat16).to(device)
        labels[pos] = label
    return logits, labels


def test_int64_offsets_cpu_forward():
    """Rows that start past element 2^31 are read from the right place.

    The [2, 16400, 65536] bf16 buffer (N*T*V = 2.15e9 > 2^31, 4.3 GB) is only reserved:
    torch.empty does not touch its pages and the forward never reads ignored rows, so just
    the four rows written here become resident memory. The backward must write every row
    (zeros for ignored ones), 4.3 GB, too much for this test machine, so its int64 path is
    covered by the CUDA test below; both passes form row addresses the same way (int64
    n*stride0 + t*stride1).
    """
    n, t, v = 2, 16400, 65536
    last = (1, t - 1)
    assert (last[0] * t + last[1]) * v > 2 ** 31  # the last rows start past 2^31 elements
    real = {(0, 0): 1000, (1, 0): 2000, (1, t - 2): 3000, last: 4000}
    try:
        logits, labels = _sparse_batch(n, t, v, "cpu", real)
    except RuntimeError as e:  # the address space was refused (strict overcommit)
        pytest.skip(f"cannot reserve a 4.3 GB buffer here: {e}")
    logps, counts = kernels.sequence_logps(logits, labels, backend="cpu")
    tok = _token_logps(logits, labels, real)
    assert counts.tolist() == [1, 3]
    expected = torch.tensor([tok[0, 0], tok[1, 0] + tok[1, t - 2] + tok[last]])
    assert_close(logps, expected, **value_tol(torch.bfloat16))


@needs_gpu
def test_int64_offsets_cuda_forward_and_backward():
    """N*T*V > 2^31 on the GPU, forward and backward (about 9 GB of GPU memory)."""
    n, t, v = 2, 7100, 151936
    last = (1, t - 1)
    assert (last[0] * t + last[1]) * v > 2 ** 31
    real = {(0, 0): 1000, (1, t - 2): 3000, last: 4000}
    logits, labels = _sparse_batch(n, t, v, "cuda", real)
    logits.requires_grad_()
    logps, counts = kernels.sequence_logps(logits, labels, backend="cuda")
    logps.sum().backward()
    tok = _token_logps(logits.detach(), labels, real)
    assert counts.tolist() == [1, 2]
    expected = torch.tensor([tok[0, 0], tok[1, t - 2] + tok[last]])
    assert_close(logps.detach(), expected, **value_tol(torch.bfloat16))
    row = logits.detach()[last].float()
    expected_grad = -torch.softmax(row, -1)
    expected_grad[4000] += 1
    assert_close(logits.grad[last].float(), expected_grad, **GRAD_TOL[torch.bfloat16])
    assert not logits.grad[1, t - 3].any()  # an ignored row


# ----------------------------------------------------------------------------------------------
# Review fixes: large logits, a V = 1 transposed view
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", COMPILED)
def test_large_logits_keep_their_precision(backend):
    """Logits near 1e4 in fp32: a stored fp32 lse = max + log(sum) rounds to the ulp of 1e4
    (~1e-3), losing up to ~5e-4 per token; max and log(sum) kept apart lose nothing there."""
    gen = torch.Generator().manual_seed(81)
    logits = (1e4 + torch.randn(64, 1, 1000, generator=gen, dtype=torch.float64) * 3).float()
    labels = torch.randint(0, 1000, (64, 1), generator=gen)
    exact = reference.sequence_logps(logits.double(), labels)[0]
    logps = kernels.sequence_logps(logits.to(backend), labels.to(backend), backend=backend)[0]
    assert (logps.cpu().double() - exact).abs().max() < 2e-5


@pytest.mark.parametrize("backend", COMPILED)
def test_vocabulary_of_one_as_a_transposed_view(backend):
    """[N, T, 1] made by a transpose has stride T over V; contiguous() keeps it (a size-1
    dimension's stride does not count), so the op must not reject it."""
    logits = torch.randn(2, 1, 5, dtype=torch.float64).transpose(1, 2).to(backend)
    assert logits.stride(-1) != 1
    labels = torch.zeros(2, 5, dtype=torch.int64, device=backend)
    labels[0, 0] = -100
    weights = torch.ones(2, dtype=torch.float64, device=backend)
    (_, logps, counts), grad = run(
        lambda x: (None, *kernels.sequence_logps(x, labels, backend=backend)), logits, weights)
    (_, logps_r, _), grad_r = run(lambda x: (None, *reference.sequence_logps(x, labels)),
                                  logits, weights)
    assert counts.tolist() == [4, 5]
    assert_close(logps, logps_r, **value_tol(torch.float64))
    assert_close(grad, grad_r, **GRAD_TOL[torch.float64])


# ----------------------------------------------------------------------------------------------
# fused_linear_chain_loss / fused_linear_sequence_logps: the LM head fused in
# Tolerances against the reference (F.linear, then the reference loss), same inputs:
#   fp32 and fp64 as above (the logits come from the same matmul, a chunk of rows at a time);
#   bf16: values as above; gradients of hidden and weight rtol 2e-2 with atol 2e-3 times
#   their largest magnitude (the reference rounds grad_W once from a bf16 matmul over all
#   tokens, the fused op sums per-chunk bf16 products in fp32 and rounds at the end: a
#   rounding step or two of bf16 apart).
# ----------------------------------------------------------------------------------------------

def make_linear_batch(seed, n, t, h, v, dtype=torch.float32, device="cpu", bias=True):
    """Hidden states, an LM head (weight, bias) and labels; prompts ignored, row n-1 empty."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h ** 0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    _, labels = make_batch(seed, n, t, v)
    to = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return to(hidden), to(weight), to(b), labels.to(device)


def run_linear(fn, hidden, weight, bias, weights, train_head=True):
    """fn(hidden, weight, bias) -> (loss or None, logps, ...): outputs detached, and the
    gradients of loss + sum(weights * logps) for hidden, weight and bias (for hidden only,
    the weight and bias None, with a frozen head: train_head=False)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(train_head or i == 0)
              for i, x in enumerate((hidden, weight, bias))]
    out = fn(*leaves)
    total = (out[1] * weights).sum() + (out[0] if out[0] is not None else 0)
    total.backward()
    return [o if o is None else o.detach() for o in out], [None if x is None else x.grad for x in leaves]


def linear_grad_tol(dtype, expected):
    if dtype == torch.bfloat16:
        return dict(atol=2e-3 * expected.abs().max().item(), rtol=2e-2)
    return GRAD_TOL[dtype]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", kernels.OBJECTIVES)
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_fused_linear_chain_loss_matches_reference(backend, dtype, objective, head):
    """head=frozen: only hidden needs a gradient, the road where the forward keeps each real
    token's d logp / d hidden and the backward makes no logits."""
    # V = 515: not a multiple of the CPU's 512-logit row chunks nor of a 16-byte pack;
    # 48 real tokens in chunks of 7 leave a short last chunk.
    hidden, weight, bias, labels = make_linear_batch(91, 8, 11, 24, 515, dtype, backend)
    chains = torch.tensor(CHAINS, device=backend)
    gen = torch.Generator().manual_seed(4)
    ref_logps = (reference.linear_sequence_logps(hidden, weight, labels, bias)[0].cpu()
                 + torch.randn(8, generator=gen) * 4).to(backend)
    weights = torch.randn(8, generator=gen, dtype=torch.float64).to(backend)
    kwargs = dict(objective=objective, beta=0.5, ntp_weight=0.3)
    trained = head == "trained"
    (loss, logps), grads = run_linear(lambda h, w, b: kernels.fused_linear_chain_loss(
        h, w, labels, chains, ref_logps, bias=b, chunk_tokens=7, backend=backend, **kwargs),
        hidden, weight, bias, weights, trained)
    (loss_r, logps_r), grads_r = run_linear(lambda h, w, b: reference.fused_linear_chain_loss(
        h, w, labels, chains, ref_logps, bias=b, **kwargs), hidden, weight, bias, weights, trained)
    assert (labels != -100).sum() % 7 != 0
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, loss_r, **value_tol(dtype))
    assert_close(logps, logps_r, **value_tol(dtype))
    assert (grads[1] is None and grads[2] is None) != trained
    for g, g_r in zip(grads[:3 if trained else 1], grads_r):
        assert g.dtype == dtype
        assert_close(g, g_r, **linear_grad_tol(dtype, g_r))
    assert not grads[0][labels == -100].any()  # prompt and padding tokens get no gradient


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
def test_fused_linear_sequence_logps_matches_reference(backend, dtype, chunk_tokens):
    """No bias; a custom ignore_index; every chunk size gives the same numbers."""
    hidden, weight, _, labels = make_linear_batch(92, 4, 6, 8, 37, dtype, backend, bias=False)
    labels[labels == -100] = -1
    weights = torch.randn(4, dtype=torch.float64).to(backend)
    (_, logps, counts), (gh, gw, _) = run_linear(
        lambda h, w, b: (None, *kernels.fused_linear_sequence_logps(
            h, w, labels, ignore_index=-1, chunk_tokens=chunk_tokens, backend=backend)),
        hidden, weight, None, weights)
    (_, logps_r, counts_r), (gh_r, gw_r, _) = run_linear(
        lambda h, w, b: (None, *reference.linear_sequence_logps(h, w, labels, ignore_index=-1)),
        hidden, weight, None, weights)
    assert torch.equal(counts, counts_r) and counts[-1] == 0 and logps[-1] == 0
    assert_close(logps, logps_r, **value_tol(dtype))
    assert_close(gh, gh_r, **GRAD_TOL[dtype])
    assert_close(gw, gw_r, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("objective", kernels.OBJECTIVES)
def test_fused_linear_gradcheck_fp64(objective, backend):
    """Gradients of hidden, weight and bias against finite differences (fp64)."""
    hidden, weight, bias, labels = make_linear_batch(93, 5, 3, 4, 7, torch.float64)
    chains = torch.tensor([[0, 1, 2], [3, 1, -1], [2, -1, -1]])
    ref = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(h, w, b):
        return kernels.fused_linear_chain_loss(h, w, labels, chains, ref, objective, beta=0.7,
                                               ntp_weight=0.2, bias=b, chunk_tokens=2,
                                               backend=backend)

    inputs = tuple(x.requires_grad_() for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(f, inputs)
    # a frozen head: the gradient of hidden alone, kept from the forward
    assert torch.autograd.gradcheck(lambda h: f(h, weight.detach(), bias.detach()),
                                    (hidden.detach().requires_grad_(),))


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_linear_frozen_head_keeps_token_grads_for_a_backward_without_logits(backend):
    """Which road the op takes: with the head frozen and grad mode on it saves the real tokens'
    d logp / d hidden [R, H] (and their rows); with the head trained, what a recompute needs."""
    hidden, weight, _, labels = make_linear_batch(95, 3, 5, 8, 11, torch.float32, backend, bias=False)
    real = int((labels != -100).sum())
    logps, _ = kernels.fused_linear_sequence_logps(hidden.requires_grad_(), weight, labels, backend=backend)
    assert [tuple(t.shape) for t in logps.grad_fn.saved_tensors] == [(real,), (real, 8)]
    logps, _ = kernels.fused_linear_sequence_logps(hidden, weight.requires_grad_(), labels, backend=backend)
    assert len(logps.grad_fn.saved_tensors) == 6          # hidden, weight, bias, rows, labels, lse


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # "not double precision": known
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fused_linear_gradcheck_fp32(backend):
    """The same in fp32, where finite differences need a larger step and tolerance."""
    hidden, weight, bias, labels = make_linear_batch(94, 5, 3, 4, 7, torch.float32)
    chains = torch.tensor([[0, 1, 2], [3, 1, -1]])
    ref = torch.randn(5, generator=torch.Generator().manual_seed(3))

    def f(h, w, b):
        return kernels.fused_linear_chain_loss(h, w, labels, chains, ref, "rank", beta=0.7,
                                               bias=b, chunk_tokens=3, backend=backend)[0]

    inputs = tuple(x.requires_grad_() for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_linear_tied_embeddings(backend):
    """weight shared with the input embedding: its gradient is the head's plus the
    embedding's, as through the plain F.linear."""
    torch.manual_seed(95)
    v, h = 41, 12
    embed = torch.nn.Embedding(v, h).to(backend)
    mix = torch.nn.Linear(h, h).to(backend)
    ids = torch.randint(0, v, (8, 9), device=backend)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[:, :3] = -100
    chains = torch.tensor(CHAINS, device=backend)
    ref = torch.randn(8, device=backend)

    def grads(loss_fn):
        embed.zero_grad()
        mix.zero_grad()
        hidden = torch.tanh(mix(embed(ids)))
        loss, _ = loss_fn(hidden, embed.weight, labels, chains, ref, "rank")
        loss.backward()
        return embed.weight.grad.clone(), mix.weight.grad.clone()

    fused = grads(lambda *a: kernels.fused_linear_chain_loss(*a, chunk_tokens=7, backend=backend))
    expected = grads(reference.fused_linear_chain_loss)
    for g, g_r in zip(fused, expected):
        assert_close(g, g_r, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_linear_all_ignored(backend):
    hidden, weight, bias, labels = make_linear_batch(96, 3, 4, 5, 9, device=backend)
    labels[:] = -100
    (_, logps, counts), (gh, gw, gb) = run_linear(
        lambda h, w, b: (None, *kernels.fused_linear_sequence_logps(h, w, labels, b,
                                                                   backend=backend)),
        hidden, weight, bias, torch.ones(3, device=backend))
    assert not logps.any() and not counts.any()
    assert not gh.any() and not gw.any() and not gb.any()


def test_fused_linear_bad_inputs_are_named():
    hidden, weight, bias, labels = make_linear_batch(97, 3, 4, 5, 9)
    chains, ref = torch.tensor([[0, 1]]), torch.zeros(3)
    cases = [
        (dict(hidden=hidden[0]), "hidden must be a [N, T, H] tensor"),
        (dict(weight=weight[:, :4]), "weight must be the LM head's [V, H] = [V, 5]"),
        (dict(weight=weight.double()), "of hidden's dtype torch.float32"),
        (dict(bias=bias[:5]), "bias must be None or [V] = [9]"),
        (dict(labels=labels.masked_fill(labels >= 0, 9)), "is outside the vocabulary [0, 9)"),
        (dict(chunk_tokens=0), "chunk_tokens must be None or a positive int"),
        (dict(chains=torch.tensor([[0, 3]])), "chains[0, 1] = 3 is neither a row index"),
    ]
    for change, message in cases:
        args = dict(hidden=hidden, weight=weight, labels=labels, chains=chains, ref_logps=ref,
                    bias=bias, backend="cpu")
        args.update(change)
        with pytest.raises(ValueError) as info:
            kernels.fused_linear_chain_loss(**args)
        assert message in str(info.value), message


# ----------------------------------------------------------------------------------------------
# Input checks, backend choice, building
# ----------------------------------------------------------------------------------------------

def _good_args():
    logits, labels = make_batch(71, 3, 4, 10)
    return dict(logits=logits, labels=labels, chains=torch.tensor([[0, 1], [2, -1]]),
                ref_logps=torch.zeros(3))


BAD_INPUTS = [
    (dict(logits=torch.zeros(3, 4)), "logits must be a [N, T, V] tensor"),
    (dict(logits=torch.zeros(3, 4, 10, dtype=torch.int64)), "logits must be a [N, T, V] tensor"),
    (dict(labels=torch.zeros(3, 4, dtype=torch.int32)), "labels must be an int64 tensor"),
    (dict(labels=torch.zeros(3, 5, dtype=torch.int64)), "labels must have shape [N, T] = [3, 4]"),
    (dict(labels=torch.full((3, 4), 10)), "labels[0, 0] = 10 is outside the vocabulary [0, 10)"),
    (dict(chains=torch.tensor([[0, 3]])), "chains[0, 1] = 3 is neither a row index in [0, 3)"),
    (dict(chains=torch.tensor([[0, -2]])), "chains[0, 1] = -2 is neither a row index"),
    (dict(chains=torch.tensor([[0.0, 1.0]])), "chains must be an int64 tensor [B, K]"),
    (dict(chains=torch.zeros(0, 2, dtype=torch.int64)), "at least one chain"),
    (dict(ref_logps=torch.zeros(4)), "ref_logps must be a floating tensor [N] = [3]"),
    (dict(objective="ipo"), "unknown objective 'ipo'"),
    (dict(beta=float("nan")), "beta must be a finite number"),
    (dict(backend="gpu"), "backend must be one of"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_are_named(backend, change, message):
    args = dict(_good_args(), backend=backend)
    args.update(change)
    with pytest.raises(ValueError) as info:
        kernels.fused_chain_loss(**args)
    assert message in str(info.value)


def test_compiled_checks_stand_on_their_own():
    """Called directly, the compiled ops still name a bad label and a bad chain entry."""
    kernels.ops.load("cpu")
    logits, labels = make_batch(72, 2, 3, 10)
    labels[1, 2] = 12
    with pytest.raises(RuntimeError, match=r"labels\[1, 2\] = 12 is outside the vocabulary"):
        torch.ops.rank_dpo.sequence_logps_forward(logits, labels, -100, False)
    logps, counts = torch.zeros(2), torch.ones(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"chains\[0, 1\] = 5 is neither"):
        torch.ops.rank_dpo.chain_loss_forward(logps, counts, torch.tensor([[0, 5]]), logps, 0,
                                              0.1, 0.1)


def test_inplace_refuses_overlapping_rows():
    logits = torch.randn(1, 1, 10).expand(3, 4, 10)
    with pytest.raises(ValueError, match="rows do not share memory"):
        kernels.sequence_logps(logits, torch.zeros(3, 4, dtype=torch.int64), backend="cpu",
                               inplace_backward=True)


def test_explicit_backend_for_the_wrong_device():
    logits, labels = make_batch(73, 2, 3, 10)
    with pytest.raises(kernels.BackendUnavailableError, match="backend='cuda' needs cuda tensors"):
        kernels.sequence_logps(logits, labels, backend="cuda")


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    def broken(kind, verbose=False):
        raise build.BuildError(f"building the {kind} extension failed: no compiler")

    monkeypatch.setattr(build, "load", broken)
    monkeypatch.setattr(kernels, "_warned", set())
    logits, labels = make_batch(74, 3, 4, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernels.sequence_logps(logits, labels)
        kernels.sequence_logps(logits, labels)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch reference" in messages[0]
    assert "no compiler" in messages[0]
    assert torch.equal(first[0], reference.sequence_logps(logits, labels)[0])
    assert kernels.resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(kernels.BackendUnavailableError, match="no compiler"):
        kernels.sequence_logps(logits, labels, backend="cpu")


def test_auto_picks_the_compiled_backend():
    assert kernels.resolve_backend("auto", "cpu") == "cpu"
    assert kernels.resolve_backend("reference", "cpu") == "reference"
    if HAS_GPU:
        assert kernels.resolve_backend("auto", "cuda") == "cuda"


def test_cuda_extension_compiles_and_loads():
    """Compiles (or loads from the cache) and loads the CUDA extension, GPU or not: every op
    then has a CUDA kernel."""
    possible, why = build.cuda_build_possible()
    if not possible:
        pytest.skip(why)
    build.load("cuda")
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rank_dpo::")]
    assert names
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


def test_build_command():
    """`python -m kernels --build` (cached by now) reports each backend and exits 0."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "kernels", "--build"], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "cpu: ready" in done.stdout and "matches the reference" in done.stdout
    assert "cuda: " in done.stdout


def test_build_command_fails_loudly(monkeypatch, capsys):
    """A failed build makes `python -m kernels --build` exit non-zero and say which one."""
    from kernels.__main__ import main

    def broken(kind, verbose=False):
        raise build.BuildError(f"building the {kind} extension failed: c++ not found")

    monkeypatch.setattr(build, "load", broken)
    assert main(["--build"]) == 1
    assert "cpu: BUILD FAILED" in capsys.readouterr().err
