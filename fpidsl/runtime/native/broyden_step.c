/* One limited-memory Broyden step per sample on the CPU, fused: fpidsl.runtime.solvers.broyden's arithmetic in
 * two passes over the history (the steps S once, the updates U once, each four rows at a time: four streams from
 * memory, where the history is when the map's work between two calls has pushed it out of the caches) instead of
 * about 30 small tensor operations.
 *
 * For each sample b (row of the (B, D) state) with H = -I + sum_{i<k} u_i v_i^T, in compact form: the v_i are not
 * stored but v_i = sum_{j<=i} R_ij s_j over the stored steps s_j (R lower triangular, R_ii = -1), so
 * v_i . y = sum_j R_ij (s_j . y).
 * Every call is an update (a solve's first step, which has none, is the tensor code's x + f): with
 * dx = x - x_prev, df = f - f_prev,
 *   pass 1 (S):  s_j . df, s_j . f, dx . df, dx . f;  then v_i . df and v_i . f (k x k work);
 *   pass 2 (U):  w = dx + df - sum_i (v_i . df) u_i,  p = x + f - sum_i (v_i . f) u_i,  a_i = u_i . dx;
 *   v = H^T dx = -dx + sum_i a_i v_i has the row R_kj = sum_i a_i R_ij (j < k), R_kk = -1, so v . df and v . f are
 *   k-term sums; u = w / (v . df) goes into slot k of U, dx into slot k of S and the row (zeros above the
 *   diagonal) into row k of R, or zeros in all three where u or the row is not finite (H is kept); H gains the
 *   slot, and out = p - (v . f) u, or g where that is not finite.
 * Every pointer is to a contiguous array of its shape: x, g, f, x_prev, f_prev and out (B, D); U and S (B, m, D);
 * R (B, m, m), its rows below k written whole; k < m (the caller restarts a full memory first); the
 * call does the samples b0 <= b < b1. The state-sized sums are accumulated per block in the state's type, across
 * blocks and in the k x k work in double. Returns the number of those samples whose update was not finite, or -1
 * for arguments it cannot take.
 */
#include <stdlib.h>

#include "native.h"

#define FPIDSL_BROYDEN_STEP(NAME, T)                                                                           \
FPIDSL_CLONES int64_t NAME(int64_t b0, int64_t b1, int64_t D, int64_t m, int64_t k, const T *x, const T *g,     \
                           const T *f, const T *x_prev, const T *f_prev, T *U, T *S, T *R, T *out) {           \
    if (k < 0 || k >= m) return -1;                                                                            \
    double *coef = (double *)malloc(sizeof(double) * 6 * (size_t)(k > 0 ? k : 1));                            \
    if (coef == NULL) return -1;                                                                               \
    /* s_j . df, s_j . f, v_i . df, v_i . f, u_i . dx, and v's row of R */                                      \
    double *sdf = coef, *sf = coef + k, *bd = coef + 2 * k, *c = coef + 3 * k, *a = coef + 4 * k, *r = coef + 5 * k; \
    int64_t skipped = 0;                                                                                       \
    for (int64_t b = b0; b < b1; ++b) {                                                                        \
        const T *xb = x + b * D, *gb = g + b * D, *fb = f + b * D;                                             \
        T *Ub = U + b * m * D, *Sb = S + b * m * D, *Rb = R + b * m * m, *ob = out + b * D;                    \
        T *Us = Ub + k * D, *Ss = Sb + k * D;  /* the new slot: df (scratch) then u, and dx */                 \
        for (int64_t i = 0; i < 6 * k; ++i) coef[i] = 0.0;                                                     \
        double dxdf = 0.0, dxf = 0.0;                                                                          \
        /* pass 1: dx and df into the new slots, then the products with the steps, whole rows (the longest     \
         * streams from memory), four at a time */                                                            \
        for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                     \
            int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                      \
            const T *xp = x_prev + b * D + d0, *fp = f_prev + b * D + d0, *xk = xb + d0, *fk = fb + d0;       \
            T *dx = Ss + d0, *df = Us + d0;                                                                    \
            T s1 = 0, s2 = 0;                                                                                  \
            _Pragma("omp simd reduction(+:s1,s2)")                                                             \
            for (int64_t d = 0; d < n; ++d) {                                                                  \
                dx[d] = xk[d] - xp[d];                                                                         \
                df[d] = fk[d] - fp[d];                                                                         \
                s1 += dx[d] * df[d];                                                                           \
                s2 += dx[d] * fk[d];                                                                           \
            }                                                                                                  \
            dxdf += s1; dxf += s2;                                                                             \
        }                                                                                                      \
        const T *df = Us;                                                                                      \
        int64_t j = 0;                                                                                         \
        for (; j + 3 < k; j += 4) {                                                                            \
            const T *S0 = Sb + j * D, *S1 = S0 + D, *S2 = S1 + D, *S3 = S2 + D;                                \
            for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                 \
                int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                  \
                T e0 = 0, e1 = 0, e2 = 0, e3 = 0, h0 = 0, h1 = 0, h2 = 0, h3 = 0;                              \
                _Pragma("omp simd reduction(+:e0,e1,e2,e3,h0,h1,h2,h3)")                                       \
                for (int64_t d = d0; d < d0 + n; ++d) {                                                        \
                    e0 += S0[d] * df[d]; e1 += S1[d] * df[d]; e2 += S2[d] * df[d]; e3 += S3[d] * df[d];        \
                    h0 += S0[d] * fb[d]; h1 += S1[d] * fb[d]; h2 += S2[d] * fb[d]; h3 += S3[d] * fb[d];        \
                }                                                                                              \
                sdf[j] += e0; sdf[j + 1] += e1; sdf[j + 2] += e2; sdf[j + 3] += e3;                            \
                sf[j] += h0; sf[j + 1] += h1; sf[j + 2] += h2; sf[j + 3] += h3;                                \
            }                                                                                                  \
        }                                                                                                      \
        for (; j < k; ++j) {                                                                                   \
            const T *Sj = Sb + j * D;                                                                          \
            for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                 \
                int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                  \
                T s3 = 0, s4 = 0;                                                                              \
                _Pragma("omp simd reduction(+:s3,s4)")                                                         \
                for (int64_t d = d0; d < d0 + n; ++d) { s3 += Sj[d] * df[d]; s4 += Sj[d] * fb[d]; }            \
                sdf[j] += s3; sf[j] += s4;                                                                     \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t i = 0; i < k; ++i) {                                                                      \
            const T *Ri = Rb + i * m;                                                                          \
            double s5 = 0.0, s6 = 0.0;                                                                         \
            for (int64_t l = 0; l <= i; ++l) { s5 += (double)Ri[l] * sdf[l]; s6 += (double)Ri[l] * sf[l]; }   \
            bd[i] = s5; c[i] = s6;                                                                             \
        }                                                                                                      \
        /* pass 2: the updates, block by block (w, p, dx and df stay in L1), four rows at a time */          \
        for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                     \
            int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                      \
            T wb[FPIDSL_BLOCK], pb[FPIDSL_BLOCK];                                                              \
            const T *fk = fb + d0, *xk = xb + d0, *dx = Ss + d0, *dfk = Us + d0;                               \
            for (int64_t d = 0; d < n; ++d) { pb[d] = xk[d] + fk[d]; wb[d] = dx[d] + dfk[d]; }                 \
            int64_t i = 0;                                                                                     \
            for (; i + 3 < k; i += 4) {                                                                        \
                const T *U0 = Ub + i * D + d0, *U1 = U0 + D, *U2 = U1 + D, *U3 = U2 + D;                       \
                T bw0 = (T)bd[i], bw1 = (T)bd[i + 1], bw2 = (T)bd[i + 2], bw3 = (T)bd[i + 3];                  \
                T cp0 = (T)c[i], cp1 = (T)c[i + 1], cp2 = (T)c[i + 2], cp3 = (T)c[i + 3];                      \
                T ua0 = 0, ua1 = 0, ua2 = 0, ua3 = 0;                                                          \
                _Pragma("omp simd reduction(+:ua0,ua1,ua2,ua3)")                                               \
                for (int64_t d = 0; d < n; ++d) {                                                              \
                    wb[d] -= bw0 * U0[d] + bw1 * U1[d] + bw2 * U2[d] + bw3 * U3[d];                            \
                    pb[d] -= cp0 * U0[d] + cp1 * U1[d] + cp2 * U2[d] + cp3 * U3[d];                            \
                    ua0 += U0[d] * dx[d]; ua1 += U1[d] * dx[d]; ua2 += U2[d] * dx[d]; ua3 += U3[d] * dx[d];    \
                }                                                                                              \
                a[i] += ua0; a[i + 1] += ua1; a[i + 2] += ua2; a[i + 3] += ua3;                                \
            }                                                                                                  \
            for (; i < k; ++i) {                                                                               \
                const T *Ui = Ub + i * D + d0;                                                                 \
                T bi = (T)bd[i], ci = (T)c[i], sa = 0;                                                         \
                _Pragma("omp simd reduction(+:sa)")                                                            \
                for (int64_t d = 0; d < n; ++d) {                                                              \
                    wb[d] -= bi * Ui[d];                                                                       \
                    pb[d] -= ci * Ui[d];                                                                       \
                    sa += Ui[d] * dx[d];                                                                       \
                }                                                                                              \
                a[i] += sa;                                                                                    \
            }                                                                                                  \
            for (int64_t d = 0; d < n; ++d) { Us[d0 + d] = wb[d]; ob[d0 + d] = pb[d]; }                        \
        }                                                                                                      \
        int finite = 1;                                                                                        \
        double vdf = -dxdf, vf = -dxf;                                                                         \
        for (int64_t l = 0; l < k; ++l) {                                                                      \
            double rl = 0.0;                                                                                   \
            for (int64_t i = l; i < k; ++i) rl += a[i] * (double)Rb[i * m + l];                                \
            r[l] = (double)(T)rl;                                                                              \
            finite = finite && isfinite((T)rl);                                                                \
            vdf += r[l] * sdf[l]; vf += r[l] * sf[l];                                                          \
        }                                                                                                      \
        T vdf_t = (T)vdf, vf_t = (T)vf;                                                                        \
        for (int64_t d = 0; d < D && finite; ++d) finite = isfinite(Us[d] / vdf_t);                            \
        T *Rk = Rb + k * m;                                                                                    \
        if (finite) {                                                                                          \
            _Pragma("omp simd")                                                                                \
            for (int64_t d = 0; d < D; ++d) { Us[d] = Us[d] / vdf_t; ob[d] -= vf_t * Us[d]; }                  \
            for (int64_t l = 0; l < k; ++l) Rk[l] = (T)r[l];                                                   \
            Rk[k] = (T)-1;                                                                                     \
            for (int64_t l = k + 1; l < m; ++l) Rk[l] = 0;                                                     \
        } else {                                                                                               \
            ++skipped;                                                                                         \
            for (int64_t d = 0; d < D; ++d) { Us[d] = 0; Ss[d] = 0; }                                          \
            for (int64_t l = 0; l < m; ++l) Rk[l] = 0;                                                         \
        }                                                                                                      \
        int proposal_finite = 1;                                                                               \
        for (int64_t d = 0; d < D && proposal_finite; ++d) proposal_finite = isfinite(ob[d]);                  \
        if (!proposal_finite)                                                                                  \
            for (int64_t d = 0; d < D; ++d) ob[d] = gb[d];                                                     \
    }                                                                                                          \
    free(coef);                                                                                                \
    return skipped;                                                                                            \
}

FPIDSL_BROYDEN_STEP(fpidsl_broyden_step_f32, float)
FPIDSL_BROYDEN_STEP(fpidsl_broyden_step_f64, double)
