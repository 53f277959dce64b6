#pragma once

// The ESGD-M per-element update. This header is the only place in C++ where the formula is
// written: the CPU kernel instantiates it for scalars and at::vec::Vectorized, the CUDA kernel for
// scalars, so both kernels round identically up to FMA contraction.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace esgd {

// Hyperparameters exactly as the Python side passes them (Python floats are doubles).
struct Hyper {
  double beta1;
  double beta2;
  double v;
  double eps;
  double weight_decay;
  double step_size;
  double momentum_scale;
  double denom_scale;
  // Inverse loss scales (GradScaler) of the gradient and of Hz; 1 when unscaled. g and hz are
  // multiplied by them before use: exact for GradScaler's power-of-two scales, whereas folding
  // 1/S^2 into the coefficient of hz*hz would underflow in fp32 for S beyond about 2^60.
  double grad_scale_inv = 1.0;
  double hz_scale_inv = 1.0;
};

// Coefficients in the math type. Differences such as 1 - beta1 are formed in double before the
// cast so that fp32 math sees the correctly rounded value, as the PyTorch path does.
template <typename T>
struct Coeffs {
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T v;
  T one_minus_v;
  T eps;
  T grad_scale;
  T hz_scale;
  T decay;
  T lr_scale;
  T denom_scale;
};

template <typename T>
C10_HOST_DEVICE inline Coeffs<T> make_coeffs(const Hyper& h) {
  return Coeffs<T>{
      static_cast<T>(h.beta1),
      static_cast<T>(1.0 - h.beta1),
      static_cast<T>(h.beta2),
      static_cast<T>(1.0 - h.beta2),
      static_cast<T>(h.v),
      static_cast<T>(1.0 - h.v),
      static_cast<T>(h.eps),
      static_cast<T>(h.grad_scale_inv),
      static_cast<T>(h.hz_scale_inv),
      static_cast<T>(1.0 - h.weight_decay * h.step_size),
      static_cast<T>(h.step_size * h.momentum_scale),
      static_cast<T>(h.denom_scale),
  };
}

// Capturable steps compute the step-dependent scalars on the device, one row per tensor:
// {1 - weight_decay*step_size, step_size*momentum_scale, denom_scale} in float64, the values
// make_coeffs forms on the host (the kernels read them when they start, so nothing syncs).
constexpr int kStepScalars = 3;

template <typename T>
C10_HOST_DEVICE inline void apply_step_scalars(Coeffs<T>& c, const double* row) {
  c.decay = static_cast<T>(row[0]);
  c.lr_scale = static_cast<T>(row[1]);
  c.denom_scale = static_cast<T>(row[2]);
}

// A row's optional fourth column: the tensor's step count t, which keys the stochastic rounding of
// bfloat16 state (rounding.h) on the device, where the host's count is not known.
C10_HOST_DEVICE inline uint64_t step_count(const double* row) {
  const double t = row[kStepScalars];
  return t > 0.0 ? static_cast<uint64_t>(t) : 0;
}

// Where an estimation step's curvature estimate comes from: a list of Hessian-vector products
// (kDirect), or a difference of gradients at perturbed parameters that the kernels form in
// registers, g(theta + h z) - g(theta) (kForward) or g(theta + h z) - g(theta - h z) (kCentral).
// kNone is a plain step.
enum class HzSource : int { kNone = 0, kDirect = 1, kForward = 2, kCentral = 3 };

constexpr bool is_finite_difference(HzSource src) {
  return src == HzSource::kForward || src == HzSource::kCentral;
}

// A finite difference's multiplier 1/h (or 1/(2h)) lives on the device, so that choosing h never
// syncs; the kernels read it when they start and fold the loss scale's inverse in, in double.
template <typename T>
C10_HOST_DEVICE inline void apply_hz_scale(Coeffs<T>& c, double hz_scale_inv, double device_value) {
  c.hz_scale = static_cast<T>(hz_scale_inv * device_value);
}

// The finite difference in the math type (each operand converted from the parameter type first).
template <typename V>
C10_HOST_DEVICE inline V fd_difference(const V& plus, const V& base) {
  return plus - base;
}

// Square root for the math type; a vector type can specialize it.
template <typename V>
struct Sqrt {
  static C10_HOST_DEVICE inline V apply(const V& x) {
    return std::sqrt(x);
  }
};

// One ESGD-M step for one element (or one vector of elements). kHasHz selects estimation steps,
// which also fold Hz^2 into the curvature estimate d. hz is the estimate before its scale: a
// Hessian-vector product, or a gradient difference (fd_difference).
template <bool kHasHz, typename V>
C10_HOST_DEVICE inline void update(V& p, const V& g_scaled, V& m, V& d, const V& hz, const Coeffs<V>& c) {
  V g = g_scaled * c.grad_scale;
  if constexpr (kHasHz) {
    const V h = hz * c.hz_scale;
    // h - h is 0 where h is finite and NaN where it is inf or NaN. A non-finite curvature
    // estimate must not pass silently, so it turns the gradient, hence m and p, NaN. Added rather
    // than selected: GCC leaves a loop with a floating-point compare-and-select scalar (4x slower
    // on the 19M-parameter shape), and adding 0 changes no value (only -0 becomes +0).
    g = g + (h - h);
    d = c.beta2 * d + c.one_minus_beta2 * h * h;
  }
  m = c.beta1 * m + c.one_minus_beta1 * g;
  const V denom = Sqrt<V>::apply(d) * c.denom_scale + c.eps;
  const V est = c.v * m + c.one_minus_v * g;
  p = p * c.decay;
  p = p - c.lr_scale * est / denom;
}

}  // namespace esgd
