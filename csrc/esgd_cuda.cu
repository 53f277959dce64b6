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
// scripts/check_kernel_resources.py checks the cap holds without spills.
template <typename P, typename S, int Depth>
__global__ void __launch_bounds__(kBlockSize, 2)
    esgd_multi_tensor_kernel(const TensorTable<Depth> table, const Coeffs<S> c) {
  process_block<P, S, Depth>(table, c, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename P, typename S, int Depth>
void launch_all(const Workspace& w, const Hyper& hyper, cudaStream_t stream) {
  const Coeffs<S> coeffs = make_coeffs<S>(hyper);
  for_each_launch<Depth>(w, [&](const TensorTable<Depth>& table, int blocks) {
    esgd_multi_tensor_kernel<P, S, Depth><<<blocks, kBlockSize, 0, stream>>>(table, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const at::TensorList* hzs,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hzs, c10::DeviceType::CUDA);
  std::vector<const double*> rows;
  if (step_scalars != nullptr) {
    rows = step_scalar_rows(op, *step_scalars, params);
  }
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  // The caller's current stream, so the update orders with the backward pass that made the
  // gradients and can be captured into a CUDA graph.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hzs);
  w.step_scalars = std::move(rows);
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

}  // namespace

TORCH_LIBRARY_IMPL(esgd_cuda, CUDA, m) {
  m.impl("esgd_update_", &plain_op<&launch>);
  m.impl("esgd_update_hz_", &hz_op<&launch>);
  m.impl("esgd_update_capturable_", &capturable_op<&launch>);
}

}  // namespace esgd
