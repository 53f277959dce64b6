#pragma once

// Argument checking and layout preparation shared by the CPU and CUDA implementations.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace esgd {

// State dtype for a parameter dtype: fp32, except fp64 for fp64 parameters.
at::ScalarType state_dtype(at::ScalarType param_dtype);

// Python spelling (float32, bfloat16, ...), which is what users see in their code.
std::string dtype_name(at::ScalarType dtype);

// Validates every list against params before anything is written, so a bad call leaves the
// parameters and state untouched. Errors name the list and index. hzs is null on plain steps.
void check_inputs(
    const char* op,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_hz_sqs,
    const at::TensorList* hzs,
    c10::DeviceType device_type);

// Tensors the kernels can walk as flat arrays. A tensor whose layout is dense and shared by all
// tensors of its group is used in place (elementwise math does not care about the order);
// anything else goes through a contiguous copy, written back by finish().
class Workspace {
 public:
  Workspace(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList exp_avgs,
      at::TensorList exp_hz_sqs,
      const at::TensorList* hzs);

  void finish();

  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> exp_avgs;
  std::vector<at::Tensor> exp_hz_sqs;
  std::vector<at::Tensor> hzs;

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;
};

}  // namespace esgd
