// CUDA kernels of the probe ops: thin wrappers around the per-block code of probe_kernels.h, which
// the CPU-side tests run through cuda_emulation.cpp. h is read from device memory by each thread,
// so neither op syncs and both can be captured in a CUDA graph.

#include "probe_kernels.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

namespace esgd {

namespace {

template <typename P, typename S>
__global__ void __launch_bounds__(kBlockSize, 2) esgd_rademacher_kernel(const ProbeTable<1> table) {
  rademacher_block<P, S>(table, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename P, typename S, bool kSave>
__global__ void __launch_bounds__(kBlockSize, 2)
    esgd_fd_perturb_kernel(const ProbeTable<2> table, const PerturbArgs args) {
  perturb_block<P, S, kSave>(table, args, blockIdx.x, threadIdx.x, blockDim.x);
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void rademacher_cuda(at::TensorList out, at::IntArrayRef keys, at::IntArrayRef offsets) {
  const std::unique_ptr<ProbeJob> job =
      prepare_rademacher("esgd_rademacher_", out, keys, offsets, c10::DeviceType::CUDA);
  if (!job) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out[0].device());
  const cudaStream_t stream = current_stream(out[0]);
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "esgd_rademacher_cuda", [&] {
      using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      for_each_probe_launch<1>(*job, dtype, [&](const ProbeTable<1>& table, int blocks) {
        esgd_rademacher_kernel<scalar_t, S><<<blocks, kBlockSize, 0, stream>>>(table);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  job->finish();
}

void perturb_cuda(
    at::TensorList params,
    at::TensorList backups,
    const at::Tensor& scale,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    double sign,
    bool save) {
  const std::unique_ptr<ProbeJob> job = prepare_perturb(
      "esgd_fd_perturb_", params, backups, scale, keys, offsets, save, c10::DeviceType::CUDA);
  if (!job) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0]);
  const PerturbArgs args{job->scale, sign};
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "esgd_fd_perturb_cuda", [&] {
      using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      for_each_probe_launch<2>(*job, dtype, [&](const ProbeTable<2>& table, int blocks) {
        if (save) {
          esgd_fd_perturb_kernel<scalar_t, S, true><<<blocks, kBlockSize, 0, stream>>>(table, args);
        } else {
          esgd_fd_perturb_kernel<scalar_t, S, false><<<blocks, kBlockSize, 0, stream>>>(table, args);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  job->finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CUDA, m) {
  m.impl("esgd_rademacher_", &rademacher_cuda);
  m.impl("esgd_fd_perturb_", &perturb_cuda);
}

}  // namespace esgd
