// attention on the CPU: blocked online-softmax (FlashAttention-2 order) on fp32 tiles.
//
// Each (sequence, head) is a "head view": its rows may be read through `index`
// (a token subset or permutation of a dense [B, H, N, d] tensor) or be a range
// of a packed [T, H, d] tensor (`cu_seqlens`). Rows are gathered into small
// fp32 tiles owned by the thread, so no permuted copy of q/k/v ever exists, and
// the tile products run on BLAS through at::cpu::addmm_out (the CPU kernel itself,
// no dispatcher). Tiles are large (up to 256 rows) so that a ViT-sized sequence
// is one or two tiles and the per-call overhead stays small against the GEMMs.
//
// Forward: parallel over (sequence, head, row block); saves the log-sum-exp.
// Backward: parallel over (sequence, head), because every query block adds into
// the same dK/dV rows; a head's dQ/dK/dV accumulate in thread-local fp32 buffers,
// so the result is deterministic.
#include "smsd.h"

#include "cpu_isa.h"
#include "fast_math.h"

#include <ATen/Parallel.h>
#include <ATen/CPUFunctions.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

// Floating-point exceptions are never inspected; without no-trapping-math GCC will not
// if-convert the compares of fast_exp and row_max, and their AVX2 loops stay scalar.
#pragma GCC optimize("no-trapping-math")

namespace smsd {
namespace {

constexpr int64_t kBlockM = 256;  // query rows per forward tile (and work item)
constexpr int64_t kBlockN = 256;  // key rows per tile; also query rows per backward tile

constexpr int64_t kLanes = 16;  // independent accumulators: vector width x unroll

// Row bodies, inlined into one function per instruction set below. They keep kLanes
// partial sums/maxima, since without -ffast-math the compiler may not reorder a
// single-accumulator reduction.

// x[j] = exp(x[j] - shift); returns the sum.
SMSD_INLINE float exp_shifted_sum_body(float* x, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      x[j + l] = fast_exp(x[j + l] - shift);
      lanes[l] += x[j + l];
    }
  }
  float sum = 0.0f;
  for (; j < n; ++j) {
    x[j] = fast_exp(x[j] - shift);
    sum += x[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// ds[j] = p[j] * (dp[j] - delta), with p[j] = exp(s[j] - lse) computed in place in s.
SMSD_INLINE void softmax_grad_row_body(float* s, float* dp, int64_t n, float lse,
                                       float delta) {
  for (int64_t j = 0; j < n; ++j) {
    s[j] = fast_exp(s[j] - lse);
    dp[j] = s[j] * (dp[j] - delta);
  }
}

// The same when the row holds every key of the view: delta = sum_j p[j] dp[j] from the
// tile itself (the softmax backward as autograd computes it). Unlike rowsum(dO * O) it
// does not see O's rounding to the input dtype, and a 1-token view gets ds = 0 exactly.
SMSD_INLINE void softmax_grad_full_row_body(float* s, float* dp, int64_t n, float lse) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      s[j + l] = fast_exp(s[j + l] - lse);
      lanes[l] += s[j + l] * dp[j + l];
    }
  }
  float delta = 0.0f;
  for (; j < n; ++j) {
    s[j] = fast_exp(s[j] - lse);
    delta += s[j] * dp[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) delta += lanes[l];
  for (j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - delta);
}

SMSD_INLINE float row_max_body(const float* x, int64_t n) {
  float lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = lanes[l] > x[j + l] ? lanes[l] : x[j + l];
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  for (int64_t l = 0; l < kLanes; ++l) m = m > lanes[l] ? m : lanes[l];
  return m;
}

SMSD_INLINE void scale_row_body(float* x, int64_t n, float alpha) {
  for (int64_t j = 0; j < n; ++j) x[j] *= alpha;
}

// One table of row functions per instruction set (see cpu_isa.h).
struct RowOps {
  float (*exp_shifted_sum)(float*, int64_t, float);
  void (*softmax_grad_row)(float*, float*, int64_t, float, float);
  void (*softmax_grad_full_row)(float*, float*, int64_t, float);
  float (*row_max)(const float*, int64_t);
  void (*scale_row)(float*, int64_t, float);
};

#define SMSD_ROW_OPS(NAME, TARGET)                                                        \
  TARGET float exp_shifted_sum_##NAME(float* x, int64_t n, float shift) {                 \
    return exp_shifted_sum_body(x, n, shift);                                            \
  }                                                                                       \
  TARGET void softmax_grad_row_##NAME(float* s, float* dp, int64_t n, float lse,          \
                                      float delta) {                                      \
    softmax_grad_row_body(s, dp, n, lse, delta);                                         \
  }                                                                                       \
  TARGET void softmax_grad_full_row_##NAME(float* s, float* dp, int64_t n, float lse) {   \
    softmax_grad_full_row_body(s, dp, n, lse);                                           \
  }                                                                                       \
  TARGET float row_max_##NAME(const float* x, int64_t n) { return row_max_body(x, n); }   \
  TARGET void scale_row_##NAME(float* x, int64_t n, float alpha) {                        \
    scale_row_body(x, n, alpha);                                                         \
  }                                                                                       \
  constexpr RowOps kRowOps_##NAME{exp_shifted_sum_##NAME, softmax_grad_row_##NAME,        \
                                  softmax_grad_full_row_##NAME, row_max_##NAME,           \
                                  scale_row_##NAME};

SMSD_ROW_OPS(baseline, )
#if SMSD_X86_DISPATCH
SMSD_ROW_OPS(avx2, SMSD_TARGET_AVX2)
SMSD_ROW_OPS(avx512, SMSD_TARGET_AVX512)
#endif
#undef SMSD_ROW_OPS

const RowOps& row_ops() {
#if SMSD_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return kRowOps_avx512;
    case Isa::kAvx2:
      return kRowOps_avx2;
    default:
      break;
  }
#endif
  return kRowOps_baseline;
}

// A row-major [rows x cols] matrix with leading dimension ld, as a tensor (no copy);
// transposed when `trans`, so that op(X) of the stored matrix is what BLAS sees.
at::Tensor as_matrix(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1},
                               at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

#if defined(__GNUC__) && defined(__linux__)
// The Fortran BLAS entry point of the BLAS torch links (MKL's on x86 wheels), declared
// weak: null when absent, and then the tiles go through at::cpu::addmm_out instead.
// Calling it directly saves ~5 us of tensor set-up per tile product, which dominates
// for short views (49 tokens).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
#define SMSD_HAVE_WEAK_SGEMM 1
#endif

// Row-major C[m x n] = alpha * op(A)[m x k] op(B)[k x n] + beta * C (C is not read when
// beta == 0).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
#ifdef SMSD_HAVE_WEAK_SGEMM
  if (sgemm_ != nullptr) {
    // BLAS is column-major: a row-major matrix is its transpose, so compute
    // C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
#endif
  at::Tensor A = trans_a ? as_matrix(a, k, m, lda, true) : as_matrix(a, m, k, lda, false);
  at::Tensor B = trans_b ? as_matrix(b, n, k, ldb, true) : as_matrix(b, k, n, ldb, false);
  at::Tensor C = as_matrix(c, m, n, ldc, false);
  at::cpu::addmm_out(C, C, A, B, beta, alpha);
}

// Where the rows of one (sequence, head) live. Input-side rows (q, k, v and their
// gradients) are addressed through `token(r)`; output-side rows (out, grad_out, lse)
// are consecutive.
struct Layout {
  int64_t S, H, d, total;  // total: N (dense) or T (packed)
  const int64_t* index;    // [S, M] token ids or nullptr
  const int32_t* cu;       // [S + 1] or nullptr
  int64_t M;               // rows per sequence (dense)

  int64_t begin(int64_t s) const { return cu ? cu[s] : 0; }
  int64_t length(int64_t s) const { return cu ? cu[s + 1] - cu[s] : M; }
  // Token (row along the N or T axis) holding row r of sequence s.
  int64_t token(int64_t s, int64_t r) const {
    if (cu) return cu[s] + r;
    if (!index) return r;
    const int64_t t = index[s * M + r];
    TORCH_CHECK(t >= 0 && t < total, "attention: index[", s, ", ", r, "] = ", t,
                " is outside [0, ", total, ")");
    return t;
  }
  // Element offset of input-side row `token` of head h, for a tensor with these strides.
  int64_t in_offset(const at::Tensor& t, int64_t s, int64_t h, int64_t token) const {
    return cu ? token * t.stride(0) + h * t.stride(1)
              : s * t.stride(0) + h * t.stride(1) + token * t.stride(2);
  }
  // Element offset of output-side row r of (s, h) in a contiguous out / grad_out tensor.
  int64_t out_offset(int64_t s, int64_t h, int64_t r) const {
    return cu ? ((cu[s] + r) * H + h) * d : ((s * H + h) * M + r) * d;
  }
  // Elements between consecutive input-side rows of one head (no index).
  int64_t in_row_stride(const at::Tensor& t) const { return cu ? t.stride(0) : t.stride(2); }
  // Elements between consecutive output-side rows of one head.
  int64_t out_row_stride() const { return cu ? H * d : d; }
  // Offset in lse / delta: [S, H, M] dense, [H, T] packed.
  int64_t stat_offset(int64_t s, int64_t h, int64_t r) const {
    return cu ? h * total + cu[s] + r : (s * H + h) * M + r;
  }
  int64_t max_length() const {
    if (!cu) return M;
    int64_t m = 0;
    for (int64_t s = 0; s < S; ++s) m = std::max(m, length(s));
    return m;
  }
};

// Work items differ in cost (packed sequences of mixed lengths, whose long ones come
// first), so each worker pulls items from a shared counter instead of taking an equal
// static range; a worker runs once per thread of at::parallel_for.
int64_t worker_count(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
}

template <typename scalar_t>
void load_rows(const Layout& lay, const at::Tensor& t, int64_t s, int64_t h, int64_t r0,
               int64_t rows, float* dst) {
  const scalar_t* base = t.data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + lay.in_offset(t, s, h, lay.token(s, r0 + r));
    for (int64_t c = 0; c < lay.d; ++c) dst[r * lay.d + c] = static_cast<float>(src[c]);
  }
}

// fp32 rows that are not read through `index` are already a strided matrix BLAS can
// use in place: no copy, and gradients are written straight into their (fresh,
// contiguous) tensors. An input whose rows overlap (an expanded tensor: row stride < d)
// is no valid BLAS matrix and is gathered instead.
template <typename scalar_t>
bool in_place(const Layout& lay) {
  return std::is_same_v<scalar_t, float> && lay.index == nullptr;
}

template <typename scalar_t>
bool in_place(const Layout& lay, const at::Tensor& t) {
  return in_place<scalar_t>(lay) && lay.in_row_stride(t) >= lay.d;
}

// Rows [r0, r0 + rows) of (s, h) as an fp32 matrix: in place (ld = the tensor's row
// stride) or gathered and converted into `scratch` (ld = d).
struct Rows {
  const float* data;
  int64_t ld;
};

template <typename scalar_t>
Rows input_rows(const Layout& lay, const at::Tensor& t, int64_t s, int64_t h, int64_t r0,
                int64_t rows, float* scratch) {
  if (in_place<scalar_t>(lay, t)) {
    const float* base = reinterpret_cast<const float*>(t.data_ptr<scalar_t>());
    return {base + lay.in_offset(t, s, h, lay.token(s, r0)), lay.in_row_stride(t)};
  }
  load_rows<scalar_t>(lay, t, s, h, r0, rows, scratch);
  return {scratch, lay.d};
}

template <typename scalar_t>
void forward_impl(const Layout& lay, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t d = lay.d, H = lay.H;
  const int64_t blocks = (lay.max_length() + kBlockM - 1) / kBlockM;
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const int64_t items = lay.S * H * blocks;
  std::atomic<int64_t> next{0};
  const RowOps& ops = row_ops();
  at::parallel_for(0, worker_count(items), 1, [&](int64_t, int64_t) {
    std::vector<float> qt(kBlockM * d), kt(kBlockN * d), vt(kBlockN * d), st(kBlockM * kBlockN),
        acc(kBlockM * d), m(kBlockM), l(kBlockM);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      const int64_t s = item / (H * blocks), h = (item / blocks) % H, blk = item % blocks;
      const int64_t L = lay.length(s), r0 = blk * kBlockM;
      if (r0 >= L) continue;
      const int64_t bm = std::min(kBlockM, L - r0);
      const Rows qi = input_rows<scalar_t>(lay, q, s, h, r0, bm, qt.data());
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t c0 = 0; c0 < L; c0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, L - c0);
        const Rows kj = input_rows<scalar_t>(lay, k, s, h, c0, bn, kt.data());
        const Rows vj = input_rows<scalar_t>(lay, v, s, h, c0, bn, vt.data());
        gemm(false, true, bm, bn, d, scale, qi.data, qi.ld, kj.data, kj.ld, 0.0f, st.data(),
             kBlockN);
        for (int64_t i = 0; i < bm; ++i) {
          float* row = st.data() + i * kBlockN;
          const float m_new = std::max(m[i], ops.row_max(row, bn));
          l[i] = l[i] * std::exp(m[i] - m_new) + ops.exp_shifted_sum(row, bn, m_new);
          if (c0 > 0 && m[i] != m_new) ops.scale_row(acc.data() + i * d, d, std::exp(m[i] - m_new));
          m[i] = m_new;
        }
        // The first key block initializes the accumulator (beta = 0): no zero fill.
        gemm(false, false, bm, d, bn, 1.0f, st.data(), kBlockN, vj.data, vj.ld,
             c0 == 0 ? 0.0f : 1.0f, acc.data(), d);
      }
      for (int64_t i = 0; i < bm; ++i) {
        scalar_t* dst = out_ptr + lay.out_offset(s, h, r0 + i);
        const float inv = 1.0f / l[i];
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(acc[i * d + c] * inv);
        lse_ptr[lay.stat_offset(s, h, r0 + i)] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Layout& lay, const at::Tensor& grad_out, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, float scale, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  const int64_t d = lay.d, H = lay.H;
  const int64_t L_max = lay.max_length();
  const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
  const scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float* lse_ptr = lse.data_ptr<float>();
  const int64_t items = lay.S * H;
  const bool direct = in_place<scalar_t>(lay);
  std::atomic<int64_t> next{0};
  const RowOps& ops = row_ops();
  at::parallel_for(0, worker_count(items), 1, [&](int64_t, int64_t) {
    // Scratch for gathered/converted rows; the output side is unused in place.
    const int64_t out_rows = direct ? 0 : L_max * d;
    std::vector<float> qf(L_max * d), kf(L_max * d), vf(L_max * d), gof(out_rows),
        dqf(out_rows), dkf(out_rows), dvf(out_rows), delta(L_max), lse_f(L_max),
        pt(kBlockN * kBlockN), dpt(kBlockN * kBlockN);
    std::vector<char> covered(lay.index ? lay.total : 0);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      const int64_t s = item / H, h = item % H, L = lay.length(s);
      if (L == 0 && !lay.index) continue;
      const Rows qa = input_rows<scalar_t>(lay, q, s, h, 0, L, qf.data());
      const Rows ka = input_rows<scalar_t>(lay, k, s, h, 0, L, kf.data());
      const Rows va = input_rows<scalar_t>(lay, v, s, h, 0, L, vf.data());
      Rows go{gof.data(), d};
      if (direct) {
        go = {reinterpret_cast<const float*>(go_ptr) + lay.out_offset(s, h, 0),
              lay.out_row_stride()};
      }
      for (int64_t r = 0; r < L; ++r) {
        const scalar_t* g = go_ptr + lay.out_offset(s, h, r);
        const scalar_t* o = out_ptr + lay.out_offset(s, h, r);
        float dot = 0.0f;  // delta = rowsum(dO * O), the softmax-backward correction
        for (int64_t c = 0; c < d; ++c) {
          const float gc = static_cast<float>(g[c]);
          if (!direct) gof[r * d + c] = gc;
          dot += gc * static_cast<float>(o[c]);
        }
        delta[r] = dot;
        lse_f[r] = lse_ptr[lay.stat_offset(s, h, r)];
      }
      // Where dQ/dK/dV of (s, h) accumulate: the gradient tensors themselves (in place)
      // or fp32 scratch that is converted and scattered below.
      float* grad_rows[3];
      int64_t grad_ld = d;
      if (direct) {
        at::Tensor* const grads[] = {&dq, &dk, &dv};
        for (int g = 0; g < 3; ++g) {
          grad_rows[g] = reinterpret_cast<float*>(grads[g]->data_ptr<scalar_t>()) +
                         lay.in_offset(*grads[g], s, h, lay.token(s, 0));
        }
        grad_ld = lay.in_row_stride(dq);
      } else {
        grad_rows[0] = dqf.data();
        grad_rows[1] = dkf.data();
        grad_rows[2] = dvf.data();
      }
      for (int64_t c0 = 0; c0 < L; c0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, L - c0);
        const float* kj = ka.data + c0 * ka.ld;
        const float* vj = va.data + c0 * va.ld;
        for (int64_t r0 = 0; r0 < L; r0 += kBlockN) {
          const int64_t bm = std::min(kBlockN, L - r0);
          const float* qi = qa.data + r0 * qa.ld;
          const float* goi = go.data + r0 * go.ld;
          gemm(false, true, bm, bn, d, scale, qi, qa.ld, kj, ka.ld, 0.0f, pt.data(), kBlockN);
          gemm(false, true, bm, bn, d, 1.0f, goi, go.ld, vj, va.ld, 0.0f, dpt.data(), kBlockN);
          for (int64_t i = 0; i < bm; ++i) {
            if (bn == L) {
              ops.softmax_grad_full_row(pt.data() + i * kBlockN, dpt.data() + i * kBlockN, bn,
                                        lse_f[r0 + i]);
            } else {
              ops.softmax_grad_row(pt.data() + i * kBlockN, dpt.data() + i * kBlockN, bn,
                                   lse_f[r0 + i], delta[r0 + i]);
            }
          }
          // pt now holds P and dpt holds dS. The first contribution to a block of dK/dV
          // (r0 == 0) or of dQ (c0 == 0) initializes it (beta = 0).
          const float kv_beta = r0 == 0 ? 0.0f : 1.0f, q_beta = c0 == 0 ? 0.0f : 1.0f;
          gemm(true, false, bn, d, bm, 1.0f, pt.data(), kBlockN, goi, go.ld, kv_beta,
               grad_rows[2] + c0 * grad_ld, grad_ld);
          gemm(true, false, bn, d, bm, scale, dpt.data(), kBlockN, qi, qa.ld, kv_beta,
               grad_rows[1] + c0 * grad_ld, grad_ld);
          gemm(false, false, bm, d, bn, scale, dpt.data(), kBlockN, kj, ka.ld, q_beta,
               grad_rows[0] + r0 * grad_ld, grad_ld);
        }
      }
      if (direct) continue;
      at::Tensor* const grads[] = {&dq, &dk, &dv};
      if (lay.index) {  // tokens outside the view: zero gradient
        std::fill(covered.begin(), covered.end(), 0);
        for (int64_t r = 0; r < L; ++r) covered[lay.token(s, r)] = 1;
      }
      for (int g = 0; g < 3; ++g) {
        scalar_t* base = grads[g]->data_ptr<scalar_t>();
        for (int64_t r = 0; r < L; ++r) {
          scalar_t* dst = base + lay.in_offset(*grads[g], s, h, lay.token(s, r));
          const float* src = grad_rows[g] + r * d;
          for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(src[c]);
        }
        if (!lay.index) continue;
        for (int64_t t = 0; t < lay.total; ++t) {
          if (covered[t]) continue;
          scalar_t* dst = base + lay.in_offset(*grads[g], s, h, t);
          std::fill(dst, dst + d, scalar_t(0));
        }
      }
    }
  });
}

// Checks the kernel relies on (the Python wrapper gives friendlier messages first).
Layout make_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& index, const at::Tensor& cu) {
  TORCH_CHECK(q.device().is_cpu(), "attention (cpp): tensors must be on the CPU");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "attention: q, k and v must have the same shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k and v must have the same dtype");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
              "attention (cpp): the head dimension must be contiguous");
  Layout lay{};
  if (cu.defined()) {
    TORCH_CHECK(q.dim() == 3, "attention: packed q must be [T, H, d]");
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous(),
                "attention: cu_seqlens must be a contiguous int32 vector");
    lay.S = cu.size(0) - 1;
    lay.H = q.size(1);
    lay.d = q.size(2);
    lay.total = q.size(0);
    lay.cu = cu.data_ptr<int32_t>();
    TORCH_CHECK(lay.S >= 0 && lay.cu[0] == 0 && lay.cu[lay.S] == lay.total,
                "attention: cu_seqlens must start at 0 and end at the number of tokens");
    for (int64_t s = 0; s < lay.S; ++s) {
      TORCH_CHECK(lay.cu[s + 1] >= lay.cu[s], "attention: cu_seqlens must be non-decreasing");
    }
  } else {
    TORCH_CHECK(q.dim() == 4, "attention: q must be [B, H, N, d]");
    lay.S = q.size(0);
    lay.H = q.size(1);
    lay.d = q.size(3);
    lay.total = q.size(2);
    lay.M = q.size(2);
    if (index.defined()) {
      TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 &&
                      index.size(0) == lay.S && index.is_contiguous(),
                  "attention: index must be a contiguous int64 [B, M] tensor");
      lay.index = index.data_ptr<int64_t>();
      lay.M = index.size(1);
    }
  }
  return lay;
}

at::Tensor optional_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& index,
                                                     const c10::optional<at::Tensor>& cu_seqlens,
                                                     double scale) {
  const Layout lay =
      make_layout(q, k, v, optional_or_undefined(index), optional_or_undefined(cu_seqlens));
  at::Tensor out = lay.cu ? at::empty({lay.total, lay.H, lay.d}, q.options())
                          : at::empty({lay.S, lay.H, lay.M, lay.d}, q.options());
  at::Tensor lse = lay.cu ? at::empty({lay.H, lay.total}, q.options().dtype(at::kFloat))
                          : at::empty({lay.S, lay.H, lay.M}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward",
                                  [&] {
                                    forward_impl<scalar_t>(lay, q, k, v,
                                                           static_cast<float>(scale), out, lse);
                                  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& index,
    const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  const Layout lay =
      make_layout(q, k, v, optional_or_undefined(index), optional_or_undefined(cu_seqlens));
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.is_contiguous() && lse.is_contiguous(),
              "attention: grad_out must match the forward output");
  // Every row is written: by its view row, or with zeros when no view row reads the token.
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(q.sizes(), options),
             dv = at::empty(q.sizes(), options);
  if (grad_out.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward", [&] {
        backward_impl<scalar_t>(lay, grad_out, q, k, v, out, lse, static_cast<float>(scale), dq,
                                dk, dv);
      });
  return {dq, dk, dv};
}

}  // namespace smsd
