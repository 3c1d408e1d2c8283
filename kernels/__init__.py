"""kernels: the fused per-sequence log-prob + ranking-loss op.

    logps, counts = kernels.sequence_logps(logits, labels, ignore_index=-100, backend="auto")
    loss, logps = kernels.fused_chain_loss(logits, labels, chains, ref_logps, objective="rank",
                                           beta=0.1, ntp_weight=0.1, ignore_index=-100,
                                           backend="auto")

From hidden states, the LM head fused in (the [N, T, V] logits are never made, a chunk of
tokens at a time instead):

    loss, logps = kernels.fused_linear_chain_loss(hidden, lm_head.weight, labels, chains,
                                                  ref_logps, objective="rank", bias=None)
    logps, counts = kernels.fused_linear_sequence_logps(hidden, lm_head.weight, labels)

logits [N, T, V] (fp32/bf16/fp16/fp64) score labels [N, T] int64 (logits[n, t] scores
labels[n, t]: the caller shifts; ignore_index marks prompt and padding). chains [B, K] int64
hold row indices into N, best first, -1 as padding at the tail. `kernels.reference` is the
pure-PyTorch specification every backend matches; see README.md (kernels) for the method.

Backends: "cpu" and "cuda" are the compiled C++/CUDA extensions (kernels/csrc, built JIT by
kernels/build.py); "reference" is kernels/reference.py; "auto" takes "cuda" for CUDA tensors
and "cpu" otherwise, and falls back to the reference, with one warning, when the extension
cannot be compiled here. The compiled ops are registered with torch.library (kernels/ops.py):
each signature declared once in C++, one kernel per device, fake kernels and autograd formulas
in Python, so torch.compile traces through them (fullgraph) instead of breaking the graph.

The compiled forward reads the logits once and keeps 2 numbers per token (max and log-sum-exp of
the rest, fp32: 8 bytes; fp64 logits: 16); the
backward reads them once more and writes the gradient once. Nothing of size [N, T, V] is
allocated but the gradient itself, and with inplace_backward=True not even that: the gradient
is written over the logits. That is safe when nothing else needs the logits after this loss
(the usual case: they come from the LM head, whose backward needs its input and weight, not
its output). If another autograd node did save them, its backward raises torch's "modified
by an inplace operation" error rather than computing a wrong gradient. Under torch.compile the
option is ignored (the gradient goes to a new tensor, same numbers): see _compiled_sequence_logps.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import ops, reference
from .build import BuildError
from .reference import OBJECTIVES

__all__ = ["sequence_logps", "fused_chain_loss", "fused_linear_sequence_logps",
           "fused_linear_chain_loss", "resolve_backend", "reference", "OBJECTIVES",
           "BACKENDS", "BackendUnavailableError", "BuildError"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot be used for these tensors on this machine."""


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   backend: str = "auto", inplace_backward: bool = False):
    """Per-sequence sums of the labels' log-probs: (logps [N], counts [N] int64).

    logps are fp32 (fp64 for fp64 logits) and carry the gradient; counts are the numbers of
    real (non-ignored) tokens. A sequence with no real token has logp 0 and count 0.
    """
    _check_sequence_args(logits, labels, ignore_index)
    if not _use_compiled(backend, logits.device):
        return reference.sequence_logps(logits, labels, ignore_index)
    return _compiled_sequence_logps(logits, labels, ignore_index, inplace_backward)


def fused_chain_loss(logits: torch.Tensor, labels: torch.Tensor, chains: torch.Tensor,
                     ref_logps: torch.Tensor, objective: str = "rank", beta: float = 0.1,
                     ntp_weight: float = 0.1, ignore_index: int = -100, backend: str = "auto",
                     inplace_backward: bool = False):
    """The chain loss straight from the logits: (loss scalar, logps [N]).

    Same value and gradients as kernels.reference.fused_chain_loss (loss = mean over chains;
    gradients reach the logits through both outputs). ref_logps [N] carry no gradient and
    are cast to the logps' dtype (fp32, or fp64 for fp64 logits).
    """
    _check_sequence_args(logits, labels, ignore_index)
    _check_chain_args(logits, chains, ref_logps, objective, beta, ntp_weight)
    if not _use_compiled(backend, logits.device):
        return reference.fused_chain_loss(logits, labels, chains, ref_logps, objective, beta,
                                          ntp_weight, ignore_index)
    logps, counts = _compiled_sequence_logps(logits, labels, ignore_index, inplace_backward)
    loss = _compiled_chain_loss(logps, counts, chains, ref_logps, objective, beta, ntp_weight)
    return loss, logps


def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor,
                                labels: torch.Tensor, bias: torch.Tensor | None = None,
                                ignore_index: int = -100, chunk_tokens: int | None = None,
                                backend: str = "auto"):
    """sequence_logps of the logits F.linear(hidden, weight, bias), never materialised.

    hidden [N, T, H] is aligned like the logits it replaces (hidden[n, t] scores labels[n, t]),
    weight [V, H] (lm_head.weight; tied embeddings are fine), bias [V] or None, all one dtype.
    The compiled backends make the logits of `chunk_tokens` real tokens at a time (default:
    about 2**25 logits per chunk) and free them; the backward makes them again, unless the head
    is frozen (only hidden requires grad): then the forward keeps each real token's
    d logp / d hidden and the backward makes no logits. Gradients reach hidden, weight and
    bias. Returns (logps [N], counts [N] int64).
    """
    _check_linear_args(hidden, weight, bias, labels, ignore_index, chunk_tokens)
    if not _use_compiled(backend, hidden.device):
        return reference.linear_sequence_logps(hidden, weight, labels, bias, ignore_index)
    return _compiled_linear_sequence_logps(hidden, weight, bias, labels, ignore_index,
                                           chunk_tokens)


def fused_linear_chain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chains: torch.Tensor, ref_logps: torch.Tensor, objective: str = "rank",
                            beta: float = 0.1, ntp_weight: float = 0.1,
                            bias: torch.Tensor | None = None, ignore_index: int = -100,
                            chunk_tokens: int | None = None, backend: str = "auto"):
    """fused_chain_loss of the logits F.linear(hidden, weight, bias), never materialised:
    (loss scalar, logps [N]). Arguments as in fused_linear_sequence_logps and fused_chain_loss.
    Peak extra memory is O(chunk_tokens x V) whatever the number of tokens.
    """
    _check_linear_args(hidden, weight, bias, labels, ignore_index, chunk_tokens)
    _check_chain_args(hidden, chains, ref_logps, objective, beta, ntp_weight)
    if not _use_compiled(backend, hidden.device):
        return reference.fused_linear_chain_loss(hidden, weight, labels, chains, ref_logps,
                                                 objective, beta, ntp_weight, bias, ignore_index)
    logps, counts = _compiled_linear_sequence_logps(hidden, weight, bias, labels, ignore_index,
                                                    chunk_tokens)
    loss = _compiled_chain_loss(logps, counts, chains, ref_logps, objective, beta, ntp_weight)
    return loss, logps


def _frozen_head(hidden, weight, bias) -> bool:
    """Only hidden will need a gradient (the head frozen, as under LoRA): the forward then keeps
    d logp / d hidden per real token (kernels/ops.py). Decided here: inside the op, grad mode
    is always off."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad))


# Logits per chunk when chunk_tokens is not given: 2**25 (128 MB in fp32): 1048 tokens at
# V = 32000, 220 at V = 151936; enough rows for the matmul to run at full speed.
DEFAULT_CHUNK_LOGITS = 1 << 25


def _chunk(chunk_tokens, weight) -> int:
    if chunk_tokens is not None:
        return chunk_tokens
    return max(16, min(8192, DEFAULT_CHUNK_LOGITS // weight.shape[0]))


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that will run for tensors on `device`: "reference", "cpu" or "cuda".

    Builds the extension if needed; raises BackendUnavailableError where an explicitly named
    backend cannot be had; "auto" falls back to "reference" (with one warning).
    """
    device = torch.device(device)
    if not _use_compiled(backend, device):
        return "reference"
    return "cuda" if device.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------------------------
# Calls of the compiled ops (kernels/ops.py: their fake kernels and autograd formulas)
# ----------------------------------------------------------------------------------------------

def _compiled_sequence_logps(logits, labels, ignore_index, inplace_backward):
    logits, labels = _prepare(logits, labels, inplace_backward)
    # Under torch.compile the gradient goes to a new tensor (same numbers, one [N, T, V] tensor
    # more): a compiled backward that overwrote the logits would skip the version check that
    # makes eager mode fail loudly when another node saved them, and give that node's backward
    # the gradient instead of the logits, silently.
    inplace_backward = inplace_backward and not torch.compiler.is_compiling()
    logps, counts, _ = torch.ops.rank_dpo.sequence_logps_forward(logits, labels, ignore_index,
                                                                 inplace_backward)
    return logps, counts


def _compiled_linear_sequence_logps(hidden, weight, bias, labels, ignore_index, chunk_tokens):
    n, t, h = hidden.shape
    logps, counts, *_ = torch.ops.rank_dpo.linear_logps_forward(
        hidden.reshape(n * t, h), weight, bias, labels.reshape(-1).contiguous(), t, ignore_index,
        _chunk(chunk_tokens, weight), _frozen_head(hidden, weight, bias))
    return logps, counts


def _compiled_chain_loss(logps, counts, chains, ref_logps, objective, beta, ntp_weight):
    ref = ref_logps.detach().to(logps.dtype).contiguous()
    loss, _ = torch.ops.rank_dpo.chain_loss_forward(logps, counts, chains.contiguous(), ref,
                                                    OBJECTIVES.index(objective), float(beta),
                                                    float(ntp_weight))
    return loss


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------

_warned: set[str] = set()


# torch.compile calls this while tracing (it cannot trace the build and its lock) and bakes the
# answer, op or reference, into the graph: safe, as it does not change within a process (builds
# and failures are cached).
@torch.compiler.assume_constant_result
def _use_compiled(backend: str, device: torch.device) -> bool:
    """Whether the compiled op serves tensors on `device` (its library loaded), or the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    kind = "cuda" if device.type == "cuda" else "cpu"
    if backend == "auto" and device.type not in ("cpu", "cuda"):
        return False  # mps, xpu, meta...: only the reference runs there
    if backend != "auto" and backend != device.type:
        raise BackendUnavailableError(
            f"backend={backend!r} needs {backend} tensors, but logits are on {device}")
    try:
        ops.load(kind)
    except BuildError as e:
        if backend != "auto":
            raise BackendUnavailableError(f"backend={backend!r} is not available: {e}") from e
        if kind not in _warned:
            _warned.add(kind)
            first = str(e).strip().splitlines()[0][:300]
            warnings.warn(
                f"kernels: the {kind} extension could not be built ({first}); using the "
                "pure-PyTorch reference instead, which materialises fp32 log-probs of the "
                "whole [N, T, V] logits. `python -m kernels --build --verbose` shows why.",
                RuntimeWarning, stacklevel=4)
        return False
    return True


def _prepare(logits, labels, inplace):
    """The layouts the extension reads: stride 1 over V (any strides over N and T, so a view
    like logits[:, :-1] is not copied) and contiguous labels."""
    if logits.stride(-1) != 1:
        if logits.shape[-1] == 1:
            # V = 1 (e.g. a transposed view): contiguous() keeps a size-1 dimension's stride,
            # which need not be 1; with one element per row any stride over V reads the same.
            logits = logits.as_strided(logits.shape, (*logits.stride()[:2], 1),
                                       logits.storage_offset())
        else:
            logits = logits.contiguous()
    if inplace and _rows_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose rows do not share memory; got shape "
            f"{tuple(logits.shape)} with strides {logits.stride()} (an expanded tensor?)")
    return logits, labels.contiguous()


def _rows_overlap(logits) -> bool:
    """Whether two token rows of a [N, T, V] tensor with stride 1 over V share memory."""
    dims = sorted((logits.stride(d), logits.shape[d]) for d in (0, 1) if logits.shape[d] > 1)
    span = logits.shape[2]  # elements one row occupies
    for stride, size in dims:
        if stride < span:
            return True
        span = stride * size
    return False


# ----------------------------------------------------------------------------------------------
# Argument checks: the same for every backend, so a mistake reads the same everywhere.
# Value checks (labels in the vocabulary, chain indices in range) need the data: done here
# for CPU tensors; for CUDA tensors the kernels check them with a device-side assert, as
# torch's own gather / cross_entropy do, instead of a host sync on every call. Under
# torch.compile they are skipped too (a branch on the data would break the graph): there the
# kernels' own checks raise instead (RuntimeError on the CPU).
# ----------------------------------------------------------------------------------------------

def _checks_values(tensor) -> bool:
    """Whether the value checks read this tensor's data here (see above)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_sequence_args(logits, labels, ignore_index):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"logits must be a [N, T, V] tensor of dtype float32, bfloat16, float16 or float64; "
            f"got {_describe(logits)}")
    _check_labels(labels, logits.shape, logits.device, ignore_index, "logits")


def _check_labels(labels, shape, device, ignore_index, what):
    """labels [N, T] int64 against scores of shape [N, T, V] (`what`: logits or hidden)."""
    vocab = shape[2]
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor [N, T]; got {_describe(labels)}")
    if tuple(labels.shape) != tuple(shape[:2]):
        raise ValueError(f"labels must have shape [N, T] = {list(shape[:2])} to match "
                         f"{what} {list(shape)}; got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {what} on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int; got {ignore_index!r}")
    if _checks_values(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            n, t = bad.nonzero()[0].tolist()
            raise ValueError(f"labels[{n}, {t}] = {labels[n, t].item()} is outside the "
                             f"vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")


def _check_linear_args(hidden, weight, bias, labels, ignore_index, chunk_tokens):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"hidden must be a [N, T, H] tensor of dtype float32, bfloat16, float16 or float64; "
            f"got {_describe(hidden)}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2
            or weight.shape[1] != hidden.shape[2] or weight.dtype != hidden.dtype):
        raise ValueError(f"weight must be the LM head's [V, H] = [V, {hidden.shape[2]}] of "
                         f"hidden's dtype {hidden.dtype}; got {_describe(weight)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != weight.dtype or bias.device != weight.device):
        raise ValueError(f"bias must be None or [V] = [{weight.shape[0]}] of weight's dtype "
                         f"and device; got {_describe(bias)}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                     or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be None or a positive int; got {chunk_tokens!r}")
    n, t, _ = hidden.shape
    _check_labels(labels, (n, t, weight.shape[0]), hidden.device, ignore_index, "hidden")


def _check_chain_args(logits, chains, ref_logps, objective, beta, ntp_weight):
    n = logits.shape[0]
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if not isinstance(chains, torch.Tensor) or chains.dtype != torch.int64 or chains.dim() != 2:
        raise ValueError(f"chains must be an int64 tensor [B, K]; got {_describe(chains)}")
    if chains.shape[0] == 0 or chains.shape[1] == 0:
        raise ValueError(f"chains must hold at least one chain of at least one entry; got "
                         f"shape {list(chains.shape)}")
    if chains.device != logits.device:
        raise ValueError(f"chains are on {chains.device} but logits on {logits.device}")
    if (not isinstance(ref_logps, torch.Tensor) or not ref_logps.is_floating_point()
            or tuple(ref_logps.shape) != (n,)):
        raise ValueError(f"ref_logps must be a floating tensor [N] = [{n}]; got "
                         f"{_describe(ref_logps)}")
    if ref_logps.device != logits.device:
        raise ValueError(f"ref_logps are on {ref_logps.device} but logits on {logits.device}")
    for name, value in (("beta", beta), ("ntp_weight", ntp_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    if _checks_values(chains):
        bad = (chains < -1) | (chains >= n)
        if bad.any():
            b, k = bad.nonzero()[0].tolist()
            raise ValueError(f"chains[{b}, {k}] = {chains[b, k].item()} is neither a row index "
                             f"in [0, {n}) nor -1 (padding)")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)}, dtype {x.dtype}"
    return f"{type(x).__name__}"
