/* Sampling: the order follows HF's logits processors — repetition penalty, OpenAI presence/
 * frequency penalties and logit bias, then temperature, top-k, top-p, min-p, then a draw. */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

ds_sampling_params ds_sampling_default_params(void) {
    ds_sampling_params p = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .min_p = 0.0f,
                            .repetition_penalty = 1.0f, .presence_penalty = 0.0f, .frequency_penalty = 0.0f,
                            .seed = 0, .has_seed = false, .logit_bias = NULL, .n_logit_bias = 0};
    return p;
}

int ds_sampler_init(ds_sampler *s, const ds_sampling_params *p, int32_t n_vocab, uint64_t fallback_seed) {
    memset(s, 0, sizeof *s);
    s->p = *p;
    s->n_vocab = n_vocab;
    s->work = malloc(sizeof(float) * (size_t)n_vocab);
    s->idx = malloc(sizeof(int32_t) * (size_t)n_vocab);
    if (p->n_logit_bias > 0) {
        s->bias = malloc(sizeof(ds_logit_bias) * (size_t)p->n_logit_bias);
        if (s->bias) memcpy(s->bias, p->logit_bias, sizeof(ds_logit_bias) * (size_t)p->n_logit_bias);
    }
    s->p.logit_bias = s->bias;
    if (!s->work || !s->idx || (p->n_logit_bias > 0 && !s->bias)) {
        ds_sampler_free(s);
        return DS_ENOMEM;
    }
    ds_rng_seed(s->rng, p->has_seed ? p->seed : fallback_seed);
    return DS_OK;
}

void ds_sampler_free(ds_sampler *s) {
    free(s->work);
    free(s->idx);
    free(s->bias);
    memset(s, 0, sizeof *s);
}

/* Penalties use s->idx as a per-token "already seen" mark so each token is penalised once. */
static void apply_penalties(ds_sampler *s, float *logits, const int32_t *hist, int32_t n_hist, int32_t n_prompt) {
    const ds_sampling_params *p = &s->p;
    const bool rep = p->repetition_penalty > 0.0f && p->repetition_penalty != 1.0f;
    const bool pf = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    if (!rep && !pf) return;
    int32_t *cnt = s->idx;
    memset(cnt, 0, sizeof(int32_t) * (size_t)s->n_vocab);
    for (int32_t i = n_prompt; i < n_hist; i++)
        if (hist[i] >= 0 && hist[i] < s->n_vocab) cnt[hist[i]]++;
    if (pf) {
        for (int32_t i = n_prompt; i < n_hist; i++) {
            int32_t t = hist[i];
            if (t < 0 || t >= s->n_vocab || cnt[t] <= 0) continue;
            logits[t] -= p->frequency_penalty * (float)cnt[t] + p->presence_penalty;
            cnt[t] = -cnt[t]; /* done; keep "seen" for the repetition pass */
        }
    }
    if (rep) {
        for (int32_t i = 0; i < n_hist; i++) {
            int32_t t = hist[i];
            if (t < 0 || t >= s->n_vocab || cnt[t] == INT32_MIN) continue;
            logits[t] = logits[t] > 0 ? logits[t] / p->repetition_penalty : logits[t] * p->repetition_penalty;
            cnt[t] = INT32_MIN;
        }
    }
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* The `want` largest entries of x (ids into out, sorted descending) through a min-heap: O(V log
 * want), and nearly O(V) in practice since most entries lose against the heap's root at once. */
static void heap_down(int32_t *h, int32_t n, int32_t i, const float *x) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && x[h[l]] < x[h[m]]) m = l;
        if (r < n && x[h[r]] < x[h[m]]) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static int32_t top_n(const float *x, int32_t V, int32_t want, int32_t *out) {
    int32_t n = want < V ? want : V;
    for (int32_t i = 0; i < n; i++) out[i] = i;
    for (int32_t i = n / 2 - 1; i >= 0; i--) heap_down(out, n, i, x);
    for (int32_t i = n; i < V; i++)
        if (x[i] > x[out[0]]) {
            out[0] = i;
            heap_down(out, n, 0, x);
        }
    for (int32_t end = n - 1; end > 0; end--) { /* heap sort: smallest to the back → descending */
        int32_t t = out[0];
        out[0] = out[end];
        out[end] = t;
        heap_down(out, end, 0, x);
    }
    return n;
}

static double uniform01(ds_sampler *s) { return (double)(ds_rng_next(s->rng) >> 11) * (1.0 / 9007199254740992.0); }

/* Categorical draw over candidates ids[0..n) with unnormalised weights w. */
static int32_t pick(ds_sampler *s, const int32_t *ids, const float *w, int32_t n) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) sum += w[i];
    const double u = uniform01(s) * sum;
    double acc = 0.0;
    for (int32_t i = 0; i < n; i++) {
        acc += w[i];
        if (u < acc) return ids ? ids[i] : i;
    }
    return ids ? ids[n - 1] : n - 1;
}

/* How many of the n sorted candidates survive top-p (over `total` mass) and min-p; -1 when the
 * answer depends on candidates beyond n (only possible when n < limit). */
static int32_t keep_count(const ds_sampling_params *p, const float *prob, int32_t n, double total, bool complete) {
    int32_t keep = n;
    if (p->top_p > 0.0f && p->top_p < 1.0f) {
        double acc = 0.0;
        keep = -1;
        for (int32_t i = 0; i < n && keep < 0; i++)
            if ((acc += prob[i] / total) >= p->top_p) keep = i + 1;
        if (keep < 0) keep = complete ? n : -1;
        if (keep < 0) return -1;
    }
    if (p->min_p > 0.0f) {
        const float floor_p = p->min_p * prob[0];
        int32_t k = 1;
        while (k < keep && prob[k] >= floor_p) k++;
        if (k == n && !complete) return -1;
        keep = k;
    }
    return keep;
}

/* Filters (top-k, top-p, min-p) on the temperature-scaled logits, then draws. Without filters the
 * draw is one O(V) pass; with them only the top candidates are sorted (grown when needed). */
static int32_t draw(ds_sampler *s, const float *scaled) {
    const ds_sampling_params *p = &s->p;
    const int32_t V = s->n_vocab, limit = p->top_k > 0 && p->top_k < V ? p->top_k : V;
    float mx = scaled[0];
    for (int32_t i = 1; i < V; i++)
        if (scaled[i] > mx) mx = scaled[i];
    float *prob = s->work;
    const bool filtered = limit < V || (p->top_p > 0.0f && p->top_p < 1.0f) || p->min_p > 0.0f;
    if (!filtered) {
        for (int32_t i = 0; i < V; i++) prob[i] = expf(scaled[i] - mx);
        return pick(s, NULL, prob, V);
    }
    double all = 0.0;
    if (limit == V)
        for (int32_t i = 0; i < V; i++) all += expf(scaled[i] - mx);
    for (int32_t want = limit < V ? limit : 256;; want = want * 4 < V ? want * 4 : V) {
        int32_t n = top_n(scaled, V, want, s->idx);
        double cand = 0.0;
        for (int32_t i = 0; i < n; i++) cand += (prob[i] = expf(scaled[s->idx[i]] - mx));
        const bool complete = n == limit || n == V;
        int32_t keep = keep_count(p, prob, n, limit < V ? cand : all, complete);
        if (keep > 0) return pick(s, s->idx, prob, keep);
    }
}

int32_t ds_sampler_sample(ds_sampler *s, float *logits, const int32_t *hist, int32_t n_hist, int32_t n_prompt) {
    apply_penalties(s, logits, hist, n_hist, n_prompt);
    for (int32_t i = 0; i < s->p.n_logit_bias; i++) {
        const ds_logit_bias *lb = &s->p.logit_bias[i];
        if (lb->token >= 0 && lb->token < s->n_vocab) logits[lb->token] += lb->bias;
    }
    if (s->p.temperature <= 0.0f) return argmax(logits, s->n_vocab);
    const float inv_t = 1.0f / s->p.temperature;
    for (int32_t i = 0; i < s->n_vocab; i++) logits[i] *= inv_t;
    return draw(s, logits);
}

float ds_logprobs(const float *logits, int32_t n_vocab, int32_t tok, ds_top_logprob *top, int32_t n_top) {
    float mx = -FLT_MAX;
    for (int32_t i = 0; i < n_vocab; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i++) sum += exp((double)(logits[i] - mx));
    const float lse = mx + (float)log(sum);
    /* top-n by a partial insertion pass: n_top <= 20 */
    int32_t filled = 0;
    for (int32_t i = 0; i < n_vocab && n_top > 0; i++) {
        if (filled == n_top && logits[i] <= top[filled - 1].logprob) continue;
        int32_t j = filled < n_top ? filled++ : n_top - 1;
        while (j > 0 && top[j - 1].logprob < logits[i]) {
            top[j] = top[j - 1];
            j--;
        }
        top[j].token = i;
        top[j].logprob = logits[i];
    }
    for (int32_t i = 0; i < filled; i++) top[i].logprob -= lse;
    return logits[tok] - lse;
}
