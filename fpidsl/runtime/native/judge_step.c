/* The iteration loop's judgement of every sample on the CPU, fused: fpidsl.runtime.driver's _judge, the residual
 * r = g(x) - x before it and the tracker's remember after it in one pass per sample, instead of about twenty small
 * tensor operations (each of which costs more in dispatch than its work at the state sizes of a DEQ layer).
 *
 * For each sample b (row of the (B, D) state), with iteration n and the flags below:
 *   r = g - x,  step = |r|,  norm = |x|  (the sums of squares in double, the norms rounded to the state's type),
 *   rel = step / norm, 0 where step is 0,  residual = rel (FPIDSL_JUDGE_RELATIVE) or step,
 *   better = residual < best_residual (the tracker's, before this iteration; false where residual is NaN),
 *   diverged = not (step < inf), and after the first iteration (FPIDSL_JUDGE_LATER) also where
 *   step > growth * best_step and rel > min_relative_step; then shrank = step < best_step (relative) or better,
 *   best_step = fmin(best_step, step), best_rel = fmin(best_rel, rel),
 *   with FPIDSL_JUDGE_TEST (n >= min_iter): converged = residual < tol, and with FPIDSL_JUDGE_FLOOR as well
 *   (n a multiple of the floor's patience): floor = best_rel >= checked_rel and rel <= floor_tol, then
 *   checked_rel = best_rel (converged and floor are 0 where not tested),
 *   done = converged or diverged or floor,
 *   where better and not frozen[b] (frozen: NULL, or a row held by a check interval): best_value[b] = g[b] and
 *   best_at[b] = n.
 * Every comparison is made in the state's type, as the tensor code's 0-dimensional constants of that type make
 * them. Every pointer is to a contiguous array of its shape: x, g, r and best_value (B, D); the rest (B); the flags
 * and outcomes are bytes of 0 or 1 (torch.bool), best_at int64. Returns the number of samples done.
 */
#include <string.h>

#include "native.h"

#define FPIDSL_JUDGE_RELATIVE 1
#define FPIDSL_JUDGE_LATER 2
#define FPIDSL_JUDGE_TEST 4
#define FPIDSL_JUDGE_FLOOR 8

#define FPIDSL_JUDGE(NAME, T)                                                                                   \
FPIDSL_CLONES int64_t NAME(int64_t B, int64_t D, int64_t flags, int64_t n, double tol_d, double growth_d,       \
                           double min_rel_d, double floor_d, const T *x, const T *g, T *r, T *step, T *norm,    \
                           T *rel, T *best_rel, T *best_step, T *checked_rel, T *best_value, int64_t *best_at, \
                           uint8_t *shrank, const uint8_t *frozen, uint8_t *better, uint8_t *diverged,          \
                           uint8_t *converged, uint8_t *floor, uint8_t *done) {                                 \
    const T tol = (T)tol_d, growth = (T)growth_d, min_rel = (T)min_rel_d, floor_tol = (T)floor_d;              \
    const int relative = (flags & FPIDSL_JUDGE_RELATIVE) != 0, later = (flags & FPIDSL_JUDGE_LATER) != 0;      \
    const int test = (flags & FPIDSL_JUDGE_TEST) != 0, floor_test = (flags & FPIDSL_JUDGE_FLOOR) != 0;         \
    int64_t count = 0;                                                                                          \
    for (int64_t b = 0; b < B; ++b) {                                                                           \
        const T *xb = x + b * D, *gb = g + b * D;                                                               \
        T *rb = r + b * D;                                                                                      \
        double ss = 0.0, xx = 0.0;                                                                              \
        _Pragma("omp simd reduction(+:ss,xx)")                                                                  \
        for (int64_t i = 0; i < D; ++i) {                                                                       \
            T d = gb[i] - xb[i];                                                                                \
            rb[i] = d;                                                                                          \
            ss += (double)d * (double)d;                                                                        \
            xx += (double)xb[i] * (double)xb[i];                                                                \
        }                                                                                                       \
        const T st = (T)sqrt(ss), nm = (T)sqrt(xx);                                                             \
        const T rl = st == (T)0 ? (T)0 : st / nm;                                                               \
        const T residual = relative ? rl : st;                                                                  \
        const int bt = residual < (relative ? best_rel[b] : best_step[b]);                                      \
        int dv = !(st < (T)INFINITY);                                                                           \
        if (later) {                                                                                            \
            dv |= (st > growth * best_step[b]) && (rl > min_rel);                                               \
            shrank[b] = (uint8_t)(relative ? st < best_step[b] : bt);                                           \
        }                                                                                                       \
        best_step[b] = fmin(best_step[b], st);                                                                  \
        best_rel[b] = fmin(best_rel[b], rl);                                                                    \
        int cv = 0, fl = 0;                                                                                     \
        if (test) {                                                                                             \
            cv = residual < tol;                                                                                \
            if (floor_test) {                                                                                   \
                fl = best_rel[b] >= checked_rel[b] && rl <= floor_tol;                                          \
                checked_rel[b] = best_rel[b];                                                                   \
            }                                                                                                   \
        }                                                                                                       \
        if (bt && !(frozen && frozen[b])) {                                                                     \
            memcpy(best_value + b * D, gb, (size_t)D * sizeof(T));                                              \
            best_at[b] = n;                                                                                     \
        }                                                                                                       \
        step[b] = st;                                                                                           \
        norm[b] = nm;                                                                                           \
        rel[b] = rl;                                                                                            \
        better[b] = (uint8_t)bt;                                                                                \
        diverged[b] = (uint8_t)dv;                                                                              \
        converged[b] = (uint8_t)cv;                                                                             \
        floor[b] = (uint8_t)fl;                                                                                 \
        done[b] = (uint8_t)(cv | dv | fl);                                                                      \
        count += cv | dv | fl;                                                                                  \
    }                                                                                                           \
    return count;                                                                                               \
}

FPIDSL_JUDGE(fpidsl_judge_step_f32, float)
FPIDSL_JUDGE(fpidsl_judge_step_f64, double)

/* The samples that the judgement found done leave the loop: fpidsl.runtime.driver's _Record.finish and _split in one
 * pass. For each running row b that is done (every row where done is NULL: the last iteration), with i = index[b],
 * its batch index, and the tests the iteration made (FPIDSL_JUDGE_TEST, FPIDSL_JUDGE_FLOOR):
 *   converged = converged[b] (0 where not tested), diverged = diverged[b] and not converged,
 *   floor = floor[b] and neither (0 where not tested),
 *   best = not (converged or floor) and best_residual[b] < residual[b]  (a failed sample's best iterate),
 *   the record at i: iterations n, the three outcomes, step, norm, shrank, best_iterate = best,
 *   best_at = best ? best_at[b] : n, residual, best_residual = best ? best_residual[b] : residual,
 *   out[i] = best_value[b] where best, else g[b] where it is all finite, else x[b].
 * The rows not done are written to keep, in order; returns their number. Pointers as in the judgement; the
 * record's arrays are (batch) and out (batch, D), rows of the whole batch. */
#define FPIDSL_FINISH(NAME, T)                                                                                  \
FPIDSL_CLONES int64_t NAME(int64_t B, int64_t D, int64_t flags, int64_t n, const uint8_t *done,                 \
                           const int64_t *index, const T *x, const T *g, const T *residual, const T *step,      \
                           const T *norm, const uint8_t *converged, const uint8_t *diverged,                    \
                           const uint8_t *floor, const uint8_t *shrank, const T *best_residual,                 \
                           const int64_t *best_at, const T *best_value, int64_t *r_iterations,                  \
                           uint8_t *r_converged, uint8_t *r_diverged, uint8_t *r_floor, T *r_step, T *r_norm,   \
                           uint8_t *r_shrank, uint8_t *r_best_iterate, int64_t *r_best_at, T *r_residual,       \
                           T *r_best_residual, T *out, int64_t *keep) {                                         \
    const int test = (flags & FPIDSL_JUDGE_TEST) != 0, floor_test = (flags & FPIDSL_JUDGE_FLOOR) != 0;         \
    int64_t kept = 0;                                                                                           \
    for (int64_t b = 0; b < B; ++b) {                                                                           \
        if (done && !done[b]) {                                                                                 \
            keep[kept++] = b;                                                                                   \
            continue;                                                                                           \
        }                                                                                                       \
        const int64_t i = index[b];                                                                             \
        const int cv = test && converged[b];                                                                    \
        const int dv = diverged[b] && !cv;                                                                      \
        const int fl = floor_test && floor[b] && !(cv || dv);                                                   \
        const int best = !(cv || fl) && best_residual[b] < residual[b];                                         \
        r_iterations[i] = n;                                                                                    \
        r_converged[i] = (uint8_t)cv;                                                                           \
        r_diverged[i] = (uint8_t)dv;                                                                            \
        r_floor[i] = (uint8_t)fl;                                                                               \
        r_step[i] = step[b];                                                                                    \
        r_norm[i] = norm[b];                                                                                    \
        r_shrank[i] = shrank[b];                                                                                \
        r_best_iterate[i] = (uint8_t)best;                                                                      \
        r_best_at[i] = best ? best_at[b] : n;                                                                   \
        r_residual[i] = residual[b];                                                                            \
        r_best_residual[i] = best ? best_residual[b] : residual[b];                                             \
        const T *from = best_value + b * D;                                                                     \
        if (!best) {                                                                                            \
            const T *gb = g + b * D;                                                                            \
            int finite = 1;                                                                                     \
            for (int64_t j = 0; j < D; ++j) finite &= isfinite(gb[j]) != 0;                                     \
            from = finite ? gb : x + b * D;                                                                     \
        }                                                                                                       \
        memcpy(out + i * D, from, (size_t)D * sizeof(T));                                                       \
    }                                                                                                           \
    return kept;                                                                                                \
}

FPIDSL_FINISH(fpidsl_finish_step_f32, float)
FPIDSL_FINISH(fpidsl_finish_step_f64, double)
