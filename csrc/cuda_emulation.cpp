// Runs the CUDA kernels' code (multi_tensor.h, probe_kernels.h) on CPU tensors: the real host
// preparation, plan, table packing and per-thread bodies, with blocks and threads executed one
// after another. Test-only entry points exposed as esgd_cuda._C.emulate_cuda_*; they make the
// device code's indexing and bits checkable on machines without a GPU.

#include "multi_tensor.h"
#include "probe_kernels.h"

#include <ATen/Dispatch.h>

#include <type_traits>
#include <unordered_map>

namespace esgd {

namespace {

using BlockRows = std::vector<std::array<int64_t, 3>>;

// Table slots hold addresses; map them back to the caller's tensor index for the report.
std::unordered_map<const void*, int64_t> index_by_address(const std::vector<at::Tensor>& tensors) {
  std::unordered_map<const void*, int64_t> index_of;
  for (size_t t = 0; t < tensors.size(); ++t) {
    if (tensors[t].numel() > 0) {  // empty tensors never take a slot
      index_of.emplace(tensors[t].data_ptr(), static_cast<int64_t>(t));
    }
  }
  return index_of;
}

template <typename P, typename S, HzSource Src, bool kFromSource = false>
void emulate_update(const UpdateJob& job, const Hyper& hyper, BlockRows& rows) {
  constexpr int kDepth = depth_of<Src, kFromSource>();
  const Coeffs<math_t<S>> c = make_coeffs<math_t<S>>(hyper);
  const DeviceScale scale{job.hz_scale, hyper.hz_scale_inv};
  const auto index_of = index_by_address(job.workspace.params);
  for_each_launch<Src, kFromSource>(job, [&](const TensorTable<kDepth>& table, int blocks) {
    for (int b = 0; b < blocks; ++b) {
      const auto span = block_span<P, S, Src, kFromSource>(table, b);
      const int slot = table.block_slot[b];
      rows.push_back({index_of.at(table.addresses[0][slot]),
                      static_cast<int64_t>(table.block_chunk[b]),
                      static_cast<int64_t>(takes_vector_path(span))});
      for (int t = 0; t < kBlockSize; ++t) {
        process_block<P, S, Src, kFromSource>(table, c, scale, b, t, kBlockSize);
      }
    }
  });
}

// The state storage type of a job, as esgd_cuda.cu's launch_state picks it.
template <typename P, HzSource Src, bool kFromSource = false>
void emulate_state(const UpdateJob& job, const Hyper& hyper, BlockRows& rows) {
  using Default = std::conditional_t<std::is_same_v<P, double>, double, float>;
  if constexpr (!std::is_same_v<P, double>) {
    if (job.rounds) {
      emulate_update<P, at::BFloat16, Src, kFromSource>(job, hyper, rows);
      return;
    }
  }
  emulate_update<P, Default, Src, kFromSource>(job, hyper, rows);
}

}  // namespace

BlockRows emulate_cuda_update(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs,
    const std::vector<at::Tensor>& exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    const Hyper& hyper,
    const at::Tensor* step_scalars) {
  const std::unique_ptr<UpdateJob> job = prepare_update(
      "emulate_cuda_update", params, grads, exp_avgs, exp_hz_sqs, hz, rounding, step_scalars,
      c10::DeviceType::CPU);
  BlockRows rows;
  if (!job) {
    return rows;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "emulate_cuda_update", [&] {
        switch (hz.source) {
          case HzSource::kNone:
            emulate_state<scalar_t, HzSource::kNone>(*job, hyper, rows);
            break;
          case HzSource::kDirect:
            emulate_state<scalar_t, HzSource::kDirect>(*job, hyper, rows);
            break;
          case HzSource::kForward:
            if (hz.sources.has_value()) {
              emulate_state<scalar_t, HzSource::kForward, true>(*job, hyper, rows);
            } else {
              emulate_state<scalar_t, HzSource::kForward>(*job, hyper, rows);
            }
            break;
          case HzSource::kCentral:
            if (hz.sources.has_value()) {
              emulate_state<scalar_t, HzSource::kCentral, true>(*job, hyper, rows);
            } else {
              emulate_state<scalar_t, HzSource::kCentral>(*job, hyper, rows);
            }
            break;
        }
      });
  job->workspace.finish();
  return rows;
}

BlockRows emulate_cuda_rademacher(
    const std::vector<at::Tensor>& out,
    const std::vector<int64_t>& keys,
    const std::vector<int64_t>& offsets) {
  const std::unique_ptr<ProbeJob> job =
      prepare_rademacher("emulate_cuda_rademacher", out, keys, offsets, c10::DeviceType::CPU);
  BlockRows rows;
  if (!job) {
    return rows;
  }
  const auto index_of = index_by_address(job->lists[0]);
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_cuda_rademacher", [&] {
      using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      for_each_probe_launch<1>(*job, dtype, [&](const ProbeTable<1>& table, int blocks) {
        for (int b = 0; b < blocks; ++b) {
          rows.push_back({index_of.at(table.addresses[0][table.block_slot[b]]),
                          static_cast<int64_t>(table.block_chunk[b]),
                          static_cast<int64_t>(rademacher_vector_path<scalar_t>(table, b))});
          for (int t = 0; t < kBlockSize; ++t) {
            rademacher_block<scalar_t, S>(table, b, t, kBlockSize);
          }
        }
      });
    });
  }
  job->finish();
  return rows;
}

BlockRows emulate_cuda_fd_perturb(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& backups,
    const at::Tensor& scale,
    const std::vector<int64_t>& keys,
    const std::vector<int64_t>& offsets,
    double sign,
    bool save) {
  const std::unique_ptr<ProbeJob> job = prepare_perturb(
      "emulate_cuda_fd_perturb", params, backups, scale, keys, offsets, save, c10::DeviceType::CPU);
  BlockRows rows;
  if (!job) {
    return rows;
  }
  const auto index_of = index_by_address(job->lists[0]);
  const PerturbArgs args{job->scale, sign};
  for (const at::ScalarType dtype : job->dtypes()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_cuda_fd_perturb", [&] {
      using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      for_each_probe_launch<2>(*job, dtype, [&](const ProbeTable<2>& table, int blocks) {
        for (int b = 0; b < blocks; ++b) {
          rows.push_back({index_of.at(table.addresses[0][table.block_slot[b]]),
                          static_cast<int64_t>(table.block_chunk[b]),
                          static_cast<int64_t>(perturb_vector_path<scalar_t>(table, b))});
          for (int t = 0; t < kBlockSize; ++t) {
            if (save) {
              perturb_block<scalar_t, S, true>(table, args, b, t, kBlockSize);
            } else {
              perturb_block<scalar_t, S, false>(table, args, b, t, kBlockSize);
            }
          }
        }
      });
    });
  }
  job->finish();
  return rows;
}

}  // namespace esgd
