// Fused multi-tensor CUDA kernel: a handful of launches update every parameter of a
// (device, dtype) group. Each block owns one chunk of one tensor; the host walks the plan from
// launch_plan.h, which is the same code the CPU-side tests exercise.

#include "esgd_common.h"
#include "esgd_math.h"
#include "multi_tensor.h"

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

// At least two blocks per SM: caps registers at 64 per thread, which the 16-bit kernels with Hz
// (eight elements per thread, five lists) would otherwise exceed (about 100), halving occupancy.
// scripts/check_kernel_resources.py checks the cap holds without spills. S is the state's storage
// type (float, double, or bfloat16 rounded stochastically); the math runs in math_t<S>.
template <typename P, typename S, int Depth>
__global__ void __launch_bounds__(kBlockSize, 2)
    esgd_multi_tensor_kernel(const TensorTable<Depth> table, const Coeffs<math_t<S>> c) {
  constexpr HzSource kSrc = Depth == 5 ? HzSource::kDirect : HzSource::kNone;
  process_block<P, S, kSrc>(table, c, DeviceScale{nullptr, 1.0}, blockIdx.x, threadIdx.x, blockDim.x);
}

// Finite-difference estimation steps: Depth 5 is the forward difference (grads_plus - grads),
// 6 the central one (grads_plus - grads_minus). The multiplier 1/h is read from device memory.
template <typename P, typename S, int Depth>
__global__ void __launch_bounds__(kBlockSize, 2) esgd_fd_update_kernel(
    const TensorTable<Depth> table, const Coeffs<math_t<S>> c, const DeviceScale scale) {
  constexpr HzSource kSrc = Depth == 6 ? HzSource::kCentral : HzSource::kForward;
  process_block<P, S, kSrc>(table, c, scale, blockIdx.x, threadIdx.x, blockDim.x);
}

// Finite-difference steps that read theta from the copy the perturbation saved (the sources, the
// table's last list) and only write the parameters: the restore fused into the update, one pass
// over the parameters less. Depth 6 is the forward difference, 7 the central one.
template <typename P, typename S, int Depth>
__global__ void __launch_bounds__(kBlockSize, 2) esgd_fd_update_from_source_kernel(
    const TensorTable<Depth> table, const Coeffs<math_t<S>> c, const DeviceScale scale) {
  constexpr HzSource kSrc = Depth == 7 ? HzSource::kCentral : HzSource::kForward;
  process_block<P, S, kSrc, true>(table, c, scale, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename P, typename S, HzSource Src, bool kFromSource = false>
void launch_all(const UpdateJob& job, const Hyper& hyper, cudaStream_t stream) {
  constexpr int kDepth = depth_of<Src, kFromSource>();
  const Coeffs<math_t<S>> coeffs = make_coeffs<math_t<S>>(hyper);
  const DeviceScale scale{job.hz_scale, hyper.hz_scale_inv};
  for_each_launch<Src, kFromSource>(job, [&](const TensorTable<kDepth>& table, int blocks) {
    if constexpr (kFromSource) {
      esgd_fd_update_from_source_kernel<P, S, kDepth><<<blocks, kBlockSize, 0, stream>>>(
          table, coeffs, scale);
    } else if constexpr (is_finite_difference(Src)) {
      esgd_fd_update_kernel<P, S, kDepth><<<blocks, kBlockSize, 0, stream>>>(table, coeffs, scale);
    } else {
      esgd_multi_tensor_kernel<P, S, kDepth><<<blocks, kBlockSize, 0, stream>>>(table, coeffs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The state storage type of a job, then launch_all<P, S, ...>: bfloat16 (rounded) or the default.
template <typename P, HzSource Src, bool kFromSource = false>
void launch_state(const UpdateJob& job, const Hyper& hyper, cudaStream_t stream) {
  using Default = std::conditional_t<std::is_same_v<P, double>, double, float>;
  if constexpr (!std::is_same_v<P, double>) {
    if (job.rounds) {
      launch_all<P, at::BFloat16, Src, kFromSource>(job, hyper, stream);
      return;
    }
  }
  launch_all<P, Default, Src, kFromSource>(job, hyper, stream);
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
      op, params, grads, exp_avgs, exp_hz_sqs, hz, rounding, step_scalars, c10::DeviceType::CUDA);
  if (!job) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  // The caller's current stream, so the update orders with the backward pass that made the
  // gradients and can be captured into a CUDA graph.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "esgd_update_cuda", [&] {
        switch (hz.source) {
          case HzSource::kNone:
            launch_state<scalar_t, HzSource::kNone>(*job, hyper, stream);
            break;
          case HzSource::kDirect:
            launch_state<scalar_t, HzSource::kDirect>(*job, hyper, stream);
            break;
          case HzSource::kForward:
            if (hz.sources.has_value()) {
              launch_state<scalar_t, HzSource::kForward, true>(*job, hyper, stream);
            } else {
              launch_state<scalar_t, HzSource::kForward>(*job, hyper, stream);
            }
            break;
          case HzSource::kCentral:
            if (hz.sources.has_value()) {
              launch_state<scalar_t, HzSource::kCentral, true>(*job, hyper, stream);
            } else {
              launch_state<scalar_t, HzSource::kCentral>(*job, hyper, stream);
            }
            break;
        }
      });
  job->workspace.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CUDA, m) {
  m.impl("esgd_update_", &plain_op<&launch>);
  m.impl("esgd_update_hz_", &hz_op<&launch>);
  m.impl("esgd_update_capturable_", &capturable_op<&launch>);
  m.impl("esgd_update_fd_", &fd_op<&launch>);
}

}  // namespace esgd
