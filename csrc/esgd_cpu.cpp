// Fused CPU kernel: one at::parallel_for over the concatenation of all tensors, so small tensors
// do not each pay a thread-pool round trip and large ones are split across threads.

#include "esgd_common.h"
#include "esgd_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

// ATen's OpenMP parallel_for is a pragma inside a header template: compiled without OpenMP it
// runs every range on the calling thread (setup.py passes -fopenmp on Linux).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "esgd_cpu.cpp compiled without OpenMP: the fused CPU kernel will run on one thread"
#endif

// The element loop is written as scalar code over restrict pointers and vectorized by the
// compiler (needs -fno-math-errno for sqrt, set in setup.py). On x86-64 the loop is cloned for
// AVX2 and picked at load time (ifunc), so a portable build still runs 8-wide on current CPUs;
// sqrt and division dominate, and at::vec::Vectorized in an extension only gets the baseline ISA.
// No FMA clone: contraction would change rounding relative to the default clone.
#if defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 8))
#define ESGD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define ESGD_CPU_F16C 1
#include <immintrin.h>
#else
#define ESGD_CPU_CLONES
#endif

namespace esgd {

namespace {

// Elements per parallel task: big enough that the fork cost is noise, small enough that a
// 19M-element model still spreads over every core.
constexpr int64_t kGrain = 32768;

template <typename P, typename S, bool kHasHz>
C10_ALWAYS_INLINE void update_range(
    P* __restrict__ p,
    const P* __restrict__ g,
    S* __restrict__ m,
    S* __restrict__ d,
    const P* __restrict__ hz,
    int64_t n,
    const Coeffs<S>& coeffs) {
  const Coeffs<S> c = coeffs;  // a local copy, so the compiler knows stores cannot alias it
  for (int64_t i = 0; i < n; ++i) {
    S pi = static_cast<S>(p[i]);
    S mi = m[i];
    S di = d[i];
    S hi = S(0);
    if constexpr (kHasHz) {
      hi = static_cast<S>(hz[i]);
    }
    update<kHasHz>(pi, static_cast<S>(g[i]), mi, di, hi, c);
    p[i] = static_cast<P>(pi);
    m[i] = mi;
    if constexpr (kHasHz) {
      d[i] = di;
    }
  }
}

template <typename P, typename S, bool kHasHz>
using RangeFn = void (*)(P*, const P*, S*, S*, const P*, int64_t, const Coeffs<S>&);

template <typename P, typename S, bool kHasHz>
struct Range;

// target_clones needs plain functions, hence one per (param type, state type, estimation).
#define ESGD_DEFINE_RANGE(P, S, HAS_HZ, NAME)                                                   \
  ESGD_CPU_CLONES void NAME(                                                                    \
      P* p, const P* g, S* m, S* d, const P* hz, int64_t n, const Coeffs<S>& c) {              \
    update_range<P, S, HAS_HZ>(p, g, m, d, hz, n, c);                                           \
  }                                                                                             \
  template <>                                                                                   \
  struct Range<P, S, HAS_HZ> {                                                                  \
    static constexpr RangeFn<P, S, HAS_HZ> fn = &NAME;                                          \
  };

ESGD_DEFINE_RANGE(float, float, false, range_f32)
ESGD_DEFINE_RANGE(float, float, true, range_f32_hz)
ESGD_DEFINE_RANGE(double, double, false, range_f64)
ESGD_DEFINE_RANGE(double, double, true, range_f64_hz)
ESGD_DEFINE_RANGE(at::Half, float, false, range_f16)
ESGD_DEFINE_RANGE(at::Half, float, true, range_f16_hz)
ESGD_DEFINE_RANGE(at::BFloat16, float, false, range_bf16)
ESGD_DEFINE_RANGE(at::BFloat16, float, true, range_bf16_hz)
#undef ESGD_DEFINE_RANGE

#ifdef ESGD_CPU_F16C
// The avx2 clone does not have F16C, so c10's software half conversion keeps the float16 loop
// scalar (several times slower than fused Adam). Here blocks of halves are widened with
// vcvtph2ps into stack buffers, the float loop runs on them, and results are narrowed with
// round-to-nearest-even, which is the rounding of c10's conversion.
constexpr int64_t kHalfBlock = 512;

__attribute__((target("avx2,f16c"))) inline void widen(
    const at::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

__attribute__((target("avx2,f16c"))) inline void narrow(
    const float* __restrict__ src, at::Half* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<at::Half>(src[i]);
  }
}

template <bool kHasHz>
__attribute__((target("avx2,f16c"))) void range_f16_f16c(
    at::Half* p, const at::Half* g, float* m, float* d, const at::Half* hz, int64_t n,
    const Coeffs<float>& c) {
  alignas(32) float pb[kHalfBlock];
  alignas(32) float gb[kHalfBlock];
  alignas(32) float hb[kHalfBlock];
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t len = std::min(kHalfBlock, n - i);
    widen(p + i, pb, len);
    widen(g + i, gb, len);
    if constexpr (kHasHz) {
      widen(hz + i, hb, len);
    }
    update_range<float, float, kHasHz>(pb, gb, m + i, d + i, hb, len, c);
    narrow(pb, p + i, len);
  }
}

bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename P, typename S, bool kHasHz>
RangeFn<P, S, kHasHz> pick_range() {
#ifdef ESGD_CPU_F16C
  if constexpr (std::is_same_v<P, at::Half>) {
    if (has_f16c()) {
      return &range_f16_f16c<kHasHz>;
    }
  }
#endif
  return Range<P, S, kHasHz>::fn;
}

template <typename P, typename S, bool kHasHz>
void run(const Workspace& w, const Hyper& hyper) {
  const size_t n = w.params.size();
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<P*> p(n);
  std::vector<const P*> g(n);
  std::vector<S*> m(n);
  std::vector<S*> d(n);
  std::vector<const P*> hz(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    offsets[t + 1] = offsets[t] + w.params[t].numel();
    p[t] = w.params[t].data_ptr<P>();
    g[t] = w.grads[t].data_ptr<P>();
    m[t] = w.exp_avgs[t].data_ptr<S>();
    d[t] = w.exp_hz_sqs[t].data_ptr<S>();
    if constexpr (kHasHz) {
      hz[t] = w.hzs[t].data_ptr<P>();
    }
  }
  std::vector<Coeffs<S>> coeffs(n, make_coeffs<S>(hyper));
  for (size_t t = 0; t < w.step_scalars.size(); ++t) {
    apply_step_scalars(coeffs[t], w.step_scalars[t]);
  }
  const RangeFn<P, S, kHasHz> range = pick_range<P, S, kHasHz>();
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    // Largest t with offsets[t] <= begin, which skips empty tensors.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      const int64_t lo = begin - offsets[t];
      if (stop > begin) {
        range(p[t] + lo, g[t] + lo, m[t] + lo, d[t] + lo, kHasHz ? hz[t] + lo : nullptr,
              stop - begin, coeffs[t]);
      }
      begin = stop;
      ++t;
    }
  });
}

void launch(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const at::TensorList* hzs,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hzs, c10::DeviceType::CPU);
  std::vector<const double*> rows;
  if (step_scalars != nullptr) {
    rows = step_scalar_rows(op, *step_scalars, params);
  }
  if (params.empty()) {
    return;
  }
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hzs);
  w.step_scalars = std::move(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "esgd_update_cpu", [&] {
        using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        if (hzs != nullptr) {
          run<scalar_t, S, true>(w, hyper);
        } else {
          run<scalar_t, S, false>(w, hyper);
        }
      });
  w.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CPU, m) {
  m.impl("esgd_update_", &plain_op<&launch>);
  m.impl("esgd_update_hz_", &hz_op<&launch>);
  m.impl("esgd_update_capturable_", &capturable_op<&launch>);
}

}  // namespace esgd
