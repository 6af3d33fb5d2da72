// Declarations of the CPU kernels exposed as smsd._C (one .cpp file per op).
#pragma once

#include <torch/extension.h>

namespace smsd {

at::Tensor masked_sample_forward(const at::Tensor& x, const at::Tensor& index,
                                 const c10::optional<at::Tensor>& perm);
at::Tensor masked_sample_backward(const at::Tensor& grad_out, const at::Tensor& index,
                                  const c10::optional<at::Tensor>& perm, int64_t n_tokens);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_teacher_stats(
    const at::Tensor& teacher, const at::Tensor& center, double teacher_temp);
at::Tensor dino_loss_student(const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& center, const at::Tensor& teacher_max,
                             const at::Tensor& teacher_inv_sum,
                             const c10::optional<at::Tensor>& grad, int64_t row_offset,
                             int64_t batch, int64_t n_teacher_views, double student_temp,
                             double teacher_temp, double grad_scale);
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& index,
                                                     const c10::optional<at::Tensor>& cu_seqlens,
                                                     double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& index,
    const c10::optional<at::Tensor>& cu_seqlens, double scale);

}  // namespace smsd
