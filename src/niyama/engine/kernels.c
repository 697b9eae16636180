/* Native CPU kernels for the engine (bf16), compiled for the machine they run on by niyama.engine.native.
 *
 * - Decode attention over the paged KV cache, read in place: one query token per sequence attends to its
 *   whole context through its block table. The torch path gathers every sequence's blocks into a padded
 *   copy and runs SDPA over it; at decode sizes (tens of sequences, hundreds of tokens) that copy and SDPA's
 *   per-call overhead cost 2-4x what reading the blocks once does.
 * - A layer's element-wise steps, fused: add + RMSNorm, rotary embedding + KV-cache write, SiLU x up.
 * - Logits: the bf16 head's output widened with each row's top k recomputed in float32, and argmax.
 *
 * Layouts are row-major; bf16 values travel as uint16_t. Arithmetic is float32, rounded to bf16 where the
 * torch path rounds.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define MAX_HEAD_DIM 256
#define MAX_QUERY_ROWS 64  /* query heads */
#define SPAN 16  /* tokens scored at a time */
#define AHEAD_CHECK 4096  /* bytes read ahead between checks whether attention is done */

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

static inline void prefetch(const uint16_t *p, int64_t elements) {
    for (int64_t offset = 0; offset < elements * 2; offset += 64) __builtin_prefetch((const char *)p + offset);
}

/* One sequence: its kv_heads * group query rows attend to its `len` cached tokens, in one pass with an
 * online softmax (a running maximum rescales what was summed before). Each token's keys, then values, of
 * all heads are one contiguous row, read once; the next block is prefetched while this one is used. */
static void attend(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                   int32_t len, int32_t kv_heads, int32_t group, int32_t dim, int32_t block_size, float scale,
                   uint16_t *out) {
    const int32_t rows = kv_heads * group;
    const int64_t token_stride = (int64_t)kv_heads * dim, block_stride = block_size * token_stride;
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
        if (in_block == 0 && start + block_size < len) {
            const int64_t next = table[start / block_size + 1] * block_stride;
            prefetch(k_cache + next, block_stride);
            prefetch(v_cache + next, block_stride);
        }
        const uint16_t *keys = k_cache + block + in_block * token_stride;
        const uint16_t *values = v_cache + block + in_block * token_stride;
        for (int32_t i = 0; i < span; i++)
            for (int32_t h = 0; h < kv_heads; h++) {
                load_row(row, keys + i * token_stride + h * dim, dim);
                for (int32_t r = h * group; r < (h + 1) * group; r++) p[r][i] = dot(qf + r * dim, row, dim);
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
                   dim, block_size, scale, out + b * out_stride);
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

static void norm_row(const float *x, int64_t cols, const uint16_t *weight, float eps, uint16_t *out) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int64_t c = 0; c < cols; c++) sum += x[c] * x[c];
    const float rstd = 1.0f / sqrtf(sum / (float)cols + eps);
    #pragma omp simd
    for (int64_t c = 0; c < cols; c++) out[c] = float_to_bf16(round_bf16(x[c] * rstd) * bf16_to_float(weight[c]));
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
    for (int64_t r = 0; r < rows; r++) {
        float *x = h + r * cols;
        const uint16_t *d = delta + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) x[c] += bf16_to_float(d[c]);
        norm_row(x, cols, weight, eps, out + r * cols);
    }
}

/* out = bf16(silu(gate)) * up, from gate_up [rows][2 * cols] (gate first) to out [rows][cols]. */
void niyama_silu_mul(const uint16_t *gate_up, int64_t rows, int64_t cols, uint16_t *out, int32_t threads) {
    #pragma omp parallel for num_threads(threads) if(rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * cols, *up = gate + cols;
        uint16_t *o = out + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            const float g = bf16_to_float(gate[c]);
            o[c] = float_to_bf16(round_bf16(g / (1.0f + expf(-g))) * bf16_to_float(up[c]));
        }
    }
}

/* Rotary embedding in place on the query and key heads of qkv rows [rows][(q_heads + 2 * kv_heads) * dim]
 * (rotate-half, as transformers: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to bf16),
 * then each row's keys and values stored at its cache slot (block, offset) of k/v caches
 * [blocks][block_size][kv_heads][dim]. cos/sin: bf16 tables [positions][dim]. */
void niyama_rope_store_kv(uint16_t *qkv, int64_t rows, int32_t q_heads, int32_t kv_heads, int32_t dim,
                          const uint16_t *cos, const uint16_t *sin, const int64_t *positions,
                          const int64_t *slot_blocks, const int64_t *slot_offsets, uint16_t *k_cache,
                          uint16_t *v_cache, int32_t block_size, int32_t threads) {
    const int32_t half = dim / 2, rotated = q_heads + kv_heads;
    const int64_t width = (int64_t)(q_heads + 2 * kv_heads) * dim, kv_width = (int64_t)kv_heads * dim;
    #pragma omp parallel for num_threads(threads) if(rows * width >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = qkv + r * width;
        const uint16_t *c = cos + positions[r] * dim, *s = sin + positions[r] * dim;
        for (int32_t head = 0; head < rotated; head++) {
            uint16_t *x = row + (int64_t)head * dim;
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
        const int64_t slot = (slot_blocks[r] * block_size + slot_offsets[r]) * kv_width;
        const uint16_t *k = row + (int64_t)q_heads * dim, *v = k + kv_width;
        for (int64_t i = 0; i < kv_width; i++) {
            k_cache[slot + i] = k[i];
            v_cache[slot + i] = v[i];
        }
    }
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
