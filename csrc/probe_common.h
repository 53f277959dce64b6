#pragma once

// Argument checking and layout preparation for the probe ops (esgd_rademacher_,
// esgd_fd_perturb_), shared by the CPU kernel, the CUDA host code and the CUDA emulation.

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace esgd {

// The tensors of a probe op as flat row-major arrays (a probe is indexed by the logical row-major
// index, so non-contiguous tensors go through contiguous copies that finish() writes back), with
// each tensor's key and index offset. lists[0] is `out` or `params`, lists[1] `backups`.
class ProbeJob {
 public:
  std::vector<std::vector<at::Tensor>> lists;
  std::vector<uint64_t> keys;
  std::vector<uint64_t> offsets;
  // esgd_fd_perturb_: the address of h (float64, on the tensors' device).
  const double* scale = nullptr;

  // The parameter dtypes present, in first-seen order: kernels run once per dtype.
  std::vector<at::ScalarType> dtypes() const;
  // Elements per tensor, 0 for tensors of another dtype (the launch planner skips empty tensors).
  std::vector<int64_t> numels(at::ScalarType dtype) const;
  void finish();

  // A contiguous stand-in for `t`: t itself, or a copy (with t's values when `read`) that
  // finish() writes back.
  at::Tensor writable(const at::Tensor& t, bool read);

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;
};

// Validate (errors name the argument and index, before anything is written) and lay out the
// tensors; null when there is nothing to do.
std::unique_ptr<ProbeJob> prepare_rademacher(
    const char* op,
    at::TensorList out,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    c10::DeviceType device_type);

std::unique_ptr<ProbeJob> prepare_perturb(
    const char* op,
    at::TensorList params,
    at::TensorList backups,
    const at::Tensor& scale,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    bool save,
    c10::DeviceType device_type);

// Test hooks (cuda_emulation.cpp, bound as esgd_cuda._C.emulate_cuda_rademacher and
// emulate_cuda_fd_perturb): the CUDA probe kernels' plan, tables and per-thread code run
// sequentially on CPU tensors. One (tensor index, chunk, took the vector path) row per block.
std::vector<std::array<int64_t, 3>> emulate_cuda_rademacher(
    const std::vector<at::Tensor>& out,
    const std::vector<int64_t>& keys,
    const std::vector<int64_t>& offsets);

std::vector<std::array<int64_t, 3>> emulate_cuda_fd_perturb(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& backups,
    const at::Tensor& scale,
    const std::vector<int64_t>& keys,
    const std::vector<int64_t>& offsets,
    double sign,
    bool save);

}  // namespace esgd
