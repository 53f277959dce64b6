#pragma once

// The CUDA probe kernels (esgd_rademacher_, esgd_fd_perturb_) as host+device code, like
// multi_tensor.h: probes_cuda.cu wraps the per-block functions in kernels, and the CPU build runs
// them one block and one thread at a time (cuda_emulation.cpp), so the plan, the table packing,
// the vector/scalar choice and the bits are tested without a GPU. z is generated in registers
// from (key, index) and never stored, except by esgd_rademacher_, whose output it is.

#include "multi_tensor.h"
#include "probe.h"
#include "probe_common.h"

#include <cstdint>
#include <vector>

namespace esgd {

// Passed by value as the kernel argument. Lists: out (rademacher), or params and backups (perturb).
template <int Lists>
struct ProbeTable {
  void* addresses[Lists][kMaxTensorsProbe];
  int64_t numel[kMaxTensorsProbe];
  uint64_t key[kMaxTensorsProbe];
  uint64_t offset[kMaxTensorsProbe];
  unsigned char block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The perturbation kernel's other arguments: h on the device and the direction.
struct PerturbArgs {
  const double* scale;
  double sign;
};

static_assert(sizeof(ProbeTable<1>) <= 4096, "kernel params > 4 KB");
static_assert(sizeof(ProbeTable<2>) + sizeof(PerturbArgs) <= 4096, "kernel params > 4 KB");
static_assert(kMaxTensorsProbe <= 256, "slots are stored as bytes");

// One block's chunk: its first element's index within the tensor, the number of elements, and the
// probe index of its first element.
struct ProbeSpan {
  int64_t start;
  int n;
  uint64_t key;
  uint64_t j0;
};

template <int Lists>
C10_HOST_DEVICE inline ProbeSpan probe_span(const ProbeTable<Lists>& table, int block) {
  const int slot = table.block_slot[block];
  // 64-bit before the multiply: chunk * kChunkSize exceeds int32 in tensors of >= 2^31 elements.
  const int64_t start = static_cast<int64_t>(table.block_chunk[block]) * kChunkSize;
  const int64_t remaining = table.numel[slot] - start;
  ProbeSpan s;
  s.start = start;
  s.n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
  s.key = table.key[slot];
  s.j0 = table.offset[slot] + static_cast<uint64_t>(start);
  return s;
}

template <typename P, int Lists>
C10_HOST_DEVICE inline P* probe_list(const ProbeTable<Lists>& table, int block, int list) {
  return static_cast<P*>(table.addresses[list][table.block_slot[block]]);
}

// Whether a rademacher block writes whole 16-byte vectors (aligned output, whole vectors).
template <typename P>
C10_HOST_DEVICE inline bool rademacher_vector_path(const ProbeTable<1>& table, int block) {
  constexpr int kIlp = ilp_for<P>();
  const ProbeSpan s = probe_span(table, block);
  return s.n % kIlp == 0 && is_aligned<P, kIlp>(probe_list<P>(table, block, 0) + s.start);
}

template <typename P>
C10_HOST_DEVICE inline bool perturb_vector_path(const ProbeTable<2>& table, int block) {
  constexpr int kIlp = ilp_for<P>();
  const ProbeSpan s = probe_span(table, block);
  return s.n % kIlp == 0 && is_aligned<P, kIlp>(probe_list<P>(table, block, 0) + s.start) &&
      is_aligned<P, kIlp>(probe_list<P>(table, block, 1) + s.start);
}

// out = z, in the output's dtype (S is its math type, in which +-1 is formed before rounding,
// exactly, to P).
template <typename P, typename S>
C10_HOST_DEVICE inline void rademacher_block(const ProbeTable<1>& table, int block, int thread, int threads) {
  constexpr int kIlp = ilp_for<P>();
  const ProbeSpan s = probe_span(table, block);
  P* __restrict__ out = probe_list<P>(table, block, 0) + s.start;
  if (rademacher_vector_path<P>(table, block)) {
    for (int i = thread; i * kIlp < s.n; i += threads) {
      const uint64_t bits = probe_bits(s.key, s.j0 + static_cast<uint64_t>(i) * kIlp, kIlp);
      Pack<P, kIlp> pack;
      ESGD_UNROLL
      for (int k = 0; k < kIlp; ++k) {
        pack.v[k] = static_cast<P>(rademacher_value<S>((bits >> k) & 1));
      }
      store_pack<kIlp>(out, i, pack);
    }
    return;
  }
  for (int i = thread; i < s.n; i += threads) {
    out[i] = static_cast<P>(rademacher_value<S>(probe_bit(s.key, s.j0 + i)));
  }
}

// params = P(S(x) + S(sign*h) * z), x = params (kSave: also copied to backups) or backups.
template <typename P, typename S, bool kSave>
C10_HOST_DEVICE inline void perturb_block(
    const ProbeTable<2>& table,
    const PerturbArgs& args,
    int block,
    int thread,
    int threads) {
  constexpr int kIlp = ilp_for<P>();
  const S step = static_cast<S>(args.sign * *args.scale);
  const ProbeSpan s = probe_span(table, block);
  P* __restrict__ p = probe_list<P>(table, block, 0) + s.start;
  P* __restrict__ b = probe_list<P>(table, block, 1) + s.start;
  if (perturb_vector_path<P>(table, block)) {
    for (int i = thread; i * kIlp < s.n; i += threads) {
      const uint64_t bits = probe_bits(s.key, s.j0 + static_cast<uint64_t>(i) * kIlp, kIlp);
      const Pack<P, kIlp> x = load_pack<kIlp>(kSave ? p : b, i);
      if constexpr (kSave) {
        store_pack<kIlp>(b, i, x);
      }
      Pack<P, kIlp> y;
      ESGD_UNROLL
      for (int k = 0; k < kIlp; ++k) {
        y.v[k] = static_cast<P>(perturbed<S>(static_cast<S>(x.v[k]), step, (bits >> k) & 1));
      }
      store_pack<kIlp>(p, i, y);
    }
    return;
  }
  for (int i = thread; i < s.n; i += threads) {
    const P x = kSave ? p[i] : b[i];
    if constexpr (kSave) {
      b[i] = x;
    }
    p[i] = static_cast<P>(perturbed<S>(static_cast<S>(x), step, probe_bit(s.key, s.j0 + i)));
  }
}

// Plans the launches for the tensors of `dtype` in a probe job and calls launch(table, blocks)
// for each, in order.
template <int Lists, typename LaunchFn>
void for_each_probe_launch(const ProbeJob& job, at::ScalarType dtype, LaunchFn&& launch) {
  TORCH_INTERNAL_ASSERT(job.lists.size() == static_cast<size_t>(Lists));
  const std::vector<int64_t> numels = job.numels(dtype);
  for (const Launch& plan : plan_launches(numels, kChunkSize, kMaxTensorsProbe, kMaxBlocks)) {
    ProbeTable<Lists> table;
    for (size_t slot = 0; slot < plan.tensors.size(); ++slot) {
      const int64_t t = plan.tensors[slot];
      for (int list = 0; list < Lists; ++list) {
        table.addresses[list][slot] = job.lists[list][t].data_ptr();
      }
      table.numel[slot] = numels[t];
      table.key[slot] = job.keys[t];
      table.offset[slot] = job.offsets[t];
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
