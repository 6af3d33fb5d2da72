// dino_loss on the CPU: DINO's distillation loss and its student gradient in one forward.
//
// Same algorithm as kernels/dino_loss.py. teacher_stats: the max and 1/sum-of-exps of
// (teacher - center) / teacher_temp for every teacher row (once per row, not per
// pair) and the teacher's column sums. student: per batch item b, the softmax of each
// of its teacher views (one exp per teacher element); then per student row (v, b) one
// exp per element for its log-sum-exp and softmax p, Q = sum over teacher views
// i != v of softmax_i (additions only), the row's loss -sum Q log_softmax and its
// gradient scale * (n_pairs * p - Q) / student_temp. Parallel over batch items; inner
// loops are plain fixed-width loops that GCC vectorizes, with fast_exp (std::exp does
// not vectorize without -ffast-math), compiled for baseline x86-64, AVX2 and AVX-512
// (chosen at run time, cpu_isa.h). Half types are read into fp32 and accumulated in fp32.
#include "smsd.h"

#include "cpu_isa.h"
#include "fast_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

// Floating-point exceptions are never inspected here; without no-trapping-math GCC will
// not if-convert the float compares (clamps) of fast_exp, so its loops stay scalar.
// No FMA contraction: q = exp(x - max) must round x = (t - c) / T exactly as the
// teacher statistics did, or q rows stop summing to 1 (2% off at logits of 1e4).
#pragma GCC optimize("no-trapping-math", "fp-contract=off")

namespace smsd {
namespace {

constexpr int64_t kLanes = 16;  // independent accumulators: vector width x unroll
// Elements per parallel task: below this a thread hand-off costs more than it saves
// (and on a busy machine a barrier can wait for a descheduled thread).
constexpr int64_t kGrainElements = 32 * 1024;

inline int64_t grain(int64_t per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_item, 1));
}

template <typename scalar_t>
SMSD_INLINE void load_scaled(const scalar_t* src, int64_t K, float mul, float* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]) * mul;
}

SMSD_INLINE float max_of(const float* x, int64_t K) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] = x[k + j] > lanes[j] ? x[k + j] : lanes[j];
  float m = lanes[0];
  for (int64_t j = 1; j < kLanes; ++j) m = std::max(m, lanes[j]);
  for (; k < K; ++k) m = std::max(m, x[k]);
  return m;
}

struct SoftmaxStats {
  float max, sum;  // log-sum-exp = max + log(sum)
};

// Max and sum of exp(x - max); with kStore, also writes exp(x - max) to e. A NaN
// anywhere gives NaN through the sum.
template <bool kStore>
SMSD_INLINE SoftmaxStats softmax_stats(const float* x, int64_t K, float* e) {
  float m = max_of(x, K);
  if (std::isinf(m)) m = 0.0f;  // all -inf (or +inf present): let the sum decide
  float lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float y = fast_exp(x[k + j] - m);
      if constexpr (kStore) e[k + j] = y;
      lanes[j] += y;
    }
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; k < K; ++k) {
    const float y = fast_exp(x[k] - m);
    if constexpr (kStore) e[k] = y;
    sum += y;
  }
  return {m, static_cast<float>(sum)};
}

template <typename scalar_t>
SMSD_INLINE SoftmaxStats teacher_row(const scalar_t* row, const float* center, float inv_tt,
                                     int64_t K, float* x) {
  for (int64_t k = 0; k < K; ++k) x[k] = (static_cast<float>(row[k]) - center[k]) * inv_tt;
  return softmax_stats<false>(x, K, nullptr);
}

struct StudentArgs {
  int64_t row_offset, rows, batch, n_teacher_views;
  float inv_ts, inv_tt, grad_scale;
};

struct TeacherView {
  const void* data;
  int64_t stride;
  const float* center;
  const float* max;
  const float* inv_sum;
};

// Scratch of one thread: 3 student rows and one softmax row per teacher view.
struct Scratch {
  std::vector<float> x, e, q, teacher;
  Scratch(int64_t K, int64_t n_teacher_views)
      : x(K), e(K), q(K), teacher(K * n_teacher_views) {}
};

// Every student row (v, b) of this call for one batch item b: the softmax of b's
// teacher views once (as teacher_stats rounded them: the same (t - c) / T, no FMA
// contraction), then per row the loss and, if g is not null, its gradient.
template <typename scalar_t>
SMSD_INLINE void batch_item(const scalar_t* s, int64_t s_stride, const TeacherView& tv,
                            const StudentArgs& a, int64_t b, int64_t K, Scratch& w,
                            scalar_t* g, int64_t g_stride, float* row_loss) {
  const scalar_t* t = static_cast<const scalar_t*>(tv.data);
  const int64_t T = a.n_teacher_views;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t_row = i * a.batch + b;
    const scalar_t* trow = t + t_row * tv.stride;
    const float shift = tv.max[t_row], inv = tv.inv_sum[t_row];
    float* qi = w.teacher.data() + i * K;
    // exp(x - max) / sum, as softmax: each row sums to 1 up to rounding.
    for (int64_t k = 0; k < K; ++k)
      qi[k] = fast_exp((static_cast<float>(trow[k]) - tv.center[k]) * a.inv_tt - shift) * inv;
  }
  // Global rows row = v * batch + b inside [row_offset, row_offset + rows).
  const int64_t first = a.row_offset, last = a.row_offset + a.rows;
  int64_t v = first <= b ? 0 : (first - b + a.batch - 1) / a.batch;
  for (int64_t row; (row = v * a.batch + b) < last; ++v) {
    const int64_t j = row - first;  // row within this call
    float* x = w.x.data();
    float* e = w.e.data();
    float* q = w.q.data();
    load_scaled(s + j * s_stride, K, a.inv_ts, x);
    const SoftmaxStats st = softmax_stats<true>(x, K, e);
    // logp = (x - max) - log(sum), as log_softmax: x - lse would shift the whole row
    // by lse's rounding (an ulp of a large number) and bias the loss.
    const float log_sum = std::log(st.sum), inv_sum = 1.0f / st.sum;
    int64_t n_pairs = 0;
    for (int64_t i = 0; i < T; ++i) {
      if (i == v) continue;
      const float* qi = w.teacher.data() + i * K;
      if (n_pairs++ == 0) {
        std::copy(qi, qi + K, q);
      } else {
        for (int64_t k = 0; k < K; ++k) q[k] += qi[k];
      }
    }
    if (n_pairs == 0) std::fill(q, q + K, 0.0f);
    // Loss: -sum_k q_k logp_k, fp32 lanes then fp64.
    float lanes[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] -= q[k + l] * ((x[k + l] - st.max) - log_sum);
    double loss = 0.0;
    for (int64_t l = 0; l < kLanes; ++l) loss += lanes[l];
    for (; k < K; ++k) loss -= q[k] * ((x[k] - st.max) - log_sum);
    row_loss[j] = static_cast<float>(loss);
    if (g != nullptr) {
      const float g_scale = a.grad_scale * a.inv_ts, pairs = static_cast<float>(n_pairs);
      scalar_t* g_row = g + j * g_stride;
      // In fp32 scratch first, then one conversion pass (vectorizes for every scalar_t).
      for (int64_t kk = 0; kk < K; ++kk) x[kk] = (pairs * (e[kk] * inv_sum) - q[kk]) * g_scale;
      for (int64_t kk = 0; kk < K; ++kk) g_row[kk] = static_cast<scalar_t>(x[kk]);
    }
  }
}

// One function per instruction set for each row body (see cpu_isa.h).
template <typename scalar_t>
struct RowFns {
  using Teacher = SoftmaxStats (*)(const scalar_t*, const float*, float, int64_t, float*);
  using Item = void (*)(const scalar_t*, int64_t, const TeacherView&, const StudentArgs&,
                        int64_t, int64_t, Scratch&, scalar_t*, int64_t, float*);
  Teacher teacher;
  Item item;
};

#define SMSD_ROW_FNS(NAME, TARGET)                                                          \
  template <typename scalar_t>                                                              \
  TARGET SoftmaxStats teacher_row_##NAME(const scalar_t* row, const float* center,          \
                                         float inv_tt, int64_t K, float* x) {               \
    return teacher_row(row, center, inv_tt, K, x);                                          \
  }                                                                                         \
  template <typename scalar_t>                                                              \
  TARGET void batch_item_##NAME(const scalar_t* s, int64_t s_stride, const TeacherView& tv, \
                                const StudentArgs& a, int64_t b, int64_t K, Scratch& w,     \
                                scalar_t* g, int64_t g_stride, float* row_loss) {           \
    batch_item(s, s_stride, tv, a, b, K, w, g, g_stride, row_loss);                         \
  }

SMSD_ROW_FNS(baseline, )
#if SMSD_X86_DISPATCH
SMSD_ROW_FNS(avx2, SMSD_TARGET_AVX2)
SMSD_ROW_FNS(avx512, SMSD_TARGET_AVX512)
#endif
#undef SMSD_ROW_FNS

template <typename scalar_t>
RowFns<scalar_t> row_fns() {
#if SMSD_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {&teacher_row_avx512<scalar_t>, &batch_item_avx512<scalar_t>};
    case Isa::kAvx2:
      return {&teacher_row_avx2<scalar_t>, &batch_item_avx2<scalar_t>};
    default:
      break;
  }
#endif
  return {&teacher_row_baseline<scalar_t>, &batch_item_baseline<scalar_t>};
}

template <typename scalar_t>
void teacher_stats_impl(const at::Tensor& teacher, const float* center, float inv_tt,
                        float* row_max, float* row_inv_sum, float* colsum) {
  const int64_t rows = teacher.size(0), K = teacher.size(1), stride = teacher.stride(0);
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  const auto row_stats = row_fns<scalar_t>().teacher;
  at::parallel_for(0, rows, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> x(K);
    for (int64_t r = begin; r < end; ++r) {
      const SoftmaxStats st = row_stats(t + r * stride, center, inv_tt, K, x.data());
      row_max[r] = st.max;
      row_inv_sum[r] = 1.0f / st.sum;
    }
  });
  // Column sums over disjoint column ranges: deterministic, no atomics.
  at::parallel_for(0, K, std::max<int64_t>(256, grain(rows)), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(end - begin, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = t + r * stride + begin;
      for (int64_t k = 0; k < end - begin; ++k) acc[k] += static_cast<float>(row[k]);
    }
    std::copy(acc.begin(), acc.end(), colsum + begin);
  });
}

template <typename scalar_t>
void student_impl(const at::Tensor& student, const TeacherView& tv, scalar_t* grad,
                  int64_t grad_stride, const StudentArgs& a, float* row_loss) {
  const int64_t K = student.size(1), s_stride = student.stride(0);
  const scalar_t* s = student.data_ptr<scalar_t>();
  const auto item = row_fns<scalar_t>().item;
  // Work items are batch items b: each computes b's teacher softmax rows once and every
  // student row of b in this call (rows of one b never span two items: deterministic).
  const int64_t items = std::min(a.batch, a.rows);
  const int64_t rows_per_item = (a.rows + items - 1) / items;
  at::parallel_for(0, items, grain(K * (rows_per_item + a.n_teacher_views)),
                   [&](int64_t begin, int64_t end) {
    Scratch w(K, a.n_teacher_views);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = (a.row_offset + i) % a.batch;  // the call's rows start at any b
      item(s, s_stride, tv, a, b, K, w, grad, grad_stride, row_loss);
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dino_loss (cpp): ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "dino_loss (cpp): ", name, " must be 2-D");
}

at::Tensor rows_contiguous(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_teacher_stats(
    const at::Tensor& teacher_in, const at::Tensor& center_in, double teacher_temp) {
  check_rows(teacher_in, "teacher");
  const int64_t K = teacher_in.size(1);
  TORCH_CHECK(center_in.scalar_type() == at::kFloat && center_in.numel() == K,
              "dino_loss (cpp): center must be fp32 with K elements");
  const at::Tensor teacher = rows_contiguous(teacher_in);
  const at::Tensor center = center_in.contiguous();
  at::Tensor row_max = at::empty({teacher.size(0)}, teacher.options().dtype(at::kFloat));
  at::Tensor row_inv_sum = at::empty_like(row_max);
  at::Tensor colsum = at::empty({K}, teacher.options().dtype(at::kFloat));
  if (teacher.numel() == 0) return {row_max, row_inv_sum, colsum.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, teacher.scalar_type(), "dino_loss_teacher_stats", [&] {
        teacher_stats_impl<scalar_t>(teacher, center.data_ptr<float>(),
                                     static_cast<float>(1.0 / teacher_temp),
                                     row_max.data_ptr<float>(), row_inv_sum.data_ptr<float>(),
                                     colsum.data_ptr<float>());
      });
  return {row_max, row_inv_sum, colsum};
}

at::Tensor dino_loss_student(const at::Tensor& student_in, const at::Tensor& teacher_in,
                             const at::Tensor& center_in, const at::Tensor& teacher_max_in,
                             const at::Tensor& teacher_inv_sum_in,
                             const c10::optional<at::Tensor>& grad, int64_t row_offset,
                             int64_t batch, int64_t n_teacher_views, double student_temp,
                             double teacher_temp, double grad_scale) {
  check_rows(student_in, "student");
  check_rows(teacher_in, "teacher");
  const int64_t K = student_in.size(1);
  TORCH_CHECK(teacher_in.size(1) == K, "dino_loss (cpp): student and teacher differ in K");
  TORCH_CHECK(teacher_in.scalar_type() == student_in.scalar_type(),
              "dino_loss (cpp): student and teacher must have one dtype");
  TORCH_CHECK(teacher_in.size(0) == n_teacher_views * batch,
              "dino_loss (cpp): teacher must have n_teacher_views * batch rows");
  TORCH_CHECK(center_in.scalar_type() == at::kFloat && center_in.numel() == K,
              "dino_loss (cpp): center must be fp32 with K elements");
  for (const at::Tensor* stat : {&teacher_max_in, &teacher_inv_sum_in}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->numel() == teacher_in.size(0),
                "dino_loss (cpp): teacher stats must be fp32 with one value per teacher row");
  }
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == student_in.sizes() &&
                    grad->scalar_type() == student_in.scalar_type() && grad->stride(1) == 1,
                "dino_loss (cpp): grad must match student with contiguous rows");
  }
  const at::Tensor student = rows_contiguous(student_in);
  const at::Tensor teacher = rows_contiguous(teacher_in);
  const at::Tensor center = center_in.contiguous();
  const at::Tensor teacher_max = teacher_max_in.contiguous();
  const at::Tensor teacher_inv_sum = teacher_inv_sum_in.contiguous();
  at::Tensor row_loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  if (student.numel() == 0) return row_loss;
  const StudentArgs args{row_offset, student.size(0), batch, n_teacher_views,
                         static_cast<float>(1.0 / student_temp),
                         static_cast<float>(1.0 / teacher_temp), static_cast<float>(grad_scale)};
  const TeacherView tv{teacher.data_ptr(), teacher.stride(0), center.data_ptr<float>(),
                       teacher_max.data_ptr<float>(), teacher_inv_sum.data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "dino_loss_student", [&] {
        scalar_t* g = grad.has_value() ? grad->data_ptr<scalar_t>() : nullptr;
        const int64_t g_stride = grad.has_value() ? grad->stride(0) : 0;
        student_impl<scalar_t>(student, tv, g, g_stride, args, row_loss.data_ptr<float>());
      });
  return row_loss;
}

}  // namespace smsd
