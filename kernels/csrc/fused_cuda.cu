// CUDA twin of fused_cpu.cpp: same three entry points, same arguments, same results (to
// rounding). Read the CPU file first; this one adds only what the GPU needs.
//
//   forward   lse_kernel:        one block per token row, 16-byte vector loads, per-thread
//                                online (max, sum), warp-shuffle + shared-memory merge
//             seq_sum_kernel:    one block per sequence: sum of logits[label] - lse over its
//                                real tokens (one gathered element per token), fixed-order
//                                tree reduction, so results are deterministic
//   backward  grad_kernel:       one block per token row: one vector read, one vector write
//   loss      chain_loss_kernel: one block; a thread per chain, then thread 0 sums in order
// The row kernels are memory-bound: fwd + bwd move the logits three times (read, read, write)
// and allocate 2 acc values per token ((max, log sum exp(x - max)): 8 bytes, 16 for fp64
// logits) beyond the gradient, none with the in-place option. The pair is kept apart, not
// summed into one lse, so that x - max stays exact at large logits (see fused_cpu.cpp).
// Rows need not start on a 16-byte boundary: a scalar head reaches the first one, then the
// vector loop, then a scalar tail.
// All offsets are int64_t: N*T*V may pass 2^31.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common.h"
#include "ops.h"

namespace rank_dpo {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

// 16 bytes of logits: the widest load a thread can issue (8 bf16/fp16, 4 fp32, 2 fp64).
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// exp(x - shift): for float, exp2f of the difference scaled by log2(e), which compiles to the
// hardware's fast exp2 (MUFU.EX2, 2 ulp) plus two flops; the subtraction comes first, so no
// accuracy is lost to large logits. For double, exp.
__device__ __forceinline__ float exp_sub(float x, float shift) {
  return exp2f((x - shift) * 1.4426950408889634f);
}
__device__ __forceinline__ double exp_sub(double x, double shift) { return exp(x - shift); }

// Fold n values into this thread's running (max, sum of exp(x - max)): one rescale per call,
// not per element. As on the CPU, values that are all -inf add nothing and a NaN is kept.
template <typename acc_t, int n>
__device__ __forceinline__ void lse_add(const acc_t (&x)[n], acc_t& m, acc_t& s) {
  acc_t local_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < n; ++j) local_max = x[j] > local_max ? x[j] : local_max;
  if (local_max == -INFINITY) {
#pragma unroll
    for (int j = 0; j < n; ++j)
      if (x[j] != x[j]) s = NAN;
    return;
  }
  if (local_max > m) {
    s *= exp_sub(m, local_max);  // m = -inf at the start: exp(-inf) = 0
    m = local_max;
  }
#pragma unroll
  for (int j = 0; j < n; ++j) s += exp_sub(x[j], m);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void lse_add_pack(const Pack<scalar_t>& p, acc_t& m, acc_t& s) {
  acc_t x[Pack<scalar_t>::kSize];
#pragma unroll
  for (int j = 0; j < Pack<scalar_t>::kSize; ++j) x[j] = static_cast<acc_t>(p.v[j]);
  lse_add(x, m, s);
}

// Merge every thread's (m, s) into thread 0's; the result is valid in thread 0 only.
template <typename acc_t>
__device__ void block_lse_merge(acc_t& m, acc_t& s) {
  __shared__ acc_t sm_m[kMaxThreads / kWarp], sm_s[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2)
    lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    m = lane < warps ? sm_m[lane] : acc_t(-INFINITY);
    s = lane < warps ? sm_s[lane] : acc_t(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2)
      lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  __syncthreads();  // the shared arrays are reused by the block's next row
}

// Sum over the block into thread 0, in a fixed order (deterministic).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T sm[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? sm[lane] : T(0);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  return v;
}

// Elements before the first 16-byte boundary of a row (V with an odd row stride, e.g. V = 50257
// in bf16 or 32001 in fp32, leaves most rows unaligned); at most V.
template <typename scalar_t>
__device__ __forceinline__ int64_t head_elems(const scalar_t* p, int64_t V) {
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = misalign == 0 ? 0 : (16 - misalign) / static_cast<int64_t>(sizeof(scalar_t));
  return head < V ? head : V;
}

// Pass 1 of the forward: lse[r] = (max, log sum exp(x - max)) of row r, for every real token
// row r = n*T + t. Launched with row_threads(...) <= kMaxThreads threads.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    lse_kernel(const scalar_t* __restrict__ logits, int64_t sn, int64_t st,
                           const int64_t* __restrict__ labels, int64_t rows, int64_t T, int64_t V,
                           int64_t ignore_index, acc_t* __restrict__ lse) {
  using P = Pack<scalar_t>;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t label = labels[r];
    if (label == ignore_index) {  // the whole block takes this branch
      if (tid == 0) lse[2 * r] = lse[2 * r + 1] = 0;
      continue;
    }
    CUDA_KERNEL_ASSERT_MSG(label >= 0 && label < V, "a label is outside [0, V) and not ignore_index");
    const scalar_t* row = logits + (r / T) * sn + (r % T) * st;
    acc_t m = -INFINITY, s = 0;
    // Scalar head up to the first 16-byte boundary, vector body from there, scalar tail.
    const int64_t head = head_elems(row, V);
    for (int64_t e = tid; e < head; e += nt) {
      const acc_t x[1] = {static_cast<acc_t>(row[e])};
      lse_add(x, m, s);
    }
    const int64_t packs = (V - head) / P::kSize;
    const P* prow = reinterpret_cast<const P*>(row + head);
    int64_t i = tid;
    for (; i + 3 * nt < packs; i += 4 * nt) {  // four loads in flight before any math
      const P p0 = prow[i], p1 = prow[i + nt], p2 = prow[i + 2 * nt], p3 = prow[i + 3 * nt];
      lse_add_pack(p0, m, s);
      lse_add_pack(p1, m, s);
      lse_add_pack(p2, m, s);
      lse_add_pack(p3, m, s);
    }
    for (; i < packs; i += nt) {
      const P p = prow[i];  // a local copy: one 16-byte load (a reference splits it)
      lse_add_pack(p, m, s);
    }
    for (int64_t e = head + packs * P::kSize + tid; e < V; e += nt) {
      const acc_t x[1] = {static_cast<acc_t>(row[e])};
      lse_add(x, m, s);
    }
    block_lse_merge(m, s);
    if (tid == 0) {
      lse[2 * r] = m;
      lse[2 * r + 1] = rd_log(s);
    }
  }
}

// Pass 2 of the forward: logps[n] = sum over real t of (logits[n, t, label] - m) - log s.
constexpr int kSeqThreads = 256;
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSeqThreads) seq_sum_kernel(const scalar_t* __restrict__ logits, int64_t sn, int64_t st,
                               const int64_t* __restrict__ labels, int64_t N, int64_t T,
                               int64_t ignore_index, const acc_t* __restrict__ lse,
                               acc_t* __restrict__ logps, int64_t* __restrict__ counts) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    acc_t sum = 0;
    int64_t count = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const int64_t label = labels[n * T + t];
      if (label == ignore_index) continue;
      const acc_t* ml = lse + 2 * (n * T + t);
      sum += (static_cast<acc_t>(logits[n * sn + t * st + label]) - ml[0]) - ml[1];
      ++count;
    }
    sum = block_sum(sum);
    count = block_sum(count);
    if (threadIdx.x == 0) {
      logps[n] = sum;
      counts[n] = count;
    }
  }
}

// One gradient element: g * (onehot - exp((x - m) - ls)).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_elem(acc_t x, bool is_label, acc_t g, acc_t m, acc_t ls) {
  return (is_label ? g : acc_t(0)) - g * exp_sub(x - m, ls);
}

// One pack of the gradient, in place: p holds logits [first, first + kSize) on entry and
// their gradient on exit.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void grad_pack(Pack<scalar_t>& p, int64_t first, int64_t label,
                                          acc_t g, acc_t m, acc_t ls) {
#pragma unroll
  for (int j = 0; j < Pack<scalar_t>::kSize; ++j)
    p.v[j] = static_cast<scalar_t>(
        grad_elem(static_cast<acc_t>(p.v[j]), first + j == label, g, m, ls));
}

// Backward: grad row = g[n] * (onehot(label) - exp(row - lse)); 0 for ignored rows, which are
// never read. `grad` may be `logits` (in place): every element is read, by the thread that
// writes it, before it is written, so no __restrict__ on those two pointers.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    grad_kernel(const scalar_t* logits, int64_t sn, int64_t st, scalar_t* grad,
                            int64_t gsn, int64_t gst, const int64_t* __restrict__ labels,
                            int64_t rows, int64_t T, int64_t V, int64_t ignore_index,
                            const acc_t* __restrict__ lse, const acc_t* __restrict__ grad_logps) {
  using P = Pack<scalar_t>;
  constexpr int kSize = P::kSize;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / T, t = r % T, label = labels[r];
    const scalar_t* row = logits + n * sn + t * st;
    scalar_t* out = grad + n * gsn + t * gst;
    // Scalar head, vector body, scalar tail, as in the forward; the vector body needs the
    // input and output rows equally misaligned (always so in place), else all is scalar.
    const int64_t head = head_elems(row, V);
    const bool vec = head == head_elems(out, V);
    const int64_t scalar_head = vec ? head : V;
    const int64_t packs = vec ? (V - head) / kSize : 0;
    const int64_t tail = scalar_head + packs * kSize;
    const P* prow = reinterpret_cast<const P*>(row + scalar_head);
    P* pout = reinterpret_cast<P*>(out + scalar_head);
    if (label == ignore_index) {  // the whole block takes this branch
      P zero;
#pragma unroll
      for (int j = 0; j < kSize; ++j) zero.v[j] = scalar_t(0);
      for (int64_t e = tid; e < scalar_head; e += nt) out[e] = scalar_t(0);
      for (int64_t i = tid; i < packs; i += nt) pout[i] = zero;
      for (int64_t e = tail + tid; e < V; e += nt) out[e] = scalar_t(0);
      continue;
    }
    const acc_t g = grad_logps[n], m = lse[2 * r], ls = lse[2 * r + 1];
    for (int64_t e = tid; e < scalar_head; e += nt)
      out[e] = static_cast<scalar_t>(grad_elem(static_cast<acc_t>(row[e]), e == label, g, m, ls));
    int64_t i = tid;
    for (; i + 3 * nt < packs; i += 4 * nt) {  // four loads in flight, as in the forward
      P p0 = prow[i], p1 = prow[i + nt], p2 = prow[i + 2 * nt], p3 = prow[i + 3 * nt];
      grad_pack(p0, scalar_head + i * kSize, label, g, m, ls);
      grad_pack(p1, scalar_head + (i + nt) * kSize, label, g, m, ls);
      grad_pack(p2, scalar_head + (i + 2 * nt) * kSize, label, g, m, ls);
      grad_pack(p3, scalar_head + (i + 3 * nt) * kSize, label, g, m, ls);
      pout[i] = p0;
      pout[i + nt] = p1;
      pout[i + 2 * nt] = p2;
      pout[i + 3 * nt] = p3;
    }
    for (; i < packs; i += nt) {
      P p = prow[i];
      grad_pack(p, scalar_head + i * kSize, label, g, m, ls);
      pout[i] = p;
    }
    for (int64_t e = tail + tid; e < V; e += nt)
      out[e] = static_cast<scalar_t>(grad_elem(static_cast<acc_t>(row[e]), e == label, g, m, ls));
  }
}

// The chain loss: a thread per chain writes its loss and d loss / d logp at each position to
// scratch; then thread 0 adds them up in chain order (deterministic, like the CPU loop).
constexpr int kChainThreads = 128;
template <typename T>
__global__ void __launch_bounds__(kChainThreads) chain_loss_kernel(const int64_t* __restrict__ chains, int64_t B, int64_t K,
                                  const T* __restrict__ logps, const T* __restrict__ ref,
                                  const int64_t* __restrict__ counts, int64_t N, int objective,
                                  T beta, T ntp_weight, T* __restrict__ chain_loss,
                                  T* __restrict__ d, T* __restrict__ loss, T* __restrict__ dlogps) {
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const int64_t* chain = chains + b * K;
    for (int64_t k = 0; k < K; ++k)
      CUDA_KERNEL_ASSERT_MSG(chain[k] >= -1 && chain[k] < N,
                             "a chain entry is neither a row index in [0, N) nor -1 (padding)");
    chain_loss[b] = chain_loss_one<T>(chain, K, logps, ref, counts, objective, beta, ntp_weight,
                                      d + b * K);
  }
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) dlogps[n] = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = 0;
    for (int64_t b = 0; b < B; ++b) {
      total += chain_loss[b];
      for (int64_t k = 0; k < K; ++k)
        if (chains[b * K + k] >= 0) dlogps[chains[b * K + k]] += d[b * K + k] / T(B);
    }
    *loss = total / T(B);
  }
}

// Threads per row block: about four 16-byte packs per thread per sweep, 32..512.
int row_threads(int64_t V, int64_t pack) {
  const int64_t want = (V + 4 * pack - 1) / (4 * pack);
  const int64_t warps = (std::min<int64_t>(want, kMaxThreads) + kWarp - 1) / kWarp;
  return static_cast<int>(std::max<int64_t>(warps, 1) * kWarp);
}

// One block per row; beyond the grid limit the kernels loop over rows.
unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, (1ll << 31) - 1)));
}

void check_sequence_args(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && labels.is_cuda() && logits.device() == labels.device(),
              "logits and labels must be on the same CUDA device");
  check_sequence_layout(logits, labels);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_logps_forward(const at::Tensor& logits,
                                                                     const at::Tensor& labels,
                                                                     int64_t ignore_index) {
  check_sequence_args(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  auto lse = at::empty({N, T, 2}, logits.options().dtype(acc_dtype));
  auto logps = at::empty({N}, logits.options().dtype(acc_dtype));
  auto counts = at::empty({N}, labels.options());
  if (N == 0) return {logps, counts, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "sequence_logps_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (N * T > 0) {
      lse_kernel<scalar_t, acc_t>
          <<<row_blocks(N * T), row_threads(V, Pack<scalar_t>::kSize), 0, stream>>>(
              logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
              labels.data_ptr<int64_t>(), N * T, T, V, ignore_index, lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    seq_sum_kernel<scalar_t, acc_t><<<row_blocks(N), kSeqThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
        labels.data_ptr<int64_t>(), N, T, ignore_index, lse.data_ptr<acc_t>(),
        logps.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logps, counts, lse};
}

at::Tensor sequence_logps_backward(const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& grad_logps,
                                   int64_t ignore_index, bool inplace) {
  check_sequence_args(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_dtype && lse.is_contiguous() &&
                  lse.numel() == N * T * 2 && lse.device() == logits.device(),
              "lse must be the contiguous [N, T, 2] tensor the forward returned");
  TORCH_CHECK(grad_logps.scalar_type() == acc_dtype && grad_logps.is_contiguous() &&
                  grad_logps.numel() == N && grad_logps.device() == logits.device(),
              "grad_logps must be contiguous [N] of the forward's logps dtype, on logits' device");
  at::Tensor grad = inplace ? logits : at::empty({N, T, V}, logits.options());
  if (N * T == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(),
                                  "sequence_logps_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_kernel<scalar_t, acc_t>
        <<<row_blocks(N * T), row_threads(V, Pack<scalar_t>::kSize), 0, stream>>>(
            logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
            grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
            labels.data_ptr<int64_t>(), N * T, T, V, ignore_index, lse.data_ptr<acc_t>(),
            grad_logps.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> chain_loss_forward(const at::Tensor& logps,
                                                      const at::Tensor& counts,
                                                      const at::Tensor& chains,
                                                      const at::Tensor& ref_logps,
                                                      int64_t objective, double beta,
                                                      double ntp_weight) {
  TORCH_CHECK(logps.is_cuda() && logps.dim() == 1 && logps.is_contiguous(),
              "logps must be contiguous [N] on a CUDA device");
  TORCH_CHECK(ref_logps.sizes() == logps.sizes() && ref_logps.is_contiguous() &&
                  ref_logps.scalar_type() == logps.scalar_type() &&
                  ref_logps.device() == logps.device(),
              "ref_logps must be contiguous [N] of logps' dtype, on logps' device");
  TORCH_CHECK(counts.sizes() == logps.sizes() && counts.scalar_type() == at::kLong &&
                  counts.is_contiguous() && counts.device() == logps.device(),
              "counts must be contiguous int64 [N] on logps' device");
  TORCH_CHECK(chains.dim() == 2 && chains.size(0) > 0 && chains.size(1) > 0 &&
                  chains.scalar_type() == at::kLong && chains.is_contiguous() &&
                  chains.device() == logps.device(),
              "chains must be contiguous int64 [B, K] with B, K >= 1, on logps' device");
  TORCH_CHECK(objective >= kRank && objective <= kSft, "unknown objective index ", objective);
  const c10::cuda::CUDAGuard guard(logps.device());
  const int64_t N = logps.size(0), B = chains.size(0), K = chains.size(1);
  auto loss = at::empty({}, logps.options());
  auto dlogps = at::empty_like(logps);
  auto chain_loss = at::empty({B}, logps.options());
  auto d = at::empty({B, K}, logps.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logps.scalar_type(), "chain_loss_forward_cuda", [&] {
    chain_loss_kernel<scalar_t><<<1, kChainThreads, 0, stream>>>(
        chains.data_ptr<int64_t>(), B, K, logps.data_ptr<scalar_t>(),
        ref_logps.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), N,
        static_cast<int>(objective), static_cast<scalar_t>(beta),
        static_cast<scalar_t>(ntp_weight), chain_loss.data_ptr<scalar_t>(),
        d.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), dlogps.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dlogps};
}

}  // namespace rank_dpo

// The ops' signatures: schema.cpp (in the CPU extension, loaded first); the table of
// kernels, shared with the CPU: register.cpp.
TORCH_LIBRARY_IMPL(rank_dpo, CUDA, m) { rank_dpo::register_kernels(m); }
