/* One Anderson step per sample on the CPU, fused: fpidsl.runtime.solvers.anderson's arithmetic in one pass per
 * history row instead of about 45 small tensor operations (each of which costs more in dispatch than its work at
 * the state sizes of a DEQ layer). Both loops over the history take four rows at a time, so that four streams come
 * from memory at once (where the map's work between two calls has pushed the ring out of the caches): 0.81-0.90x
 * of one row at a time at the conv states, alone (a /tmp A/B script of the two kernels in one process).
 *
 * For each sample b (row of the (B, D) state), with the ring slot s and k filled slots (after this write):
 *   dF[b, s] = f - f_prev,  dH[b, s] = plain - p_prev,
 *   Gram row and column s:  G[s, j] = G[j, s] = dF[b, s] . dF[b, j]   (stored in the state's type),
 *   rhs_j = dF[b, j] . f,   |f|^2,
 *   gamma = (G + reg I)^-1 rhs with reg = lam * mean(diag G) + tiny (Gaussian elimination, partial pivoting),
 *   the mix is kept when the solve had no zero pivot, gamma . (G gamma - 2 rhs) is finite and
 *   |f|^2 + gamma . (G gamma - 2 rhs) <= slack |f|^2; otherwise gamma = 0 (the plain step),
 *   out = plain - sum_j gamma_j dH[b, j].
 * The state-sized sums are accumulated in the state's type with the vector unit's partial sums (as a BLAS
 * product does), the small system in double. Every pointer is to a contiguous array of its shape: plain, f,
 * p_prev, f_prev and out (B, D); dH and dF (B, m, D); gram (B, m, m). The call does the samples b0 <= b < b1 (each
 * sample alone: a caller may split a batch). Returns the number of those samples that took the plain step, or -1
 * for arguments it cannot take.
 */
#include "native.h"

#define FPIDSL_MAX_M 64

FPIDSL_CLONES static int solve_small(int64_t k, double *A, double *x) {
    /* A (k x k, row-major) x = x in place; 0 on success, 1 on a zero pivot. */
    for (int64_t c = 0; c < k; ++c) {
        int64_t p = c;
        double best = fabs(A[c * k + c]);
        for (int64_t r = c + 1; r < k; ++r) {
            double v = fabs(A[r * k + c]);
            if (v > best) { best = v; p = r; }
        }
        if (!(best > 0.0)) return 1;
        if (p != c) {
            for (int64_t j = 0; j < k; ++j) { double t = A[c * k + j]; A[c * k + j] = A[p * k + j]; A[p * k + j] = t; }
            double t = x[c]; x[c] = x[p]; x[p] = t;
        }
        double inv = 1.0 / A[c * k + c];
        for (int64_t r = c + 1; r < k; ++r) {
            double l = A[r * k + c] * inv;
            if (l != 0.0) {
                for (int64_t j = c; j < k; ++j) A[r * k + j] -= l * A[c * k + j];
                x[r] -= l * x[c];
            }
        }
    }
    for (int64_t r = k - 1; r >= 0; --r) {
        double v = x[r];
        for (int64_t j = r + 1; j < k; ++j) v -= A[r * k + j] * x[j];
        x[r] = v / A[r * k + r];
    }
    return 0;
}

#define FPIDSL_ANDERSON_STEP(NAME, T)                                                                          \
FPIDSL_CLONES int64_t NAME(int64_t b0, int64_t b1, int64_t D, int64_t m, int64_t k, int64_t s, double lam,      \
                           double tiny, double slack, const T *plain, const T *f, const T *p_prev, const T *f_prev, \
                           T *dH, T *dF, T *gram, T *out) {                                                    \
    int64_t rejected = 0;                                                                                      \
    if (k < 1 || k > m || m > FPIDSL_MAX_M || s < 0 || s >= k) return -1;                                       \
    for (int64_t b = b0; b < b1; ++b) {                                                                        \
        const T *pl = plain + b * D, *fb = f + b * D, *pp = p_prev + b * D, *fp = f_prev + b * D;              \
        T *dHb = dH + b * m * D, *dFb = dF + b * m * D, *Gb = gram + b * m * m, *ob = out + b * D;             \
        T *dFs = dFb + s * D, *dHs = dHb + s * D;                                                              \
        T f2 = 0;                                                                                              \
        T gs[FPIDSL_MAX_M], r[FPIDSL_MAX_M];                                                                   \
        for (int64_t j = 0; j < k; ++j) { gs[j] = 0; r[j] = 0; }                                               \
        for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {      /* a block of each row stays in L1 */         \
            int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                              \
            const T *fbk = fb + d0;                                                                            \
            T *dFsk = dFs + d0;                                                                                \
            T *dHsk = dHs + d0;                                                                                \
            const T *plk = pl + d0, *ppk = pp + d0, *fpk = fp + d0;                                            \
            T f2k = 0;                                                                                         \
            _Pragma("omp simd reduction(+:f2k)")                                                               \
            for (int64_t d = 0; d < n; ++d) {                                                                  \
                dFsk[d] = fbk[d] - fpk[d];                                                                     \
                dHsk[d] = plk[d] - ppk[d];                                                                     \
                f2k += fbk[d] * fbk[d];                                                                        \
            }                                                                                                  \
            f2 += f2k;                                                                                         \
            int64_t j = 0;                                                                                     \
            for (; j + 3 < k; j += 4) {  /* four rows at a time: four streams from memory */                  \
                const T *F0 = dFb + j * D + d0, *F1 = F0 + D, *F2 = F1 + D, *F3 = F2 + D;                      \
                T g0 = 0, g1 = 0, g2 = 0, g3 = 0, r0 = 0, r1 = 0, r2 = 0, r3 = 0;                              \
                _Pragma("omp simd reduction(+:g0,g1,g2,g3,r0,r1,r2,r3)")                                       \
                for (int64_t d = 0; d < n; ++d) {                                                              \
                    g0 += dFsk[d] * F0[d]; g1 += dFsk[d] * F1[d]; g2 += dFsk[d] * F2[d]; g3 += dFsk[d] * F3[d]; \
                    r0 += F0[d] * fbk[d]; r1 += F1[d] * fbk[d]; r2 += F2[d] * fbk[d]; r3 += F3[d] * fbk[d];    \
                }                                                                                              \
                gs[j] += g0; gs[j + 1] += g1; gs[j + 2] += g2; gs[j + 3] += g3;                                \
                r[j] += r0; r[j + 1] += r1; r[j + 2] += r2; r[j + 3] += r3;                                    \
            }                                                                                                  \
            for (; j < k; ++j) {                                                                               \
                const T *dFj = dFb + j * D + d0;                                                               \
                T gsk = 0, rk = 0;                                                                             \
                _Pragma("omp simd reduction(+:gsk,rk)")                                                        \
                for (int64_t d = 0; d < n; ++d) {                                                              \
                    gsk += dFsk[d] * dFj[d];                                                                   \
                    rk += dFj[d] * fbk[d];                                                                     \
                }                                                                                              \
                gs[j] += gsk;                                                                                  \
                r[j] += rk;                                                                                    \
            }                                                                                                  \
        }                                                                                                      \
        double rhs[FPIDSL_MAX_M], gamma[FPIDSL_MAX_M];                                                         \
        double G[FPIDSL_MAX_M * FPIDSL_MAX_M], A[FPIDSL_MAX_M * FPIDSL_MAX_M];                                 \
        for (int64_t j = 0; j < k; ++j) {                                                                      \
            Gb[s * m + j] = gs[j];                                                                             \
            Gb[j * m + s] = gs[j];                                                                             \
            rhs[j] = (double)r[j];                                                                             \
        }                                                                                                      \
        double trace = 0.0;                                                                                    \
        for (int64_t i = 0; i < k; ++i) {                                                                      \
            for (int64_t j = 0; j < k; ++j) G[i * k + j] = (double)Gb[i * m + j];                              \
            trace += G[i * k + i];                                                                             \
        }                                                                                                      \
        double reg = lam * (trace / (double)k) + tiny;                                                         \
        for (int64_t i = 0; i < k * k; ++i) A[i] = G[i];                                                       \
        for (int64_t i = 0; i < k; ++i) { A[i * k + i] += reg; gamma[i] = rhs[i]; }                            \
        int good = solve_small(k, A, gamma) == 0;                                                              \
        if (good) {                                                                                            \
            double change = 0.0;                                                                               \
            for (int64_t i = 0; i < k; ++i) {                                                                  \
                double gi = -2.0 * rhs[i];                                                                     \
                for (int64_t j = 0; j < k; ++j) gi += G[i * k + j] * gamma[j];                                 \
                change += gamma[i] * gi;                                                                       \
            }                                                                                                  \
            good = isfinite(change) && f2 + change <= slack * f2;                                              \
        }                                                                                                      \
        if (!good) {                                                                                           \
            ++rejected;                                                                                        \
            for (int64_t d = 0; d < D; ++d) ob[d] = pl[d];                                                     \
            continue;                                                                                          \
        }                                                                                                      \
        for (int64_t d0 = 0; d0 < D; d0 += FPIDSL_BLOCK) {                                                              \
            int64_t n = FPIDSL_MIN(D - d0, FPIDSL_BLOCK);                                                                \
            T acc[FPIDSL_BLOCK];                                                                                   \
            for (int64_t d = 0; d < n; ++d) acc[d] = pl[d0 + d];                                               \
            int64_t j = 0;                                                                                     \
            for (; j + 3 < k; j += 4) {                                                                        \
                const T *h0 = dHb + j * D + d0, *h1 = h0 + D, *h2 = h1 + D, *h3 = h2 + D;                      \
                T c0 = (T)gamma[j], c1 = (T)gamma[j + 1], c2 = (T)gamma[j + 2], c3 = (T)gamma[j + 3];          \
                _Pragma("omp simd")                                                                            \
                for (int64_t d = 0; d < n; ++d) acc[d] -= c0 * h0[d] + c1 * h1[d] + c2 * h2[d] + c3 * h3[d];   \
            }                                                                                                  \
            for (; j < k; ++j) {                                                                               \
                const T *h = dHb + j * D + d0;                                                                 \
                T c = (T)gamma[j];                                                                             \
                _Pragma("omp simd")                                                                            \
                for (int64_t d = 0; d < n; ++d) acc[d] -= c * h[d];                                            \
            }                                                                                                  \
            for (int64_t d = 0; d < n; ++d) ob[d0 + d] = acc[d];                                               \
        }                                                                                                      \
    }                                                                                                          \
    return rejected;                                                                                           \
}

FPIDSL_ANDERSON_STEP(fpidsl_anderson_step_f32, float)
FPIDSL_ANDERSON_STEP(fpidsl_anderson_step_f64, double)

int64_t fpidsl_native_max_m(void) { return FPIDSL_MAX_M; }
