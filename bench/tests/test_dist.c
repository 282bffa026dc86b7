/* Arrival processes and adapter popularity: statistics of a fixed-seed sample against the exact
 * values, with tolerances of several standard errors (the seed is fixed, so the test is
 * deterministic; the tolerances say how far off a correct sampler could plausibly be). */
#include <math.h>
#include <string.h>

#include "dist.h"
#include "ds_test.h"
#include "rng.h"

#define N_GAPS 200000
#define N_DRAWS 200000

/* Mean and coefficient of variation of N gaps at `rate` with gamma shape `b`:
 * mean 1/rate, cv 1/sqrt(b) (vLLM's burstiness). */
static void check_arrivals(double rate, double b, uint64_t seed) {
    dsb_rng rng;
    dsb_rng_seed(&rng, seed, 1);
    dsb_arrivals a;
    dsb_arrivals_init(&a, rate, b, rng);
    double sum = 0, sum2 = 0;
    int negative = 0;
    for (int i = 0; i < N_GAPS; i++) {
        double g = dsb_arrivals_next_gap(&a);
        negative += g < 0;
        sum += g;
        sum2 += g * g;
    }
    CHECK_EQ_INT(negative, 0);
    double mean = sum / N_GAPS, var = sum2 / N_GAPS - mean * mean, cv = sqrt(var) / mean;
    double want_cv = 1.0 / sqrt(b);
    /* Standard error of the mean: cv/sqrt(N) relative (0.45% for cv 2); allow 2%. The sample cv
     * of a gamma has a relative s.e. of about sqrt((kurtosis-1)/(4N)) (0.6% for shape 0.25);
     * allow 3%. */
    CHECK_MSG(fabs(mean * rate - 1.0) < 0.02, "rate %g b %g: mean gap %g, want %g", rate, b, mean, 1 / rate);
    CHECK_MSG(fabs(cv / want_cv - 1.0) < 0.03, "rate %g b %g: cv %g, want %g", rate, b, cv, want_cv);
}

static void test_arrivals(void) {
    check_arrivals(10.0, 1.0, 1);   /* Poisson: exponential gaps, cv 1 */
    check_arrivals(10.0, 0.25, 2);  /* bursty: cv 2 (S-LoRA cv=2) */
    check_arrivals(3.5, 4.0, 3);    /* smoother than Poisson: cv 0.5 */
    dsb_rng rng;
    dsb_rng_seed(&rng, 0, 1);
    dsb_arrivals a;
    dsb_arrivals_init(&a, INFINITY, 1.0, rng);
    CHECK(dsb_arrivals_next_gap(&a) == 0.0); /* rate inf: everything at t = 0 */
}

static void test_rng(void) {
    dsb_rng a, b;
    dsb_rng_seed(&a, 42, 0);
    dsb_rng_seed(&b, 42, 0);
    bool same = true;
    for (int i = 0; i < 100; i++) same = same && dsb_rng_next(&a) == dsb_rng_next(&b);
    CHECK(same); /* reproducible */
    dsb_rng_seed(&b, 42, 1);
    CHECK(dsb_rng_next(&a) != dsb_rng_next(&b)); /* streams differ */
    double s = 0, s2 = 0;
    for (int i = 0; i < N_GAPS; i++) {
        double x = dsb_rng_gamma(&a, 3.0, 2.0); /* mean 6, variance 12 */
        s += x;
        s2 += x * x;
    }
    double m = s / N_GAPS;
    CHECK_NEAR(m, 6.0, 0.05);
    CHECK_NEAR(s2 / N_GAPS - m * m, 12.0, 0.3);
    int bad = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t v = dsb_rng_below(&a, 7);
        double u = dsb_rng_uniform(&a);
        bad += !(v < 7 && u >= 0.0 && u < 1.0);
    }
    CHECK_EQ_INT(bad, 0);
}

/* Empirical frequencies of N draws vs the pmf: each within 5 binomial standard errors. */
static void check_freqs(dsb_popularity *p, const char *what, uint64_t seed) {
    dsb_rng rng;
    dsb_rng_seed(&rng, seed, 2);
    static long count[64];
    memset(count, 0, sizeof(count));
    int out_of_range = 0;
    for (int i = 0; i < N_DRAWS; i++) {
        int k = dsb_popularity_sample(p, &rng);
        if (k >= 0 && k < p->n) count[k]++;
        else out_of_range++;
    }
    CHECK_EQ_INT(out_of_range, 0);
    double total = 0;
    for (int k = 0; k < p->n; k++) {
        double pk = dsb_popularity_pmf(p, k), f = (double)count[k] / N_DRAWS;
        double se = sqrt(pk * (1 - pk) / N_DRAWS);
        total += pk;
        CHECK_MSG(fabs(f - pk) <= 5 * se + 1e-9, "%s: item %d freq %.5f pmf %.5f", what, k, f, pk);
    }
    CHECK_NEAR(total, 1.0, 1e-12);
}

static void test_popularity(void) {
    dsb_popularity p;
    char err[128];
    dsb_pop_kind kind;
    double alpha;
    CHECK(dsb_popularity_parse("zipf:1.5", &kind, &alpha, err, sizeof(err)) == 0 && kind == DSB_POP_ZIPF && alpha == 1.5);
    CHECK(dsb_popularity_parse("power:0.3", &kind, &alpha, err, sizeof(err)) == 0 && kind == DSB_POP_POWER);
    CHECK(dsb_popularity_parse("zipf:-1", &kind, &alpha, err, sizeof(err)) != 0);
    CHECK(dsb_popularity_parse("pareto:1", &kind, &alpha, err, sizeof(err)) != 0);

    CHECK(dsb_popularity_init(&p, DSB_POP_UNIFORM, 10, 1, NULL) == 0);
    check_freqs(&p, "uniform", 11);
    dsb_popularity_free(&p);

    /* zipf:1 over 3 items: 1, 1/2, 1/3 normalised by H3 = 11/6. */
    CHECK(dsb_popularity_init(&p, DSB_POP_ZIPF, 3, 1.0, NULL) == 0);
    CHECK_NEAR(dsb_popularity_pmf(&p, 0), 6.0 / 11, 1e-12);
    CHECK_NEAR(dsb_popularity_pmf(&p, 2), 2.0 / 11, 1e-12);
    dsb_popularity_free(&p);
    CHECK(dsb_popularity_init(&p, DSB_POP_ZIPF, 20, 1.2, NULL) == 0);
    check_freqs(&p, "zipf:1.2", 12);
    dsb_popularity_free(&p);

    /* power:0.5 over 4: P(k) = sqrt((k+1)/4) - sqrt(k/4) -> 0.5, 0.2071.., 0.1589.., 0.1339.. */
    CHECK(dsb_popularity_init(&p, DSB_POP_POWER, 4, 0.5, NULL) == 0);
    CHECK_NEAR(dsb_popularity_pmf(&p, 0), 0.5, 1e-12);
    CHECK_NEAR(dsb_popularity_pmf(&p, 1), sqrt(0.5) - 0.5, 1e-12);
    check_freqs(&p, "power:0.5/4", 13);
    dsb_popularity_free(&p);
    CHECK(dsb_popularity_init(&p, DSB_POP_POWER, 50, 0.3, NULL) == 0);
    check_freqs(&p, "power:0.3/50", 14);
    dsb_popularity_free(&p);
    CHECK(dsb_popularity_init(&p, DSB_POP_POWER, 8, 1.0, NULL) == 0); /* alpha 1 = uniform */
    CHECK_NEAR(dsb_popularity_pmf(&p, 5), 1.0 / 8, 1e-12);
    check_freqs(&p, "power:1", 15);
    dsb_popularity_free(&p);

    /* GAIE regression split: 5 x 0.12, 5 x 0.06, 5 x 0.02. */
    double w[15];
    for (int i = 0; i < 15; i++) w[i] = i < 5 ? 0.12 : i < 10 ? 0.06 : 0.02;
    CHECK(dsb_popularity_init(&p, DSB_POP_SPLIT, 15, 1, w) == 0);
    CHECK_NEAR(dsb_popularity_pmf(&p, 0), 0.12, 1e-12);
    CHECK_NEAR(dsb_popularity_pmf(&p, 14), 0.02, 1e-12);
    check_freqs(&p, "split", 16);
    dsb_popularity_free(&p);
    double bad[2] = {0, 0};
    CHECK(dsb_popularity_init(&p, DSB_POP_SPLIT, 2, 1, bad) != 0);

    dsb_rng rng;
    dsb_rng_seed(&rng, 0, 0);
    CHECK(dsb_popularity_init(&p, DSB_POP_ROUND_ROBIN, 3, 1, NULL) == 0);
    int seq[6];
    for (int i = 0; i < 6; i++) seq[i] = dsb_popularity_sample(&p, &rng);
    CHECK(seq[0] == 0 && seq[1] == 1 && seq[2] == 2 && seq[3] == 0 && seq[5] == 2);
    dsb_popularity_free(&p);
}

static void test_lengths(void) {
    dsb_rng rng;
    dsb_rng_seed(&rng, 5, 3);
    int lo = 1 << 30, hi = 0;
    for (int i = 0; i < 10000; i++) {
        int n = dsb_len_sample(&rng, 100, 0.5);
        lo = n < lo ? n : lo;
        hi = n > hi ? n : hi;
    }
    CHECK_EQ_INT(lo, 50); /* [floor(100*0.5), floor(100*1.5)] inclusive, all values reached */
    CHECK_EQ_INT(hi, 150);
    CHECK_EQ_INT(dsb_len_sample(&rng, 64, 0.0), 64);
    CHECK(dsb_len_sample(&rng, 1, 1.0) >= 1);
}

int main(void) {
    test_rng();
    test_arrivals();
    test_popularity();
    test_lengths();
    return ds_test_result();
}
