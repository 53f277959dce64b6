#include "esgd_common.h"

#include <c10/util/Exception.h>

namespace esgd {

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kShort:
      return "int16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kBool:
      return "bool";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    default:
      return c10::toString(dtype);
  }
}

namespace {

void check_list_length(const char* op, const char* name, at::TensorList list, size_t expected) {
  TORCH_CHECK(
      list.size() == expected,
      op, ": ", name, " has ", list.size(), " tensors but params has ", expected);
}

void check_tensor(
    const char* op,
    const char* name,
    size_t i,
    const at::Tensor& t,
    const at::Tensor& param,
    at::ScalarType expected_dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined (None)");
  TORCH_CHECK(
      t.device() == param.device(),
      op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", param.device(),
      " (the device of params[", i, "])");
  TORCH_CHECK(
      t.scalar_type() == expected_dtype,
      op, ": ", name, "[", i, "] has dtype ", dtype_name(t.scalar_type()), ", expected ",
      dtype_name(expected_dtype));
  TORCH_CHECK(
      t.sizes() == param.sizes(),
      op, ": ", name, "[", i, "] has shape ", t.sizes(), ", expected ", param.sizes(),
      " (the shape of params[", i, "])");
}

}  // namespace

std::vector<std::pair<const char*, at::TensorList>> HzInputs::lists() const {
  switch (source) {
    case HzSource::kNone:
      return {};
    case HzSource::kDirect:
      return {{"hzs", a}};
    case HzSource::kForward:
      return {{"grads_plus", a}};
    case HzSource::kCentral:
      return {{"grads_plus", a}, {"grads_minus", b}};
  }
  TORCH_INTERNAL_ASSERT(false, "unknown HzSource");
}

void check_device_scalar(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  TORCH_CHECK(
      t.scalar_type() == at::kDouble,
      op, ": ", name, " has dtype ", dtype_name(t.scalar_type()), ", expected float64");
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " has ", t.numel(), " elements, expected 1");
  TORCH_CHECK(
      t.device() == device,
      op, ": ", name, " is on ", t.device(), ", expected ", device, " (the device of params[0])");
}

void check_inputs(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    c10::DeviceType device_type) {
  const size_t n = params.size();
  const auto inputs = hz.lists();
  check_list_length(op, "grads", grads, n);
  check_list_length(op, "exp_avgs", exp_avgs, n);
  check_list_length(op, "exp_hz_sqs", exp_hz_sqs, n);
  for (const auto& [name, list] : inputs) {
    check_list_length(op, name, list, n);
  }
  if (n == 0) {
    return;
  }
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.defined(), op, ": params[0] is undefined (None)");
  const at::ScalarType pdtype = first.scalar_type();
  TORCH_CHECK(
      pdtype == at::kFloat || pdtype == at::kDouble || pdtype == at::kHalf ||
          pdtype == at::kBFloat16,
      op, ": params[0] has dtype ", dtype_name(pdtype),
      ", expected one of float32, float64, float16, bfloat16");
  TORCH_CHECK(
      first.device().type() == device_type,
      op, ": params[0] is on ", first.device(), ", but this kernel runs on ",
      c10::DeviceTypeName(device_type, /*lower_case=*/true));
  const at::ScalarType sdtype = state_dtype(pdtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined (None)");
    TORCH_CHECK(
        p.device() == first.device(),
        op, ": params[", i, "] is on ", p.device(), ", expected ", first.device(),
        " (the device of params[0])");
    TORCH_CHECK(
        p.scalar_type() == pdtype,
        op, ": params[", i, "] has dtype ", dtype_name(p.scalar_type()), ", expected ",
        dtype_name(pdtype), " (the dtype of params[0])");
    check_tensor(op, "grads", i, grads[i], p, pdtype);
    check_tensor(op, "exp_avgs", i, exp_avgs[i], p, sdtype);
    check_tensor(op, "exp_hz_sqs", i, exp_hz_sqs[i], p, sdtype);
    for (const auto& [name, list] : inputs) {
      check_tensor(op, name, i, list[i], p, pdtype);
    }
  }
  if (is_finite_difference(hz.source)) {
    TORCH_INTERNAL_ASSERT(hz.scale != nullptr);
    check_device_scalar(op, "hz_scale", *hz.scale, first.device());
  }
}

std::vector<const double*> step_scalar_rows(
    const char* op, const at::Tensor& step_scalars, at::TensorList params) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(step_scalars.defined(), op, ": step_scalars is undefined (None)");
  TORCH_CHECK(
      step_scalars.scalar_type() == at::kDouble,
      op, ": step_scalars has dtype ", dtype_name(step_scalars.scalar_type()), ", expected float64");
  TORCH_CHECK(
      step_scalars.dim() == 2 && step_scalars.size(0) == n && step_scalars.size(1) == kStepScalars,
      op, ": step_scalars has shape ", step_scalars.sizes(), ", expected [", n, ", ", kStepScalars,
      "] (one row per tensor of params)");
  TORCH_CHECK(step_scalars.is_contiguous(), op, ": step_scalars must be contiguous");
  std::vector<const double*> rows(n);
  if (n == 0) {
    return rows;
  }
  TORCH_CHECK(
      step_scalars.device() == params[0].device(),
      op, ": step_scalars is on ", step_scalars.device(), ", expected ", params[0].device(),
      " (the device of params[0])");
  const double* base = step_scalars.const_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = base + i * kStepScalars;
  }
  return rows;
}

namespace {

bool dense_like(const at::Tensor& t, const at::Tensor& param) {
  return t.is_non_overlapping_and_dense() && t.strides() == param.strides();
}

}  // namespace

Workspace::Workspace(
    at::TensorList params_in,
    at::TensorList grads_in,
    at::TensorList exp_avgs_in,
    at::TensorList exp_hz_sqs_in,
    const std::vector<at::TensorList>& inputs_in) {
  const size_t n = params_in.size();
  params.reserve(n);
  grads.reserve(n);
  exp_avgs.reserve(n);
  exp_hz_sqs.reserve(n);
  inputs.resize(inputs_in.size());
  for (auto& list : inputs) {
    list.reserve(n);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params_in[i];
    bool in_place = p.is_non_overlapping_and_dense() && dense_like(grads_in[i], p) &&
        dense_like(exp_avgs_in[i], p) && dense_like(exp_hz_sqs_in[i], p);
    for (const at::TensorList& list : inputs_in) {
      in_place = in_place && dense_like(list[i], p);
    }
    if (in_place) {
      params.push_back(p);
      grads.push_back(grads_in[i]);
      exp_avgs.push_back(exp_avgs_in[i]);
      exp_hz_sqs.push_back(exp_hz_sqs_in[i]);
      for (size_t k = 0; k < inputs_in.size(); ++k) {
        inputs[k].push_back(inputs_in[k][i]);
      }
      continue;
    }
    auto mutable_view = [this](const at::Tensor& t) {
      if (t.is_contiguous()) {
        return t;
      }
      at::Tensor copy = t.contiguous();
      writebacks_.emplace_back(t, copy);
      return copy;
    };
    params.push_back(mutable_view(p));
    grads.push_back(grads_in[i].contiguous());
    exp_avgs.push_back(mutable_view(exp_avgs_in[i]));
    exp_hz_sqs.push_back(mutable_view(exp_hz_sqs_in[i]));
    for (size_t k = 0; k < inputs_in.size(); ++k) {
      inputs[k].push_back(inputs_in[k][i].contiguous());
    }
  }
}

void Workspace::finish() {
  for (auto& [original, copy] : writebacks_) {
    original.copy_(copy);
  }
  writebacks_.clear();
}

std::unique_ptr<UpdateJob> prepare_update(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    const at::Tensor* step_scalars,
    c10::DeviceType device_type) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hz, device_type);
  std::vector<const double*> rows;
  if (step_scalars != nullptr) {
    rows = step_scalar_rows(op, *step_scalars, params);
  }
  if (params.empty()) {
    return nullptr;
  }
  std::vector<at::TensorList> inputs;
  for (const auto& named : hz.lists()) {
    inputs.push_back(named.second);
  }
  auto job = std::unique_ptr<UpdateJob>(
      new UpdateJob{Workspace(params, grads, exp_avgs, exp_hz_sqs, inputs), nullptr});
  job->workspace.step_scalars = std::move(rows);
  if (is_finite_difference(hz.source)) {
    job->hz_scale = hz.scale->const_data_ptr<double>();
  }
  return job;
}

}  // namespace esgd
