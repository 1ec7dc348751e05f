/* Instruction throughput (12 independent results) and latency (one chain) on this CPU, in core cycles: the
   numbers of results/cpu.md run 9. Build: cc -O2 -mavx512f -mavx512bw -mavx512bf16 -mavx512vnni -mavx512vbmi ports.c */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <x86intrin.h>
#define N 2000000
#define CL "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11"
static double tsc_per(void (*f)(void), long ops) { uint64_t t0=__rdtsc(); f(); uint64_t t1=__rdtsc(); return (double)(t1-t0)/ops; }
/* core clock: a dependent zmm FMA chain, 4 cycles an FMA (a chain of `add $1` runs faster than 1 a cycle here) */
static void fmachain(void){ __m512 a=_mm512_set1_ps(1.0f),b=_mm512_set1_ps(0.999f); for(long i=0;i<N;i++){ __asm__ volatile("vfmadd231ps %1,%1,%0\n\tvfmadd231ps %1,%1,%0\n\tvfmadd231ps %1,%1,%0\n\tvfmadd231ps %1,%1,%0":"+v"(a):"v"(b)); } }
/* 12 instructions with independent results (registers 0-11), alternating a and b: "src" the sources, "cls" the
   destination's register class, "sfx" a mask suffix */
#define R_(ins, src, cls, r, sfx) ins " " src "%%" cls #r sfx "\n\t"
#define REP12(a, b, src, cls, sfx) __asm__ volatile( \
 R_(a, src, cls, 0, sfx) R_(b, src, cls, 1, sfx) R_(a, src, cls, 2, sfx) R_(b, src, cls, 3, sfx) \
 R_(a, src, cls, 4, sfx) R_(b, src, cls, 5, sfx) R_(a, src, cls, 6, sfx) R_(b, src, cls, 7, sfx) \
 R_(a, src, cls, 8, sfx) R_(b, src, cls, 9, sfx) R_(a, src, cls, 10, sfx) R_(b, src, cls, 11, sfx) ::: CL)
#define T12(ins) REP12(ins, ins, "%%zmm20,%%zmm21,", "zmm", "")
#define MIX(a, b) REP12(a, b, "%%zmm20,%%zmm21,", "zmm", "")
#define DEP(ins) __asm__ volatile(ins " %%zmm20,%%zmm21,%%zmm0\n\t" ins " %%zmm20,%%zmm0,%%zmm0\n\t" ins " %%zmm20,%%zmm0,%%zmm0\n\t" ins " %%zmm20,%%zmm0,%%zmm0\n\t" ::: "xmm0")
#define DEPACC(ins) __asm__ volatile(ins " %%zmm20,%%zmm21,%%zmm0\n\t" ins " %%zmm20,%%zmm21,%%zmm0\n\t" ins " %%zmm20,%%zmm21,%%zmm0\n\t" ins " %%zmm20,%%zmm21,%%zmm0\n\t" ::: "xmm0")
static void t_vpermw(void){ for(long i=0;i<N;i++) T12("vpermw"); }
static void t_vpermps(void){ for(long i=0;i<N;i++) T12("vpermps"); }
static void t_dpbf16(void){ for(long i=0;i<N;i++) T12("vdpbf16ps"); }
static void t_dpwssd(void){ for(long i=0;i<N;i++) T12("vpdpwssd"); }
static void t_dpbusd(void){ for(long i=0;i<N;i++) T12("vpdpbusd"); }
static void t_fma(void){ for(long i=0;i<N;i++) T12("vfmadd231ps"); }
static void t_mulps(void){ for(long i=0;i<N;i++) T12("vmulps"); }
static void t_cvt2bf(void){ for(long i=0;i<N;i++) T12("vcvtne2ps2bf16"); }
static void t_pshufb(void){ for(long i=0;i<N;i++) T12("vpshufb"); }
static void t_vpermb(void){ for(long i=0;i<N;i++) T12("vpermb"); }
static void t_vpermt2w(void){ for(long i=0;i<N;i++) T12("vpermt2w"); }
static void t_srlw(void){ for(long i=0;i<N;i++) REP12("vpsrlw", "vpsrlw", "$4,%%zmm20,", "zmm", ""); }
static void t_pmovzxbw(void){ for(long i=0;i<N;i++) REP12("vpmovzxbw", "vpmovzxbw", "%%ymm20,", "zmm", ""); }
/* mixes: 6 of a and 6 of b, interleaved (cycles per instruction: half a pair) */
static void m_permw_dpbf(void){ for(long i=0;i<N;i++) MIX("vpermw","vdpbf16ps"); }
static void m_permw_dpwssd(void){ for(long i=0;i<N;i++) MIX("vpermw","vpdpwssd"); }
static void m_permw_fma(void){ for(long i=0;i<N;i++) MIX("vpermw","vfmadd231ps"); }
static void m_dpbf_fma(void){ for(long i=0;i<N;i++) MIX("vdpbf16ps","vfmadd231ps"); }
static void m_dpbf_dpbusd(void){ for(long i=0;i<N;i++) MIX("vdpbf16ps","vpdpbusd"); }
static void m_permw_pshufb(void){ for(long i=0;i<N;i++) MIX("vpermw","vpshufb"); }
static void m_fma_dpbusd(void){ for(long i=0;i<N;i++) MIX("vfmadd231ps","vpdpbusd"); }
static void m_mul_permw(void){ for(long i=0;i<N;i++) MIX("vmulps","vpermw"); }
static void d_dpbf16(void){ for(long i=0;i<N;i++) DEPACC("vdpbf16ps"); }
static void d_dpwssd(void){ for(long i=0;i<N;i++) DEPACC("vpdpwssd"); }
static void d_fma(void){ for(long i=0;i<N;i++) DEPACC("vfmadd231ps"); }
static void m_cvt2_fma(void){ for(long i=0;i<N;i++) MIX("vcvtne2ps2bf16","vfmadd231ps"); }
static void m_cvt2_permw(void){ for(long i=0;i<N;i++) MIX("vcvtne2ps2bf16","vpermw"); }
static void m_cvt2_addd(void){ for(long i=0;i<N;i++) MIX("vcvtne2ps2bf16","vpaddd"); }
static void t_unpck(void){ for(long i=0;i<N;i++) MIX("vpunpcklwd","vpunpckhwd"); }
static void m_unpck_permps(void){ for(long i=0;i<N;i++) MIX("vpunpcklwd","vpermps"); }
static void t_addd(void){ for(long i=0;i<N;i++) MIX("vpaddd","vpandd"); }
static void m_addd_permps(void){ for(long i=0;i<N;i++) MIX("vpaddd","vpermps"); }
static void m_addd_fma(void){ for(long i=0;i<N;i++) MIX("vpaddd","vfmadd231ps"); }
static void m_permps_fma(void){ for(long i=0;i<N;i++) MIX("vpermps","vfmadd231ps"); }
static void t_maskpermw(void){ for(long i=0;i<N;i++) REP12("vpermw", "vpermw", "%%zmm20,%%zmm21,", "zmm", "%{%%k1%}%{z%}"); }
static void t_cvtne(void){ for(long i=0;i<N;i++) REP12("vcvtneps2bf16", "vcvtneps2bf16", "%%zmm20,", "ymm", ""); }
int main(void){
  tsc_per(fmachain, 4L*N);  /* warm-up: the clock ramps */
  double c = tsc_per(fmachain, 4L*N) / 4.0; /* tsc ticks per core cycle */
  printf("tsc ticks per core cycle %.3f -> core %.2f GHz (TSC 2.3 GHz)\n", c, 2.3 / c);
  struct {const char*n; void(*f)(void); int ops;} t[]={
   {"vpermw",t_vpermw,12},{"vpermps",t_vpermps,12},{"vdpbf16ps",t_dpbf16,12},{"vpdpwssd",t_dpwssd,12},{"vpdpbusd",t_dpbusd,12},
   {"vfmadd231ps",t_fma,12},{"vmulps",t_mulps,12},{"vcvtne2ps2bf16",t_cvt2bf,12},{"vpshufb",t_pshufb,12},{"vpermb",t_vpermb,12},{"vpermt2w",t_vpermt2w,12},
   {"vpsrlw imm",t_srlw,12},{"vpmovzxbw",t_pmovzxbw,12},
   {"mix vpermw+vdpbf16ps",m_permw_dpbf,12},{"mix vpermw+vpdpwssd",m_permw_dpwssd,12},{"mix vpermw+fma",m_permw_fma,12},
   {"mix vdpbf16ps+fma",m_dpbf_fma,12},{"mix vdpbf16ps+vpdpbusd",m_dpbf_dpbusd,12},{"mix vpermw+vpshufb",m_permw_pshufb,12},{"mix fma+vpdpbusd",m_fma_dpbusd,12},{"mix vmulps+vpermw",m_mul_permw,12},

   {"mix cvtne2ps2bf16+fma",m_cvt2_fma,12},{"mix cvtne2ps2bf16+vpermw",m_cvt2_permw,12},{"mix cvtne2ps2bf16+vpaddd",m_cvt2_addd,12},
   {"unpcklwd+unpckhwd",t_unpck,12},{"mix unpcklwd+vpermps",m_unpck_permps,12},{"vpaddd+vpandd",t_addd,12},{"mix vpaddd+vpermps",m_addd_permps,12},{"mix vpaddd+fma",m_addd_fma,12},{"mix vpermps+fma",m_permps_fma,12},
   {"masked-zero vpermw",t_maskpermw,12},{"vcvtneps2bf16 z->y",t_cvtne,12},
   {"LAT vdpbf16ps (acc chain)",d_dpbf16,4},{"LAT vpdpwssd (acc chain)",d_dpwssd,4},{"LAT fma (acc chain)",d_fma,4}};
  for(unsigned i=0;i<sizeof t/sizeof t[0];i++){ double x=1e9; for(int r=0;r<3;r++){double v=tsc_per(t[i].f,(long)t[i].ops*N); if(v<x)x=v;} printf("%-36s %.3f cycles/instr\n",t[i].n,x/c); }
}
