// Fused CPU kernel: one at::parallel_for over the concatenation of all tensors, so small tensors
// do not each pay a thread-pool round trip and large ones are split across threads.

#include "esgd_common.h"
#include "esgd_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace esgd {

template <typename T>
struct Sqrt<at::vec::Vectorized<T>> {
  static inline at::vec::Vectorized<T> apply(const at::vec::Vectorized<T>& x) {
    return x.sqrt();
  }
};

namespace {

// Elements per parallel task: big enough that the fork cost is noise, small enough that a
// 19M-element model still spreads over every core.
constexpr int64_t kGrain = 32768;

template <typename T>
Coeffs<at::vec::Vectorized<T>> broadcast(const Coeffs<T>& c) {
  using Vec = at::vec::Vectorized<T>;
  return Coeffs<Vec>{
      Vec(c.beta1), Vec(c.one_minus_beta1), Vec(c.beta2), Vec(c.one_minus_beta2), Vec(c.v),
      Vec(c.one_minus_v), Vec(c.eps), Vec(c.decay), Vec(c.lr_scale), Vec(c.denom_scale)};
}

// Loads Vec::size() parameter-typed values as math-typed lanes. For 16-bit parameters the
// conversion goes through a small buffer, which the compiler turns into packed converts.
template <typename P, typename S>
inline at::vec::Vectorized<S> load_as(const P* src) {
  using Vec = at::vec::Vectorized<S>;
  if constexpr (std::is_same_v<P, S>) {
    return Vec::loadu(src);
  } else {
    alignas(64) S buf[Vec::size()];
    for (int k = 0; k < Vec::size(); ++k) {
      buf[k] = static_cast<S>(src[k]);
    }
    return Vec::loadu(buf);
  }
}

template <typename P, typename S>
inline void store_as(P* dst, const at::vec::Vectorized<S>& value) {
  using Vec = at::vec::Vectorized<S>;
  if constexpr (std::is_same_v<P, S>) {
    value.store(dst);
  } else {
    alignas(64) S buf[Vec::size()];
    value.store(buf);
    for (int k = 0; k < Vec::size(); ++k) {
      dst[k] = static_cast<P>(buf[k]);
    }
  }
}

template <typename P, typename S, bool kHasHz>
void update_range(
    P* p,
    const P* g,
    S* m,
    S* d,
    const P* hz,
    int64_t n,
    const Coeffs<S>& c,
    const Coeffs<at::vec::Vectorized<S>>& cv) {
  using Vec = at::vec::Vectorized<S>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec pv = load_as<P, S>(p + i);
    const Vec gv = load_as<P, S>(g + i);
    Vec mv = Vec::loadu(m + i);
    Vec dv = Vec::loadu(d + i);
    const Vec hv = kHasHz ? load_as<P, S>(hz + i) : Vec(S(0));
    update<kHasHz>(pv, gv, mv, dv, hv, cv);
    store_as<P, S>(p + i, pv);
    mv.store(m + i);
    if constexpr (kHasHz) {
      dv.store(d + i);
    }
  }
  for (; i < n; ++i) {
    S pi = static_cast<S>(p[i]);
    const S gi = static_cast<S>(g[i]);
    S mi = m[i];
    S di = d[i];
    const S hi = kHasHz ? static_cast<S>(hz[i]) : S(0);
    update<kHasHz>(pi, gi, mi, di, hi, c);
    p[i] = static_cast<P>(pi);
    m[i] = mi;
    if constexpr (kHasHz) {
      d[i] = di;
    }
  }
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
  const Coeffs<S> c = make_coeffs<S>(hyper);
  const Coeffs<at::vec::Vectorized<S>> cv = broadcast(c);
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    // Largest t with offsets[t] <= begin, which skips empty tensors.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      const int64_t lo = begin - offsets[t];
      if (stop > begin) {
        update_range<P, S, kHasHz>(
            p[t] + lo, g[t] + lo, m[t] + lo, d[t] + lo, kHasHz ? hz[t] + lo : nullptr,
            stop - begin, c, cv);
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
    const Hyper& hyper) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hzs, c10::DeviceType::CPU);
  if (params.empty()) {
    return;
  }
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hzs);
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

void esgd_update_cpu(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    double beta1,
    double v,
    double eps,
    double weight_decay,
    double step_size,
    double momentum_scale,
    double denom_scale) {
  const Hyper hyper{beta1, 0.0, v, eps, weight_decay, step_size, momentum_scale, denom_scale};
  launch("esgd_update_", params, grads, exp_avgs, exp_hz_sqs, nullptr, hyper);
}

void esgd_update_hz_cpu(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    at::TensorList hzs,
    double beta1,
    double beta2,
    double v,
    double eps,
    double weight_decay,
    double step_size,
    double momentum_scale,
    double denom_scale) {
  const Hyper hyper{beta1, beta2, v, eps, weight_decay, step_size, momentum_scale, denom_scale};
  launch("esgd_update_hz_", params, grads, exp_avgs, exp_hz_sqs, &hzs, hyper);
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CPU, m) {
  m.impl("esgd_update_", &esgd_update_cpu);
  m.impl("esgd_update_hz_", &esgd_update_hz_cpu);
}

}  // namespace esgd
