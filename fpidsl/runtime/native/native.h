/* What fpidsl's native kernels share: function multiversioning and the block of each row that stays in L1. */
#ifndef FPIDSL_NATIVE_H
#define FPIDSL_NATIVE_H

#include <math.h>
#include <stdint.h>

/* AVX2 and FMA where the CPU has them, chosen when the library loads (GCC's function multiversioning); the
 * baseline instruction set elsewhere. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FPIDSL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FPIDSL_CLONES
#endif

#define FPIDSL_BLOCK 1024
#define FPIDSL_MIN(a, b) ((a) < (b) ? (a) : (b))

#endif
