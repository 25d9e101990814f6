/* nanoinfer's CPU kernels: the loops that dominate a step on a small model.
 *
 *   q4_matmul   out[M, N] = x[M, K] @ W^T, W group-wise 4-bit (32 per group, w = q * scale + min),
 *               x rounded to int8 per group of 32 (as llama.cpp's Q8_1), integer dot products
 *   q8_matmul   out[M, N] = x[M, K] @ W^T, W int8 per output row or per group (w = q * scale),
 *               x rounded to int16 per group of 32, integer dot products
 *   bf16_matmul out[M, N] = x[M, K] @ W^T, W bfloat16 (widened to float32 exactly, x stays float32)
 *   paged_attention  query rows (decode steps and prompt rows alike) against K/V read in place
 *                    from the paged cache (no gather into a contiguous copy first); the cache
 *                    holds float32 or IEEE half (kv_half), widened to float32 as it is read
 *   shm_*       tensor-parallel ranks on one host exchanging partial sums through shared memory
 *
 * Elsewhere activations, scales and results are float32 and every product is accumulated in
 * float32, so those agree with "dequantize, then float32 matmul" to rounding order. Built at first use
 * by nanoinfer/kernels/__init__.py with the host compiler (-O3 -march=native -fopenmp); the
 * AVX2/FMA paths are taken when the compiler targets them, plain C loops otherwise.
 * OpenMP: linked against the libgomp torch has already loaded, so there is one thread pool.
 */
#define _GNU_SOURCE /* sched_yield, nanosleep under -std=c11 */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define Q4_GROUP 32
#define Q8_GROUP 32

/* VNNI's dpbusd does a u8 x i8 four-way dot product and its int32 accumulation in one
 * instruction, where AVX2 needs maddubs (pairs to int16), an int16 add, and a madd by ones per
 * group: the int4 kernels' inner loop then issues half the instructions, which matters wherever
 * it is compute-bound (several rows: batched decode, verification, prefill). The int32 sums are
 * the same integers, so the results are bit-identical (docs/performance.md, "int4 matmul"). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q4_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define Q4_VNNI 1
#define dpbusd(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

#ifdef __AVX2__
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef __AVX2__
/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial
 * (relative error ~2e-7), 2^n put in the exponent bits. x is clamped to [-87, 88], so very
 * negative inputs give ~1e-38 rather than 0, which no softmax sum notices. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: exact n * hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline float dot(const float *a, const float *b, int64_t D) {
    int64_t d = 0;
    float total = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    total = hsum256(acc);
#endif
    for (; d < D; d++) total += a[d] * b[d];
    return total;
}

/* The KV cache stores float32, or IEEE half when kv_half is set: half the bytes that decode
 * attention streams from memory. Conversions round to nearest even, as torch's .half() does. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    float f;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13); /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else { /* zero and subnormals: man * 2^-24 is exact in float */
        f = (float)man * 0x1p-24f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) {
    uint32_t x, ax;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return sign | 0x7e00;  /* nan */
    if (ax >= 0x477ff000) return sign | 0x7c00; /* 65520 and up round to inf */
    if (ax < 0x38800000) {                      /* below the smallest normal half: units of 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        return sign | (uint16_t)lrintf(a * 0x1p24f);
    }
    return sign | (uint16_t)((ax + 0xfff + ((ax >> 13) & 1) - 0x38000000) >> 13);
}

/* The address of element `i` of a cache holding floats or halves. */
static inline const void *kv_at(const void *cache, int64_t i, int half) {
    return (const char *)cache + i * (half ? 2 : 4);
}

/* The row (of head_dim elements) holding `head` of the token in `slot` = block * block_size + offset:
 * caches are [blocks, KVH, block_size, D], each head's rows of a block together. */
static inline int64_t kv_row(int64_t slot, int64_t head, int64_t KVH, int64_t block_size) {
    return (slot / block_size * KVH + head) * block_size + slot % block_size;
}

static inline float kv_get(const void *row, int64_t d, int half) {
    return half ? half_to_float(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* n floats from src into cache row dst, narrowed to half when kv_half. */
static void kv_put(void *dst, const float *src, int64_t n, int half) {
    if (!half) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = (uint16_t *)dst;
    int64_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) h[i] = float_to_half(src[i]);
}

#ifdef __AVX2__
/* 8 elements of a cache row, widened to float32. */
static inline __m256 kv_load8(const void *row, int64_t d, int half) {
    if (!half) return _mm256_loadu_ps((const float *)row + d);
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + d)));
#else
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = half_to_float(((const uint16_t *)row)[d + i]);
    return _mm256_loadu_ps(t);
#endif
}
#endif

/* One 32-wide activation group rounded to integers of magnitude <= top: x * (top / max|x|) to
 * nearest even (as lrintf). Returns max|x|. */
#ifdef __AVX2__
static inline float round_group(const float *p, float top, __m256i r[4]) {
    __m256 v[4], sign = _mm256_set1_ps(-0.f), m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(p + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    __m256 inv = _mm256_set1_ps(amax > 0.f ? top / amax : 0.f);
    for (int i = 0; i < 4; i++) r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    return amax;
}
#else
static inline float round_group(const float *p, float top, int32_t r[32]) {
    float amax = 0.f;
    for (int j = 0; j < 32; j++) {
        float a = fabsf(p[j]);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0.f ? top / amax : 0.f;
    for (int j = 0; j < 32; j++) r[j] = (int32_t)lrintf(p[j] * inv);
    return amax;
}
#endif

/* Activations for the int4 kernel: each 32-wide group of each row as int8 with one scale
 * (x ~= xq * xs), plus the sum of the rounded group (xs * sum(xq)) for the min term. Integer
 * products let one AVX2 instruction do 32 multiply-adds (maddubs) instead of the 8 of a float FMA.
 * The min term must see the same rounded x as the q term: then the error is sum(w * dx), whereas
 * the exact float sum leaves sum((w - min) * dx), where w - min = q * scale is all positive, so
 * the rounding errors stop cancelling (docs/performance.md, "Quantization quality"). */
static void quantize_groups(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, float *xsum, int nthreads) {
    int64_t G = K / Q4_GROUP;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * G >= 1024)
    for (int64_t i = 0; i < M * G; i++) {
        const float *p = x + i * Q4_GROUP;
        int8_t *q = xq + i * Q4_GROUP;
        float amax, sum = 0.f;
#ifdef __AVX2__
        __m256i r[4];
        amax = round_group(p, 127.f, r);
        __m256i isum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        sum = hsum256(_mm256_cvtepi32_ps(isum)); /* exact: |sum| <= 32 * 127 */
        /* packs keep 128-bit lanes; the permute puts the bytes back in order */
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)q, b);
#else
        int32_t r[Q4_GROUP];
        amax = round_group(p, 127.f, r);
        for (int j = 0; j < Q4_GROUP; j++) {
            q[j] = (int8_t)r[j];
            sum += r[j];
        }
#endif
        xs[i] = amax / 127.f;
        xsum[i] = sum * xs[i];
    }
}

/* The int4 weight in blocks of Q4_COLS = 16 output columns: for column block b and group g, 256
 * bytes in four 64-byte rows jj; byte 4c + i of row jj holds column 16b + c at k = 32g + 4jj + i
 * in its low nibble and at k + 16 in its high one. So one 64-byte load unpacks (and, shift) to two
 * vectors, each 16 columns x 4 consecutive k: a u8 x i8 four-way dot product (dpbusd, or maddubs
 * without VNNI) against an activation quad broadcast to all lanes gives 16 columns' partial dot
 * products at once, with no horizontal sums. Without AVX-512 a vector is half a row: 8 columns.
 * Blocks go in chunks of Q4_CHUNK (the last may be short, C blocks), and a chunk is one
 * sequential record per group: C x 256 weight bytes, then C x 16 float scales, C x 16 mins.
 * One stream per chunk matters at batch 1, where every weight comes from memory once per step
 * (docs/performance.md, "int4 matmul"). N is padded to a whole block with zero weights, scales
 * and mins.
 * Packed nibbles, not pre-unpacked bytes: with weights stored as int8 q - 8, each dot product
 * could take its weight straight from memory (x offset to u8, no and/shift), but each row then
 * loads every weight vector itself, and the loads bound it (docs/performance.md, "int4 matmul"). */
#define Q4_COLS 16
#define Q4_CHUNK 2                      /* blocks per chunk: 32 columns, as many chunks as 2 threads split evenly */
#define Q4_ROW (Q4_COLS * 4)            /* bytes of one jj row of a block */
#define Q4_BLOCK (4 * Q4_ROW)           /* weight bytes per block and group */
#define Q4_RECORD (Q4_BLOCK + 2 * Q4_COLS * 4) /* bytes per block and group: weights, scales, mins */
#define Q4_ROWS 2 /* activation rows per tile: the broadcasts are shared by the chunk's vectors */
/* Tiles and strips ask for the weights this many groups ahead: in decode they come from memory
 * once per step, and with the prefetch one row ran 1.07-1.2x faster, 9-64 rows 1.03-1.06x
 * (docs/performance.md, "int4 matmul"). */
#define Q4_AHEAD 8

/* The int4 and int8 kernels' vector (vi: integers, vf: floats): 16 columns in a 512-bit register
 * with AVX-512 (BW and VNNI), else 8 in a 256-bit one. The wide form halves the instructions per
 * weight, which is what bounds the kernels once several rows share each weight load
 * (docs/performance.md, "int4 matmul"). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VLANES 16
#define Q4_DOT32 1 /* int32 sums */
typedef __m512i vi;
typedef __m512 vf;
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_and _mm512_and_si512
#define vi_srli16 _mm512_srli_epi16
#define vi_set1_8 _mm512_set1_epi8
#define vi_set1_32 _mm512_set1_epi32
#define vi_zero _mm512_setzero_si512
#define vi_dot(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_set1 _mm512_set1_ps
#define vf_zero _mm512_setzero_ps
#define vf_mul _mm512_mul_ps
#define vf_fmadd _mm512_fmadd_ps
#define q4_sums_to_float(d) _mm512_cvtepi32_ps(d)
#define vi_to_float _mm512_cvtepi32_ps
#define VPIN "+v" /* any of the 32 vector registers */
#elif defined(__AVX2__)
#define VLANES 8
typedef __m256i vi;
typedef __m256 vf;
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_and _mm256_and_si256
#define vi_srli16 _mm256_srli_epi16
#define vi_set1_8 _mm256_set1_epi8
#define vi_set1_32 _mm256_set1_epi32
#define vi_zero _mm256_setzero_si256
#ifdef Q4_VNNI
#define Q4_DOT32 1
#define vi_dot(acc, u, s) dpbusd(acc, u, s)
#define q4_sums_to_float(d) _mm256_cvtepi32_ps(d)
#else /* int16 sums of products pairs; a madd by ones adds the pairs up at the end of the group */
#define vi_dot(acc, u, s) _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s))
#define q4_sums_to_float(d) _mm256_cvtepi32_ps(_mm256_madd_epi16(d, _mm256_set1_epi16(1)))
#endif
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_set1 _mm256_set1_ps
#define vf_zero _mm256_setzero_ps
#define vf_mul _mm256_mul_ps
#define vf_fmadd _mm256_fmadd_ps
#define vi_to_float _mm256_cvtepi32_ps
#define VPIN "+x"
#endif

#ifdef VLANES
#define Q4_UNITS (Q4_CHUNK * Q4_COLS / VLANES) /* vectors per chunk row */
/* Byte offset of vector u (VLANES columns) within a group's weight rows: whole blocks, then
 * the half of one. */
static inline int64_t q4_unit_at(int u) {
    return (int64_t)(u * VLANES / Q4_COLS) * Q4_BLOCK + (int64_t)(u * VLANES % Q4_COLS) * 4;
}
#endif

#ifndef VLANES
/* Column j of one block's 256 group bytes against the group's 32 int8 activations (portable path). */
static int32_t q4_column_dot(const uint8_t *b, int j, const int8_t *xp) {
    int32_t d = 0;
    for (int jj = 0; jj < 4; jj++)
        for (int i = 0; i < 4; i++) {
            uint8_t byte = b[jj * Q4_ROW + j * 4 + i];
            d += (byte & 15) * xp[jj * 4 + i] + (byte >> 4) * xp[16 + jj * 4 + i];
        }
    return d;
}

/* out[r, 0..cols) for R rows of a chunk (portable path). */
static void q4_columns(int R, int cols, const int8_t *xq, int64_t K, const float *xs, const float *xsum,
                       int64_t G, const uint8_t *w, const float *sp, const float *mp, int64_t record, float *out,
                       int64_t ldo) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < cols; j++) {
            float total = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *block = w + g * record + (j / Q4_COLS) * Q4_BLOCK;
                int32_t d = q4_column_dot(block, j % Q4_COLS, xq + r * K + g * Q4_GROUP);
                const float *sg = (const float *)((const uint8_t *)sp + g * record);
                const float *mg = (const float *)((const uint8_t *)mp + g * record);
                total += (float)d * sg[j] * xs[r * G + g] + mg[j] * xsum[r * G + g];
            }
            out[r * ldo + j] = total;
        }
}
#endif

/* out[r, 0..U vectors) for R rows and the chunk's first U vectors. Products of 4-bit q (0..15)
 * and int8 x (|x| <= 127) fit int16 for a whole group: 16 per lane, at most 16 * 15 * 127 = 30480.
 * (Splitting each vector's sums into two or four independent chains measured no faster at one
 * row: the weights' stream from memory bounds it there.) */
#ifdef VLANES
static inline __attribute__((always_inline)) void q4_tile(
    const int R, const int U, const int8_t *xq, int64_t K, const float *xs, const float *xsum, int64_t G,
    const uint8_t *chunk, int64_t record, int64_t C, float *out, int64_t ldo) {
    const vi low4 = vi_set1_8(0x0F);
    vf acc[Q4_ROWS][Q4_UNITS];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < U; u++) acc[r][u] = vf_zero();
    for (int64_t g = 0; g < G; g++) {
        vi dot[Q4_ROWS][Q4_UNITS];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) dot[r][u] = vi_zero();
        const uint8_t *wp = chunk + g * record;
        const float *sp = (const float *)(wp + C * Q4_BLOCK), *mp = sp + C * Q4_COLS;
        for (int64_t line = 0; line < record; line += 64) /* see Q4_AHEAD */
            _mm_prefetch((const char *)(wp + Q4_AHEAD * record + line), _MM_HINT_T0);
        for (int jj = 0; jj < 4; jj++) {
            vi lo[Q4_UNITS], hi[Q4_UNITS];
            for (int u = 0; u < U; u++) {
                vi raw = vi_load(wp + q4_unit_at(u) + jj * Q4_ROW);
                lo[u] = vi_and(raw, low4);
                hi[u] = vi_and(vi_srli16(raw, 4), low4);
            }
            for (int r = 0; r < R; r++) {
                const int8_t *xp = xq + r * K + g * Q4_GROUP + jj * 4;
                int32_t quad_lo, quad_hi;
                memcpy(&quad_lo, xp, 4);
                memcpy(&quad_hi, xp + 16, 4);
                vi xl = vi_set1_32(quad_lo), xh = vi_set1_32(quad_hi);
                for (int u = 0; u < U; u++) dot[r][u] = vi_dot(vi_dot(dot[r][u], lo[u], xl), hi[u], xh);
            }
        }
        for (int u = 0; u < U; u++) {
            vf sv = vf_load(sp + u * VLANES), mv = vf_load(mp + u * VLANES);
            for (int r = 0; r < R; r++) {
                vf d = q4_sums_to_float(dot[r][u]);
                acc[r][u] = vf_fmadd(d, vf_mul(sv, vf_set1(xs[r * G + g])), acc[r][u]);
                acc[r][u] = vf_fmadd(mv, vf_set1(xsum[r * G + g]), acc[r][u]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < U; u++) vf_store(out + r * ldo + u * VLANES, acc[r][u]);
}

/* Constant R and U let the compiler keep the tile in registers; the tails take the smaller ones. */
static void q4_tile_any(int R, int U, const int8_t *xq, int64_t K, const float *xs, const float *xsum, int64_t G,
                        const uint8_t *chunk, int64_t record, int64_t C, float *out, int64_t ldo) {
#define Q4_CASE(r, u) \
    if (R == r && U == u) return q4_tile(r, u, xq, K, xs, xsum, G, chunk, record, C, out, ldo)
    Q4_CASE(2, Q4_UNITS); Q4_CASE(1, Q4_UNITS);
#if Q4_UNITS > 2
    Q4_CASE(2, 3); Q4_CASE(1, 3); Q4_CASE(2, 2); Q4_CASE(1, 2);
#endif
    Q4_CASE(2, 1); Q4_CASE(1, 1);
#undef Q4_CASE
}
#endif

/* out[r, 0..NB vectors) for R rows of NB adjacent vectors over all G groups, from Q4_STRIP_FROM
 * rows on: the strip keeps its R x NB group sums in registers, each unpacked weight vector serves
 * R rows, and each activation quad, broadcast straight from memory, serves NB vectors.
 * With 16 registers (AVX2), three rows of two vectors fill 15 (6 sums, 6 float accumulators, 2
 * weight vectors, a broadcast) and need half the broadcasts of the five rows of one vector they
 * replaced; larger strips spill. AVX-512's 32 registers hold six rows, but strips of six ran
 * 6-21% slower than strips of four from 12 to 64 rows: one strip takes up to five rows, and more
 * rows go in strips of at most four. Below 3 rows the tile wins: its one sequential pass over each
 * chunk's record matters more while the weights come from memory. The shapes tried and their
 * timings: docs/performance.md, "int4 matmul". */
#if VLANES == 16
#define Q4_STRIP 5
#define Q4_STRIP_MANY 4
#else
#define Q4_STRIP 3
#define Q4_STRIP_MANY 3
#endif
#define Q4_STRIP_FROM 3
#ifdef VLANES
static inline __attribute__((always_inline)) void q4_strip(
    const int R, const int NB, const int8_t *xq, int64_t K, const float *xs, const float *xsum, int64_t G,
    const uint8_t *w, const float *sp, const float *mp, int64_t record, float *out, int64_t ldo) {
    const vi low4 = vi_set1_8(0x0F);
    const int64_t step = record / (int64_t)sizeof(float);
    vf acc[Q4_STRIP][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NB; c++) acc[r][c] = vf_zero();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *wp = w + g * record;
        for (int c = 0; c < NB; c++)
            for (int line = 0; line < Q4_BLOCK; line += 64)
                _mm_prefetch((const char *)(wp + Q4_AHEAD * record + q4_unit_at(c) + line), _MM_HINT_T0);
        vi dot[Q4_STRIP][2];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < NB; c++) dot[r][c] = vi_zero();
        for (int jj = 0; jj < 4; jj++)
            for (int high = 0; high < 2; high++) { /* low nibbles: k = 4jj..; high ones: k + 16 */
                vi wv[2];
                for (int c = 0; c < NB; c++) {
                    vi raw = vi_load(wp + q4_unit_at(c) + jj * Q4_ROW);
                    wv[c] = vi_and(high ? vi_srli16(raw, 4) : raw, low4);
                }
                for (int r = 0; r < R; r++) {
                    int32_t quad;
                    memcpy(&quad, xq + r * K + g * Q4_GROUP + jj * 4 + high * 16, 4);
                    vi x4 = vi_set1_32(quad);
                    for (int c = 0; c < NB; c++) {
                        dot[r][c] = vi_dot(dot[r][c], wv[c], x4);
                        /* Without this gcc 12 reassociates the sums into all the products first
                         * and spills them to the stack (docs/performance.md, "int4 matmul"). */
                        __asm__("" : VPIN(dot[r][c]));
                    }
                }
            }
        for (int c = 0; c < NB; c++) {
            vf sv = vf_load(sp + g * step + c * VLANES), mv = vf_load(mp + g * step + c * VLANES);
            for (int r = 0; r < R; r++) {
                vf d = q4_sums_to_float(dot[r][c]);
                acc[r][c] = vf_fmadd(d, vf_mul(sv, vf_set1(xs[r * G + g])), acc[r][c]);
                acc[r][c] = vf_fmadd(mv, vf_set1(xsum[r * G + g]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NB; c++) vf_store(out + r * ldo + c * VLANES, acc[r][c]);
}

/* Constant R and NB let the compiler keep the strip in registers. */
static void q4_strip_any(int R, int NB, const int8_t *xq, int64_t K, const float *xs, const float *xsum, int64_t G,
                         const uint8_t *w, const float *sp, const float *mp, int64_t record, float *out, int64_t ldo) {
#define Q4_STRIP_CASE(r, nb) \
    if (R == r && NB == nb) return q4_strip(r, nb, xq, K, xs, xsum, G, w, sp, mp, record, out, ldo)
#if Q4_STRIP >= 6
    Q4_STRIP_CASE(6, 2); Q4_STRIP_CASE(6, 1);
#endif
#if Q4_STRIP >= 5
    Q4_STRIP_CASE(5, 2); Q4_STRIP_CASE(5, 1);
#endif
#if Q4_STRIP >= 4
    Q4_STRIP_CASE(4, 2); Q4_STRIP_CASE(4, 1);
#endif
    Q4_STRIP_CASE(3, 2); Q4_STRIP_CASE(2, 2); Q4_STRIP_CASE(1, 2);
    Q4_STRIP_CASE(3, 1); Q4_STRIP_CASE(2, 1); Q4_STRIP_CASE(1, 1);
#undef Q4_STRIP_CASE
}
#endif

/* The first `cols` columns of R rows from `padded` (rows `ld` apart) into out (rows `ldo` apart):
 * a chunk's columns past N were computed into `padded`, as whole vectors. */
#ifdef VLANES
static void copy_rows(float *out, int64_t ldo, const float *padded, int64_t ld, int R, int64_t cols) {
    for (int r = 0; r < R; r++) memcpy(out + r * ldo, padded + r * ld, sizeof(float) * (size_t)cols);
}
#endif

/* R rows x the chunk's columns [0, width) by strips of two vectors (tiles when `tile`); columns
 * past N go through `padded` alone. */
static void q4_rows(int tile, int R, int64_t C, const int8_t *xq, int64_t K, const float *xs, const float *xsum,
                    int64_t G, const uint8_t *chunk, int64_t width, float *out, int64_t ldo, float *padded) {
    int64_t record = C * Q4_RECORD;
    const float *sp = (const float *)(chunk + C * Q4_BLOCK), *mp = sp + C * Q4_COLS;
#ifdef VLANES
    int units = (int)(C * Q4_COLS / VLANES);
    if (tile) {
        int whole = width == C * Q4_COLS;
        q4_tile_any(R, units, xq, K, xs, xsum, G, chunk, record, C, whole ? out : padded, whole ? ldo : C * Q4_COLS);
        if (!whole) copy_rows(out, ldo, padded, C * Q4_COLS, R, width);
        return;
    }
    for (int u = 0; u < units && (int64_t)u * VLANES < width;) { /* a vector wholly past N: none */
        int64_t n = (int64_t)u * VLANES;
        int NB = u + 2 <= units && n + 2 * VLANES <= width ? 2 : 1, whole = n + VLANES <= width;
        q4_strip_any(R, NB, xq, K, xs, xsum, G, chunk + q4_unit_at(u), sp + n, mp + n, record,
                     whole ? out + n : padded, whole ? ldo : VLANES);
        if (!whole) copy_rows(out + n, ldo, padded, VLANES, R, width - n);
        u += NB;
    }
#else
    (void)tile;
    (void)padded;
    q4_columns(R, (int)width, xq, K, xs, xsum, G, chunk, sp, mp, record, out, ldo);
#endif
}

/* Rows [m0, m1) of one chunk (C blocks from block b); the bias is added here too. */
static void q4_chunk(const int8_t *xq, const float *xs, const float *xsum, int64_t m0, int64_t m1, int64_t K,
                     const uint8_t *wq, int64_t b, int64_t C, int64_t N, const float *bias, float *out) {
    int64_t G = K / Q4_GROUP, n0 = b * Q4_COLS, width = N - n0 < C * Q4_COLS ? N - n0 : C * Q4_COLS;
    const uint8_t *chunk = wq + b * G * Q4_RECORD;
    float padded[Q4_STRIP * Q4_CHUNK * Q4_COLS]; /* the last chunk when N is not a whole block */
    int64_t rows = m1 - m0;
    int tile = rows < Q4_STRIP_FROM, most = tile ? Q4_ROWS : rows <= Q4_STRIP ? Q4_STRIP : Q4_STRIP_MANY;
    int64_t passes = (rows + most - 1) / most; /* rows spread evenly: 9 rows by 4 go 3 + 3 + 3 */
    for (int64_t i = 0, m = m0; i < passes; i++) {
        int R = (int)(rows * (i + 1) / passes - (m - m0));
        q4_rows(tile, R, C, xq + m * K, K, xs + m * G, xsum + m * G, G, chunk, width, out + m * N + n0, N, padded);
        m += R;
    }
    if (bias)
        for (int64_t m = m0; m < m1; m++)
            for (int64_t n = n0; n < n0 + width; n++) out[m * N + n] += bias[n];
}

/* Rows per pass over the weights: a pass's int8 activations (Q4_MBLOCK x K bytes) stay in L2
 * while each chunk's weights stream by (docs/performance.md, "int4 matmul"). */
#define Q4_MBLOCK 256

void q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *wq, int64_t N, const float *bias, float *out,
               int nthreads) {
    int64_t G = K / Q4_GROUP, blocks = (N + Q4_COLS - 1) / Q4_COLS;
    int64_t chunks = (blocks + Q4_CHUNK - 1) / Q4_CHUNK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(2 * M * G)), *xsum = xs + M * G;
    quantize_groups(x, M, K, xq, xs, xsum, nthreads);
    for (int64_t m0 = 0; m0 < M; m0 += Q4_MBLOCK) {
        int64_t m1 = M - m0 < Q4_MBLOCK ? M : m0 + Q4_MBLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t ch = 0; ch < chunks; ch++) {
            int64_t b = ch * Q4_CHUNK;
            q4_chunk(xq, xs, xsum, m0, m1, K, wq, b, blocks - b < Q4_CHUNK ? blocks - b : Q4_CHUNK, N, bias, out);
        }
    }
    free(xq);
    free(xs);
}

/* Activations for the int8 kernel: each 32-wide group of each row as int16 with one scale
 * (x ~= xq * xs, xs = max|x| / 32767), an error of at most 2^-16 of the group's largest value. */
static void quantize_groups16(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs, int nthreads) {
    int64_t G = K / Q8_GROUP;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * G >= 1024)
    for (int64_t i = 0; i < M * G; i++) {
        const float *p = x + i * Q8_GROUP;
        int16_t *q = xq + i * Q8_GROUP;
        float amax;
#ifdef __AVX2__
        __m256i r[4];
        amax = round_group(p, 32767.f, r);
        /* packs works within 128-bit lanes; the 64-bit permute puts the halves back in order */
        __m256i a = _mm256_packs_epi32(r[0], r[1]), b = _mm256_packs_epi32(r[2], r[3]);
        _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(a, 0xD8));
        _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute4x64_epi64(b, 0xD8));
#else
        int32_t r[Q8_GROUP];
        amax = round_group(p, 32767.f, r);
        for (int j = 0; j < Q8_GROUP; j++) q[j] = (int16_t)r[j];
#endif
        xs[i] = amax / 32767.f;
    }
}

/* The int8 weight (w = q * scale, a scale per output column and group of 32; a per-channel
 * weight repeats its scale in every group) in panels of Q8_COLS = 16 output columns: for panel p
 * and group g one record of 16 k-pairs x 32 bytes, pair j holding q[16p + c, 32g + 2j + i] at
 * byte 2c + i, then the 16 columns' float scales. Panels go in chunks of Q8_CHUNK (the last may be
 * short, C panels), a chunk group by group: its C records of group 0, then of group 1, ... so each
 * task reads one sequential stream, prefetched Q8_AHEAD groups ahead: at batch 1 the LM head's
 * 32 MB come from memory every step, and without the prefetch it read them slower than the
 * float-activation row kernel it replaced (docs/performance.md, "int8 matmul").
 * Widened to int16, a pair row meets an activation pair broadcast to all lanes in one multiply-add
 * of int16 pairs into int32 (`vpdpwssd` with VNNI, `vpmaddwd` and an add without): exact int32
 * sums (|sum| <= 32 * 127 * 32767 < 2^31 over a group), 2 multiply-adds a lane where a float FMA
 * does 1. It beats float32 F.linear at every batch size, so no float copy is kept
 * (docs/performance.md, "int8 matmul"; `python -m nanoinfer.bench.kernels`). As for int4, a
 * vector is a whole panel row with AVX-512 and half of one (8 columns) without; every build gives
 * the same integers. N is padded to a whole panel. */
#define Q8_COLS 16
#define Q8_PAIRS_BYTES (16 * 2 * Q8_COLS)  /* a record's weight bytes */
#define Q8_RECORD (Q8_PAIRS_BYTES + Q8_COLS * 4)
#define Q8_CHUNK 2  /* panels per task: 32 columns */
#define Q8_AHEAD 3  /* groups */
#if defined(VLANES) && VLANES == 16
#define Q8_STRIP 6  /* rows per strip, two vectors wide */
#else
#define Q8_STRIP 3  /* 6 int32 sums, 6 float sums, 2 weights, 1 pair: 15 of 16 registers */
#endif

#ifdef VLANES
#if VLANES == 16
#define q8_widen(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define q8_dot(acc, w, x) _mm512_dpwssd_epi32(acc, w, x)
#else
#define q8_widen(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define q8_dot(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#endif
/* Byte offset of vector u's pair row 0 (VLANES columns) and of its scales within a chunk's
 * group: whole panels, then the half of one. */
static inline int64_t q8_unit_at(int u) {
    return (int64_t)(u * VLANES / Q8_COLS) * Q8_RECORD + (int64_t)(u * VLANES % Q8_COLS) * 2;
}
static inline int64_t q8_scales_at(int u) {
    return (int64_t)(u * VLANES / Q8_COLS) * Q8_RECORD + Q8_PAIRS_BYTES + (int64_t)(u * VLANES % Q8_COLS) * 4;
}
#else
static int32_t q8_column_dot(const uint8_t *rec, int c, const int16_t *xp) {
    const int8_t *w = (const int8_t *)rec;
    int32_t d = 0;
    for (int j = 0; j < 16; j++)
        d += w[j * 2 * Q8_COLS + 2 * c] * xp[2 * j] + w[j * 2 * Q8_COLS + 2 * c + 1] * xp[2 * j + 1];
    return d;
}
#endif

/* out[r, 0..NB vectors) for R rows and NB adjacent vectors from vector u over all G groups. */
#ifdef VLANES
static inline __attribute__((always_inline)) void q8_strip(
    const int R, const int NB, const int16_t *xq, int64_t K, const float *xs, int64_t G, const uint8_t *w, int u,
    int64_t gstride, float *out, int64_t ldo) {
    vf acc[Q8_STRIP][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NB; c++) acc[r][c] = vf_zero();
    for (int64_t g = 0; g < G; g++) {
        vi dot[Q8_STRIP][2];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < NB; c++) dot[r][c] = vi_zero();
        for (int c = 0; c < NB; c++)
            for (int line = 0; line < Q8_RECORD; line += 64)
                _mm_prefetch((const char *)(w + (g + Q8_AHEAD) * gstride + q8_unit_at(u + c) + line), _MM_HINT_T0);
        for (int j = 0; j < 16; j++) {
            vi wv[2];
            for (int c = 0; c < NB; c++) wv[c] = q8_widen(w + g * gstride + q8_unit_at(u + c) + j * 2 * Q8_COLS);
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, xq + r * K + g * Q8_GROUP + 2 * j, 4);
                vi xp = vi_set1_32(pair);
                for (int c = 0; c < NB; c++) {
                    dot[r][c] = q8_dot(dot[r][c], wv[c], xp);
                    __asm__("" : VPIN(dot[r][c])); /* as in q4_strip */
                }
            }
        }
        for (int c = 0; c < NB; c++) {
            vf sv = vf_load((const float *)(w + g * gstride + q8_scales_at(u + c)));
            for (int r = 0; r < R; r++)
                acc[r][c] = vf_fmadd(vi_to_float(dot[r][c]), vf_mul(sv, vf_set1(xs[r * G + g])), acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NB; c++) vf_store(out + r * ldo + c * VLANES, acc[r][c]);
}

/* Constant R and NB let the compiler keep the strip in registers. */
static void q8_strip_any(int R, int NB, const int16_t *xq, int64_t K, const float *xs, int64_t G, const uint8_t *w,
                         int u, int64_t gstride, float *out, int64_t ldo) {
#define Q8_STRIP_CASE(r, nb) \
    if (R == r && NB == nb) return q8_strip(r, nb, xq, K, xs, G, w, u, gstride, out, ldo)
#if Q8_STRIP >= 6
    Q8_STRIP_CASE(6, 2); Q8_STRIP_CASE(6, 1); Q8_STRIP_CASE(5, 2); Q8_STRIP_CASE(5, 1);
    Q8_STRIP_CASE(4, 2); Q8_STRIP_CASE(4, 1);
#endif
    Q8_STRIP_CASE(3, 2); Q8_STRIP_CASE(2, 2); Q8_STRIP_CASE(1, 2);
    Q8_STRIP_CASE(3, 1); Q8_STRIP_CASE(2, 1); Q8_STRIP_CASE(1, 1);
#undef Q8_STRIP_CASE
}
#endif

/* R rows x the chunk's columns [0, width): strips of two vectors; columns past N go through
 * `padded` alone. */
static void q8_rows(int R, int64_t C, const int16_t *xq, int64_t K, const float *xs, int64_t G, const uint8_t *chunk,
                    int64_t width, float *out, int64_t ldo, float *padded) {
    int64_t gstride = C * Q8_RECORD;
#ifdef VLANES
    int units = (int)(C * Q8_COLS / VLANES);
    for (int u = 0; u < units && (int64_t)u * VLANES < width;) { /* a vector wholly past N: none */
        int64_t n = (int64_t)u * VLANES;
        int NB = u + 2 <= units && n + 2 * VLANES <= width ? 2 : 1, whole = n + VLANES <= width;
        q8_strip_any(R, NB, xq, K, xs, G, chunk, u, gstride, whole ? out + n : padded, whole ? ldo : VLANES);
        if (!whole) copy_rows(out + n, ldo, padded, VLANES, R, width - n);
        u += NB;
    }
#else
    (void)padded;
    for (int r = 0; r < R; r++)
        for (int64_t j = 0; j < width; j++) {
            float total = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *rec = chunk + g * gstride + (j / Q8_COLS) * Q8_RECORD;
                total += (float)q8_column_dot(rec, (int)(j % Q8_COLS), xq + r * K + g * Q8_GROUP) *
                         ((const float *)(rec + Q8_PAIRS_BYTES))[j % Q8_COLS] * xs[r * G + g];
            }
            out[r * ldo + j] = total;
        }
#endif
}

/* Rows [m0, m1) of the chunk of panels [p0, p1), the rows spread evenly over the strips; the bias
 * is added here. */
static void q8_chunk(const int16_t *xq, const float *xs, int64_t m0, int64_t m1, int64_t K, const uint8_t *wq,
                     int64_t p0, int64_t p1, int64_t N, const float *bias, float *out) {
    int64_t G = K / Q8_GROUP, n0 = p0 * Q8_COLS, width = N - n0 < (p1 - p0) * Q8_COLS ? N - n0 : (p1 - p0) * Q8_COLS;
    const uint8_t *chunk = wq + p0 * G * Q8_RECORD;
    float padded[Q8_STRIP * Q8_COLS];
    int64_t passes = (m1 - m0 + Q8_STRIP - 1) / Q8_STRIP;
    for (int64_t i = 0, m = m0; i < passes; i++) {
        int R = (int)((m1 - m0) * (i + 1) / passes - (m - m0));
        q8_rows(R, p1 - p0, xq + m * K, K, xs + m * G, G, chunk, width, out + m * N + n0, N, padded);
        m += R;
    }
    if (bias)
        for (int64_t m = m0; m < m1; m++)
            for (int64_t n = n0; n < n0 + width; n++) out[m * N + n] += bias[n];
}

void q8_matmul(const float *x, int64_t M, int64_t K, const uint8_t *wq, int64_t N, const float *bias, float *out,
               int nthreads) {
    int64_t G = K / Q8_GROUP, panels = (N + Q8_COLS - 1) / Q8_COLS, chunks = (panels + Q8_CHUNK - 1) / Q8_CHUNK;
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * G));
    quantize_groups16(x, M, K, xq, xs, nthreads);
    for (int64_t m0 = 0; m0 < M; m0 += Q4_MBLOCK) { /* as q4_matmul: a pass's activations stay in L2 */
        int64_t m1 = M - m0 < Q4_MBLOCK ? M : m0 + Q4_MBLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t ch = 0; ch < chunks; ch++) {
            int64_t p0 = ch * Q8_CHUNK, p1 = p0 + Q8_CHUNK < panels ? p0 + Q8_CHUNK : panels;
            q8_chunk(xq, xs, m0, m1, K, wq, p0, p1, N, bias, out);
        }
    }
    free(xq);
    free(xs);
}

/* bfloat16 is the top half of a float32, so widening is a 16-bit shift and loses nothing. */
#ifdef __AVX2__
static inline __m256 bf16x8(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
#endif
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

static void bf16_row4(const float *x, int64_t K, const uint16_t *w, float out[4]) {
    int64_t k = 0;
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv = bf16x8(w + k);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + K + k), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 2 * K + k), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 3 * K + k), a3);
    }
    t0 = hsum256(a0), t1 = hsum256(a1), t2 = hsum256(a2), t3 = hsum256(a3);
#endif
    for (; k < K; k++) {
        float wk = bf16_to_f32(w[k]);
        t0 += wk * x[k], t1 += wk * x[K + k], t2 += wk * x[2 * K + k], t3 += wk * x[3 * K + k];
    }
    out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
}

static float bf16_row1(const float *xp, int64_t K, const uint16_t *w) {
    float total = 0.f;
    int64_t k = 0;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        acc0 = _mm256_fmadd_ps(bf16x8(w + k), _mm256_loadu_ps(xp + k), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8(w + k + 8), _mm256_loadu_ps(xp + k + 8), acc1);
    }
    total = hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; k < K; k++) total += bf16_to_f32(w[k]) * xp[k];
    return total;
}

void bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *wb, int64_t N, const float *bias, float *out,
                 int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *w = wb + n * K;
        float b = bias ? bias[n] : 0.f, t[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            bf16_row4(x + m * K, K, w, t);
            for (int r = 0; r < 4; r++) out[(m + r) * N + n] = t[r] + b;
        }
        for (; m < M; m++) out[m * N + n] = bf16_row1(x + m * K, K, w) + b;
    }
}

/* Attention for one sequence and KV head, `nh` (<= ATT_HEADS) of its query heads at a time (their
 * queries D floats apart): each key and value row is loaded once for all of them (GQA).
 * rows[i] is key i's row of D elements in the cache (kv_row), looked up once per task; float32 or
 * half (`half`, a constant in each specialisation). */
#define ATT_HEADS 3

/* Keys and values sit in scattered blocks (one run per head and block) that the hardware
 * prefetchers do not follow from one to the next. Rows with a sequence of their own (decode)
 * stream it from memory, so their scores pass asks for the key (into L1) and value (into L2) rows
 * ATT_PREFETCH keys ahead. Prompt rows share their chunk's keys, warm in L2 after the first row,
 * where the extra instructions would only cost time (docs/performance.md, "Attention"). The
 * values pass prefetches 16 rows ahead either way. */
#define ATT_PREFETCH 16
static inline void prefetch_row(const void *p, int64_t bytes, int into_l1) {
    for (int64_t b = 0; b < bytes; b += 64) {
        if (into_l1) __builtin_prefetch((const char *)p + b, 0, 3);
        else __builtin_prefetch((const char *)p + b, 0, 2);
    }
}

/* s[h * n + i] = scale * q_h . key(i) for nh heads. */
static inline __attribute__((always_inline)) void attention_scores(
    const int nh, const int half, const float *q, const void *k_cache, const void *v_cache, const int64_t *rows,
    int64_t n, int64_t D, float scale, int prefetch, float *s) {
    int64_t i = 0;
#ifdef __AVX2__
    const int64_t row_bytes = D * (half ? 2 : 4);
    /* KB keys at a time, their sums per head reduced together. Three heads take three keys: 9 sums,
     * 3 queries and a key fit the 16 registers. With four (12 sums) gcc kept one sum in memory, a
     * store-load round trip in every step of the loop (docs/performance.md, "Attention"). */
    const int KB = nh == 3 ? 3 : 4;
    if (D % 8 == 0)
        for (; i + 4 <= n; i += KB) { /* i + 4: the stores below write four lanes */
            const void *key[4];
            __m256 acc[ATT_HEADS][4];
            for (int j = 0; j < KB; j++) key[j] = kv_at(k_cache, rows[i + j] * D, half);
            if (prefetch && i + ATT_PREFETCH + 4 <= n)
                for (int j = 0; j < KB; j++) {
                    prefetch_row(kv_at(k_cache, rows[i + ATT_PREFETCH + j] * D, half), row_bytes, 1);
                    prefetch_row(kv_at(v_cache, rows[i + ATT_PREFETCH + j] * D, half), row_bytes, 0);
                }
            for (int h = 0; h < nh; h++)
                for (int j = 0; j < 4; j++) acc[h][j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qv[ATT_HEADS];
                for (int h = 0; h < nh; h++) qv[h] = _mm256_loadu_ps(q + h * D + d);
                /* Left alone, gcc reloads the queries for every key, or folds a load of the key
                 * into each head's FMA: pin both in registers (docs/performance.md, "Attention"). */
                if (nh == 3) __asm__("" : "+x"(qv[0]), "+x"(qv[1]), "+x"(qv[2]));
                for (int j = 0; j < KB; j++) {
                    __m256 kv = kv_load8(key[j], d, half);
                    __asm__("" : "+x"(kv));
                    for (int h = 0; h < nh; h++) acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
                }
            }
            for (int h = 0; h < nh; h++) {
                __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
                __m128 sum = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                /* With three keys the fourth lane is junk, overwritten by the next group or the tail. */
                _mm_storeu_ps(s + h * n + i, _mm_mul_ps(sum, _mm_set1_ps(scale)));
            }
        }
    /* The last keys one at a time, still vectorized: the scalar loop below makes a short tail costly. */
    if (D % 8 == 0)
        for (; i < n; i++) {
            const void *key = kv_at(k_cache, rows[i] * D, half);
            __m256 acc[ATT_HEADS];
            for (int h = 0; h < nh; h++) acc[h] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 kv = kv_load8(key, d, half);
                for (int h = 0; h < nh; h++) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + d), kv, acc[h]);
            }
            for (int h = 0; h < nh; h++) s[h * n + i] = hsum256(acc[h]) * scale;
        }
#endif
    for (; i < n; i++) {
        const void *key = kv_at(k_cache, rows[i] * D, half);
        for (int h = 0; h < nh; h++) {
            float total = 0.f;
            for (int64_t d = 0; d < D; d++) total += q[h * D + d] * kv_get(key, d, half);
            s[h * n + i] = total * scale;
        }
    }
}

/* s <- exp(s - max(s)) over n entries; returns 1 / sum, which the values pass applies. */
static float softmax_unnormalized(float *s, int64_t n) {
    float mx = -INFINITY, total = 0.f;
    int64_t i = 0;
#ifdef __AVX2__
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    i = 0;
#ifdef __AVX2__
    __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    total = hsum256(acc);
#endif
    for (; i < n; i++) total += (s[i] = expf(s[i] - mx));
    return 1.f / total;
}

/* out_h = inv[h] * sum_i p[h * n + i] * value(i) for nh heads (outputs D floats apart), 32 dims at
 * a time so the nh x 4 accumulators stay in registers. */
static inline __attribute__((always_inline)) void attention_values(
    const int nh, const int half, const float *p, const float *inv, const void *v_cache, const int64_t *rows,
    int64_t n, int64_t D, float *out) {
    int64_t d0 = 0;
#ifdef __AVX2__
    for (; d0 + 32 <= D; d0 += 32) {
        __m256 acc[ATT_HEADS][4];
        for (int h = 0; h < nh; h++)
            for (int c = 0; c < 4; c++) acc[h][c] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            const void *val = kv_at(v_cache, rows[i] * D + d0, half);
            if (d0 == 0 && i + 16 < n) prefetch_row(kv_at(v_cache, rows[i + 16] * D, half), D * (half ? 2 : 4), 1);
            __m256 w[ATT_HEADS];
            for (int h = 0; h < nh; h++) w[h] = _mm256_broadcast_ss(p + h * n + i);
            for (int c = 0; c < 4; c++) {
                __m256 v = kv_load8(val, 8 * c, half);
                __asm__("" : "+x"(v));
                for (int h = 0; h < nh; h++) acc[h][c] = _mm256_fmadd_ps(w[h], v, acc[h][c]);
            }
        }
        for (int h = 0; h < nh; h++)
            for (int c = 0; c < 4; c++)
                _mm256_storeu_ps(out + h * D + d0 + 8 * c, _mm256_mul_ps(acc[h][c], _mm256_set1_ps(inv[h])));
    }
#endif
    for (int h = 0; h < nh && d0 < D; h++) {
        float *o = out + h * D;
        for (int64_t d = d0; d < D; d++) o[d] = 0.f;
        for (int64_t i = 0; i < n; i++) {
            const void *val = kv_at(v_cache, rows[i] * D, half);
            float w = p[h * n + i];
            for (int64_t d = d0; d < D; d++) o[d] += w * kv_get(val, d, half);
        }
        for (int64_t d = d0; d < D; d++) o[d] *= inv[h];
    }
}

/* Constant head counts and storage let the compiler keep the accumulators in registers. */
static void attention_heads(int nh, int half, const float *q, const void *k_cache, const void *v_cache,
                            const int64_t *rows, int64_t n, int64_t D, float scale, int prefetch,
                            float *s, float *out) {
#define ATT_CASE(c, hf)                                                                   \
    if (nh == c && half == hf) {                                                          \
        float inv[c];                                                                     \
        attention_scores(c, hf, q, k_cache, v_cache, rows, n, D, scale, prefetch, s);   \
        for (int h = 0; h < c; h++) inv[h] = softmax_unnormalized(s + h * n, n);          \
        attention_values(c, hf, s, inv, v_cache, rows, n, D, out);                     \
        return;                                                                           \
    }
    ATT_CASE(3, 0) ATT_CASE(2, 0) ATT_CASE(1, 0) ATT_CASE(3, 1) ATT_CASE(2, 1) ATT_CASE(1, 1)
#undef ATT_CASE
}

/* Attention of B query rows against their sequences' K/V, read in place from the paged cache.
 * q: B rows q_stride floats apart, each H heads of D; out: [B, H, D]; caches: [blocks, KVH,
 * block_size, D] (see kv_row), float32 or half (kv_half); block_tables: [S, max_blocks];
 * row b reads table row_table[b] (row b itself when row_table is NULL) and the first ctx_lens[b]
 * keys of it, its own token the last of them: decode rows and the rows of a prompt alike (causal
 * by construction). window > 0 keeps only the last `window` keys. */
void paged_attention(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_half,
                     const int64_t *block_tables, int64_t max_blocks, const int64_t *row_table,
                     const int64_t *ctx_lens, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size,
                     int64_t window, float scale, float *out, int nthreads) {
    int64_t group = H / KVH;
    /* One task per row and KV head: its query heads share each K and V row read, and the
     * head's keys (values) of each block lie in one run of block_size rows. */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t task = 0; task < B * KVH; task++) {
        int64_t b = task / KVH, kvh = task % KVH;
        int64_t ctx = ctx_lens[b];
        int64_t first = (window > 0 && ctx > window) ? ctx - window : 0;
        int64_t n = ctx - first;
        const int64_t *table = block_tables + (row_table ? row_table[b] : b) * max_blocks;
        int64_t *krow = (int64_t *)malloc((sizeof(int64_t) + sizeof(float) * ATT_HEADS) * (size_t)n);
        float *scores = (float *)(krow + n);
        for (int64_t pos = first, i = 0; pos < ctx;) { /* one division per block, not per key */
            int64_t base = kv_row(table[pos / block_size] * block_size, kvh, KVH, block_size), off = pos % block_size;
            for (; off < block_size && pos < ctx; off++, pos++) krow[i++] = base + off;
        }
        for (int64_t h = kvh * group; h < (kvh + 1) * group; h += ATT_HEADS) {
            int nh = (kvh + 1) * group - h < ATT_HEADS ? (int)((kvh + 1) * group - h) : ATT_HEADS;
            attention_heads(nh, kv_half, q + b * q_stride + h * D, k_cache, v_cache, krow, n, D, scale,
                            row_table == NULL, scores, out + (b * H + h) * D);
        }
        free(krow);
    }
}

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for T rows of D floats (rows x_stride apart). */
void rms_norm(const float *x, int64_t T, int64_t D, int64_t x_stride, const float *w, float eps, float *out) {
#pragma omp parallel for if (T > 64)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * x_stride;
        float inv = 1.f / sqrtf(dot(xr, xr, D) / (float)D + eps);
        float *o = out + t * D;
        for (int64_t d = 0; d < D; d++) o[d] = xr[d] * inv * w[d];
    }
}

/* Rotate-half RoPE in place: for each of T tokens (rows row_stride floats apart) and each of
 * `heads` consecutive heads of D floats, x = x * cos + rotate_half(x) * sin with cos/sin [T, D]. */
void rope_rotate(float *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride, const float *cos_t,
                 const float *sin_t) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * D, *s = sin_t + t * D;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * row_stride + h * D;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* The per-layer work between the qkv projection and attention, for T tokens whose rows of
 * `row_stride` floats hold [q: H heads | k: KVH heads | v: KVH heads] of D floats each:
 * RMSNorm of q and k heads in place (when q_norm/k_norm are given), rotate-half RoPE of q and k
 * in place with cos/sin [T, D], then K and V copied to their cache slots (see kv_row). */
static void norm_head(float *v, int64_t D, const float *w, float eps) {
    float inv = 1.f / sqrtf(dot(v, v, D) / (float)D + eps);
    for (int64_t d = 0; d < D; d++) v[d] = v[d] * inv * w[d];
}

void qk_rope_store(float *qkv, int64_t T, int64_t row_stride, int64_t H, int64_t KVH, int64_t D,
                   const float *q_norm, const float *k_norm, float eps, const float *cos_t, const float *sin_t,
                   void *k_cache, void *v_cache, int kv_half, const int64_t *slots, int64_t block_size) {
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * row_stride;
        if (q_norm)
            for (int64_t h = 0; h < H; h++) norm_head(row + h * D, D, q_norm, eps);
        if (k_norm)
            for (int64_t h = H; h < H + KVH; h++) norm_head(row + h * D, D, k_norm, eps);
        rope_rotate(row, 1, H + KVH, D, 0, cos_t + t * D, sin_t + t * D);
        for (int64_t h = 0; h < KVH; h++) {
            int64_t at = kv_row(slots[t], h, KVH, block_size) * D;
            kv_put((void *)kv_at(k_cache, at, kv_half), row + (H + h) * D, D, kv_half);
            kv_put((void *)kv_at(v_cache, at, kv_half), row + (H + KVH + h) * D, D, kv_half);
        }
    }
}

/* out[t] = act(gate[t]) * up[t] from gate_up [T, 2I]; act = silu, or gelu-tanh when gelu != 0. */
void gated_act(const float *gate_up, int64_t T, int64_t I, int gelu, float *out, int nthreads) {
    /* Both are x * sigmoid(z): z = x for SiLU; gelu-tanh's 0.5 * (1 + tanh(y)) = sigmoid(2y). */
    const float c1 = 2.f * 0.7978845608f, c3 = c1 * 0.044715f;
#pragma omp parallel for num_threads(nthreads) if (T > 1)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        int64_t i = 0;
#ifdef __AVX2__
        const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
        for (; i + 8 <= I; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i), z = x;
            if (gelu) z = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(c3), _mm256_set1_ps(c1)));
            __m256 e = exp256(_mm256_xor_ps(z, sign));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) {
            float x = g[i], z = gelu ? x * (c1 + c3 * x * x) : x;
            o[i] = x / (1.f + expf(-z)) * u[i];
        }
    }
}

/* ---- tensor-parallel exchange through shared memory ------------------------------------------
 * Ranks on one host sum their partial outputs here instead of through gloo, whose small-message
 * all-reduce costs hundreds of microseconds and a decode step needs two per layer
 * (docs/performance.md, "Tensor parallelism"). The segment (made by nanoinfer/model/comm.py):
 * one 64-byte line per rank holding the count of exchanges it has published, an abort word, then
 * two buffers of `world` slots of `capacity` bytes. An exchange: copy into my slot of buffer
 * (step & 1), publish step, wait until every rank has, read. Two buffers suffice: a rank can
 * write step + 2 only after every rank published step + 1, which each does after reading step.
 * Every rank sums the slots in rank order, so all ranks get bit-identical results. */
typedef struct {
    int64_t rank, world, capacity;
    int64_t *flags; /* shared: flags[8 * r] is rank r's published step; flags[8 * world] is abort */
    char *data;     /* shared: 2 * world * capacity bytes */
    int64_t step;   /* this rank's exchanges so far */
    int64_t ns;     /* nanoseconds this rank has spent in exchanges (waiting included) */
} ShmGroup;

static inline void cpu_relax(void) {
#ifdef __AVX2__
    _mm_pause();
#endif
}

/* Spin briefly (the peer is usually a few microseconds behind), then yield, then nap for longer
 * and longer (up to 1 ms), so an idle rank waiting for the next step does not hold a core.
 * Returns -1 once the group is aborted. */
static int shm_wait_all(ShmGroup *g, int64_t step) {
    volatile int64_t *abort_word = g->flags + 8 * g->world;
    long nap_ns = 20000;
    for (int64_t r = 0; r < g->world; r++) {
        for (int64_t spins = 0; __atomic_load_n(g->flags + 8 * r, __ATOMIC_ACQUIRE) < step; spins++) {
            if (*abort_word) return -1;
            if (spins < 4096) {
                cpu_relax();
            } else if (spins < 32768) {
                sched_yield();
            } else {
                struct timespec nap = {0, nap_ns};
                nanosleep(&nap, NULL);
                nap_ns = nap_ns < 1000000 ? nap_ns * 2 : nap_ns;
            }
        }
    }
    return 0;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Publish nbytes (<= capacity) of src in this rank's slot and wait for every rank: the step's buffer, or NULL if aborted. */
static char *shm_exchange(ShmGroup *g, const void *src, int64_t nbytes) {
    int64_t step = ++g->step, start = now_ns();
    char *buf = g->data + (step & 1) * g->world * g->capacity;
    if (nbytes) memcpy(buf + g->rank * g->capacity, src, (size_t)nbytes);
    __atomic_store_n(g->flags + 8 * g->rank, step, __ATOMIC_RELEASE);
    int failed = shm_wait_all(g, step);
    g->ns += now_ns() - start;
    return failed ? NULL : buf;
}

/* x[n] = the sum over ranks of their x[n], in place. 0, or -1 if the group was aborted. */
int shm_all_reduce(ShmGroup *g, float *x, int64_t n) {
    int64_t per = g->capacity / (int64_t)sizeof(float);
    for (int64_t off = 0; off < n; off += per) {
        int64_t m = n - off < per ? n - off : per;
        const char *buf = shm_exchange(g, x + off, m * (int64_t)sizeof(float));
        if (!buf) return -1;
        float *out = x + off;
        for (int64_t i = 0; i < m; i++) out[i] = ((const float *)buf)[i];
        for (int64_t r = 1; r < g->world; r++) {
            const float *slot = (const float *)(buf + r * g->capacity);
            for (int64_t i = 0; i < m; i++) out[i] += slot[i];
        }
    }
    return 0;
}

/* out[world][nbytes] = every rank's nbytes of x, in rank order. */
int shm_all_gather(ShmGroup *g, const char *x, int64_t nbytes, char *out) {
    for (int64_t off = 0; off < nbytes || off == 0; off += g->capacity) {
        int64_t m = nbytes - off < g->capacity ? nbytes - off : g->capacity;
        const char *buf = shm_exchange(g, x + off, m);
        if (!buf) return -1;
        for (int64_t r = 0; r < g->world; r++) memcpy(out + r * nbytes + off, buf + r * g->capacity, (size_t)m);
        if (nbytes == 0) break;
    }
    return 0;
}

/* data[nbytes] = rank 0's data[nbytes] on every rank. */
int shm_broadcast(ShmGroup *g, char *data, int64_t nbytes) {
    for (int64_t off = 0; off < nbytes || off == 0; off += g->capacity) {
        int64_t m = nbytes - off < g->capacity ? nbytes - off : g->capacity;
        const char *buf = shm_exchange(g, data + off, g->rank == 0 ? m : 0);
        if (!buf) return -1;
        if (g->rank) memcpy(data + off, buf, (size_t)m);
        if (nbytes == 0) break;
    }
    return 0;
}

/* A whole decoder layer for M decode rows (pre-norm, no post-norms, int4 projections): the
 * ~15 calls a layer makes from Python become one, which at batch 1 is most of the step's time
 * outside the matmuls. Built from the kernels above; `x` [M, hidden] is updated in place. */
typedef struct {
    const uint8_t *w;
    const float *bias;
    int64_t n;
} Q4Weight;

/* A mixture-of-experts MLP as the fused stack runs it: softmax routing over `experts`, the top
 * `top_k` (renormalized when asked, times `scaling`), every expert an int4 gated MLP `inter` wide. */
typedef struct {
    int64_t experts, top_k, renormalize, inter;
    float scaling;
    const float *router;            /* [experts, hidden] float32 */
    const Q4Weight *gate_up, *down; /* [experts] each */
    int64_t *load;                  /* [experts]: tokens routed to each, for the metrics */
} DecodeMoE;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, window, gelu;
    float eps, scale;
    const float *input_norm, *mlp_norm, *q_norm, *k_norm;
    Q4Weight qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    const DecodeMoE *moe; /* NULL: a dense MLP (gate_up, down) */
} DecodeLayer;

typedef struct {
    const float *cos_t, *sin_t;
    const int64_t *slots, *block_tables, *ctx_lens;
    int64_t max_blocks, block_size, kv_half; /* kv_half: the caches hold IEEE half */
    ShmGroup *tp;                            /* tensor-parallel group, or NULL: one rank */
} DecodeStep;

static void q4_apply(const Q4Weight *w, const float *x, int64_t M, int64_t K, float *out, int nthreads) {
    q4_matmul(x, M, K, w->w, w->n, w->bias, out, nthreads);
}

void moe_experts(const Q4Weight *gate_up, const Q4Weight *down, int64_t E, const int64_t *counts, const float *x,
                 int64_t hidden, int64_t inter, int gelu, float *out, int nthreads);

/* Row m's top-k experts and their weights, as nanoinfer.model.moe.Router computes them for
 * softmax scoring: scores in float32, the k best (the lower id first among equal scores). */
static void moe_route(const DecodeMoE *E, const float *h, int64_t hid, float *scores, int64_t *ids, float *w) {
    float top = -INFINITY, sum = 0.f, chosen = 0.f;
    for (int64_t e = 0; e < E->experts; e++) {
        scores[e] = dot(h, E->router + e * hid, hid);
        top = scores[e] > top ? scores[e] : top;
    }
    for (int64_t e = 0; e < E->experts; e++) sum += scores[e] = expf(scores[e] - top);
    for (int64_t e = 0; e < E->experts; e++) scores[e] /= sum;
    for (int64_t j = 0; j < E->top_k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E->experts; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
        }
        ids[j] = best;
        w[j] = scores[best];
        chosen += scores[best];
    }
    for (int64_t j = 0; j < E->top_k; j++) w[j] = (E->renormalize ? w[j] / (chosen + 1e-20f) : w[j]) * E->scaling;
}

/* out[M, hid] = the MoE MLP of h: rows routed, grouped by expert (one call each), summed back in
 * expert order, as SparseMoE._grouped does. */
static void moe_mlp(const DecodeMoE *E, const float *h, int64_t M, int64_t hid, int gelu, float *out, int nthreads) {
    int64_t k = E->top_k, slots = M * k;
    int64_t *ids = (int64_t *)malloc(sizeof(int64_t) * (size_t)(slots * 2 + E->experts * 2));
    int64_t *order = ids + slots, *counts = order + slots, *next = counts + E->experts;
    float *w = (float *)malloc(sizeof(float) * (size_t)(slots + E->experts + 2 * slots * hid));
    float *scores = w + slots, *grouped = scores + E->experts, *res = grouped + slots * hid;
    memset(counts, 0, sizeof(int64_t) * (size_t)E->experts);
    for (int64_t m = 0; m < M; m++) {
        moe_route(E, h + m * hid, hid, scores, ids + m * k, w + m * k);
        for (int64_t j = 0; j < k; j++) counts[ids[m * k + j]]++;
    }
    for (int64_t e = 0, start = 0; e < E->experts; e++) {
        next[e] = start;
        start += counts[e];
        E->load[e] += counts[e];
    }
    for (int64_t s = 0; s < slots; s++) { /* stable: a row's slots in row order within each expert */
        int64_t at = next[ids[s]]++;
        order[at] = s;
        memcpy(grouped + at * hid, h + (s / k) * hid, sizeof(float) * (size_t)hid);
    }
    moe_experts(E->gate_up, E->down, E->experts, counts, grouped, hid, E->inter, gelu, res, nthreads);
    memset(out, 0, sizeof(float) * (size_t)(M * hid));
    for (int64_t at = 0; at < slots; at++) {
        int64_t s = order[at];
        float *row = out + (s / k) * hid;
        for (int64_t i = 0; i < hid; i++) row[i] += w[s] * res[at * hid + i];
    }
    free(ids);
    free(w);
}

/* 0, or -1 if the tensor-parallel group was aborted. */
int decode_layer(const DecodeLayer *L, const DecodeStep *S, float *x, int64_t M, int nthreads) {
    int64_t hid = L->hidden, qd = L->heads * L->head_dim;
    size_t floats = (size_t)(M * (hid + L->qkv.n + qd + L->gate_up.n + L->inter + hid));
    float *h = (float *)malloc(sizeof(float) * floats);
    float *qkv = h + M * hid, *att = qkv + M * L->qkv.n, *gu = att + M * qd, *act = gu + M * L->gate_up.n;
    float *tmp = act + M * L->inter;
    rms_norm(x, M, hid, hid, L->input_norm, L->eps, h);
    q4_apply(&L->qkv, h, M, hid, qkv, nthreads);
    qk_rope_store(qkv, M, L->qkv.n, L->heads, L->kv_heads, L->head_dim, L->q_norm, L->k_norm, L->eps, S->cos_t,
                  S->sin_t, L->k_cache, L->v_cache, (int)S->kv_half, S->slots, S->block_size);
    paged_attention(qkv, L->qkv.n, L->k_cache, L->v_cache, (int)S->kv_half, S->block_tables, S->max_blocks, NULL, S->ctx_lens, M,
                    L->heads, L->kv_heads, L->head_dim, S->block_size, L->window, L->scale, att, nthreads);
    q4_apply(&L->o, att, M, qd, tmp, nthreads);
    int failed = S->tp && shm_all_reduce(S->tp, tmp, M * hid);
    for (int64_t i = 0; i < M * hid; i++) x[i] += tmp[i];
    rms_norm(x, M, hid, hid, L->mlp_norm, L->eps, h);
    if (L->moe) {
        moe_mlp(L->moe, h, M, hid, (int)L->gelu, tmp, nthreads);
    } else {
        q4_apply(&L->gate_up, h, M, hid, gu, nthreads);
        gated_act(gu, M, L->inter, (int)L->gelu, act, nthreads);
        q4_apply(&L->down, act, M, L->inter, tmp, nthreads);
    }
    failed = failed || (S->tp && shm_all_reduce(S->tp, tmp, M * hid));
    for (int64_t i = 0; i < M * hid; i++) x[i] += tmp[i];
    free(h);
    return failed ? -1 : 0;
}

/* Each expert's rows of x times that expert's own int4 weight, into the same rows of out: one
 * quantization of every row and one parallel pass over every (expert, column chunk) pair, where
 * a q4_matmul per expert forks and joins the threads (and quantizes) once per expert. With one
 * row per expert (batch-1 decode) that fork was most of an expert's time. Each thread takes a
 * contiguous run of pairs holding its share of the rows x chunks: contiguous, so each thread
 * streams its experts' panels in order (interleaving pairs between threads, as a dynamic schedule
 * does, measured slower); by rows, because in batched decode the router gives experts one to
 * several rows (docs/performance.md, "Mixture of experts"). All experts' weights have the same
 * shape. */
static void q4_grouped(const Q4Weight *w, const int64_t *busy, int64_t active, const int64_t *counts,
                       const int64_t *first, const float *x, int64_t rows, int64_t K, float *out, int nthreads) {
    int64_t G = K / Q4_GROUP, N = w[busy[0]].n, blocks = (N + Q4_COLS - 1) / Q4_COLS;
    int64_t chunks = (blocks + Q4_CHUNK - 1) / Q4_CHUNK, work = rows * chunks;
    int8_t *xq = (int8_t *)malloc((size_t)(rows * K));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(2 * rows * G)), *xsum = xs + rows * G;
    quantize_groups(x, rows, K, xq, xs, xsum, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int64_t t = 0; t < nthreads; t++) {
        int64_t lo = work * t / nthreads, hi = work * (t + 1) / nthreads;
        for (int64_t item = 0; item < active * chunks; item++) {
            int64_t e = busy[item / chunks], ch = item % chunks, f = first[e], b = ch * Q4_CHUNK;
            int64_t start = f * chunks + ch * counts[e]; /* the rows x chunks before this pair */
            if (start < lo || start >= hi) continue;
            q4_chunk(xq + f * K, xs + f * G, xsum + f * G, 0, counts[e], K, w[e].w, b,
                     blocks - b < Q4_CHUNK ? blocks - b : Q4_CHUNK, N, w[e].bias, out + f * N);
        }
    }
    free(xq);
    free(xs);
}

/* A mixture-of-experts MLP over tokens already grouped by expert: expert e takes the next
 * counts[e] rows of x [rows, hidden] and writes the same rows of out. One call a layer instead
 * of three (plus Python) per expert with tokens. With a few rows per expert (decode) every
 * expert's gate_up is one grouped matmul, then one activation over all rows, then one grouped
 * down. With many (prefill) the experts go one at a time, each matmul on every thread: their
 * intermediate rows then stay in cache, where the grouped form's spill to memory measured ~8%
 * slower (docs/performance.md, "Mixture of experts"). */
#define MOE_GROUPED_ROWS 16 /* at most this many rows per expert: the grouped form */

static void moe_expert(const Q4Weight *gate_up, const Q4Weight *down, int64_t n, const float *x, int64_t hidden,
                       int64_t inter, int gelu, float *scratch, float *out, int nthreads) {
    float *act = scratch + n * 2 * inter;
    q4_apply(gate_up, x, n, hidden, scratch, nthreads);
    gated_act(scratch, n, inter, gelu, act, nthreads);
    q4_apply(down, act, n, inter, out, nthreads);
}

void moe_experts(const Q4Weight *gate_up, const Q4Weight *down, int64_t E, const int64_t *counts, const float *x,
                 int64_t hidden, int64_t inter, int gelu, float *out, int nthreads) {
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * E)), *busy = first + E;
    int64_t rows = 0, active = 0, most = 0;
    for (int64_t e = 0; e < E; e++) {
        first[e] = rows;
        rows += counts[e];
        most = counts[e] > most ? counts[e] : most;
        if (counts[e]) busy[active++] = e;
    }
    int grouped = most <= MOE_GROUPED_ROWS;
    float *gu = (float *)malloc(sizeof(float) * (size_t)((grouped ? rows : most) * 3 * inter));
    if (active && grouped) {
        float *act = gu + rows * 2 * inter;
        q4_grouped(gate_up, busy, active, counts, first, x, rows, hidden, gu, nthreads);
        gated_act(gu, rows, inter, gelu, act, nthreads);
        q4_grouped(down, busy, active, counts, first, act, rows, inter, out, nthreads);
    } else {
        for (int64_t i = 0; i < active; i++) {
            int64_t e = busy[i];
            moe_expert(gate_up + e, down + e, counts[e], x + first[e] * hidden, hidden, inter, gelu, gu,
                       out + first[e] * hidden, nthreads);
        }
    }
    free(gu);
    free(first);
}

/* All n layers in turn: the model's whole decode stack for one step in a single call. */
int decode_layers(const DecodeLayer *L, int64_t n, const DecodeStep *S, float *x, int64_t M, int nthreads) {
    for (int64_t i = 0; i < n; i++)
        if (decode_layer(L + i, S, x, M, nthreads)) return -1;
    return 0;
}
