/* distgen's CPU linear kernel: y[M,N] = x[M,K] @ W^T (+ b) over weights packed in panels of 16
 * output features, P[N/16][K][16] (distgen/engine/linear.py packs them in place).
 *
 * A decode step multiplies a few rows (M = the rows decoding) by every weight of the model, so its
 * GEMMs are weight streaming: each 16-feature panel is read from DRAM once (the next one prefetched
 * while this one computes) and then serves all M rows from cache, 6 rows x 16 features at a time in
 * 12 AVX2 accumulators. Each output is one FMA chain over k in order, whatever M is or which rows
 * share the call: a row's result does not depend on the batch it decodes in. Built by linear.py with
 * -O3 -mavx2 -mfma -fopenmp; threads split the panels (one thread: no OpenMP region). */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 6

static inline __attribute__((always_inline)) void block(const int rows, const float* x, int64_t ldx,
                                                        const float* P, int64_t K, float* y, int64_t ldy,
                                                        const float* bias, const float* next) {
  __m256 lo[ROWS], hi[ROWS];
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; i++) if (i < rows) { lo[i] = _mm256_setzero_ps(); hi[i] = _mm256_setzero_ps(); }
  for (int64_t k = 0; k < K; k++) {
    if (next) _mm_prefetch((const char*)(next + k * 16), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(P + k * 16), w1 = _mm256_loadu_ps(P + k * 16 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; i++) if (i < rows) {
      const __m256 u = _mm256_broadcast_ss(x + i * ldx + k);
      lo[i] = _mm256_fmadd_ps(u, w0, lo[i]);
      hi[i] = _mm256_fmadd_ps(u, w1, hi[i]);
    }
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; i++) if (i < rows) {
    _mm256_storeu_ps(y + i * ldy, bias ? _mm256_add_ps(lo[i], b0) : lo[i]);
    _mm256_storeu_ps(y + i * ldy + 8, bias ? _mm256_add_ps(hi[i], b1) : hi[i]);
  }
}

static void panel(const float* x, int64_t ldx, const float* P, const float* bias, float* y, int64_t ldy,
                  int64_t M, int64_t K, const float* next) {
  for (int64_t m = 0; m < M; m += ROWS) {
    const int rows = M - m < ROWS ? (int)(M - m) : ROWS;
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (rows) {
      case 6: block(6, xm, ldx, P, K, ym, ldy, bias, next); break;
      case 5: block(5, xm, ldx, P, K, ym, ldy, bias, next); break;
      case 4: block(4, xm, ldx, P, K, ym, ldy, bias, next); break;
      case 3: block(3, xm, ldx, P, K, ym, ldy, bias, next); break;
      case 2: block(2, xm, ldx, P, K, ym, ldy, bias, next); break;
      default: block(1, xm, ldx, P, K, ym, ldy, bias, next); break;
    }
  }
}

/* N % 16 == 0; x rows ldx apart, y rows ldy apart; bias may be NULL. */
void packed_linear(const float* x, int64_t ldx, const float* P, const float* bias, float* y, int64_t ldy,
                   int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t panels = N / 16;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    const float* next = p + 1 < panels ? P + (p + 1) * K * 16 : 0;
    panel(x, ldx, P + p * K * 16, bias ? bias + p * 16 : 0, y + p * 16, ldy, M, K, next);
  }
}
