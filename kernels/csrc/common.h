// The small math the CPU (fused_cpu.cpp) and CUDA (fused_cuda.cu) twins share, so the two can
// never disagree on it: merging partial log-sum-exps, and one chain's loss with its gradient.
// Everything here is plain arithmetic that compiles for the host and, under nvcc, the device.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RD_HD __host__ __device__ __forceinline__
#else
#define RD_HD inline
#endif

namespace rank_dpo {

// Same order as kernels.reference.OBJECTIVES; Python passes the index.
enum Objective : int { kRank = 0, kDpo = 1, kMpo = 2, kHinge = 3, kSft = 4 };

RD_HD float rd_exp(float x) { return expf(x); }
RD_HD double rd_exp(double x) { return exp(x); }
RD_HD float rd_log(float x) { return logf(x); }
RD_HD double rd_log(double x) { return log(x); }
RD_HD float rd_log1p(float x) { return log1pf(x); }
RD_HD double rd_log1p(double x) { return log1p(x); }

// A log-sum-exp kept as (max, sum of exp(x - max)) so it can be built in pieces.
// Merges (m2, s2) into (m, s). Two empty pieces (max = -inf) do not compute
// exp(-inf - -inf) = NaN: their sums are 0, or NaN if a NaN was seen, which must survive.
template <typename T>
RD_HD void lse_merge(T& m, T& s, T m2, T s2) {
  const T big = m > m2 ? m : m2;
  if (big == -INFINITY) {
    s += s2;
    return;
  }
  s = s * rd_exp(m - big) + s2 * rd_exp(m2 - big);
  m = big;
}

// log-sum-exp of beta * (logps[row] - ref[row]) over the real entries of chain[from..K).
template <typename T>
RD_HD T suffix_lse(const int64_t* chain, int64_t K, int64_t from, const T* logps, const T* ref,
                   T beta) {
  T m = -INFINITY;
  for (int64_t j = from; j < K; ++j) {
    if (chain[j] < 0) continue;
    const T r = beta * (logps[chain[j]] - ref[chain[j]]);
    m = r > m ? r : m;
  }
  T s = 0;
  for (int64_t j = from; j < K; ++j) {
    if (chain[j] < 0) continue;
    s += rd_exp(beta * (logps[chain[j]] - ref[chain[j]]) - m);
  }
  return m + rd_log(s);
}

// One chain's loss (before the mean over chains) and, in d[0..K), d loss / d logp of the row
// at each chain position. chain[k] is a row index, -1 for padding; logps, ref and counts are
// indexed by row. The formulas are those of kernels/reference.py, differentiated by hand:
//   rank   loss = sum_{i real} (S_i - r_i),  S_i = logsumexp_{j >= i, real} r_j
//          d r_j = -1 + sum_{i real, i <= j} exp(r_j - S_i)
//   dpo    loss = softplus(-(r_0 - r_1)),  d r_0 = -sigmoid(r_1 - r_0) = -d r_1
//   mpo    loss = S_0 - r_0,  d r_j = exp(r_j - S_0) - [j == 0]
//   hinge  loss = sum_{i < j real} max(0, s_j - s_i) on s = logp (a tie gets no gradient,
//          as torch's clamp_min gives none at 0)
// with d logp = beta * d r, plus w * (-logp_0 / max(count_0, 1)) for the NTP term
// (w = ntp_weight, or 1 for sft).
template <typename T>
RD_HD T chain_loss_one(const int64_t* chain, int64_t K, const T* logps, const T* ref,
                       const int64_t* counts, int objective, T beta, T ntp_weight, T* d) {
  for (int64_t k = 0; k < K; ++k) d[k] = 0;
  T loss = 0;
  const bool first_real = chain[0] >= 0;
  switch (objective) {
    case kRank:
      for (int64_t i = 0; i < K; ++i) {
        if (chain[i] < 0) continue;
        const T s_i = suffix_lse(chain, K, i, logps, ref, beta);
        loss += s_i - beta * (logps[chain[i]] - ref[chain[i]]);
        d[i] -= beta;
        for (int64_t j = i; j < K; ++j) {
          if (chain[j] < 0) continue;
          d[j] += beta * rd_exp(beta * (logps[chain[j]] - ref[chain[j]]) - s_i);
        }
      }
      break;
    case kDpo:
      if (K >= 2 && first_real && chain[1] >= 0) {
        const T margin = beta * (logps[chain[0]] - ref[chain[0]]) -
                         beta * (logps[chain[1]] - ref[chain[1]]);
        // -log sigmoid(margin), in the form that stays finite for large |margin|
        loss += margin > 0 ? rd_log1p(rd_exp(-margin)) : -margin + rd_log1p(rd_exp(margin));
        const T p = T(1) / (T(1) + rd_exp(margin));  // sigmoid(-margin)
        d[0] -= beta * p;
        d[1] += beta * p;
      }
      break;
    case kMpo:
      if (first_real) {
        const T s_0 = suffix_lse(chain, K, 0, logps, ref, beta);
        loss += s_0 - beta * (logps[chain[0]] - ref[chain[0]]);
        d[0] -= beta;
        for (int64_t j = 0; j < K; ++j) {
          if (chain[j] < 0) continue;
          d[j] += beta * rd_exp(beta * (logps[chain[j]] - ref[chain[j]]) - s_0);
        }
      }
      break;
    case kHinge:
      for (int64_t i = 0; i < K; ++i) {
        if (chain[i] < 0) continue;
        for (int64_t j = i + 1; j < K; ++j) {
          if (chain[j] < 0) continue;
          const T diff = logps[chain[j]] - logps[chain[i]];
          if (diff > 0) {
            loss += diff;
            d[j] += 1;
            d[i] -= 1;
          }
        }
      }
      break;
    default:  // kSft: the NTP term alone
      break;
  }
  if (first_real) {
    const T w = objective == kSft ? T(1) : ntp_weight;
    const int64_t c = counts[chain[0]] > 1 ? counts[chain[0]] : 1;
    loss += w * (-logps[chain[0]] / T(c));
    d[0] -= w / T(c);
  }
  return loss;
}

}  // namespace rank_dpo
