// masked_sample on the CPU: out[b, j] = x[b, perm[b, index[b, j]]] in one pass.
//
// A token is a contiguous row of D elements, so the forward is a row copy
// (memcpy, whatever the dtype) and the backward gathers, for every row of x,
// the rows of grad_out that were sampled from it: zero, one copy, or an fp32
// sum when indices repeat. Parallel over output rows (forward) and over images
// (backward, so no two threads touch one row and the result is deterministic).
#include "smsd.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace smsd {
namespace {

constexpr int64_t kGrainBytes = 32 * 1024;  // work per parallel_for chunk

void check_inputs(const at::Tensor& index, const c10::optional<at::Tensor>& perm, int64_t B,
                  int64_t N) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B, "masked_sample: index must be [B, K]");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "masked_sample: index must be int32 or int64");
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 2 && perm->size(0) == B && perm->size(1) == N,
                "masked_sample: perm must be [B, N]");
    TORCH_CHECK(perm->scalar_type() == index.scalar_type(),
                "masked_sample: perm and index must have the same dtype");
  }
}

// Source row of x for output row (b, j); bounds-checked (one compare per row).
template <typename index_t>
inline int64_t source_row(const index_t* index, const index_t* perm, int64_t b, int64_t j,
                          int64_t K, int64_t N) {
  int64_t n = static_cast<int64_t>(index[b * K + j]);
  TORCH_CHECK(n >= 0 && n < N, "masked_sample: index[", b, ", ", j, "] = ", n,
              " is outside [0, ", N, ")");
  if (perm != nullptr) {
    n = static_cast<int64_t>(perm[b * N + n]);
    TORCH_CHECK(n >= 0 && n < N, "masked_sample: perm[", b, "] holds ", n, " outside [0, ", N,
                ")");
  }
  return n;
}

template <typename index_t>
void forward_rows(const at::Tensor& x, const at::Tensor& index, const index_t* perm,
                  at::Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1), K = index.size(1);
  const int64_t row_bytes = x.size(2) * x.element_size();
  const int64_t stride_b = x.stride(0) * x.element_size();
  const int64_t stride_n = x.stride(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const index_t* idx = index.data_ptr<index_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K, j = r % K;
      const int64_t n = source_row(idx, perm, b, j, K, N);
      std::memcpy(dst + r * row_bytes, src + b * stride_b + n * stride_n, row_bytes);
    }
  });
}

template <typename scalar_t, typename index_t>
void backward_rows(const at::Tensor& grad_out, const at::Tensor& index, const index_t* perm,
                   at::Tensor& grad_x) {
  const int64_t B = grad_x.size(0), N = grad_x.size(1), D = grad_x.size(2);
  const int64_t K = index.size(1);
  const int64_t go_sb = grad_out.stride(0), go_sk = grad_out.stride(1);
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  const index_t* idx = index.data_ptr<index_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    // Per image: offsets/order list the output rows sampled from each token (CSR).
    std::vector<int64_t> offsets(N + 1), order(K), cursor(N);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(offsets.begin(), offsets.end(), 0);
      for (int64_t j = 0; j < K; ++j) ++offsets[source_row(idx, perm, b, j, K, N) + 1];
      for (int64_t n = 0; n < N; ++n) offsets[n + 1] += offsets[n];
      std::copy(offsets.begin(), offsets.end() - 1, cursor.begin());
      for (int64_t j = 0; j < K; ++j) order[cursor[source_row(idx, perm, b, j, K, N)]++] = j;
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* row = gx + (b * N + n) * D;
        const int64_t count = offsets[n + 1] - offsets[n];
        if (count == 0) {
          std::memset(row, 0, D * sizeof(scalar_t));
        } else if (count == 1) {
          const scalar_t* g = go + b * go_sb + order[offsets[n]] * go_sk;
          std::memcpy(row, g, D * sizeof(scalar_t));
        } else {  // repeated index: sum in fp32 (fp64 for double), round once
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<acc_t> sum(D, acc_t(0));
          for (int64_t k = offsets[n]; k < offsets[n + 1]; ++k) {
            const scalar_t* g = go + b * go_sb + order[k] * go_sk;
            for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<acc_t>(g[d]);
          }
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<scalar_t>(sum[d]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor masked_sample_forward(const at::Tensor& x_in, const at::Tensor& index_in,
                                 const c10::optional<at::Tensor>& perm_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "masked_sample (cpp): x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 3, "masked_sample: x must be [B, N, D]");
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  check_inputs(index_in, perm_in, B, N);
  // Rows must be contiguous for the row copy; any batch/token strides are fine.
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const c10::optional<at::Tensor> perm =
      perm_in.has_value() ? c10::optional<at::Tensor>(perm_in->contiguous()) : c10::nullopt;
  at::Tensor out = at::empty({B, index.size(1), D}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "masked_sample_forward", [&] {
    forward_rows<index_t>(x, index, perm ? perm->data_ptr<index_t>() : nullptr, out);
  });
  return out;
}

at::Tensor masked_sample_backward(const at::Tensor& grad_out_in, const at::Tensor& index_in,
                                  const c10::optional<at::Tensor>& perm_in, int64_t n_tokens) {
  TORCH_CHECK(grad_out_in.device().is_cpu(), "masked_sample (cpp): grad must be a CPU tensor");
  TORCH_CHECK(grad_out_in.dim() == 3, "masked_sample: grad_out must be [B, K, D]");
  const int64_t B = grad_out_in.size(0), D = grad_out_in.size(2);
  check_inputs(index_in, perm_in, B, n_tokens);
  const at::Tensor grad_out = grad_out_in.stride(2) == 1 ? grad_out_in : grad_out_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const c10::optional<at::Tensor> perm =
      perm_in.has_value() ? c10::optional<at::Tensor>(perm_in->contiguous()) : c10::nullopt;
  at::Tensor grad_x = at::empty({B, n_tokens, D}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "masked_sample_backward", [&] {
        using scalar = scalar_t;
        AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "masked_sample_backward_index", [&] {
          backward_rows<scalar, index_t>(grad_out, index,
                                         perm ? perm->data_ptr<index_t>() : nullptr, grad_x);
        });
      });
  return grad_x;
}

}  // namespace smsd
