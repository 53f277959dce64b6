#pragma once

// The counter-based Rademacher probe, the one place in C++ where its bits are defined (the
// pure-PyTorch twin is esgd_cuda/probes.py): z(K, j) = -1 where bit (j & 63) of
// word(K, j >> 6) = mix64(K + (j/64 + 1) * golden) is set, +1 elsewhere. A probe element is a pure
// function of (key, index), so the CPU kernel, the CUDA kernel, any shard (through an index
// offset) and any replay draw the same bits without RNG state. All arithmetic is on uint64,
// modulo 2^64.

#include <c10/macros/Macros.h>

#include <cstdint>

namespace esgd {

constexpr uint64_t kProbeGolden = 0x9E3779B97F4A7C15ull;

// splitmix64's finalizer: every output bit depends on every input bit.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// The 64 sign bits of probe elements [64 w, 64 w + 64).
C10_HOST_DEVICE inline uint64_t probe_word(uint64_t key, uint64_t w) {
  return mix64(key + (w + 1) * kProbeGolden);
}

// Sign bits of elements j, j + 1, ..., j + count - 1 (count <= 64) in bits 0, 1, ...: one word,
// or two where the run crosses a word boundary. Bits at and above `count` are unspecified.
C10_HOST_DEVICE inline uint64_t probe_bits(uint64_t key, uint64_t j, int count) {
  const uint64_t w = j >> 6;
  const int shift = static_cast<int>(j & 63);
  uint64_t bits = probe_word(key, w) >> shift;
  if (shift != 0 && shift + count > 64) {
    bits |= probe_word(key, w + 1) << (64 - shift);
  }
  return bits;
}

C10_HOST_DEVICE inline bool probe_bit(uint64_t key, uint64_t j) {
  return (probe_word(key, j >> 6) >> (j & 63)) & 1;
}

// z as a value of the math type S.
template <typename S>
C10_HOST_DEVICE inline S rademacher_value(bool negative) {
  return negative ? S(-1) : S(1);
}

// step * z with z = +-1, exact.
template <typename S>
C10_HOST_DEVICE inline S perturbation(S step, bool negative) {
  return negative ? -step : step;
}

// x + step * z, rounded once in S.
template <typename S>
C10_HOST_DEVICE inline S perturbed(S x, S step, bool negative) {
  return x + perturbation(step, negative);
}

}  // namespace esgd
