/* Times the probe variants and the lut4 kernels on one 4096 x 4096 NF4-shaped weight (random codes, groups of 64,
   one input row) with rdtsc, median of reps calls; argv: threads reps. See build.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <x86intrin.h>
typedef void (*fn_f)(const void *x, const uint8_t *q, const float *s, const float *lut, float *y, int M, int N, int Kp, int gs, int nt);
#define DECL(n) void n(const void*, const uint8_t*, const float*, const float*, float*, int, int, int, int, int);
#include "decls.h"
const uint16_t *g_rup; const float *g_s;
int lowbit_lut4_span64_gemm(const void *, const uint8_t *, const float *, const float *, const uint16_t *, float *,
                            int, int, int, int, int, int);
void lib64_f32(const void *x, const uint8_t *q, const float *s, const float *lut, float *y, int M, int N, int Kp,
               int gs, int nt) { lowbit_lut4_span64_gemm(x, q, s, lut, 0, y, M, N, Kp, gs, 0, nt); }
void lib64_bf16(const void *x, const uint8_t *q, const float *s, const float *lut, float *y, int M, int N, int Kp,
                       int gs, int nt) { lowbit_lut4_span64_gemm(x, q, s, lut, g_rup, y, M, N, Kp, gs, 1, nt); }
int gpr_span64_gemm(const void *, const uint8_t *, const float *, const float *, const uint16_t *, float *,
                    int, int, int, int, int, int);
void gpr64_bf16(const void *x, const uint8_t *q, const float *s, const float *lut, float *y, int M, int N, int Kp,
                int gs, int nt) { gpr_span64_gemm(x, q, s, lut, g_rup, y, M, N, Kp, gs, 1, nt); }
void lib64_bf16w(const void *x, const uint8_t *q, const float *s, const float *lut, float *y, int M, int N, int Kp,
                 int gs, int nt) { lowbit_lut4_span64_gemm(x, q, s, lut, g_rup, y, M, N, Kp, gs, 0, nt); }
static int cmp(const void *a, const void *b) { double x = *(double*)a, y = *(double*)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    int N = 4096, K = 4096, gs = 64, nt = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 200;
    uint8_t *q = aligned_alloc(64, (size_t)N * K / 2 + 64);  /* the span-64 kernel's 64 spare bytes */
    float *s = malloc(sizeof(float) * N * (K / gs)), *x = aligned_alloc(64, 4 * K), *y = malloc(4 * N);
    uint16_t *xb = aligned_alloc(64, 2 * K);
    float lut[16] = {-1.0f, -0.6961928f, -0.5250730f, -0.3949175f, -0.2844414f, -0.1848449f, -0.0910500f, 0.0f,
                     0.0795803f, 0.1609302f, 0.2461123f, 0.3379152f, 0.4407098f, 0.5626170f, 0.7229568f, 1.0f};
    srand(1);
    for (size_t i = 0; i < (size_t)N * K / 2; i++) q[i] = rand() & 255;
    for (int i = 0; i < N * (K / gs); i++) s[i] = 0.01f + (rand() % 1000) * 1e-5f;
    for (int i = 0; i < K; i++) { x[i] = (rand() % 2001 - 1000) * 1e-3f; uint32_t b; memcpy(&b, &x[i], 4); xb[i] = b >> 16; }
    uint16_t *rup = malloc(2 * N * (K / gs));
    for (int i = 0; i < N * (K / gs); i++) { uint16_t m = 0; for (int j = 0; j < 16; j++) { volatile float t = lut[j] * s[i]; uint32_t b; memcpy(&b, (const void *)&t, 4);
        uint32_t r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000u; if (r != (b & 0xFFFF0000u)) m |= 1u << j; } rup[i] = m; }
    g_rup = rup; g_s = s;
    struct { const char *name; fn_f f; int bf16x; } v[] = {
#include "table.h"
    };
    double tsc_ghz = 2.3;
    const int nv = sizeof v / sizeof v[0];
    double *t = malloc(sizeof(double) * reps * nv);
    for (int i = 0; i < nv; i++)
        for (int w = 0; w < 20; w++) v[i].f(v[i].bf16x ? (void*)xb : (void*)x, q, s, lut, y, 1, N, K, gs, nt);
    for (int r = 0; r < reps; r++)  /* round robin: a slower spell of the shared machine hits every variant alike */
        for (int i = 0; i < nv; i++) {
            uint64_t t0 = __rdtsc();
            v[i].f(v[i].bf16x ? (void*)xb : (void*)x, q, s, lut, y, 1, N, K, gs, nt);
            t[i * reps + r] = (__rdtsc() - t0) / (tsc_ghz * 1e6);
        }
    for (int i = 0; i < nv; i++) {
        double *ti = t + (size_t)i * reps;
        qsort(ti, reps, sizeof(double), cmp);
        v[i].f(v[i].bf16x ? (void*)xb : (void*)x, q, s, lut, y, 1, N, K, gs, nt);
        printf("%-52s %.4f ms (min %.4f)  y[7]=%g\n", v[i].name, ti[reps / 2], ti[0], y[7]);
    }
    free(t);
}
