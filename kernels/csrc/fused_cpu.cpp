// CPU twin of fused_cuda.cu: per-sequence log-probs of the labels, forward and backward,
// and the chain loss on the [B, K] rewards. Same three entry points, same arguments, same
// results (to rounding); registered as the CPU kernels of the rank_dpo ops (end of file).
//
// logits are [N, T, V] with any strides over N and T and stride 1 over V (a sliced view such
// as logits[:, :-1] is read in place, never copied). A row is one token's V logits.
//   forward:  (m, ls)[n,t] = (max, log sum exp(x - max)) of logits[n,t,:]: one read, online
//             logps[n] = sum over real t of (logits[n,t,label] - m) - ls
//   backward: grad[n,t,v] = g[n] * ([v == label] - exp((logits[n,t,v] - m) - ls))
//             m and ls are kept apart, not stored as one lse = m + ls: at logits near 1e4 an
//             fp32 lse would lose ~3e-4 to rounding, while x - m is exact there.
//             one more read and one write (optionally into the logits buffer itself);
//             rows whose label is ignore_index get 0 and are never read.
// Math in acc_t = at::opmath_type<scalar_t>: float for fp32/bf16/fp16 logits, double for fp64.
// All offsets are int64_t: N*T*V may pass 2^31.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace rank_dpo {
namespace {

// Compile the hot loops once per x86 ISA and pick one when the library loads, so a cached
// build stays valid if the extension cache is shared between different machines.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RD_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RD_MULTIVERSION
#endif

// A row is processed in chunks that stay in L1 between their max sweep and their exp sweep.
constexpr int64_t kChunk = 512;

// exp(x) for x <= 0 (all this file needs: x - max and x - lse), free of libm calls so the
// loops below vectorise. x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r)
// by its Taylor series to r^7/7! (truncation < 1e-8 relative, below float rounding), 2^n
// written into the exponent bits. Below -87 the result is 0, as for exp(-inf) (the true
// value is < 2e-38, far below anything a float sum over a vocabulary can resolve).
// NaN stays NaN.
inline float exp_nonpos(float x) {
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + kShift;
  uint32_t t_bits, shift_bits;
  std::memcpy(&t_bits, &t, 4);
  std::memcpy(&shift_bits, &kShift, 4);
  const float n = t - kShift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  const float p =
      1.f + r * (1.f + r * (1.f / 2 + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
      r * (1.f / 720 + r * (1.f / 5040)))))));
  const uint32_t scale_bits = (t_bits - shift_bits + 127u) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return x < -87.f ? 0.f : p * scale;
}

// The vectorised sweeps over a chunk (float), and their plain double versions.
RD_MULTIVERSION float chunk_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

RD_MULTIVERSION float chunk_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_nonpos(x[i] - shift);
  return s;
}

// out = -g * softmax = -g * exp((x - m) - ls); `out` may be `x` itself (the in-place option).
RD_MULTIVERSION void chunk_neg_softmax(const float* x, float* out, int64_t n, float m, float ls,
                                       float g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -g * exp_nonpos((x[i] - m) - ls);
}

double chunk_max(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double chunk_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

void chunk_neg_softmax(const double* x, double* out, int64_t n, double m, double ls, double g) {
  for (int64_t i = 0; i < n; ++i) out[i] = -g * std::exp((x[i] - m) - ls);
}

// A chunk of a row as acc_t values: the row itself when it already is acc_t, else converted
// into `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* x, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
    return buf;
  }
}

// log-sum-exp of one row, reading it once: each chunk's (max, sum) merges into the running
// pair. Writes (m, log s) to out[0], out[1].
template <typename scalar_t, typename acc_t>
void row_logsumexp(const scalar_t* row, int64_t V, acc_t* out) {
  acc_t buf[kChunk];
  acc_t m = -INFINITY, s = 0;
  for (int64_t i = 0; i < V; i += kChunk) {
    const int64_t n = std::min(kChunk, V - i);
    const acc_t* x = as_acc(row + i, n, buf);
    const acc_t cm = chunk_max(x, n);
    if (cm == -INFINITY) {  // only -inf (adds nothing) or NaN (which must not be lost)
      for (int64_t j = 0; j < n; ++j)
        if (x[j] != x[j]) s = NAN;
      continue;
    }
    lse_merge(m, s, cm, chunk_sum_exp(x, n, cm));
  }
  out[0] = m;
  out[1] = std::log(s);
}

// grad row = g * (onehot(label) - softmax(row)); `out` may alias `row`.
template <typename scalar_t, typename acc_t>
void row_grad(const scalar_t* row, scalar_t* out, int64_t V, int64_t label, acc_t m, acc_t ls,
              acc_t g) {
  // Read the target logit before any write: in place, `out` is `row`.
  const acc_t target = static_cast<acc_t>(row[label]);
  acc_t xbuf[kChunk], gbuf[kChunk];
  for (int64_t i = 0; i < V; i += kChunk) {
    const int64_t n = std::min(kChunk, V - i);
    const acc_t* x = as_acc(row + i, n, xbuf);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      chunk_neg_softmax(x, out + i, n, m, ls, g);
    } else {
      chunk_neg_softmax(x, gbuf, n, m, ls, g);
      for (int64_t j = 0; j < n; ++j) out[i + j] = static_cast<scalar_t>(gbuf[j]);
    }
  }
  out[label] = static_cast<scalar_t>(g - g * std::exp((target - m) - ls));
}

}  // namespace

// -> (logps [N] acc, counts [N] int64, lse [N, T, 2] acc: (max, log sum exp(x - max)) per row)
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_logps_forward(const at::Tensor& logits,
                                                                     const at::Tensor& labels,
                                                                     int64_t ignore_index) {
  check_sequence_layout(logits, labels);
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const int64_t sn = logits.stride(0), st = logits.stride(1);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  auto lse = at::empty({N, T, 2}, logits.options().dtype(acc_dtype));
  auto logps = at::empty({N}, logits.options().dtype(acc_dtype));
  auto counts = at::empty({N}, labels.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "sequence_logps_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* out = logps.data_ptr<acc_t>();
    // Pass 1: one log-sum-exp per real token, all N*T rows in parallel.
    at::parallel_for(0, N * T, std::max<int64_t>(1, at::internal::GRAIN_SIZE / V),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = lab[r];
        if (label == ignore_index) {
          lse_p[2 * r] = lse_p[2 * r + 1] = 0;
          continue;
        }
        TORCH_CHECK(label >= 0 && label < V, "labels[", r / T, ", ", r % T, "] = ", label,
                    " is outside the vocabulary [0, ", V, ") and is not ignore_index (",
                    ignore_index, ")");
        row_logsumexp<scalar_t, acc_t>(x + (r / T) * sn + (r % T) * st, V, lse_p + 2 * r);
      }
    });
    // Pass 2: per-sequence sums of logits[label] - lse (one gathered element per token).
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t sum = 0;
        int64_t count = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t label = lab[n * T + t];
          if (label == ignore_index) continue;
          const acc_t* ml = lse_p + 2 * (n * T + t);
          sum += (static_cast<acc_t>(x[n * sn + t * st + label]) - ml[0]) - ml[1];
          ++count;
        }
        out[n] = sum;
        cnt[n] = count;
      }
    });
  });
  return {logps, counts, lse};
}

// grad_logps [N] acc: d loss / d logps. Returns d loss / d logits, written into `logits`
// itself when inplace (the caller makes sure nothing else still needs them).
at::Tensor sequence_logps_backward(const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& grad_logps,
                                   int64_t ignore_index, bool inplace) {
  check_sequence_layout(logits, labels);
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_dtype && lse.is_contiguous() && lse.numel() == N * T * 2,
              "lse must be the contiguous [N, T, 2] tensor the forward returned");
  TORCH_CHECK(grad_logps.scalar_type() == acc_dtype && grad_logps.is_contiguous() &&
                  grad_logps.numel() == N,
              "grad_logps must be contiguous [N] of the forward's logps dtype");
  at::Tensor grad = inplace ? logits : at::empty({N, T, V}, logits.options());
  const int64_t sn = logits.stride(0), st = logits.stride(1);
  const int64_t gsn = grad.stride(0), gst = grad.stride(1);
  const int64_t* lab = labels.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "sequence_logps_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* g_out = grad.data_ptr<scalar_t>();
    const acc_t* lse_p = lse.data_ptr<acc_t>();
    const acc_t* g_seq = grad_logps.data_ptr<acc_t>();
    at::parallel_for(0, N * T, std::max<int64_t>(1, at::internal::GRAIN_SIZE / V),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / T, t = r % T;
        scalar_t* out = g_out + n * gsn + t * gst;
        if (lab[r] == ignore_index) {
          std::memset(out, 0, V * sizeof(scalar_t));  // all-zero bits are +0 in every dtype
          continue;
        }
        row_grad<scalar_t, acc_t>(x + n * sn + t * st, out, V, lab[r], lse_p[2 * r],
                                  lse_p[2 * r + 1], g_seq[n]);
      }
    });
  });
  return grad;
}

// logps [N], counts [N] int64, chains [B, K] int64 (-1 = padding), ref_logps [N] of logps'
// dtype. -> (loss [] mean over chains, d loss / d logps [N]).
std::tuple<at::Tensor, at::Tensor> chain_loss_forward(const at::Tensor& logps,
                                                      const at::Tensor& counts,
                                                      const at::Tensor& chains,
                                                      const at::Tensor& ref_logps,
                                                      int64_t objective, double beta,
                                                      double ntp_weight) {
  TORCH_CHECK(logps.dim() == 1 && logps.is_contiguous(), "logps must be contiguous [N]");
  TORCH_CHECK(ref_logps.sizes() == logps.sizes() && ref_logps.is_contiguous() &&
                  ref_logps.scalar_type() == logps.scalar_type(),
              "ref_logps must be contiguous [N] of logps' dtype");
  TORCH_CHECK(counts.sizes() == logps.sizes() && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous(), "counts must be contiguous int64 [N]");
  TORCH_CHECK(chains.dim() == 2 && chains.size(0) > 0 && chains.size(1) > 0 &&
                  chains.scalar_type() == at::kLong && chains.is_contiguous(),
              "chains must be contiguous int64 [B, K] with B, K >= 1");
  TORCH_CHECK(objective >= kRank && objective <= kSft, "unknown objective index ", objective);
  const int64_t N = logps.size(0), B = chains.size(0), K = chains.size(1);
  auto loss = at::empty({}, logps.options());
  auto dlogps = at::zeros_like(logps);
  const int64_t* ch = chains.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logps.scalar_type(), "chain_loss_forward_cpu", [&] {
    const scalar_t* lp = logps.data_ptr<scalar_t>();
    const scalar_t* ref = ref_logps.data_ptr<scalar_t>();
    scalar_t* dl = dlogps.data_ptr<scalar_t>();
    std::vector<scalar_t> d(K);
    scalar_t total = 0;
    // B*K is tiny: one thread, chains in order, so the result is deterministic.
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* chain = ch + b * K;
      for (int64_t k = 0; k < K; ++k)
        TORCH_CHECK(chain[k] >= -1 && chain[k] < N, "chains[", b, ", ", k, "] = ", chain[k],
                    " is neither a row index in [0, ", N, ") nor -1 (padding)");
      total += chain_loss_one<scalar_t>(chain, K, lp, ref, counts.data_ptr<int64_t>(),
                                        static_cast<int>(objective), static_cast<scalar_t>(beta),
                                        static_cast<scalar_t>(ntp_weight), d.data());
      for (int64_t k = 0; k < K; ++k)
        if (chain[k] >= 0) dl[chain[k]] += d[k] / static_cast<scalar_t>(B);
    }
    loss.fill_(total / static_cast<scalar_t>(B));
  });
  return {loss, dlogps};
}

}  // namespace rank_dpo

// The ops' signatures: schema.cpp; the table of kernels, shared with CUDA: register.cpp.
TORCH_LIBRARY_IMPL(rank_dpo, CPU, m) { rank_dpo::register_kernels(m); }
