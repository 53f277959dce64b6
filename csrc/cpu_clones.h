#pragma once

// The CPU kernels' element loops are written as scalar code over restrict pointers and vectorized
// by the compiler. On x86-64 each such loop is cloned for AVX2 and picked at load time (ifunc),
// so a portable build still runs 8-wide on current CPUs; at::vec::Vectorized in an extension only
// gets the baseline ISA. No FMA clone: contraction would change rounding relative to the default
// clone.
#if defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 8))
#define ESGD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define ESGD_CPU_F16C 1
#else
#define ESGD_CPU_CLONES
#endif
