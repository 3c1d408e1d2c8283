// The fused LM head, one host-side loop for both devices: ATen's matmul (MKL/oneDNN on the
// CPU, cuBLAS on the GPU) makes the logits of a chunk of real tokens, the twin's own row
// kernels (sequence_logps_forward / _backward of fused_cpu.cpp or fused_cuda.cu) turn them
// into log-probs or their gradient, and the chunk is freed before the next one. Peak extra
// memory is O(chunk x V), never O(tokens x V).
//
//   hidden [N*T, H] (row n*T + t scores labels[n*T + t]), weight [V, H], bias [V] or none.
//   forward:  rows = the real tokens (label != ignore_index): prompt and padding tokens get
//             no logits at all. Per chunk of rows: logits = h @ W^T (+ b) [c, V], then per
//             row (max, log sum exp(x - max)) and x[label] - max - log sum; the per-token
//             log-probs land in a dense [N*T] zero buffer summed over T (fixed order, so
//             deterministic on both devices).
//   backward: per chunk, the logits are made again, turned in place into
//             d logits = g[n] * (onehot(label) - softmax), then
//             grad_hidden[rows] = d logits @ W, grad_W += d logits^T @ h, grad_b += sum_rows.
// grad_W and grad_b accumulate in the math dtype (fp32 for bf16/fp16, else the weight's).
//   frozen head (token_grads = true; only hidden needs a gradient): the forward also turns each
//             chunk's logits into d logp_token / d logits = onehot(label) - softmax and keeps
//             (onehot - softmax) @ W [c, H] per real token; the backward is then a scaling of
//             those rows, with no logits made again: 2 matmuls in all, like logits-then-loss,
//             instead of 3 (the 4th, grad_W, is the one a trained head needs).
#include "ops.h"

#include <ATen/OpMathType.h>

#include <algorithm>

namespace rank_dpo {
namespace {

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t chunk) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N*T, H] and weight [V, H]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type() && hidden.device() == weight.device(),
              "hidden and weight must share dtype and device");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == weight.scalar_type() &&
                                    bias->device() == weight.device()),
              "bias must be [V] of weight's dtype and device");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1");
}

}  // namespace

// labels [N*T] int64. -> (logps [N] acc, counts [N] int64, rows [R] int64 (flat indices of the
// real tokens, ascending), lse [R, 2] acc (per row: max and log sum exp(x - max)),
// token_grads [R, H] in hidden's dtype (d logp_token / d hidden), or [0, H] when not asked for)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logps_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t T, int64_t ignore_index, int64_t chunk, bool token_grads) {
  check_linear_args(hidden, weight, bias, chunk);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && T >= 1 &&
                  labels.size(0) % T == 0 && labels.scalar_type() == at::kLong,
              "labels must be int64 [N*T] matching hidden");
  const int64_t NT = hidden.size(0), N = NT / T, V = weight.size(0);
  const auto acc_opts = hidden.options().dtype(at::toOpMathType(hidden.scalar_type()));
  const at::Tensor real = labels.ne(ignore_index);
  const at::Tensor rows = real.nonzero().view(-1);
  const int64_t R = rows.size(0);
  const at::Tensor row_labels = labels.index_select(0, rows).contiguous();
  at::Tensor token_logps = at::zeros({NT}, acc_opts);
  at::Tensor lse = at::empty({R, 2}, acc_opts);
  at::Tensor grads = at::empty({token_grads ? R : 0, weight.size(1)}, hidden.options());
  const at::Tensor ones = token_grads ? at::ones({std::min(chunk, R)}, acc_opts) : at::Tensor();
  for (int64_t start = 0; start < R; start += chunk) {
    const int64_t c = std::min(chunk, R - start);
    const at::Tensor idx = rows.narrow(0, start, c);
    const at::Tensor logits = chunk_logits(hidden.index_select(0, idx), weight, bias);
    // The chunk as N = c sequences of one token: its "sequence" log-probs are token log-probs.
    const at::Tensor chunk_labels = row_labels.narrow(0, start, c).view({c, 1});
    const auto out = sequence_logps_forward(logits.view({c, 1, V}), chunk_labels, ignore_index);
    const at::Tensor& chunk_lse = std::get<2>(out);
    token_logps.index_copy_(0, idx, std::get<0>(out));
    lse.narrow(0, start, c).copy_(chunk_lse.view({c, 2}));
    if (token_grads) {  // onehot - softmax, over the logits in place (they are not needed after)
      const at::Tensor dlogits =
          sequence_logps_backward(logits.view({c, 1, V}), chunk_labels, chunk_lse.view({c, 1, 2}),
                                  ones.narrow(0, 0, c), ignore_index, true)
              .view({c, V});
      at::Tensor rows_grad = grads.narrow(0, start, c);
      at::mm_out(rows_grad, dlogits, weight);
    }
  }
  at::Tensor logps = token_logps.view({N, T}).sum(1);
  at::Tensor counts = real.view({N, T}).sum(1);
  return {logps, counts, rows, lse, grads};
}

// rows, row_labels [R], lse [R, 2] from the forward; grad_logps [N] acc.
// -> (grad_hidden [N*T, H], grad_weight [V, H] acc, grad_bias [V] acc), each only where asked
//    for, else empty [0] (the op's schema has no optional returns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logps_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& rows, const at::Tensor& row_labels, const at::Tensor& lse,
    const at::Tensor& grad_logps, int64_t T, int64_t chunk, bool need_hidden, bool need_weight,
    bool need_bias) {
  check_linear_args(hidden, weight, bias, chunk);
  const int64_t R = rows.size(0), V = weight.size(0), H = weight.size(1);
  const auto acc_type = at::toOpMathType(hidden.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.is_contiguous() && lse.numel() == 2 * R,
              "lse must be the contiguous [R, 2] tensor the forward returned");
  TORCH_CHECK(row_labels.numel() == R && row_labels.is_contiguous(),
              "row_labels must be contiguous [R]");
  const auto acc_opts = hidden.options().dtype(acc_type);
  const bool acc_is_dtype = acc_type == hidden.scalar_type();
  const at::Tensor grad_tokens = grad_logps.to(acc_type).index_select(0, rows.div(T, "floor"));
  at::Tensor grad_hidden = need_hidden ? at::zeros_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor grad_weight = need_weight ? at::zeros({V, H}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor grad_bias = need_bias ? at::zeros({V}, acc_opts) : at::empty({0}, acc_opts);
  // No label here is ignore_index: -1 is never equal to one of them ([0, V)).
  const int64_t no_ignore = -1;
  for (int64_t start = 0; start < R; start += chunk) {
    const int64_t c = std::min(chunk, R - start);
    const at::Tensor idx = rows.narrow(0, start, c);
    const at::Tensor h = hidden.index_select(0, idx);
    at::Tensor logits = chunk_logits(h, weight, bias);
    // d logits, written over the chunk's logits (nothing else holds them).
    const at::Tensor dlogits =
        sequence_logps_backward(logits.view({c, 1, V}), row_labels.narrow(0, start, c).view({c, 1}),
                                lse.narrow(0, start, c).view({c, 1, 2}),
                                grad_tokens.narrow(0, start, c).contiguous(), no_ignore, true)
            .view({c, V});
    if (need_hidden) grad_hidden.index_copy_(0, idx, at::mm(dlogits, weight));
    if (need_weight) {
      if (acc_is_dtype)
        grad_weight.addmm_(dlogits.t(), h);
      else  // bf16/fp16: the chunk's product in the dtype (fp32 inside the GEMM), summed in fp32
        grad_weight.add_(at::mm(dlogits.t(), h));
    }
    if (need_bias) grad_bias.add_(at::sum(dlogits, {0}, false, acc_type));
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace rank_dpo
