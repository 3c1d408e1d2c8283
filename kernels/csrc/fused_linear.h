// The fused LM head: per-sequence log-probs of the labels straight from hidden states, the
// logits made a chunk of tokens at a time and freed (kernels/csrc/fused_linear.cpp).
// Compiled into both extensions: each twin supplies the two row-wise entry points it calls
// (fused_cpu.cpp or fused_cuda.cu) and registers these two with pybind.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace rank_dpo {

// Defined by each twin.
std::vector<at::Tensor> sequence_logps_forward(at::Tensor logits, at::Tensor labels,
                                               int64_t ignore_index);
at::Tensor sequence_logps_backward(at::Tensor logits, at::Tensor labels, at::Tensor lse,
                                   at::Tensor grad_logps, int64_t ignore_index, bool inplace);

// Defined in fused_linear.cpp, once for both.
std::vector<at::Tensor> linear_logps_forward(at::Tensor hidden, at::Tensor weight,
                                             c10::optional<at::Tensor> bias, at::Tensor labels,
                                             int64_t T, int64_t ignore_index, int64_t chunk,
                                             bool token_grads);
std::vector<at::Tensor> linear_logps_backward(at::Tensor hidden, at::Tensor weight,
                                              c10::optional<at::Tensor> bias, at::Tensor rows,
                                              at::Tensor row_labels, at::Tensor lse,
                                              at::Tensor grad_logps, int64_t T,
                                              int64_t chunk, bool need_hidden,
                                              bool need_weight, bool need_bias);

}  // namespace rank_dpo
