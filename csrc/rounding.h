#pragma once

// 16-bit optimizer state: how m and D are stored, and the counter-based random bits that round
// them. The one place in C++ where these bits are defined (the pure-PyTorch twin is
// esgd_cuda/functional.py), used by the CPU kernel, the CUDA kernel and the emulation alike.
//
// bfloat16 keeps 8 significant bits: an EMA step that moves a value by less than half its spacing
// (D with beta2 = 0.999 moves by ~0.1%, the spacing is 0.4-0.8%) is lost by round-to-nearest, which
// freezes the average. Stochastic rounding rounds x up with probability (x - down) / (up - down),
// so the stored value is x in expectation and the average keeps moving. The random bits are a pure
// function of (key, element index), like the probes (probe.h): every device, shard and replay of a
// step rounds alike, and a resumed run is bit-identical.
//
//   K        = probe_word(B, t)     B: the parameter's rounding key, t: its step count
//   bits(K, j) = lowbias32(((uint32)j ^ lo32(K)) + ((uint32)(j >> 32) ^ hi32(K)) * 0x9E3779B9)
//
// with j the element's index in the whole parameter (a shard adds its offset) and lowbias32 the
// 32-bit integer hash below (two multiplies: cheap enough for the CPU's vector units, which have
// no 64-bit multiply in AVX2). m is rounded with the low 16 bits, D with the high 16.

#include "probe.h"

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>

namespace esgd {

// Chris Wellons' lowbias32 (hash-prospector): a bijection on uint32 whose output bits each depend
// on every input bit.
C10_HOST_DEVICE inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0xD35A2D97u;
  x ^= x >> 15;
  return x;
}

constexpr uint32_t kRoundingGolden = 0x9E3779B9u;

// A step's rounding key, split the way the element hash uses it. `high` folds the index's upper
// word in: (hi32(j) ^ hi32(K)) * golden, constant over every run of 2^32 indices.
struct RoundingKey {
  uint32_t low;
  uint32_t high;
};

C10_HOST_DEVICE inline RoundingKey rounding_key(uint64_t base, uint64_t step) {
  const uint64_t k = probe_word(base, step);
  return RoundingKey{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}

C10_HOST_DEVICE inline uint32_t rounding_bits(const RoundingKey& key, uint64_t j) {
  const uint32_t lo = static_cast<uint32_t>(j) ^ key.low;
  const uint32_t hi = static_cast<uint32_t>(j >> 32) ^ key.high;
  return lowbias32(lo + hi * kRoundingGolden);
}

// `x` rounded to bfloat16 (its bits), up in magnitude with probability (low 16 bits of x) / 2^16:
// adding a uniform 16-bit number to the discarded bits carries into the kept ones exactly that
// often. NaN stays NaN (its payload could otherwise carry into the sign: CUDA's NaN is 0x7FFFFFFF);
// infinities stay (their discarded bits are zero); the largest finite values may round to inf, as
// stochastic rounding does. An integer select, which the compiler vectorizes.
C10_HOST_DEVICE inline uint16_t round_bf16_stochastic(float x, uint32_t r16) {
  const uint32_t u = c10::bit_cast<uint32_t>(x);
  const uint32_t rounded = (u + (r16 & 0xFFFFu)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// How a state storage type S holds the math type's values. float and double are stored as
// computed; bfloat16 is widened exactly and rounded stochastically.
template <typename S>
struct StateStorage {
  using Math = S;
  static constexpr bool kRounds = false;
  static C10_HOST_DEVICE inline Math load(S s) {
    return s;
  }
  static C10_HOST_DEVICE inline S store(Math v, uint32_t /*r16*/) {
    return v;
  }
};

template <>
struct StateStorage<c10::BFloat16> {
  using Math = float;
  static constexpr bool kRounds = true;
  static C10_HOST_DEVICE inline float load(c10::BFloat16 s) {
    return c10::detail::f32_from_bits(s.x);
  }
  static C10_HOST_DEVICE inline c10::BFloat16 store(float v, uint32_t r16) {
    return c10::BFloat16(round_bf16_stochastic(v, r16), c10::BFloat16::from_bits());
  }
};

template <typename S>
using math_t = typename StateStorage<S>::Math;

template <typename S>
constexpr bool rounds() {
  return StateStorage<S>::kRounds;
}

// The random halves each state list rounds with: m the low 16 bits, D the high 16.
C10_HOST_DEVICE inline uint32_t m_bits(uint32_t r) {
  return r & 0xFFFFu;
}

C10_HOST_DEVICE inline uint32_t d_bits(uint32_t r) {
  return r >> 16;
}

}  // namespace esgd
