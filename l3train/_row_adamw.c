/* One AdamW step over a whole table whose gradient is row-sparse, for l3train.row_adamw (see
 * that module for the why). Every element takes the arithmetic of torch's fused AdamW: the
 * rows listed in `grad_rows` with their gradient row, every other row with a zero gradient
 * (their moments decay and their weights still move, as in a dense step). No table-shaped
 * gradient is read or written.
 *
 * Rows are split into contiguous ranges, one OpenMP chunk each; a range finds its first
 * listed row by binary search in the increasing `grad_rows`. Each element's arithmetic is
 * independent of the others', so the result does not depend on the thread count.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* The first index i with rows[i] >= row (n when none). */
static int64_t lower_bound(const int64_t *rows, int64_t n, int64_t row) {
    int64_t low = 0, high = n;
    while (low < high) {
        int64_t mid = low + (high - low) / 2;
        if (rows[mid] < row) low = mid + 1;
        else high = mid;
    }
    return low;
}

typedef struct {
    float decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps;
} Coefficients;

/* One row's update; g NULL: a zero gradient. Two loops without a branch inside, so that each
 * vectorises (restrict: the four rows never overlap). */
static void update_row(float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                       int64_t width, const Coefficients *c) {
    if (g != NULL) {
        for (int64_t j = 0; j < width; j++) {
            float mj = m[j] + c->one_minus_beta1 * (g[j] - m[j]); /* lerp(m, g, 1 - beta1) */
            float vj = v[j] * c->beta2 + c->one_minus_beta2 * g[j] * g[j];
            m[j] = mj;
            v[j] = vj;
            p[j] = p[j] * c->decay - c->step_size * mj / (sqrtf(vj) / c->bias_correction2_sqrt + c->eps);
        }
    } else {
        for (int64_t j = 0; j < width; j++) {
            float mj = m[j] + c->one_minus_beta1 * (0.f - m[j]);
            float vj = v[j] * c->beta2;
            m[j] = mj;
            v[j] = vj;
            p[j] = p[j] * c->decay - c->step_size * mj / (sqrtf(vj) / c->bias_correction2_sqrt + c->eps);
        }
    }
}

/* param, exp_avg, exp_avg_sq: (table_rows × width), contiguous fp32. grad: (n_grad × width),
 * row i the gradient of table row grad_rows[i]. step: the step count after this step (>= 1). */
void row_adamw_step(int64_t table_rows, int64_t width, float *param, float *exp_avg, float *exp_avg_sq,
                    const int64_t *grad_rows, const float *grad, int64_t n_grad, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double step, int threads) {
    const Coefficients c = {(float)(1.0 - lr * weight_decay), (float)(1.0 - beta1), (float)beta2,
                            (float)(1.0 - beta2), (float)(lr / (1.0 - pow(beta1, step))),
                            (float)sqrt(1.0 - pow(beta2, step)), (float)eps};
    const int64_t chunk = 256; /* rows per range: enough to amortise the search, many ranges per thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < table_rows; first += chunk) {
        int64_t last = first + chunk < table_rows ? first + chunk : table_rows;
        int64_t next = lower_bound(grad_rows, n_grad, first);
        for (int64_t r = first; r < last; r++) {
            const float *g = NULL;
            if (next < n_grad && grad_rows[next] == r) g = grad + (next++) * width;
            update_row(param + r * width, exp_avg + r * width, exp_avg_sq + r * width, g, width, &c);
        }
    }
}
