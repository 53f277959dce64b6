// Fused multi-tensor CUDA kernel: a handful of launches update every parameter of a
// (device, dtype) group. Each block owns one chunk of one tensor; the host walks the plan from
// launch_plan.h, which is the same code the CPU-side tests exercise.

#include "esgd_common.h"
#include "esgd_math.h"
#include "launch_plan.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace esgd {

int cuda_runtime_version_built() {
  return CUDART_VERSION;
}

namespace {

constexpr int kBlockSize = 512;
// Elements per thread per iteration: four independent loads in flight per list hide DRAM
// latency, and for fp32 they form one 16-byte access.
constexpr int kIlp = 4;

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

// Passed by value as the kernel argument; lists are params, grads, exp_avgs, exp_hz_sqs[, hzs].
template <int Depth>
struct TensorTable {
  void* addresses[Depth][MaxTensors<Depth>::value];
  int64_t numel[MaxTensors<Depth>::value];
  unsigned char block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

static_assert(sizeof(TensorTable<4>) + sizeof(Coeffs<double>) <= 4096, "kernel params > 4 KB");
static_assert(sizeof(TensorTable<5>) + sizeof(Coeffs<double>) <= 4096, "kernel params > 4 KB");
static_assert(kMaxTensorsDepth4 <= 256 && kMaxTensorsDepth5 <= 256, "slots are stored as bytes");
static_assert(kChunkSize % kIlp == 0, "the vector path assumes whole vectors per chunk");

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * kIlp) == 0;
}

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr, int64_t i) {
  return reinterpret_cast<const Pack<T>*>(ptr)[i];
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, int64_t i, const Pack<T>& pack) {
  reinterpret_cast<Pack<T>*>(ptr)[i] = pack;
}

template <typename P, typename S, int Depth>
__global__ void __launch_bounds__(kBlockSize)
    esgd_multi_tensor_kernel(const TensorTable<Depth> table, const Coeffs<S> c) {
  constexpr bool kHasHz = Depth == 5;
  const int slot = table.block_slot[blockIdx.x];
  // 64-bit before the multiply: chunk * kChunkSize exceeds int32 in tensors of >= 2^31 elements.
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = table.numel[slot] - start;
  const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);

  P* __restrict__ p = static_cast<P*>(table.addresses[0][slot]) + start;
  const P* __restrict__ g = static_cast<const P*>(table.addresses[1][slot]) + start;
  S* __restrict__ m = static_cast<S*>(table.addresses[2][slot]) + start;
  S* __restrict__ d = static_cast<S*>(table.addresses[3][slot]) + start;
  const P* __restrict__ hz = nullptr;
  if constexpr (kHasHz) {
    hz = static_cast<const P*>(table.addresses[4][slot]) + start;
  }

  bool vectorizable = n % kIlp == 0 && is_aligned(p) && is_aligned(g) && is_aligned(m) &&
      is_aligned(d);
  if constexpr (kHasHz) {
    vectorizable = vectorizable && is_aligned(hz);
  }

  if (vectorizable) {
    for (int i = threadIdx.x; i * kIlp < n; i += blockDim.x) {
      Pack<P> pp = load_pack(p, i);
      const Pack<P> gp = load_pack(g, i);
      Pack<S> mp = load_pack(m, i);
      Pack<S> dp = load_pack(d, i);
      Pack<P> hp;
      if constexpr (kHasHz) {
        hp = load_pack(hz, i);
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        S pk = static_cast<S>(pp.v[k]);
        const S hk = kHasHz ? static_cast<S>(hp.v[k]) : S(0);
        update<kHasHz>(pk, static_cast<S>(gp.v[k]), mp.v[k], dp.v[k], hk, c);
        pp.v[k] = static_cast<P>(pk);
      }
      store_pack(p, i, pp);
      store_pack(m, i, mp);
      if constexpr (kHasHz) {
        store_pack(d, i, dp);
      }
    }
    return;
  }

  // Misaligned views or a ragged tail: strided scalar accesses, still kIlp loads in flight.
  for (int base = 0; base < n; base += blockDim.x * kIlp) {
    S pr[kIlp], gr[kIlp], mr[kIlp], dr[kIlp], hr[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + threadIdx.x + k * blockDim.x;
      if (i < n) {
        pr[k] = static_cast<S>(p[i]);
        gr[k] = static_cast<S>(g[i]);
        mr[k] = m[i];
        dr[k] = d[i];
        hr[k] = kHasHz ? static_cast<S>(hz[i]) : S(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = base + threadIdx.x + k * blockDim.x;
      if (i < n) {
        update<kHasHz>(pr[k], gr[k], mr[k], dr[k], hr[k], c);
        p[i] = static_cast<P>(pr[k]);
        m[i] = mr[k];
        if constexpr (kHasHz) {
          d[i] = dr[k];
        }
      }
    }
  }
}

template <typename P, typename S, int Depth>
void launch_all(const Workspace& w, const Hyper& hyper, cudaStream_t stream) {
  std::vector<int64_t> numels(w.params.size());
  for (size_t t = 0; t < numels.size(); ++t) {
    numels[t] = w.params[t].numel();
  }
  const Coeffs<S> coeffs = make_coeffs<S>(hyper);
  for (const Launch& launch :
       plan_launches(numels, kChunkSize, MaxTensors<Depth>::value, kMaxBlocks)) {
    TensorTable<Depth> table;
    for (size_t slot = 0; slot < launch.tensors.size(); ++slot) {
      const int64_t t = launch.tensors[slot];
      table.addresses[0][slot] = w.params[t].data_ptr();
      table.addresses[1][slot] = w.grads[t].data_ptr();
      table.addresses[2][slot] = w.exp_avgs[t].data_ptr();
      table.addresses[3][slot] = w.exp_hz_sqs[t].data_ptr();
      if constexpr (Depth == 5) {
        table.addresses[4][slot] = w.hzs[t].data_ptr();
      }
      table.numel[slot] = numels[t];
    }
    const size_t blocks = launch.block_slot.size();
    for (size_t b = 0; b < blocks; ++b) {
      table.block_slot[b] = static_cast<unsigned char>(launch.block_slot[b]);
      table.block_chunk[b] = static_cast<int32_t>(launch.block_chunk[b]);
    }
    esgd_multi_tensor_kernel<P, S, Depth>
        <<<static_cast<unsigned>(blocks), kBlockSize, 0, stream>>>(table, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const at::TensorList* hzs,
    const Hyper& hyper) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hzs, c10::DeviceType::CUDA);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  // The caller's current stream, so the update orders with the backward pass that made the
  // gradients and can be captured into a CUDA graph.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hzs);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "esgd_update_cuda", [&] {
        using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        if (hzs != nullptr) {
          launch_all<scalar_t, S, 5>(w, hyper, stream);
        } else {
          launch_all<scalar_t, S, 4>(w, hyper, stream);
        }
      });
  w.finish();
}

void esgd_update_cuda(
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

void esgd_update_hz_cuda(
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

TORCH_LIBRARY_IMPL(esgd_cuda, CUDA, m) {
  m.impl("esgd_update_", &esgd_update_cuda);
  m.impl("esgd_update_hz_", &esgd_update_hz_cuda);
}

}  // namespace esgd
