// CPU kernels of the probe ops: esgd_rademacher_ (z itself) and esgd_fd_perturb_ (parameters moved
// along z). One at::parallel_for over the concatenation of all tensors, as in esgd_cpu.cpp; the
// bits come from probe.h, one hash per 64 elements.

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

// Byte-wise expansion of probe bits: row b holds the 8 values that the bits of b select (bit k ->
// element k). Copying rows is branch-free and vectorizes on every ISA, whereas testing one bit
// per element compiles to unpredictable branches for 16- and 64-bit elements.
template <typename T>
struct ByteTable {
  T row[256][8];

  ByteTable(T pos, T neg) {
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) {
        row[b][k] = ((b >> k) & 1) ? neg : pos;
      }
    }
  }

  const T* values(uint64_t bits, int byte) const {
    return row[(bits >> (8 * byte)) & 255];
  }
};

// Calls whole(i, bits) for each 64-element run of [lo, hi) that is one whole word of the probe
// starting at index j0, and part(i, count, bits) for the partial runs at either end (bits of the
// run in bits 0..count-1).
template <typename Whole, typename Part>
C10_ALWAYS_INLINE void for_each_word(
    uint64_t key, uint64_t j0, int64_t lo, int64_t hi, Whole&& whole, Part&& part) {
  int64_t i = lo;
  while (i < hi) {
    const uint64_t j = j0 + static_cast<uint64_t>(i);
    const int shift = static_cast<int>(j & 63);
    const int count = static_cast<int>(std::min<int64_t>(64 - shift, hi - i));
    const uint64_t bits = probe_word(key, j >> 6) >> shift;
    if (count == 64) {
      whole(i, bits);
    } else {
      part(i, count, bits);
    }
    i += count;
  }
}

// ------------------------------------------------------------------------------------- rademacher

// Writes the probe as storage words U of the output dtype (the bits of +1 and -1 in that dtype).
template <typename U>
void rademacher_range(U* __restrict__ out, uint64_t key, uint64_t j0, int64_t lo, int64_t hi,
                      const ByteTable<U>& table) {
  for_each_word(
      key, j0, lo, hi,
      [&](int64_t i, uint64_t bits) {
        for (int byte = 0; byte < 8; ++byte) {
          std::memcpy(out + i + 8 * byte, table.values(bits, byte), 8 * sizeof(U));
        }
      },
      [&](int64_t i, int count, uint64_t bits) {
        for (int k = 0; k < count; ++k) {
          out[i + k] = table.row[(bits >> k) & 1][0];
        }
      });
}

// The storage bits of a value in a parameter dtype, from the type's own conversion.
template <typename P, typename U>
U bits_of(float value) {
  static_assert(sizeof(P) == sizeof(U), "storage size");
  const P x = static_cast<P>(value);
  U u;
  std::memcpy(&u, &x, sizeof(U));
  return u;
}

template <typename P>
using StorageOf = std::conditional_t<
    sizeof(P) == 2, uint16_t, std::conditional_t<sizeof(P) == 4, uint32_t, uint64_t>>;

void rademacher_cpu(at::TensorList out, at::IntArrayRef keys, at::IntArrayRef offsets) {
  const std::unique_ptr<ProbeJob> job =
      prepare_rademacher("esgd_rademacher_", out, keys, offsets, c10::DeviceType::CPU);
  if (!job) {
    return;
  }
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "esgd_rademacher_cpu", [&] {
      using U = StorageOf<scalar_t>;
      const auto table = std::make_unique<ByteTable<U>>(
          bits_of<scalar_t, U>(1.0f), bits_of<scalar_t, U>(-1.0f));
      const std::vector<int64_t> numels = job->numels(dtype);
      std::vector<int64_t> starts(numels.size() + 1, 0);
      for (size_t t = 0; t < numels.size(); ++t) {
        starts[t + 1] = starts[t] + numels[t];
      }
      at::parallel_for(0, starts.back(), kGrain, [&](int64_t begin, int64_t end) {
        for_each_piece(starts, begin, end, [&](size_t t, int64_t lo, int64_t hi) {
          U* data = static_cast<U*>(job->lists[0][t].data_ptr());
          rademacher_range<U>(data, job->keys[t], job->offsets[t], lo, hi, *table);
        });
      });
    });
  }
  job->finish();
}

// ---------------------------------------------------------------------------------------- perturb

// params = P(S(x) + perturbation(step, z)), as probe.h's perturbed(), x = params (kSave: also
// copied to backups) or backups.
template <typename P, typename S, bool kSave>
void perturb_range(P* __restrict__ p, P* __restrict__ b, uint64_t key, uint64_t j0, int64_t lo,
                   int64_t hi, const ByteTable<S>& table) {
  auto move = [&](int64_t i, const S* steps, int count) {
    for (int k = 0; k < count; ++k) {
      const P x = kSave ? p[i + k] : b[i + k];
      if constexpr (kSave) {
        b[i + k] = x;
      }
      p[i + k] = static_cast<P>(static_cast<S>(x) + steps[k]);
    }
  };
  for_each_word(
      key, j0, lo, hi,
      [&](int64_t i, uint64_t bits) {
        for (int byte = 0; byte < 8; ++byte) {
          move(i + 8 * byte, table.values(bits, byte), 8);
        }
      },
      [&](int64_t i, int count, uint64_t bits) {
        for (int k = 0; k < count; ++k) {
          move(i + k, table.row[(bits >> k) & 1], 1);
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
      // perturbed(x, step, z) = x + perturbation(step, z): the table holds the two addends.
      const auto table =
          std::make_unique<ByteTable<S>>(perturbation(step, false), perturbation(step, true));
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
            perturb_range<scalar_t, S, true>(p, b, job->keys[t], job->offsets[t], lo, hi, *table);
          } else {
            perturb_range<scalar_t, S, false>(p, b, job->keys[t], job->offsets[t], lo, hi, *table);
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
