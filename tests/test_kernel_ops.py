"""kernels/ops.py: the compiled ops as torch.library registers them (torch.ops.rank_dpo.*).

torch.library.opcheck on each op (its schema against what the kernel does, its fake kernel
against the real one, its autograd registration, and tracing it with AOTAutograd), then
torch.compile(fullgraph=True) through fused_chain_loss and fused_linear_chain_loss: one graph
holding the ops, and the eager loss and gradients. CPU only: the CUDA kernels are registered
under the same schema (tests/test_kernels.py checks that each op has one), but need a GPU to run.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import kernels
from test_kernels import CHAINS, make_batch, make_linear_batch

OPS = torch.ops.rank_dpo


@pytest.fixture(autouse=True)
def ops_loaded():
    kernels.ops.load("cpu")
    torch._dynamo.reset()  # each test's functions compile afresh, counted from zero


def _samples():
    """A small input for each op, by name."""
    logits, labels = make_batch(1, 3, 4, 10, dtype=torch.float64)
    _, _, lse = OPS.sequence_logps_forward(logits, labels, -100, False)
    grad_logps = torch.randn(3, dtype=torch.float64)
    samples = {
        "sequence_logps_forward": (OPS.sequence_logps_forward.default,
                                   (logits.clone().requires_grad_(), labels, -100, False)),
        "sequence_logps_forward_inplace_backward": (
            OPS.sequence_logps_forward.default,
            (logits.clone().requires_grad_(), labels, -100, True)),
        "sequence_logps_backward": (OPS.sequence_logps_backward.default,
                                    (logits, labels, lse, grad_logps, -100)),
        "sequence_logps_backward_": (OPS.sequence_logps_backward_.default,
                                     (logits.clone(), labels, lse, grad_logps, -100)),
        "chain_loss_forward": (OPS.chain_loss_forward.default,
                               (torch.randn(8, dtype=torch.float64, requires_grad=True),
                                torch.randint(0, 5, (8,)), torch.tensor(CHAINS),
                                torch.randn(8, dtype=torch.float64), 0, 0.5, 0.3)),
    }
    hidden, weight, bias, labels = make_linear_batch(3, 4, 5, 6, 11, torch.float64)
    hidden, labels = hidden.reshape(20, 6), labels.reshape(-1)
    _, _, rows, lse, _ = OPS.linear_logps_forward(hidden, weight, bias, labels, 5, -100, 3, False)
    grad_logps = torch.randn(4, dtype=torch.float64)
    trained = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    return samples | {
        "linear_logps_forward_trained_head": (OPS.linear_logps_forward.default,
                                              (*trained, labels, 5, -100, 3, False)),
        "linear_logps_forward_frozen_head": (
            OPS.linear_logps_forward.default,
            (hidden.clone().requires_grad_(), weight, bias, labels, 5, -100, 3, True)),
        "linear_logps_backward": (OPS.linear_logps_backward.default,
                                  (hidden, weight, bias, rows, labels[rows], lse, grad_logps, 5, 3,
                                   True, True, True)),
        "linear_logps_backward_hidden_only": (OPS.linear_logps_backward.default,
                                              (hidden, weight, None, rows, labels[rows], lse,
                                               grad_logps, 5, 3, True, False, False)),
    }


SAMPLES = ["sequence_logps_forward", "sequence_logps_forward_inplace_backward",
           "sequence_logps_backward", "sequence_logps_backward_", "chain_loss_forward",
           "linear_logps_forward_trained_head", "linear_logps_forward_frozen_head",
           "linear_logps_backward", "linear_logps_backward_hidden_only"]


@pytest.mark.parametrize("sample", SAMPLES)
def test_opcheck(sample):
    op, args = _samples()[sample]
    torch.library.opcheck(op, args)


def test_every_op_is_checked():
    samples = _samples()
    assert sorted(samples) == sorted(SAMPLES)
    declared = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rank_dpo::")}
    assert declared == {op._schema.name for op, _ in samples.values()}


def rank_dpo_ops_in(graphs):
    return {str(node.target) for gm in graphs for node in gm.graph.nodes
            if str(node.target).startswith("rank_dpo.")}


def test_compiled_fused_chain_loss_is_one_graph_with_the_eager_numbers():
    logits, labels = make_batch(7, 8, 11, 203)
    chains = torch.tensor(CHAINS)
    gen = torch.Generator().manual_seed(3)
    ref, weights = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def loss_fn(x):
        return kernels.fused_chain_loss(x, labels, chains, ref, "rank", beta=0.5, ntp_weight=0.3,
                                        backend="cpu")

    def run(fn):
        x = logits.clone().requires_grad_()
        loss, logps = fn(x)
        (loss + (logps * weights).sum()).backward()
        return loss.detach(), logps.detach(), x.grad

    counter = CompileCounterWithBackend("inductor")
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend=counter))
    assert counter.frame_count == 1
    assert rank_dpo_ops_in(counter.graphs) == {"rank_dpo.sequence_logps_forward",
                                               "rank_dpo.chain_loss_forward"}
    for got, expected in zip(compiled, run(loss_fn)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_compiled_fused_linear_chain_loss_is_one_graph_with_the_eager_numbers(head):
    """head=frozen: the forward's number of real tokens is known only at run time (the fake
    kernel's dynamic size) and the backward is the Python scaling of the kept token gradients."""
    hidden, weight, bias, labels = make_linear_batch(91, 8, 11, 24, 515)
    chains = torch.tensor(CHAINS)
    gen = torch.Generator().manual_seed(4)
    ref, weights = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def loss_fn(h, w, b):
        return kernels.fused_linear_chain_loss(h, w, labels, chains, ref, "rank", bias=b,
                                               chunk_tokens=7, backend="cpu")

    def run(fn):
        leaves = [x.clone().requires_grad_(head == "trained" or i == 0)
                  for i, x in enumerate((hidden, weight, bias))]
        loss, logps = fn(*leaves)
        (loss + (logps * weights).sum()).backward()
        return [loss.detach(), logps.detach()] + [x.grad for x in leaves if x.requires_grad]

    counter = CompileCounterWithBackend("inductor")
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend=counter))
    assert counter.frame_count == 1
    assert rank_dpo_ops_in(counter.graphs) == {"rank_dpo.linear_logps_forward",
                                               "rank_dpo.chain_loss_forward"}
    expected = run(loss_fn)
    assert len(compiled) == len(expected) == (5 if head == "trained" else 3)
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want)


def test_compiled_inplace_backward_takes_the_ordinary_backward():
    """Under torch.compile inplace_backward=True gives the same gradient without writing it
    over the logits (kernels/__init__.py says why)."""
    logits, labels = make_batch(61, 4, 6, 129)
    chains, ref = torch.tensor([[0, 1, 2], [3, 1, -1]]), torch.randn(4)

    def loss_fn(x):
        return kernels.fused_chain_loss(x, labels, chains, ref, backend="cpu",
                                        inplace_backward=True)[0]

    def run(fn):
        base = logits.clone().requires_grad_()
        buffer = base * 1
        fn(buffer).backward()
        return base.grad, buffer.detach()

    grad, buffer = run(torch.compile(loss_fn, fullgraph=True))
    grad_eager, buffer_eager = run(loss_fn)
    torch.testing.assert_close(grad, grad_eager)
    assert torch.equal(buffer, logits)        # compiled: the logits are left as they were
    assert torch.equal(buffer_eager, grad_eager)  # eager: the gradient was written over them
