#include "esgd_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace esgd {

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

bool supports_state_dtype(at::ScalarType param, at::ScalarType state) {
  return state == state_dtype(param) || (param != at::kDouble && state == at::kBFloat16);
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

// The three tensors an update writes for parameter i must be three: m and D passed as one tensor
// (`zeros.to(torch.float32)` of a float32 tensor returns it, not a copy) would silently average
// the gradient and the curvature into one buffer. Same start address, one compare each; partial
// overlaps of different tensors are left to the caller, as torch's own foreach ops do.
void check_own_memory(
    const char* op, size_t i, const at::Tensor& p, const at::Tensor& m, const at::Tensor& d) {
  if (p.numel() == 0) {
    return;
  }
  const void* pp = p.data_ptr();
  const void* mp = m.data_ptr();
  const void* dp = d.data_ptr();
  TORCH_CHECK(
      mp != dp, op, ": exp_avgs[", i, "] and exp_hz_sqs[", i,
      "] are the same memory; m and D need a tensor each");
  TORCH_CHECK(
      pp != mp && pp != dp, op, ": params[", i, "] and its ", pp == mp ? "exp_avgs" : "exp_hz_sqs",
      "[", i, "] are the same memory; the state needs tensors of its own");
}

// The bytes [lo, hi) that a tensor's elements lie in (empty tensors have none).
struct Span {
  uintptr_t lo;
  uintptr_t hi;
};

bool span_of(const at::Tensor& t, Span& span) {
  if (t.numel() == 0) {
    return false;
  }
  int64_t low = 0;
  int64_t high = 0;
  for (int64_t dim = 0; dim < t.dim(); ++dim) {
    const int64_t extent = (t.size(dim) - 1) * t.stride(dim);
    (extent < 0 ? low : high) += extent;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  span.lo = base + low * item;
  span.hi = base + (high + 1) * item;
  return true;
}

// Refuses a source whose memory span meets that of a tensor the update writes. Spans, not
// elements: interleaved views of one buffer are refused too, which costs nothing real and keeps
// the check O(n log n) for any layout (at::get_overlap_status gives up on non-dense tensors).
void check_sources_disjoint(
    const char* op,
    at::TensorList params,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    at::TensorList sources) {
  struct Written {
    Span span;
    const char* name;
    size_t index;
  };
  std::vector<Written> written;
  written.reserve(3 * params.size());
  const std::pair<const char*, at::TensorList> lists[] = {
      {"params", params}, {"exp_avgs", exp_avgs}, {"exp_hz_sqs", exp_hz_sqs}};
  for (const auto& [name, list] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      Span span;
      if (span_of(list[i], span)) {
        written.push_back({span, name, i});
      }
    }
  }
  std::sort(written.begin(), written.end(),
            [](const Written& a, const Written& b) { return a.span.lo < b.span.lo; });
  // reach[k]: the written span among the first k + 1 (by start) that ends last.
  std::vector<size_t> reach(written.size());
  for (size_t k = 0; k < written.size(); ++k) {
    reach[k] = (k == 0 || written[k].span.hi > written[reach[k - 1]].span.hi) ? k : reach[k - 1];
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    Span span;
    if (!span_of(sources[i], span)) {
      continue;
    }
    // The written spans that start before this source ends; one of them meets it iff the one
    // that ends last ends after the source starts.
    const size_t before = std::lower_bound(
        written.begin(), written.end(), span.hi,
        [](const Written& w, uintptr_t end) { return w.span.lo < end; }) - written.begin();
    if (before == 0) {
      continue;
    }
    const Written& w = written[reach[before - 1]];
    TORCH_CHECK(
        w.span.hi <= span.lo,
        op, ": sources[", i, "] shares memory with ", w.name, "[", w.index,
        "]; a source must not overlap a tensor the update writes (params, exp_avgs, exp_hz_sqs)");
  }
}

// Rounding keys and offsets: one per tensor, each in [0, 2^63), and no shard's indices past 2^63
// (the probes' limits: esgd_cuda/probes.py).
void check_rounding(const char* op, at::TensorList params, const RoundingInputs& rounding, bool needed) {
  if (needed) {
    TORCH_CHECK(
        rounding.keys.has_value() && rounding.offsets.has_value(),
        op, ": exp_avgs are bfloat16, whose stochastic rounding needs rounding_keys and "
        "rounding_offsets (one per tensor; esgd_cuda.probes.rounding_key)");
  }
  const std::pair<const char*, const c10::OptionalIntArrayRef*> lists[] = {
      {"rounding_keys", &rounding.keys}, {"rounding_offsets", &rounding.offsets}};
  for (const auto& [name, list] : lists) {
    if (!list->has_value()) {
      continue;
    }
    const at::IntArrayRef values = **list;
    TORCH_CHECK(
        values.size() == params.size(),
        op, ": ", name, " has ", values.size(), " entries but params has ", params.size(), " tensors");
    for (size_t i = 0; i < values.size(); ++i) {
      TORCH_CHECK(values[i] >= 0, op, ": ", name, "[", i, "] = ", values[i], " is negative");
    }
  }
  if (rounding.offsets.has_value()) {
    const at::IntArrayRef offsets = *rounding.offsets;
    for (size_t i = 0; i < offsets.size(); ++i) {
      TORCH_CHECK(
          params[i].numel() <= INT64_MAX - offsets[i],
          op, ": rounding_offsets[", i, "] + params[", i, "].numel() exceeds 2^63");
    }
  }
  TORCH_CHECK(rounding.step >= 0, op, ": rounding_step = ", rounding.step, " is negative");
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
    const RoundingInputs& rounding,
    c10::DeviceType device_type) {
  const size_t n = params.size();
  const auto inputs = hz.lists();
  check_list_length(op, "grads", grads, n);
  check_list_length(op, "exp_avgs", exp_avgs, n);
  check_list_length(op, "exp_hz_sqs", exp_hz_sqs, n);
  for (const auto& [name, list] : inputs) {
    check_list_length(op, name, list, n);
  }
  if (hz.sources.has_value()) {
    TORCH_INTERNAL_ASSERT(is_finite_difference(hz.source), "sources only enter finite-difference steps");
    check_list_length(op, "sources", *hz.sources, n);
  }
  if (n == 0) {
    check_rounding(op, params, rounding, false);
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
  // The state dtype is exp_avgs[0]'s where the kernels support it (float32 or bfloat16 for 16- and
  // 32-bit parameters), else the default, which every state tensor is then checked against.
  at::ScalarType sdtype = state_dtype(pdtype);
  if (exp_avgs[0].defined() && supports_state_dtype(pdtype, exp_avgs[0].scalar_type())) {
    sdtype = exp_avgs[0].scalar_type();
  } else if (exp_avgs[0].defined() && pdtype != at::kDouble) {
    TORCH_CHECK(
        false, op, ": exp_avgs[0] has dtype ", dtype_name(exp_avgs[0].scalar_type()),
        ", expected float32 or bfloat16");
  }
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
    check_own_memory(op, i, p, exp_avgs[i], exp_hz_sqs[i]);
    for (const auto& [name, list] : inputs) {
      check_tensor(op, name, i, list[i], p, pdtype);
    }
    if (hz.sources.has_value()) {
      check_tensor(op, "sources", i, (*hz.sources)[i], p, pdtype);
    }
  }
  if (is_finite_difference(hz.source)) {
    TORCH_INTERNAL_ASSERT(hz.scale != nullptr);
    check_device_scalar(op, "hz_scale", *hz.scale, first.device());
  }
  if (hz.sources.has_value()) {
    check_sources_disjoint(op, params, exp_avgs, exp_hz_sqs, *hz.sources);
  }
  check_rounding(op, params, rounding, sdtype == at::kBFloat16);
}

std::vector<const double*> step_scalar_rows(
    const char* op, const at::Tensor& step_scalars, at::TensorList params, bool needs_step) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(step_scalars.defined(), op, ": step_scalars is undefined (None)");
  TORCH_CHECK(
      step_scalars.scalar_type() == at::kDouble,
      op, ": step_scalars has dtype ", dtype_name(step_scalars.scalar_type()), ", expected float64");
  TORCH_CHECK(
      step_scalars.dim() == 2 && step_scalars.size(0) == n &&
          (step_scalars.size(1) == kStepScalars || step_scalars.size(1) == kStepScalars + 1),
      op, ": step_scalars has shape ", step_scalars.sizes(), ", expected [", n, ", ", kStepScalars,
      "] or [", n, ", ", kStepScalars + 1, "] (one row per tensor of params)");
  TORCH_CHECK(
      !needs_step || step_scalars.size(1) == kStepScalars + 1,
      op, ": step_scalars has shape ", step_scalars.sizes(), ", expected [", n, ", ",
      kStepScalars + 1, "]: the stochastic rounding of bfloat16 state reads each tensor's step count "
      "from the last column (esgd_cuda.functional.step_scalar_table)");
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
    rows[i] = base + i * step_scalars.size(1);
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
    const std::vector<at::TensorList>& inputs_in,
    const at::TensorList* sources_in,
    bool keep_param_layout) {
  const size_t n = params_in.size();
  params.reserve(n);
  grads.reserve(n);
  exp_avgs.reserve(n);
  exp_hz_sqs.reserve(n);
  inputs.resize(inputs_in.size());
  for (auto& list : inputs) {
    list.reserve(n);
  }
  if (sources_in != nullptr) {
    sources.reserve(n);
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
      if (sources_in != nullptr) {
        const at::Tensor& s = (*sources_in)[i];
        // A source in another layout (a contiguous copy of a channels-last parameter, say) is
        // copied into the parameter's: one pass over the source, as the separate restore was,
        // instead of sending the tensor's every list through contiguous copies.
        sources.push_back(
            dense_like(s, p) ? s : at::empty_strided(p.sizes(), p.strides(), s.options()).copy_(s));
      }
      continue;
    }
    if (keep_param_layout && p.is_non_overlapping_and_dense()) {
      // p stays in place; every list whose layout differs is copied into p's (written back when
      // the kernels write it).
      auto like_p = [&p](const at::Tensor& t) {
        return dense_like(t, p) ? t : at::empty_strided(p.sizes(), p.strides(), t.options()).copy_(t);
      };
      auto writable_like_p = [&](const at::Tensor& t) {
        if (dense_like(t, p)) {
          return t;
        }
        at::Tensor copy = like_p(t);
        writebacks_.emplace_back(t, copy);
        return copy;
      };
      params.push_back(p);
      grads.push_back(like_p(grads_in[i]));
      exp_avgs.push_back(writable_like_p(exp_avgs_in[i]));
      exp_hz_sqs.push_back(writable_like_p(exp_hz_sqs_in[i]));
      for (size_t k = 0; k < inputs_in.size(); ++k) {
        inputs[k].push_back(like_p(inputs_in[k][i]));
      }
      if (sources_in != nullptr) {
        sources.push_back(like_p((*sources_in)[i]));
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
    if (sources_in == nullptr) {
      params.push_back(mutable_view(p));
    } else if (p.is_contiguous()) {
      params.push_back(p);
    } else {
      // Written, never read, by the kernels: uninitialized scratch, not a copy of p.
      at::Tensor scratch = at::empty(p.sizes(), p.options());
      writebacks_.emplace_back(p, scratch);
      params.push_back(scratch);
    }
    grads.push_back(grads_in[i].contiguous());
    exp_avgs.push_back(mutable_view(exp_avgs_in[i]));
    exp_hz_sqs.push_back(mutable_view(exp_hz_sqs_in[i]));
    for (size_t k = 0; k < inputs_in.size(); ++k) {
      inputs[k].push_back(inputs_in[k][i].contiguous());
    }
    if (sources_in != nullptr) {
      sources.push_back((*sources_in)[i].contiguous());
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
    const RoundingInputs& rounding,
    const at::Tensor* step_scalars,
    c10::DeviceType device_type) {
  check_inputs(op, params, grads, exp_avgs, exp_hz_sqs, hz, rounding, device_type);
  const bool rounds = !params.empty() && exp_avgs[0].scalar_type() == at::kBFloat16;
  std::vector<const double*> rows;
  if (step_scalars != nullptr) {
    rows = step_scalar_rows(op, *step_scalars, params, rounds);
  }
  if (params.empty()) {
    return nullptr;
  }
  std::vector<at::TensorList> inputs;
  for (const auto& named : hz.lists()) {
    inputs.push_back(named.second);
  }
  const at::TensorList* sources = hz.sources.has_value() ? &*hz.sources : nullptr;
  auto job = std::unique_ptr<UpdateJob>(
      new UpdateJob{Workspace(params, grads, exp_avgs, exp_hz_sqs, inputs, sources, rounds), nullptr});
  job->workspace.step_scalars = std::move(rows);
  if (is_finite_difference(hz.source)) {
    job->hz_scale = hz.scale->const_data_ptr<double>();
  }
  if (rounds) {
    job->rounds = true;
    job->keys.assign(rounding.keys->begin(), rounding.keys->end());
    job->offsets.assign(rounding.offsets->begin(), rounding.offsets->end());
    job->step = static_cast<uint64_t>(rounding.step);
  }
  return job;
}

}  // namespace esgd
