/* The row attention a_p = V_tᵀ softmax(K_t x_p) on the CPU, forward and backward, for
 * l3train.model.l3_cpu (see that module for the why and for how it is called).
 *
 * Work is organised by *group*: the positions of one token id, which all read the same
 * contiguous rows K[start:start+count] (and V's). Groups own disjoint rows, so OpenMP
 * runs groups in parallel with no atomics, and each group's arithmetic happens in one
 * fixed order whichever thread runs it: results are deterministic and independent of
 * the thread count. Nothing is padded: a group computes exactly count × positions scores.
 *
 * Inside a group, positions go TILE at a time: every row loaded from memory is used for
 * TILE positions (a register-blocked matrix product in all but name), which is what
 * turns the per-position matrix-vector products into cache-friendly work. Scores,
 * softmax, outputs and gradients are fp32 (the tables are fp32).
 *
 * Backward recomputes the scores (FlashAttention-style) from x and the saved log-sum-exp.
 * Each group accumulates its rows' gradients in place, either in a row-sparse gradient that
 * holds only the rows the batch's tokens own (the groups' rows one after the other), or in
 * the table-shaped gradient, where it also zeroes the rows between its token's rows and the
 * next group's (no token of the batch owns them). Either way every row of the gradient is
 * written exactly once per call: there is no separate zero-filled buffer and no scatter-add
 * pass.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 4
#define LANES 16

/* 16 floats: one AVX-512 register (two AVX2 ones where -march=native has no AVX-512).
 * Explicit vectors keep each tile's accumulators in registers across a whole loop over
 * rows, which the compiler does not do for loops over a runtime width. */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* The lane sums of a0..a3: in one vector's lanes 0, 4, 8 and 12 (a transpose-and-add tree,
 * 6 shuffles for 4 sums instead of 4 separate reductions). */
static inline void sum4(vec a0, vec a1, vec a2, vec a3, float *out) {
    vec x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec y = __builtin_shufflevector(x01, x23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(x01, x23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    y += __builtin_shufflevector(y, y, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    y += __builtin_shufflevector(y, y, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = y[0];
    out[1] = y[4];
    out[2] = y[8];
    out[3] = y[12];
}

/* The three products of the row attention, for a tile of `tile` (1..TILE) positions over a
 * group's `rows` rows of `width` features. Each is specialised per tile size (always_inline
 * with a constant `tile`), so no work is spent on absent positions. */

/* s[t * rows + r] = <table[r], v[t]>. */
static inline __attribute__((always_inline)) void dot_rows_n(const float *table, int64_t rows, int64_t width,
                                                            const float *const *v, const int tile, float *s) {
    int64_t body = width - width % LANES;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = table + r * width;
        vec acc[TILE] = {0};
        for (int64_t j = 0; j < body; j += LANES) {
            vec k = load(row + j);
            for (int t = 0; t < tile; t++) acc[t] += k * load(v[t] + j);
        }
        float sums[TILE];
        sum4(acc[0], acc[1], acc[2], acc[3], sums);
        for (int t = 0; t < tile; t++) {
            for (int64_t j = body; j < width; j++) sums[t] += row[j] * v[t][j];
            s[t * rows + r] = sums[t];
        }
    }
}

/* out[t] = Σ_r w[t * rows + r] · table[r]. */
static inline __attribute__((always_inline)) void weighted_rows_n(const float *table, int64_t rows, int64_t width,
                                                                 const float *w, const int tile, float *const *out) {
    int64_t body = width - width % LANES;
    for (int64_t j = 0; j < body; j += LANES) {
        vec acc[TILE] = {0};
        for (int64_t r = 0; r < rows; r++) {
            vec k = load(table + r * width + j);
            for (int t = 0; t < tile; t++) acc[t] += w[t * rows + r] * k;
        }
        for (int t = 0; t < tile; t++) store(out[t] + j, acc[t]);
    }
    for (int64_t j = body; j < width; j++) {
        for (int t = 0; t < tile; t++) {
            float acc = 0.f;
            for (int64_t r = 0; r < rows; r++) acc += w[t * rows + r] * table[r * width + j];
            out[t][j] = acc;
        }
    }
}

/* grad[r] += Σ_t w[t * rows + r] · v[t] (one read-modify-write of each row per tile). */
static inline __attribute__((always_inline)) void add_outer_n(float *grad, int64_t rows, int64_t width,
                                                             const float *w, const float *const *v, const int tile) {
    int64_t body = width - width % LANES;
    for (int64_t r = 0; r < rows; r++) {
        float *g = grad + r * width;
        for (int64_t j = 0; j < body; j += LANES) {
            vec acc = load(g + j);
            for (int t = 0; t < tile; t++) acc += w[t * rows + r] * load(v[t] + j);
            store(g + j, acc);
        }
        for (int64_t j = body; j < width; j++)
            for (int t = 0; t < tile; t++) g[j] += w[t * rows + r] * v[t][j];
    }
}

/* Tied tables (one table for keys and values): the two products over the same rows in one
 * pass, so each row is read (and each gradient row written) once instead of twice.
 * sa[t * rows + r] = <table[r], va[t]> and sb[t * rows + r] = <table[r], vb[t]>. */
static inline __attribute__((always_inline)) void dot_rows2_n(const float *table, int64_t rows, int64_t width,
                                                             const float *const *va, const float *const *vb,
                                                             const int tile, float *sa, float *sb) {
    int64_t body = width - width % LANES;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = table + r * width;
        vec acc_a[TILE] = {0}, acc_b[TILE] = {0};
        for (int64_t j = 0; j < body; j += LANES) {
            vec k = load(row + j);
            for (int t = 0; t < tile; t++) {
                acc_a[t] += k * load(va[t] + j);
                acc_b[t] += k * load(vb[t] + j);
            }
        }
        float sums_a[TILE], sums_b[TILE];
        sum4(acc_a[0], acc_a[1], acc_a[2], acc_a[3], sums_a);
        sum4(acc_b[0], acc_b[1], acc_b[2], acc_b[3], sums_b);
        for (int t = 0; t < tile; t++) {
            for (int64_t j = body; j < width; j++) {
                sums_a[t] += row[j] * va[t][j];
                sums_b[t] += row[j] * vb[t][j];
            }
            sa[t * rows + r] = sums_a[t];
            sb[t * rows + r] = sums_b[t];
        }
    }
}

/* grad[r] += Σ_t wa[t * rows + r] · va[t] + wb[t * rows + r] · vb[t]. */
static inline __attribute__((always_inline)) void add_outer2_n(float *grad, int64_t rows, int64_t width,
                                                              const float *wa, const float *const *va,
                                                              const float *wb, const float *const *vb,
                                                              const int tile) {
    int64_t body = width - width % LANES;
    for (int64_t r = 0; r < rows; r++) {
        float *g = grad + r * width;
        for (int64_t j = 0; j < body; j += LANES) {
            vec acc = load(g + j);
            for (int t = 0; t < tile; t++)
                acc += wa[t * rows + r] * load(va[t] + j) + wb[t * rows + r] * load(vb[t] + j);
            store(g + j, acc);
        }
        for (int64_t j = body; j < width; j++)
            for (int t = 0; t < tile; t++) g[j] += wa[t * rows + r] * va[t][j] + wb[t * rows + r] * vb[t][j];
    }
}

#define BY_TILE(call, tile)   \
    switch (tile) {           \
    case 1: call(1); break;   \
    case 2: call(2); break;   \
    case 3: call(3); break;   \
    default: call(TILE); break; \
    }

static void dot_rows(const float *table, int64_t rows, int64_t width, const float *const *v, int tile, float *s) {
#define DOT(n) dot_rows_n(table, rows, width, v, n, s)
    BY_TILE(DOT, tile)
#undef DOT
}

static void weighted_rows(const float *table, int64_t rows, int64_t width, const float *w, int tile,
                          float *const *out) {
#define WEIGHTED(n) weighted_rows_n(table, rows, width, w, n, out)
    BY_TILE(WEIGHTED, tile)
#undef WEIGHTED
}

static void add_outer(float *grad, int64_t rows, int64_t width, const float *w, const float *const *v, int tile) {
#define OUTER(n) add_outer_n(grad, rows, width, w, v, n)
    BY_TILE(OUTER, tile)
#undef OUTER
}

static void dot_rows2(const float *table, int64_t rows, int64_t width, const float *const *va,
                      const float *const *vb, int tile, float *sa, float *sb) {
#define DOT2(n) dot_rows2_n(table, rows, width, va, vb, n, sa, sb)
    BY_TILE(DOT2, tile)
#undef DOT2
}

static void add_outer2(float *grad, int64_t rows, int64_t width, const float *wa, const float *const *va,
                       const float *wb, const float *const *vb, int tile) {
#define OUTER2(n) add_outer2_n(grad, rows, width, wa, va, wb, vb, n)
    BY_TILE(OUTER2, tile)
#undef OUTER2
}

/* Max-subtracted softmax of each score row in place (into probabilities); the log-sum-exp
 * and the entropy H = lse - Σ p·s of each position. */
static void softmax_rows(float *s, int64_t rows, int tile, float *lse, float *entropy) {
    for (int t = 0; t < tile; t++) {
        float *row = s + t * rows;
        float max = -INFINITY;
        for (int64_t r = 0; r < rows; r++) max = row[r] > max ? row[r] : max;
        float sum = 0.f, weighted = 0.f;
        for (int64_t r = 0; r < rows; r++) {
            float e = expf(row[r] - max);
            weighted += e * row[r];
            row[r] = e;
            sum += e;
        }
        float inv = 1.f / sum;
        for (int64_t r = 0; r < rows; r++) row[r] *= inv;
        lse[t] = max + logf(sum);
        entropy[t] = lse[t] - weighted * inv;
    }
}

typedef struct {
    int64_t groups;
    const int64_t *position_start; /* (groups + 1,) offsets into `order` */
    const int64_t *order;          /* positions sorted by token id */
    const int64_t *row_start;      /* (groups,) first row of each group's token */
    const int64_t *row_count;      /* (groups,) its number of rows, >= 1 */
    const int64_t *schedule;       /* (groups,) the order groups are handed to threads (largest first) */
    int64_t max_rows;
    int64_t d_in, d_emb;
} Groups;

static int tile_of(const Groups *g, int64_t first, int64_t end, const float *base, int64_t width,
                   const float **vec) {
    int tile = (int)(end - first < TILE ? end - first : TILE);
    for (int t = 0; t < tile; t++) vec[t] = base + g->order[first + t] * width;
    return tile;
}

int l3_rows_forward(int64_t groups, const int64_t *position_start, const int64_t *order, const int64_t *row_start,
                    const int64_t *row_count, const int64_t *schedule, int64_t max_rows, const float *x, int64_t d_in,
                    const float *keys, const float *values, int64_t d_emb, float *out, float *log_norm,
                    float *entropy, int threads) {
    Groups g = {groups, position_start, order, row_start, row_count, schedule, max_rows, d_in, d_emb};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc((size_t)TILE * (size_t)g.max_rows * sizeof(float));
        if (s == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < g.groups; i++) {
            if (s == NULL) continue;
            int64_t group = g.schedule[i];
            int64_t rows = g.row_count[group];
            const float *k = keys + g.row_start[group] * g.d_in;
            const float *v = values + g.row_start[group] * g.d_emb;
            for (int64_t p = g.position_start[group]; p < g.position_start[group + 1]; p += TILE) {
                const float *xs[TILE];
                float *outs[TILE];
                float lse[TILE], ent[TILE];
                int tile = tile_of(&g, p, g.position_start[group + 1], x, g.d_in, xs);
                for (int t = 0; t < tile; t++) outs[t] = out + g.order[p + t] * g.d_emb;
                dot_rows(k, rows, g.d_in, xs, tile, s);
                softmax_rows(s, rows, tile, lse, ent);
                weighted_rows(v, rows, g.d_emb, s, tile, outs);
                for (int t = 0; t < tile; t++) {
                    log_norm[g.order[p + t]] = lse[t];
                    entropy[g.order[p + t]] = ent[t];
                }
            }
        }
        free(s);
    }
    return failed;
}

/* The rows no group owns from `first` up to the next group's first row (or the table's end). */
static void zero_gap(const Groups *g, int64_t next_group, int64_t first, int64_t table_rows, float *grad_keys,
                     float *grad_values, int tied) {
    int64_t end = next_group < g->groups ? g->row_start[next_group] : table_rows;
    if (end <= first) return;
    memset(grad_keys + first * g->d_in, 0, (size_t)((end - first) * g->d_in) * sizeof(float));
    if (!tied) memset(grad_values + first * g->d_emb, 0, (size_t)((end - first) * g->d_emb) * sizeof(float));
}

/* grad_keys / grad_values: the same buffer for tied tables (keys == values), where both
 * gradients add up. With `compact_start` NULL they are table-shaped (table_rows × width) and
 * written whole: groups must then be in token order (increasing row_start) for the gaps
 * between them to be found. Otherwise they hold only the groups' rows, group g's from row
 * compact_start[g] of the buffer on (the row-sparse gradient: nothing is written for the
 * rows no position of the batch owns). */
int l3_rows_backward(int64_t groups, const int64_t *position_start, const int64_t *order, const int64_t *row_start,
                     const int64_t *row_count, const int64_t *schedule, int64_t max_rows, const float *x, int64_t d_in,
                     const float *keys, const float *values, int64_t d_emb, const float *out, const float *log_norm,
                     const float *grad_out, int64_t table_rows, const int64_t *compact_start, float *grad_x,
                     float *grad_keys, float *grad_values, int threads) {
    Groups g = {groups, position_start, order, row_start, row_count, schedule, max_rows, d_in, d_emb};
    int tied = grad_keys == grad_values;
    int failed = 0;
    if (compact_start == NULL) /* the rows before the first group's */
        zero_gap(&g, 0, 0, table_rows, grad_keys, grad_values, tied);
#pragma omp parallel num_threads(threads)
    {
        float *probs = malloc((size_t)TILE * (size_t)g.max_rows * sizeof(float));
        float *grad_scores = malloc((size_t)TILE * (size_t)g.max_rows * sizeof(float));
        if (probs == NULL || grad_scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < g.groups; i++) {
            if (probs == NULL || grad_scores == NULL) continue;
            int64_t group = g.schedule[i];
            int64_t rows = g.row_count[group];
            const float *k = keys + g.row_start[group] * g.d_in;
            const float *v = values + g.row_start[group] * g.d_emb;
            int64_t first = compact_start == NULL ? g.row_start[group] : compact_start[group];
            float *gk = grad_keys + first * g.d_in;
            float *gv = grad_values + first * g.d_emb;
            memset(gk, 0, (size_t)(rows * g.d_in) * sizeof(float));
            if (!tied) memset(gv, 0, (size_t)(rows * g.d_emb) * sizeof(float));
            if (compact_start == NULL)
                zero_gap(&g, group + 1, g.row_start[group] + rows, table_rows, grad_keys, grad_values, tied);
            for (int64_t p = g.position_start[group]; p < g.position_start[group + 1]; p += TILE) {
                const float *xs[TILE], *douts[TILE];
                float *dxs[TILE];
                int tile = tile_of(&g, p, g.position_start[group + 1], x, g.d_in, xs);
                tile_of(&g, p, g.position_start[group + 1], grad_out, g.d_emb, douts);
                for (int t = 0; t < tile; t++) dxs[t] = grad_x + g.order[p + t] * g.d_in;
                /* P = exp(S - lse); dP = dA·Vᵀ; dS = P ⊙ (dP - dA·A) (softmax backward, Σ_r P·dP = dA·A). */
                if (tied) {
                    dot_rows2(k, rows, g.d_in, xs, douts, tile, probs, grad_scores);
                } else {
                    dot_rows(k, rows, g.d_in, xs, tile, probs);
                    dot_rows(v, rows, g.d_emb, douts, tile, grad_scores);
                }
                for (int t = 0; t < tile; t++) {
                    int64_t position = g.order[p + t];
                    const float *a = out + position * g.d_emb, *da = douts[t];
                    float row_dot = 0.f;
                    for (int64_t j = 0; j < g.d_emb; j++) row_dot += da[j] * a[j];
                    float lse = log_norm[position];
                    float *pt = probs + t * rows, *dst = grad_scores + t * rows;
                    for (int64_t r = 0; r < rows; r++) {
                        pt[r] = expf(pt[r] - lse);
                        dst[r] = pt[r] * (dst[r] - row_dot);
                    }
                }
                /* dX = dS·K; dK += dSᵀ·X; dV += Pᵀ·dA (into the same rows when tied). */
                weighted_rows(k, rows, g.d_in, grad_scores, tile, dxs);
                if (tied) {
                    add_outer2(gk, rows, g.d_in, grad_scores, xs, probs, douts, tile);
                } else {
                    add_outer(gk, rows, g.d_in, grad_scores, xs, tile);
                    add_outer(gv, rows, g.d_emb, probs, douts, tile);
                }
            }
        }
        free(probs);
        free(grad_scores);
    }
    return failed;
}
