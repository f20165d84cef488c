/* kiln's CPU GEMM for integer weights (W4A32 / W8A32): y = x W^T (+ bias), x float32
 * [M, K], W stored as kiln's groupwise integers (kiln.layers.weight_only), read in the
 * tile layout kiln.kernels.cpu_int makes at load:
 *
 *   wq     4-bit: uint8 [N/16][K/2][16], byte (p, j) = q[n0 + j][2p] | q[n0 + j][2p + 1] << 4
 *          8-bit: int8  [N/16][K][16]
 *   scale, offset  float32 [N/16][K/G][16]    (w = q * scale + offset per group of G)
 *
 * Each tile of 16 outputs keeps, for up to 8 rows of x, one 16-lane accumulator and one
 * 16-lane sum of q * x over the current group, so a group costs one FMA per 16 weights
 * per row, and the scale and offset enter once a group: sum_g scale_g * S_g + offset_g *
 * X_g, X_g the group's sum of x. Values are dequantized exactly (q * scale + offset is
 * the float32 weight a dequantized engine holds); only the order of the float32 sums
 * differs from a float32 GEMM. Compiled at first use with -march=native: AVX-512F (a tile
 * is one zmm register, 8 rows at once) or AVX2 + FMA (two ymm registers, 4 rows at once);
 * each lane's sums run in the same order on both, so they give the same bits.
 * kiln.kernels.cpu_int falls back to the float32 GEMM elsewhere. Threads: the OpenMP
 * runtime torch has loaded, nthreads as torch.get_num_threads(). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef PREFETCH
#define PREFETCH 1
#endif

#if defined(__AVX512F__)
#define ROWS 8 /* rows of x a tile works on at once (2 x 8 zmm registers) */
typedef __m512 v16; /* 16 float32 lanes: one tile's outputs */
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline v16 v_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v_fma1(v16 a, float b, v16 c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(b), c); }
static inline v16 u8_to_f32(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline v16 i8_to_f32(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
static inline v16 v_load_part(const float *p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline void v_store_part(float *p, v16 v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v);
}
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
#define ROWS 4 /* 4 rows x (accumulator + group sum) x 2 ymm; fastest of 2-8 measured */
typedef struct { __m256 lo, hi; } v16;
static inline v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline v16 v_fma(v16 a, v16 b, v16 c) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16 v_fma1(v16 a, float b, v16 c) {
    __m256 s = _mm256_set1_ps(b);
    return (v16){_mm256_fmadd_ps(a.lo, s, c.lo), _mm256_fmadd_ps(a.hi, s, c.hi)};
}
static inline v16 u8_to_f32(__m128i b) {
    return (v16){_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                 _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
static inline v16 i8_to_f32(__m128i b) {
    return (v16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
static inline v16 v_load_part(const float *p, int n) {
    float t[16] = {0};
    memcpy(t, p, sizeof(float) * (size_t)n);
    return v_load(t);
}
static inline void v_store_part(float *p, v16 v, int n) {
    float t[16];
    _mm256_storeu_ps(t, v.lo);
    _mm256_storeu_ps(t + 8, v.hi);
    memcpy(p, t, sizeof(float) * (size_t)n);
}
static inline v16 v_add(v16 a, v16 b) {
    return (v16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
#else
#error "kiln's CPU integer GEMM needs AVX-512F or AVX2 + FMA"
#endif

/* One tile (16 outputs) x m rows; always inlined with a constant m so the accumulators
 * stay in registers. */
static inline __attribute__((always_inline)) void tile(
    int m, int bits, const float *x, long K, const float *xs, long groups, int G, int S,
    const uint8_t *wq, const float *sc, const float *of, const float *bias, float *y,
    long N, long n0, int valid, long wnext, long snext) {
    v16 acc[ROWS], s[ROWS];
    for (int r = 0; r < m; r++) acc[r] = v_zero();
    const __m128i low4 = _mm_set1_epi8(15);
    for (long g = 0; g < groups; g++) {
        long k0 = g * G;
        if (PREFETCH) { /* the next tile's same group: a tile ahead of its use */
            const char *next = (const char *)wq + wnext + k0 * (bits == 4 ? 8 : 16);
            for (int line = 0; line < G * (bits == 4 ? 8 : 16); line += 64)
                _mm_prefetch(next + line, _MM_HINT_T0);
            _mm_prefetch((const char *)(sc + snext + g * 16), _MM_HINT_T0);
            if (of) _mm_prefetch((const char *)(of + snext + g * 16), _MM_HINT_T0);
        }
        v16 d = v_load(sc + g * 16);
        /* sub-blocks of S inputs: a long group (per channel) is summed in pieces */
        for (long k1 = k0; k1 < k0 + G; k1 += S) {
            for (int r = 0; r < m; r++) s[r] = v_zero();
            if (bits == 4) {
                const uint8_t *p = wq + k1 * 8;
                for (int kk = 0; kk < S; kk += 2) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(p + kk * 8));
                    v16 lo = u8_to_f32(_mm_and_si128(b, low4));
                    v16 hi = u8_to_f32(_mm_and_si128(_mm_srli_epi16(b, 4), low4));
                    const float *xk = x + k1 + kk;
                    for (int r = 0; r < m; r++) {
                        s[r] = v_fma1(lo, xk[r * K], s[r]);
                        s[r] = v_fma1(hi, xk[r * K + 1], s[r]);
                    }
                }
            } else {
                const int8_t *p = (const int8_t *)wq + k1 * 16;
                for (int kk = 0; kk < S; kk++) {
                    v16 w = i8_to_f32(_mm_loadu_si128((const __m128i *)(p + kk * 16)));
                    const float *xk = x + k1 + kk;
                    for (int r = 0; r < m; r++)
                        s[r] = v_fma1(w, xk[r * K], s[r]);
                }
            }
            for (int r = 0; r < m; r++) acc[r] = v_fma(d, s[r], acc[r]);
        }
        if (of) {
            v16 o = v_load(of + g * 16);
            for (int r = 0; r < m; r++)
                acc[r] = v_fma1(o, xs[r * groups + g], acc[r]);
        }
    }
    v16 b = bias ? v_load_part(bias + n0, valid) : v_zero();
    for (int r = 0; r < m; r++) v_store_part(y + r * N + n0, v_add(acc[r], b), valid);
}

#define TILE(MM) tile(MM, bits, x, K, xs, groups, G, S, wq, sc, of, bias, y, N, n0, valid, wnext, snext)

/* Every row block of x against one tile; bits a constant where it is inlined. */
static inline __attribute__((always_inline)) void tile_rows(
    int bits, long M, const float *x0, long K, const float *xs0, long groups, int G, int S,
    const uint8_t *wq, const float *sc, const float *of, const float *bias, float *y0,
    long N, long n0, int valid, long wnext, long snext) {
    for (long r0 = 0; r0 < M; r0 += ROWS) {
        const float *x = x0 + r0 * K, *xs = xs0 ? xs0 + r0 * groups : NULL;
        float *y = y0 + r0 * N;
        switch (M - r0 < ROWS ? (int)(M - r0) : ROWS) {
            case 1: TILE(1); break;
#if ROWS > 2
            case 2: TILE(2); break;
#endif
#if ROWS > 3
            case 3: TILE(3); break;
#endif
#if ROWS > 4
            case 4: TILE(4); break;
#endif
#if ROWS > 5
            case 5: TILE(5); break;
#endif
#if ROWS > 6
            case 6: TILE(6); break;
#endif
#if ROWS > 7
            case 7: TILE(7); break;
#endif
            default: TILE(ROWS); break; /* ROWS rows (at most 8) */
        }
    }
}

/* The float32 weight [N, K] of kiln's storage as stored (row-major, 4-bit pairs of k a
 * byte, scale / offset [N, K / G]), multiplied then added as the reference dequantizes
 * (bit for bit): prompt-sized steps multiply it with oneDNN. */
void kiln_int_dequantize(int bits, long N, long K, int G, const uint8_t *wq,
                         const float *scale, const float *offset, float *w, int nthreads) {
    long groups = K / G;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long n = 0; n < N; n++) {
        for (long g = 0; g < groups; g++) {
            float d = scale[n * groups + g], o = offset ? offset[n * groups + g] : 0.0f;
            float *out = w + n * K + g * G;
            if (bits == 4) {
                const uint8_t *p = wq + (n * K + g * G) / 2;
                for (int k = 0; k < G; k += 2) {
                    out[k] = (float)(p[k / 2] & 15) * d + o;
                    out[k + 1] = (float)(p[k / 2] >> 4) * d + o;
                }
            } else {
                const int8_t *p = (const int8_t *)wq + n * K + g * G;
                for (int k = 0; k < G; k++) out[k] = (float)p[k] * d + o;
            }
        }
    }
}

/* y [M, N] = x [M, K] W^T (+ bias [N]); bits 4 or 8; offset and bias may be NULL.
 * Returns 0, or -1 when memory for the group sums of x cannot be had. */
int kiln_int_gemm(int bits, long M, long N, long K, int G, const float *x,
                  const uint8_t *wq, const float *scale, const float *offset,
                  const float *bias, float *y, int nthreads) {
    long groups = K / G, tiles = (N + 15) / 16;
    int S = G; /* sums run over at most 32 inputs (a multiple of 2) where G allows */
    while (S > 32 && S % 4 == 0) S /= 2;
    float *xs = NULL;
    if (offset) { /* X_g: each row's sum of x over each group, by sub-blocks too */
        xs = (float *)malloc(sizeof(float) * (size_t)(M * groups));
        if (!xs) return -1;
        for (long r = 0; r < M; r++)
            for (long g = 0; g < groups; g++) {
                float t = 0.0f;
                for (long k1 = g * G; k1 < (g + 1) * G; k1 += S) {
                    float u = 0.0f;
                    for (int k = 0; k < S; k++) u += x[r * K + k1 + k];
                    t += u;
                }
                xs[r * groups + g] = t;
            }
    }
    long wtile = bits == 4 ? K * 8 : K * 16; /* bytes of one tile's weights */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long t = 0; t < tiles; t++) {
        long n0 = t * 16;
        int valid = N - n0 < 16 ? (int)(N - n0) : 16;
        const float *of = offset ? offset + t * groups * 16 : NULL;
        /* prefetch distance: one tile, none past the last */
        long wnext = t + 1 < tiles ? wtile : 0, snext = t + 1 < tiles ? groups * 16 : 0;
        if (bits == 4)
            tile_rows(4, M, x, K, xs, groups, G, S, wq + t * wtile, scale + t * groups * 16, of,
                      bias, y, N, n0, valid, wnext, snext);
        else
            tile_rows(8, M, x, K, xs, groups, G, S, wq + t * wtile, scale + t * groups * 16, of,
                      bias, y, N, n0, valid, wnext, snext);
    }
    free(xs);
    return 0;
}
