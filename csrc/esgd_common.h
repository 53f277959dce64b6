#pragma once

// Argument checking and layout preparation shared by the CPU and CUDA implementations.

#include "esgd_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/OptionalArrayRef.h>

#include <array>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace esgd {

// Default state dtype for a parameter dtype: fp32, except fp64 for fp64 parameters.
at::ScalarType state_dtype(at::ScalarType param_dtype);

// Whether the kernels keep state of `state` dtype for parameters of `param` dtype: the default, or
// bfloat16 (stochastically rounded, rounding.h) for 16- and 32-bit parameters.
bool supports_state_dtype(at::ScalarType param, at::ScalarType state);

// Python spelling (float32, bfloat16, ...), which is what users see in their code.
std::string dtype_name(at::ScalarType dtype);

// Checks the step-scalar table of a capturable step (float64 [n, kStepScalars] on the params'
// device, or [n, kStepScalars + 1] with each tensor's step count last, which rounding state
// needs: `needs_step`) and returns a pointer to each tensor's row.
std::vector<const double*> step_scalar_rows(
    const char* op, const at::Tensor& step_scalars, at::TensorList params, bool needs_step = false);

// Checks a device scalar (a finite difference's 1/h): a 1-element float64 tensor on `device`,
// read only by device code.
void check_device_scalar(const char* op, const char* name, const at::Tensor& t, const at::Device& device);

// Where an estimation step's curvature estimate comes from (HzSource) and its lists: `a` is hzs
// (kDirect) or grads_plus, `b` grads_minus (kCentral); `scale` the device multiplier of a finite
// difference. source == kNone is a plain step.
struct HzInputs {
  HzSource source = HzSource::kNone;
  at::TensorList a;
  at::TensorList b;
  const at::Tensor* scale = nullptr;
  // Finite-difference steps only: where theta comes from. Set, tensor i's theta is sources[i] (the
  // copy the perturbation saved) and params[i] is only written, which fuses the restore of the
  // parameters into the update; unset, theta is params[i], read and written.
  c10::optional<at::TensorList> sources;
  // The read-only parameter-typed lists after grads, with their argument names (not sources,
  // which the workspace lays out after params: see Workspace).
  std::vector<std::pair<const char*, at::TensorList>> lists() const;
};

// Stochastic rounding of bfloat16 state (rounding.h): each tensor's rounding key and the index of
// its first element in the whole parameter (a shard's offset), and the step count t that selects
// the step's bits. A capturable step reads t from the fourth column of its step-scalar table
// instead. Unused (and may be absent) when the state is float32 or float64.
struct RoundingInputs {
  c10::OptionalIntArrayRef keys;
  c10::OptionalIntArrayRef offsets;
  int64_t step = 0;
};

// Validates every list against params before anything is written, so a bad call leaves the
// parameters and state untouched. Errors name the list and index. Sources must not share memory
// with any tensor the update writes (params, exp_avgs, exp_hz_sqs): the kernels read a source
// while writing the others, in no particular order.
void check_inputs(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    c10::DeviceType device_type);

// Tensors the kernels can walk as flat arrays. A tensor whose layout is dense and shared by all
// tensors of its group is used in place (elementwise math does not care about the order);
// anything else goes through a contiguous copy, written back by finish(). A source (theta's saved
// copy) only has to follow: when its own layout is the one that differs, it alone is copied into
// its parameter's layout, and the rest stays in place. With `keep_param_layout` (rounding state,
// whose random bits follow the element's position in the parameter's memory order) a dense
// parameter's layout is kept: the lists that differ are copied into it instead of everything into
// row-major order, so the bits do not depend on the other lists' layouts.
class Workspace {
 public:
  // `inputs`: the read-only parameter-typed lists after grads (HzInputs::lists()); `sources`:
  // HzInputs::sources (null: theta is params).
  Workspace(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList exp_avgs,
      at::TensorList exp_hz_sqs,
      const std::vector<at::TensorList>& inputs,
      const at::TensorList* sources = nullptr,
      bool keep_param_layout = false);

  void finish();

  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> exp_avgs;
  std::vector<at::Tensor> exp_hz_sqs;
  // hzs, or grads_plus [and grads_minus], in HzInputs order.
  std::vector<std::vector<at::Tensor>> inputs;
  // theta of each tensor when the step reads it from sources (then params are only written);
  // empty otherwise.
  std::vector<at::Tensor> sources;
  // Capturable steps: row i (kStepScalars doubles, on the device) holds tensor i's step scalars.
  std::vector<const double*> step_scalars;

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;
};

// Everything the update kernels need after validation: the workspace (with step-scalar rows),
// for a finite difference the address of its device multiplier, and for rounding state each
// tensor's rounding key (the base key B of rounding.h) and index offset, and the host step count
// (used where no step-scalar row gives it).
struct UpdateJob {
  Workspace workspace;
  const double* hz_scale = nullptr;
  bool rounds = false;
  std::vector<uint64_t> keys;
  std::vector<uint64_t> offsets;
  uint64_t step = 0;
};

// Validates, then lays out the tensors of an update for the kernels (null when params is empty).
// Shared by the CPU kernel, the CUDA host code and the CUDA emulation.
std::unique_ptr<UpdateJob> prepare_update(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    const at::Tensor* step_scalars,
    c10::DeviceType device_type);

// A device's update routine: validates, then updates every tensor.
using LaunchFn = void (*)(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    const Hyper& hyper,
    const at::Tensor* step_scalars);

// Test hook (cuda_emulation.cpp, bound as esgd_cuda._C.emulate_cuda_update[_fd]): the CUDA
// kernel's plan, tables and per-thread code run sequentially on CPU tensors. step_scalars may be
// null. Returns one (tensor index, chunk, took the vector path) row per block, in launch order.
std::vector<std::array<int64_t, 3>> emulate_cuda_update(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs,
    const std::vector<at::Tensor>& exp_hz_sqs,
    const HzInputs& hz,
    const RoundingInputs& rounding,
    const Hyper& hyper,
    const at::Tensor* step_scalars);

// The op entry points in schema argument order (bindings.cpp), mapped onto Hyper once for every
// device: each device file registers plain_op<its launch> and hz_op<its launch>.
template <LaunchFn Launch>
void plain_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    double beta1,
    double v,
    double eps,
    double weight_decay,
    double step_size,
    double momentum_scale,
    double denom_scale,
    double grad_scale_inv,
    c10::OptionalIntArrayRef rounding_keys,
    c10::OptionalIntArrayRef rounding_offsets,
    int64_t rounding_step) {
  // beta2 and hz_scale_inv only enter the D update, which plain steps skip.
  const Hyper hyper{beta1, 0.0, v, eps, weight_decay, step_size, momentum_scale, denom_scale,
                    grad_scale_inv, 1.0};
  Launch("esgd_update_", params, grads, exp_avgs, exp_hz_sqs, HzInputs{},
         RoundingInputs{rounding_keys, rounding_offsets, rounding_step}, hyper, nullptr);
}

template <LaunchFn Launch>
void hz_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    at::TensorList hzs,
    double beta1,
    double beta2,
    double v,
    double eps,
    double weight_decay,
    double step_size,
    double momentum_scale,
    double denom_scale,
    double grad_scale_inv,
    double hz_scale_inv,
    c10::OptionalIntArrayRef rounding_keys,
    c10::OptionalIntArrayRef rounding_offsets,
    int64_t rounding_step) {
  const Hyper hyper{beta1, beta2, v, eps, weight_decay, step_size, momentum_scale, denom_scale,
                    grad_scale_inv, hz_scale_inv};
  Launch("esgd_update_hz_", params, grads, exp_avgs, exp_hz_sqs,
         HzInputs{HzSource::kDirect, hzs, {}, nullptr},
         RoundingInputs{rounding_keys, rounding_offsets, rounding_step}, hyper, nullptr);
}

// Capturable step: the step-dependent scalars come from the device (step_scalars), so the call
// can be captured in a CUDA graph and traced by torch.compile without host values that change
// every step. An empty hzs list is a plain step. Rounding state reads each tensor's step count from
// the table's fourth column.
template <LaunchFn Launch>
void capturable_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    at::TensorList hzs,
    const at::Tensor& step_scalars,
    double beta1,
    double beta2,
    double v,
    double eps,
    double grad_scale_inv,
    double hz_scale_inv,
    c10::OptionalIntArrayRef rounding_keys,
    c10::OptionalIntArrayRef rounding_offsets) {
  // step_size, momentum_scale, denom_scale and weight_decay only enter through step_scalars.
  const Hyper hyper{beta1, beta2, v, eps, 0.0, 0.0, 1.0, 1.0, grad_scale_inv, hz_scale_inv};
  const bool estimate = !hzs.empty() || params.empty();
  const HzInputs hz{estimate ? HzSource::kDirect : HzSource::kNone, hzs, {}, nullptr};
  Launch("esgd_update_capturable_", params, grads, exp_avgs, exp_hz_sqs, hz,
         RoundingInputs{rounding_keys, rounding_offsets, 0}, hyper, &step_scalars);
}

// Estimation step with a finite-difference Hz: grads_plus - grads (empty grads_minus, forward) or
// grads_plus - grads_minus (central), times hz_scale_inv * hz_scale, hz_scale read on the device.
// With step_scalars, the host step scalars are ignored, as in a capturable step. With sources,
// theta is read from sources[i] and params[i] only written: params[i].copy_(sources[i]) and the
// step in one pass.
template <LaunchFn Launch>
void fd_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    at::TensorList grads_plus,
    at::TensorList grads_minus,
    const at::Tensor& hz_scale,
    const c10::optional<at::Tensor>& step_scalars,
    double beta1,
    double beta2,
    double v,
    double eps,
    double weight_decay,
    double step_size,
    double momentum_scale,
    double denom_scale,
    double grad_scale_inv,
    double hz_scale_inv,
    c10::optional<at::TensorList> sources,
    c10::OptionalIntArrayRef rounding_keys,
    c10::OptionalIntArrayRef rounding_offsets,
    int64_t rounding_step) {
  const Hyper hyper{beta1, beta2, v, eps, weight_decay, step_size, momentum_scale, denom_scale,
                    grad_scale_inv, hz_scale_inv};
  const HzInputs hz{grads_minus.empty() ? HzSource::kForward : HzSource::kCentral, grads_plus,
                    grads_minus, &hz_scale, sources};
  Launch("esgd_update_fd_", params, grads, exp_avgs, exp_hz_sqs, hz,
         RoundingInputs{rounding_keys, rounding_offsets, rounding_step}, hyper,
         step_scalars.has_value() ? &*step_scalars : nullptr);
}

}  // namespace esgd
