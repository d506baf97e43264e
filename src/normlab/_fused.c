/* Fused CPU loops of the standardization loss (normlab.functional._FusedKL and the per-example
 * table of StandardizationLoss.batch), loaded with ctypes.
 *
 * Collins, Balle & Shlens 2019 (arXiv 1903.00925): per channel c of a layer,
 *     kl_c = 0.5 * (mu_c^2 + var_c - log(var_c + eps) - 1).
 * The loss's own arithmetic is a few dozen operations on vectors of a few dozen channels; as torch
 * operations each costs a dispatch and, inside a training step, cold caches (about 10 us apiece on a
 * small CPU network, where the whole step takes 3 ms). Here each layer's share is one loop.
 * normlab.functional holds the same maths in torch operations (for every other device, dtype and
 * layout, and when this file was not compiled); the tests check one against the other.
 *
 * Plain C, no Python or torch headers: pointers come from Tensor.data_ptr(), every tensor is
 * contiguous, shapes are checked by the caller. Nothing here keeps state.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Patch moments of a batch from a per-example table (StandardizationLoss.batch): rows idx[0..n) of
 * table (rows x (k + k*k): D_i = mean patch of example i - center, then Q_i). With D = sum D_i and
 * Q = sum Q_i: mean = center + D / n, cov = Q / (n P) - D D^T / n^2. Returns 0, or -1 (nothing
 * written) if an index is outside [0, rows). */
int nl_table_moments(const double *table, int64_t rows, const int64_t *idx, int64_t n, int64_t k,
                     const double *center, double positions, double *mean, double *cov) {
    const int64_t width = k + k * k;
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= rows) return -1;
    for (int64_t j = 0; j < k; j++) mean[j] = 0.0;
    for (int64_t j = 0; j < k * k; j++) cov[j] = 0.0;
    /* The rows are scattered over a table of tens of MB, out of cache: ask for all of them first
     * (faster than a fixed distance ahead, or none, on the MNIST CNN's 128 rows of 90 doubles). */
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < width; j += 8) __builtin_prefetch(table + idx[i] * width + j);
    for (int64_t i = 0; i < n; i++) {
        const double *row = table + idx[i] * width;
        for (int64_t j = 0; j < k; j++) mean[j] += row[j];
        for (int64_t j = 0; j < k * k; j++) cov[j] += row[k + j];
    }
    const double nn = (double)n, scale = 1.0 / (nn * positions);
    for (int64_t a = 0; a < k; a++)
        for (int64_t b = 0; b < k; b++)
            cov[a * k + b] = cov[a * k + b] * scale - mean[a] * mean[b] / (nn * nn);
    for (int64_t j = 0; j < k; j++) mean[j] = center[j] + mean[j] / nn;
    return 0;
}

/* KL terms of channels with moments mu_c, var_c: stores mu_c, var_c + eps and
 * raw_c = mu_c^2 + var_c - log(var_c + eps) (= 2 kl_c + 1); returns cw * sum_c kl_c. */
static double kl_terms(int64_t C, double eps, double cw, double *mean, double *veps, double *raw) {
    double total = 0.0;
    for (int64_t c = 0; c < C; c++) {
        const double v = veps[c], ve = v + eps;
        raw[c] = mean[c] * mean[c] + v - log(ve);
        veps[c] = ve;
        total += 0.5 * (raw[c] - 1.0);
    }
    return cw * total;
}

/* A layer z, float32 laid out as (outer, C, inner) (inner = 1: channels last, or (N, C)): its
 * biased moments over the n = outer * inner values of each channel, then its KL terms. The sums run
 * over z - s_c, shifted by the channel's first value s_c (no cancellation for a channel whose mean
 * is far from 0 against its spread), in float32 over blocks of at most 64 rows (or 512 values) and
 * in float64 across blocks: mean_c = s_c + S1 / n, var_c = S2 / n - (S1 / n)^2. */
#define NL_BLOCK 64
/* Sums of d = row[l] - sh[l] and of d^2 over rows [r0, r1) of w (<= 8) channels of C per row. Inlined
 * into its callers, so that the call with w = 8 gets a loop of fixed length and its sums stay in
 * registers. */
static inline __attribute__((always_inline)) void block_sums(const float *z, int64_t C, int64_t r0, int64_t r1,
                                                             int64_t w, const float *sh, float *f1, float *f2) {
    for (int l = 0; l < 8; l++) f1[l] = f2[l] = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        const float *row = z + r * C;
        for (int64_t l = 0; l < w; l++) {
            const float d = row[l] - sh[l];
            f1[l] += d;
            f2[l] += d * d;
        }
    }
}

double nl_z_kl(const float *z, int64_t outer, int64_t C, int64_t inner, double eps, double cw,
               double *mean, double *veps, double *raw) {
    const double n = (double)(outer * inner);
    double *s1 = mean, *s2 = veps; /* the sums, in place of the moments until the end */
    for (int64_t c = 0; c < C; c++) s1[c] = s2[c] = 0.0;
    if (inner == 1) {
        /* rows of C values: 8 channels at a time */
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
            const int64_t w = C - c0 < 8 ? C - c0 : 8;
            float sh[8] = {0}, f1[8], f2[8];
            for (int64_t l = 0; l < w; l++) sh[l] = z[c0 + l];
            for (int64_t r0 = 0; r0 < outer; r0 += NL_BLOCK) {
                const int64_t r1 = r0 + NL_BLOCK < outer ? r0 + NL_BLOCK : outer;
                if (w == 8)
                    block_sums(z + c0, C, r0, r1, 8, sh, f1, f2);
                else
                    block_sums(z + c0, C, r0, r1, w, sh, f1, f2);
                for (int64_t l = 0; l < w; l++) {
                    s1[c0 + l] += f1[l];
                    s2[c0 + l] += f2[l];
                }
            }
            for (int64_t l = 0; l < w; l++) {
                const double d = s1[c0 + l] / n, v = s2[c0 + l] / n - d * d;
                mean[c0 + l] = sh[l] + d;
                veps[c0 + l] = v > 0.0 ? v : 0.0;
            }
        }
    } else {
        /* runs of inner values per (row, channel): 8 lanes per run */
        for (int64_t c = 0; c < C; c++) {
            const float sh = z[c * inner];
            for (int64_t o = 0; o < outer; o++) {
                const float *run = z + (o * C + c) * inner;
                for (int64_t i0 = 0; i0 < inner; i0 += 8 * NL_BLOCK) {
                    const int64_t i1 = i0 + 8 * NL_BLOCK < inner ? i0 + 8 * NL_BLOCK : inner;
                    float f1[8] = {0}, f2[8] = {0};
                    int64_t i = i0;
                    for (; i + 8 <= i1; i += 8)
                        for (int l = 0; l < 8; l++) {
                            const float d = run[i + l] - sh;
                            f1[l] += d;
                            f2[l] += d * d;
                        }
                    for (; i < i1; i++) {
                        const float d = run[i] - sh;
                        f1[0] += d;
                        f2[0] += d * d;
                    }
                    for (int l = 0; l < 8; l++) {
                        s1[c] += f1[l];
                        s2[c] += f2[l];
                    }
                }
            }
            const double d = s1[c] / n, v = s2[c] / n - d * d;
            mean[c] = sh + d;
            veps[c] = v > 0.0 ? v : 0.0;
        }
    }
    return kl_terms(C, eps, cw, mean, veps, raw);
}

/* A convolution given by its input patch moments m (K), cov (K x K) and its float32 weight w
 * (C x K) and bias (C, or NULL): mu_c = w_c . m + b_c, var_c = w_c^T cov w_c (clamped at 0), all in
 * float64; stores wcov = w cov (C x K) for the backward. */
double nl_patch_kl(const float *w, const float *bias, const double *m, const double *cov, int64_t C,
                   int64_t K, double eps, double cw, double *mean, double *veps, double *raw, double *wcov) {
    for (int64_t c = 0; c < C; c++) {
        const float *wc = w + c * K;
        double mu = bias ? (double)bias[c] : 0.0, var = 0.0;
        for (int64_t a = 0; a < K; a++) mu += (double)wc[a] * m[a];
        for (int64_t b = 0; b < K; b++) {
            double s = 0.0;
            for (int64_t a = 0; a < K; a++) s += (double)wc[a] * cov[a * K + b];
            wcov[c * K + b] = s;
            var += s * (double)wc[b];
        }
        mean[c] = mu;
        veps[c] = var > 0.0 ? var : 0.0;
    }
    return kl_terms(C, eps, cw, mean, veps, raw);
}

/* Gradient of g * cw * sum_c kl_c with respect to a patch layer's weight and bias:
 * d/dw_c = g cw (mu_c m + (1 - r_c) wcov_c), d/db_c = g cw mu_c, with r_c = 1 / (var_c + eps). */
void nl_patch_grad(double gcw, const double *mean, const double *veps, const double *wcov, const double *m,
                   int64_t C, int64_t K, float *dw, float *db) {
    for (int64_t c = 0; c < C; c++) {
        const double d = gcw * mean[c], slope = gcw * (1.0 - 1.0 / veps[c]);
        if (db) db[c] = (float)d;
        for (int64_t a = 0; a < K; a++) dw[c * K + a] = (float)(d * m[a] + slope * wcov[c * K + a]);
    }
}

/* Gradient with respect to z, float32 laid out as (outer, C, inner), of g * cw * sum_c kl_c:
 * d/dz = s (mu_c + (1 - r_c) (z - mu_c)) with s = g cw / (elements per channel), centred so that a
 * nearly constant channel far from 0 (r_c large) loses no precision: z - mu_c is taken as
 * (z - hi_c) - lo_c with mu_c = hi_c + lo_c split into two floats (the first difference is exact
 * near mu_c). With inner = 1 (channels last, or (N, C)) the per-channel coefficients are repeated
 * over a few rows, so that one long loop covers many rows at a time. Returns 0, or -1 (nothing
 * written) if there is no memory for the coefficients. */
int nl_z_grad(const float *restrict z, float *restrict out, int64_t outer, int64_t C, int64_t inner,
              const double *mean, const double *veps, double s) {
    int64_t reps = inner == 1 && C < 256 ? 256 / C : 1; /* rows per block */
    if (reps > outer) reps = outer > 0 ? outer : 1;
    const int64_t width = reps * C;
    float *coef = malloc(4 * (size_t)width * sizeof(float));
    if (!coef) return -1;
    float *restrict hi = coef, *restrict lo = coef + width, *restrict a = coef + 2 * width, *restrict b = coef + 3 * width;
    for (int64_t c = 0; c < C; c++) {
        hi[c] = (float)mean[c];
        lo[c] = (float)(mean[c] - (double)hi[c]);
        a[c] = (float)(s * (1.0 - 1.0 / veps[c]));
        b[c] = (float)(s * mean[c]);
    }
    if (inner == 1) {
        for (int64_t j = C; j < width; j++) {
            hi[j] = hi[j - C];
            lo[j] = lo[j - C];
            a[j] = a[j - C];
            b[j] = b[j - C];
        }
        const int64_t total = outer * C;
        for (int64_t start = 0; start < total; start += width) {
            const int64_t m = total - start < width ? total - start : width;
            const float *zo = z + start;
            float *oo = out + start;
            for (int64_t j = 0; j < m; j++) oo[j] = b[j] + a[j] * ((zo[j] - hi[j]) - lo[j]);
        }
    } else {
        for (int64_t o = 0; o < outer; o++)
            for (int64_t c = 0; c < C; c++) {
                const float *zo = z + (o * C + c) * inner;
                float *oo = out + (o * C + c) * inner;
                for (int64_t i = 0; i < inner; i++) oo[i] = b[c] + a[c] * ((zo[i] - hi[c]) - lo[c]);
            }
    }
    free(coef);
    return 0;
}
