// Runs the CUDA kernel's code (multi_tensor.h) on CPU tensors: the real plan, the real table
// packing and the real per-thread body, with blocks and threads executed one after another.
// Test-only entry point exposed as esgd_cuda._C.emulate_cuda_update; it makes the device code's
// indexing checkable on machines without a GPU.

#include "multi_tensor.h"

#include <ATen/Dispatch.h>

#include <type_traits>
#include <unordered_map>

namespace esgd {

std::vector<std::array<int64_t, 3>> emulate_cuda_update(
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
  std::vector<std::array<int64_t, 3>> blocks_run;
  if (params.empty()) {
    return blocks_run;
  }
  Workspace w(params, grads, exp_avgs, exp_hz_sqs, hz_ptr);
  w.step_scalars = std::move(rows);
  // Table slots hold addresses; map them back to the caller's tensor index for the report.
  std::unordered_map<const void*, int64_t> index_of;
  for (size_t t = 0; t < w.params.size(); ++t) {
    if (w.params[t].numel() > 0) {  // empty tensors never take a slot
      index_of.emplace(w.params[t].data_ptr(), static_cast<int64_t>(t));
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "emulate_cuda_update", [&] {
        using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const Coeffs<S> c = make_coeffs<S>(hyper);
        auto run = [&](auto depth) {
          constexpr int kDepth = decltype(depth)::value;
          for_each_launch<kDepth>(w, [&](const TensorTable<kDepth>& table, int blocks) {
            for (int b = 0; b < blocks; ++b) {
              const auto span = block_span<scalar_t, S, kDepth>(table, b);
              const int slot = table.block_slot[b];
              blocks_run.push_back({index_of.at(table.addresses[0][slot]),
                                    static_cast<int64_t>(table.block_chunk[b]),
                                    static_cast<int64_t>(takes_vector_path(span))});
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
  return blocks_run;
}

}  // namespace esgd
