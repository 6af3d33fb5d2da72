// dino_loss on the CPU: DINO's distillation loss and its student gradient in one forward.
//
// Same algorithm as kernels/dino_loss.py. teacher_stats: the max and 1/sum-of-exps of
// (teacher - center) / teacher_temp for every teacher row (once per row, not per
// pair) and the teacher's column sums. student: per student row (v, b), one
// log-sum-exp over K, then Q = sum over teacher views i != v of softmax_i, the row's
// loss -sum Q log_softmax and its gradient scale * (n_pairs * p - Q) / student_temp.
// Parallel over rows; inner loops are plain fixed-width loops that GCC vectorizes,
// with an exp written for that (std::exp does not vectorize without -ffast-math),
// compiled for baseline x86-64 and for AVX2 (chosen at run time).
// Half types are read into fp32 and accumulated in fp32.
#include "smsd.h"

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

// Helpers are inlined into each row body, so their loops get that body's instruction set.
#if defined(__GNUC__)
#define SMSD_HELPER inline __attribute__((always_inline))
#else
#define SMSD_HELPER inline
#endif

constexpr int64_t kLanes = 16;  // independent accumulators: vector width x unroll
// Elements per parallel task: below this a thread hand-off costs more than it saves
// (and on a busy machine a barrier can wait for a descheduled thread).
constexpr int64_t kGrainElements = 32 * 1024;

inline int64_t grain(int64_t per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_item, 1));
}

// exp(x) = 2^n exp(r), |r| <= ln2 / 2, degree-7 polynomial (rel. error ~1e-8 before
// rounding); branch-free so loops over it vectorize. NaN stays NaN; x < -87 gives 0.
SMSD_HELPER float fast_exp(float x) {
  // Ternaries, not std::min/max (compiled before the pragma above); NaN passes through.
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  constexpr float kRound = 12582912.0f;                    // 1.5 * 2^23: round to nearest
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;
}

template <typename scalar_t>
SMSD_HELPER void load_scaled(const scalar_t* src, int64_t K, float mul, float* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]) * mul;
}

SMSD_HELPER float max_of(const float* x, int64_t K) {
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

// Max and sum of exp(x - max); a NaN anywhere gives NaN through the sum.
SMSD_HELPER SoftmaxStats softmax_stats(const float* x, int64_t K) {
  float m = max_of(x, K);
  if (std::isinf(m)) m = 0.0f;  // all -inf (or +inf present): let the sum decide
  float lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += fast_exp(x[k + j] - m);
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; k < K; ++k) sum += fast_exp(x[k] - m);
  return {m, static_cast<float>(sum)};
}

// The row bodies are compiled twice: for the x86-64 baseline (SSE2) and, called when
// the CPU has them, for AVX2+FMA+F16C (twice the vector width; the extension is built
// without -march flags so that it runs anywhere). SMSD_ROW inlines them into each.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SMSD_ROW inline __attribute__((always_inline))
#define SMSD_HAVE_AVX2_PATH 1
#else
#define SMSD_ROW inline
#define SMSD_HAVE_AVX2_PATH 0
#endif

template <typename scalar_t>
SMSD_ROW SoftmaxStats teacher_row(const scalar_t* row, const float* center, float inv_tt,
                                  int64_t K, float* x) {
  for (int64_t k = 0; k < K; ++k) x[k] = (static_cast<float>(row[k]) - center[k]) * inv_tt;
  return softmax_stats(x, K);
}

struct StudentArgs {
  int64_t row_offset, batch, n_teacher_views;
  float inv_ts, inv_tt, grad_scale;
};

struct TeacherView {
  const void* data;
  int64_t stride;
  const float* center;
  const float* max;
  const float* inv_sum;
};

// Loss of student row ``row`` (global index); writes its gradient to g_row if not null.
template <typename scalar_t>
SMSD_ROW float student_row(const scalar_t* s_row, const TeacherView& tv, const StudentArgs& a,
                           int64_t row, int64_t K, float* x, float* q, scalar_t* g_row) {
  const int64_t v = row / a.batch, b = row % a.batch;
  const scalar_t* t = static_cast<const scalar_t*>(tv.data);
  load_scaled(s_row, K, a.inv_ts, x);
  // logp = (x - max) - log(sum), as log_softmax: x - lse would shift the whole row
  // by lse's rounding (an ulp of a large number) and bias the loss.
  const SoftmaxStats st = softmax_stats(x, K);
  const float log_sum = std::log(st.sum);
  for (int64_t k = 0; k < K; ++k) x[k] = (x[k] - st.max) - log_sum;  // x is now logp
  std::fill(q, q + K, 0.0f);
  int64_t n_pairs = 0;
  for (int64_t i = 0; i < a.n_teacher_views; ++i) {
    if (i == v) continue;
    ++n_pairs;
    const int64_t t_row = i * a.batch + b;
    const scalar_t* trow = t + t_row * tv.stride;
    const float shift = tv.max[t_row], inv = tv.inv_sum[t_row];
    // exp(x - max) / sum, as softmax: each q row sums to 1 up to rounding.
    for (int64_t k = 0; k < K; ++k)
      q[k] += fast_exp((static_cast<float>(trow[k]) - tv.center[k]) * a.inv_tt - shift) * inv;
  }
  // Loss: -sum_k q_k logp_k, fp32 lanes then fp64.
  float lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] -= q[k + l] * x[k + l];
  double loss = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) loss += lanes[l];
  for (; k < K; ++k) loss -= q[k] * x[k];
  if (g_row != nullptr) {
    const float g_scale = a.grad_scale * a.inv_ts, pairs = static_cast<float>(n_pairs);
    // In fp32 scratch first, then one conversion pass (vectorizes for every scalar_t).
    for (int64_t kk = 0; kk < K; ++kk) x[kk] = (pairs * fast_exp(x[kk]) - q[kk]) * g_scale;
    for (int64_t kk = 0; kk < K; ++kk) g_row[kk] = static_cast<scalar_t>(x[kk]);
  }
  return static_cast<float>(loss);
}

template <typename scalar_t>
SoftmaxStats teacher_row_base(const scalar_t* row, const float* center, float inv_tt,
                              int64_t K, float* x) {
  return teacher_row(row, center, inv_tt, K, x);
}

template <typename scalar_t>
float student_row_base(const scalar_t* s_row, const TeacherView& tv, const StudentArgs& a,
                       int64_t row, int64_t K, float* x, float* q, scalar_t* g_row) {
  return student_row(s_row, tv, a, row, K, x, q, g_row);
}

#if SMSD_HAVE_AVX2_PATH
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) SoftmaxStats teacher_row_avx2(
    const scalar_t* row, const float* center, float inv_tt, int64_t K, float* x) {
  return teacher_row(row, center, inv_tt, K, x);
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) float student_row_avx2(
    const scalar_t* s_row, const TeacherView& tv, const StudentArgs& a, int64_t row, int64_t K,
    float* x, float* q, scalar_t* g_row) {
  return student_row(s_row, tv, a, row, K, x, q, g_row);
}

// SMSD_CPU_BASELINE=1 forces the baseline bodies (so tests can cover both paths).
bool cpu_has_avx2() {
  static const bool has = [] {
    const char* force = std::getenv("SMSD_CPU_BASELINE");
    if (force != nullptr && std::strcmp(force, "1") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

template <typename scalar_t>
void teacher_stats_impl(const at::Tensor& teacher, const float* center, float inv_tt,
                        float* row_max, float* row_inv_sum, float* colsum) {
  const int64_t rows = teacher.size(0), K = teacher.size(1), stride = teacher.stride(0);
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  auto row_stats = &teacher_row_base<scalar_t>;
#if SMSD_HAVE_AVX2_PATH
  if (cpu_has_avx2()) row_stats = &teacher_row_avx2<scalar_t>;
#endif
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
  const int64_t rows = student.size(0), K = student.size(1), s_stride = student.stride(0);
  const scalar_t* s = student.data_ptr<scalar_t>();
  auto row_fn = &student_row_base<scalar_t>;
#if SMSD_HAVE_AVX2_PATH
  if (cpu_has_avx2()) row_fn = &student_row_avx2<scalar_t>;
#endif
  at::parallel_for(0, rows, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> x(K), q(K);
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* g_row = grad != nullptr ? grad + j * grad_stride : nullptr;
      row_loss[j] = row_fn(s + j * s_stride, tv, a, a.row_offset + j, K, x.data(), q.data(),
                           g_row);
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
  const StudentArgs args{row_offset, batch, n_teacher_views,
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
