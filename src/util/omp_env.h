/* deltaserve — OpenMP's wait policy, chosen before libgomp starts (src/util/omp_env.c). */
#ifndef DS_UTIL_OMP_ENV_H
#define DS_UTIL_OMP_ENV_H

/* libgomp reads GOMP_SPINCOUNT / OMP_WAIT_POLICY once, when it is loaded, so a process cannot
 * change them for itself: when neither is set, this sets GOMP_SPINCOUNT to DS_GOMP_SPINCOUNT and
 * executes the same program again (/proc/self/exe, same argv); the second run finds it set and
 * returns at once. A variable the user set is left alone, and a failed exec only costs the policy.
 * Call first thing in main. Why: libgomp's default spins ~300,000 iterations at every barrier, and
 * beside any other busy process (a compiler, a second server, a training job's tokeniser) the
 * spinning thread takes the core its partner needs — prefill of the default model on 2 threads fell
 * from 247 to 26 tokens/s beside two compilers (docs/ARCHITECTURE.md, "Threads"). */
#define DS_GOMP_SPINCOUNT "1000"
void ds_omp_env_reexec(char **argv);

#endif
