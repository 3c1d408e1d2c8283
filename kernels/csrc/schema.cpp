// The rank_dpo ops' signatures, declared once for every device: torch.ops.rank_dpo.<name>.
// Each device adds its kernels with TORCH_LIBRARY_IMPL (register.cpp); fake kernels and
// autograd formulas are registered from Python (kernels/ops.py).
// A namespace has exactly one TORCH_LIBRARY, so this file is compiled into the CPU extension
// only; kernels/build.py loads that one before the CUDA extension, which only adds kernels.
#include <torch/library.h>

TORCH_LIBRARY(rank_dpo, m) {
  // Per-sequence log-probs of the labels. lse [N, T, 2] holds (max, log sum exp(x - max)) per
  // token row for the backward. inplace_backward is not read by the kernel: the autograd
  // formula saves it and then calls sequence_logps_backward_ instead of _backward.
  m.def("sequence_logps_forward(Tensor logits, Tensor labels, int ignore_index, "
        "bool inplace_backward) -> (Tensor logps, Tensor counts, Tensor lse)");
  // d loss / d logits from d loss / d logps: into a new tensor, or over the logits themselves.
  m.def("sequence_logps_backward(Tensor logits, Tensor labels, Tensor lse, Tensor grad_logps, "
        "int ignore_index) -> Tensor");
  m.def("sequence_logps_backward_(Tensor(a!) logits, Tensor labels, Tensor lse, "
        "Tensor grad_logps, int ignore_index) -> ()");
  // The [B, K] part: the loss (mean over chains) and d loss / d logps; objective indexes
  // kernels.reference.OBJECTIVES.
  m.def("chain_loss_forward(Tensor logps, Tensor counts, Tensor chains, Tensor ref_logps, "
        "int objective, float beta, float ntp_weight) -> (Tensor loss, Tensor dlogps)");
  // The LM head fused in: hidden [N*T, H], labels [N*T]. rows [R] are the real tokens; with
  // keep_token_grads, token_grads [R, H] is d logp_token / d hidden, else empty [0, H].
  m.def("linear_logps_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
        "int T, int ignore_index, int chunk, bool keep_token_grads) -> "
        "(Tensor logps, Tensor counts, Tensor rows, Tensor lse, Tensor token_grads)");
  // Each gradient only where asked for (need_*), empty [0] where not.
  m.def("linear_logps_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor rows, "
        "Tensor row_labels, Tensor lse, Tensor grad_logps, int T, int chunk, bool need_hidden, "
        "bool need_weight, bool need_bias) -> "
        "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}
