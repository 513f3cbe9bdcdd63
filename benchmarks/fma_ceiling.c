/* The machine's own ceiling for 2-thread scaling of AVX-512 FMA work, with no memory traffic:
 * each thread runs 16 independent FMA chains in registers. If 2 threads do not reach twice
 * the 1-thread rate here, no kernel can scale 2x on this machine at that moment.
 * Built and run by benchmarks/fma_ceiling.sh. */
#include <omp.h>
#include <stdio.h>

typedef float vf __attribute__((vector_size(64)));

int main(void) {
    const long iterations = 100000000;
    double start = omp_get_wtime();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        vf a0 = (vf){} + 1e-3f, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5,
           a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11,
           a12 = a0 + 12, a13 = a0 + 13, a14 = a0 + 14, a15 = a0 + 15;
        vf b = (vf){} + 0.999f, c = (vf){} + 1e-4f;
        long n = iterations / omp_get_num_threads();
        for (long k = 0; k < n; k++) {
            __asm__ volatile("" : "+v"(b));
            a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c;
            a4 = a4 * b + c; a5 = a5 * b + c; a6 = a6 * b + c; a7 = a7 * b + c;
            a8 = a8 * b + c; a9 = a9 * b + c; a10 = a10 * b + c; a11 = a11 * b + c;
            a12 = a12 * b + c; a13 = a13 * b + c; a14 = a14 * b + c; a15 = a15 * b + c;
        }
        vf s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15;
        sink += s[0];
    }
    double seconds = omp_get_wtime() - start;
    printf("{\"threads\": %d, \"gflop_per_s\": %.1f}\n", omp_get_max_threads(),
           2.0 * 16 * 16 * iterations / seconds * 1e-9);
    return sink > 1e30f;
}
