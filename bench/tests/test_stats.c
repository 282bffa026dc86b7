/* Percentile / summary math against numpy (default "linear" method, np.std with ddof=0).
 * Expected values were produced with numpy 2.4.6:
 *   python3 -c "import numpy as np; a=np.array([15.,20.,35.,40.,50.]);
 *     print([float(np.percentile(a,q)) for q in (0,25,50,90,99,99.9,100)], np.mean(a), np.std(a))"
 *   -> [15.0, 20.0, 35.0, 46.0, 49.6, 49.96000000000001, 50.0] 32.0 12.884098726725126
 *   python3 -c "import numpy as np; b=np.array([3.1,0.5,7.25,2.0,9.75,1.5,4.0,6.5,8.0,0.25,5.5]);
 *     print([float(np.percentile(b,q)) for q in (1,10,33.3,50,75,95,99)], np.mean(b), np.std(b))"
 *   -> [0.275, 0.5, 2.3629999999999995, 4.0, 6.875, 8.875, 9.575000000000001]
 *      4.3954545454545455 3.0715301594907314
 *   np.percentile([42.], (0,50,99)) -> 42.0 x3, np.std -> 0.0;  np.percentile([1.,2.], (50,99)) -> 1.5, 1.99 */
#include <string.h>

#include "ds_test.h"
#include "stats.h"

static void test_five(void) {
    double a[] = {50.0, 15.0, 40.0, 35.0, 20.0}; /* unsorted on purpose: dsb_summarize sorts */
    double q[] = {0, 25, 50, 90, 99, 99.9, 100};
    double want[] = {15.0, 20.0, 35.0, 46.0, 49.6, 49.96000000000001, 50.0};
    dsb_summary s;
    dsb_summarize(a, 5, q, 7, &s);
    CHECK_EQ_INT(s.n, 5);
    CHECK_NEAR(s.mean, 32.0, 1e-12);
    CHECK_NEAR(s.median, 35.0, 1e-12);
    CHECK_NEAR(s.std, 12.884098726725126, 1e-12);
    for (int i = 0; i < 7; i++) CHECK_NEAR(s.pct[i], want[i], 1e-12);
}

static void test_eleven(void) {
    double b[] = {3.1, 0.5, 7.25, 2.0, 9.75, 1.5, 4.0, 6.5, 8.0, 0.25, 5.5};
    double q[] = {1, 10, 33.3, 50, 75, 95, 99};
    double want[] = {0.275, 0.5, 2.3629999999999995, 4.0, 6.875, 8.875, 9.575000000000001};
    dsb_summary s;
    dsb_summarize(b, 11, q, 7, &s);
    CHECK_NEAR(s.mean, 4.3954545454545455, 1e-12);
    CHECK_NEAR(s.std, 3.0715301594907314, 1e-12);
    CHECK_NEAR(s.median, 4.0, 1e-12);
    for (int i = 0; i < 7; i++) CHECK_NEAR(s.pct[i], want[i], 1e-12);
}

static void test_small_and_empty(void) {
    double one[] = {42.0}, two[] = {2.0, 1.0};
    double q[] = {0, 50, 99};
    dsb_summary s;
    dsb_summarize(one, 1, q, 3, &s);
    for (int i = 0; i < 3; i++) CHECK_NEAR(s.pct[i], 42.0, 0);
    CHECK_NEAR(s.std, 0.0, 0);
    double q2[] = {50, 99};
    dsb_summarize(two, 2, q2, 2, &s);
    CHECK_NEAR(s.pct[0], 1.5, 1e-12);
    CHECK_NEAR(s.pct[1], 1.99, 1e-12);
    dsb_summarize(NULL, 0, q, 3, &s); /* vLLM reports 0 for an empty metric */
    CHECK(s.n == 0 && s.mean == 0 && s.median == 0 && s.std == 0 && s.pct[0] == 0);
    CHECK_NEAR(dsb_percentile_sorted(NULL, 0, 50), 0.0, 0);
}

static void test_vec(void) {
    dsb_vec v = {0};
    int fails = 0;
    for (int i = 0; i < 1000; i++) fails += dsb_vec_push(&v, i) != 0;
    CHECK_EQ_INT(fails, 0);
    CHECK_EQ_INT(v.n, 1000);
    CHECK_NEAR(v.v[999], 999.0, 0);
    dsb_vec_free(&v);
    CHECK(v.v == NULL && v.n == 0);
}

int main(void) {
    test_five();
    test_eleven();
    test_small_and_empty();
    test_vec();
    return ds_test_result();
}
