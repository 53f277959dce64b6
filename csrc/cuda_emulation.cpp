// Runs the CUDA kernel's code (multi_tensor.h) on CPU tensors: the real plan, the real table
// packing and the real per-thread body, with blocks and threads executed one after another.
// Test-only entry point exposed as esgd_cuda._C.emulate_cuda_update; it makes the device code's
// indexing checkable on machines without a GPU.

#include "multi_tensor.h"

#include <ATen/Dispatch.h>

#include <type_traits>

namespace esgd {

void emulate_cuda_update(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs,
    const std::vector<at::Tensor>& exp_hz_sqs,
    const std::vector<at::Tensor>& hzs,
    bool has_hz,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  const at::TensorList hz_list(hzs);
  const at::TensorList* hz_ptr = has_hz ? &hz_list : nullptr;
  check_inputs(
      "emulate_cuda_update", params, grads, exp_avgs, exp_hz_sqs, hz_ptr, c10::DeviceType::CPU);
  std::vector<const double*> rows;
  if (step_scalars != nullptr) {
    rows = step_scalar_rows("emulate_cuda_update", *step_scalars, params);
  }
  if (params.empty()) {
    return;
  }
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hz_ptr);
  w.step_scalars = std::move(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "emulate_cuda_update", [&] {
        using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const Coeffs<S> c = make_coeffs<S>(hyper);
        auto run = [&](auto depth) {
          constexpr int kDepth = decltype(depth)::value;
          for_each_launch<kDepth>(w, [&](const TensorTable<kDepth>& table, int blocks) {
            for (int b = 0; b < blocks; ++b) {
              for (int t = 0; t < kBlockSize; ++t) {
                process_block<scalar_t, S, kDepth>(table, c, b, t, kBlockSize);
              }
            }
          });
        };
        if (has_hz) {
          run(std::integral_constant<int, 5>{});
        } else {
          run(std::integral_constant<int, 4>{});
        }
      });
  w.finish();
}

}  // namespace esgd
