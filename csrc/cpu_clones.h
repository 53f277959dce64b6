#pragma once

// The CPU kernels' element loops are written as scalar code over restrict pointers and vectorized
// by the compiler. On x86-64 each such loop is cloned for AVX2 (and, with GCC 12 or newer, for
// x86-64-v4: AVX-512 F/BW/DQ/VL) and picked at load time (ifunc), so a portable build still runs
// 8- or 16-wide on current CPUs; at::vec::Vectorized in an extension only gets the baseline ISA.
// The AVX-512 clone matters most for 16-bit state: its integer work (the rounding hash, 16-bit
// loads, stores and selects) takes mask registers, vpmovzxwd/vpermt2w and 32 vector registers,
// where the AVX2 clone spends shuffles and spills; torch's own fused Adam runs AVX-512 on such
// machines. Plain "avx512f" is not enough: without BW and VL GCC leaves the 16-bit work in 16
// ymm registers. The AVX-512 clone has FMA, so setup.py compiles with -ffp-contract=off: every clone
// rounds as the scalar default does (scripts/check_cpu_vectorization.py refuses an FMA in them).
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12
#define ESGD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define ESGD_CPU_F16C 1
#elif defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 8))
#define ESGD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define ESGD_CPU_F16C 1
#else
#define ESGD_CPU_CLONES
#endif
