/* deltaserve — the math libraries' settings, chosen before they start (src/backend/cpu/cpu_env.c). */
#ifndef DS_BACKEND_CPU_ENV_H
#define DS_BACKEND_CPU_ENV_H

#include <stdbool.h>

/* libgomp reads GOMP_SPINCOUNT / OMP_WAIT_POLICY and OpenBLAS reads OPENBLAS_CORETYPE once, when
 * they are loaded, so a process cannot change them for itself: when a setting below is needed,
 * this sets the variable and executes the same program again (/proc/self/exe, same argv); the
 * second run finds them set and returns at once. A variable the user set is left alone, and a
 * failed exec only costs the setting. Call first thing in main.
 *
 * - GOMP_SPINCOUNT = DS_GOMP_SPINCOUNT: libgomp's default spins ~300,000 iterations at every
 *   barrier, and beside any other busy process (a compiler, a second server, a training job's
 *   tokeniser) the spinning thread takes the core its partner needs — prefill of the default model
 *   on 2 threads fell from 247 to 26 tokens/s beside two compilers (docs/ARCHITECTURE.md, "Threads").
 * - OPENBLAS_CORETYPE: OpenBLAS's DYNAMIC_ARCH picks its GEMM kernels from the CPU models it
 *   knows; on a newer one it falls back to its SSE3 "Prescott" kernels. Debian 12's OpenBLAS
 *   0.3.21 does that on an Emerald Rapids Xeon (family 6, model 207), where sgemm then took 59% of
 *   the server's time. When the CPU has AVX2 + FMA (or AVX-512) and OpenBLAS chose a set without
 *   them, this asks for "Haswell" (or "SkylakeX"), by what cpuid reports, at run time; the name
 *   OpenBLAS had chosen is left in $DS_BLAS_CORE_WAS for the start-up log. */
#define DS_GOMP_SPINCOUNT "1000"
void ds_cpu_env_reexec(char **argv);

/* The OPENBLAS_CORETYPE to ask for when OpenBLAS detected `detected` on a CPU with (avx2: AVX2 +
 * FMA) / (avx512: AVX-512 F/BW/VL/DQ/CD), or NULL to keep its choice. */
const char *ds_blas_core_for(const char *detected, bool avx2, bool avx512);

#endif
