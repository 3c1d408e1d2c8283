// Which C++ function serves which rank_dpo op (schema.cpp): one table for both devices.
// Compiled into both extensions, where the names resolve to that extension's twin; each twin
// calls register_kernels from its own TORCH_LIBRARY_IMPL(rank_dpo, CPU / CUDA, m) block.
#include "ops.h"

namespace rank_dpo {
namespace {

// The schema's extra argument is for the autograd formula (kernels/ops.py), not the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_logps_forward_op(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
    bool /*inplace_backward*/) {
  return sequence_logps_forward(logits, labels, ignore_index);
}

// One kernel, two ops: a schema either mutates its input or it does not.
at::Tensor sequence_logps_backward_op(const at::Tensor& logits, const at::Tensor& labels,
                                      const at::Tensor& lse, const at::Tensor& grad_logps,
                                      int64_t ignore_index) {
  return sequence_logps_backward(logits, labels, lse, grad_logps, ignore_index, false);
}

void sequence_logps_backward_inplace_op(at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& lse, const at::Tensor& grad_logps,
                                        int64_t ignore_index) {
  sequence_logps_backward(logits, labels, lse, grad_logps, ignore_index, true);
}

}  // namespace

void register_kernels(torch::Library& m) {
  m.impl("sequence_logps_forward", &sequence_logps_forward_op);
  m.impl("sequence_logps_backward", &sequence_logps_backward_op);
  m.impl("sequence_logps_backward_", &sequence_logps_backward_inplace_op);
  m.impl("chain_loss_forward", &chain_loss_forward);
  m.impl("linear_logps_forward", &linear_logps_forward);
  m.impl("linear_logps_backward", &linear_logps_backward);
}

}  // namespace rank_dpo
