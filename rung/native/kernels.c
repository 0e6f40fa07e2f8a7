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
 *   q8 and q4 round x to int8 in runs of 32 first (one float scale per run, as llama.cpp does
 *   for its Q8_0 and Q4 formats) and take integer dot products; f32 uses x as it is.
 *
 * Two instruction sets, chosen when the file is compiled (rung/native/__init__.py passes the
 * AVX-512 flags only where the CPU has them): AVX2 (maddubs: 32 byte products per instruction,
 * in pairs summed to int16) everywhere, and AVX-512 VNNI (dpbusd: 64 byte products summed
 * straight into int32) where present, which is what makes the 4- and 8-bit GEMVs bound by
 * memory rather than by arithmetic. Both give the same integer sums; only the float
 * accumulation order differs.
 *
 * Epilogues, fused so a step makes fewer passes: `bias` [N] is added; `accumulate` adds into y
 * (a residual); `gated` (1 silu, 2 tanh-gelu) treats rows as blocks of 8 gate rows followed by
 * their 8 up rows and writes act(gate) * up, N / 2 outputs per x row.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RUNG_VNNI 1
#else
#define RUNG_VNNI 0
#endif

#define BLOCK 16 /* rows per work item: 8 gate + 8 up rows in gated mode */
/* Software prefetch distance in bytes of weights. The layers are small (0.2-2 MB) and read once
 * per token from DRAM; the hardware prefetcher does not run far enough ahead of a compute-heavy
 * loop, and prefetching 4 KB ahead more than doubles the int4 kernels' speed on an AMD EPYC
 * (a whole decode step of SmolLM2's int4 layers: 15 ms to 6.5 ms). A prefetch never faults. */
#define PREFETCH 4096
#define PF(p) _mm_prefetch((const char *)(p) + PREFETCH, _MM_HINT_T0)
#define MAX_M 16
/* The multi-row kernels (dots_*) take up to MR rows of x per weight row: each chunk of weights is
 * loaded and unpacked once for all of them, and each row still gets exactly the single-row
 * kernel's result (the same accumulators, the same operations in the same order, the same final
 * reduce: a row's output cannot depend on what comes with it). Their bodies are inlined with a
 * constant row count and the per-row loops fully unrolled, so the accumulators stay in registers. */
#define MR 4
#define X_IN_L1 16384 /* rows x width of x (int8) that gemv_rows keeps in L1 beside a block of weights */
#define MULTI static inline __attribute__((always_inline))

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

/* cs[r] = (weight scale of run r's group) * dx[r]: the float factor of run r's integer dot product. */
static inline void run_scales(const float *dx, int64_t runs, int64_t per_group, const uint16_t *scale, float *cs) {
    if (per_group == 1) {
        int64_t r = 0;
        for (; r + 8 <= runs; r += 8)
            _mm256_storeu_ps(cs + r, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + r))),
                                                   _mm256_loadu_ps(dx + r)));
        for (; r < runs; r++) cs[r] = half_to_float(scale[r]) * dx[r];
        return;
    }
    for (int64_t g = 0, r = 0; r < runs; g++) {
        const __m256 sc = _mm256_set1_ps(half_to_float(scale[g]));
        int64_t j = 0;
        for (; j + 8 <= per_group; j += 8, r += 8) _mm256_storeu_ps(cs + r, _mm256_mul_ps(sc, _mm256_loadu_ps(dx + r)));
        for (; j < per_group; j++, r++) cs[r] = _mm256_cvtss_f32(sc) * dx[r];
    }
}

/* q8 against x rounded to int8 (xq, natural order). Signed times signed: the instructions take
 * unsigned times signed bytes, so |w| times x with w's sign moved onto x (exact: |q| <= 127).
 * The float factor of run r is cs[r] (see run_scales) or, when cs is NULL (groups of 32: GGUF's
 * Q8_0), scale[r] * dx[r] computed in the loop, which saves a pass per row over the run scales. */
static inline float dot_q8(const int8_t *xq, const float *cs, const float *dx, const uint16_t *scale, int64_t runs,
                           const int8_t *w) {
    float total = 0.0f;
    int64_t r = 0;
#if RUNG_VNNI
    /* two runs (64 bytes) an instruction; int32 lanes 0-7 belong to run r, 8-15 to run r + 1 */
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i pair2 = _mm512_add_epi32(pair, _mm512_set1_epi32(2));
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; r + 4 <= runs; r += 4) {
        PF(w + r * 32);
        PF(w + r * 32 + 64);
        __m512i b0 = _mm512_loadu_si512(w + r * 32), b1 = _mm512_loadu_si512(w + r * 32 + 64);
        __m512i x0 = _mm512_loadu_si512(xq + r * 32), x1 = _mm512_loadu_si512(xq + r * 32 + 64);
        x0 = _mm512_mask_sub_epi8(x0, _mm512_movepi8_mask(b0), _mm512_setzero_si512(), x0);
        x1 = _mm512_mask_sub_epi8(x1, _mm512_movepi8_mask(b1), _mm512_setzero_si512(), x1);
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(b0), x0);
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(b1), x1);
        __m128 c4 = cs ? _mm_loadu_ps(cs + r)
                       : _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + r))), _mm_loadu_ps(dx + r));
        __m512 c = _mm512_castps128_ps512(c4);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair, c), _mm512_cvtepi32_ps(s0), a0);
        a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair2, c), _mm512_cvtepi32_ps(s1), a1);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (; r < runs; r++) { /* one run of 32 (AVX2: pairs of products to int16, then to int32) */
        if ((r & 1) == 0) PF(w + r * 32);
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + r * 32));
        __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + r * 32)), b);
        __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(b), x), ones);
        const float c = cs ? cs[r] : half_to_float(scale[r]) * dx[r];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(c), _mm256_cvtepi32_ps(s), acc);
    }
    return total + hsum(acc);
}

/* dot_q8 for R rows of x (xq + i * K; dx + i * runs or cs + i * cstride): the weights' loads,
 * absolute values and sign masks are shared. */
MULTI void dots_q8_body(const int8_t *xq, int64_t K, const float *cs, int64_t cstride, const float *dx,
                        const uint16_t *scale, int64_t runs, int R, const int8_t *w, float *out) {
    float total[MR];
    int64_t r = 0;
#if RUNG_VNNI
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i pair2 = _mm512_add_epi32(pair, _mm512_set1_epi32(2));
    __m512 a0[MR], a1[MR];
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) a0[i] = a1[i] = _mm512_setzero_ps();
    for (; r + 4 <= runs; r += 4) {
        PF(w + r * 32);
        PF(w + r * 32 + 64);
        const __m512i b0 = _mm512_loadu_si512(w + r * 32), b1 = _mm512_loadu_si512(w + r * 32 + 64);
        const __mmask64 n0 = _mm512_movepi8_mask(b0), n1 = _mm512_movepi8_mask(b1);
        const __m512i u0 = _mm512_abs_epi8(b0), u1 = _mm512_abs_epi8(b1);
        const __m128 sc = cs ? _mm_setzero_ps() : _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + r)));
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const int8_t *x = xq + i * K + r * 32;
            __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);
            x0 = _mm512_mask_sub_epi8(x0, n0, _mm512_setzero_si512(), x0);
            x1 = _mm512_mask_sub_epi8(x1, n1, _mm512_setzero_si512(), x1);
            const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, x0);
            const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, x1);
            const __m128 c4 = cs ? _mm_loadu_ps(cs + i * cstride + r) : _mm_mul_ps(sc, _mm_loadu_ps(dx + i * runs + r));
            const __m512 c = _mm512_castps128_ps512(c4);
            a0[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair, c), _mm512_cvtepi32_ps(s0), a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair2, c), _mm512_cvtepi32_ps(s1), a1[i]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) total[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
#else
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) total[i] = 0.0f;
#endif
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MR];
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
    for (; r < runs; r++) {
        if ((r & 1) == 0) PF(w + r * 32);
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + r * 32)), u = _mm256_abs_epi8(b);
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + i * K + r * 32)), b);
            const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
            const float c = cs ? cs[i * cstride + r] : half_to_float(scale[r]) * dx[i * runs + r];
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(c), _mm256_cvtepi32_ps(s), acc[i]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) out[i] = total[i] + hsum(acc[i]);
}

static void dots_q8(const int8_t *xq, int64_t K, const float *cs, int64_t cstride, const float *dx,
                    const uint16_t *scale, int64_t runs, int R, const int8_t *w, float *out) {
    if (R == 4) dots_q8_body(xq, K, cs, cstride, dx, scale, runs, 4, w, out);
    else if (R == 3) dots_q8_body(xq, K, cs, cstride, dx, scale, runs, 3, w, out);
    else dots_q8_body(xq, K, cs, cstride, dx, scale, runs, 2, w, out);
}

/* q4 against x rounded to int8 in runs of 32: unsigned nibbles times signed bytes. The offset
 * term is offset * sum(rounded x) per group (xsum), so the result is exactly w . x^ with x^ the
 * rounded x: the offset cancels most of the uncentred q . x term, and must cancel it exactly. */
static inline float offset_term(const float *xsum, int64_t groups, const uint16_t *offset) {
    __m256 o = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        o = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + g))), _mm256_loadu_ps(xsum + g), o);
    float off = hsum(o);
    for (; g < groups; g++) off += half_to_float(offset[g]) * xsum[g];
    return off;
}

#if RUNG_VNNI
/* The nibbles of a chunk of 4 runs (64 bytes) split into their low halves (values 0-15 of each
 * run, one run per 128-bit lane) and high halves (values 16-31) without any shuffle of the
 * weights: x is stored pre-shuffled to match (xp, see interleave_runs: every chunk 128 bytes, the
 * last one padded with zeros), so two dpbusd give run i's sum in int32 lanes 4i..4i+3. `t` < 4
 * runs of a last chunk are read through a mask (the lanes of the missing runs are zero). */
static inline __m512i q4_chunk(const uint8_t *w, const int8_t *xp, int64_t t) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i b = t >= 4 ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8(((__mmask64)1 << (16 * t)) - 1, w);
    const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), _mm512_loadu_si512(xp));
    return _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(b, 4), low), _mm512_loadu_si512(xp + 64));
}

/* q4, any group: cs[r] is run r's float factor (run_scales); the offset term comes separately. */
static inline float dot_q4(const int8_t *xp, const float *cs, int64_t runs, const uint8_t *w) {
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < runs; r += 4) {
        PF(w + r * 16);
        const int64_t t = runs - r;
        const __m128 c = t >= 4 ? _mm_loadu_ps(cs + r) : _mm_maskz_loadu_ps((__mmask8)((1 << t) - 1), cs + r);
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(quad, _mm512_castps128_ps512(c)),
                              _mm512_cvtepi32_ps(q4_chunk(w + r * 16, xp + r * 32, t)), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* q4 in groups of 32 (GGUF's Q4_0 / Q4_1 blocks, rung's default int4): the whole row in one
 * pass, with the run scales (scale[r] * dx[r], dx pre-broadcast per chunk in xd) and the offset
 * term (offset[r] * xsum[r]) folded into the loop, two chunks an iteration. The per-row passes
 * of the general path cost as much as the dot product itself on short rows (K = 576). */
static inline float dot_q4g32(const int8_t *xp, const float *xd, const float *xsum, int64_t runs, const uint8_t *w,
                              const uint16_t *scale, const uint16_t *offset) {
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i quad2 = _mm512_add_epi32(quad, _mm512_set1_epi32(4));
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m256 o = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 8 <= runs; r += 8) {
        PF(w + r * 16);
        PF(w + r * 16 + 64);
        const __m512i s0 = q4_chunk(w + r * 16, xp + r * 32, 4), s1 = q4_chunk(w + r * 16 + 64, xp + r * 32 + 128, 4);
        const __m512 sc = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + r))));
        a0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_permutexvar_ps(quad, sc), _mm512_loadu_ps(xd + r * 4)),
                             _mm512_cvtepi32_ps(s0), a0);
        a1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_permutexvar_ps(quad2, sc), _mm512_loadu_ps(xd + r * 4 + 16)),
                             _mm512_cvtepi32_ps(s1), a1);
        o = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + r))), _mm256_loadu_ps(xsum + r), o);
    }
    for (; r < runs; r += 4) { /* the last 1-7 runs, a chunk at a time */
        PF(w + r * 16);
        const int64_t t = runs - r;
        const __mmask8 m = t >= 4 ? 0x0F : (__mmask8)((1 << t) - 1);
        const __m512 sc = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(m, scale + r)));
        a0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_permutexvar_ps(quad, sc), _mm512_loadu_ps(xd + r * 4)),
                             _mm512_cvtepi32_ps(q4_chunk(w + r * 16, xp + r * 32, t)), a0);
        o = _mm256_fmadd_ps(_mm256_zextps128_ps256(_mm_cvtph_ps(_mm_maskz_loadu_epi16(m, offset + r))),
                            _mm256_zextps128_ps256(_mm_maskz_loadu_ps(m, xsum + r)), o);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_zextps256_ps512(o)));
}
/* dot_q4 for R rows of x (xp + i * stride, cs + i * cstride): each chunk's nibbles split once. */
MULTI void dots_q4_body(const int8_t *xp, int64_t stride, const float *cs, int64_t cstride, int64_t runs, int R,
                        const uint8_t *w, float *out) {
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MR];
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t r = 0; r < runs; r += 4) {
        PF(w + r * 16);
        const int64_t t = runs - r;
        const __m512i b = t >= 4 ? _mm512_loadu_si512(w + r * 16)
                                 : _mm512_maskz_loadu_epi8(((__mmask64)1 << (16 * t)) - 1, w + r * 16);
        const __m512i l = _mm512_and_si512(b, low), h = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const float *ci = cs + i * cstride + r;
            const int8_t *x = xp + i * stride + r * 32;
            const __m128 c = t >= 4 ? _mm_loadu_ps(ci) : _mm_maskz_loadu_ps((__mmask8)((1 << t) - 1), ci);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l, _mm512_loadu_si512(x));
            s = _mm512_dpbusd_epi32(s, h, _mm512_loadu_si512(x + 64));
            acc[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(quad, _mm512_castps128_ps512(c)), _mm512_cvtepi32_ps(s), acc[i]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* dot_q4g32 for R rows of x (row i: xp + i * KP, xd + i * KP / 8, xsum + i * groups). */
MULTI void dots_q4g32_body(const int8_t *xp, const float *xd, const float *xsum, int64_t KP, int64_t groups,
                           int64_t runs, int R, const uint8_t *w, const uint16_t *scale, const uint16_t *offset,
                           float *out) {
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i quad2 = _mm512_add_epi32(quad, _mm512_set1_epi32(4));
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 a0[MR], a1[MR];
    __m256 o[MR];
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) a0[i] = a1[i] = _mm512_setzero_ps(), o[i] = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 8 <= runs; r += 8) {
        PF(w + r * 16);
        PF(w + r * 16 + 64);
        const __m512i b0 = _mm512_loadu_si512(w + r * 16), b1 = _mm512_loadu_si512(w + r * 16 + 64);
        const __m512i l0 = _mm512_and_si512(b0, low), h0 = _mm512_and_si512(_mm512_srli_epi16(b0, 4), low);
        const __m512i l1 = _mm512_and_si512(b1, low), h1 = _mm512_and_si512(_mm512_srli_epi16(b1, 4), low);
        const __m512 sc = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + r))));
        const __m512 c0 = _mm512_permutexvar_ps(quad, sc), c1 = _mm512_permutexvar_ps(quad2, sc);
        const __m256 of = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + r)));
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const int8_t *x = xp + i * KP + r * 32;
            const float *d = xd + i * KP / 8 + r * 4;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, _mm512_loadu_si512(x));
            s0 = _mm512_dpbusd_epi32(s0, h0, _mm512_loadu_si512(x + 64));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l1, _mm512_loadu_si512(x + 128));
            s1 = _mm512_dpbusd_epi32(s1, h1, _mm512_loadu_si512(x + 192));
            a0[i] = _mm512_fmadd_ps(_mm512_mul_ps(c0, _mm512_loadu_ps(d)), _mm512_cvtepi32_ps(s0), a0[i]);
            a1[i] = _mm512_fmadd_ps(_mm512_mul_ps(c1, _mm512_loadu_ps(d + 16)), _mm512_cvtepi32_ps(s1), a1[i]);
            o[i] = _mm256_fmadd_ps(of, _mm256_loadu_ps(xsum + i * groups + r), o[i]);
        }
    }
    for (; r < runs; r += 4) { /* the last 1-7 runs, a chunk at a time */
        PF(w + r * 16);
        const int64_t t = runs - r;
        const __mmask8 m = t >= 4 ? 0x0F : (__mmask8)((1 << t) - 1);
        const __m512i b = t >= 4 ? _mm512_loadu_si512(w + r * 16)
                                 : _mm512_maskz_loadu_epi8(((__mmask64)1 << (16 * t)) - 1, w + r * 16);
        const __m512i l = _mm512_and_si512(b, low), h = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        const __m512 c = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(m, scale + r))));
        const __m256 of = _mm256_zextps128_ps256(_mm_cvtph_ps(_mm_maskz_loadu_epi16(m, offset + r)));
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const int8_t *x = xp + i * KP + r * 32;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l, _mm512_loadu_si512(x));
            s = _mm512_dpbusd_epi32(s, h, _mm512_loadu_si512(x + 64));
            a0[i] = _mm512_fmadd_ps(_mm512_mul_ps(c, _mm512_loadu_ps(xd + i * KP / 8 + r * 4)), _mm512_cvtepi32_ps(s), a0[i]);
            o[i] = _mm256_fmadd_ps(of, _mm256_zextps128_ps256(_mm_maskz_loadu_ps(m, xsum + i * groups + r)), o[i]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[i], a1[i]), _mm512_zextps256_ps512(o[i])));
}

static void dots_q4g32(const int8_t *xp, const float *xd, const float *xsum, int64_t KP, int64_t groups, int64_t runs,
                       int R, const uint8_t *w, const uint16_t *scale, const uint16_t *offset, float *out) {
    if (R == 4) dots_q4g32_body(xp, xd, xsum, KP, groups, runs, 4, w, scale, offset, out);
    else if (R == 3) dots_q4g32_body(xp, xd, xsum, KP, groups, runs, 3, w, scale, offset, out);
    else dots_q4g32_body(xp, xd, xsum, KP, groups, runs, 2, w, scale, offset, out);
}
#else
/* AVX2: two runs (32 bytes of nibbles) an iteration, the nibbles put back in value order. */
static inline float dot_q4(const int8_t *xq, const float *cs, int64_t runs, const uint8_t *w) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= runs; r += 2) {
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
    return hsum(_mm256_add_ps(a0, a1));
}

/* dot_q4 for R rows of x (xq + i * stride, cs + i * cstride): each pair of runs unpacked once. */
MULTI void dots_q4_body(const int8_t *xq, int64_t stride, const float *cs, int64_t cstride, int64_t runs, int R,
                        const uint8_t *w, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 a0[MR], a1[MR];
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + 2 <= runs; r += 2) {
        PF(w + r * 16);
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + r * 16));
        const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        const __m256i q0 = _mm256_permute2x128_si256(lo, hi, 0x20), q1 = _mm256_permute2x128_si256(lo, hi, 0x31);
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const int8_t *x = xq + i * stride + r * 32;
            const __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)x)), ones);
            const __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(x + 32))), ones);
            a0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + i * cstride + r), _mm256_cvtepi32_ps(s0), a0[i]);
            a1[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + i * cstride + r + 1), _mm256_cvtepi32_ps(s1), a1[i]);
        }
    }
    if (r < runs) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(w + r * 16)), l = _mm_set1_epi8(0x0F);
        const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), l), _mm_and_si128(b, l));
        #pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * stride + r * 32));
            const __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
            a0[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(cs + i * cstride + r), _mm256_cvtepi32_ps(s0), a0[i]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < R; i++) out[i] = hsum(_mm256_add_ps(a0[i], a1[i]));
}
#endif

static void dots_q4(const int8_t *x, int64_t stride, const float *cs, int64_t cstride, int64_t runs, int R,
                    const uint8_t *w, float *out) {
    if (R == 4) dots_q4_body(x, stride, cs, cstride, runs, 4, w, out);
    else if (R == 3) dots_q4_body(x, stride, cs, cstride, runs, 3, w, out);
    else dots_q4_body(x, stride, cs, cstride, runs, 2, w, out);
}

/* x rounded to int8 for the q8 and q4 kernels, once per call: xq [M, K] in value order, dx
 * [M, K / 32] (max |x| / 127 per run, half to even), xsum [M, K / group] (q4: sums of the rounded
 * x per group) and, for the VNNI q4 kernels, xp [M, KP]: xq in chunks of 4 runs, each stored as
 * the 4 low halves (values 0-15) then the 4 high halves, the last chunk padded with zeros (KP:
 * K rounded up to whole chunks), and xd [M, KP / 8]: dx of the chunk's run i in lanes 4i..4i+3. */
typedef struct {
    int8_t *xq, *xp;
    float *dx, *xsum, *xd;
    int64_t K, KP, runs, groups;
} Rounded;

static inline int64_t padded_k(int64_t K) { return (K / 32 + 3) / 4 * 128; }

/* Room for M rows of width up to K (xsum sized for groups of 32, the most groups a row has). */
static int rounded_alloc(Rounded *q, int64_t M, int64_t K) {
    const int64_t KP = padded_k(K);
    float *f = malloc(sizeof(float) * (2 * M * (K / 32) + M * KP / 8) + M * K + M * KP + 64);
    if (!f) return 0;
    q->dx = f, q->xsum = f + M * (K / 32), q->xd = f + 2 * M * (K / 32);
    q->xq = (int8_t *)(q->xd + M * KP / 8);
    q->xp = q->xq + M * K;
    return 1;
}

static void interleave_runs(const int8_t *xq, const float *dx, int64_t runs, int8_t *xp, float *xd) {
    for (int64_t c = 0; c < (runs + 3) / 4; c++) {
        for (int64_t i = 0; i < 4; i++) {
            const int64_t r = 4 * c + i;
            const __m128i lo = r < runs ? _mm_loadu_si128((const __m128i *)(xq + r * 32)) : _mm_setzero_si128();
            const __m128i hi = r < runs ? _mm_loadu_si128((const __m128i *)(xq + r * 32 + 16)) : _mm_setzero_si128();
            _mm_storeu_si128((__m128i *)(xp + c * 128 + i * 16), lo);
            _mm_storeu_si128((__m128i *)(xp + c * 128 + 64 + i * 16), hi);
            _mm_storeu_ps(xd + c * 16 + i * 4, _mm_set1_ps(r < runs ? dx[r] : 0.0f));
        }
    }
}

/* One run of 32: out = round(v / d) (half to even: the default rounding mode), d = max|v| / 127;
 * returns the sum of the rounded values. The same arithmetic as formats.int8_activations. */
static inline int32_t round_run(const float *v, int8_t *out, float *d_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8), c = _mm256_loadu_ps(v + 16), e = _mm256_loadu_ps(v + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, c), _mm256_andnot_ps(sign, e)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float d = _mm_cvtss_f32(h) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    *d_out = d;
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(a, iv)), qb = _mm256_cvtps_epi32(_mm256_mul_ps(b, iv));
    __m256i qc = _mm256_cvtps_epi32(_mm256_mul_ps(c, iv)), qe = _mm256_cvtps_epi32(_mm256_mul_ps(e, iv));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qa, qb), _mm256_packs_epi32(qc, qe));
    /* packs works within 128-bit lanes: put the eight 4-byte groups back in order */
    _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(qa, qb), _mm256_add_epi32(qc, qe));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
    return _mm_cvtsi128_si32(t4);
}

/* x [M, K] rounded into q (see Rounded); xsum only for q4. */
static void round_rows(const float *x, int64_t M, int64_t K, int64_t group, int q4, Rounded *q) {
    const int64_t runs = K / 32, groups = K / group, per_group = group / 32;
    q->K = K, q->KP = padded_k(K), q->runs = runs, q->groups = groups;
    for (int64_t m = 0; m < M; m++) {
        int8_t *xq = q->xq + m * K;
        float *dx = q->dx + m * runs;
        float s = 0.0f;
        for (int64_t r = 0; r < runs; r++) {
            const int32_t t = round_run(x + m * K + r * 32, xq + r * 32, dx + r);
            /* the sums of the rounded x per group, in run order */
            s += dx[r] * (float)t;
            if (q4 && (r + 1) % per_group == 0) q->xsum[m * groups + r / per_group] = s, s = 0.0f;
        }
        if (q4 && RUNG_VNNI) interleave_runs(xq, dx, runs, q->xp + m * q->KP, q->xd + m * q->KP / 8);
    }
}

static void row_q8(const Rounded *q, int64_t M, int64_t group, const int8_t *w, const uint16_t *scale, float *out) {
    if (group == 32) { /* the scales in the loop (dot_q8) */
        for (int64_t m = 0; m < M; m++) out[m] = dot_q8(q->xq + m * q->K, NULL, q->dx + m * q->runs, scale, q->runs, w);
        return;
    }
    float cs[q->runs + 8];
    for (int64_t m = 0; m < M; m++) {
        run_scales(q->dx + m * q->runs, q->runs, group / 32, scale, cs);
        out[m] = dot_q8(q->xq + m * q->K, cs, NULL, NULL, q->runs, w);
    }
}

static void row_q4(const Rounded *q, int64_t M, int64_t group, const uint8_t *w, const uint16_t *scale,
                   const uint16_t *offset, float *out) {
#if RUNG_VNNI
    if (group == 32) {
        for (int64_t m = 0; m < M; m++)
            out[m] = dot_q4g32(q->xp + m * q->KP, q->xd + m * q->KP / 8, q->xsum + m * q->groups, q->runs, w, scale,
                               offset);
        return;
    }
    const int8_t *x = q->xp;
    const int64_t stride = q->KP;
#else
    const int8_t *x = q->xq;
    const int64_t stride = q->K;
#endif
    float cs[q->runs + 8];
    for (int64_t m = 0; m < M; m++) {
        run_scales(q->dx + m * q->runs, q->runs, group / 32, scale, cs);
        out[m] = dot_q4(x + m * stride, cs, q->runs, w) + offset_term(q->xsum + m * q->groups, q->groups, offset);
    }
}

/* M >= 2 rows of x: MR at a time (dots_*), a last single row through the single-row kernel.
 * Every row's result is the single-row kernel's, bit for bit. M = 1 (a batch-1 decode, the
 * latency case) keeps row_q8 / row_q4 as they were. */
static inline int rows_at_once(int64_t left) { return left < MR ? (int)left : MR; }

static void rows_q8(const Rounded *q, int64_t M, int64_t group, const int8_t *w, const uint16_t *scale, float *out) {
    const int64_t K = q->K, runs = q->runs, cstride = runs + 8;
    if (group == 32) { /* the scales in the loop (dot_q8) */
        for (int64_t m = 0, R; m < M; m += R) {
            R = rows_at_once(M - m);
            if (R == 1) out[m] = dot_q8(q->xq + m * K, NULL, q->dx + m * runs, scale, runs, w);
            else dots_q8(q->xq + m * K, K, NULL, 0, q->dx + m * runs, scale, runs, (int)R, w, out + m);
        }
        return;
    }
    float cs[MR * cstride];
    for (int64_t m = 0, R; m < M; m += R) {
        R = rows_at_once(M - m);
        for (int64_t i = 0; i < R; i++) run_scales(q->dx + (m + i) * runs, runs, group / 32, scale, cs + i * cstride);
        if (R == 1) out[m] = dot_q8(q->xq + m * K, cs, NULL, NULL, runs, w);
        else dots_q8(q->xq + m * K, K, cs, cstride, NULL, NULL, runs, (int)R, w, out + m);
    }
}

static void rows_q4(const Rounded *q, int64_t M, int64_t group, const uint8_t *w,
                    const uint16_t *scale, const uint16_t *offset, float *out) {
    const int64_t runs = q->runs, groups = q->groups, cstride = runs + 8;
#if RUNG_VNNI
    const int64_t KP = q->KP;
    if (group == 32) {
        for (int64_t m = 0, R; m < M; m += R) {
            R = rows_at_once(M - m);
            const int8_t *xp = q->xp + m * KP;
            const float *xd = q->xd + m * KP / 8, *xsum = q->xsum + m * groups;
            if (R == 1) out[m] = dot_q4g32(xp, xd, xsum, runs, w, scale, offset);
            else dots_q4g32(xp, xd, xsum, KP, groups, runs, (int)R, w, scale, offset, out + m);
        }
        return;
    }
    const int8_t *x = q->xp;
    const int64_t stride = KP;
#else
    const int8_t *x = q->xq;
    const int64_t stride = q->K;
#endif
    float cs[MR * cstride], dots[MR];
    for (int64_t m = 0, R; m < M; m += R) {
        R = rows_at_once(M - m);
        for (int64_t i = 0; i < R; i++) run_scales(q->dx + (m + i) * runs, runs, group / 32, scale, cs + i * cstride);
        if (R == 1) dots[0] = dot_q4(x + m * stride, cs, runs, w);
        else dots_q4(x + m * stride, stride, cs, cstride, runs, (int)R, w, dots);
        for (int64_t i = 0; i < R; i++) out[m + i] = dots[i] + offset_term(q->xsum + (m + i) * groups, groups, offset);
    }
}

/* The rows of q from row m on. */
static inline Rounded rounded_from(const Rounded *q, int64_t m) {
    const Rounded r = {q->xq + m * q->K, q->xp + m * q->KP, q->dx + m * q->runs, q->xsum + m * q->groups,
                       q->xd + m * q->KP / 8, q->K, q->KP, q->runs, q->groups};
    return r;
}

/* ---- the driver: row blocks in parallel, then the epilogue -------------------------------- */

enum { F32 = 0, Q8 = 1, Q4 = 2 };

static inline float activate(float g, int gated) {
    if (gated == 1) return g / (1.0f + expf(-g));
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

/* One projection's constants (rung/native/__init__.py builds these as ctypes Structures), with
 * the bytes each buffer holds from its pointer on: linear_check refuses a layout the kernels do
 * not know or a buffer smaller than the shape says, once per call, before a byte is read. */
typedef struct {
    int64_t format, gated, N, K, group;
    const void *w;
    const uint16_t *scale, *offset;
    const float *bias;
    int64_t w_bytes, scale_bytes, offset_bytes, bias_bytes;
} Linear;

/* The entry points' errors (rung/native/__init__.py: ERRORS says each in words). Nothing is
 * written when one is returned. */
enum {
    E_TOKEN = -1,   /* a token id outside the embedding table */
    E_MEMORY = -2,  /* out of memory */
    E_TABLE = -3,   /* a block table that does not reach its row's position */
    E_CAP = -4,     /* rung_read_plan: the caller's idx is too narrow */
    E_SLOT = -5,    /* a KV slot or block outside the pool */
    E_LAYOUT = -6,  /* a weight layout the kernels do not know (format, group, gated rows, sizes) */
    E_WEIGHTS = -7, /* a weight buffer smaller than its shape */
    E_SCALES = -8,
    E_OFFSETS = -9,
    E_BIAS = -10,
    E_X = -11,      /* an input smaller than its shape */
    E_OUT = -12,    /* an output smaller than its shape */
    E_SHAPE = -13,  /* sizes that disagree with each other (a decode step's layers, heads, widths) */
    E_BUFFER = -14, /* a decode step's buffer smaller than the batch needs */
    E_ROPE = -15,   /* a position past the RoPE table */
};

#define MAX_DIM ((int64_t)1 << 40) /* bounds every size, so the products below cannot overflow */

/* `count` items of `size` bytes fit in `bytes` (no multiplication: count may be absurd). */
static inline int fits(int64_t bytes, __int128 count, int64_t size) { return count >= 0 && bytes >= 0 && bytes / size >= count; }

/* The floats of a strided view (element (row r, head h, k) at r * row + h * head + k) fit in `bytes`. */
static inline int strided_fits(int64_t bytes, int64_t rows, int64_t row, int64_t heads, int64_t head, int64_t d) {
    if (rows == 0 || heads == 0) return 1;
    if (rows < 0 || heads < 0 || row < 0 || head < 0 || d < 1) return 0;
    return fits(bytes, (__int128)(rows - 1) * row + (__int128)(heads - 1) * head + d, 4);
}

static int linear_check(const Linear *L) {
    const int64_t N = L->N, K = L->K, group = L->group;
    if (L->format < F32 || L->format > Q4 || L->gated < 0 || L->gated > 2 || N < 1 || K < 1 || N > MAX_DIM ||
        K > MAX_DIM || (L->gated && N % BLOCK))
        return E_LAYOUT;
    if (L->format != F32 && (K % 32 || group < 32 || group % 32 || K % group)) return E_LAYOUT;
    const int64_t row_bytes = L->format == F32 ? 4 * K : L->format == Q8 ? K : K / 2, groups = K / group;
    if (!L->w || !fits(L->w_bytes, N, row_bytes)) return E_WEIGHTS;
    if (L->format != F32 && (!L->scale || !fits(L->scale_bytes, N, 2 * groups))) return E_SCALES;
    if (L->format == Q4 && (!L->offset || !fits(L->offset_bytes, N, 2 * groups))) return E_OFFSETS;
    if (L->bias && !fits(L->bias_bytes, N, 4)) return E_BIAS;
    return 0;
}

/* y[m, :] (+)= W x[m, :] for this thread's share of the row blocks; call inside a parallel region
 * (or outside one: then serially). q: x rounded (q8, q4). Any M: each block of BLOCK weight rows
 * meets the rows of x MAX_M at a time while it sits in L1, so a prompt reads each weight byte from
 * memory once, and every row of x gets the same arithmetic as a decode row (a prompt's K/V do not
 * depend on how it was batched or on a prefix-cache hit). Ends with the for-loop's barrier. */
static void gemv_rows(const Linear *L, const float *x, const Rounded *q, int64_t M, float *y, int accumulate) {
    const int64_t format = L->format, N = L->N, K = L->K, group = L->group, gated = L->gated;
    const int64_t groups = format == F32 ? 0 : K / group;
    const int64_t out_n = gated ? N / 2 : N;
    const int64_t row_bytes = format == F32 ? 4 * K : format == Q8 ? K : K / 2;
    const float *bias = L->bias;
    int first = 1;
#pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int64_t rows = N - n0 < BLOCK ? N - n0 : BLOCK;
        if (first) { /* the loop prefetches PREFETCH bytes ahead: fetch this thread's first ones now */
            first = 0;
            const char *start = (const char *)L->w + n0 * row_bytes;
            for (int64_t b = 0; b < PREFETCH && b < (N - n0) * row_bytes; b += 64) _mm_prefetch(start + b, _MM_HINT_T0);
        }
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
            const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
            float dots[BLOCK][MAX_M];
            if (format == F32)
                for (int64_t r = 0; r < rows; r++) row_f32(x + m0 * K, mm, K, (const float *)L->w + (n0 + r) * K, dots[r]);
            /* Wide rows (down: K = 1536) of x do not all fit in L1 beside the block: then MR rows of x
             * meet every row of the block before the next MR, instead of all mm rows streaming from
             * L2 once per weight row. Narrow ones meet each weight row all at once. */
            const int64_t step = mm * K > X_IN_L1 ? MR : mm;
            for (int64_t m1 = 0; format != F32 && m1 < mm; m1 += step) {
                const int64_t R = mm - m1 < step ? mm - m1 : step;
                const Rounded qm = rounded_from(q, m0 + m1);
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t n = n0 + r;
                    if (format == Q8 && R == 1)
                        row_q8(&qm, 1, group, (const int8_t *)L->w + n * K, L->scale + n * groups, dots[r] + m1);
                    else if (format == Q8)
                        rows_q8(&qm, R, group, (const int8_t *)L->w + n * K, L->scale + n * groups, dots[r] + m1);
                    else if (R == 1)
                        row_q4(&qm, 1, group, (const uint8_t *)L->w + n * K / 2, L->scale + n * groups,
                               L->offset + n * groups, dots[r] + m1);
                    else
                        rows_q4(&qm, R, group, (const uint8_t *)L->w + n * K / 2, L->scale + n * groups,
                                L->offset + n * groups, dots[r] + m1);
                }
            }
            for (int64_t r = 0; bias && r < rows; r++)
                for (int64_t m = 0; m < mm; m++) dots[r][m] += bias[n0 + r];
            for (int64_t m = 0; m < mm; m++) {
                float *ym = y + (m0 + m) * out_n;
                if (gated) {
                    for (int64_t r = 0; r < rows / 2; r++) {
                        float v = activate(dots[r][m], gated) * dots[r + rows / 2][m];
                        float *o = ym + n0 / 2 + r;
                        *o = accumulate ? *o + v : v;
                    }
                } else {
                    for (int64_t r = 0; r < rows; r++) {
                        float *o = ym + n0 + r;
                        *o = accumulate ? *o + dots[r][m] : dots[r][m];
                    }
                }
            }
        }
    }
}

static inline void round_for(const Linear *L, const float *x, int64_t M, Rounded *q) {
    if (L->format != F32) round_rows(x, M, L->K, L->group, L->format == Q4, q);
}

static int gemv(const Linear *L, const float *x, int64_t M, float *y, int accumulate, int threads) {
    Rounded q = {0};
    if (L->format != F32) {
        if (!rounded_alloc(&q, M, L->K)) return E_MEMORY;
        round_for(L, x, M, &q);
    }
#pragma omp parallel num_threads(threads)
    gemv_rows(L, x, &q, M, y, accumulate);
    free(q.dx);
    return 0;
}

/* ---- the exported entry points (called through ctypes) ----------------------------------
 * Each takes the bytes every buffer holds beside its pointer and checks the shapes it is given
 * fit them before reading anything: a few comparisons a call, none per element of a weight. */

int rung_max_m(void) { return MAX_M; }

int rung_vnni(void) { return RUNG_VNNI; }

/* y [M, N] (or N / 2 gated) = W x, or += with accumulate; x [M, K] float32, any M (a decode batch
 * or a prompt chunk; the rounded copy of x it allocates is about half of x's bytes). */
int rung_gemv(const Linear *L, const float *x, int64_t x_bytes, int64_t M, float *y, int64_t y_bytes, int accumulate,
              int threads) {
    const int bad = linear_check(L);
    if (bad) return bad;
    if (M < 0 || !x || !fits(x_bytes, (__int128)M * L->K, 4)) return E_X;
    if (!y || !fits(y_bytes, (__int128)M * (L->gated ? L->N / 2 : L->N), 4)) return E_OUT;
    return gemv(L, x, M, y, accumulate, threads);
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

static void write_kv(float *kpool, float *vpool, const float *knew, const float *vnew, int64_t new_tok,
                     int64_t new_head, const int64_t *write_slots, int64_t B, int64_t hkv, int64_t d) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < hkv; h++)
            for (int64_t k = 0; k < d; k++) {
                kpool[(write_slots[b] * hkv + h) * d + k] = knew[b * new_tok + h * new_head + k];
                vpool[(write_slots[b] * hkv + h) * d + k] = vnew[b * new_tok + h * new_head + k];
            }
}

/* e^x for x <= 0 (scores minus their max), eight at a time: Cephes' expf (x = n ln2 + r, a
 * degree-5 polynomial for e^r, 2^n through the exponent bits), within 2 ulp of libm's expf. */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f)); /* below: e^x underflows; the weight is 0 either way */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Eight dot products q . k_t (t = 0..7) at once: eight independent FMA chains instead of one
 * chain per key (whose latency, not the loads, bounded the old loop), then one transposing sum. */
static inline __m256 dot8(const float *q, const float *const k[8], int64_t d) {
    __m256 a[8];
    for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[t] + i), a[t]);
    }
    if (i < d) { /* a head width not a multiple of 8: the rest through a mask */
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d - i)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 qv = _mm256_maskload_ps(q + i, m);
        for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k[t] + i, m), a[t]);
    }
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* o = sum_j p_j v_j for the common head widths, the d / 8 sums held in registers (a width known
 * at compile time unrolls the loop; through memory each key's update waited on the last one's
 * stores). Values prefetched 8 keys ahead. */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, int64_t n, const float *vpool,
                                                               const int64_t *slots, int64_t hkv, int64_t kvh,
                                                               const int64_t d, float *o) {
    __m256 acc[16];
    for (int64_t k = 0; k < d / 8; k++) acc[k] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        if (j + 8 < n)
            for (int64_t c = 0; c < d; c += 16)
                _mm_prefetch((const char *)(vpool + (slots[j + 8] * hkv + kvh) * d + c), _MM_HINT_T0);
        const float *vv = vpool + (slots[j] * hkv + kvh) * d;
        const __m256 pv = _mm256_set1_ps(p[j]);
        for (int64_t k = 0; k < d / 8; k++) acc[k] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vv + 8 * k), acc[k]);
    }
    for (int64_t k = 0; k < d / 8; k++) _mm256_storeu_ps(o + 8 * k, acc[k]);
}

/* Fetch the keys and values of read-plan entries [t0, t1) of one kv head: towards L1 for the keys
 * (near: read next) or L2 for both. The pool is cold at attention time (a step's weights stream
 * through every cache level between two layers' attention) and its rows are scattered, so
 * rows read on demand stall on memory. Hints only: nothing is read or written. */
static inline __attribute__((always_inline)) void prefetch_rows(const float *kpool, const float *vpool,
                                                                const int64_t *slots, int64_t t0, int64_t t1,
                                                                int64_t hkv, int64_t kvh, int64_t d, int near) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t at = (slots[t] * hkv + kvh) * d;
        for (int64_t c = 0; c < d; c += 16) {
            if (near)
                _mm_prefetch((const char *)(kpool + at + c), _MM_HINT_T0);
            else
                _mm_prefetch((const char *)(kpool + at + c), _MM_HINT_T1);
            _mm_prefetch((const char *)(vpool + at + c), _MM_HINT_T1);
        }
    }
}

/* Softmax attention of one query over keys [j0, j1) of a row's read plan, unnormalised: o = sum
 * e^(s_j - m) v_j, *m_out = m (the part's top score), *l_out = sum e^(s_j - m). An empty range
 * gives m = -inf, l = 0, o = 0. scores: room for j1 - j0 + 8 floats. */
static void attend_part(const float *qv, const float *kpool, const float *vpool, const int64_t *slots, int64_t j0,
                        int64_t j1, int64_t hkv, int64_t kvh, int64_t d, float scale, float *scores, float *o,
                        float *m_out, float *l_out) {
    const int64_t n = j1 - j0;
    const int64_t *sl = slots + j0;
    if (n <= 0) {
        for (int64_t k = 0; k < d; k++) o[k] = 0.0f;
        *m_out = -INFINITY, *l_out = 0.0f;
        return;
    }
    prefetch_rows(kpool, vpool, sl, 0, n < 32 ? n : 32, hkv, kvh, d, 1); /* then 32 keys ahead, in the loop */
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) { /* scores, eight keys at a time */
        const float *k[8];
        for (int t = 0; t < 8; t++) k[t] = kpool + (sl[j + t] * hkv + kvh) * d;
        if (j + 32 < n) prefetch_rows(kpool, vpool, sl, j + 32, j + 40 < n ? j + 40 : n, hkv, kvh, d, 1);
        const __m256 s = _mm256_mul_ps(sc, dot8(qv, k, d));
        _mm256_storeu_ps(scores + j, s);
        top8 = _mm256_max_ps(top8, s);
    }
    __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    t4 = _mm_max_ss(t4, _mm_movehdup_ps(t4));
    float top = _mm_cvtss_f32(t4);
    for (; j < n; j++) {
        scores[j] = scale * dot_f32(qv, kpool + (sl[j] * hkv + kvh) * d, d);
        top = scores[j] > top ? scores[j] : top;
    }
    /* p = e^(s - top) in place, and their sum */
    const __m256 tv = _mm256_set1_ps(top);
    __m256 sum8 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 p = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(scores + j), tv));
        _mm256_storeu_ps(scores + j, p);
        sum8 = _mm256_add_ps(sum8, p);
    }
    float total = hsum(sum8);
    for (; j < n; j++) total += (scores[j] = expf(scores[j] - top));
    /* o = sum_j p_j v_j */
    if (d == 64)
        weighted_sum(scores, n, vpool, sl, hkv, kvh, 64, o);
    else if (d == 128)
        weighted_sum(scores, n, vpool, sl, hkv, kvh, 128, o);
    else {
        for (int64_t k = 0; k < d; k++) o[k] = 0.0f;
        for (j = 0; j < n; j++) {
            const float *vv = vpool + (sl[j] * hkv + kvh) * d;
            const __m256 pv = _mm256_set1_ps(scores[j]);
            int64_t k = 0;
            for (; k + 8 <= d; k += 8)
                _mm256_storeu_ps(o + k, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vv + k), _mm256_loadu_ps(o + k)));
            for (; k < d; k++) o[k] += scores[j] * vv[k];
        }
    }
    *m_out = top, *l_out = total;
}

#define MAX_SPLIT 8 /* parts a row's keys are split into (flash-decoding) */

/* Attention work item `item` of B * hkv * S: its sequence, kv head, part, and key range [j0, j1). */
typedef struct {
    int64_t b, kvh, s, j0, j1;
} Item;

static inline Item attention_item(int64_t item, int64_t hkv, int64_t S, int64_t chunk, const int64_t *lengths) {
    Item it = {item / (hkv * S), item / S % hkv, item % S, 0, 0};
    const int64_t n = lengths[it.b];
    it.j0 = it.s * chunk < n ? it.s * chunk : n;
    it.j1 = (it.s + 1) * chunk < n ? (it.s + 1) * chunk : n;
    return it;
}

/* Parts per row: enough work items for every thread (a batch-1 step of a model with 3 KV heads
 * has 3 (kv head) groups of query heads for 2 threads), each part at least 32 keys. */
static inline int64_t attention_splits(int64_t B, int64_t hkv, int64_t L, int64_t threads) {
    int64_t s = (2 * threads + B * hkv - 1) / (B * hkv);
    s = s > MAX_SPLIT ? MAX_SPLIT : s;
    const int64_t by_keys = (L + 31) / 32;
    return s > by_keys ? by_keys : s < 1 ? 1 : s;
}

/* Decode attention, split over (sequence, kv head, part of the keys) work items: a part of the
 * keys is scored against every query head of its kv head while its rows are in cache (GQA reads
 * each key and value row from memory once), and the parts of a row are balanced across threads;
 * then (after the loop's barrier) each (sequence, head) merges its parts' unnormalised sums by
 * their top scores (and a sink, gpt-oss's extra logit, folds into the denominator there).
 * part: room for B * hq * MAX_SPLIT * (d + 2) floats. Call inside a parallel region (or
 * serially); ends with a barrier. */
static void attention_rows(const float *q, int64_t q_tok, int64_t q_head, const float *kpool, const float *vpool,
                           const int64_t *idx, const int64_t *lengths, int64_t B, int64_t L, int64_t hq, int64_t hkv,
                           int64_t d, float scale, const float *sinks, float *out, float *part) {
    const int64_t group = hq / hkv;
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_num_threads();
#endif
    const int64_t S = attention_splits(B, hkv, L, threads), chunk = (L + S - 1) / S;
    float *po = part, *pm = part + B * hq * S * d, *pl = pm + B * hq * S; /* [B, hq, S, d], [B, hq, S] x 2 */
#pragma omp for schedule(static, 1) /* the assignment prefetch_attention expects */
    for (int64_t item = 0; item < B * hkv * S; item++) {
        const Item it = attention_item(item, hkv, S, chunk, lengths);
        float *scores = malloc(sizeof(float) * (chunk + 8));
        for (int64_t h = it.kvh * group; h < (it.kvh + 1) * group; h++) {
            const int64_t at = (it.b * hq + h) * S + it.s;
            attend_part(q + it.b * q_tok + h * q_head, kpool, vpool, idx + it.b * L, it.j0, it.j1, hkv, it.kvh, d,
                        scale, scores, po + at * d, pm + at, pl + at);
        }
        free(scores);
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * hq; bh++) {
        float top = sinks ? sinks[bh % hq] : -INFINITY;
        for (int64_t s = 0; s < S; s++) top = pm[bh * S + s] > top ? pm[bh * S + s] : top;
        float total = sinks ? expf(sinks[bh % hq] - top) : 0.0f, w[MAX_SPLIT];
        for (int64_t s = 0; s < S; s++) {
            w[s] = pl[bh * S + s] > 0.0f ? expf(pm[bh * S + s] - top) : 0.0f;
            total += w[s] * pl[bh * S + s];
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        float *o = out + bh * d;
        for (int64_t k = 0; k < d; k++) {
            float v = 0.0f;
            for (int64_t s = 0; s < S; s++) v += w[s] * po[(bh * S + s) * d + k];
            o[k] = v * inv;
        }
    }
}

/* Fetch the keys and values this thread's attention items will read (attention_rows' static
 * assignment) towards its L2, ahead of the attention: issued before the layer's q|k|v GEMV, the
 * fetches overlap it (see prefetch_rows). */
static void prefetch_attention(const float *kpool, const float *vpool, const int64_t *idx, const int64_t *lengths,
                               int64_t B, int64_t L, int64_t hkv, int64_t d) {
    int thread = 0, threads = 1;
#ifdef _OPENMP
    thread = omp_get_thread_num(), threads = omp_get_num_threads();
#endif
    const int64_t S = attention_splits(B, hkv, L, threads), chunk = (L + S - 1) / S;
    for (int64_t item = thread; item < B * hkv * S; item += threads) {
        const Item it = attention_item(item, hkv, S, chunk, lengths);
        prefetch_rows(kpool, vpool, idx + it.b * L, it.j0, it.j1, hkv, it.kvh, d, 0);
    }
}

static inline size_t attention_part_floats(int64_t B, int64_t hq, int64_t d) { return (size_t)B * hq * MAX_SPLIT * (d + 2); }

/* Every size rung_decode_attention is given against the bytes behind each pointer, and every
 * slot it will read or write against the pool (the pools hold pool_bytes / (4 hkv d) slots). */
static int attention_check(const float *q, int64_t q_bytes, int64_t q_tok, int64_t q_head, int64_t pool_bytes,
                           const float *knew, const float *vnew, int64_t new_bytes, int64_t new_tok, int64_t new_head,
                           const int64_t *write_slots, int64_t write_bytes, const int64_t *idx, int64_t idx_bytes,
                           const int64_t *lengths, int64_t lengths_bytes, int64_t B, int64_t L, int64_t hq, int64_t hkv,
                           int64_t d, const float *sinks, int64_t sinks_bytes, int64_t out_bytes) {
    if (B < 0 || B > MAX_DIM || L < 1 || L > MAX_DIM || hkv < 1 || hq < hkv || hq % hkv || hq > MAX_DIM || d < 1 ||
        d > MAX_DIM)
        return E_SHAPE;
    if (!q || !strided_fits(q_bytes, B, q_tok, hq, q_head, d)) return E_X;
    if (!idx || !lengths || !fits(idx_bytes, (__int128)B * L, 8) || !fits(lengths_bytes, B, 8)) return E_X;
    if (sinks && !fits(sinks_bytes, hq, 4)) return E_X;
    if (!fits(out_bytes, (__int128)B * hq * d, 4)) return E_OUT;
    const int64_t slots = pool_bytes / 4 / hkv / d;
    for (int64_t b = 0; b < B; b++) {
        if (lengths[b] < 0 || lengths[b] > L) return E_SLOT;
        for (int64_t j = 0; j < lengths[b]; j++)
            if (idx[b * L + j] < 0 || idx[b * L + j] >= slots) return E_SLOT;
    }
    if (write_slots) {
        if (!knew || !vnew || !fits(write_bytes, B, 8) || !strided_fits(new_bytes, B, new_tok, hkv, new_head, d))
            return E_X;
        for (int64_t b = 0; b < B; b++)
            if (write_slots[b] < 0 || write_slots[b] >= slots) return E_SLOT;
    }
    return 0;
}

/* pool_bytes: the smaller of the two pools' bytes; new_bytes: the smaller of knew's and vnew's. */
int rung_decode_attention(const float *q, int64_t q_bytes, int64_t q_tok, int64_t q_head, float *kpool, float *vpool,
                          int64_t pool_bytes, const float *knew, const float *vnew, int64_t new_bytes, int64_t new_tok,
                          int64_t new_head, const int64_t *write_slots, int64_t write_bytes, const int64_t *idx,
                          int64_t idx_bytes, const int64_t *lengths, int64_t lengths_bytes, int64_t B, int64_t L,
                          int64_t hq, int64_t hkv, int64_t d, float scale, const float *sinks, int64_t sinks_bytes,
                          float *out, int64_t out_bytes, int threads) {
    if (!kpool || !vpool) return E_SLOT;
    const int bad = attention_check(q, q_bytes, q_tok, q_head, pool_bytes, knew, vnew, new_bytes, new_tok, new_head,
                                    write_slots, write_bytes, idx, idx_bytes, lengths, lengths_bytes, B, L, hq, hkv, d,
                                    sinks, sinks_bytes, out_bytes);
    if (bad) return bad;
    float *part = malloc(sizeof(float) * attention_part_floats(B, hq, d));
    if (!part) return E_MEMORY;
    if (write_slots) /* this step's keys and values into their slots first (strided views, no copies) */
        write_kv(kpool, vpool, knew, vnew, new_tok, new_head, write_slots, B, hkv, d);
#pragma omp parallel num_threads(threads)
    attention_rows(q, q_tok, q_head, kpool, vpool, idx, lengths, B, L, hq, hkv, d, scale, sinks, out, part);
    free(part);
    return 0;
}

/* ---- small per-token ops of a decode step, one call each instead of several torch ops ------- */

/* RMSNorm over rows: out = x / sqrt(mean(x^2) + eps) * (offset + w), in float32. */
static void rmsnorm_rows(const float *x, const float *w, float *out, int64_t M, int64_t K, float eps, float offset) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = dot_f32(xm, xm, K);
        const float inv = 1.0f / sqrtf(s / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[m * K + k] = xm[k] * inv * (offset + w[k]);
    }
}

int rung_rmsnorm(const float *x, int64_t x_bytes, const float *w, int64_t w_bytes, float *out, int64_t out_bytes,
                 int64_t M, int64_t K, float eps, float offset) {
    if (M < 0 || K < 1 || K > MAX_DIM || M > MAX_DIM) return E_SHAPE;
    if (!x || !fits(x_bytes, (__int128)M * K, 4) || !w || !fits(w_bytes, K, 4)) return E_X;
    if (!out || !fits(out_bytes, (__int128)M * K, 4)) return E_OUT;
    rmsnorm_rows(x, w, out, M, K, eps, offset);
    return 0;
}

/* RoPE in place on the first `heads` heads of each row of x [M, row] (q heads then k heads of a
 * fused q|k|v row), with the model's tables cos, signed sin [M, d] (rotate_half layout: pairs
 * (j, j + d/2); signed sin = [-sin, sin]), the same arithmetic as rope.py's apply_rotary. */
static void rope_rows(float *x, int64_t M, int64_t row, int64_t heads, int64_t d, const float *cos, const float *ssin) {
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

/* table_bytes: the smaller of cos's and ssin's bytes. */
int rung_rope(float *x, int64_t x_bytes, int64_t M, int64_t row, int64_t heads, int64_t d, const float *cos,
              const float *ssin, int64_t table_bytes) {
    if (M < 0 || M > MAX_DIM || d < 2 || d % 2 || d > MAX_DIM || heads < 0 || heads > MAX_DIM || row > MAX_DIM ||
        (__int128)heads * d > row)
        return E_SHAPE;
    if (!x || !fits(x_bytes, (__int128)M * row, 4) || !cos || !ssin || !fits(table_bytes, (__int128)M * d, 4)) return E_X;
    rope_rows(x, M, row, heads, d, cos, ssin);
    return 0;
}

/* ---- a whole decode step in one call ---------------------------------------------------------
 * A decode step of a small model is ~250 short operations; called one by one from Python each
 * costs a ctypes call and an OpenMP fork/join (5-10 us together), more than many of them
 * compute. rung_decode_step runs every layer of a plain pre-norm decoder (RMSNorm, fused q|k|v,
 * RoPE, K/V write + attention over the paged pool, o + residual, RMSNorm, gated gate|up, down +
 * residual), then the final norm and the LM head, inside one parallel region: the threads split
 * each GEMV's rows and the attention's heads, and one of them does the small serial pieces
 * (norms, RoPE, rounding x) between barriers. The same functions as the single-op entry points
 * above, so each piece is tested on its own too. engine/cpu_decode.py builds the structs. */
#define MAX_GROUPS 4 /* KV pool groups (full and sliding layers) */
#define MAX_ROPES 4  /* RoPE tables (layer types) */

typedef struct {
    const float *attn_norm, *mlp_norm;
    Linear qkv, o, gate_up, down;
    float *kpool, *vpool;
    int64_t group, rope; /* which read plan, which RoPE table */
    float scale;         /* attention scale */
    const float *q_norm, *k_norm; /* RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3), or NULL */
    const float *post_attn_norm, *post_mlp_norm; /* Gemma's sandwich norms on each branch's output, or NULL */
    int64_t pool_bytes; /* the smaller of kpool's and vpool's bytes: pool_bytes / (4 hkv d) slots */
} Layer;

typedef struct {
    int64_t layers, hidden, hq, hkv, d, max_k;
    float eps, norm_offset;
    const Layer *layer;
    const float *final_norm; /* NULL: stop after the last layer (the caller takes the logits) */
    Linear head;
    Linear embed;      /* the token embedding table [vocab, hidden] (no bias); w NULL: the caller fills x */
    float embed_scale; /* times the embedded rows (1 unless the family scales them) */
    int64_t groups;    /* KV pool groups (full attention, each sliding window) */
} Model;

/* One step's inputs: everything here changes from step to step. The step builds its own read
 * plans from the block tables: for row b, the positions lo..starts[b] it sees (lo from the
 * group's window), their slots table[p / block] * block + p % block, the last one the slot its
 * new key and value go to. */
typedef struct {
    int64_t B, block;
    const int64_t *ids, *starts;      /* token ids [B] (read when the model embeds), positions [B] */
    const int64_t *tables[MAX_GROUPS]; /* block tables [B, width] per group; blocks before the window are never read */
    int64_t width[MAX_GROUPS], window[MAX_GROUPS]; /* window 0: none */
    const float *cos[MAX_ROPES], *sin[MAX_ROPES]; /* RoPE tables [positions, d], row p for position p */
    float *x, *h, *qkv, *att, *gu, *logits; /* x: the embedded tokens (or the caller's), the last hidden state on exit */
    /* the bytes behind the pointers above (rope: the smaller of cos's and sin's), checked by step_check */
    int64_t ids_bytes, starts_bytes, tables_bytes[MAX_GROUPS], rope_bytes[MAX_ROPES];
    int64_t x_bytes, h_bytes, qkv_bytes, att_bytes, gu_bytes, logits_bytes;
} Step;

int rung_decode_step_limits(int64_t *groups, int64_t *ropes, int64_t *step_size) {
    *groups = MAX_GROUPS, *ropes = MAX_ROPES, *step_size = sizeof(Step);
    return (int)sizeof(Model) * 1000 + (int)sizeof(Layer);
}

/* Row `id` of an embedding table in any format, dequantized as formats.dequantize does. */
static void embed_row(const Linear *E, int64_t id, float *out) {
    const int64_t K = E->K, groups = E->format == F32 ? 0 : K / E->group;
    if (E->format == F32) {
        const float *w = (const float *)E->w + id * K;
        for (int64_t k = 0; k < K; k++) out[k] = w[k];
    } else if (E->format == Q8) {
        const int8_t *w = (const int8_t *)E->w + id * K;
        for (int64_t k = 0; k < K; k++) out[k] = (float)w[k] * half_to_float(E->scale[id * groups + k / E->group]);
    } else {
        const uint8_t *w = (const uint8_t *)E->w + id * K / 2;
        for (int64_t k = 0; k < K; k++) {
            const int64_t r = k / 32, j = k % 32, g = id * groups + k / E->group;
            const int q = j < 16 ? w[r * 16 + j] & 0x0F : w[r * 16 + j - 16] >> 4;
            float v = (float)q * half_to_float(E->scale[g]);
            out[k] = v + half_to_float(E->offset[g]);
        }
    }
}

typedef struct {
    int64_t *idx[MAX_GROUPS], *lengths[MAX_GROUPS], *slots[MAX_GROUPS];
    int64_t L[MAX_GROUPS];
    int64_t *mem;
} Plans;

/* The oldest position a query at `start` sees (window 0: none); paged.Group.first_needed. */
static inline int64_t first_needed(int64_t start, int64_t window) {
    return window > 0 && start >= window ? start - window + 1 : 0;
}

/* The step's positions and block tables against the bytes behind them (every plan reads these). */
static int tables_check(int64_t groups, const Step *st) {
    if (st->B < 1 || st->B > MAX_M || st->block < 1 || st->block > MAX_DIM || groups < 1 || groups > MAX_GROUPS)
        return E_SHAPE;
    if (!st->starts || !fits(st->starts_bytes, st->B, 8)) return E_BUFFER;
    for (int64_t g = 0; g < groups; g++)
        if (!st->tables[g] || st->width[g] < 1 || !fits(st->tables_bytes[g], (__int128)st->B * st->width[g], 8))
            return E_TABLE;
    return 0;
}

/* The read plans of every group (see Step). 0, or E_TABLE when a table does not reach a row's
 * position, or E_SLOT when it names a block past the group's pool (blocks[g] whole blocks; NULL:
 * unchecked, for rung_read_plan). */
static int build_plans(int64_t groups, const Step *st, const int64_t *blocks, Plans *p) {
    const int64_t B = st->B, bs = st->block;
    int64_t total = 0;
    for (int64_t g = 0; g < groups; g++) {
        int64_t L = 1;
        for (int64_t b = 0; b < B; b++) {
            const int64_t start = st->starts[b], lo = first_needed(start, st->window[g]);
            if (start < 0 || start / bs >= st->width[g]) return E_TABLE;
            L = start + 1 - lo > L ? start + 1 - lo : L;
        }
        p->L[g] = L;
        total += B * L + 2 * B;
    }
    p->mem = malloc(sizeof(int64_t) * total);
    if (!p->mem) return E_MEMORY;
    int64_t *at = p->mem;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t L = p->L[g];
        p->idx[g] = at, p->lengths[g] = at + B * L, p->slots[g] = at + B * L + B;
        at += B * L + 2 * B;
        for (int64_t b = 0; b < B; b++) {
            const int64_t start = st->starts[b], lo = first_needed(start, st->window[g]);
            const int64_t *table = st->tables[g] + b * st->width[g];
            int64_t *row = p->idx[g] + b * L;
            for (int64_t j = 0; j < L; j++) {
                const int64_t pos = lo + j, block = pos <= start ? table[pos / bs] : 0;
                if (block < 0 || (blocks && block >= blocks[g])) {
                    free(p->mem);
                    return E_SLOT;
                }
                row[j] = pos <= start ? block * bs + pos % bs : 0;
            }
            p->lengths[g][b] = start + 1 - lo;
            p->slots[g][b] = row[start - lo];
        }
    }
    return 0;
}

/* Group g's read plan as a step builds it (for the tests): idx [B, cap] (cap >= its L), lengths
 * and slots [B]; returns L, or the negative error of build_plans, or -4 when cap is too small. */
int64_t rung_read_plan(const Step *st, int64_t groups, int64_t g, int64_t *idx, int64_t cap, int64_t *lengths,
                       int64_t *slots) {
    Plans p;
    int bad = g < 0 || g >= groups ? E_SHAPE : tables_check(groups, st);
    if (!bad) bad = build_plans(groups, st, NULL, &p);
    if (bad) return bad;
    const int64_t L = p.L[g];
    if (L <= cap) {
        for (int64_t b = 0; b < st->B; b++) {
            for (int64_t j = 0; j < L; j++) idx[b * cap + j] = p.idx[g][b * L + j];
            lengths[b] = p.lengths[g][b], slots[b] = p.slots[g][b];
        }
    }
    free(p.mem);
    return L <= cap ? L : -4;
}

/* x += rmsnorm(h) (h overwritten): a sandwich norm on a branch's output before the residual add. */
static void add_normed(float *x, float *h, const float *w, int64_t B, int64_t H, float eps, float off) {
    rmsnorm_rows(h, w, h, B, H, eps, off);
    for (int64_t i = 0; i < B * H; i++) x[i] += h[i];
}

/* Everything a step will read or write through a pointer, against the sizes beside it: each
 * layer's projections (their layouts and buffers, and widths that chain: hidden → q|k|v, heads →
 * hidden, hidden → gate|up → down → hidden), the pools (blocks[g]: whole blocks every layer of
 * group g holds), the RoPE rows of the step's positions, and the step's buffers for B rows. */
static int step_check(const Model *m, const Step *st, int64_t *blocks) {
    const int64_t B = st->B, hq = m->hq, hkv = m->hkv, d = m->d, H = m->hidden;
    int bad = tables_check(m->groups, st);
    if (bad) return bad;
    if (m->layers < 0 || (m->layers && !m->layer) || hkv < 1 || hq < hkv || hq % hkv || hq > MAX_DIM || d < 2 ||
        d % 2 || d > MAX_DIM || H < 1 || H > MAX_DIM)
        return E_SHAPE;
    const int64_t row = (hq + 2 * hkv) * d;
    int64_t widest = H, gu = 0;
    for (int64_t g = 0; g < m->groups; g++) blocks[g] = INT64_MAX;
    for (int64_t l = 0; l < m->layers; l++) {
        const Layer *L = m->layer + l;
        const Linear *p[4] = {&L->qkv, &L->o, &L->gate_up, &L->down};
        for (int i = 0; i < 4; i++) {
            if ((bad = linear_check(p[i]))) return bad;
            widest = p[i]->K > widest ? p[i]->K : widest;
        }
        if (L->qkv.K != H || L->qkv.N != row || L->qkv.gated || L->o.K != hq * d || L->o.N != H || L->o.gated ||
            L->gate_up.K != H || !L->gate_up.gated || L->down.K != L->gate_up.N / 2 || L->down.N != H || L->down.gated)
            return E_SHAPE;
        gu = L->gate_up.N / 2 > gu ? L->gate_up.N / 2 : gu;
        if (!L->attn_norm || !L->mlp_norm || L->group < 0 || L->group >= m->groups || L->rope < 0 || L->rope >= MAX_ROPES)
            return E_SHAPE;
        if (!L->kpool || !L->vpool) return E_SLOT;
        const int64_t held = L->pool_bytes / 4 / hkv / d / st->block;
        blocks[L->group] = held < blocks[L->group] ? held : blocks[L->group];
        if (!st->cos[L->rope] || !st->sin[L->rope]) return E_ROPE;
        for (int64_t b = 0; b < B; b++)
            if (st->starts[b] < 0 || !fits(st->rope_bytes[L->rope], (__int128)(st->starts[b] + 1) * d, 4)) return E_ROPE;
    }
    if (m->max_k < widest) return E_SHAPE;
    if (m->final_norm) {
        if ((bad = linear_check(&m->head))) return bad;
        if (m->head.K != H || m->head.gated) return E_SHAPE;
        if (!st->logits || !fits(st->logits_bytes, (__int128)B * m->head.N, 4)) return E_BUFFER;
    }
    if (m->embed.w) {
        if ((bad = linear_check(&m->embed))) return bad;
        if (m->embed.K != H || m->embed.gated) return E_SHAPE;
        if (!st->ids || !fits(st->ids_bytes, B, 8)) return E_BUFFER;
    }
    if (!st->x || !st->h || !st->qkv || !st->att || !st->gu || !fits(st->x_bytes, (__int128)B * H, 4) ||
        !fits(st->h_bytes, (__int128)B * H, 4) || !fits(st->qkv_bytes, (__int128)B * row, 4) ||
        !fits(st->att_bytes, (__int128)B * hq * d, 4) || !fits(st->gu_bytes, (__int128)B * gu, 4))
        return E_BUFFER;
    return 0;
}

/* 0, or one of the errors above (E_TOKEN, E_MEMORY, E_TABLE, E_SLOT, or step_check's). Nothing is
 * written on an error. */
int rung_decode_step(const Model *m, const Step *st, int threads) {
    const int64_t B = st->B, hq = m->hq, hkv = m->hkv, d = m->d, row = (hq + 2 * hkv) * d, H = m->hidden;
    const float eps = m->eps, off = m->norm_offset;
    float *x = st->x, *h = st->h;
    int64_t blocks[MAX_GROUPS];
    int bad = step_check(m, st, blocks);
    if (bad) return bad;
    if (m->embed.w)
        for (int64_t b = 0; b < B; b++)
            if (st->ids[b] < 0 || st->ids[b] >= m->embed.N) return E_TOKEN;
    Plans plans;
    if ((bad = build_plans(m->groups, st, blocks, &plans))) return bad;
    Rounded q = {0};
    float *part = malloc(sizeof(float) * attention_part_floats(B, hq, d));
    if (!part || !rounded_alloc(&q, B, m->max_k)) {
        free(plans.mem);
        free(part);
        return E_MEMORY;
    }
    if (m->embed.w)
        for (int64_t b = 0; b < B; b++) {
            embed_row(&m->embed, st->ids[b], x + b * H);
            if (m->embed_scale != 1.0f)
                for (int64_t k = 0; k < H; k++) x[b * H + k] *= m->embed_scale;
        }
#pragma omp parallel num_threads(threads)
    {
        for (int64_t l = 0; l < m->layers; l++) {
            const Layer *L = m->layer + l;
            const int64_t g = L->group;
#pragma omp single
            {
                rmsnorm_rows(x, L->attn_norm, h, B, H, eps, off);
                round_for(&L->qkv, h, B, &q);
            }
            prefetch_attention(L->kpool, L->vpool, plans.idx[g], plans.lengths[g], B, plans.L[g], hkv, d);
            gemv_rows(&L->qkv, h, &q, B, st->qkv, 0);
#pragma omp single
            {
                if (L->q_norm)
                    for (int64_t b = 0; b < B; b++) {
                        rmsnorm_rows(st->qkv + b * row, L->q_norm, st->qkv + b * row, hq, d, eps, off);
                        rmsnorm_rows(st->qkv + b * row + hq * d, L->k_norm, st->qkv + b * row + hq * d, hkv, d, eps, off);
                    }
                for (int64_t b = 0; b < B; b++)
                    rope_rows(st->qkv + b * row, 1, row, hq + hkv, d, st->cos[L->rope] + st->starts[b] * d,
                              st->sin[L->rope] + st->starts[b] * d);
                write_kv(L->kpool, L->vpool, st->qkv + hq * d, st->qkv + (hq + hkv) * d, row, d, plans.slots[g], B, hkv, d);
            }
            attention_rows(st->qkv, row, d, L->kpool, L->vpool, plans.idx[g], plans.lengths[g], B, plans.L[g], hq, hkv,
                           d, L->scale, 0, st->att, part);
#pragma omp single
            round_for(&L->o, st->att, B, &q);
            if (L->post_attn_norm) { /* x += norm(o): the branch into h first */
                gemv_rows(&L->o, st->att, &q, B, h, 0);
#pragma omp single
                add_normed(x, h, L->post_attn_norm, B, H, eps, off);
            } else
                gemv_rows(&L->o, st->att, &q, B, x, 1);
#pragma omp single
            {
                rmsnorm_rows(x, L->mlp_norm, h, B, H, eps, off);
                round_for(&L->gate_up, h, B, &q);
            }
            gemv_rows(&L->gate_up, h, &q, B, st->gu, 0);
#pragma omp single
            round_for(&L->down, st->gu, B, &q);
            if (L->post_mlp_norm) {
                gemv_rows(&L->down, st->gu, &q, B, h, 0);
#pragma omp single
                add_normed(x, h, L->post_mlp_norm, B, H, eps, off);
            } else
                gemv_rows(&L->down, st->gu, &q, B, x, 1);
        }
        if (m->final_norm) {
#pragma omp single
            {
                rmsnorm_rows(x, m->final_norm, h, B, H, eps, off);
                round_for(&m->head, h, B, &q);
            }
            gemv_rows(&m->head, h, &q, B, st->logits, 0);
        }
    }
    free(q.dx);
    free(plans.mem);
    free(part);
    return 0;
}
