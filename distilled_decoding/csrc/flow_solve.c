/* Fused CPU kernel of the categorical flow map's solver (distilled_decoding.flow_kernels).
 *
 * Bit-identical to the torch kernels of flow_kernels.py by construction: every value is computed by the same
 * sequence of IEEE float32 operations (compiled with -ffp-contract=off; fused multiply-adds only where fmaf is
 * written, as torch.embedding_bag's chains compute them), per row, in an order fixed by the row alone:
 *
 *   log-weights  l_p = fma chain (1·log p_p, −b·‖c_p‖², a·x_0·c_0p, …, a·x_(D−1)·c_(D−1)p)
 *   weights      e_p = dd_exp(l_p − max_q l_q)                      (0 at padding, where log p = −inf)
 *   sums         S_l = fma chain of e_p·[c_p, 1] over p ≡ l (mod 16), p ascending; s = S_0 + S_1 + … + S_15
 *   x̂0           s[:D] / s[D] into the solver slot of the evaluation; then the next chain weights
 *                w = fma chain over the evaluation's six (coefficient, slot) terms, and the state slot ← w[2:].
 *
 * One row per OpenMP iteration (static schedule): a row's bits do not depend on the batch or the thread count.
 *
 * Speed (AVX-512): an evaluation is one pass over the codes when the position holding the last evaluation's largest
 * log-weight (at first: log p's) still holds it: the weights are taken relative to that log-weight as they are
 * computed, and the pass's true max confirms the guess (then every value above is the same); otherwise (a few of
 * ~24 evaluations per row) the pass is discarded and the two passes run: log-weights and their max, then the sums.
 * Groups of 16 are handled four at a time so that their exp's dependency chains overlap.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define SLOTS 8
#define TERMS 6

/* exp(x) for x <= 0 (Cephes expf: Cody-Waite reduction, degree-5 polynomial); 0 below -87 (and at -inf). */
static inline float dd_exp(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * z + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : y * scale;
}

#if defined(__AVX512F__)
/* 16-lane AVX-512 versions of the two passes: the same IEEE operations per lane as the portable ones below. */
#include <immintrin.h>

static inline __m512 v_exp(__m512 x) { /* dd_exp lane by lane */
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __m512 xc = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 z = _mm512_mul_ps(r, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, z), r), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(bits)));
}

static inline __attribute__((always_inline)) float row_logits(int64_t K, int64_t D, const float *restrict lp,
                                                              const float *restrict codes, int64_t dim_stride,
                                                              const float *restrict w, float *restrict L) {
    const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[1]), zero = _mm512_setzero_ps();
    const float *norms = codes + D * dim_stride;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < K; i += LANES) {
        __m512 acc = _mm512_fmadd_ps(w1, _mm512_loadu_ps(norms + i), _mm512_fmadd_ps(w0, _mm512_loadu_ps(lp + i), zero));
        for (int64_t d = 0; d < D; d++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w[2 + d]), _mm512_loadu_ps(codes + d * dim_stride + i), acc);
        _mm512_storeu_ps(L + i, acc);
        mx = _mm512_max_ps(mx, acc);
    }
    return _mm512_reduce_max_ps(mx);
}

#define DD_FUSED 1

/* The weights of 4 consecutive groups of 16 codes from i, at x = log-weight − max (4 × 16), added into the D + 1
 * accumulators: acc[d] ← fma(e, c_d, acc[d]) group after group (the order of the 16 fma chains); a group whose
 * x < −87 throughout has e = 0 and fma(0, c, acc) = acc, so a block of dead groups is skipped. Four groups at a
 * time: the exp's long dependency chain of one group overlaps the others'. */
static inline __attribute__((always_inline)) void block_sums(int64_t D, const float *restrict codes,
                                                             int64_t dim_stride, int64_t i, const __m512 *x,
                                                             __m512 *acc) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 live = 0;
    for (int u = 0; u < 4; u++) live |= _mm512_cmp_ps_mask(x[u], lo, _CMP_GE_OQ);
    if (!live) return;
    __m512 e[4];
    for (int u = 0; u < 4; u++) e[u] = v_exp(x[u]);
    for (int64_t d = 0; d < D; d++)
        for (int u = 0; u < 4; u++)
            acc[d] = _mm512_fmadd_ps(e[u], _mm512_loadu_ps(codes + d * dim_stride + i + u * LANES), acc[d]);
    for (int u = 0; u < 4; u++) acc[D] = _mm512_add_ps(acc[D], e[u]);
}

/* x̂0 = sums[:D] / sums[D] from the accumulators' 16 lanes each, summed in lane order. */
static inline __attribute__((always_inline)) void finish_mean(int64_t D, const __m512 *acc, float *restrict x0) {
    float sums[D + 1];
    for (int64_t d = 0; d <= D; d++) {
        float t[LANES];
        _mm512_storeu_ps(t, acc[d]);
        float s = t[0];
        for (int l = 1; l < LANES; l++) s = s + t[l];
        sums[d] = s;
    }
    for (int64_t d = 0; d < D; d++) x0[d] = sums[d] / sums[D];
}

static inline __attribute__((always_inline)) void row_mean(int64_t K, int64_t D, const float *restrict codes,
                                                           int64_t dim_stride, const float *restrict L, float m,
                                                           float *restrict x0) {
    __m512 acc[D + 1], x[4];
    for (int64_t j = 0; j <= D; j++) acc[j] = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t i = 0; i < K; i += 4 * LANES) { /* K is a multiple of 64 */
        for (int u = 0; u < 4; u++) x[u] = _mm512_sub_ps(_mm512_loadu_ps(L + i + u * LANES), mv);
        block_sums(D, codes, dim_stride, i, x, acc);
    }
    finish_mean(D, acc, x0);
}

/* row_logits and row_mean in one pass at a guessed max mh (one of the row's log-weights): x̂0 into x0 as
 * row_mean(…, mh) computes it; returns the true max (L is not written). The result is row_mean's, bit for bit,
 * when the returned max equals mh; otherwise the caller discards x0 and runs the two passes. */
static inline __attribute__((always_inline)) float row_fused(int64_t K, int64_t D, const float *restrict lp,
                                                             const float *restrict codes, int64_t dim_stride,
                                                             const float *restrict w, float mh, float *restrict x0) {
    const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[1]), zero = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(mh);
    const float *norms = codes + D * dim_stride;
    __m512 mx = _mm512_set1_ps(-INFINITY), acc[D + 1], l[4];
    for (int64_t j = 0; j <= D; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K; i += 4 * LANES) {
        for (int u = 0; u < 4; u++)
            l[u] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(norms + i + u * LANES),
                                   _mm512_fmadd_ps(w0, _mm512_loadu_ps(lp + i + u * LANES), zero));
        for (int64_t d = 0; d < D; d++)
            for (int u = 0; u < 4; u++)
                l[u] = _mm512_fmadd_ps(_mm512_set1_ps(w[2 + d]), _mm512_loadu_ps(codes + d * dim_stride + i + u * LANES),
                                       l[u]);
        for (int u = 0; u < 4; u++) {
            mx = _mm512_max_ps(mx, l[u]);
            l[u] = _mm512_sub_ps(l[u], mv);
        }
        block_sums(D, codes, dim_stride, i, l, acc);
    }
    finish_mean(D, acc, x0);
    return _mm512_reduce_max_ps(mx);
}

#elif defined(__AVX2__) && defined(__FMA__)
/* 8-lane AVX2 versions of the two passes: the same IEEE operations per lane as the portable ones below. */
#include <immintrin.h>

static inline __m256 v_exp(__m256 x) { /* dd_exp lane by lane */
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 xc = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 z = _mm256_mul_ps(r, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, z), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

static inline float v_hmax(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    float m = t[0];
    for (int l = 1; l < 8; l++) m = t[l] > m ? t[l] : m;
    return m;
}

static inline __attribute__((always_inline)) float row_logits(int64_t K, int64_t D, const float *restrict lp,
                                                              const float *restrict codes, int64_t dim_stride,
                                                              const float *restrict w, float *restrict L) {
    const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]), zero = _mm256_setzero_ps();
    const float *norms = codes + D * dim_stride;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < K; i += 8) {
        __m256 acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(norms + i), _mm256_fmadd_ps(w0, _mm256_loadu_ps(lp + i), zero));
        for (int64_t d = 0; d < D; d++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[2 + d]), _mm256_loadu_ps(codes + d * dim_stride + i), acc);
        _mm256_storeu_ps(L + i, acc);
        mx = _mm256_max_ps(mx, acc);
    }
    return v_hmax(mx);
}

static inline __attribute__((always_inline)) void row_mean(int64_t K, int64_t D, const float *restrict codes,
                                                           int64_t dim_stride, const float *restrict L, float m,
                                                           float *restrict x0) {
    __m256 acc[(D + 1) * 2]; /* lanes 0-7 and 8-15 of each of the D + 1 sums */
    for (int64_t j = 0; j < (D + 1) * 2; j++) acc[j] = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(m);
    for (int64_t i = 0; i < K; i += LANES) {
        __m256 a = _mm256_loadu_ps(L + i), b = _mm256_loadu_ps(L + i + 8);
        if (v_hmax(_mm256_max_ps(a, b)) - m < -87.0f) continue; /* e = 0 throughout: no change */
        __m256 e0 = v_exp(_mm256_sub_ps(a, mv)), e1 = v_exp(_mm256_sub_ps(b, mv));
        for (int64_t d = 0; d < D; d++) {
            const float *c = codes + d * dim_stride + i;
            acc[2 * d] = _mm256_fmadd_ps(e0, _mm256_loadu_ps(c), acc[2 * d]);
            acc[2 * d + 1] = _mm256_fmadd_ps(e1, _mm256_loadu_ps(c + 8), acc[2 * d + 1]);
        }
        acc[2 * D] = _mm256_add_ps(acc[2 * D], e0);
        acc[2 * D + 1] = _mm256_add_ps(acc[2 * D + 1], e1);
    }
    float sums[D + 1];
    for (int64_t d = 0; d <= D; d++) {
        float t[LANES];
        _mm256_storeu_ps(t, acc[2 * d]);
        _mm256_storeu_ps(t + 8, acc[2 * d + 1]);
        float s = t[0];
        for (int l = 1; l < LANES; l++) s = s + t[l];
        sums[d] = s;
    }
    for (int64_t d = 0; d < D; d++) x0[d] = sums[d] / sums[D];
}

#else
/* Portable versions. Log-weights of one row at chain weights w (D + 2) into L (K); returns their max. */
static inline __attribute__((always_inline)) float row_logits(int64_t K, int64_t D, const float *restrict lp,
                                                              const float *restrict codes, int64_t dim_stride,
                                                              const float *restrict w, float *restrict L) {
    float mx[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY;
    const float *norms = codes + D * dim_stride;
    for (int64_t i = 0; i < K; i += LANES) {
        float acc[LANES];
        for (int l = 0; l < LANES; l++) acc[l] = fmaf(w[1], norms[i + l], fmaf(w[0], lp[i + l], 0.0f));
        for (int64_t d = 0; d < D; d++) {
            const float *c = codes + d * dim_stride + i;
            const float a = w[2 + d];
            for (int l = 0; l < LANES; l++) acc[l] = fmaf(a, c[l], acc[l]);
        }
        for (int l = 0; l < LANES; l++) {
            L[i + l] = acc[l];
            mx[l] = acc[l] > mx[l] ? acc[l] : mx[l];
        }
    }
    float m = mx[0];
    for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    return m;
}

/* x̂0 of one row from its log-weights L (K) and their max m into x0 (D). acc: (D + 1) * LANES scratch. */
static inline __attribute__((always_inline)) void row_mean(int64_t K, int64_t D, const float *restrict codes,
                                                           int64_t dim_stride, const float *restrict L, float m,
                                                           float *restrict x0) {
    float acc[(D + 1) * LANES];
    for (int64_t j = 0; j < (D + 1) * LANES; j++) acc[j] = 0.0f;
    float *den = acc + D * LANES;
    for (int64_t i = 0; i < K; i += LANES) {
        /* a group of 16 whose largest log-weight is below m − 87 has e = 0 throughout: its fma's change nothing */
        float top = L[i];
        for (int l = 1; l < LANES; l++) top = L[i + l] > top ? L[i + l] : top;
        if (top - m < -87.0f) continue;
        float e[LANES];
        for (int l = 0; l < LANES; l++) e[l] = dd_exp(L[i + l] - m);
        for (int64_t d = 0; d < D; d++) {
            const float *c = codes + d * dim_stride + i;
            float *a = acc + d * LANES;
            for (int l = 0; l < LANES; l++) a[l] = fmaf(e[l], c[l], a[l]);
        }
        for (int l = 0; l < LANES; l++) den[l] = den[l] + e[l];
    }
    for (int64_t d = 0; d <= D; d++) {
        float s = acc[d * LANES];
        for (int l = 1; l < LANES; l++) s = s + acc[d * LANES + l];
        acc[d * LANES] = s;
    }
    for (int64_t d = 0; d < D; d++) x0[d] = acc[d * LANES] / den[0];
}

#endif

/* Every evaluation and step of one row; returns the canonical position of the final posterior's first argmax. */
static inline __attribute__((always_inline)) int64_t solve_row(int64_t K, int64_t D, const float *rl, const float *rc,
                                                               int64_t dim_stride, float *rh, float *rw, int64_t n_eval,
                                                               const int32_t *target, const int32_t *state,
                                                               const int32_t *slots, const float *coefs, float *L) {
    const int64_t W = D + 2;
    int64_t top = 0; /* a position of the last evaluation's largest log-weight (at first: of log p) */
    for (int64_t p = 1; p < K; p++) top = rl[p] > rl[top] ? p : top;
    for (int64_t e = 0; e < n_eval; e++) {
        float *x0 = rh + target[e] * W + 2;
        int done = 0;
#ifdef DD_FUSED
        /* one pass at a guessed max: the log-weight at top, unless another position's is larger after this step */
        float mh = fmaf(rw[1], rc[D * dim_stride + top], fmaf(rw[0], rl[top], 0.0f));
        for (int64_t d = 0; d < D; d++) mh = fmaf(rw[2 + d], rc[d * dim_stride + top], mh);
        done = row_fused(K, D, rl, rc, dim_stride, rw, mh, x0) == mh;
#endif
        if (!done) {
            float m = row_logits(K, D, rl, rc, dim_stride, rw, L);
            row_mean(K, D, rc, dim_stride, L, m, x0);
            for (top = 0; L[top] != m; top++) {}
        }
        const int32_t *s = slots + e * TERMS;
        const float *c = coefs + e * TERMS;
        for (int64_t j = 0; j < W; j++) {
            float a = 0.0f;
            for (int k = 0; k < TERMS; k++) a = fmaf(c[k], rh[s[k] * W + j], a);
            rw[j] = a;
        }
        memcpy(rh + state[e] * W + 2, rw + 2, sizeof(float) * (size_t)D);
    }
    float m = row_logits(K, D, rl, rc, dim_stride, rw, L);
    int64_t best = 0;
    while (L[best] != m) best++;
    return best;
}

/* Solve R rows from their full logits. log_p (R, V) row-max shifted (−inf = excluded, ≥ 1 finite per row); table
 * (D + 1, Kp): the codebook transposed, then its squared norms, zero past V (Kp = padded_length(V)); h (R, 8, D + 2)
 * solver slots and w (R, D + 2) first chain weights, updated in place; per evaluation e: target[e], state[e] slots
 * and the solver chain's slots[e * 6 + k] / coefs[e * 6 + k]. Each row's allowed codes in ascending id, padded to
 * its canonical length 64·2^k (the torch kernels' layout; a row holding every code reads the table in place).
 * out (R,): the token (code id) of each row. Returns 0, or 1 when scratch memory could not be allocated. */
int dd_flow_solve(int64_t R, int64_t V, int64_t D, const float *log_p, const float *table, int64_t Kp, float *h,
                  float *w, int64_t n_eval, const int32_t *target, const int32_t *state, const int32_t *slots,
                  const float *coefs, int64_t *out, int threads) {
    int failed = 0;
    const int64_t W = D + 2;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed) if (R > 1)
    for (int64_t r = 0; r < R; r++) {
        const float *row = log_p + r * V;
        int64_t n = 0;
        for (int64_t j = 0; j < V; j++) n += row[j] > -INFINITY;
        int64_t K = 64;
        while (K < n) K *= 2;
        const int all = n == V; /* every code: the shared table in place (K = Kp) */
        /* scratch: log-weights (K), log p (K), the row's code values ((D + 1) K, unless all), code ids (K int64) */
        size_t floats = (size_t)K * (all ? 2 : (size_t)(D + 5));
        float *L = (float *)malloc(sizeof(float) * floats);
        if (!L) {
            failed = 1;
            continue;
        }
        float *lpc = L + K;
        const float *rc = table;
        int64_t stride = Kp, *ids = NULL;
        if (all) {
            for (int64_t p = 0; p < K; p++) lpc[p] = p < V ? row[p] : -INFINITY;
        } else {
            float *cc = lpc + K;
            ids = (int64_t *)(cc + (D + 1) * K);
            int64_t q = 0;
            for (int64_t j = 0; j < V; j++)
                if (row[j] > -INFINITY) ids[q++] = j;
            for (int64_t p = 0; p < K; p++) lpc[p] = p < n ? row[ids[p]] : -INFINITY;
            for (int64_t d = 0; d <= D; d++) { /* one table row at a time: ascending reads */
                const float *src = table + d * Kp;
                float *dst = cc + d * K;
                for (int64_t p = 0; p < n; p++) dst[p] = src[ids[p]];
                for (int64_t p = n; p < K; p++) dst[p] = 0.0f;
            }
            rc = cc, stride = K;
        }
        const float *rl = lpc;
        float *rh = h + r * SLOTS * W, *rw = w + r * W;
        int64_t pos;
        if (D == 8) /* the common codebook widths get a copy with D a constant (accumulators in registers) */
            pos = solve_row(K, 8, rl, rc, stride, rh, rw, n_eval, target, state, slots, coefs, L);
        else if (D == 32)
            pos = solve_row(K, 32, rl, rc, stride, rh, rw, n_eval, target, state, slots, coefs, L);
        else
            pos = solve_row(K, D, rl, rc, stride, rh, rw, n_eval, target, state, slots, coefs, L);
        out[r] = all ? pos : ids[pos];
        free(L);
    }
    return failed;
}
