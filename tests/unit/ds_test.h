/* Minimal test harness: CHECK macros count failures; main returns ds_test_result(). */
#ifndef DS_TEST_H
#define DS_TEST_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int ds_test_failures = 0;
static int ds_test_checks = 0;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        ds_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            ds_test_failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                        \
        }                                                                                          \
    } while (0)

#define CHECK_MSG(cond, ...)                                                                       \
    do {                                                                                           \
        ds_test_checks++;                                                                          \
        if (!(cond)) {                                                                             \
            ds_test_failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

#define CHECK_EQ_INT(a, b) CHECK_MSG((long long)(a) == (long long)(b), "%lld != %lld", (long long)(a), (long long)(b))
#define CHECK_NEAR(a, b, tol) CHECK_MSG(fabs((double)(a) - (double)(b)) <= (tol), "%.9g vs %.9g (tol %g)", (double)(a), (double)(b), (double)(tol))

/* Skip the whole test program with a printed reason (ctest SKIP_RETURN_CODE 77). */
#define SKIP(...)                                                                                  \
    do {                                                                                           \
        printf("SKIP: ");                                                                          \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        exit(77);                                                                                  \
    } while (0)

static inline int ds_test_result(void) {
    printf("%d checks, %d failed\n", ds_test_checks, ds_test_failures);
    return ds_test_failures ? 1 : 0;
}
#endif
