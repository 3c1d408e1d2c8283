"""The compiled ops as torch sees them: torch.ops.rank_dpo.<name>, their fake kernels and the
autograd formulas of the three forward ops.

Each op's signature is declared once in C++ (csrc/schema.cpp, TORCH_LIBRARY) and each compiled
extension adds its device's kernels (csrc/register.cpp, TORCH_LIBRARY_IMPL). What the
dispatcher still needs comes from here, through torch.library: a fake kernel per op (the
outputs' shapes and dtypes without the data, what torch.compile traces with) and the backward
of sequence_logps_forward, chain_loss_forward and linear_logps_forward. With both, torch.compile
traces through the loss instead of breaking the graph there.

    ops.load("cpu")  # build or find the library, load it, register fakes and autograd
    logps, counts, lse = torch.ops.rank_dpo.sequence_logps_forward(logits, labels, -100, False)

The arguments are checked by kernels/__init__.py (and again, briefly, by the C++ kernels).
"""
from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from . import build

_registered = False
_lock = threading.Lock()


def load(backend: str) -> str:
    """Builds or finds and loads the library of backend "cpu" or "cuda" (kernels.build.load) and
    registers the fake kernels and autograd formulas, once per process; returns its path."""
    global _registered
    path = build.load(backend)
    with _lock:
        if not _registered:
            _register()
            _registered = True
    return path


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and return sums in: fp32 for fp32/bf16/fp16, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# Fake kernels: the outputs of each C++ kernel, shapes, dtypes and devices only.
# ----------------------------------------------------------------------------------------------

def _sequence_logps_forward_fake(logits, labels, ignore_index, inplace_backward):
    n, t, _ = logits.shape
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty(n, dtype=acc), labels.new_empty(n), logits.new_empty(n, t, 2, dtype=acc)


def _sequence_logps_backward_fake(logits, labels, lse, grad_logps, ignore_index):
    return logits.new_empty(logits.shape)


def _sequence_logps_backward_inplace_fake(logits, labels, lse, grad_logps, ignore_index):
    return None


def _chain_loss_forward_fake(logps, counts, chains, ref_logps, objective, beta, ntp_weight):
    return logps.new_empty(()), torch.empty_like(logps)


def _linear_logps_forward_fake(hidden, weight, bias, labels, T, ignore_index, chunk,
                               keep_token_grads):
    tokens, h = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    # R, the number of real tokens, depends on the labels' values: a size known only at run time.
    real = torch.library.get_ctx().new_dynamic_size()
    n = tokens // T
    return (hidden.new_empty(n, dtype=acc), labels.new_empty(n), labels.new_empty(real),
            hidden.new_empty(real, 2, dtype=acc),
            hidden.new_empty(real if keep_token_grads else 0, h))


def _linear_logps_backward_fake(hidden, weight, bias, rows, row_labels, lse, grad_logps, T, chunk,
                                need_hidden, need_weight, need_bias):
    acc = _acc_dtype(hidden.dtype)
    v, h = weight.shape
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            hidden.new_empty((v, h) if need_weight else (0,), dtype=acc),
            hidden.new_empty(v if need_bias else 0, dtype=acc))


# ----------------------------------------------------------------------------------------------
# Autograd formulas. The backward ops have no derivative of their own: once_differentiable makes
# a double backward fail loudly rather than run on without them.
# ----------------------------------------------------------------------------------------------

def _sequence_logps_setup(ctx, inputs, output):
    logits, labels, ignore_index, inplace_backward = inputs
    _, counts, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index, ctx.inplace_backward = ignore_index, inplace_backward
    ctx.mark_non_differentiable(counts, lse)


@once_differentiable
def _sequence_logps_backward(ctx, grad_logps, _grad_counts, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_logps = grad_logps.to(lse.dtype).contiguous()
    if not ctx.inplace_backward:
        return (torch.ops.rank_dpo.sequence_logps_backward(logits, labels, lse, grad_logps,
                                                           ctx.ignore_index),
                None, None, None)
    torch.ops.rank_dpo.sequence_logps_backward_(logits, labels, lse, grad_logps, ctx.ignore_index)
    # Any later use of the saved logits (by another node that saved them) now fails loudly.
    torch.autograd.graph.increment_version(logits)
    return logits, None, None, None


def _chain_loss_setup(ctx, inputs, output):
    """The [B, K] part is tiny, so the forward also returns d loss / d logps for the backward."""
    _, dlogps = output
    ctx.save_for_backward(dlogps)
    ctx.mark_non_differentiable(dlogps)


@once_differentiable
def _chain_loss_backward(ctx, grad_loss, _grad_dlogps):
    (dlogps,) = ctx.saved_tensors
    return grad_loss * dlogps, None, None, None, None, None, None


def _linear_logps_setup(ctx, inputs, output):
    """Saves hidden, weight and bias (which the caller holds anyway) and a few numbers per real
    token, not the logits. With keep_token_grads (a frozen head: only hidden needs a gradient, as
    under LoRA) the forward also made d logp_token / d hidden [R, H]: the backward then scales
    those rows and makes no logits again (2 matmuls in all instead of 3)."""
    hidden, weight, bias, labels, T, _, chunk, keep_token_grads = inputs
    _, counts, rows, lse, token_grads = output
    ctx.mark_non_differentiable(counts, rows, lse, token_grads)
    ctx.T, ctx.chunk, ctx.frozen_head, ctx.tokens = T, chunk, keep_token_grads, hidden.shape[0]
    if keep_token_grads:
        ctx.save_for_backward(rows, token_grads)
    else:
        ctx.save_for_backward(hidden, weight, bias, rows, labels, lse)


@once_differentiable
def _linear_logps_backward(ctx, grad_logps, *_grad_others):
    if ctx.frozen_head:
        rows, token_grads = ctx.saved_tensors
        scale = grad_logps.to(torch.promote_types(token_grads.dtype, torch.float32))
        sequence = rows.div(ctx.T, rounding_mode="floor")
        grad_rows = token_grads * scale.index_select(0, sequence)[:, None]
        grad_hidden = token_grads.new_zeros(ctx.tokens, token_grads.shape[1]).index_copy_(
            0, rows, grad_rows.to(token_grads.dtype))
        return grad_hidden, None, None, None, None, None, None, None
    hidden, weight, bias, rows, labels, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    gh, gw, gb = torch.ops.rank_dpo.linear_logps_backward(
        hidden, weight, bias, rows, labels.index_select(0, rows), lse, grad_logps.contiguous(),
        ctx.T, ctx.chunk, need_hidden, need_weight, need_bias)
    return (gh if need_hidden else None, gw.to(weight.dtype) if need_weight else None,
            gb.to(bias.dtype) if need_bias else None, None, None, None, None, None)


def _register():
    """torch.library looks each op up, so the library that declares them must be loaded first."""
    fake, autograd = torch.library.register_fake, torch.library.register_autograd
    fake("rank_dpo::sequence_logps_forward", _sequence_logps_forward_fake)
    fake("rank_dpo::sequence_logps_backward", _sequence_logps_backward_fake)
    fake("rank_dpo::sequence_logps_backward_", _sequence_logps_backward_inplace_fake)
    fake("rank_dpo::chain_loss_forward", _chain_loss_forward_fake)
    fake("rank_dpo::linear_logps_forward", _linear_logps_forward_fake)
    fake("rank_dpo::linear_logps_backward", _linear_logps_backward_fake)
    autograd("rank_dpo::sequence_logps_forward", _sequence_logps_backward,
             setup_context=_sequence_logps_setup)
    autograd("rank_dpo::chain_loss_forward", _chain_loss_backward, setup_context=_chain_loss_setup)
    autograd("rank_dpo::linear_logps_forward", _linear_logps_backward,
             setup_context=_linear_logps_setup)
