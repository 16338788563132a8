/* Fused pointwise kernels for the recurrent step loops (nmtkit/native.py builds and loads this
 * file; every function computes what the PyTorch expression named in its comment computes, and
 * tests/test_native.py checks it against that expression).
 *
 * Arrays are fp32 (or bf16 where a "_bf16" flag says so), row-major; an "ld" argument is the
 * distance in elements between the starts of two consecutive rows, so that a row slice of a larger
 * tensor needs no copy. Rows are split among the calling process's OpenMP threads (the same
 * libgomp pool torch uses) when there are enough elements for that to pay.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PARALLEL_MIN_ELEMENTS 16384

/* exp(x) for x clamped to [-80, 80], written out so that the loops below vectorize (libm's expf
 * is a call per element): x = k ln2 + r with k = round(x / ln2) and |r| <= ln2/2 (Cody-Waite, ln2
 * split in two parts), e^r by its Taylor series to r^7 (truncation < 1.2e-8 relative), 2^k from the
 * exponent bits. Within 1.3 ulp of exp over the whole range (tests/test_native.py). The clamp keeps
 * every result normal (no denormal slow paths): sigmoid and tanh below then differ from exact by
 * at most 2e-35 where it acts. A NaN gives a NaN. */
static inline float exp_clamped(float x) {
    float v = x < -80.0f ? -80.0f : x;
    v = v > 80.0f ? 80.0f : v;
    int32_t k = (int32_t)(v * 1.44269504088896341f + 200.5f) - 200; /* round(v / ln2): the sum is > 0 */
    float r = (v - (float)k * 0.693145751953125f) - (float)k * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    union { int32_t i; float f; } two_k = {.i = (k + 127) << 23};
    return p * two_k.f;
}
static inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
/* tanh(x) = 2σ(2x) − 1 (absolute error ≤ 2.4e-7, as nmtkit.kernels.tanh) */
static inline float tanh_by_sigmoid(float x) { return 2.0f / (1.0f + exp_clamped(-2.0f * x)) - 1.0f; }

/* bf16 <-> fp32. Widening is exact; narrowing rounds to nearest even and keeps NaN a (quiet)
 * NaN, as torch's float -> bfloat16 conversion does. */
static inline float from_bf16(uint16_t x) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)x << 16};
    return v.f;
}
static inline uint16_t to_bf16(float x) {
    union { float f; uint32_t u; } v = {.f = x};
    uint16_t rounded = (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
    return x != x ? (uint16_t)0x7fc0 : rounded;
}

/* s = a (+ e) over one row of m values; a and e are fp32 or bf16 (e may be NULL). */
static inline void widen_row(const void *a, int a_bf16, float *s, int64_t m) {
    if (a_bf16) {
        const uint16_t *x = a;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) s[j] = from_bf16(x[j]);
    } else {
        memcpy(s, a, m * sizeof(float));
    }
}
static inline void add_row(const void *e, int e_bf16, float *s, int64_t m) {
    if (e_bf16) {
        const uint16_t *x = e;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) s[j] += from_bf16(x[j]);
    } else {
        const float *x = e;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) s[j] += x[j];
    }
}
static inline void sum_row(const void *a, int a_bf16, const void *e, int e_bf16, float *s, int64_t m) {
    widen_row(a, a_bf16, s, m);
    if (e) add_row(e, e_bf16, s, m);
}
static inline void narrow_row(const float *s, uint16_t *out, int64_t m) {
#pragma omp simd
    for (int64_t j = 0; j < m; j++) out[j] = to_bf16(s[j]);
}
/* The address of row r of a row-major array of fp32 or bf16 elements with row stride ld. */
static inline const void *row_at(const void *base, int bf16, int64_t r, int64_t ld) {
    return bf16 ? (const void *)((const uint16_t *)base + r * ld) : (const void *)((const float *)base + r * ld);
}

/* LSTM cell, torch.nn.LSTMCell's pointwise part (Hochreiter & Schmidhuber 1997; gates i, f, g, o):
 *   a = gates + extra (extra optional, e.g. the step's precomputed input projection)
 *   c' = σ(a_f) ⊙ c + σ(a_i) ⊙ tanh(a_g),  h' = σ(a_o) ⊙ tanh(c')
 * gates and extra may be bf16 (the products' output under autocast), widened as they are read.
 * Writes h' and c' (n, H) and, for the backward, s = (σ(a_i), σ(a_f), tanh(a_g), σ(a_o)) (n, 4H). */
void nmt_lstm_forward(int64_t n, int64_t H, const void *gates, int64_t gates_ld, int gates_bf16,
                      const void *extra, int64_t extra_ld, int extra_bf16, const float *c, int64_t c_ld,
                      float *h_out, float *c_out, float *s_out, int threads) {
#pragma omp parallel for num_threads(threads) if (n * H >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *cr = c + r * c_ld;
        float *s = s_out + r * 4 * H, *hr = h_out + r * H, *cn = c_out + r * H;
        sum_row(row_at(gates, gates_bf16, r, gates_ld), gates_bf16,
                extra ? row_at(extra, extra_bf16, r, extra_ld) : 0, extra_bf16, s, 4 * H);
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            float i = sigmoidf(s[j]), f = sigmoidf(s[H + j]), g = tanh_by_sigmoid(s[2 * H + j]),
                  o = sigmoidf(s[3 * H + j]);
            float cc = f * cr[j] + i * g;
            cn[j] = cc;
            hr[j] = o * tanh_by_sigmoid(cc);
            s[j] = i, s[H + j] = f, s[2 * H + j] = g, s[3 * H + j] = o;
        }
    }
}

/* Its backward. With t = tanh(c') and dc̃ = dc' + dh' ⊙ σ(a_o) ⊙ (1 − t²):
 *   d a = (dc̃ ⊙ tanh(a_g) ⊙ σ'(a_i), dc̃ ⊙ c ⊙ σ'(a_f), dc̃ ⊙ σ(a_i) ⊙ (1 − tanh²(a_g)), dh' ⊙ t ⊙ σ'(a_o)),
 *   dc = dc̃ ⊙ σ(a_f),  σ' = σ (1 − σ).
 * d a is written as fp32, or rounded to bf16 (d_bf16: the gradient a bf16 product output gets).
 */
void nmt_lstm_backward(int64_t n, int64_t H, const float *dh, int64_t dh_ld, const float *dc,
                       int64_t dc_ld, const float *s_in, const float *c, int64_t c_ld,
                       const float *c_new, void *d_gates, int d_bf16, float *d_c, int threads) {
#pragma omp parallel num_threads(threads) if (n * H >= PARALLEL_MIN_ELEMENTS)
    {
    float *row = d_bf16 ? malloc(4 * H * sizeof(float)) : 0; /* fp32 d a of one row, then narrowed */
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *s = s_in + r * 4 * H, *cr = c + r * c_ld, *cn = c_new + r * H;
        const float *dhr = dh + r * dh_ld, *dcr = dc + r * dc_ld;
        float *d = d_bf16 ? row : (float *)d_gates + r * 4 * H, *dcp = d_c + r * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            float i = s[j], f = s[H + j], g = s[2 * H + j], o = s[3 * H + j];
            float t = tanh_by_sigmoid(cn[j]);
            float dhv = dhr[j];
            float dct = dcr[j] + dhv * o * (1.0f - t * t);
            d[j] = dct * g * i * (1.0f - i);
            d[H + j] = dct * cr[j] * f * (1.0f - f);
            d[2 * H + j] = dct * i * (1.0f - g * g);
            d[3 * H + j] = dhv * t * o * (1.0f - o);
            dcp[j] = dct * f;
        }
        if (d_bf16) narrow_row(row, (uint16_t *)d_gates + r * 4 * H, 4 * H);
    }
    free(row);
    }
}

/* GRU cell, torch.nn.GRUCell's pointwise part (Cho et al. 2014; gates r, z, n), given the input
 * projection x (n, 3H) (plus extra, optional) and the hidden projection hg = W_h h + b_h (n, 3H):
 *   a = x + extra;  r = σ(a_r + hg_r),  z = σ(a_z + hg_z),  ñ = tanh(a_n + r ⊙ hg_n),
 *   h' = (1 − z) ⊙ ñ + z ⊙ h.
 * Writes h' (n, H) and, for the backward, s = (r, z, ñ) (n, 3H). */
void nmt_gru_forward(int64_t n, int64_t H, const float *x, int64_t x_ld, const float *extra, int64_t extra_ld,
                     const float *hg, int64_t hg_ld, const float *h, int64_t h_ld, float *h_out, float *s_out,
                     int threads) {
#pragma omp parallel for num_threads(threads) if (n * H >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *hr = hg + r * hg_ld, *hp = h + r * h_ld;
        float *s = s_out + r * 3 * H, *ho = h_out + r * H;
        sum_row(x + r * x_ld, 0, extra ? extra + r * extra_ld : 0, 0, s, 3 * H);
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            float rg = sigmoidf(s[j] + hr[j]), z = sigmoidf(s[H + j] + hr[H + j]);
            float nn = tanh_by_sigmoid(s[2 * H + j] + rg * hr[2 * H + j]);
            ho[j] = (1.0f - z) * nn + z * hp[j];
            s[j] = rg, s[H + j] = z, s[2 * H + j] = nn;
        }
    }
}

/* Its backward. With dñ̃ = dh' ⊙ (1 − z) ⊙ (1 − ñ²) (the gradient at ñ's pre-activation):
 *   d a = d x = (dr̃, dz̃, dñ̃),  d hg = (dr̃, dz̃, dñ̃ ⊙ r),  dh = dh' ⊙ z,
 *   with dr̃ = dñ̃ ⊙ hg_n ⊙ r (1 − r) and dz̃ = dh' ⊙ (h − ñ) ⊙ z (1 − z). */
void nmt_gru_backward(int64_t n, int64_t H, const float *dh, int64_t dh_ld, const float *s_in, const float *hg,
                      int64_t hg_ld, const float *h, int64_t h_ld, float *d_x, float *d_hg, float *d_h,
                      int threads) {
#pragma omp parallel for num_threads(threads) if (n * H >= PARALLEL_MIN_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *s = s_in + r * 3 * H, *hr = hg + r * hg_ld, *hp = h + r * h_ld, *dhr = dh + r * dh_ld;
        float *dx = d_x + r * 3 * H, *dg = d_hg + r * 3 * H, *dhp = d_h + r * H;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) {
            float rg = s[j], z = s[H + j], nn = s[2 * H + j], g = dhr[j];
            float dn = g * (1.0f - z) * (1.0f - nn * nn);
            float dr = dn * hr[2 * H + j] * rg * (1.0f - rg);
            float dz = g * (hp[j] - nn) * z * (1.0f - z);
            dx[j] = dr, dx[H + j] = dz, dx[2 * H + j] = dn;
            dg[j] = dr, dg[H + j] = dz, dg[2 * H + j] = dn * rg;
            dhp[j] = g * z;
        }
    }
}

/* Softmax cross-entropy over the rows of a chunk of logits z (n, V) (fp32 or bf16, row stride
 * z_ld) with targets y (Luong eq. 6 / Bahdanau eq. 4 output layer; the loss of nmtkit.model's
 * _GeneratorNLL). Per row, with m = max_v z_v, S = Σ_v exp(z_v − m) and lse = m + log S:
 *   nll[r] = lse − z_y,   uni[r] = lse − mean_v z_v   (uni may be NULL: not wanted),
 *   p = exp(z − m) / S    written to p_out (fp32, may be z itself, or rounded to bf16; NULL: not wanted),
 *   p_sum[v] += Σ_r p_v   (fp32 p before any rounding; p_sum may be NULL).
 * One read of z and one write of p per row: the row's exp(z − m) stays in a cache-resident
 * buffer. Rows are split over the threads statically and the column sums added in thread order,
 * so the result depends on the thread count only, not on timing. */
void nmt_softmax_xent(int64_t n, int64_t V, const void *z, int64_t z_ld, int z_bf16, const int64_t *y,
                      float *nll, float *uni, void *p_out, int p_bf16, float *p_sum, int threads) {
    int nt = n * V >= PARALLEL_MIN_ELEMENTS ? threads : 1;
    float *partial = p_sum ? calloc((size_t)nt * V, sizeof(float)) : 0; /* (nt, V) column sums */
#pragma omp parallel num_threads(nt)
    {
    float *e = malloc(V * sizeof(float)); /* exp(z − m) of the row */
    float *col = partial ? partial + (int64_t)omp_get_thread_num() * V : 0;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const void *zr = row_at(z, z_bf16, r, z_ld);
        widen_row(zr, z_bf16, e, V);
        float m = -INFINITY, total = 0.0f, sum_z = 0.0f;
        int has_nan = 0;
#pragma omp simd reduction(max : m) reduction(+ : sum_z) reduction(| : has_nan)
        for (int64_t v = 0; v < V; v++) {
            m = e[v] > m ? e[v] : m;
            sum_z += e[v];
            has_nan |= e[v] != e[v];
        }
        if (has_nan) m = NAN;
        float z_y = e[y[r]];
#pragma omp simd reduction(+ : total)
        for (int64_t v = 0; v < V; v++) {
            e[v] = exp_clamped(e[v] - m);
            total += e[v];
        }
        float lse = m + logf(total);
        nll[r] = lse - z_y;
        if (uni) uni[r] = lse - sum_z / (float)V;
        if (p_out) {
            if (p_bf16) {
                uint16_t *p = (uint16_t *)p_out + r * V;
#pragma omp simd
                for (int64_t v = 0; v < V; v++) {
                    e[v] = e[v] / total;
                    p[v] = to_bf16(e[v]);
                }
            } else {
                float *p = (float *)p_out + r * V;
#pragma omp simd
                for (int64_t v = 0; v < V; v++) e[v] = p[v] = e[v] / total;
            }
            if (col) {
#pragma omp simd
                for (int64_t v = 0; v < V; v++) col[v] += e[v];
            }
        }
    }
    free(e);
    }
    if (partial) {
        for (int t = 0; t < nt; t++) {
            const float *col = partial + (int64_t)t * V;
#pragma omp simd
            for (int64_t v = 0; v < V; v++) p_sum[v] += col[v];
        }
        free(partial);
    }
}

/* acc += x over n rows of m values, acc fp32, x fp32 or bf16 (widened as read, exactly): torch's
 * acc.add_(x) without the fp32 copy of a bf16 x that it makes first. Rows split over the threads. */
void nmt_accumulate(int64_t n, int64_t m, float *acc, int64_t acc_ld, const void *x, int64_t x_ld, int x_bf16,
                    int threads) {
    int nt = n * m >= PARALLEL_MIN_ELEMENTS ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < n; r++) add_row(row_at(x, x_bf16, r, x_ld), x_bf16, acc + r * acc_ld, m);
}
