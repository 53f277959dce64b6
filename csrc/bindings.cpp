// Op schemas (the dispatcher's single source of truth) and the Python module esgd_cuda._C.

#include "esgd_common.h"
#include "launch_plan.h"
#include "probe_common.h"

#include <torch/extension.h>
#include <torch/library.h>

#ifdef ESGD_WITH_CUDA
namespace esgd {
// Defined in esgd_cuda.cu, which is only compiled into CUDA builds.
int cuda_runtime_version_built();
}  // namespace esgd
#endif

#ifndef ESGD_TORCH_VERSION
#define ESGD_TORCH_VERSION "unknown"
#endif
#ifndef ESGD_CUDA_ARCHS
#define ESGD_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(esgd_cuda, m) {
  m.def(
      "esgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hz_sqs, *, float beta1, float v, float eps, float weight_decay, "
      "float step_size, float momentum_scale, float denom_scale, float grad_scale_inv=1.0, "
      "int[]? rounding_keys=None, int[]? rounding_offsets=None, int rounding_step=0) -> ()");
  m.def(
      "esgd_update_hz_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hz_sqs, Tensor[] hzs, *, float beta1, float beta2, float v, float eps, "
      "float weight_decay, float step_size, float momentum_scale, float denom_scale, "
      "float grad_scale_inv=1.0, float hz_scale_inv=1.0, int[]? rounding_keys=None, "
      "int[]? rounding_offsets=None, int rounding_step=0) -> ()");
  m.def(
      "esgd_update_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hz_sqs, Tensor[] hzs, Tensor step_scalars, *, float beta1, float beta2, "
      "float v, float eps, float grad_scale_inv=1.0, float hz_scale_inv=1.0, "
      "int[]? rounding_keys=None, int[]? rounding_offsets=None) -> ()");
  m.def(
      "esgd_update_fd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hz_sqs, Tensor[] grads_plus, Tensor[] grads_minus, Tensor hz_scale, "
      "Tensor? step_scalars, *, float beta1, float beta2, float v, float eps, float weight_decay, "
      "float step_size, float momentum_scale, float denom_scale, float grad_scale_inv=1.0, "
      "float hz_scale_inv=1.0, Tensor[]? sources=None, int[]? rounding_keys=None, "
      "int[]? rounding_offsets=None, int rounding_step=0) -> ()");
  m.def("esgd_rademacher_(Tensor(a!)[] out, int[] keys, int[] offsets) -> ()");
  m.def(
      "esgd_fd_perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor scale, int[] keys, "
      "int[] offsets, *, float sign, bool save) -> ()");
}

namespace {

py::list plan_launches_py(
    const std::vector<int64_t>& numels,
    int64_t chunk_size,
    int max_tensors,
    int max_blocks) {
  py::list out;
  for (const esgd::Launch& launch :
       esgd::plan_launches(numels, chunk_size, max_tensors, max_blocks)) {
    py::dict d;
    d["tensors"] = launch.tensors;
    d["block_slot"] = launch.block_slot;
    d["block_chunk"] = launch.block_chunk;
    out.append(d);
  }
  return out;
}

at::Tensor optional_tensor(const py::object& t) {
  return t.is_none() ? at::Tensor() : t.cast<at::Tensor>();
}

std::vector<int64_t> int_list(const py::object& values) {
  return values.is_none() ? std::vector<int64_t>{} : values.cast<std::vector<int64_t>>();
}

// The emulation's rounding arguments (None: absent), viewing `keys` and `offsets`, which must outlive it.
esgd::RoundingInputs rounding_inputs(const py::object& keys_in, const std::vector<int64_t>& keys,
                                     const py::object& offsets_in, const std::vector<int64_t>& offsets,
                                     int64_t step) {
  esgd::RoundingInputs r;
  if (!keys_in.is_none()) {
    r.keys = c10::OptionalIntArrayRef(at::IntArrayRef(keys));
  }
  if (!offsets_in.is_none()) {
    r.offsets = c10::OptionalIntArrayRef(at::IntArrayRef(offsets));
  }
  r.step = step;
  return r;
}

py::dict build_info() {
  py::dict d;
  d["torch_version"] = ESGD_TORCH_VERSION;
#ifdef ESGD_WITH_CUDA
  const int v = esgd::cuda_runtime_version_built();
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  d["cuda_archs"] = ESGD_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["cuda_archs"] = py::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused ESGD-M kernels; the ops live in torch.ops.esgd_cuda.";
  m.def(
      "plan_launches", &plan_launches_py, py::arg("numels"), py::arg("chunk_size"),
      py::arg("max_tensors"), py::arg("max_blocks"),
      "The CUDA multi-tensor launch plan: a list of launches, each a dict with tensors "
      "(slot -> tensor index), block_slot and block_chunk.");
  m.def("build_info", &build_info);
  m.def(
      "emulate_cuda_update",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_hz_sqs,
         py::object hzs, double beta1, double beta2, double v, double eps, double weight_decay,
         double step_size, double momentum_scale, double denom_scale, double grad_scale_inv,
         double hz_scale_inv, py::object step_scalars, py::object rounding_keys,
         py::object rounding_offsets, int64_t rounding_step) {
        const std::vector<int64_t> keys = int_list(rounding_keys);
        const std::vector<int64_t> offsets = int_list(rounding_offsets);
        const bool has_hz = !hzs.is_none();
        const at::Tensor rows = optional_tensor(step_scalars);
        const std::vector<at::Tensor> hz_list =
            has_hz ? hzs.cast<std::vector<at::Tensor>>() : std::vector<at::Tensor>{};
        const esgd::HzInputs hz{has_hz ? esgd::HzSource::kDirect : esgd::HzSource::kNone, hz_list,
                                {}, nullptr};
        return esgd::emulate_cuda_update(
            params, grads, exp_avgs, exp_hz_sqs, hz,
            rounding_inputs(rounding_keys, keys, rounding_offsets, offsets, rounding_step),
            esgd::Hyper{beta1, beta2, v, eps, weight_decay, step_size, momentum_scale,
                        denom_scale, grad_scale_inv, hz_scale_inv},
            rows.defined() ? &rows : nullptr);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_hz_sqs"),
      py::arg("hzs"), py::kw_only(), py::arg("beta1"), py::arg("beta2"), py::arg("v"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("step_size"), py::arg("momentum_scale"),
      py::arg("denom_scale"), py::arg("grad_scale_inv") = 1.0, py::arg("hz_scale_inv") = 1.0,
      py::arg("step_scalars") = py::none(), py::arg("rounding_keys") = py::none(),
      py::arg("rounding_offsets") = py::none(), py::arg("rounding_step") = 0,
      "Test hook: the CUDA kernel's plan, tables and per-thread code run sequentially on CPU "
      "tensors (hzs=None for a plain step; step_scalars as for esgd_update_capturable_; the "
      "rounding arguments as for the ops, for bfloat16 state). Returns one (tensor index, chunk, "
      "took the vector path) tuple per block, in launch order.");
  m.def(
      "emulate_cuda_update_fd",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_hz_sqs,
         const std::vector<at::Tensor>& grads_plus, const std::vector<at::Tensor>& grads_minus,
         const at::Tensor& hz_scale, double beta1, double beta2, double v, double eps,
         double weight_decay, double step_size, double momentum_scale, double denom_scale,
         double grad_scale_inv, double hz_scale_inv, py::object step_scalars, py::object sources,
         py::object rounding_keys, py::object rounding_offsets, int64_t rounding_step) {
        const std::vector<int64_t> keys = int_list(rounding_keys);
        const std::vector<int64_t> offsets = int_list(rounding_offsets);
        const at::Tensor rows = optional_tensor(step_scalars);
        const std::vector<at::Tensor> source_list =
            sources.is_none() ? std::vector<at::Tensor>{} : sources.cast<std::vector<at::Tensor>>();
        const esgd::HzInputs hz{
            grads_minus.empty() ? esgd::HzSource::kForward : esgd::HzSource::kCentral, grads_plus,
            grads_minus, &hz_scale,
            sources.is_none() ? c10::optional<at::TensorList>() : c10::optional<at::TensorList>(source_list)};
        return esgd::emulate_cuda_update(
            params, grads, exp_avgs, exp_hz_sqs, hz,
            rounding_inputs(rounding_keys, keys, rounding_offsets, offsets, rounding_step),
            esgd::Hyper{beta1, beta2, v, eps, weight_decay, step_size, momentum_scale,
                        denom_scale, grad_scale_inv, hz_scale_inv},
            rows.defined() ? &rows : nullptr);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_hz_sqs"),
      py::arg("grads_plus"), py::arg("grads_minus"), py::arg("hz_scale"), py::kw_only(),
      py::arg("beta1"), py::arg("beta2"), py::arg("v"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("step_size"), py::arg("momentum_scale"), py::arg("denom_scale"),
      py::arg("grad_scale_inv") = 1.0, py::arg("hz_scale_inv") = 1.0,
      py::arg("step_scalars") = py::none(), py::arg("sources") = py::none(),
      py::arg("rounding_keys") = py::none(), py::arg("rounding_offsets") = py::none(),
      py::arg("rounding_step") = 0,
      "Test hook: esgd_update_fd_ through the CUDA kernel's code on CPU tensors (empty "
      "grads_minus: forward difference; sources: theta's saved copies, as for the op). Returns the "
      "per-block rows of emulate_cuda_update.");
  m.def(
      "emulate_cuda_rademacher", &esgd::emulate_cuda_rademacher, py::arg("out"), py::arg("keys"),
      py::arg("offsets"),
      "Test hook: esgd_rademacher_ through the CUDA kernel's code on CPU tensors. Returns one "
      "(tensor index, chunk, took the vector path) tuple per block, in launch order.");
  m.def(
      "emulate_cuda_fd_perturb", &esgd::emulate_cuda_fd_perturb, py::arg("params"),
      py::arg("backups"), py::arg("scale"), py::arg("keys"), py::arg("offsets"), py::kw_only(),
      py::arg("sign"), py::arg("save"),
      "Test hook: esgd_fd_perturb_ through the CUDA kernel's code on CPU tensors. Returns one "
      "(tensor index, chunk, took the vector path) tuple per block, in launch order.");
  m.attr("CHUNK_SIZE") = esgd::kChunkSize;
  m.attr("MAX_BLOCKS") = esgd::kMaxBlocks;
  m.attr("MAX_TENSORS_PLAIN") = esgd::kMaxTensorsDepth4;
  m.attr("MAX_TENSORS_HZ") = esgd::kMaxTensorsDepth5;
  m.attr("MAX_TENSORS_CENTRAL") = esgd::kMaxTensorsDepth6;
  m.attr("MAX_TENSORS_CENTRAL_SOURCES") = esgd::kMaxTensorsDepth7;
  m.attr("MAX_TENSORS_PROBE") = esgd::kMaxTensorsProbe;
}
