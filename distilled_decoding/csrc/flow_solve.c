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

/* Log-weights of one row at chain weights w (D + 2) into L (K); returns their max. */
static float row_logits(int64_t K, int64_t D, const float *lp, const float *codes, int64_t dim_stride,
                        const float *w, float *L) {
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
static void row_mean(int64_t K, int64_t D, const float *codes, int64_t dim_stride, const float *L, float m,
                     float *acc, float *x0) {
    memset(acc, 0, sizeof(float) * (size_t)(D + 1) * LANES);
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

/* Solve R rows. lp (R, K) canonical log p (−inf padding; K a multiple of 16); codes: value c_dp of row r at
 * codes[r * row_stride + d * dim_stride + p] for d < D, ‖c_p‖² at d = D; h (R, 8, D + 2) solver slots and
 * w (R, D + 2) first chain weights, updated in place; per evaluation e: target[e], state[e] slots and the
 * solver chain's slots[e * 6 + k] / coefs[e * 6 + k]. out (R,): the canonical position of the final posterior's
 * first argmax. Returns 0, or 1 when scratch memory could not be allocated. */
int dd_flow_solve(int64_t R, int64_t K, int64_t D, const float *lp, const float *codes, int64_t dim_stride,
                  int64_t row_stride, float *h, float *w, int64_t n_eval, const int32_t *target,
                  const int32_t *state, const int32_t *slots, const float *coefs, int64_t *out, int threads) {
    int failed = 0;
    const int64_t W = D + 2;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed) if (R > 1)
    for (int64_t r = 0; r < R; r++) {
        float *L = (float *)malloc(sizeof(float) * (size_t)(K + (D + 1) * LANES));
        if (!L) {
            failed = 1;
            continue;
        }
        float *acc = L + K;
        const float *rl = lp + r * K, *rc = codes + r * row_stride;
        float *rh = h + r * SLOTS * W, *rw = w + r * W;
        for (int64_t e = 0; e < n_eval; e++) {
            float m = row_logits(K, D, rl, rc, dim_stride, rw, L);
            row_mean(K, D, rc, dim_stride, L, m, acc, rh + target[e] * W + 2);
            const int32_t *s = slots + e * TERMS;
            const float *c = coefs + e * TERMS;
            for (int64_t j = 0; j < W; j++) {
                float a = 0.0f;
                for (int k = 0; k < TERMS; k++) a = fmaf(c[k], rh[s[k] * W + j], a);
                rw[j] = a;
            }
            memcpy(rh + state[e] * W + 2, rw + 2, sizeof(float) * (size_t)D);
        }
        row_logits(K, D, rl, rc, dim_stride, rw, L);
        int64_t best = 0;
        for (int64_t p = 1; p < K; p++)
            if (L[p] > L[best]) best = p;
        out[r] = best;
        free(L);
    }
    return failed;
}
