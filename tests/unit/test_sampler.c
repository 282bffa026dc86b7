/* Sampler: greedy, the sampled distribution against the exact softmax (temperature, top-k, top-p,
 * min-p) on small and real-size vocabularies, seeds, penalties (HF repetition, OpenAI presence /
 * frequency), logit bias, and logprobs. */
#include "ds_test.h"
#include "engine/sampler.h"

#include <string.h>

#define DRAWS 200000

/* Exact probabilities after the filters, by brute force (sorting everything). */
static void reference(const float *logits, int V, const ds_sampling_params *p, double *out) {
    int *ids = malloc(sizeof(int) * (size_t)V);
    double *w = malloc(sizeof(double) * (size_t)V);
    for (int i = 0; i < V; i++) ids[i] = i;
    for (int i = 1; i < V; i++) /* insertion sort by logit, descending (small V in tests) */
        for (int j = i; j > 0 && logits[ids[j]] > logits[ids[j - 1]]; j--) {
            int t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    int n = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += (w[i] = exp((logits[ids[i]] - logits[ids[0]]) / p->temperature));
    int keep = n;
    if (p->top_p < 1) {
        double acc = 0;
        for (int i = 0; i < n; i++)
            if ((acc += w[i] / sum) >= p->top_p) {
                keep = i + 1;
                break;
            }
    }
    if (p->min_p > 0) {
        int k = 1;
        while (k < keep && w[k] >= p->min_p * w[0]) k++;
        keep = k;
    }
    double s2 = 0;
    for (int i = 0; i < keep; i++) s2 += w[i];
    memset(out, 0, sizeof(double) * (size_t)V);
    for (int i = 0; i < keep; i++) out[ids[i]] = w[i] / s2;
    free(ids);
    free(w);
}

/* Draws DRAWS samples and compares frequencies with the reference (5 standard errors + 1e-3). */
static void check_distribution(const char *what, const float *logits, int V, ds_sampling_params p) {
    double *ref = malloc(sizeof(double) * (size_t)V), *cnt = calloc((size_t)V, sizeof(double));
    reference(logits, V, &p, ref);
    p.has_seed = true;
    p.seed = 42;
    ds_sampler s;
    CHECK(ds_sampler_init(&s, &p, V, 0) == 0);
    float *work = malloc(sizeof(float) * (size_t)V);
    for (int d = 0; d < DRAWS; d++) {
        memcpy(work, logits, sizeof(float) * (size_t)V);
        cnt[ds_sampler_sample(&s, work, NULL, 0, 0)]++;
    }
    double worst = 0;
    for (int i = 0; i < V; i++) {
        double f = cnt[i] / DRAWS, se = sqrt(ref[i] * (1 - ref[i]) / DRAWS);
        if (ref[i] == 0) CHECK_MSG(cnt[i] == 0, "%s: token %d drawn %g times but filtered out", what, i, cnt[i]);
        double z = fabs(f - ref[i]) - (5 * se + 1e-3);
        if (z > worst) worst = z;
    }
    CHECK_MSG(worst <= 0, "%s: frequency off by %.4g beyond tolerance", what, worst);
    ds_sampler_free(&s);
    free(work);
    free(ref);
    free(cnt);
}

static void test_distributions(void) {
    const float small[8] = {2.0f, 1.5f, 1.4f, 0.3f, -0.5f, 0.0f, 1.0f, -2.0f};
    ds_sampling_params p = ds_sampling_default_params();
    check_distribution("t=1", small, 8, p);
    p.temperature = 0.5f;
    check_distribution("t=0.5", small, 8, p);
    p.temperature = 1.0f;
    p.top_k = 3;
    check_distribution("top_k=3", small, 8, p);
    p.top_k = 0;
    p.top_p = 0.6f;
    check_distribution("top_p=0.6", small, 8, p);
    p.top_p = 1.0f;
    p.min_p = 0.3f;
    check_distribution("min_p=0.3", small, 8, p);
    /* a real-size vocabulary with a long tail: top-p must reach past the first candidate batch */
    enum { V = 49152 };
    static float big[V];
    uint64_t st[4];
    ds_rng_seed(st, 7);
    for (int i = 0; i < V; i++) big[i] = (float)((ds_rng_next(st) >> 40) * (1.0 / (1 << 24))) * 0.5f;
    ds_sampling_params q = ds_sampling_default_params();
    q.top_p = 0.9f;
    q.has_seed = true;
    ds_sampler s;
    ds_sampler_init(&s, &q, V, 0);
    static float work[V];
    /* reference() is quadratic: check membership by rank instead (a flat tail is the worst case:
     * the candidate set must grow to the whole vocabulary) */
    int bad = 0;
    for (int d = 0; d < 200; d++) {
        memcpy(work, big, sizeof big);
        int t = ds_sampler_sample(&s, work, NULL, 0, 0);
        int above = 0;
        for (int i = 0; i < V; i++) above += big[i] > big[t];
        /* the nucleus of a near-uniform tail holds ~90% of the tokens: never the bottom 5% */
        if (above > V * 0.95) bad++;
    }
    CHECK_MSG(bad == 0, "top_p over 49152 tokens drew %d tokens outside the nucleus", bad);
    ds_sampler_free(&s);
}

static void test_greedy_seed_penalties(void) {
    float l[6] = {1, 3, 2, 0.5f, 3.5f, -1};
    ds_sampling_params p = ds_sampling_default_params();
    p.temperature = 0;
    ds_sampler s;
    ds_sampler_init(&s, &p, 6, 0);
    float w[6];
    memcpy(w, l, sizeof l);
    CHECK_EQ_INT(ds_sampler_sample(&s, w, NULL, 0, 0), 4);
    /* HF repetition penalty 2 over history {4}: 3.5 → 1.75, so token 1 (3.0) wins */
    p.repetition_penalty = 2.0f;
    ds_sampler_free(&s);
    ds_sampler_init(&s, &p, 6, 0);
    int32_t hist[1] = {4};
    memcpy(w, l, sizeof l);
    CHECK_EQ_INT(ds_sampler_sample(&s, w, hist, 1, 0), 1);
    CHECK_NEAR(w[4], 1.75, 1e-6);
    /* OpenAI frequency penalty on generated tokens only: 2 occurrences of 4 → 3.5 - 2*1 = 1.5 */
    p.repetition_penalty = 1.0f;
    p.frequency_penalty = 1.0f;
    p.presence_penalty = 0.5f;
    ds_sampler_free(&s);
    ds_sampler_init(&s, &p, 6, 0);
    int32_t hist2[3] = {1, 4, 4}; /* token 1 is in the prompt (n_prompt = 1): not penalised */
    memcpy(w, l, sizeof l);
    CHECK_EQ_INT(ds_sampler_sample(&s, w, hist2, 3, 1), 1);
    CHECK_NEAR(w[4], 3.5 - 2.0 - 0.5, 1e-6);
    CHECK_NEAR(w[1], 3.0, 1e-6);
    ds_sampler_free(&s);
    /* logit bias -100 bans the argmax */
    ds_logit_bias lb = {4, -100.0f};
    p = ds_sampling_default_params();
    p.temperature = 0;
    p.logit_bias = &lb;
    p.n_logit_bias = 1;
    ds_sampler_init(&s, &p, 6, 0);
    memcpy(w, l, sizeof l);
    CHECK_EQ_INT(ds_sampler_sample(&s, w, NULL, 0, 0), 1);
    ds_sampler_free(&s);
    /* same seed, same draws */
    p = ds_sampling_default_params();
    p.has_seed = true;
    p.seed = 1234;
    ds_sampler a, b;
    ds_sampler_init(&a, &p, 6, 1);
    ds_sampler_init(&b, &p, 6, 2);
    int same = 1;
    for (int i = 0; i < 100; i++) {
        float x[6], y[6];
        memcpy(x, l, sizeof l);
        memcpy(y, l, sizeof l);
        same &= ds_sampler_sample(&a, x, NULL, 0, 0) == ds_sampler_sample(&b, y, NULL, 0, 0);
    }
    CHECK(same);
    ds_sampler_free(&a);
    ds_sampler_free(&b);
}

static void test_logprobs(void) {
    float l[5] = {0.1f, 2.0f, -1.0f, 1.0f, 0.5f};
    double lse = 0;
    for (int i = 0; i < 5; i++) lse += exp(l[i]);
    lse = log(lse);
    ds_top_logprob top[3];
    float lp = ds_logprobs(l, 5, 3, top, 3);
    CHECK_NEAR(lp, l[3] - lse, 1e-6);
    CHECK(top[0].token == 1 && top[1].token == 3 && top[2].token == 4);
    CHECK_NEAR(top[0].logprob, l[1] - lse, 1e-6);
}

int main(void) {
    test_distributions();
    test_greedy_seed_penalties();
    test_logprobs();
    return ds_test_result();
}
