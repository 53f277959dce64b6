#pragma once

// The CUDA multi-tensor update, written as host+device code: the kernel in esgd_cuda.cu is a thin
// wrapper around process_block, and for_each_launch is the host loop that fills the by-value
// tables from the plan. The CPU build runs the same two pieces sequentially (one block, one
// thread at a time: threads never communicate), so the indexing, vector/scalar path choice and
// table packing are tested on machines without a GPU.

#include "esgd_common.h"
#include "esgd_math.h"
#include "launch_plan.h"
#include "rounding.h"

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define ESGD_UNROLL _Pragma("unroll")
#else
#define ESGD_UNROLL
#endif

namespace esgd {

constexpr int kBlockSize = 512;
// Elements per thread per iteration, by parameter type: enough that each parameter, gradient and
// Hz access is one 16-byte vector (8 fp16/bf16, 4 fp32, 2 fp64 values), the widest load a thread
// can issue. The fp32 state of 16-bit parameters then takes two 16-byte accesses per list, the
// bf16 state of fp32 parameters one 8-byte access. Several independent loads in flight per thread
// are what hides DRAM latency.
template <typename P>
constexpr int ilp_for() {
  return static_cast<int>(16 / sizeof(P));
}

template <int Depth>
struct MaxTensors;
template <>
struct MaxTensors<4> {
  static constexpr int value = kMaxTensorsDepth4;
};
template <>
struct MaxTensors<5> {
  static constexpr int value = kMaxTensorsDepth5;
};
template <>
struct MaxTensors<6> {
  static constexpr int value = kMaxTensorsDepth6;
};
template <>
struct MaxTensors<7> {
  static constexpr int value = kMaxTensorsDepth7;
};

// Lists a step reads: params, grads, exp_avgs, exp_hz_sqs, then hzs (kDirect), grads_plus
// (kForward, whose base is grads) or grads_plus and grads_minus (kCentral), then, for a
// finite-difference step that reads theta from a saved copy (kFromSource), the sources; params
// are then only written.
template <HzSource Src, bool kFromSource = false>
constexpr int depth_of() {
  static_assert(!kFromSource || is_finite_difference(Src), "sources only enter finite differences");
  return (Src == HzSource::kNone ? 4 : (Src == HzSource::kCentral ? 6 : 5)) + (kFromSource ? 1 : 0);
}

// Passed by value as the kernel argument, one address list per list above.
template <int Depth>
struct TensorTable {
  void* addresses[Depth][MaxTensors<Depth>::value];
  int64_t numel[MaxTensors<Depth>::value];
  // Per-tensor step scalars (apply_step_scalars) of a capturable step; null otherwise.
  const double* step_scalars[MaxTensors<Depth>::value];
  // bfloat16 state: each tensor's rounding key and the index of its first element in the whole
  // parameter (rounding.h). The key is the step's (K) where step_scalars is null; else the base key
  // B, which the kernel combines with the step count in the tensor's table row.
  uint64_t key[MaxTensors<Depth>::value];
  uint64_t offset[MaxTensors<Depth>::value];
  unsigned char block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The device-side multiplier of a finite difference (apply_hz_scale): null `value` otherwise.
struct DeviceScale {
  const double* value;
  double multiplier;
};

static_assert(sizeof(TensorTable<4>) + sizeof(Coeffs<double>) <= 4096, "kernel params > 4 KB");
static_assert(sizeof(TensorTable<5>) + sizeof(Coeffs<double>) + sizeof(DeviceScale) <= 4096,
              "kernel params > 4 KB");
static_assert(sizeof(TensorTable<6>) + sizeof(Coeffs<double>) + sizeof(DeviceScale) <= 4096,
              "kernel params > 4 KB");
static_assert(sizeof(TensorTable<7>) + sizeof(Coeffs<double>) + sizeof(DeviceScale) <= 4096,
              "kernel params > 4 KB");
static_assert(kMaxTensorsDepth4 <= 256 && kMaxTensorsDepth5 <= 256 && kMaxTensorsDepth6 <= 256 &&
                  kMaxTensorsDepth7 <= 256,
              "slots are stored as bytes");

template <typename T, int Ilp>
C10_HOST_DEVICE inline bool is_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * Ilp) == 0;
}

template <typename T, int Ilp>
struct alignas(sizeof(T) * Ilp) Pack {
  T v[Ilp];
};

template <int Ilp, typename T>
C10_HOST_DEVICE inline Pack<T, Ilp> load_pack(const T* ptr, int i) {
  return reinterpret_cast<const Pack<T, Ilp>*>(ptr)[i];
}

template <int Ilp, typename T>
C10_HOST_DEVICE inline void store_pack(T* ptr, int i, const Pack<T, Ilp>& pack) {
  reinterpret_cast<Pack<T, Ilp>*>(ptr)[i] = pack;
}

// The slice of one tensor that block `block` of a launch owns: its chunk of every list.
template <typename P, typename S>
struct BlockSpan {
  P* p;
  const P* g;
  S* m;
  S* d;
  const P* a;  // hzs or grads_plus; null on plain steps
  const P* b;  // grads_minus of a central difference; null otherwise
  const P* x;  // theta's source (kFromSource); null when theta is p
  int n;  // elements in this chunk: kChunkSize, or fewer in a tensor's last chunk
  uint64_t j0;  // rounding index of the chunk's first element (offset + start)
};

template <typename P, typename S, HzSource Src, bool kFromSource>
C10_HOST_DEVICE inline BlockSpan<P, S> block_span(
    const TensorTable<depth_of<Src, kFromSource>()>& table, int block) {
  constexpr int kHzLists = depth_of<Src>() - 4;
  const int slot = table.block_slot[block];
  // 64-bit before the multiply: chunk * kChunkSize exceeds int32 in tensors of >= 2^31 elements.
  const int64_t start = static_cast<int64_t>(table.block_chunk[block]) * kChunkSize;
  const int64_t remaining = table.numel[slot] - start;
  BlockSpan<P, S> s;
  s.n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
  s.p = static_cast<P*>(table.addresses[0][slot]) + start;
  s.g = static_cast<const P*>(table.addresses[1][slot]) + start;
  s.m = static_cast<S*>(table.addresses[2][slot]) + start;
  s.d = static_cast<S*>(table.addresses[3][slot]) + start;
  s.a = nullptr;
  s.b = nullptr;
  s.x = nullptr;
  s.j0 = table.offset[slot] + static_cast<uint64_t>(start);
  if constexpr (kHzLists >= 1) {
    s.a = static_cast<const P*>(table.addresses[4][slot]) + start;
  }
  if constexpr (kHzLists >= 2) {
    s.b = static_cast<const P*>(table.addresses[5][slot]) + start;
  }
  if constexpr (kFromSource) {
    s.x = static_cast<const P*>(table.addresses[4 + kHzLists][slot]) + start;
  }
  return s;
}

// Whether a block can use whole-vector accesses: every list aligned to its vector width and the
// chunk a whole number of vectors. Misaligned views and ragged tails take the scalar path.
template <typename P, typename S>
C10_HOST_DEVICE inline bool takes_vector_path(const BlockSpan<P, S>& s) {
  constexpr int kIlp = ilp_for<P>();
  return s.n % kIlp == 0 && is_aligned<P, kIlp>(s.p) && is_aligned<P, kIlp>(s.g) &&
      is_aligned<S, kIlp>(s.m) && is_aligned<S, kIlp>(s.d) &&
      (s.a == nullptr || is_aligned<P, kIlp>(s.a)) && (s.b == nullptr || is_aligned<P, kIlp>(s.b)) &&
      (s.x == nullptr || is_aligned<P, kIlp>(s.x));
}

// The unscaled curvature estimate of one element, from the values the step loaded: a is hzs or
// grads_plus, b grads_minus, g the gradient (the base of a forward difference).
template <HzSource Src, typename S>
C10_HOST_DEVICE inline S form_hz(S a, S b, S g) {
  if constexpr (Src == HzSource::kDirect) {
    return a;
  } else if constexpr (Src == HzSource::kForward) {
    return fd_difference(a, g);
  } else if constexpr (Src == HzSource::kCentral) {
    return fd_difference(a, b);
  } else {
    return S(0);
  }
}

// The rounding key of a block's tensor for this step (rounding.h): the table holds it, or the base
// key when the step count comes from the tensor's step-scalar row.
template <int Depth>
C10_HOST_DEVICE inline RoundingKey block_rounding_key(const TensorTable<Depth>& table, int slot) {
  const double* row = table.step_scalars[slot];
  if (row != nullptr) {
    return rounding_key(table.key[slot], step_count(row));
  }
  const uint64_t k = table.key[slot];
  return RoundingKey{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}

// The work of thread `thread` (of `threads`) in block `block` of one launch. kFromSource: theta is
// read from the sources and p only written (the restore of a finite-difference step fused in).
// S is the state's storage type: the math runs in math_t<S>, and bfloat16 state is rounded
// stochastically with the element's bits (rounding.h).
template <typename P, typename S, HzSource Src, bool kFromSource = false>
C10_HOST_DEVICE inline void process_block(
    const TensorTable<depth_of<Src, kFromSource>()>& table,
    const Coeffs<math_t<S>>& coeffs,
    const DeviceScale& scale,
    int block,
    int thread,
    int threads) {
  using M = math_t<S>;
  using Store = StateStorage<S>;
  constexpr bool kHasHz = Src != HzSource::kNone;
  constexpr bool kHasB = Src == HzSource::kCentral;
  constexpr int kIlp = ilp_for<P>();
  static_assert(kChunkSize % kIlp == 0, "the vector path assumes whole vectors per chunk");
  const int slot = table.block_slot[block];
  Coeffs<M> c = coeffs;
  if (table.step_scalars[slot] != nullptr) {
    apply_step_scalars(c, table.step_scalars[slot]);
  }
  RoundingKey key{0, 0};
  if constexpr (Store::kRounds) {
    key = block_rounding_key(table, slot);
  }
  if constexpr (is_finite_difference(Src)) {
    apply_hz_scale(c, scale.multiplier, *scale.value);
  }
  const BlockSpan<P, S> span = block_span<P, S, Src, kFromSource>(table, block);
  const int n = span.n;
  const uint64_t j0 = span.j0;
  P* __restrict__ p = span.p;
  const P* __restrict__ g = span.g;
  S* __restrict__ m = span.m;
  S* __restrict__ d = span.d;
  const P* __restrict__ a = span.a;
  const P* __restrict__ b = span.b;
  const P* __restrict__ x = span.x;

  if (takes_vector_path(span)) {
    // Register budget (64, see esgd_cuda.cu): the estimate is formed first, so the lists it
    // comes from die before p and the state arrive; the fp32 state of 16-bit parameters (two
    // 16-byte vectors per list) is updated one vector at a time; and the stride is the
    // compile-time block size (every launch, and the emulation, runs kBlockSize threads), which
    // ptxas folds into the addressing. Each keeps a 6-list or fp64 kernel from spilling. A
    // rounded element's bits are hashed just before its store, from the chunk's index j0.
    constexpr int kStateIlp = kIlp < 16 / static_cast<int>(sizeof(S)) ? kIlp : 16 / static_cast<int>(sizeof(S));
    constexpr int kStateVectors = kIlp / kStateIlp;
    for (int i = thread; i * kIlp < n; i += kBlockSize) {
      const Pack<P, kIlp> gp = load_pack<kIlp>(g, i);
      M hz[kIlp] = {};
      if constexpr (kHasHz) {
        const Pack<P, kIlp> ap = load_pack<kIlp>(a, i);
        Pack<P, kIlp> bp{};
        if constexpr (kHasB) {
          bp = load_pack<kIlp>(b, i);
        }
        ESGD_UNROLL
        for (int k = 0; k < kIlp; ++k) {
          hz[k] = form_hz<Src>(static_cast<M>(ap.v[k]), static_cast<M>(bp.v[k]), static_cast<M>(gp.v[k]));
        }
      }
      Pack<P, kIlp> pp;
      if constexpr (kFromSource) {
        pp = load_pack<kIlp>(x, i);
      } else {
        pp = load_pack<kIlp>(p, i);
      }
      ESGD_UNROLL
      for (int half = 0; half < kStateVectors; ++half) {
        const int j = i * kStateVectors + half;
        Pack<S, kStateIlp> mp = load_pack<kStateIlp>(m, j);
        Pack<S, kStateIlp> dp = load_pack<kStateIlp>(d, j);
        ESGD_UNROLL
        for (int q = 0; q < kStateIlp; ++q) {
          const int k = half * kStateIlp + q;
          M pk = static_cast<M>(pp.v[k]);
          M mk = Store::load(mp.v[q]);
          M dk = Store::load(dp.v[q]);
          update<kHasHz>(pk, static_cast<M>(gp.v[k]), mk, dk, hz[k], c);
          pp.v[k] = static_cast<P>(pk);
          uint32_t r = 0;
          if constexpr (Store::kRounds) {
            r = rounding_bits(key, j0 + static_cast<uint64_t>(i * kIlp + k));
          }
          mp.v[q] = Store::store(mk, m_bits(r));
          if constexpr (kHasHz) {
            dp.v[q] = Store::store(dk, d_bits(r));
          }
        }
        store_pack<kStateIlp>(m, j, mp);
        if constexpr (kHasHz) {
          store_pack<kStateIlp>(d, j, dp);
        }
      }
      store_pack<kIlp>(p, i, pp);
    }
    return;
  }

  // Misaligned views or a ragged tail: strided scalar accesses, still several loads in flight per
  // list. With rounded state the plain 16-bit kernel takes half as many (the element hashes beside
  // eight lanes of every list spilled it past its 64 registers; the estimation kernels, measured
  // with ptxas, allocate better with all eight); which thread takes an element changes nothing in
  // the result.
  constexpr int kScalarIlp = Store::kRounds && sizeof(P) == 2 && Src == HzSource::kNone ? kIlp / 2 : kIlp;
  for (int base = 0; base < n; base += threads * kScalarIlp) {
    // Zero-filled so that lanes past n hold defined values; they are never stored.
    M pr[kScalarIlp] = {}, gr[kScalarIlp] = {}, mr[kScalarIlp] = {}, dr[kScalarIlp] = {}, hr[kScalarIlp] = {};
    ESGD_UNROLL
    for (int k = 0; k < kScalarIlp; ++k) {
      const int i = base + thread + k * threads;
      if (i < n) {
        if constexpr (kFromSource) {
          pr[k] = static_cast<M>(x[i]);
        } else {
          pr[k] = static_cast<M>(p[i]);
        }
        gr[k] = static_cast<M>(g[i]);
        mr[k] = Store::load(m[i]);
        dr[k] = Store::load(d[i]);
        const M ak = kHasHz ? static_cast<M>(a[i]) : M(0);
        const M bk = kHasB ? static_cast<M>(b[i]) : M(0);
        hr[k] = form_hz<Src>(ak, bk, gr[k]);
      }
    }
    ESGD_UNROLL
    for (int k = 0; k < kScalarIlp; ++k) {
      const int i = base + thread + k * threads;
      if (i < n) {
        update<kHasHz>(pr[k], gr[k], mr[k], dr[k], hr[k], c);
        p[i] = static_cast<P>(pr[k]);
        uint32_t r = 0;
        if constexpr (Store::kRounds) {
          r = rounding_bits(key, j0 + static_cast<uint64_t>(i));
        }
        m[i] = Store::store(mr[k], m_bits(r));
        if constexpr (kHasHz) {
          d[i] = Store::store(dr[k], d_bits(r));
        }
      }
    }
  }
}

// Plans the launches for a job and calls launch(table, blocks) for each, in order.
template <HzSource Src, bool kFromSource, typename LaunchFn>
void for_each_launch(const UpdateJob& job, LaunchFn&& launch) {
  const Workspace& w = job.workspace;
  constexpr int kDepth = depth_of<Src, kFromSource>();
  constexpr int kHzLists = depth_of<Src>() - 4;
  TORCH_INTERNAL_ASSERT(w.inputs.size() == static_cast<size_t>(kHzLists));
  TORCH_INTERNAL_ASSERT(w.sources.empty() != kFromSource);
  std::vector<int64_t> numels(w.params.size());
  for (size_t t = 0; t < numels.size(); ++t) {
    numels[t] = w.params[t].numel();
  }
  for (const Launch& plan :
       plan_launches(numels, kChunkSize, MaxTensors<kDepth>::value, kMaxBlocks)) {
    TensorTable<kDepth> table;
    for (size_t slot = 0; slot < plan.tensors.size(); ++slot) {
      const int64_t t = plan.tensors[slot];
      table.addresses[0][slot] = w.params[t].data_ptr();
      table.addresses[1][slot] = w.grads[t].data_ptr();
      table.addresses[2][slot] = w.exp_avgs[t].data_ptr();
      table.addresses[3][slot] = w.exp_hz_sqs[t].data_ptr();
      for (int k = 0; k < kHzLists; ++k) {
        table.addresses[4 + k][slot] = w.inputs[k][t].data_ptr();
      }
      if constexpr (kFromSource) {
        // Read-only: const_data_ptr, so that a source is never materialized as if written.
        table.addresses[4 + kHzLists][slot] = const_cast<void*>(w.sources[t].const_data_ptr());
      }
      table.numel[slot] = numels[t];
      table.step_scalars[slot] = w.step_scalars.empty() ? nullptr : w.step_scalars[t];
      table.key[slot] = 0;
      table.offset[slot] = 0;
      if (job.rounds) {
        // The step's key where the host knows the step count; the base key for the kernel to
        // combine with the table's count otherwise (block_rounding_key).
        table.key[slot] = w.step_scalars.empty() ? probe_word(job.keys[t], job.step) : job.keys[t];
        table.offset[slot] = job.offsets[t];
      }
    }
    const int blocks = static_cast<int>(plan.block_slot.size());
    for (int b = 0; b < blocks; ++b) {
      table.block_slot[b] = static_cast<unsigned char>(plan.block_slot[b]);
      table.block_chunk[b] = static_cast<int32_t>(plan.block_chunk[b]);
    }
    launch(table, blocks);
  }
}

}  // namespace esgd
