/* rung's CPU matrix-vector kernels: y[m, :] = W x[m, :] for the few rows of a decode step.
 *
 * Why hand-written: a decode step is ~200 GEMVs whose weights stream from DRAM once per token.
 * MKL's sgemv runs at about half the machine's read bandwidth on AMD CPUs, and PyTorch has no
 * fused int4/int8 GEMV for float32 activations on AVX2. Each kernel here reads every weight byte
 * once per call (rows of x reuse a weight row from L1), parallel over output rows with the
 * OpenMP runtime torch already loaded (same libgomp: one thread pool, no oversubscription).
 *
 * Weight formats (row-major [N, K], groups of `group` values along K, group % 32 == 0):
 *   f32  float                                   w = v
 *   q8   int8, fp16 scale per group              w = scale * q           (q in -127..127)
 *   q4   4-bit, fp16 scale and offset per group  w = scale * q + offset  (q in 0..15)
 *        each run of 32 values is 16 bytes: byte j holds value j (low nibble) and j + 16
 *        (high nibble), which is GGUF's Q4_0 / Q4_1 block layout, so those map byte for byte.
 *        x is rounded to int8 in runs of 32 first (see dot_q4); f32 and q8 use x as it is.
 *
 * Epilogues, fused so a step makes fewer passes: `bias` [N] is added; `accumulate` adds into y
 * (a residual); `gated` (1 silu, 2 tanh-gelu) treats rows as blocks of 8 gate rows followed by
 * their 8 up rows and writes act(gate) * up, N / 2 outputs per x row.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 16 /* rows per work item: 8 gate + 8 up rows in gated mode */
/* Software prefetch distance in bytes of weights. The layers are small (0.2-2 MB) and read once
 * per token from DRAM; the hardware prefetcher does not run far enough ahead of a compute-heavy
 * loop, and prefetching 4 KB ahead more than doubles the int4 kernels' speed on an AMD EPYC
 * (a whole decode step of SmolLM2's int4 layers: 15 ms to 6.5 ms). A prefetch never faults. */
#define PREFETCH 4096
#define PF(p) _mm_prefetch((const char *)(p) + PREFETCH, _MM_HINT_T0)
#define MAX_M 16

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* ---- one weight row against M rows of x; out[m] = dot ------------------------------------ */

static void row_f32(const float *x, int64_t M, int64_t K, const float *w, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            if (m == 0) PF(w + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xm + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; k < K; k++) s += w[k] * xm[k];
        out[m] = s;
    }
}

/* One x row against one weight row. Two accumulators: enough independent FMAs to hide their
 * latency; the weights are the only data that streams from memory. */
static inline float dot_q8(const float *x, int64_t K, int64_t group, const int8_t *w, const uint16_t *scale) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, g++) {
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
        for (int64_t k = k0; k < k0 + group; k += 16) {
            if ((k & 63) == 0) PF(w + k);
            __m128i b = _mm_loadu_si128((const __m128i *)(w + k));
            p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_loadu_ps(x + k), p0);
            p1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b))),
                                 _mm256_loadu_ps(x + k + 8), p1);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(scale[g])), _mm256_add_ps(p0, p1), acc);
    }
    return hsum(acc);
}

/* q4 against x quantized to int8 in runs of 32 (xq, one float scale dx per run, as llama.cpp
 * does for its Q4 formats): maddubs multiplies 32 unsigned nibbles by 32 signed bytes in one
 * instruction, about three times the float path's speed, where the float path is compute-bound.
 * The offset term uses the sums of the rounded x per group (xsum). */
static inline float dot_q4(const int8_t *xq, const float *dx, const float *xsum, int64_t K, int64_t group,
                           const uint8_t *w, const uint16_t *scale, const uint16_t *offset) {
    const int64_t runs = K / 32, per_group = group / 32, groups = K / group;
    /* the scale of each run of 32: weight scale (per group) times x scale (per run) */
    float cs[runs + 8];
    if (per_group == 1) {
        int64_t r = 0;
        for (; r + 8 <= runs; r += 8)
            _mm256_storeu_ps(cs + r, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + r))),
                                                   _mm256_loadu_ps(dx + r)));
        for (; r < runs; r++) cs[r] = half_to_float(scale[r]) * dx[r];
    } else {
        for (int64_t g = 0, r = 0; g < groups; g++) {
            const float sc = half_to_float(scale[g]);
            for (int64_t j = 0; j < per_group; j++, r++) cs[r] = sc * dx[r];
        }
    }
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= runs; r += 2) { /* two runs: 32 bytes of nibbles */
        PF(w + r * 16);
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + r * 16));
        __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        __m256i q0 = _mm256_permute2x128_si256(lo, hi, 0x20), q1 = _mm256_permute2x128_si256(lo, hi, 0x31);
        __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)(xq + r * 32))), ones);
        __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(xq + r * 32 + 32))), ones);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + r), _mm256_cvtepi32_ps(s0), a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + r + 1), _mm256_cvtepi32_ps(s1), a1);
    }
    if (r < runs) {
        __m128i b = _mm_loadu_si128((const __m128i *)(w + r * 16));
        __m128i l = _mm_set1_epi8(0x0F);
        __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), l), _mm_and_si128(b, l));
        __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(xq + r * 32))), ones);
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + r), _mm256_cvtepi32_ps(s0), a0);
    }
    /* offset * sum(x) per group, eight groups at a time */
    __m256 o = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        o = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + g))), _mm256_loadu_ps(xsum + g), o);
    float off = hsum(o);
    for (; g < groups; g++) off += half_to_float(offset[g]) * xsum[g];
    return hsum(_mm256_add_ps(a0, a1)) + off;
}

/* x [M, K] → xq int8 [M, K], dx [M, K / 32] (round half to even, dx = max |x| / 127), and the
 * sums of the rounded x per group. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t group, int8_t *xq, float *dx, float *xsum) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t r = 0; r < K / 32; r++) {
            const float *v = x + m * K + r * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            dx[m * (K / 32) + r] = d;
            for (int j = 0; j < 32; j++) xq[m * K + r * 32 + j] = (int8_t)nearbyintf(v[j] * inv);
        }
        /* the sums of the rounded x, so the dot is exactly the one with x rounded (w . x^): the
         * offset term cancels most of the uncentred q . x term, and must cancel it exactly */
        for (int64_t g = 0; g < K / group; g++) {
            float s = 0.0f;
            for (int64_t r = g * (group / 32); r < (g + 1) * (group / 32); r++) {
                int32_t q = 0;
                for (int j = 0; j < 32; j++) q += xq[m * K + r * 32 + j];
                s += dx[m * (K / 32) + r] * (float)q;
            }
            xsum[m * (K / group) + g] = s;
        }
    }
}

static void row_q8(const float *x, int64_t M, int64_t K, int64_t group, const int8_t *w, const uint16_t *scale,
                   float *out) {
    for (int64_t m = 0; m < M; m++) out[m] = dot_q8(x + m * K, K, group, w, scale);
}

static void row_q4(const int8_t *xq, const float *dx, const float *xsum, int64_t M, int64_t K, int64_t group,
                   const uint8_t *w, const uint16_t *scale, const uint16_t *offset, float *out) {
    for (int64_t m = 0; m < M; m++)
        out[m] = dot_q4(xq + m * K, dx + m * (K / 32), xsum + m * (K / group), K, group, w, scale, offset);
}

/* ---- the driver: row blocks in parallel, then the epilogue -------------------------------- */

enum { F32 = 0, Q8 = 1, Q4 = 2 };

static inline float activate(float g, int gated) {
    if (gated == 1) return g / (1.0f + expf(-g));
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

static void gemv(int format, const float *x, int64_t M, int64_t N, int64_t K, int64_t group, const void *w,
                 const uint16_t *scale, const uint16_t *offset, const float *bias, float *y, int accumulate,
                 int gated, int threads) {
    const int64_t groups = format == F32 ? 0 : K / group;
    int8_t *xq = 0;
    float *dx = 0, *xsum = 0;
    if (format == Q4) {
        xq = malloc(M * K + 4 + 2 * sizeof(float) * M * (K / 32));
        dx = (float *)(xq + M * K + (-(M * K) & 3)), xsum = dx + M * (K / 32);
        quantize_rows(x, M, K, group, xq, dx, xsum);
    }
    const int64_t out_n = gated ? N / 2 : N;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int64_t rows = N - n0 < BLOCK ? N - n0 : BLOCK;
        float dots[BLOCK][MAX_M];
        for (int64_t r = 0; r < rows; r++) {
            const int64_t n = n0 + r;
            if (format == F32)
                row_f32(x, M, K, (const float *)w + n * K, dots[r]);
            else if (format == Q8)
                row_q8(x, M, K, group, (const int8_t *)w + n * K, scale + n * groups, dots[r]);
            else
                row_q4(xq, dx, xsum, M, K, group, (const uint8_t *)w + n * K / 2, scale + n * groups,
                       offset + n * groups, dots[r]);
            if (bias)
                for (int64_t m = 0; m < M; m++) dots[r][m] += bias[n];
        }
        for (int64_t m = 0; m < M; m++) {
            if (gated) {
                for (int64_t r = 0; r < rows / 2; r++) {
                    float v = activate(dots[r][m], gated) * dots[r + rows / 2][m];
                    float *o = y + m * out_n + n0 / 2 + r;
                    *o = accumulate ? *o + v : v;
                }
            } else {
                for (int64_t r = 0; r < rows; r++) {
                    float *o = y + m * out_n + n0 + r;
                    *o = accumulate ? *o + dots[r][m] : dots[r][m];
                }
            }
        }
    }
    free(xq);
}

/* ---- the exported entry points (called through ctypes; shapes checked in Python) ---------- */

int rung_max_m(void) { return MAX_M; }

void rung_gemv_f32(const float *x, int64_t M, int64_t N, int64_t K, const float *w, const float *bias, float *y,
                   int accumulate, int gated, int threads) {
    gemv(F32, x, M, N, K, K, w, 0, 0, bias, y, accumulate, gated, threads);
}

void rung_gemv_q8(const float *x, int64_t M, int64_t N, int64_t K, int64_t group, const int8_t *w,
                  const uint16_t *scale, const float *bias, float *y, int accumulate, int gated, int threads) {
    gemv(Q8, x, M, N, K, group, w, scale, 0, bias, y, accumulate, gated, threads);
}

void rung_gemv_q4(const float *x, int64_t M, int64_t N, int64_t K, int64_t group, const uint8_t *w,
                  const uint16_t *scale, const uint16_t *offset, const float *bias, float *y, int accumulate,
                  int gated, int threads) {
    gemv(Q4, x, M, N, K, group, w, scale, offset, bias, y, accumulate, gated, threads);
}

/* ---- decode attention over the paged KV pool ----------------------------------------------
 * One query per sequence b: q [B, hq, d]; keys and values in pools [slots, hkv, d]; idx [B, L]
 * lists each sequence's visible slots in position order (the window already applied), lengths[b]
 * how many of its L entries are real. Query head h reads kv head h / (hq / hkv). A sink (gpt-oss)
 * is one more logit per head in the softmax's denominator, then dropped. out [B, hq, d].
 * q, and the step's new keys/values (written to write_slots first, when given), are strided
 * views: element (token b, head h) at b * tok + h * head. Replaces index_put + gather + permute +
 * SDPA per layer: no copies of the keys, one call. */
static inline float dot_f32(const float *a, const float *b, int64_t d) {
    __m256 s = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s);
    float r = hsum(s);
    for (; k < d; k++) r += a[k] * b[k];
    return r;
}

void rung_decode_attention(const float *q, int64_t q_tok, int64_t q_head, float *kpool, float *vpool,
                           const float *knew, const float *vnew, int64_t new_tok, int64_t new_head,
                           const int64_t *write_slots, const int64_t *idx, const int64_t *lengths, int64_t B,
                           int64_t L, int64_t hq, int64_t hkv, int64_t d, float scale, const float *sinks, float *out,
                           int threads) {
    const int64_t group = hq / hkv;
    if (write_slots) /* this step's keys and values into their slots first (strided views, no copies) */
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < hkv; h++)
                for (int64_t k = 0; k < d; k++) {
                    kpool[(write_slots[b] * hkv + h) * d + k] = knew[b * new_tok + h * new_head + k];
                    vpool[(write_slots[b] * hkv + h) * d + k] = vnew[b * new_tok + h * new_head + k];
                }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t bh = 0; bh < B * hq; bh++) {
        const int64_t b = bh / hq, h = bh % hq, kvh = h / group, n = lengths[b];
        const float *qv = q + b * q_tok + h * q_head;
        const int64_t *slots = idx + b * L;
        float *scores = malloc(sizeof(float) * (n > 0 ? n : 1));
        float top = sinks ? sinks[h] : -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            scores[j] = scale * dot_f32(qv, kpool + (slots[j] * hkv + kvh) * d, d);
            top = scores[j] > top ? scores[j] : top;
        }
        float total = sinks ? expf(sinks[h] - top) : 0.0f;
        float *o = out + bh * d;
        for (int64_t k = 0; k < d; k++) o[k] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float p = expf(scores[j] - top);
            total += p;
            const float *vv = vpool + (slots[j] * hkv + kvh) * d;
            int64_t k = 0;
            __m256 pv = _mm256_set1_ps(p);
            for (; k + 8 <= d; k += 8)
                _mm256_storeu_ps(o + k, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vv + k), _mm256_loadu_ps(o + k)));
            for (; k < d; k++) o[k] += p * vv[k];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t k = 0; k < d; k++) o[k] *= inv;
        free(scores);
    }
}

/* ---- small per-token ops of a decode step, one call each instead of several torch ops ------- */

/* RMSNorm over rows: out = x / sqrt(mean(x^2) + eps) * (offset + w), in float32. */
void rung_rmsnorm(const float *x, const float *w, float *out, int64_t M, int64_t K, float eps, float offset) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = dot_f32(xm, xm, K);
        const float inv = 1.0f / sqrtf(s / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[m * K + k] = xm[k] * inv * (offset + w[k]);
    }
}

/* RoPE in place on the first `heads` heads of each row of x [M, row] (q heads then k heads of a
 * fused q|k|v row), with the model's tables cos, signed sin [M, d] (rotate_half layout: pairs
 * (j, j + d/2); signed sin = [-sin, sin]), the same arithmetic as rope.py's apply_rotary. */
void rung_rope(float *x, int64_t M, int64_t row, int64_t heads, int64_t d, const float *cos, const float *ssin) {
    const int64_t half = d / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + m * row + h * d;
            const float *c = cos + m * d, *s = ssin + m * d;
            for (int64_t j = 0; j < half; j++) {
                const float a = v[j], b = v[j + half];
                v[j] = a * c[j] + b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
}
