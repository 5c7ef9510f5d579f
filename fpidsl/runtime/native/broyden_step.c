/* One limited-memory Broyden step per sample on the CPU, fused: fpidsl.runtime.solvers.broyden's arithmetic in
 * two passes over the update buffers instead of about 54 small tensor operations.
 *
 * For each sample b (row of the (B, D) state) with H = -I + sum_{i<k} U_i V_i^T:
 *   when update is set: dx = x - x_prev, df = f - f_prev,
 *       v = H^T dx = -dx + sum_i (U_i . dx) V_i,   u = (dx - H df) / (v . df) = (dx + df - sum_i (V_i . df) U_i) / (v . df),
 *       written into slot k of U and V, or zeros there where u or v is not finite (H is kept); H gains the slot;
 *   out = x - H f = x + f - sum_i (V_i . f) U_i (the new slot included), or g where that is not finite.
 * Every pointer is to a contiguous array of its shape: x, g, f, x_prev, f_prev and out (B, D); U and V (B, m, D);
 * with update, k < m (the caller restarts a full memory first); the call does the samples b0 <= b < b1. Returns the
 * number of those samples whose update was not finite, or -1 for arguments it cannot take.
 */
#include <stdlib.h>

#include "native.h"

#define FPIDSL_BROYDEN_STEP(NAME, T)                                                                           \
FPIDSL_CLONES int64_t NAME(int64_t b0, int64_t b1, int64_t D, int64_t m, int64_t k, int64_t update, const T *x,  \
                           const T *g, const T *f, const T *x_prev, const T *f_prev, T *U, T *V, T *out) {     \
    if (k < 0 || k > m || (update && k >= m)) return -1;                                                       \
    double *coef = (double *)malloc(sizeof(double) * 3 * (size_t)(k > 0 ? k : 1));                            \
    if (coef == NULL) return -1;                                                                               \
    double *a = coef, *bd = coef + k, *c = coef + 2 * k; /* U_i . dx, V_i . df, V_i . f */                     \
    int64_t skipped = 0;                                                                                       \
    for (int64_t b = b0; b < b1; ++b) {                                                                        \
        const T *xb = x + b * D, *gb = g + b * D, *fb = f + b * D;                                             \
        T *Ub = U + b * m * D, *Vb = V + b * m * D, *ob = out + b * D;                                         \
        T *Us = Ub + k * D, *Vs = Vb + k * D;  /* the new slot: dx and df first, then u and v */              \
        for (int64_t i = 0; i < 3 * k; ++i) coef[i] = 0.0;                                                     \
        if (update) {                                                                                          \
            const T *xp = x_prev + b * D, *fp = f_prev + b * D;                                                \
            for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                 \
                int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                  \
                T *dx = Us + d0, *df = Vs + d0;                                                                \
                for (int64_t d = 0; d < n; ++d) {                                                              \
                    dx[d] = xb[d0 + d] - xp[d0 + d];                                                           \
                    df[d] = fb[d0 + d] - fp[d0 + d];                                                           \
                }                                                                                              \
                for (int64_t i = 0; i < k; ++i) {                                                              \
                    const T *Ui = Ub + i * D + d0, *Vi = Vb + i * D + d0, *fk = fb + d0;                       \
                    T sa = 0, sb = 0, sc = 0;                                                                  \
                    _Pragma("omp simd reduction(+:sa,sb,sc)")                                                  \
                    for (int64_t d = 0; d < n; ++d) {                                                          \
                        sa += Ui[d] * dx[d];                                                                   \
                        sb += Vi[d] * df[d];                                                                   \
                        sc += Vi[d] * fk[d];                                                                   \
                    }                                                                                          \
                    a[i] += sa; bd[i] += sb; c[i] += sc;                                                       \
                }                                                                                              \
            }                                                                                                  \
        } else {                                                                                               \
            for (int64_t i = 0; i < k; ++i) {                                                                  \
                const T *Vi = Vb + i * D;                                                                      \
                T sc = 0;                                                                                      \
                _Pragma("omp simd reduction(+:sc)")                                                            \
                for (int64_t d = 0; d < D; ++d) sc += Vi[d] * fb[d];                                           \
                c[i] = sc;                                                                                     \
            }                                                                                                  \
        }                                                                                                      \
        /* v, w = dx + df - sum (V_i . df) U_i (u = w / (v . df)) and the proposal without the new slot */   \
        T vdf = 0, vf = 0;                                                                                     \
        int finite = 1;                                                                                        \
        for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                     \
            int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                      \
            T vb[FPIDSL_BLOCK], wb[FPIDSL_BLOCK], pb[FPIDSL_BLOCK];                                            \
            const T *fk = fb + d0, *xk = xb + d0;                                                              \
            if (update) {                                                                                      \
                const T *dx = Us + d0, *df = Vs + d0;                                                          \
                for (int64_t d = 0; d < n; ++d) { vb[d] = -dx[d]; wb[d] = dx[d] + df[d]; pb[d] = xk[d] + fk[d]; } \
            } else {                                                                                           \
                for (int64_t d = 0; d < n; ++d) pb[d] = xk[d] + fk[d];                                         \
            }                                                                                                  \
            for (int64_t i = 0; i < k; ++i) {                                                                  \
                const T *Ui = Ub + i * D + d0, *Vi = Vb + i * D + d0;                                          \
                T ai = (T)a[i], bi = (T)bd[i], ci = (T)c[i];                                                   \
                if (update) {                                                                                  \
                    _Pragma("omp simd")                                                                        \
                    for (int64_t d = 0; d < n; ++d) {                                                          \
                        vb[d] += ai * Vi[d];                                                                   \
                        wb[d] -= bi * Ui[d];                                                                   \
                        pb[d] -= ci * Ui[d];                                                                   \
                    }                                                                                          \
                } else {                                                                                       \
                    _Pragma("omp simd")                                                                        \
                    for (int64_t d = 0; d < n; ++d) pb[d] -= ci * Ui[d];                                       \
                }                                                                                              \
            }                                                                                                  \
            if (update) {                                                                                      \
                const T *df = Vs + d0;                                                                         \
                T svdf = 0, svf = 0;                                                                           \
                _Pragma("omp simd reduction(+:svdf,svf)")                                                      \
                for (int64_t d = 0; d < n; ++d) { svdf += vb[d] * df[d]; svf += vb[d] * fk[d]; }              \
                vdf += svdf; vf += svf;                                                                        \
                for (int64_t d = 0; d < n; ++d) { Us[d0 + d] = wb[d]; Vs[d0 + d] = vb[d]; }                    \
            }                                                                                                  \
            for (int64_t d = 0; d < n; ++d) ob[d0 + d] = pb[d];                                                \
        }                                                                                                      \
        if (update) {                                                                                          \
            for (int64_t d = 0; d < D && finite; ++d) {                                                        \
                T u = Us[d] / vdf;                                                                             \
                finite = isfinite(u) && isfinite(Vs[d]);                                                       \
            }                                                                                                  \
            if (finite) {                                                                                      \
                _Pragma("omp simd")                                                                            \
                for (int64_t d = 0; d < D; ++d) { Us[d] = Us[d] / vdf; ob[d] -= vf * Us[d]; }                  \
            } else {                                                                                           \
                ++skipped;                                                                                     \
                for (int64_t d = 0; d < D; ++d) { Us[d] = 0; Vs[d] = 0; }                                      \
            }                                                                                                  \
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
