/* Probe variants (not the library) of the span-64 layout: per 128 codes 16 dwords, nibble j of dword i = code 16j + i
   (j < 4: first 64 codes, table A; j >= 4: next 64, table B); one input row, groups of 64, K a multiple of 128.
   TABLE: 0 float32 lut*s; bf16-rounded: 1 magic add/sub (2^(e+16); wrong for subnormals), 2 round on the bits
   (+0x7FFF+lsb), 3 vcvtneps2bf16 + widen, 5 magic with the exponent clamped, 6 word tables by vcvtne2ps2bf16 and
   masked vpermw lookups, 7 truncate + pack-time round-up masks; 9 no table build (wrong y).
   RSTEP output rows per step; CHAIN accumulators; MODE 0 full, 1 lookups only (OR instead of FMA), 2 FMA only
   (codes as floats: denormal/NaN garbage, slow: not a usable probe); PF prefetch bytes ahead (0: none);
   LOADS 1: nibbles 0, 2, 4, 6 from loads 0-3 bytes further on instead of shifts. NAME: the exported function. */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#ifndef TABLE
#define TABLE 0
#endif
#ifndef RSTEP
#define RSTEP 1
#endif
#ifndef MODE
#define MODE 0
#endif
#ifndef PF
#define PF 0
#endif
#ifndef LOADS
#define LOADS 0
#endif
#ifndef CHAIN
#define CHAIN 4
#endif
extern const uint16_t *g_rup;
extern const float *g_s;
static inline __attribute__((always_inline)) __m512 table_r(__m512 lut, float s, uint16_t up) {
    __m512i b = _mm512_and_si512(_mm512_castps_si512(_mm512_mul_ps(lut, _mm512_set1_ps(s))), _mm512_set1_epi32((int)0xFFFF0000));
    return _mm512_castsi512_ps(_mm512_mask_add_epi32(b, (__mmask16)up, b, _mm512_set1_epi32(0x10000)));
}
static inline __attribute__((always_inline)) __m512 table(__m512 lut, float s) {
    __m512 t = _mm512_mul_ps(lut, _mm512_set1_ps(s));
#if TABLE == 1
    __m512i c = _mm512_add_epi32(_mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32((int)0xFF800000)), _mm512_set1_epi32(16 << 23));
    return _mm512_sub_ps(_mm512_add_ps(t, _mm512_castsi512_ps(c)), _mm512_castsi512_ps(c));
#elif TABLE == 2
    __m512i b = _mm512_castps_si512(t);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000)));
#elif TABLE == 3
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(t));
#elif TABLE == 5  /* magic with exponent clamp (subnormals) */
    __m512i e = _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(0x7F800000)), _mm512_set1_epi32(0x00800000));
    __m512i c = _mm512_ternarylogic_epi32(e, _mm512_castps_si512(t), _mm512_set1_epi32((int)0x80000000), 0xF8);
    c = _mm512_add_epi32(c, _mm512_set1_epi32(16 << 23));
    return _mm512_sub_ps(_mm512_add_ps(t, _mm512_castsi512_ps(c)), _mm512_castsi512_ps(c));
#elif TABLE == 9
    (void)s; return lut;
#else
    return t;
#endif
}
#if MODE == 1
#define ACC(a, w, xp) a = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(w)))
#else
#define ACC(a, w, xp) a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp), a)
#endif
#if MODE == 2
#define LK(v, t) _mm512_castsi512_ps(v)
#else
#define LK(v, t) _mm512_permutexvar_ps(v, t)
#endif
static inline __attribute__((always_inline)) void rows(const float *x, const uint8_t *q, const float *s, __m512 lut,
        float *y, int R, int Kp, int gs, size_t Kb, size_t G) {
    __m512 a[4][CHAIN];
    for (int r = 0; r < R; r++) for (int j = 0; j < CHAIN; j++) a[r][j] = _mm512_setzero_ps();
    for (int k = 0; k + 128 <= Kp; k += 128) {
        const int gA = k / gs, gB = (k + 64) / gs;
        for (int r = 0; r < R; r++) {
            const uint8_t *qr = q + r * Kb + k / 2;
#if PF
            _mm_prefetch((const char *)(qr + PF), _MM_HINT_T0);
#endif
#if TABLE == 7
            const uint16_t *ur = g_rup + (s - g_s) + r * G;
            const __m512 tA = table_r(lut, s[r * G + gA], ur[gA]), tB = table_r(lut, s[r * G + gB], ur[gB]);
#elif TABLE != 6
            const __m512 tA = table(lut, s[r * G + gA]), tB = table(lut, s[r * G + gB]);
#endif
#if TABLE == 6
            /* bf16 word tables: one vcvtne2ps2bf16 for both groups, doubled per group (index bit 4 is garbage);
               lookups write the odd words (high halves of dwords) and zero the even ones: float32 weights */
            const __m512i p = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(lut, _mm512_set1_ps(s[r * G + gB])),
                                                           _mm512_mul_ps(lut, _mm512_set1_ps(s[r * G + gA])));
            const __m512i tAA = _mm512_shuffle_i64x2(p, p, 0x44), tBB = _mm512_shuffle_i64x2(p, p, 0xEE);
            const __m512i v = _mm512_loadu_si512((const void *)qr);
            const __mmask32 odd = 0xAAAAAAAAu;
#define LW(idx, t) _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, idx, t))
            ACC(a[r][0 % CHAIN], LW(_mm512_slli_epi32(v, 16), tAA), x + k);
            ACC(a[r][1 % CHAIN], LW(_mm512_slli_epi32(v, 12), tAA), x + k + 16);
            ACC(a[r][2 % CHAIN], LW(_mm512_slli_epi32(v, 8), tAA), x + k + 32);
            ACC(a[r][3 % CHAIN], LW(_mm512_slli_epi32(v, 4), tAA), x + k + 48);
            ACC(a[r][0 % CHAIN], LW(v, tBB), x + k + 64);
            ACC(a[r][1 % CHAIN], LW(_mm512_srli_epi32(v, 4), tBB), x + k + 80);
            ACC(a[r][2 % CHAIN], LW(_mm512_srli_epi32(v, 8), tBB), x + k + 96);
            ACC(a[r][3 % CHAIN], LW(_mm512_srli_epi32(v, 12), tBB), x + k + 112);
#elif LOADS
            /* byte-offset loads: nibble 2j of dword i is bits 0-3 of the load at +j bytes (no shift) */
            const __m512i v = _mm512_loadu_si512((const void *)qr), v1 = _mm512_loadu_si512((const void *)(qr + 1));
            const __m512i v2 = _mm512_loadu_si512((const void *)(qr + 2)), v3 = _mm512_loadu_si512((const void *)(qr + 3));
            ACC(a[r][0 % CHAIN], LK(v, tA), x + k);
            ACC(a[r][1 % CHAIN], LK(_mm512_srli_epi32(v, 4), tA), x + k + 16);
            ACC(a[r][2 % CHAIN], LK(v1, tA), x + k + 32);
            ACC(a[r][3 % CHAIN], LK(_mm512_srli_epi32(v1, 4), tA), x + k + 48);
            ACC(a[r][0 % CHAIN], LK(v2, tB), x + k + 64);
            ACC(a[r][1 % CHAIN], LK(_mm512_srli_epi32(v2, 4), tB), x + k + 80);
            ACC(a[r][2 % CHAIN], LK(v3, tB), x + k + 96);
            ACC(a[r][3 % CHAIN], LK(_mm512_srli_epi32(v3, 4), tB), x + k + 112);
#else
            const __m512i v = _mm512_loadu_si512((const void *)qr);
            ACC(a[r][0 % CHAIN], LK(v, tA), x + k);
            ACC(a[r][1 % CHAIN], LK(_mm512_srli_epi32(v, 4), tA), x + k + 16);
            ACC(a[r][2 % CHAIN], LK(_mm512_srli_epi32(v, 8), tA), x + k + 32);
            ACC(a[r][3 % CHAIN], LK(_mm512_srli_epi32(v, 12), tA), x + k + 48);
            ACC(a[r][0 % CHAIN], LK(_mm512_srli_epi32(v, 16), tB), x + k + 64);
            ACC(a[r][1 % CHAIN], LK(_mm512_srli_epi32(v, 20), tB), x + k + 80);
            ACC(a[r][2 % CHAIN], LK(_mm512_srli_epi32(v, 24), tB), x + k + 96);
            ACC(a[r][3 % CHAIN], LK(_mm512_srli_epi32(v, 28), tB), x + k + 112);
#endif
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 t = a[r][0];
        for (int j = 1; j < CHAIN; j++) t = _mm512_add_ps(t, a[r][j]);
        y[r] = _mm512_reduce_add_ps(t);
    }
}
void NAME(const float *x, const uint8_t *q, const float *s, const float *lut16, float *y, int M, int N, int Kp, int gs, int nt) {
    const __m512 lut = _mm512_loadu_ps(lut16);
    const size_t Kb = (size_t)Kp / 2, G = (size_t)(Kp / gs);
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int t = 0; t < nt; t++) {
        int lo = (int)((long)N * t / nt), hi = (int)((long)N * (t + 1) / nt);
        int n = lo;
        for (; n + RSTEP <= hi; n += RSTEP) rows(x, q + n * Kb, s + n * G, lut, y + n, RSTEP, Kp, gs, Kb, G);
        for (; n < hi; n++) rows(x, q + n * Kb, s + n * G, lut, y + n, 1, Kp, gs, Kb, G);
    }
}
