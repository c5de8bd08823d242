/* distgen's CPU kernels (distgen/backends/cpu/kernels.py builds, checks and calls them).
 *
 * The boundary: kernels.py checks every tensor's dtype, shape, strides and device before it hands a
 * pointer here; what only a scan of the data can check (slots, columns, lengths, token ids) is checked
 * here, before anything is written, and a bad value returns an error code with (index, value, bound) in
 * `info`, which the wrapper turns into a Python exception. Nothing here allocates: scratch memory comes
 * from the caller (per thread where threads need their own).
 *
 * packed_linear: y[M,N] = x[M,K] @ W^T (+ b) over weights packed in panels of 16 output features,
 * P[N/16][K][16], then the N % 16 remaining features as one narrow panel [K][N % 16] (kernels.pack lays
 * them out in place). A decode step multiplies a few rows by every weight of the model, so its GEMMs are
 * weight streaming: each panel is read from DRAM once (the next one prefetched while this one computes)
 * and then serves all M rows from cache, 6 rows x 16 features at a time in 12 AVX2 accumulators.
 * Each output is one FMA chain over k in order, whatever M is, where the row sits in its block of 6 or
 * which rows share the call: a row's result does not depend on its batch. Threads split the panels.
 *
 * slot_attention: each query token attends to exactly its own slot's first lens[i] columns (a batched
 * SDPA reads the longest row's width for every row, masked): scores 8 keys at a time, softmax, then the
 * weighted values accumulated in registers, per (token, kv head) with the kv head's query heads
 * together; a prompt's consecutive tokens go in blocks of up to 8, so each key and value row read serves
 * the block. A token's result is a function of its query and its slot's columns only, computed in the
 * same order whatever its block, its length or its neighbours (decode and prompt tokens alike, however a
 * prompt is chunked). Threads split the (block, kv head) pairs.
 *
 * llama_stack: a whole Llama-style decoder stack over T tokens (any mix of decode and prompt tokens)
 * in one call, from these kernels in a fixed order.
 *
 * Built with -O3 -mavx2 -mfma -fopenmp; with one thread no OpenMP region starts. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define ROWS 6
#define PANEL 16

/* Error codes (kernels.py's ERRORS names them); info = (index, value, bound) of the first bad entry. */
enum { DG_OK = 0, DG_SLOT = 1, DG_COLUMN = 2, DG_LENGTH = 3, DG_TOKEN = 4 };

static int fail(int64_t* info, int code, int64_t index, int64_t value, int64_t bound) {
  info[0] = index;
  info[1] = value;
  info[2] = bound;
  return code;
}

/* Is every values[i] (i < n) in [low, high)? Else the first bad one goes to info. */
static int in_range(const int64_t* values, int64_t n, int64_t low, int64_t high, int code, int64_t* info) {
  for (int64_t i = 0; i < n; i++)
    if (values[i] < low || values[i] >= high) return fail(info, code, i, values[i], high);
  return DG_OK;
}

/* lanes < count of 8 on (count clamped to 0..8): the narrow panel's masks */
static inline __m256i lanes(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(count < 0 ? 0 : count > 8 ? 8 : count)), index);
}

/* `rows` rows (<= ROWS) x one panel of `width` features (16, or the narrow last panel: masked loads and
 * stores of exactly `width` lanes). P: the panel, [K][width]. */
static inline __attribute__((always_inline)) void block(const int rows, const int width, const float* x,
                                                        int64_t ldx, const float* P, int64_t K, float* y,
                                                        int64_t ldy, const float* bias, const float* r,
                                                        int64_t ldr, const float* next) {
  const __m256i m0 = lanes(width), m1 = lanes(width - 8);
  __m256 lo[ROWS], hi[ROWS];
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; i++) if (i < rows) { lo[i] = _mm256_setzero_ps(); hi[i] = _mm256_setzero_ps(); }
  for (int64_t k = 0; k < K; k++) {
    __m256 w0, w1;
    if (width == PANEL) {
      if (next) _mm_prefetch((const char*)(next + k * PANEL), _MM_HINT_T0);
      w0 = _mm256_loadu_ps(P + k * PANEL);
      w1 = _mm256_loadu_ps(P + k * PANEL + 8);
    } else {
      w0 = _mm256_maskload_ps(P + k * width, m0);
      w1 = width > 8 ? _mm256_maskload_ps(P + k * width + 8, m1) : _mm256_setzero_ps();
    }
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; i++) if (i < rows) {
      const __m256 u = _mm256_broadcast_ss(x + i * ldx + k);
      lo[i] = _mm256_fmadd_ps(u, w0, lo[i]);
      hi[i] = _mm256_fmadd_ps(u, w1, hi[i]);
    }
  }
  const int full = width == PANEL, two = width > 8;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 b0 = !bias ? zero : full ? _mm256_loadu_ps(bias) : _mm256_maskload_ps(bias, m0);
  const __m256 b1 = !bias || !two ? zero : full ? _mm256_loadu_ps(bias + 8) : _mm256_maskload_ps(bias + 8, m1);
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; i++) if (i < rows) {
    __m256 out0 = bias ? _mm256_add_ps(lo[i], b0) : lo[i], out1 = bias ? _mm256_add_ps(hi[i], b1) : hi[i];
    if (r) {  /* the residual: r + (x @ W^T + b), as `residual + linear(x)` rounds it */
      const float* ri = r + i * ldr;
      out0 = _mm256_add_ps(full ? _mm256_loadu_ps(ri) : _mm256_maskload_ps(ri, m0), out0);
      if (two) out1 = _mm256_add_ps(full ? _mm256_loadu_ps(ri + 8) : _mm256_maskload_ps(ri + 8, m1), out1);
    }
    float* yi = y + i * ldy;
    if (full) {
      _mm256_storeu_ps(yi, out0);
      _mm256_storeu_ps(yi + 8, out1);
    } else {
      _mm256_maskstore_ps(yi, m0, out0);
      if (two) _mm256_maskstore_ps(yi + 8, m1, out1);
    }
  }
}

#define BLOCKS(width)                                                                  \
  switch (rows) {                                                                      \
    case 6: block(6, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;       \
    case 5: block(5, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;       \
    case 4: block(4, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;       \
    case 3: block(3, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;       \
    case 2: block(2, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;       \
    default: block(1, width, xm, ldx, P, K, ym, ldy, bias, rm, ldr, next); break;      \
  }

static void panel(const float* x, int64_t ldx, const float* P, int width, const float* bias, float* y,
                  int64_t ldy, const float* r, int64_t ldr, int64_t M, int64_t K, const float* next) {
  for (int64_t m = 0; m < M; m += ROWS) {
    const int rows = M - m < ROWS ? (int)(M - m) : ROWS;
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    const float* rm = r ? r + m * ldr : 0;
    if (width == PANEL) {
      BLOCKS(PANEL)
    } else {
      BLOCKS(width)
    }
  }
}

/* x rows ldx apart, y rows ldy apart; bias may be NULL; r (rows ldr apart, may be NULL) is added to
 * each output (a residual; it may be y itself). y must not overlap x. */
void packed_linear(const float* x, int64_t ldx, const float* P, const float* bias, float* y, int64_t ldy,
                   const float* r, int64_t ldr, int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t full = N / PANEL, panels = full + (N % PANEL != 0);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t p = 0; p < panels; p++) {
    const int width = p < full ? PANEL : (int)(N % PANEL);
    const float* next = p + 1 < full ? P + (p + 1) * K * PANEL : 0;
    panel(x, ldx, P + p * K * PANEL, width, bias ? bias + p * PANEL : 0, y + p * PANEL, ldy,
          r ? r + p * PANEL : 0, ldr, M, K, next);
  }
}

/* exp(x) for x <= 0 (softmax after subtracting the max): Cephes' polynomial, ~1 ulp. */
static inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

/* A prompt's consecutive tokens attend in blocks of up to QBLOCK (same slot, consecutive positions, one
 * aligned window of QBLOCK positions), so each key and value row read serves the whole block. */
#define QBLOCK 8

/* Floats of scratch one thread of slot_attention needs: a block's query heads and their scores. */
int64_t attention_scratch(int64_t heads, int64_t kv_heads, int64_t D, int64_t columns) {
  return QBLOCK * (heads / kv_heads) * (D + columns);
}

/* Does token i start a block: not the next position, in the same slot, of token i-1 within one window? */
static inline int leads(const int64_t* slots, const int64_t* lens, int64_t i) {
  return i == 0 || !slots || slots[i - 1] != slots[i] || lens[i] != lens[i - 1] + 1 || lens[i] % QBLOCK == 1;
}

/* The lane sums of 8 vectors, one per lane: a[c]'s ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) in lane c. */
static inline __m256 reduce8(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* scale * q.k of the `count` (<= 8) keys at k, k + s_col, ...: each key's products summed in the same
 * order whatever `count` is (D in 8 lanes, reduce8's tree, then the scalar tail of D % 8 in order). */
static inline void scores8(const float* q, const float* k, int64_t s_col, int count, int64_t D, float scale,
                           float* out) {
  __m256 acc[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++)
      if (c < count) acc[c] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + c * s_col + d), acc[c]);
  }
  float sums[8];
  _mm256_storeu_ps(sums, reduce8(acc));
  for (int c = 0; c < count; c++) {
    float sum = sums[c];
    for (int64_t e = d; e < D; e++) sum += q[e] * k[c * s_col + e];
    out[c] = sum * scale;
  }
}

/* o[:D] = sum over t < L of p[t] * v[t][:D], in t order (one fma per term from 0), in registers. */
static inline void weighted_values(const float* p, const float* v, int64_t s_col, int64_t L, int64_t D, float* o) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
      const __m256 w = _mm256_set1_ps(p[t]);
      const float* vt = v + t * s_col + d0;
#pragma GCC unroll 8
      for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * c), acc[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + d0 + 8 * c, acc[c]);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v + t * s_col + d0), acc);
    _mm256_storeu_ps(o + d0, acc);
  }
  for (; d0 < D; d0++) {
    float acc = 0.f;
    for (int64_t t = 0; t < L; t++) acc = fmaf(p[t], v[t * s_col + d0], acc);
    o[d0] = acc;
  }
}

/* softmax in place over L scores */
static inline void softmax(float* p, int64_t L) {
  float top = p[0], total = 0.f;
  for (int64_t t = 1; t < L; t++) top = p[t] > top ? p[t] : top;
  int64_t t = 0;
  __m256 sums = _mm256_setzero_ps();
  for (; t + 8 <= L; t += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(top)));
    _mm256_storeu_ps(p + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  total = hsum(sums);
  for (; t < L; t++) { p[t] = expf(p[t] - top); total += p[t]; }
  const float inv = 1.f / total;
  for (t = 0; t < L; t++) p[t] *= inv;
}

/* Tokens i0..i0+B-1 (one block) x kv head g. Each token's arithmetic is the same whatever its block or
 * length: its scores (scores8, by key), its softmax over its own lens, its values summed in column order. */
static void attend_block(const float* q, int64_t q_tok, int64_t q_head, const float* kb, const float* vb,
                         int64_t s_col, const int64_t* lens, int64_t i0, int64_t B, int64_t g, int64_t heads,
                         int64_t G, int64_t D, int64_t columns, float scale, float* out, float* qs, float* p) {
  const int64_t longest = lens[i0 + B - 1];
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < G; j++)
      memcpy(qs + (b * G + j) * D, q + (i0 + b) * q_tok + (g * G + j) * q_head, sizeof(float) * D);
  for (int64_t t = 0; t < longest; t += 8) {
    const float* kt = kb + t * s_col;
    /* the values' rows stream in behind the keys (the last pass then reads them from cache) */
    for (int64_t c = t; c < t + 8 && c < longest; c++)
      for (int64_t d = 0; d < D; d += 16) _mm_prefetch((const char*)(vb + c * s_col + d), _MM_HINT_T1);
    for (int64_t b = 0; b < B; b++) {
      const int64_t left = lens[i0 + b] - t;
      if (left <= 0) continue;
      for (int64_t j = 0; j < G; j++)
        scores8(qs + (b * G + j) * D, kt, s_col, left < 8 ? (int)left : 8, D, scale, p + (b * G + j) * columns + t);
    }
  }
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < G; j++) {
      float* pj = p + (b * G + j) * columns;
      softmax(pj, lens[i0 + b]);
      weighted_values(pj, vb, s_col, lens[i0 + b], D, out + ((i0 + b) * heads + g * G + j) * D);
    }
}

/* q: token i, head h at i*q_tok + h*q_head; out: [n, heads, D] contiguous; k, v: slot s, kv head g,
 * column t at s*s_slot + g*s_head + t*s_col (D contiguous). Token i reads slot slots[i] (i when slots is
 * NULL), its columns 0..lens[i]-1 (0: the token's output is zeros). scratch: `threads` regions of
 * attention_scratch(...) floats. Checks every slot and length first; writes nothing on an error. */
int slot_attention(const float* q, int64_t q_tok, int64_t q_head, const float* k, const float* v,
                   int64_t s_slot, int64_t s_head, int64_t s_col, const int64_t* slots, const int64_t* lens,
                   int64_t n_slots, int64_t columns, float* out, int64_t n, int64_t heads, int64_t kv_heads,
                   int64_t D, float scale, float* scratch, int threads, int64_t* info) {
  int error = in_range(lens, n, 0, columns + 1, DG_LENGTH, info);
  if (error) return error;
  if (slots) error = in_range(slots, n, 0, n_slots, DG_SLOT, info);
  else if (n > n_slots) error = fail(info, DG_SLOT, n - 1, n - 1, n_slots);
  if (error) return error;
  const int64_t G = heads / kv_heads, per_thread = attention_scratch(heads, kv_heads, D, columns);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float* qs = scratch + omp_get_thread_num() * per_thread;  /* the block's query heads, contiguous */
    float* p = qs + QBLOCK * G * D;                            /* their scores, rows of `columns` */
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n * kv_heads; task++) {
      const int64_t i = task / kv_heads, g = task % kv_heads;
      if (!leads(slots, lens, i)) continue;  /* its block's first token attends for it */
      int64_t B = 1;
      while (B < QBLOCK && i + B < n && !leads(slots, lens, i + B)) B++;
      const int64_t s = slots ? slots[i] : i;
      if (lens[i + B - 1] <= 0) {  /* an idle slot (then B is 1) */
        memset(out + (i * heads + g * G) * D, 0, sizeof(float) * G * D);
        continue;
      }
      attend_block(q, q_tok, q_head, k + s * s_slot + g * s_head, v + s * s_slot + g * s_head, s_col, lens, i, B,
                   g, heads, G, D, columns, scale, out, qs, p);
    }
  }
  return DG_OK;
}

/* exp(x) over the whole float range (clamped to +-88.38), the polynomial of exp_neg. */
static inline __m256 exp_any(__m256 x) {
  return exp_neg(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)));
}

/* y = w * (x * 1/sqrt(mean(x^2) + eps)) per row of N (transformers' Llama-style RMSNorm, its order of
 * multiplications; only the sum of squares runs in another order). */
void rms_norm(const float* x, const float* w, float* y, int64_t M, int64_t N, float eps) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * N;
    float* yr = y + m * N;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= N; i += 8) { const __m256 v = _mm256_loadu_ps(xr + i); acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v)); }
    float ss = hsum(acc);
    for (; i < N; i++) ss += xr[i] * xr[i];
    const float r = 1.f / sqrtf(ss / (float)N + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= N; i += 8)
      _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), rv)));
    for (; i < N; i++) yr[i] = w[i] * (xr[i] * r);
  }
}

/* y[m, :I] = silu(gu[m, :I]) * gu[m, I:2I]  (a fused gate/up projection's output) */
void silu_mul(const float* gu, float* y, int64_t M, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (int64_t m = 0; m < M; m++) {
    const float* g = gu + m * 2 * I;
    const float* u = g + I;
    float* yr = y + m * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp_any(_mm256_sub_ps(zero, gv))));
      _mm256_storeu_ps(yr + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < I; i++) yr[i] = g[i] / (1.f + expf(-g[i])) * u[i];
  }
}

/* Write each token's key and value rows (kv_heads x D, token t of head h at t*x_tok + h*x_head) into
 * slot slots[t], column cols[t] of the buffers (slot, head, column at s_slot, s_head, s_col). Checks every
 * slot and column first; writes nothing on an error. */
int write_kv(const float* key, const float* value, int64_t x_tok, int64_t x_head, int64_t tokens,
             int64_t kv_heads, int64_t D, float* keys, float* values, int64_t s_slot, int64_t s_head,
             int64_t s_col, const int64_t* slots, const int64_t* cols, int64_t n_slots, int64_t columns,
             int64_t* info) {
  int error = in_range(slots, tokens, 0, n_slots, DG_SLOT, info);
  if (!error) error = in_range(cols, tokens, 0, columns, DG_COLUMN, info);
  if (error) return error;
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t at = slots[t] * s_slot + h * s_head + cols[t] * s_col;
      memcpy(keys + at, key + t * x_tok + h * x_head, sizeof(float) * D);
      memcpy(values + at, value + t * x_tok + h * x_head, sizeof(float) * D);
    }
  return DG_OK;
}

/* Rotary position embedding in place, transformers' `x * cos + rotate_half(x) * sin` (rotate_half(x) =
 * [-x2, x1]) with its roundings: two products, then one sum (no FMA contraction). Token t, head h at
 * x + t*ldx + h*D; cos/sin rows of D per token, ldc apart. */
__attribute__((optimize("fp-contract=off")))
void rotary(float* x, int64_t ldx, int64_t tokens, int64_t heads, int64_t D, const float* cos, const float* sin,
            int64_t ldc) {
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF /* clang: the attribute above is GCC's */
#endif
  const int64_t H = D / 2;
  for (int64_t t = 0; t < tokens; t++) {
    const float* c = cos + t * ldc;
    const float* s = sin + t * ldc;
    for (int64_t h = 0; h < heads; h++) {
      float* v = x + t * ldx + h * D;
      int64_t i = 0;
      for (; i + 8 <= H; i += 8) {
        const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + H + i);
        const __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)), _mm256_mul_ps(b, _mm256_loadu_ps(s + i)));
        const __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + H + i)),
                                        _mm256_mul_ps(a, _mm256_loadu_ps(s + H + i)));
        _mm256_storeu_ps(v + i, lo);
        _mm256_storeu_ps(v + H + i, hi);
      }
      for (; i < H; i++) {
        const float a = v[i], b = v[H + i];
        const float lo = a * c[i] - b * s[i], hi = b * c[H + i] + a * s[H + i];
        v[i] = lo;
        v[H + i] = hi;
      }
    }
  }
}

/* Floats of scratch one llama_stack call over T tokens needs (its buffers, then per-thread attention). */
int64_t stack_scratch(int64_t T, int64_t H, int64_t heads, int64_t kv_heads, int64_t D, int64_t I,
                      int64_t columns, int threads) {
  const int64_t W = (heads + 2 * kv_heads) * D;
  return T * (H + W + heads * D + 3 * I) + threads * attention_scratch(heads, kv_heads, D, columns);
}

/* A Llama-style decoder stack over T tokens, each token t at slot slots[t], column cols[t], attending to
 * that slot's columns 0..lens[t]-1 (its own among them); decode tokens and prompt tokens alike. Per layer
 *   h = rms_norm(x); [q|k|v] = h @ Wq/Wk/Wv^T (+ b); rotary(q, k); keys/values[slots[t], :, cols[t]] = k, v;
 *   a = slot_attention(q, slots, lens); x = x + a @ Wo^T (+ bo);
 *   h = rms_norm(x); [g|u] = h @ Wg/Wu^T; x = x + (silu(g) * u) @ Wd^T (+ bd)
 * then out = rms_norm(x) with the final norm. x (T x H) is the residual stream, updated in place.
 * table: per layer LAYER_PTRS addresses (see the enum), 0 for an absent bias; eps: per layer two norms'
 * eps; scratch: stack_scratch(...) floats. Checks every slot, column and length first. */
enum { P_NORM1, P_WQ, P_BQ, P_WK, P_BK, P_WV, P_BV, P_WO, P_BO, P_NORM2, P_WG, P_WU, P_WD, P_BD, P_KEYS, P_VALUES,
       LAYER_PTRS };

int llama_stack(float* x, float* out, int64_t T, int64_t H, int64_t L, const int64_t* table, const float* eps,
                const float* final_norm, float final_eps, int64_t heads, int64_t kv_heads, int64_t D, int64_t I,
                float scale, const float* cos, const float* sin, const int64_t* slots, const int64_t* cols,
                const int64_t* lens, int64_t n_slots, int64_t columns, int64_t s_slot, int64_t s_head,
                int64_t s_col, float* scratch, int threads, int64_t* info) {
  int error = in_range(slots, T, 0, n_slots, DG_SLOT, info);
  if (!error) error = in_range(cols, T, 0, columns, DG_COLUMN, info);
  if (!error) error = in_range(lens, T, 0, columns + 1, DG_LENGTH, info);
  if (error) return error;
  const int64_t QW = heads * D, KW = kv_heads * D, W = QW + 2 * KW;
  float* h = scratch;
  float* qkv = h + T * H;
  float* att = qkv + T * W;
  float* gu = att + T * QW;
  float* act = gu + T * 2 * I;
  float* per_thread = act + T * I;
  for (int64_t l = 0; l < L; l++) {
    const float* const* p = (const float* const*)(table + l * LAYER_PTRS);
    rms_norm(x, p[P_NORM1], h, T, H, eps[2 * l]);
    packed_linear(h, H, p[P_WQ], p[P_BQ], qkv, W, 0, 0, T, QW, H, threads);
    packed_linear(h, H, p[P_WK], p[P_BK], qkv + QW, W, 0, 0, T, KW, H, threads);
    packed_linear(h, H, p[P_WV], p[P_BV], qkv + QW + KW, W, 0, 0, T, KW, H, threads);
    rotary(qkv, W, T, heads + kv_heads, D, cos, sin, D);
    /* indexes were checked above: neither call can fail */
    write_kv(qkv + QW, qkv + QW + KW, W, D, T, kv_heads, D, (float*)p[P_KEYS], (float*)p[P_VALUES], s_slot, s_head,
             s_col, slots, cols, n_slots, columns, info);
    slot_attention(qkv, W, D, p[P_KEYS], p[P_VALUES], s_slot, s_head, s_col, slots, lens, n_slots, columns, att, T,
                   heads, kv_heads, D, scale, per_thread, threads, info);
    packed_linear(att, QW, p[P_WO], p[P_BO], x, H, x, H, T, H, QW, threads);
    rms_norm(x, p[P_NORM2], h, T, H, eps[2 * l + 1]);
    packed_linear(h, H, p[P_WG], 0, gu, 2 * I, 0, 0, T, I, H, threads);
    packed_linear(h, H, p[P_WU], 0, gu + I, 2 * I, 0, 0, T, I, H, threads);
    silu_mul(gu, act, T, I);
    packed_linear(act, I, p[P_WD], p[P_BD], x, H, x, H, T, H, I, threads);
  }
  rms_norm(x, final_norm, out, T, H, final_eps);
  return DG_OK;
}

/* Embedding rows gathered from a packed weight (a tied input embedding / lm_head, packed for the head's
 * GEMM): row v lives in panel v / 16 (16 wide, or the narrow last panel of vocab % 16), lane v % 16.
 * Checks every id first. */
int packed_embedding(const int64_t* ids, int64_t n, const float* P, int64_t vocab, int64_t K, float* out,
                     int64_t* info) {
  const int error = in_range(ids, n, 0, vocab, DG_TOKEN, info);
  if (error) return error;
  const int64_t full = vocab / PANEL;
  for (int64_t i = 0; i < n; i++) {
    const int64_t panel = ids[i] / PANEL, width = panel < full ? PANEL : vocab % PANEL;
    const float* base = P + panel * K * PANEL + ids[i] % PANEL;
    float* row = out + i * K;
    for (int64_t k = 0; k < K; k++) row[k] = base[k * width];
  }
  return DG_OK;
}
