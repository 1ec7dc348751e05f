/* The core clock both vCPUs run AVX-512 at, right now (GHz, TSC at 2.3 GHz): a speed check before timing on a shared VM.
   Build: cc -O2 -mavx512f -fopenmp clock.c -o clock */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <x86intrin.h>
#include <omp.h>
#define N 5000000L
/* core clock of each of 2 threads at once (dependent zmm FMA chain, 4 cycles an FMA), min over both */
int main(void){ double g[2] = {0, 0};
  #pragma omp parallel num_threads(2)
  { __m512 a=_mm512_set1_ps(1.0f),b=_mm512_set1_ps(0.999f);
    for (int w = 0; w < 2; w++) { uint64_t t0=__rdtsc();
      for(long i=0;i<N;i++) __asm__ volatile("vfmadd231ps %1,%1,%0\n\tvfmadd231ps %1,%1,%0":"+v"(a):"v"(b));
      g[omp_get_thread_num()] = 2.3*8.0*N/(double)(__rdtsc()-t0); } }
  printf("%.2f\n", g[0] < g[1] ? g[0] : g[1]); }
