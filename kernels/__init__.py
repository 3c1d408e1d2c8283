"""kernels: the fused per-sequence log-prob + ranking-loss op.

Public API (other code relies on these names):
    logps, counts = kernels.sequence_logps(logits, labels, ignore_index=-100, backend="auto")
    loss, logps = kernels.fused_chain_loss(logits, labels, chains, ref_logps, objective="rank",
                                           beta=0.1, ntp_weight=0.1, ignore_index=-100,
                                           backend="auto")
`kernels.reference` is the pure-PyTorch specification.

NOTE: bootstrap version: only the reference backend is wired up so far (issue 2 adds the
C++ and CUDA backends behind the same names).
"""
from . import reference
from .reference import OBJECTIVES


def sequence_logps(logits, labels, ignore_index=-100, backend="auto"):
    return reference.sequence_logps(logits, labels, ignore_index)


def fused_chain_loss(logits, labels, chains, ref_logps, objective="rank", beta=0.1,
                     ntp_weight=0.1, ignore_index=-100, backend="auto"):
    return reference.fused_chain_loss(logits, labels, chains, ref_logps, objective, beta,
                                      ntp_weight, ignore_index)
