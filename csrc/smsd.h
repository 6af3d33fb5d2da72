// Declarations of the CPU kernels exposed as smsd._C (one .cpp file per op).
#pragma once

#include <torch/extension.h>

namespace smsd {

at::Tensor masked_sample_forward(const at::Tensor& x, const at::Tensor& index,
                                 const c10::optional<at::Tensor>& perm);
at::Tensor masked_sample_backward(const at::Tensor& grad_out, const at::Tensor& index,
                                  const c10::optional<at::Tensor>& perm, int64_t n_tokens);

}  // namespace smsd
