// CPU kernels of the probe ops: esgd_rademacher_ (z itself) and esgd_fd_perturb_ (parameters moved
// along z). One at::parallel_for over the concatenation of all tensors, as in esgd_cpu.cpp; the
// bits come from probe.h, one hash per 64 elements.

#include "cpu_clones.h"
#include "esgd_common.h"
#include "probe.h"
#include "probe_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "probes_cpu.cpp compiled without OpenMP: the probe kernels will run on one thread"
#endif

namespace esgd {

namespace {

constexpr int64_t kGrain = 32768;

// Calls fn(t, lo, hi) for the part [lo, hi) of tensor t that falls into [begin, end) of the
// concatenation whose prefix sums are `starts`.
template <typename Fn>
void for_each_piece(const std::vector<int64_t>& starts, int64_t begin, int64_t end, Fn&& fn) {
  size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  while (begin < end) {
    const int64_t stop = std::min(end, starts[t + 1]);
    if (stop > begin) {
      fn(t, begin - starts[t], stop - starts[t]);
    }
    begin = stop;
    ++t;
  }
}

// Splits elements [lo, hi) of a probe that starts at index j0 into runs that stay within one
// 64-bit word and calls fn(first element, count, bits of the run in bits 0..count-1).
template <typename Fn>
C10_ALWAYS_INLINE void for_each_word(uint64_t key, uint64_t j0, int64_t lo, int64_t hi, Fn&& fn) {
  int64_t i = lo;
  while (i < hi) {
    const uint64_t j = j0 + static_cast<uint64_t>(i);
    const int shift = static_cast<int>(j & 63);
    const int count = static_cast<int>(std::min<int64_t>(64 - shift, hi - i));
    fn(i, count, probe_word(key, j >> 6) >> shift);
    i += count;
  }
}

// ------------------------------------------------------------------------------------- rademacher

// Whole words are expanded in lanes as wide as the output type, testing one bit per lane against
// a constant mask, so that the loop vectorizes on every ISA (SSE2 has no variable shifts).
template <typename U>
C10_ALWAYS_INLINE void expand_word(U* __restrict__ out, uint64_t bits, U pos, U neg) {
  constexpr int kWidth = 8 * sizeof(U);
  for (int part = 0; part < 64 / kWidth; ++part) {
    const U chunk = static_cast<U>(bits >> (part * kWidth));
    U* __restrict__ dst = out + part * kWidth;
    for (int k = 0; k < kWidth; ++k) {
      dst[k] = (chunk & static_cast<U>(U(1) << k)) ? neg : pos;
    }
  }
}

template <typename U>
C10_ALWAYS_INLINE void rademacher_range(
    U* __restrict__ out, uint64_t key, uint64_t j0, int64_t lo, int64_t hi, U pos, U neg) {
  for_each_word(key, j0, lo, hi, [&](int64_t i, int count, uint64_t bits) {
    if (count == 64) {
      expand_word(out + i, bits, pos, neg);
      return;
    }
    for (int k = 0; k < count; ++k) {
      out[i + k] = ((bits >> k) & 1) ? neg : pos;
    }
  });
}

#define ESGD_DEFINE_RADEMACHER(U, NAME)                                                     \
  ESGD_CPU_CLONES void NAME(U* out, uint64_t key, uint64_t j0, int64_t lo, int64_t hi, U pos, \
                            U neg) {                                                        \
    rademacher_range<U>(out, key, j0, lo, hi, pos, neg);                                    \
  }
ESGD_DEFINE_RADEMACHER(uint16_t, rademacher_u16)
ESGD_DEFINE_RADEMACHER(uint32_t, rademacher_u32)
ESGD_DEFINE_RADEMACHER(uint64_t, rademacher_u64)
#undef ESGD_DEFINE_RADEMACHER

// The storage bits of +1 or -1 in a parameter dtype, from the type's own conversion.
template <typename P, typename U>
U bits_of(float value) {
  static_assert(sizeof(P) == sizeof(U), "storage size");
  const P x = static_cast<P>(value);
  U u;
  std::memcpy(&u, &x, sizeof(U));
  return u;
}

struct RademacherTensor {
  void* data;
  int size;  // bytes per element
  uint64_t pos;
  uint64_t neg;
};

void rademacher_cpu(at::TensorList out, at::IntArrayRef keys, at::IntArrayRef offsets) {
  const std::unique_ptr<ProbeJob> job =
      prepare_rademacher("esgd_rademacher_", out, keys, offsets, c10::DeviceType::CPU);
  if (!job) {
    return;
  }
  const std::vector<at::Tensor>& tensors = job->lists[0];
  const size_t n = tensors.size();
  std::vector<int64_t> starts(n + 1, 0);
  std::vector<RademacherTensor> info(n);
  for (size_t t = 0; t < n; ++t) {
    starts[t + 1] = starts[t] + tensors[t].numel();
    info[t].data = tensors[t].data_ptr();
    info[t].size = static_cast<int>(tensors[t].element_size());
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, tensors[t].scalar_type(), "esgd_rademacher_cpu", [&] {
          using U = std::conditional_t<
              sizeof(scalar_t) == 2, uint16_t, std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
          info[t].pos = bits_of<scalar_t, U>(1.0f);
          info[t].neg = bits_of<scalar_t, U>(-1.0f);
        });
  }
  at::parallel_for(0, starts[n], kGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(starts, begin, end, [&](size_t t, int64_t lo, int64_t hi) {
      const RademacherTensor& r = info[t];
      const uint64_t key = job->keys[t];
      const uint64_t j0 = job->offsets[t];
      switch (r.size) {
        case 2:
          rademacher_u16(static_cast<uint16_t*>(r.data), key, j0, lo, hi, r.pos, r.neg);
          break;
        case 4:
          rademacher_u32(static_cast<uint32_t*>(r.data), key, j0, lo, hi, r.pos, r.neg);
          break;
        default:
          rademacher_u64(static_cast<uint64_t*>(r.data), key, j0, lo, hi, r.pos, r.neg);
          break;
      }
    });
  });
  job->finish();
}

// ---------------------------------------------------------------------------------------- perturb

template <typename P, typename S, bool kSave>
void perturb_range(P* __restrict__ p, P* __restrict__ b, uint64_t key, uint64_t j0, int64_t lo,
                   int64_t hi, S step) {
  for_each_word(key, j0, lo, hi, [&](int64_t i, int count, uint64_t bits) {
    for (int k = 0; k < count; ++k) {
      const P x = kSave ? p[i + k] : b[i + k];
      if constexpr (kSave) {
        b[i + k] = x;
      }
      p[i + k] = static_cast<P>(perturbed<S>(static_cast<S>(x), step, (bits >> k) & 1));
    }
  });
}

void perturb_cpu(
    at::TensorList params,
    at::TensorList backups,
    const at::Tensor& scale,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    double sign,
    bool save) {
  const std::unique_ptr<ProbeJob> job = prepare_perturb(
      "esgd_fd_perturb_", params, backups, scale, keys, offsets, save, c10::DeviceType::CPU);
  if (!job) {
    return;
  }
  const double h = *job->scale;
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "esgd_fd_perturb_cpu", [&] {
      using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const S step = static_cast<S>(sign * h);
      const std::vector<int64_t> numels = job->numels(dtype);
      std::vector<int64_t> starts(numels.size() + 1, 0);
      for (size_t t = 0; t < numels.size(); ++t) {
        starts[t + 1] = starts[t] + numels[t];
      }
      at::parallel_for(0, starts.back(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_piece(starts, begin, end, [&](size_t t, int64_t lo, int64_t hi) {
          scalar_t* p = job->lists[0][t].data_ptr<scalar_t>();
          scalar_t* b = job->lists[1][t].data_ptr<scalar_t>();
          if (save) {
            perturb_range<scalar_t, S, true>(p, b, job->keys[t], job->offsets[t], lo, hi, step);
          } else {
            perturb_range<scalar_t, S, false>(p, b, job->keys[t], job->offsets[t], lo, hi, step);
          }
        });
      });
    });
  }
  job->finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CPU, m) {
  m.impl("esgd_rademacher_", &rademacher_cpu);
  m.impl("esgd_fd_perturb_", &perturb_cpu);
}

}  // namespace esgd
