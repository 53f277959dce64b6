#include "probe_common.h"

#include "esgd_common.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace esgd {

std::vector<at::ScalarType> ProbeJob::dtypes() const {
  std::vector<at::ScalarType> out;
  for (const at::Tensor& t : lists[0]) {
    if (std::find(out.begin(), out.end(), t.scalar_type()) == out.end()) {
      out.push_back(t.scalar_type());
    }
  }
  return out;
}

std::vector<int64_t> ProbeJob::numels(at::ScalarType dtype) const {
  std::vector<int64_t> out(lists[0].size());
  for (size_t t = 0; t < out.size(); ++t) {
    out[t] = lists[0][t].scalar_type() == dtype ? lists[0][t].numel() : 0;
  }
  return out;
}

at::Tensor ProbeJob::writable(const at::Tensor& t, bool read) {
  if (t.is_contiguous()) {
    return t;
  }
  at::Tensor copy = read ? t.contiguous() : at::empty(t.sizes(), t.options());
  writebacks_.emplace_back(t, copy);
  return copy;
}

void ProbeJob::finish() {
  for (auto& [original, copy] : writebacks_) {
    original.copy_(copy);
  }
  writebacks_.clear();
}

namespace {

bool supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Checks the tensors of the list that carries the probe (out or params) and the keys/offsets.
void check_probe_list(
    const char* op,
    const char* name,
    at::TensorList tensors,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    c10::DeviceType device_type) {
  const size_t n = tensors.size();
  TORCH_CHECK(keys.size() == n, op, ": keys has ", keys.size(), " entries but ", name, " has ", n,
              " tensors");
  TORCH_CHECK(offsets.size() == n, op, ": offsets has ", offsets.size(), " entries but ", name,
              " has ", n, " tensors");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(
        supported(t.scalar_type()),
        op, ": ", name, "[", i, "] has dtype ", dtype_name(t.scalar_type()),
        ", expected one of float32, float64, float16, bfloat16");
    if (i == 0) {
      TORCH_CHECK(
          t.device().type() == device_type,
          op, ": ", name, "[0] is on ", t.device(), ", but this kernel runs on ",
          c10::DeviceTypeName(device_type, /*lower_case=*/true));
    } else {
      TORCH_CHECK(
          t.device() == tensors[0].device(),
          op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", tensors[0].device(),
          " (the device of ", name, "[0])");
    }
    TORCH_CHECK(keys[i] >= 0, op, ": keys[", i, "] = ", keys[i], " is negative");
    TORCH_CHECK(offsets[i] >= 0, op, ": offsets[", i, "] = ", offsets[i], " is negative");
    TORCH_CHECK(
        offsets[i] <= std::numeric_limits<int64_t>::max() - t.numel(),
        op, ": offsets[", i, "] + ", name, "[", i, "].numel() exceeds 2**63 - 1");
  }
}

void set_keys(ProbeJob& job, at::IntArrayRef keys, at::IntArrayRef offsets) {
  job.keys.assign(keys.begin(), keys.end());
  job.offsets.assign(offsets.begin(), offsets.end());
}

}  // namespace

std::unique_ptr<ProbeJob> prepare_rademacher(
    const char* op,
    at::TensorList out,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    c10::DeviceType device_type) {
  check_probe_list(op, "out", out, keys, offsets, device_type);
  if (out.empty()) {
    return nullptr;
  }
  auto job = std::make_unique<ProbeJob>();
  job->lists.resize(1);
  for (const at::Tensor& t : out) {
    job->lists[0].push_back(job->writable(t, /*read=*/false));
  }
  set_keys(*job, keys, offsets);
  return job;
}

std::unique_ptr<ProbeJob> prepare_perturb(
    const char* op,
    at::TensorList params,
    at::TensorList backups,
    const at::Tensor& scale,
    at::IntArrayRef keys,
    at::IntArrayRef offsets,
    bool save,
    c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(backups.size() == n, op, ": backups has ", backups.size(), " tensors but params has ",
              n);
  check_probe_list(op, "params", params, keys, offsets, device_type);
  if (n == 0) {
    return nullptr;
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& b = backups[i];
    TORCH_CHECK(b.defined(), op, ": backups[", i, "] is undefined (None)");
    TORCH_CHECK(
        b.device() == p.device(),
        op, ": backups[", i, "] is on ", b.device(), ", expected ", p.device(), " (the device of params[", i,
        "])");
    TORCH_CHECK(
        b.scalar_type() == p.scalar_type(),
        op, ": backups[", i, "] has dtype ", dtype_name(b.scalar_type()), ", expected ",
        dtype_name(p.scalar_type()), " (the dtype of params[", i, "])");
    TORCH_CHECK(
        b.sizes() == p.sizes(),
        op, ": backups[", i, "] has shape ", b.sizes(), ", expected ", p.sizes(), " (the shape of params[", i,
        "])");
    const at::MemOverlapStatus overlap = at::get_overlap_status(p, b);
    TORCH_CHECK(
        overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
        op, ": backups[", i, "] shares memory with params[", i, "]");
  }
  check_device_scalar(op, "scale", scale, params[0].device());
  auto job = std::make_unique<ProbeJob>();
  job->lists.resize(2);
  for (size_t i = 0; i < n; ++i) {
    job->lists[0].push_back(job->writable(params[i], /*read=*/true));
    job->lists[1].push_back(
        save ? job->writable(backups[i], /*read=*/false) : backups[i].contiguous());
  }
  set_keys(*job, keys, offsets);
  job->scale = scale.const_data_ptr<double>();
  return job;
}

}  // namespace esgd
