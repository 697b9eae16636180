/* Native CPU kernels for the engine (bf16), compiled for the machine they run on by niyama.engine.native.
 *
 * - Decode attention over the paged KV cache, read in place: one query token per sequence attends to its
 *   whole context through its block table. The torch path gathers every sequence's blocks into a padded
 *   copy and runs SDPA over it; at decode sizes (tens of sequences, hundreds of tokens) that copy and SDPA's
 *   per-call overhead cost 2-4x what reading the blocks once does.
 * - A layer's element-wise steps, fused: add + RMSNorm, rotary embedding + KV-cache write, SiLU x up.
 * - Logits: the bf16 head's output widened with each row's top k recomputed in float32, and argmax.
 * - Projections of a few rows read as the model file's codes: 8-bit (exact float32 products) and 4-bit
 *   (integer products), and a whole decode step of a few sequences in one call on the 4-bit ones.
 *
 * Layouts are row-major; bf16 values travel as uint16_t. Arithmetic is float32, rounded to bf16 where the
 * torch path rounds.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_HEAD_DIM 256
#define MAX_QUERY_ROWS 64  /* query heads */
#define SPAN 16  /* tokens scored at a time */
#define AHEAD_CHECK 4096  /* bytes read ahead between checks whether attention is done */
/* An op that both the per-op entry points and niyama_q4_decode run: one compiled copy, called with the same
 * shapes. Inlined or specialized at each call site, its auto-vectorized loops may round differently at each
 * (they did on an AVX2-only EPYC, where no intrinsics fix the order), and the fused decode would no longer
 * compute the same numbers as the per-op path. */
#define SHARED_OP static __attribute__((noipa))

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } v = { (uint32_t)x << 16 };
    return v.f;
}

static inline uint16_t float_to_bf16(float x) {  /* round to nearest even, as torch does (finite x) */
    union { float f; uint32_t u; } v = { x };
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* dst[d] = src[d] as float, for one head_dim row. */
static inline void load_row(float *dst, const uint16_t *src, int dim) {
#ifdef __AVX512F__
    if (dim % 16 == 0) {
        for (int d = 0; d < dim; d += 16) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(src + d));
            _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
        }
        return;
    }
#endif
    for (int d = 0; d < dim; d++) dst[d] = bf16_to_float(src[d]);
}

static inline float dot(const float *a, const float *b, int dim) {
#ifdef __AVX512F__
    if (dim % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int d = 16; d < dim; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int d = 0; d < dim; d++) s += a[d] * b[d];
    return s;
}

/* acc[d] += p * x[d] */
static inline void axpy(float *acc, float p, const float *x, int dim) {
    #pragma omp simd
    for (int d = 0; d < dim; d++) acc[d] += p * x[d];
}

/* The block after the one being read, read into the cache a few lines of keys and values at a time over
 * `steps` pieces of the work on this one: a burst of prefetches would stall on the core's few outstanding
 * misses instead of overlapping that work. */
typedef struct { const char *keys, *values; int64_t at, end, per_step; } BlockAhead;

static inline BlockAhead block_ahead(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                                     int32_t start, int32_t len, int32_t block_size, int64_t block_stride,
                                     int32_t steps) {
    BlockAhead ahead = { NULL, NULL, 0, 0, 0 };
    if (start % block_size == 0 && start + block_size < len) {
        const int64_t next = table[start / block_size + 1] * block_stride, bytes = block_stride * (int64_t)sizeof(uint16_t);
        ahead = (BlockAhead){ (const char *)(k_cache + next), (const char *)(v_cache + next), 0, bytes,
                              (bytes / 64 + steps - 1) / steps * 64 };
    }
    return ahead;
}

static inline void block_ahead_step(BlockAhead *ahead) {
    const int64_t until = ahead->at + ahead->per_step < ahead->end ? ahead->at + ahead->per_step : ahead->end;
    for (; ahead->at < until; ahead->at += 64) {
        __builtin_prefetch(ahead->keys + ahead->at);
        __builtin_prefetch(ahead->values + ahead->at);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ATTEND_BF16_DOTS 1
#define BF16_LANES 32  /* bf16 values in a vector */
_Static_assert(SPAN == 16, "sum_lanes16 and the 16-bit live mask score 16 tokens at a time");

/* Lane i of the result: the sum of v[i]'s 16 lanes. Pairs of vectors are folded into one by halving, so the
 * 16 sums cost 15 folds instead of 16 full horizontal reductions. */
static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 pairs[8], quads[4], octets[2];
    for (int j = 0; j < 8; j++)  /* each 128-bit lane: [v2j, v2j+1, v2j, v2j+1] partial sums */
        pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) {  /* each 128-bit lane: [v4j .. v4j+3] partial sums */
        const __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
        quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int j = 0; j < 2; j++)  /* 128-bit lanes: [v8j..+3, v8j..+3, v8j+4..+7, v8j+4..+7] partial sums */
        octets[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(octets[0], octets[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* attend() for head dims that are a multiple of 32, with AVX512-BF16 dot products (float32 sums; each
 * product of two bf16 values is exact in float32). Scores: q . k, SPAN tokens' sums across lanes at once.
 * Values: two tokens' values interleaved, weighted by their two softmax weights rounded to bf16 (as torch's
 * CPU flash attention rounds them), in one instruction; the interleaving leaves each 32-value vector's
 * sums as two vectors of dims 8l..8l+3 and 8l+4..8l+7 for each 128-bit lane l, put back in order at the end. */
static void attend_bf16_dots(
        const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int32_t len,
        int32_t kv_heads, int32_t group, int32_t dim, int32_t block_size, int64_t token_stride, float scale,
        uint16_t *out) {
    const int32_t rows = kv_heads * group, vectors = dim / BF16_LANES, sums_per_row = 2 * vectors;
    const int64_t block_stride = block_size * token_stride;
    __m512 acc[MAX_QUERY_ROWS * MAX_HEAD_DIM / 16], dots[SPAN];
    __m512i pairs[SPAN / 2][MAX_HEAD_DIM / 16];
    __m512bh qv[MAX_QUERY_ROWS][MAX_HEAD_DIM / BF16_LANES];
    float maxs[MAX_QUERY_ROWS], sums[MAX_QUERY_ROWS], p[SPAN];
    uint32_t weight_pairs[SPAN / 2];
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t c = 0; c < vectors; c++)
            qv[r][c] = (__m512bh)_mm512_loadu_si512(q + (int64_t)r * dim + c * BF16_LANES);
        for (int32_t c = 0; c < sums_per_row; c++) acc[r * sums_per_row + c] = _mm512_setzero_ps();
        maxs[r] = -FLT_MAX;
        sums[r] = 0.0f;
    }
    for (int32_t start = 0; start < len; start += SPAN) {  /* SPAN tokens at a time, within one block */
        const int32_t in_block = start % block_size, n = len - start < SPAN ? len - start : SPAN;
        const int64_t block = table[start / block_size] * block_stride;
        const int32_t span = n < block_size - in_block ? n : block_size - in_block, num_pairs = (span + 1) / 2;
        const __mmask16 live = (__mmask16)((1u << span) - 1u);
        BlockAhead ahead = block_ahead(k_cache, v_cache, table, start, len, block_size, block_stride, rows * SPAN);
        const uint16_t *keys = k_cache + block + in_block * token_stride;
        const uint16_t *values = v_cache + block + in_block * token_stride;
        for (int32_t h = 0; h < kv_heads; h++) {
            for (int32_t j = 0; j < num_pairs; j++)
                for (int32_t c = 0; c < vectors; c++) {
                    const uint16_t *first = values + 2 * j * token_stride + h * dim + c * BF16_LANES;
                    const __m512i a = _mm512_loadu_si512(first);
                    const __m512i b = 2 * j + 1 < span ? _mm512_loadu_si512(first + token_stride) : _mm512_setzero_si512();
                    pairs[j][2 * c] = _mm512_unpacklo_epi16(a, b);
                    pairs[j][2 * c + 1] = _mm512_unpackhi_epi16(a, b);
                }
            for (int32_t r = h * group; r < (h + 1) * group; r++) {
                for (int32_t i = 0; i < SPAN; i++) {
                    block_ahead_step(&ahead);
                    __m512 d = _mm512_setzero_ps();
                    if (i < span)
                        for (int32_t c = 0; c < vectors; c++)
                            d = _mm512_dpbf16_ps(d, qv[r][c],
                                (__m512bh)_mm512_loadu_si512(keys + i * token_stride + h * dim + c * BF16_LANES));
                    dots[i] = d;
                }
                const __m512 scores = _mm512_mul_ps(sum_lanes16(dots), _mm512_set1_ps(scale));
                const float m = fmaxf(maxs[r], _mm512_mask_reduce_max_ps(live, scores));
                _mm512_storeu_ps(p, _mm512_sub_ps(scores, _mm512_set1_ps(m)));
                #pragma omp simd
                for (int32_t i = 0; i < SPAN; i++) p[i] = expf(p[i]);
                const __m256bh weights = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, p));
                _mm256_storeu_si256((__m256i *)weight_pairs, (__m256i)weights);
                const float rescale = expf(maxs[r] - m);
                maxs[r] = m;
                sums[r] = sums[r] * rescale + _mm512_reduce_add_ps(_mm512_cvtpbh_ps(weights));
                for (int32_t c = 0; c < sums_per_row; c++) {
                    __m512 a = _mm512_mul_ps(acc[r * sums_per_row + c], _mm512_set1_ps(rescale));
                    for (int32_t j = 0; j < num_pairs; j++)
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32((int)weight_pairs[j]), (__m512bh)pairs[j][c]);
                    acc[r * sums_per_row + c] = a;
                }
            }
        }
        start += span - SPAN;  /* a span cut short by the block's end resumes at the next block */
    }
    for (int32_t r = 0; r < rows; r++)
        for (int32_t c = 0; c < sums_per_row; c++) {
            float sum[16];
            _mm512_storeu_ps(sum, acc[r * sums_per_row + c]);
            for (int32_t lane = 0; lane < 16; lane++)  /* dim: 32 per vector pair, 8 per 128-bit lane */
                out[(int64_t)r * dim + (c / 2) * BF16_LANES + (lane / 4) * 8 + (c % 2) * 4 + lane % 4] =
                    float_to_bf16(sum[lane] / sums[r]);
        }
}
#endif

/* One sequence: its kv_heads * group query rows attend to its `len` cached tokens, in one pass with an
 * online softmax (a running maximum rescales what was summed before). Each token's keys, then values, of
 * the kv_heads heads are one contiguous row, read once; the next block is read ahead while this one is used.
 * token_stride: elements from one token to the next in the cache (kv_heads * dim). */
SHARED_OP void attend(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                   int32_t len, int32_t kv_heads, int32_t group, int32_t dim, int32_t block_size,
                   int64_t token_stride, float scale, uint16_t *out) {
#ifdef ATTEND_BF16_DOTS
    if (dim % BF16_LANES == 0) {
        attend_bf16_dots(q, k_cache, v_cache, table, len, kv_heads, group, dim, block_size, token_stride, scale, out);
        return;
    }
#endif
    const int32_t rows = kv_heads * group;
    const int64_t block_stride = block_size * token_stride;
    float qf[MAX_QUERY_ROWS * MAX_HEAD_DIM], acc[MAX_QUERY_ROWS * MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float maxs[MAX_QUERY_ROWS], sums[MAX_QUERY_ROWS], p[MAX_QUERY_ROWS][SPAN];
    for (int32_t r = 0; r < rows; r++) {
        load_row(qf + r * dim, q + (int64_t)r * dim, dim);
        for (int32_t d = 0; d < dim; d++) {
            qf[r * dim + d] *= scale;
            acc[r * dim + d] = 0.0f;
        }
        maxs[r] = -FLT_MAX;
        sums[r] = 0.0f;
    }
    for (int32_t start = 0; start < len; start += SPAN) {  /* SPAN tokens at a time, within one block */
        const int32_t in_block = start % block_size, n = len - start < SPAN ? len - start : SPAN;
        const int64_t block = table[start / block_size] * block_stride;
        const int32_t span = n < block_size - in_block ? n : block_size - in_block;
        BlockAhead ahead = block_ahead(k_cache, v_cache, table, start, len, block_size, block_stride, span * rows);
        const uint16_t *keys = k_cache + block + in_block * token_stride;
        const uint16_t *values = v_cache + block + in_block * token_stride;
        for (int32_t i = 0; i < span; i++)
            for (int32_t h = 0; h < kv_heads; h++) {
                load_row(row, keys + i * token_stride + h * dim, dim);
                for (int32_t r = h * group; r < (h + 1) * group; r++) {
                    block_ahead_step(&ahead);
                    p[r][i] = dot(qf + r * dim, row, dim);
                }
            }
        for (int32_t r = 0; r < rows; r++) {
            float m = maxs[r], sum = 0.0f;
            for (int32_t i = 0; i < span; i++) m = p[r][i] > m ? p[r][i] : m;
            const float rescale = expf(maxs[r] - m);
            #pragma omp simd reduction(+:sum)
            for (int32_t i = 0; i < span; i++) {
                p[r][i] = expf(p[r][i] - m);
                sum += p[r][i];
            }
            maxs[r] = m;
            sums[r] = sums[r] * rescale + sum;
            for (int32_t d = 0; d < dim; d++) acc[r * dim + d] *= rescale;
        }
        for (int32_t i = 0; i < span; i++)
            for (int32_t h = 0; h < kv_heads; h++) {
                load_row(row, values + i * token_stride + h * dim, dim);
                for (int32_t r = h * group; r < (h + 1) * group; r++) axpy(acc + r * dim, p[r][i], row, dim);
            }
        start += span - SPAN;  /* a span cut short by the block's end resumes at the next block */
    }
    for (int32_t r = 0; r < rows; r++)
        for (int32_t d = 0; d < dim; d++) out[(int64_t)r * dim + d] = float_to_bf16(acc[r * dim + d] / sums[r]);
}

/* Read `ahead`'s memory (num_ahead ranges, in order) into the cache until *pending (work other threads do
 * meanwhile) reaches 0: memory is otherwise idle while they work. */
static void read_ahead(const void *const *ahead, const int64_t *ahead_bytes, int32_t num_ahead,
                       const int32_t *pending) {
    for (int32_t a = 0; a < num_ahead; a++)
        for (int64_t at = 0; at < ahead_bytes[a]; at += 64) {
            if (at % AHEAD_CHECK == 0) {
                int32_t left;
                #pragma omp atomic read
                left = *pending;
                if (!left) return;
            }
            __builtin_prefetch((const char *)ahead[a] + at, 0, 2);
        }
}

/* q rows [num_seqs][kv_heads * group][dim] with a row stride; caches [num_blocks][block_size][kv_heads][dim];
 * block tables [num_seqs][table_width]; out rows like q. Returns 0, or -1 for shapes the kernel does not
 * take (head_dim > MAX_HEAD_DIM, more query heads than MAX_QUERY_ROWS). Sequences are spread over
 * `threads` OpenMP threads (the runtime torch already uses). */
int niyama_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int32_t *tables, int32_t table_width, const int32_t *lens, int32_t num_seqs,
                            int32_t kv_heads, int32_t group, int32_t dim, int32_t block_size, float scale,
                            uint16_t *out, int64_t out_stride, const void *const *ahead, const int64_t *ahead_bytes,
                            int32_t num_ahead, int32_t threads) {
    if (dim > MAX_HEAD_DIM || kv_heads * group > MAX_QUERY_ROWS) return -1;
    int32_t pending = num_seqs;
    #pragma omp parallel num_threads(threads) shared(pending)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        /* Round-robin: the runner passes sequences longest first. */
        for (int32_t b = tid; b < num_seqs; b += team) {
            attend(q + b * q_stride, k_cache, v_cache, tables + (int64_t)b * table_width, lens[b], kv_heads, group,
                   dim, block_size, (int64_t)kv_heads * dim, scale, out + b * out_stride);
            #pragma omp atomic update
            pending--;
        }
        /* A thread done with its sequences meanwhile reads the memory the next steps will (their weights). */
        read_ahead(ahead, ahead_bytes, num_ahead, &pending);
    }
    return 0;
}

/* ---- Element-wise layer ops, fused. Each rounds to bf16 where torch's bf16 ops round, so that the native
 * and torch paths compute the same numbers (up to the order of float sums). Rows go to OpenMP threads
 * when there are enough of them to pay for waking the threads. */

#define PARALLEL_MIN_ELEMENTS 32768

static inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

SHARED_OP void norm_row(const float *x, int64_t cols, const uint16_t *weight, float eps, uint16_t *out) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int64_t c = 0; c < cols; c++) sum += x[c] * x[c];
    const float rstd = 1.0f / sqrtf(sum / (float)cols + eps);
    #pragma omp simd
    for (int64_t c = 0; c < cols; c++) out[c] = float_to_bf16(round_bf16(x[c] * rstd) * bf16_to_float(weight[c]));
}

SHARED_OP void add_norm_row(float *h, const uint16_t *delta, int64_t cols, const uint16_t *weight, float eps,
                         uint16_t *out) {
    #pragma omp simd
    for (int64_t c = 0; c < cols; c++) h[c] += bf16_to_float(delta[c]);
    norm_row(h, cols, weight, eps, out);
}

SHARED_OP void silu_mul_row(const uint16_t *gate, const uint16_t *up, int64_t cols, uint16_t *out) {
    #pragma omp simd
    for (int64_t c = 0; c < cols; c++) {
        const float g = bf16_to_float(gate[c]);
        out[c] = float_to_bf16(round_bf16(g / (1.0f + expf(-g))) * bf16_to_float(up[c]));
    }
}

/* Rotary embedding in place on `heads` consecutive heads of one token (rotate-half, as transformers:
 * x * cos + cat(-x2, x1) * sin, each product and the sum rounded to bf16); c, s: its position's cos/sin. */
static void rope_heads(uint16_t *x, int32_t heads, int32_t dim, const uint16_t *c, const uint16_t *s) {
    const int32_t half = dim / 2;
    for (int32_t head = 0; head < heads; head++, x += dim) {
        #pragma omp simd
        for (int32_t d = 0; d < half; d++) {
            const float x1 = bf16_to_float(x[d]), x2 = bf16_to_float(x[d + half]);
            const float c1 = bf16_to_float(c[d]), c2 = bf16_to_float(c[d + half]);
            const float s1 = bf16_to_float(s[d]), s2 = bf16_to_float(s[d + half]);
            const float lo = round_bf16(x1 * c1) + round_bf16(-x2 * s1);
            const float hi = round_bf16(x2 * c2) + round_bf16(x1 * s2);
            x[d] = float_to_bf16(lo);
            x[d + half] = float_to_bf16(hi);
        }
    }
}

/* One token's qkv row [(q_heads + 2 * kv_heads) * dim]: rotary embedding on its query and key heads, then its
 * keys and values stored at element `slot` of the k/v caches. c, s: its position's cos/sin. */
SHARED_OP void rope_store_row(uint16_t *row, int32_t q_heads, int32_t kv_heads, int32_t dim, const uint16_t *c,
                              const uint16_t *s, int64_t slot, uint16_t *k_cache, uint16_t *v_cache) {
    const int64_t kv_width = (int64_t)kv_heads * dim;
    rope_heads(row, q_heads + kv_heads, dim, c, s);
    const uint16_t *k = row + (int64_t)q_heads * dim;
    memcpy(k_cache + slot, k, sizeof(uint16_t) * kv_width);
    memcpy(v_cache + slot, k + kv_width, sizeof(uint16_t) * kv_width);
}

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), x float32 [rows][cols], out bf16. */
void niyama_rms_norm(const float *x, int64_t rows, int64_t cols, const uint16_t *weight, float eps, uint16_t *out,
                     int32_t threads) {
    #pragma omp parallel for num_threads(threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * cols, cols, weight, eps, out + r * cols);
}

/* h += delta (bf16, in place on the float32 residual stream h), then out = rms_norm(h) as above. */
void niyama_add_rms_norm(float *h, const uint16_t *delta, int64_t rows, int64_t cols, const uint16_t *weight,
                         float eps, uint16_t *out, int32_t threads) {
    #pragma omp parallel for num_threads(threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) add_norm_row(h + r * cols, delta + r * cols, cols, weight, eps, out + r * cols);
}

/* out = bf16(silu(gate)) * up, from gate_up [rows][2 * cols] (gate first) to out [rows][cols]. */
void niyama_silu_mul(const uint16_t *gate_up, int64_t rows, int64_t cols, uint16_t *out, int32_t threads) {
    #pragma omp parallel for num_threads(threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * 2 * cols, gate_up + r * 2 * cols + cols, cols,
                                                     out + r * cols);
}

/* Rotary embedding in place on the query and key heads of qkv rows [rows][(q_heads + 2 * kv_heads) * dim]
 * (rope_heads), then each row's keys and values stored at its cache slot (block, offset) of k/v caches
 * [blocks][block_size][kv_heads][dim]. cos/sin: bf16 tables [positions][dim]. */
void niyama_rope_store_kv(uint16_t *qkv, int64_t rows, int32_t q_heads, int32_t kv_heads, int32_t dim,
                          const uint16_t *cos, const uint16_t *sin, const int64_t *positions,
                          const int64_t *slot_blocks, const int64_t *slot_offsets, uint16_t *k_cache,
                          uint16_t *v_cache, int32_t block_size, int32_t threads) {
    const int64_t width = (int64_t)(q_heads + 2 * kv_heads) * dim, kv_width = (int64_t)kv_heads * dim;
    #pragma omp parallel for num_threads(threads) if(rows * width >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        rope_store_row(qkv + r * width, q_heads, kv_heads, dim, cos + positions[r] * dim, sin + positions[r] * dim,
                       (slot_blocks[r] * block_size + slot_offsets[r]) * kv_width, k_cache, v_cache);
}

/* ---- Logits. */

#define MAX_RESCORED 256

/* Float32 logits [rows][vocab] from the bf16 ones of the bf16 head: each row widened, and its k highest
 * entries (by bf16 value) recomputed exactly as head[i] . x (float32 head [vocab][dim], x [rows][dim]). */
void niyama_rescored_logits(const uint16_t *low, int64_t rows, int64_t vocab, const float *x, const float *head,
                            int64_t dim, int32_t k, float *out, int32_t threads) {
    if (k > vocab) k = (int32_t)vocab;
    if (k > MAX_RESCORED) k = MAX_RESCORED;
    #pragma omp parallel for num_threads(threads) if(rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *src = low + r * vocab;
        float *dst = out + r * vocab, top[MAX_RESCORED];
        int64_t at[MAX_RESCORED];
        int32_t filled = 0, lowest = 0;  /* top[lowest] is the smallest kept value once k are kept */
        for (int64_t start = 0; start < vocab; start += 16) {
            const int64_t n = vocab - start < 16 ? vocab - start : 16;
            float chunk_max = -FLT_MAX;
            for (int64_t j = 0; j < n; j++) {
                dst[start + j] = bf16_to_float(src[start + j]);
                chunk_max = dst[start + j] > chunk_max ? dst[start + j] : chunk_max;
            }
            if (filled == k && chunk_max <= top[lowest]) continue;
            for (int64_t j = 0; j < n; j++) {
                const float v = dst[start + j];
                if (filled < k) {
                    top[filled] = v;
                    at[filled++] = start + j;
                } else if (v > top[lowest]) {
                    top[lowest] = v;
                    at[lowest] = start + j;
                } else {
                    continue;
                }
                if (filled == k)
                    for (int32_t c = 0; c < k; c++) lowest = top[c] < top[lowest] ? c : lowest;
            }
        }
        for (int32_t c = 0; c < filled; c++) {
            const float *w = head + at[c] * dim, *xr = x + r * dim;
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (int64_t d = 0; d < dim; d++) s += w[d] * xr[d];
            dst[at[c]] = s;
        }
    }
}

/* The index of each row's first maximum (as torch's max(dim).indices). */
void niyama_argmax(const float *x, int64_t rows, int64_t cols, int64_t *out, int32_t threads) {
    #pragma omp parallel for num_threads(threads) if(rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        float best = row[0];
        #pragma omp simd reduction(max:best)
        for (int64_t c = 0; c < cols; c++) best = row[c] > best ? row[c] : best;
        int64_t first = 0;
        while (first < cols - 1 && row[first] != best) first++;
        out[r] = first;
    }
}

/* ---- An 8-bit projection read as the model file's codes (Q8_0: per group of 32 inputs, an fp16 scale times
 * q in -127..127), for a few rows (decode steps): the weights are read once, widened exactly to float32 (an
 * 8-bit code times an fp16 scale fits float32's mantissa) and multiplied in float32. */

#define Q8_GROUP 32
#define Q8_MAX_ROWS 8
#define Q8_AHEAD 2  /* output rows prefetched ahead: the hardware prefetcher alone left the stream latency-bound */

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const float magnitude = exponent == 0    ? ldexpf((float)mantissa, -24)
                            : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                             : ldexpf((float)(mantissa | 0x400), exponent - 25);
    return h & 0x8000 ? -magnitude : magnitude;
#endif
}

#ifdef __AVX512F__
/* Weights 16 * half .. 16 * half + 15 of group g, widened: scale times code. */
static inline __m512 q8_widen(const int8_t *q, const uint16_t *scale, int64_t g, int half) {
    return _mm512_mul_ps(_mm512_set1_ps(half_to_float(scale[g])), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)(q + g * Q8_GROUP + 16 * half)))));
}
#endif

/* One output for `rows` rows; `rows` is a compile-time constant where inlined, so the accumulators stay in
 * registers. Two groups at a time go to separate accumulators, so that the FMA chains overlap. */
static inline void q8_row(const float *x, int64_t rows, int64_t in, const int8_t *q, const uint16_t *scale, float *y,
                          int64_t out) {
    const int64_t groups = in / Q8_GROUP;
#ifdef __AVX512F__
    __m512 acc[Q8_MAX_ROWS][4];
    for (int64_t r = 0; r < rows; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
        const __m512 w[4] = {q8_widen(q, scale, g, 0), q8_widen(q, scale, g, 1), q8_widen(q, scale, g + 1, 0),
                             q8_widen(q, scale, g + 1, 1)};
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < 4; j++)
                acc[r][j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + r * in + g * Q8_GROUP + 16 * j), acc[r][j]);
    }
    for (; g < groups; g++) {
        for (int half = 0; half < 2; half++) {
            const __m512 w = q8_widen(q, scale, g, half);
            for (int64_t r = 0; r < rows; r++)
                acc[r][half] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * in + g * Q8_GROUP + 16 * half), acc[r][half]);
        }
    }
    for (int64_t r = 0; r < rows; r++)
        y[r * out] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                        _mm512_add_ps(acc[r][2], acc[r][3])));
#else
    for (int64_t r = 0; r < rows; r++) {
        float sum = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const float s = half_to_float(scale[g]);
            for (int j = 0; j < Q8_GROUP; j++) sum += s * (float)q[g * Q8_GROUP + j] * x[r * in + g * Q8_GROUP + j];
        }
        y[r * out] = sum;
    }
#endif
}

/* y [rows][out] = x [rows][in] . W^T in float32, W = scales [out][in / 32] (fp16) * codes [out][in] (int8), for
 * rows <= Q8_MAX_ROWS. */
void niyama_q8_linear(const float *x, int64_t rows, int64_t in, const int8_t *codes, const uint16_t *scales,
                      int64_t out, float *y, int32_t threads) {
    const int64_t groups = in / Q8_GROUP;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *q = codes + o * in;
        if (o + Q8_AHEAD < out)
            for (int64_t at = 0; at < in; at += 64) __builtin_prefetch(q + Q8_AHEAD * in + at);
        const uint16_t *s = scales + o * groups;
        switch (rows) {  /* constant row counts: accumulators in registers */
            case 1: q8_row(x, 1, in, q, s, y + o, out); break;
            case 2: q8_row(x, 2, in, q, s, y + o, out); break;
            case 3: q8_row(x, 3, in, q, s, y + o, out); break;
            case 4: q8_row(x, 4, in, q, s, y + o, out); break;
            default: q8_row(x, rows, in, q, s, y + o, out); break;
        }
    }
}

/* ---- A 4-bit projection read as the model file's codes (Q4_1: per group of 32 inputs, w = low + step * q,
 * q in 0..15, fp16 step and low), for a few rows; and a whole decode step of a few sequences in one call.
 *
 * The inputs are written as integers too, so that AVX512-VNNI's vpdpbusd multiplies 64 codes by 4 inputs
 * each and sums them in one instruction (AVX2: vpmaddubsw and vpmaddwd, ~1.4x the time; a build with
 * neither has no 4-bit path, see niyama_q4_vectorized). Per group of 32 inputs with a float32 scale, each input is
 * xscale * (xq + xr / 254) with xq and xr int8 (llama.cpp keeps xq alone, 1/254 of the group's largest
 * magnitude: on SmolLM2 that moved the greedy token at 3% of positions; with xr the error is ~1/64,000 of
 * it, far below the bf16 rounding the inputs already carry). Over a group, sum(w * x) = step * xscale *
 * (sum(q * xq) + sum(q * xr) / 254) + low * sum(x), the last with the exact float sum of the inputs.
 * The layout puts one output per 32-bit lane: outputs come 16 at a time (a block), and a block's group is
 * 256 bytes, four 64-byte chunks; byte 4i + t of chunk c holds, for output i of the block, input 8c + t of
 * the group in its low nibble and input 8c + 4 + t in its high one. A block's steps and lows are fp16
 * [groups][16]. */

#define Q4_GROUP 32
#define Q4_BLOCK 16  /* outputs */
#define Q4_MAX_ROWS 8
#define Q4_MAX_GROUPS 512  /* inputs per row / Q4_GROUP */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define Q4_VNNI 1
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define Q4_AVX2 1
#endif

typedef struct {
    const uint8_t *codes;  /* [out / 16][in / 32][256], as above */
    const uint16_t *step, *low;  /* fp16 [out / 16][in / 32][16] */
    const uint16_t *bias;  /* bf16 [out], or NULL */
    int64_t out, in;
} Q4Weight;

typedef struct {
    const uint16_t *attn_norm, *mlp_norm;  /* bf16 [hidden] */
    Q4Weight qkv, o, gate_up, down;  /* qkv: q, k, v heads' rows; gate_up: gate rows, then up rows */
    uint16_t *k_cache, *v_cache;  /* bf16 [blocks][block_size][kv_heads][head_dim] */
} Q4Layer;

typedef struct {
    const Q4Layer *layers;
    int32_t num_layers, heads, kv_heads, head_dim, block_size;
    int64_t hidden, intermediate;
    float eps, scale;  /* RMSNorm's epsilon, attention's scale */
    const uint16_t *cos, *sin;  /* bf16 [positions][head_dim] */
} Q4Model;

#if defined(Q4_VNNI) || defined(Q4_AVX2)

/* x bf16 [rows][in] as integers per group: xq and xr (int8, [rows][in]), scales, and exact sums (float32). */
typedef struct {
    int8_t xq[Q4_MAX_ROWS * Q4_MAX_GROUPS * Q4_GROUP], xr[Q4_MAX_ROWS * Q4_MAX_GROUPS * Q4_GROUP];
    float scale[Q4_MAX_ROWS * Q4_MAX_GROUPS], sum[Q4_MAX_ROWS * Q4_MAX_GROUPS];
} Q4Input;

static void q4_quantize(const uint16_t *x, int64_t rows, int64_t in, Q4Input *qx) {
    for (int64_t i = 0; i < rows * in / Q4_GROUP; i++) {
        float v[Q4_GROUP], largest = 0.0f, sum = 0.0f;
        #pragma omp simd reduction(max:largest) reduction(+:sum)
        for (int j = 0; j < Q4_GROUP; j++) {
            v[j] = bf16_to_float(x[i * Q4_GROUP + j]);
            largest = fabsf(v[j]) > largest ? fabsf(v[j]) : largest;
            sum += v[j];
        }
        /* A group too small for 127 / largest to be finite (below ~4e-37) is read as zeros. */
        const float scale = largest / 127.0f, inverse = largest > 127.0f / FLT_MAX ? 127.0f / largest : 0.0f;
        #pragma omp simd
        for (int j = 0; j < Q4_GROUP; j++) {
            const float q = rintf(v[j] * inverse);
            qx->xq[i * Q4_GROUP + j] = (int8_t)q;
            qx->xr[i * Q4_GROUP + j] = (int8_t)rintf((v[j] * inverse - q) * 254.0f);
        }
        qx->scale[i] = scale;
        qx->sum[i] = sum;
    }
}

/* Outputs 16 * block .. 16 * block + 15 for `rows` rows (a compile-time constant where inlined, so the
 * accumulators stay in registers), into y [rows][out]. */
static inline void q4_block(const Q4Weight *w, int64_t block, const Q4Input *qx, int64_t rows, uint16_t *y) {
    const int64_t groups = w->in / Q4_GROUP;
    const uint8_t *codes = w->codes + block * groups * 256;
    const uint16_t *step = w->step + block * groups * Q4_BLOCK, *low = w->low + block * groups * Q4_BLOCK;
    float out[Q4_MAX_ROWS][Q4_BLOCK];
#ifdef Q4_VNNI
    __m512 acc[Q4_MAX_ROWS];
    for (int64_t r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f), high_nibbles = _mm512_set1_epi8((char)0xf0);
    for (int64_t g = 0; g < groups; g++) {
        /* q * xq and q * xr; high nibbles are read as 16 q: a shift at the end */
        __m512i dots[Q4_MAX_ROWS][2], high_dots[Q4_MAX_ROWS][2];
        for (int64_t r = 0; r < rows; r++)
            dots[r][0] = dots[r][1] = high_dots[r][0] = high_dots[r][1] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(codes + g * 256 + 64 * c);
            const __m512i lo = _mm512_and_si512(v, low_nibbles), hi = _mm512_and_si512(v, high_nibbles);
            for (int64_t r = 0; r < rows; r++) {
                int32_t xq[2], xr[2];  /* the 4 inputs of the low nibbles, then the high ones' */
                memcpy(xq, qx->xq + (r * groups + g) * Q4_GROUP + 8 * c, sizeof xq);
                memcpy(xr, qx->xr + (r * groups + g) * Q4_GROUP + 8 * c, sizeof xr);
                dots[r][0] = _mm512_dpbusd_epi32(dots[r][0], lo, _mm512_set1_epi32(xq[0]));
                high_dots[r][0] = _mm512_dpbusd_epi32(high_dots[r][0], hi, _mm512_set1_epi32(xq[1]));
                dots[r][1] = _mm512_dpbusd_epi32(dots[r][1], lo, _mm512_set1_epi32(xr[0]));
                high_dots[r][1] = _mm512_dpbusd_epi32(high_dots[r][1], hi, _mm512_set1_epi32(xr[1]));
            }
        }
        const __m512 steps = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(step + g * Q4_BLOCK)));
        const __m512 lows = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(low + g * Q4_BLOCK)));
        for (int64_t r = 0; r < rows; r++) {
            const __m512i dot = _mm512_add_epi32(dots[r][0], _mm512_srai_epi32(high_dots[r][0], 4));
            const __m512i rest = _mm512_add_epi32(dots[r][1], _mm512_srai_epi32(high_dots[r][1], 4));
            const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest), _mm512_set1_ps(1.0f / 254.0f),
                                               _mm512_cvtepi32_ps(dot));
            const __m512 scale = _mm512_mul_ps(steps, _mm512_set1_ps(qx->scale[r * groups + g]));
            acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(lows, _mm512_set1_ps(qx->sum[r * groups + g]), acc[r]);
        }
    }
    for (int64_t r = 0; r < rows; r++) _mm512_storeu_ps(out[r], acc[r]);
#else
    /* The same sums with AVX2: vpmaddubsw + vpmaddwd in place of vpdpbusd (pairs of products fit int16: the
     * high nibbles are shifted down first), each 64-byte chunk as two halves of 8 outputs. */
    __m256 acc[Q4_MAX_ROWS][2];
    for (int64_t r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < groups; g++)
        for (int half = 0; half < 2; half++) {
            __m256i dots[Q4_MAX_ROWS][2];  /* q * xq, q * xr */
            for (int64_t r = 0; r < rows; r++) dots[r][0] = dots[r][1] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + g * 256 + 64 * c + 32 * half));
                const __m256i lo = _mm256_and_si256(v, low_nibbles);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
                for (int64_t r = 0; r < rows; r++)
                    for (int k = 0; k < 2; k++) {
                        int32_t x[2];  /* the 4 inputs of the low nibbles, then the high ones' */
                        memcpy(x, (k ? qx->xr : qx->xq) + (r * groups + g) * Q4_GROUP + 8 * c, sizeof x);
                        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x[0])),
                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x[1])));
                        dots[r][k] = _mm256_add_epi32(dots[r][k], _mm256_madd_epi16(pairs, ones));
                    }
            }
            const __m256 steps = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(step + g * Q4_BLOCK + 8 * half)));
            const __m256 lows = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(low + g * Q4_BLOCK + 8 * half)));
            for (int64_t r = 0; r < rows; r++) {
                const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][1]), _mm256_set1_ps(1.0f / 254.0f),
                                                   _mm256_cvtepi32_ps(dots[r][0]));
                const __m256 scale = _mm256_mul_ps(steps, _mm256_set1_ps(qx->scale[r * groups + g]));
                acc[r][half] = _mm256_fmadd_ps(sum, scale, acc[r][half]);
                acc[r][half] = _mm256_fmadd_ps(lows, _mm256_set1_ps(qx->sum[r * groups + g]), acc[r][half]);
            }
        }
    for (int64_t r = 0; r < rows; r++) {
        _mm256_storeu_ps(out[r], acc[r][0]);
        _mm256_storeu_ps(out[r] + 8, acc[r][1]);
    }
#endif
    for (int64_t r = 0; r < rows; r++)
        for (int i = 0; i < Q4_BLOCK; i++) {
            const int64_t o = block * Q4_BLOCK + i;
            const float value = w->bias ? round_bf16(out[r][i]) + bf16_to_float(w->bias[o]) : out[r][i];
            y[r * w->out + o] = float_to_bf16(value);
        }
}

/* y [rows][out] = x [rows][in] . W^T (bf16 in and out), inside a parallel region: the blocks of outputs are
 * shared among its threads; each writes the inputs as integers itself, into scratch[its thread number] (no
 * barrier). rows <= Q4_MAX_ROWS. */
SHARED_OP void q4_outputs(const Q4Weight *w, const uint16_t *x, int64_t rows, uint16_t *y, Q4Input *scratch) {
    Q4Input *qx = scratch + omp_get_thread_num();
    q4_quantize(x, rows, w->in, qx);
    #pragma omp for schedule(static)
    for (int64_t block = 0; block < w->out / Q4_BLOCK; block++) {
        switch (rows) {  /* constant row counts: accumulators in registers */
            case 1: q4_block(w, block, qx, 1, y); break;
            case 2: q4_block(w, block, qx, 2, y); break;
            case 3: q4_block(w, block, qx, 3, y); break;
            case 4: q4_block(w, block, qx, 4, y); break;
            default: q4_block(w, block, qx, rows, y); break;
        }
    }
}

static int q4_supported(const Q4Weight *w) {
    return w->out % Q4_BLOCK == 0 && w->in % Q4_GROUP == 0 && w->in / Q4_GROUP <= Q4_MAX_GROUPS;
}

/* One projection (see q4_outputs). Returns 0, or -1 for shapes it does not take. */
int niyama_q4_linear(const uint16_t *x, int64_t rows, const Q4Weight *w, uint16_t *y, int32_t threads) {
    if (rows > Q4_MAX_ROWS || !q4_supported(w)) return -1;
    Q4Input *scratch = malloc(sizeof(Q4Input) * threads);
    if (!scratch) return -1;
    #pragma omp parallel num_threads(threads)
    q4_outputs(w, x, rows, y, scratch);
    free(scratch);
    return 0;
}

/* A decode step of `rows` sequences (one new token each) through every layer, in one parallel region: the
 * same arithmetic as the model's per-op path with these projections, without a call, a thread wake-up and a
 * pause of the memory stream between each op. h: float32 [rows][hidden], the tokens' embeddings in, the last
 * layer's residual stream out. positions, slot blocks and offsets: each row's; tables [rows][table_width]
 * and lens (the new token included): as niyama_decode_attention. Returns 0, or -1 for shapes it does not
 * take. */
int niyama_q4_decode(const Q4Model *m, float *h, int32_t rows, const int64_t *positions, const int64_t *slot_blocks,
                     const int64_t *slot_offsets, const int32_t *tables, int32_t table_width, const int32_t *lens,
                     int32_t threads) {
    const int32_t dim = m->head_dim, kv_heads = m->kv_heads, group = m->heads / m->kv_heads;
    const int64_t hidden = m->hidden, inter = m->intermediate, kv_width = (int64_t)kv_heads * dim;
    const int64_t q_width = (int64_t)m->heads * dim, qkv_width = q_width + 2 * kv_width;
    if (rows > Q4_MAX_ROWS || dim > MAX_HEAD_DIM || m->heads > MAX_QUERY_ROWS || m->heads % kv_heads) return -1;
    for (int32_t l = 0; l < m->num_layers; l++) {
        const Q4Layer *layer = m->layers + l;
        if (!q4_supported(&layer->qkv) || !q4_supported(&layer->o) || !q4_supported(&layer->gate_up)
            || !q4_supported(&layer->down))
            return -1;
    }
    uint16_t *x = malloc(sizeof(uint16_t) * rows * (2 * hidden + qkv_width + q_width + 3 * inter));
    Q4Input *scratch = malloc(sizeof(Q4Input) * threads);
    if (!x || !scratch) {
        free(x);
        free(scratch);
        return -1;
    }
    uint16_t *qkv = x + rows * hidden, *attn = qkv + rows * qkv_width, *delta = attn + rows * q_width;
    uint16_t *gate_up = delta + rows * hidden, *act = gate_up + rows * 2 * inter;
    #pragma omp parallel num_threads(threads)
    {
        for (int32_t l = 0; l < m->num_layers; l++) {
            const Q4Layer *layer = m->layers + l;
            #pragma omp for
            for (int32_t b = 0; b < rows; b++) {
                if (l) add_norm_row(h + b * hidden, delta + b * hidden, hidden, layer->attn_norm, m->eps, x + b * hidden);
                else norm_row(h + b * hidden, hidden, layer->attn_norm, m->eps, x + b * hidden);
            }
            q4_outputs(&layer->qkv, x, rows, qkv, scratch);
            /* A sequence's rotary embedding, KV store and attention, through the ops niyama_rope_store_kv and
             * niyama_decode_attention run (attend with all its heads: the same code path, the same numbers). */
            #pragma omp for schedule(static)
            for (int32_t b = 0; b < rows; b++) {
                uint16_t *row = qkv + b * qkv_width;
                rope_store_row(row, m->heads, kv_heads, dim, m->cos + positions[b] * dim, m->sin + positions[b] * dim,
                               (slot_blocks[b] * m->block_size + slot_offsets[b]) * kv_width, layer->k_cache,
                               layer->v_cache);
                attend(row, layer->k_cache, layer->v_cache, tables + (int64_t)b * table_width, lens[b], kv_heads, group,
                       dim, m->block_size, kv_width, m->scale, attn + b * q_width);
            }
            q4_outputs(&layer->o, attn, rows, delta, scratch);
            #pragma omp for
            for (int32_t b = 0; b < rows; b++)
                add_norm_row(h + b * hidden, delta + b * hidden, hidden, layer->mlp_norm, m->eps, x + b * hidden);
            q4_outputs(&layer->gate_up, x, rows, gate_up, scratch);
            #pragma omp for
            for (int32_t b = 0; b < rows; b++)
                silu_mul_row(gate_up + b * 2 * inter, gate_up + b * 2 * inter + inter, inter, act + b * inter);
            q4_outputs(&layer->down, act, rows, delta, scratch);
        }
        #pragma omp for
        for (int32_t b = 0; b < rows; b++)
            for (int64_t c = 0; c < hidden; c++) h[b * hidden + c] += bf16_to_float(delta[b * hidden + c]);
    }
    free(x);
    free(scratch);
    return 0;
}
#else  /* no vector path: the engine keeps these weights in bf16 (niyama_q4_vectorized) */
int niyama_q4_linear(const uint16_t *x, int64_t rows, const Q4Weight *w, uint16_t *y, int32_t threads) {
    (void)x, (void)rows, (void)w, (void)y, (void)threads;
    return -1;
}

int niyama_q4_decode(const Q4Model *m, float *h, int32_t rows, const int64_t *positions, const int64_t *slot_blocks,
                     const int64_t *slot_offsets, const int32_t *tables, int32_t table_width, const int32_t *lens,
                     int32_t threads) {
    (void)m, (void)h, (void)rows, (void)positions, (void)slot_blocks, (void)slot_offsets, (void)tables,
        (void)table_width, (void)lens, (void)threads;
    return -1;
}
#endif

/* Whether this build has a vector path for the 4-bit projections: a scalar loop would be slower than the
 * bf16 weights, so without one the engine does not read the 4-bit codes. */
int niyama_q4_vectorized(void) {
#if defined(Q4_VNNI) || defined(Q4_AVX2)
    return 1;
#else
    return 0;
#endif
}
