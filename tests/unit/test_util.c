/* The helpers under src/util/: string builder, RNG, allocation helpers, DS_TRY. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ds/common.h"
#include "ds_test.h"
#include "backend/cpu/cpu_env.h"
#include "util/mem.h"
#include "util/rng.h"
#include "util/sb.h"
#include "util/status.h"

static void test_sb(void) {
    ds_sb b;
    ds_sb_init(&b);
    ds_sb_append(&b, "", 0);
    CHECK(b.data && b.data[0] == '\0' && b.len == 0); /* an empty string, not NULL, once touched */
    for (int i = 0; i < 1000; i++) ds_sb_printf(&b, "%d,", i % 10);
    CHECK_EQ_INT(b.len, 2000);
    CHECK(ds_sb_ok(&b) && b.data[b.len] == '\0' && !strncmp(b.data, "0,1,2,", 6));
    ds_sb_reset(&b);
    ds_sb_json_str(&b, "a\"\\\n\x01\xff\xc3\xa9", 8);
    CHECK(!strcmp(b.data, "\"a\\\"\\\\\\n\\u0001\xEF\xBF\xBD\xc3\xa9\"")); /* bad byte → U+FFFD, é kept */
    ds_sb_reset(&b);
    ds_sb_json_num(&b, -INFINITY);
    CHECK(!strcmp(b.data, "-9999"));
    ds_sb_free(&b);
    CHECK(b.data == NULL && b.len == 0);
}

static void test_rng(void) {
    uint64_t s = 0; /* reference outputs of splitmix64 from state 0 (Vigna's splitmix64.c) */
    CHECK(ds_splitmix64(&s) == 0xE220A8397B1DCDAFull);
    CHECK(ds_splitmix64(&s) == 0x6E789E6AA1B965F4ull);
    CHECK(ds_splitmix64(&s) == 0x06C45D188009454Full);
    uint64_t a[4], b[4];
    ds_rng_seed(a, 42), ds_rng_seed(b, 42);
    for (int i = 0; i < 100; i++) CHECK(ds_rng_next(a) == ds_rng_next(b));
    ds_rng_seed(b, 43);
    CHECK(ds_rng_next(a) != ds_rng_next(b));
}

static void test_mem(void) {
    CHECK(ds_strdup(NULL) == NULL);
    char *d = ds_strdup("abc");
    CHECK(d && !strcmp(d, "abc"));
    free(d);
    int32_t *v = NULL;
    size_t cap = 0, n = 0;
    for (int32_t i = 0; i < 1000; i++) {
        CHECK_EQ_INT(DS_GROW(v, cap, n + 1), 0);
        v[n++] = i;
    }
    CHECK(cap >= 1000 && v[999] == 999 && v[0] == 0);
    size_t old_cap = cap;
    CHECK_EQ_INT(DS_GROW(v, cap, SIZE_MAX / 2), DS_ENOMEM); /* overflow: refused, array unchanged */
    CHECK(cap == old_cap && v[999] == 999);
    free(v);
}

static int try_twice(int first, int second, int *reached) {
    DS_TRY(first);
    *reached = 1;
    DS_TRY(second);
    return 7;
}

static void test_try(void) {
    int reached = 0;
    CHECK_EQ_INT(try_twice(DS_EINVAL, 0, &reached), DS_EINVAL);
    CHECK_EQ_INT(reached, 0);
    CHECK_EQ_INT(try_twice(0, DS_EIO, &reached), DS_EIO);
    CHECK_EQ_INT(reached, 1);
    CHECK_EQ_INT(try_twice(0, 0, &reached), 7);
}

/* OpenBLAS's kernel set by cpuid when it fell back on a CPU model it does not know. */
static void test_blas_core(void) {
    CHECK(!strcmp(ds_blas_core_for("Prescott", true, true), "SkylakeX"));
    CHECK(!strcmp(ds_blas_core_for("Prescott", true, false), "Haswell"));
    CHECK(!strcmp(ds_blas_core_for("Sandybridge", true, false), "Haswell"));
    CHECK(ds_blas_core_for("Prescott", false, false) == NULL);   /* nothing better to ask for */
    CHECK(ds_blas_core_for("SkylakeX", true, true) == NULL);     /* its own choice is wide already */
    CHECK(ds_blas_core_for("haswell", true, true) == NULL);
    CHECK(ds_blas_core_for("Zen", true, true) == NULL);
    CHECK(ds_blas_core_for("Cooperlake", true, true) == NULL);
    CHECK(ds_blas_core_for(NULL, true, true) == NULL);
}

int main(void) {
    test_blas_core();
    test_sb();
    test_rng();
    test_mem();
    test_try();
    return ds_test_result();
}
