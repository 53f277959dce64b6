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

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// out[i - lo] = the table's value for probe element j0 + i, for i in [lo, hi): the probe itself as
// storage words of the output dtype (rademacher_), or the steps +-h of a perturbation.
template <typename T>
void expand_probe(T* __restrict__ out, uint64_t key, uint64_t j0, int64_t lo, int64_t hi,
                  const ByteTable<T>& table) {
  for_each_word(
      key, j0, lo, hi,
      [&](int64_t i, uint64_t bits) {
        for (int byte = 0; byte < 8; ++byte) {
          std::memcpy(out + (i - lo) + 8 * byte, table.values(bits, byte), 8 * sizeof(T));
        }
      },
      [&](int64_t i, int count, uint64_t bits) {
        for (int k = 0; k < count; ++k) {
          out[i - lo + k] = table.row[(bits >> k) & 1][0];
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
          expand_probe<U>(data + lo, job->keys[t], job->offsets[t], lo, hi, *table);
        });
      });
    });
  }
  job->finish();
}

// ---------------------------------------------------------------------------------------- perturb

// Copies `bytes` from src to dst, storing the 16-byte-aligned bulk with non-temporal (streaming)
// stores. The parameters' copy is not read again until the restore, after a whole forward and
// backward, so caching it only evicts the parameters, and an ordinary store first reads the line it
// writes (write-allocate). On the 2-core machine of RESULTS.md (12.4M float32 parameters, 2
// threads) the perturbation with its copy took 2.5 ms this way and 5-10 ms with ordinary stores.
// The caller issues stream_fence() before the data is read elsewhere.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
  head = std::min(head, bytes);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
    const __m128i v2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
    const __m128i v3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), v0);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), v1);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), v2);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), v3);
  }
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Streaming stores are weakly ordered: each thread fences its own before the parallel region ends.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The perturbation's element loops, p = P(S(x) + steps[k]) with x = p (_inplace) or a backup
// (_from): plain functions over restrict pointers, so that the compiler vectorizes them and
// target_clones can clone them for AVX-512 and AVX2 (cpu_clones.h). The names follow
// scripts/check_cpu_vectorization.py: range_* clones must be vectorized, except float16's
// ("range_f16_"), which the AVX2 clone (without F16C) cannot convert in vectors.
#define ESGD_DEFINE_PERTURB(P, S, NAME)                                                          \
  ESGD_CPU_CLONES void NAME##_inplace(P* __restrict__ p, const S* __restrict__ steps, int64_t n) { \
    for (int64_t k = 0; k < n; ++k) {                                                          \
      p[k] = static_cast<P>(static_cast<S>(p[k]) + steps[k]);                                  \
    }                                                                                          \
  }                                                                                            \
  ESGD_CPU_CLONES void NAME##_from(                                                            \
      P* __restrict__ p, const P* __restrict__ b, const S* __restrict__ steps, int64_t n) {    \
    for (int64_t k = 0; k < n; ++k) {                                                          \
      p[k] = static_cast<P>(static_cast<S>(b[k]) + steps[k]);                                  \
    }                                                                                          \
  }                                                                                            \
  inline void add_steps(P* p, const S* steps, int64_t n) {                                    \
    NAME##_inplace(p, steps, n);                                                               \
  }                                                                                            \
  inline void add_steps(P* p, const P* b, const S* steps, int64_t n) {                         \
    NAME##_from(p, b, steps, n);                                                               \
  }

ESGD_DEFINE_PERTURB(float, float, range_perturb_f32)
ESGD_DEFINE_PERTURB(double, double, range_perturb_f64)
ESGD_DEFINE_PERTURB(at::BFloat16, float, range_perturb_bf16)
ESGD_DEFINE_PERTURB(at::Half, float, range_f16_perturb)
#undef ESGD_DEFINE_PERTURB

// Elements per run: the run's part of the parameters is copied to the backup (so the in-place
// pass then reads it from L1), and the probe's steps are expanded into a stack buffer (table
// rows, branch-free) before one vectorized pass applies them.
constexpr int64_t kPerturbRun = 512;

// params = P(S(x) + perturbation(step, z)) over [lo, hi), as probe.h's perturbed(); x = params
// (save: also copied to backups) or backups.
template <typename P, typename S>
void perturb_range(P* p, P* b, uint64_t key, uint64_t j0, int64_t lo, int64_t hi, bool save,
                   const ByteTable<S>& table) {
  alignas(64) S steps[kPerturbRun];
  for (int64_t start = lo, stop = lo; start < hi; start = stop) {
    // Runs end where the probe index is a multiple of kPerturbRun, so only a range's first and
    // last runs can hold part of a probe word (a part takes the per-element path).
    const int64_t to_boundary =
        kPerturbRun - static_cast<int64_t>((j0 + static_cast<uint64_t>(start)) % kPerturbRun);
    stop = std::min(hi, start + to_boundary);
    expand_probe<S>(steps, key, j0, start, stop, table);
    if (save) {
      stream_copy(b + start, p + start, static_cast<size_t>(stop - start) * sizeof(P));
      add_steps(p + start, steps, stop - start);
    } else {
      add_steps(p + start, b + start, steps, stop - start);
    }
  }
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
          perturb_range<scalar_t, S>(p, b, job->keys[t], job->offsets[t], lo, hi, save, *table);
        });
        stream_fence();
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
