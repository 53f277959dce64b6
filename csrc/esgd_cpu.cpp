// Fused CPU kernel: one at::parallel_for over the concatenation of all tensors, so small tensors
// do not each pay a thread-pool round trip and large ones are split across threads.

#include "cpu_clones.h"
#include "esgd_common.h"
#include "esgd_math.h"
#include "rounding.h"

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

// A run of elements' rounding bits: element i of the run hashes index j0 + i (rounding.h), whose
// upper word is constant over the run (runs are split where it changes), so the loop works in
// uint32 only, which AVX2 vectorizes.
struct RunKey {
  uint32_t low;  // lo32(K)
  uint32_t add;  // (hi32(j) ^ hi32(K)) * golden
  uint32_t j0;   // lo32 of the run's first index
};

// a: hzs or grads_plus; b: grads_minus (HzSource); x: theta's source when kFromSource (p is then
// only written: the restore of a finite-difference step fused into its update), unused otherwise.
// S is the state's storage type: float or double, or bfloat16 rounded stochastically with `key`.
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
    const Coeffs<math_t<S>>& coeffs,
    const RunKey& key) {
  using M = math_t<S>;
  using Store = StateStorage<S>;
  constexpr bool kHasHz = Src != HzSource::kNone;
  const Coeffs<M> c = coeffs;  // a local copy, so the compiler knows stores cannot alias it
  const RunKey k = key;
  // The rounding index's low word, counted in 32 bits beside i: derived from the 64-bit i, the
  // vectorizer would carry 64-bit lanes and narrow them every iteration.
  uint32_t j = k.j0;
  for (int64_t i = 0; i < n; ++i, ++j) {
    M pi;
    if constexpr (kFromSource) {
      pi = static_cast<M>(x[i]);
    } else {
      pi = static_cast<M>(p[i]);
    }
    const M gi = static_cast<M>(g[i]);
    M mi = Store::load(m[i]);
    M di = Store::load(d[i]);
    M hi = M(0);
    if constexpr (Src == HzSource::kDirect) {
      hi = static_cast<M>(a[i]);
    } else if constexpr (Src == HzSource::kForward) {
      hi = fd_difference(static_cast<M>(a[i]), gi);
    } else if constexpr (Src == HzSource::kCentral) {
      hi = fd_difference(static_cast<M>(a[i]), static_cast<M>(b[i]));
    }
    update<kHasHz>(pi, gi, mi, di, hi, c);
    p[i] = static_cast<P>(pi);
    uint32_t r = 0;
    if constexpr (Store::kRounds) {
      r = lowbias32((j ^ k.low) + k.add);
    }
    m[i] = Store::store(mi, m_bits(r));
    if constexpr (kHasHz) {
      d[i] = Store::store(di, d_bits(r));
    }
  }
}

template <typename P, typename S>
using RangeFn = void (*)(P*, const P*, const P*, S*, S*, const P*, const P*, int64_t,
                         const Coeffs<math_t<S>>&, const RunKey&);

template <typename P, typename S, HzSource Src, bool kFromSource>
struct Range;

// target_clones needs plain functions, hence one per (param type, state type, hz source, whether
// theta comes from sources). scripts/check_cpu_vectorization.py names them. Their pointers are
// restrict-qualified as update_range's: with bfloat16 parameters and bfloat16 state every list is
// 16-bit, so type-based alias analysis separates none of them, and GCC gives up vectorizing rather
// than check each written list against every other at run time (more than its 10 checks).
#define ESGD_DEFINE_RANGE(P, S, SRC, FROM, NAME)                                                 \
  ESGD_CPU_CLONES void NAME(P* __restrict__ p, const P* __restrict__ x, const P* __restrict__ g, \
                            S* __restrict__ m, S* __restrict__ d, const P* __restrict__ a,       \
                            const P* __restrict__ b, int64_t n, const Coeffs<math_t<S>>& c,      \
                            const RunKey& k) {                                                   \
    update_range<P, S, HzSource::SRC, FROM>(p, x, g, m, d, a, b, n, c, k);                       \
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
// bfloat16 state (stochastic rounding): float32 and bfloat16 parameters; float16 parameters take
// the F16C loop below (their range_f16_sbf16 clones are the fallback of CPUs without F16C).
ESGD_DEFINE_RANGES(float, at::BFloat16, range_f32_sbf16)
ESGD_DEFINE_RANGES(at::BFloat16, at::BFloat16, range_bf16_sbf16)
ESGD_DEFINE_RANGES(at::Half, at::BFloat16, range_f16_sbf16)
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

template <typename S, HzSource Src, bool kFromSource>
__attribute__((target("avx2,f16c"))) void range_f16_f16c(
    at::Half* p, const at::Half* x, const at::Half* g, S* m, S* d, const at::Half* a,
    const at::Half* b, int64_t n, const Coeffs<float>& c, const RunKey& key) {
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
    const RunKey k{key.low, key.add, key.j0 + static_cast<uint32_t>(i)};
    update_range<float, S, Src, false>(pb, nullptr, gb, m + i, d + i, ab, bb, len, c, k);
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
      return &range_f16_f16c<S, Src, kFromSource>;
    }
  }
#endif
  return Range<P, S, Src, kFromSource>::fn;
}

// Calls range(lo, hi, run key) for the pieces of [lo, hi) of tensor t over which the upper word of
// the rounding index (offset + i) is constant; one piece unless the tensor spans a multiple of 2^32.
template <typename Fn>
void for_each_run(const UpdateJob& job, const RoundingKey& key, size_t t, int64_t lo, int64_t hi, Fn&& range) {
  if (!job.rounds) {
    range(lo, hi, RunKey{0, 0, 0});
    return;
  }
  while (lo < hi) {
    const uint64_t j = job.offsets[t] + static_cast<uint64_t>(lo);
    const uint64_t to_boundary = (uint64_t{1} << 32) - (j & 0xFFFFFFFFull);
    const int64_t stop = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(hi - lo), to_boundary)) + lo;
    const uint32_t add = (static_cast<uint32_t>(j >> 32) ^ key.high) * kRoundingGolden;
    range(lo, stop, RunKey{key.low, add, static_cast<uint32_t>(j)});
    lo = stop;
  }
}

template <typename P, typename S, HzSource Src, bool kFromSource = false>
void run(const UpdateJob& job, const Hyper& hyper) {
  using M = math_t<S>;
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
  std::vector<RoundingKey> keys(n, RoundingKey{0, 0});
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
    if (job.rounds) {
      const uint64_t step = w.step_scalars.empty() ? job.step : step_count(w.step_scalars[t]);
      keys[t] = rounding_key(job.keys[t], step);
    }
  }
  Coeffs<M> shared = make_coeffs<M>(hyper);
  if constexpr (is_finite_difference(Src)) {
    apply_hz_scale(shared, hyper.hz_scale_inv, *job.hz_scale);
  }
  std::vector<Coeffs<M>> coeffs(n, shared);
  for (size_t t = 0; t < w.step_scalars.size(); ++t) {
    apply_step_scalars(coeffs[t], w.step_scalars[t]);
  }
  const RangeFn<P, S> range = pick_range<P, S, Src, kFromSource>();
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    // Largest t with offsets[t] <= begin, which skips empty tensors.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > begin) {
        for_each_run(job, keys[t], t, begin - offsets[t], stop - offsets[t],
                     [&](int64_t lo, int64_t hi, const RunKey& k) {
                       range(p[t] + lo, x[t] ? x[t] + lo : nullptr, g[t] + lo, m[t] + lo, d[t] + lo,
                             a[t] ? a[t] + lo : nullptr, b[t] ? b[t] + lo : nullptr, hi - lo,
                             coeffs[t], k);
                     });
      }
      begin = stop;
      ++t;
    }
  });
}

// The state storage type of a job, then run<P, S, ...>: bfloat16 (rounded) or the default.
template <typename P, HzSource Src, bool kFromSource = false>
void run_state(const UpdateJob& job, const Hyper& hyper) {
  using Default = std::conditional_t<std::is_same_v<P, double>, double, float>;
  if constexpr (!std::is_same_v<P, double>) {
    if (job.rounds) {
      run<P, at::BFloat16, Src, kFromSource>(job, hyper);
      return;
    }
  }
  run<P, Default, Src, kFromSource>(job, hyper);
}

void launch(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  const std::unique_ptr<UpdateJob> job = prepare_update(
      op, params, grads, exp_avgs, exp_hz_sqs, hz, rounding, step_scalars, c10::DeviceType::CPU);
  if (!job) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "esgd_update_cpu", [&] {
        switch (hz.source) {
          case HzSource::kNone:
            run_state<scalar_t, HzSource::kNone>(*job, hyper);
            break;
          case HzSource::kDirect:
            run_state<scalar_t, HzSource::kDirect>(*job, hyper);
            break;
          case HzSource::kForward:
            if (hz.sources.has_value()) {
              run_state<scalar_t, HzSource::kForward, true>(*job, hyper);
            } else {
              run_state<scalar_t, HzSource::kForward>(*job, hyper);
            }
            break;
          case HzSource::kCentral:
            if (hz.sources.has_value()) {
              run_state<scalar_t, HzSource::kCentral, true>(*job, hyper);
            } else {
              run_state<scalar_t, HzSource::kCentral>(*job, hyper);
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
