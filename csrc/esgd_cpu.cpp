// Fused CPU kernel: one at::parallel_for over the concatenation of all tensors, so small tensors
// do not each pay a thread-pool round trip and large ones are split across threads.

#include "cpu_clones.h"
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

// The element loop is vectorized by the compiler (cpu_clones.h; sqrt needs -fno-math-errno, set
// in setup.py): sqrt and division dominate.
#ifdef ESGD_CPU_F16C
#include <immintrin.h>
#endif

namespace esgd {

namespace {

// Elements per parallel task: big enough that the fork cost is noise, small enough that a
// 19M-element model still spreads over every core.
constexpr int64_t kGrain = 32768;

// a: hzs or grads_plus; b: grads_minus (HzSource); x: theta's source when kFromSource (p is then
// only written: the restore of a finite-difference step fused into its update), unused otherwise.
template <typename P, typename S, HzSource Src, bool kFromSource>
C10_ALWAYS_INLINE void update_range(
    P* __restrict__ p,
    const P* __restrict__ x,
    const P* __restrict__ g,
    S* __restrict__ m,
    S* __restrict__ d,
    const P* __restrict__ a,
    const P* __restrict__ b,
    int64_t n,
    const Coeffs<S>& coeffs) {
  constexpr bool kHasHz = Src != HzSource::kNone;
  const Coeffs<S> c = coeffs;  // a local copy, so the compiler knows stores cannot alias it
  for (int64_t i = 0; i < n; ++i) {
    S pi;
    if constexpr (kFromSource) {
      pi = static_cast<S>(x[i]);
    } else {
      pi = static_cast<S>(p[i]);
    }
    const S gi = static_cast<S>(g[i]);
    S mi = m[i];
    S di = d[i];
    S hi = S(0);
    if constexpr (Src == HzSource::kDirect) {
      hi = static_cast<S>(a[i]);
    } else if constexpr (Src == HzSource::kForward) {
      hi = fd_difference(static_cast<S>(a[i]), gi);
    } else if constexpr (Src == HzSource::kCentral) {
      hi = fd_difference(static_cast<S>(a[i]), static_cast<S>(b[i]));
    }
    update<kHasHz>(pi, gi, mi, di, hi, c);
    p[i] = static_cast<P>(pi);
    m[i] = mi;
    if constexpr (kHasHz) {
      d[i] = di;
    }
  }
}

template <typename P, typename S>
using RangeFn =
    void (*)(P*, const P*, const P*, S*, S*, const P*, const P*, int64_t, const Coeffs<S>&);

template <typename P, typename S, HzSource Src, bool kFromSource>
struct Range;

// target_clones needs plain functions, hence one per (param type, state type, hz source, whether
// theta comes from sources). scripts/check_cpu_vectorization.py names them.
#define ESGD_DEFINE_RANGE(P, S, SRC, FROM, NAME)                                                 \
  ESGD_CPU_CLONES void NAME(P* p, const P* x, const P* g, S* m, S* d, const P* a, const P* b,    \
                            int64_t n, const Coeffs<S>& c) {                                     \
    update_range<P, S, HzSource::SRC, FROM>(p, x, g, m, d, a, b, n, c);                          \
  }                                                                                              \
  template <>                                                                                    \
  struct Range<P, S, HzSource::SRC, FROM> {                                                      \
    static constexpr RangeFn<P, S> fn = &NAME;                                                   \
  };

#define ESGD_DEFINE_RANGES(P, S, NAME)                                 \
  ESGD_DEFINE_RANGE(P, S, kNone, false, NAME)                          \
  ESGD_DEFINE_RANGE(P, S, kDirect, false, NAME##_hz)                   \
  ESGD_DEFINE_RANGE(P, S, kForward, false, NAME##_fd_forward)          \
  ESGD_DEFINE_RANGE(P, S, kCentral, false, NAME##_fd_central)          \
  ESGD_DEFINE_RANGE(P, S, kForward, true, NAME##_fd_forward_source)    \
  ESGD_DEFINE_RANGE(P, S, kCentral, true, NAME##_fd_central_source)

ESGD_DEFINE_RANGES(float, float, range_f32)
ESGD_DEFINE_RANGES(double, double, range_f64)
ESGD_DEFINE_RANGES(at::Half, float, range_f16)
ESGD_DEFINE_RANGES(at::BFloat16, float, range_bf16)
#undef ESGD_DEFINE_RANGES
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

template <HzSource Src, bool kFromSource>
__attribute__((target("avx2,f16c"))) void range_f16_f16c(
    at::Half* p, const at::Half* x, const at::Half* g, float* m, float* d, const at::Half* a,
    const at::Half* b, int64_t n, const Coeffs<float>& c) {
  alignas(32) float pb[kHalfBlock];
  alignas(32) float gb[kHalfBlock];
  alignas(32) float ab[kHalfBlock];
  alignas(32) float bb[kHalfBlock];
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t len = std::min(kHalfBlock, n - i);
    widen((kFromSource ? x : p) + i, pb, len);
    widen(g + i, gb, len);
    if constexpr (Src != HzSource::kNone) {
      widen(a + i, ab, len);
    }
    if constexpr (Src == HzSource::kCentral) {
      widen(b + i, bb, len);
    }
    update_range<float, float, Src, false>(pb, nullptr, gb, m + i, d + i, ab, bb, len, c);
    narrow(pb, p + i, len);
  }
}

bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename P, typename S, HzSource Src, bool kFromSource>
RangeFn<P, S> pick_range() {
#ifdef ESGD_CPU_F16C
  if constexpr (std::is_same_v<P, at::Half>) {
    if (has_f16c()) {
      return &range_f16_f16c<Src, kFromSource>;
    }
  }
#endif
  return Range<P, S, Src, kFromSource>::fn;
}

template <typename P, typename S, HzSource Src, bool kFromSource = false>
void run(const UpdateJob& job, const Hyper& hyper) {
  const Workspace& w = job.workspace;
  const size_t n = w.params.size();
  std::vector<int64_t> offsets(n + 1, 0);
  std::vector<P*> p(n);
  std::vector<const P*> x(n, nullptr);
  std::vector<const P*> g(n);
  std::vector<S*> m(n);
  std::vector<S*> d(n);
  std::vector<const P*> a(n, nullptr);
  std::vector<const P*> b(n, nullptr);
  for (size_t t = 0; t < n; ++t) {
    offsets[t + 1] = offsets[t] + w.params[t].numel();
    p[t] = w.params[t].data_ptr<P>();
    if constexpr (kFromSource) {
      x[t] = w.sources[t].const_data_ptr<P>();
    }
    g[t] = w.grads[t].data_ptr<P>();
    m[t] = w.exp_avgs[t].data_ptr<S>();
    d[t] = w.exp_hz_sqs[t].data_ptr<S>();
    if (!w.inputs.empty()) {
      a[t] = w.inputs[0][t].data_ptr<P>();
    }
    if (w.inputs.size() > 1) {
      b[t] = w.inputs[1][t].data_ptr<P>();
    }
  }
  Coeffs<S> shared = make_coeffs<S>(hyper);
  if constexpr (is_finite_difference(Src)) {
    apply_hz_scale(shared, hyper.hz_scale_inv, *job.hz_scale);
  }
  std::vector<Coeffs<S>> coeffs(n, shared);
  for (size_t t = 0; t < w.step_scalars.size(); ++t) {
    apply_step_scalars(coeffs[t], w.step_scalars[t]);
  }
  const RangeFn<P, S> range = pick_range<P, S, Src, kFromSource>();
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    // Largest t with offsets[t] <= begin, which skips empty tensors.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      const int64_t lo = begin - offsets[t];
      if (stop > begin) {
        range(p[t] + lo, x[t] ? x[t] + lo : nullptr, g[t] + lo, m[t] + lo, d[t] + lo, a[t] ? a[t] + lo : nullptr,
              b[t] ? b[t] + lo : nullptr, stop - begin, coeffs[t]);
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
    const HzInputs& hz,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  const std::unique_ptr<UpdateJob> job = prepare_update(
      op, params, grads, exp_avgs, exp_hz_sqs, hz, step_scalars, c10::DeviceType::CPU);
  if (!job) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "esgd_update_cpu", [&] {
        using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        switch (hz.source) {
          case HzSource::kNone:
            run<scalar_t, S, HzSource::kNone>(*job, hyper);
            break;
          case HzSource::kDirect:
            run<scalar_t, S, HzSource::kDirect>(*job, hyper);
            break;
          case HzSource::kForward:
            if (hz.sources.has_value()) {
              run<scalar_t, S, HzSource::kForward, true>(*job, hyper);
            } else {
              run<scalar_t, S, HzSource::kForward>(*job, hyper);
            }
            break;
          case HzSource::kCentral:
            if (hz.sources.has_value()) {
              run<scalar_t, S, HzSource::kCentral, true>(*job, hyper);
            } else {
              run<scalar_t, S, HzSource::kCentral>(*job, hyper);
            }
            break;
        }
      });
  job->workspace.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CPU, m) {
  m.impl("esgd_update_", &plain_op<&launch>);
  m.impl("esgd_update_hz_", &hz_op<&launch>);
  m.impl("esgd_update_capturable_", &capturable_op<&launch>);
  m.impl("esgd_update_fd_", &fd_op<&launch>);
}

}  // namespace esgd
