"""Pure-PyTorch specification of the ranking losses: the reference every backend must match.

Copy this file into your own code base if all you want is the losses; it needs only torch.

Notation (see docs/DESIGN.md, "What the method is"):
  * A *chain* is a list of responses ranked best first: y_0 > y_1 > ... > y_{K-1}.
  * logp_i = log pi(y_i | x), the SUM of the response's token log-probs under the policy;
    ref_i is the same under the frozen reference model.
  * r_i = beta * (logp_i - ref_i) is the implicit DPO reward.
  * Chains in a batch may differ in length: a boolean mask [B, K] marks real entries, and
    padding never enters a sum or a normaliser.

Every objective except "sft" adds ntp_weight * (mean token NLL of y_0): a small next-token
term on the best response that keeps generation from collapsing. The loss is the mean over chains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("rank", "dpo", "mpo", "hinge", "sft")


# ----------------------------------------------------------------------------------------------
# Losses on rewards [B, K] with a mask [B, K]; each returns one loss per chain, shape [B].
# ----------------------------------------------------------------------------------------------

def rank_loss(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of the whole ranking (best first).

    P(y_0 > y_1 > ... ) = prod_i exp(r_i) / sum_{j >= i} exp(r_j), so
    loss = -sum_i ( r_i - logsumexp_{j >= i} r_j ), a suffix log-sum-exp.
    Only real entries take part: padding is -inf inside the log-sum-exp. The last real term
    is r_last - r_last = 0, so a chain of one response contributes nothing.
    """
    masked = rewards.masked_fill(~mask, float("-inf"))
    # suffix logsumexp: flip, running logcumsumexp from the left, flip back
    suffix_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(mask, rewards - suffix_lse, torch.zeros_like(rewards))
    return -terms.sum(-1)


def dpo_loss(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry DPO on the top two responses: -log sigmoid(r_0 - r_1).

    A chain with fewer than two real responses has no pair and contributes 0.
    """
    if rewards.shape[-1] < 2:  # K = 1: no chain can have a pair
        return torch.zeros_like(rewards[:, 0])
    has_pair = mask[:, 0] & mask[:, 1]
    margin = rewards[:, 0] - rewards[:, 1]
    return torch.where(has_pair, -F.logsigmoid(margin), torch.zeros_like(margin))


def mpo_loss(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y_0 against all other real responses at once, their order discarded:
    -log( exp(r_0) / sum_{j} exp(r_j) ) = -(r_0 - logsumexp_j r_j).

    This is the first Plackett-Luce term alone (one positive, a set of negatives).
    A chain of one response contributes 0.
    """
    masked = rewards.masked_fill(~mask, float("-inf"))
    loss = torch.logsumexp(masked, dim=-1) - rewards[:, 0]
    return torch.where(mask[:, 0], loss, torch.zeros_like(loss))


def hinge_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Margin-free pairwise hinge: sum over real pairs i < j of max(0, s_j - s_i).

    `scores` are the policy's sequence log-probs (not rewards): every better response
    should score at least as high as every worse one.
    """
    diff = scores.unsqueeze(1) - scores.unsqueeze(2)          # diff[b, i, j] = s_j - s_i
    k = scores.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1)   # i < j
    pairs = upper & mask.unsqueeze(2) & mask.unsqueeze(1)
    return torch.where(pairs, diff.clamp_min(0), torch.zeros_like(diff)).sum((-2, -1))


# ----------------------------------------------------------------------------------------------
# From logits: per-sequence log-probs, then the chain loss.
# ----------------------------------------------------------------------------------------------

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Sum of log pi(label_t) over the real tokens of each sequence.

    logits [N, T, V] (bf16/fp16/fp32 are computed in fp32, fp64 in fp64), labels [N, T]
    int64, already aligned: logits[n, t] scores labels[n, t] (the caller shifts). Tokens
    whose label is ignore_index (prompt, padding) are left out.
    Returns (logps [N] fp32 (fp64 for fp64 logits), counts [N] int64 number of real tokens).
    """
    real = labels != ignore_index
    safe_labels = labels.masked_fill(~real, 0)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logprobs = torch.log_softmax(logits.to(compute_dtype), dim=-1)
    token_logps = logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(real, token_logps, torch.zeros_like(token_logps)).sum(-1)
    return logps, real.sum(-1)


def chain_loss(logps: torch.Tensor, counts: torch.Tensor, chains: torch.Tensor,
               ref_logps: torch.Tensor, objective: str = "rank", beta: float = 0.1,
               ntp_weight: float = 0.1) -> torch.Tensor:
    """The training loss from per-sequence log-probs.

    logps [N], counts [N], ref_logps [N] (no gradient); chains [B, K] int64 holds row
    indices into N, best first, -1 = padding. Returns a scalar: the mean over chains.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    mask = chains >= 0
    rows = chains.clamp_min(0)
    policy = logps[rows]                                     # [B, K]
    # NTP on y_0: mean token NLL; a response with no real tokens contributes 0
    best = rows[:, 0]
    ntp = -logps[best] / counts[best].clamp_min(1).to(logps.dtype)
    ntp = torch.where(mask[:, 0], ntp, torch.zeros_like(ntp))
    if objective == "sft":
        return ntp.mean()
    if objective == "hinge":
        pref = hinge_loss(policy, mask)
    else:
        rewards = beta * (policy - ref_logps.detach()[rows])
        pref = {"rank": rank_loss, "dpo": dpo_loss, "mpo": mpo_loss}[objective](rewards, mask)
    return (pref + ntp_weight * ntp).mean()


def fused_chain_loss(logits: torch.Tensor, labels: torch.Tensor, chains: torch.Tensor,
                     ref_logps: torch.Tensor, objective: str = "rank", beta: float = 0.1,
                     ntp_weight: float = 0.1, ignore_index: int = -100):
    """Reference for the fused op: sequence_logps then chain_loss.

    Returns (loss scalar, logps [N] fp32). Gradients reach `logits` through both.
    """
    logps, counts = sequence_logps(logits, labels, ignore_index)
    loss = chain_loss(logps, counts, chains, ref_logps, objective, beta, ntp_weight)
    return loss, logps


# ----------------------------------------------------------------------------------------------
# From hidden states: the LM head, then the above. (The compiled backends never make the whole
# [N, T, V] logits; this specification does, to be obviously right.)
# ----------------------------------------------------------------------------------------------

def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = -100):
    """sequence_logps of the LM head's logits: hidden [N, T, H] (hidden[n, t] scores
    labels[n, t]), weight [V, H] (e.g. lm_head.weight), bias [V] or None."""
    return sequence_logps(F.linear(hidden, weight, bias), labels, ignore_index)


def fused_linear_chain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chains: torch.Tensor, ref_logps: torch.Tensor, objective: str = "rank",
                            beta: float = 0.1, ntp_weight: float = 0.1,
                            bias: torch.Tensor | None = None, ignore_index: int = -100):
    """fused_chain_loss of the LM head's logits. Returns (loss scalar, logps [N])."""
    return fused_chain_loss(F.linear(hidden, weight, bias), labels, chains, ref_logps, objective,
                            beta, ntp_weight, ignore_index)
