/* Fused CPU loops of the standardization loss (normlab.functional._KL), loaded with ctypes.
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
    /* The rows are scattered over a table of tens of MB, out of cache: ask for the next ones ahead. */
    const int64_t ahead = 8;
    for (int64_t i = 0; i < n && i < ahead; i++)
        for (int64_t j = 0; j < width; j += 8) __builtin_prefetch(table + idx[i] * width + j);
    for (int64_t i = 0; i < n; i++) {
        if (i + ahead < n)
            for (int64_t j = 0; j < width; j += 8) __builtin_prefetch(table + idx[i + ahead] * width + j);
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

/* A layer given by its batch moments (float32, from torch.batch_norm_update_stats). */
double nl_moments_kl(const float *mu, const float *var, int64_t C, double eps, double cw,
                     double *mean, double *veps, double *raw) {
    for (int64_t c = 0; c < C; c++) {
        mean[c] = mu[c];
        veps[c] = var[c];
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
 * nearly constant channel far from 0 (r_c large) loses no precision. Returns 0, or -1 (nothing
 * written) if there is no memory for 3 C floats. */
int nl_z_grad(const float *z, float *out, int64_t outer, int64_t C, int64_t inner, const double *mean,
              const double *veps, double s) {
    float *coef = malloc(3 * (size_t)C * sizeof(float));
    if (!coef) return -1;
    float *mu = coef, *a = coef + C, *b = coef + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        mu[c] = (float)mean[c];
        a[c] = (float)(s * (1.0 - 1.0 / veps[c]));
        b[c] = (float)(s * mean[c]);
    }
    for (int64_t o = 0; o < outer; o++) {
        if (inner == 1) {  /* channels last, or (N, C): one row of C values */
            const float *zo = z + o * C;
            float *oo = out + o * C;
            for (int64_t c = 0; c < C; c++) oo[c] = b[c] + a[c] * (zo[c] - mu[c]);
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            const float *zo = z + (o * C + c) * inner;
            float *oo = out + (o * C + c) * inner;
            for (int64_t i = 0; i < inner; i++) oo[i] = b[c] + a[c] * (zo[i] - mu[c]);
        }
    }
    free(coef);
    return 0;
}
