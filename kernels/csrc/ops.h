// The C++ entry points behind the rank_dpo ops (torch.ops.rank_dpo.*), as each extension
// defines them: the row kernels and the chain loss by each twin (fused_cpu.cpp or
// fused_cuda.cu), the LM-head loop once for both (fused_linear.cpp). The ops' signatures are
// in schema.cpp, the table of which function serves which op in register.cpp.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace rank_dpo {

// Defined by each twin.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_logps_forward(const at::Tensor& logits,
                                                                     const at::Tensor& labels,
                                                                     int64_t ignore_index);
at::Tensor sequence_logps_backward(const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, const at::Tensor& grad_logps,
                                   int64_t ignore_index, bool inplace);
std::tuple<at::Tensor, at::Tensor> chain_loss_forward(const at::Tensor& logps,
                                                      const at::Tensor& counts,
                                                      const at::Tensor& chains,
                                                      const at::Tensor& ref_logps,
                                                      int64_t objective, double beta,
                                                      double ntp_weight);

// Defined in fused_linear.cpp, once for both.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logps_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t T, int64_t ignore_index, int64_t chunk, bool token_grads);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logps_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& rows, const at::Tensor& row_labels, const at::Tensor& lse,
    const at::Tensor& grad_logps, int64_t T, int64_t chunk, bool need_hidden, bool need_weight,
    bool need_bias);

// The layouts the row kernels read, checked the same way by both twins (the Python wrapper
// prepares them; this guards direct calls of torch.ops.rank_dpo.*).
inline void check_sequence_layout(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1,
              "logits must be [N, T, V] with stride 1 over V");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "labels must be contiguous int64 [N, T] matching logits");
}

// Registers the functions above as the kernels of the rank_dpo ops for the dispatch key of
// `m`: each twin calls it from its TORCH_LIBRARY_IMPL block (register.cpp).
void register_kernels(torch::Library& m);

}  // namespace rank_dpo
