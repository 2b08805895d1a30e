// BF16 kernels for a CPU's compiled graphs, where a GEMM library call costs more than the bytes it
// reads (few rows per weight): each weight row is streamed once for all the rows of x that need it.
// ops/cpu_kernels.py builds this file with the system compiler and the ops call it through ctypes:
// a plain C ABI over raw pointers, no torch headers, so it builds in ~1 s. Dot products use
// AVX512-BF16 (vdpbf16ps: bf16 pairs into fp32) where the compiler targets it (-march=native on a
// CPU that has it), else fp32 FMAs the compiler vectorises. Threads split weight rows in blocks of 16.
//
// glm5c_moe_experts_bf16 (ops/moe_cpu.py; reference ops/moe.py: experts_ref):
//   x [T, D] bf16, expert_ids [T, K] int64 (global ids), expert_weights [T, K] fp32,
//   gate, up [E, I, D] bf16, down [E, D, I] bf16, local experts [first_expert, first_expert + E)
//   -> out [T, D] bf16 = sum over the token's local (expert, weight) pairs of
//      weight * down_e(silu(gate_e x) * up_e x), rounded to bf16 where experts_ref rounds:
//      each linear's output, silu's, the product's; the sum is fp32, in expert order.
//   Two passes (every thread reads its slice of every chosen expert, so each weight byte is read
//   once): gate/up rows i -> act [pairs, I] bf16, then down rows d -> out[:, d].
//
// glm5c_linear_bf16 (ops/cpu_linear.py; reference ops/__init__.py: linear_ref): x @ w^T, per head.
//
// glm5c_sparse_mla_bf16 (ops/dsa_cpu.py; reference ops/dsa.py: sparse_mla_lowp): each token's heads
// attend over its selected cache entries, read straight from the paged cache (no gathered copy).
//
// glm5c_indexer_topk_bf16 (ops/dsa_cpu.py; reference ops/dsa.py: indexer_topk_ref): the indexer's
// scores over the paged key cache and their top-k, per token.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define GLM5C_DPBF16 1
#else
#define GLM5C_DPBF16 0
#endif

namespace {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

constexpr int kMaxRows = 8;  // rows of x multiplied with one weight row at a time

// out[j] = dot(w[0:len], xs[j][0:len]) for j < N, fp32 accumulation.
template <int N>
inline void dots(const uint16_t* w, const uint16_t* const* xs, int64_t len, float* out) {
  int64_t k = 0;
#if GLM5C_DPBF16
  __m512 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = _mm512_setzero_ps();
  for (; k + 32 <= len; k += 32) {
    __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int j = 0; j < N; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], wv, (__m512bh)_mm512_loadu_si512(xs[j] + k));
  }
  for (int j = 0; j < N; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
#else
  float acc[N][16] = {};
  for (; k + 16 <= len; k += 16) {
    float wf[16];
    for (int l = 0; l < 16; ++l) wf[l] = bf16_to_f32(w[k + l]);
    for (int j = 0; j < N; ++j)
      for (int l = 0; l < 16; ++l) acc[j][l] += wf[l] * bf16_to_f32(xs[j][k + l]);
  }
  for (int j = 0; j < N; ++j) {
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[j][l];
    out[j] = s;
  }
#endif
  for (; k < len; ++k) {
    float wk = bf16_to_f32(w[k]);
    for (int j = 0; j < N; ++j) out[j] += wk * bf16_to_f32(xs[j][k]);
  }
}

inline void dots_n(int n, const uint16_t* w, const uint16_t* const* xs, int64_t len, float* out) {
  switch (n) {
    case 1: dots<1>(w, xs, len, out); break;
    case 2: dots<2>(w, xs, len, out); break;
    case 3: dots<3>(w, xs, len, out); break;
    case 4: dots<4>(w, xs, len, out); break;
    case 5: dots<5>(w, xs, len, out); break;
    case 6: dots<6>(w, xs, len, out); break;
    case 7: dots<7>(w, xs, len, out); break;
    default: dots<8>(w, xs, len, out); break;
  }
}

// This thread's share [*begin, *end) of `rows` rows, in blocks of 16 (whole cache lines of fp32 output).
inline void row_range(int64_t rows, int64_t* begin, int64_t* end) {
  int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  int64_t blocks = (rows + 15) / 16, per = (blocks + threads - 1) / threads;
  *begin = std::min(rows, t * per * 16);
  *end = std::min(rows, (t + 1) * per * 16);
}

// dot(a[0:n], b[0:n]) in fp32, in 16 lanes the compiler vectorises.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[k + l] * b[k + l];
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// sc[l] = sum_h w[h] * relu(q[h] . key l) for the 16 keys of tile [dim][16] (fp32). With AVX-512,
// four heads at a time: four independent FMA chains share each load of the tile.
inline void key_tile_scores(const float* q, const float* w, const float* tile, int64_t heads, int64_t dim, float* sc) {
  int64_t h = 0;
#if defined(__AVX512F__)
  __m512 total = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (; h + 4 <= heads; h += 4) {
    const float *q0 = q + h * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
    __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 k = _mm512_loadu_ps(tile + d * 16);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), k, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), k, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d]), k, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d]), k, a3);
    }
    total = _mm512_fmadd_ps(_mm512_set1_ps(w[h]), _mm512_max_ps(a0, zero), total);
    total = _mm512_fmadd_ps(_mm512_set1_ps(w[h + 1]), _mm512_max_ps(a1, zero), total);
    total = _mm512_fmadd_ps(_mm512_set1_ps(w[h + 2]), _mm512_max_ps(a2, zero), total);
    total = _mm512_fmadd_ps(_mm512_set1_ps(w[h + 3]), _mm512_max_ps(a3, zero), total);
  }
  _mm512_storeu_ps(sc, total);
#else
  for (int l = 0; l < 16; ++l) sc[l] = 0.f;
#endif
  for (; h < heads; ++h) {
    float a[16] = {};
    for (int64_t d = 0; d < dim; ++d)
      for (int l = 0; l < 16; ++l) a[l] += q[h * dim + d] * tile[d * 16 + l];
    for (int l = 0; l < 16; ++l) sc[l] += w[h] * std::max(0.f, a[l]);
  }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

}  // namespace

extern "C" {

int glm5c_abi_version() { return 1; }

int glm5c_has_avx512bf16() { return GLM5C_DPBF16; }

// Returns 0, or 1 when an argument is out of range (checked by the caller too).
int glm5c_moe_experts_bf16(const uint16_t* x, const int64_t* expert_ids, const float* expert_weights,
                           const uint16_t* gate, const uint16_t* up, const uint16_t* down, uint16_t* out,
                           int64_t tokens, int64_t top_k, int64_t hidden, int64_t inter, int64_t n_experts,
                           int64_t first_expert, int threads) {
  if (tokens < 0 || top_k <= 0 || hidden <= 0 || inter <= 0 || n_experts <= 0 || threads <= 0) return 1;
  // Group the (token, slot) pairs by local expert, in token order within an expert.
  std::vector<int64_t> starts(n_experts + 1, 0);
  for (int64_t p = 0; p < tokens * top_k; ++p) {
    int64_t e = expert_ids[p] - first_expert;
    if (e >= 0 && e < n_experts) ++starts[e + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) starts[e + 1] += starts[e];
  const int64_t pairs = starts[n_experts];
  std::vector<int64_t> pair_token(pairs);
  std::vector<float> pair_weight(pairs);
  {
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t p = 0; p < tokens * top_k; ++p) {
      int64_t e = expert_ids[p] - first_expert;
      if (e < 0 || e >= n_experts) continue;
      pair_token[fill[e]] = p / top_k;
      pair_weight[fill[e]++] = expert_weights[p];
    }
  }
  std::vector<uint16_t> act(pairs * inter);  // [pairs, I] bf16, pairs grouped by expert
  std::vector<float> acc(tokens * hidden, 0.f);  // [T, D] fp32

  // Pass 1: act[p, i] = bf16(bf16(silu(bf16(gate_e[i] . x_t))) * bf16(up_e[i] . x_t)).
#pragma omp parallel num_threads(threads)
  {
    int64_t i0, i1;
    row_range(inter, &i0, &i1);
    const uint16_t* xs[kMaxRows];
    float g[kMaxRows], u[kMaxRows];
    for (int64_t e = 0; e < n_experts; ++e) {
      for (int64_t p0 = starts[e]; p0 < starts[e + 1]; p0 += kMaxRows) {
        int n = int(std::min<int64_t>(kMaxRows, starts[e + 1] - p0));
        for (int j = 0; j < n; ++j) xs[j] = x + pair_token[p0 + j] * hidden;
        for (int64_t i = i0; i < i1; ++i) {
          dots_n(n, gate + (e * inter + i) * hidden, xs, hidden, g);
          dots_n(n, up + (e * inter + i) * hidden, xs, hidden, u);
          for (int j = 0; j < n; ++j)
            act[(p0 + j) * inter + i] = f32_to_bf16(round_bf16(silu(round_bf16(g[j]))) * round_bf16(u[j]));
        }
      }
    }
  }
  // Pass 2: out[t, d] = sum over pairs (in expert order) of weight * bf16(down_e[d] . act_p).
#pragma omp parallel num_threads(threads)
  {
    int64_t d0, d1;
    row_range(hidden, &d0, &d1);
    const uint16_t* as[kMaxRows];
    float y[kMaxRows];
    for (int64_t e = 0; e < n_experts; ++e) {
      for (int64_t p0 = starts[e]; p0 < starts[e + 1]; p0 += kMaxRows) {
        int n = int(std::min<int64_t>(kMaxRows, starts[e + 1] - p0));
        for (int j = 0; j < n; ++j) as[j] = act.data() + (p0 + j) * inter;
        for (int64_t d = d0; d < d1; ++d) {
          dots_n(n, down + (e * hidden + d) * inter, as, inter, y);
          for (int j = 0; j < n; ++j) acc[pair_token[p0 + j] * hidden + d] += pair_weight[p0 + j] * round_bf16(y[j]);
        }
      }
    }
  }
  for (int64_t k = 0; k < tokens * hidden; ++k) out[k] = f32_to_bf16(acc[k]);
  return 0;
}

// out [T, H, N] bf16 = per head h: x [T, H, K][:, h] @ w [H, N, K][h] ^T, fp32 accumulation (H = 1:
// a linear layer; H > 1: MLA's absorbed per-head projections). Threads split the H * N weight rows;
// each streams its rows once for all T rows of x, 8 at a time.
int glm5c_linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t tokens, int64_t heads,
                      int64_t in_features, int64_t out_features, int threads) {
  if (tokens < 0 || heads <= 0 || in_features <= 0 || out_features <= 0 || threads <= 0) return 1;
  const int64_t rows = heads * out_features;
#pragma omp parallel num_threads(threads)
  {
    int64_t r0, r1;
    row_range(rows, &r0, &r1);
    const uint16_t* xs[kMaxRows];
    float y[kMaxRows];
    for (int64_t t0 = 0; t0 < tokens; t0 += kMaxRows) {
      int n = int(std::min<int64_t>(kMaxRows, tokens - t0));
      int64_t head = -1;
      for (int64_t r = r0; r < r1; ++r) {
        if (r / out_features != head) {
          head = r / out_features;
          for (int j = 0; j < n; ++j) xs[j] = x + ((t0 + j) * heads + head) * in_features;
        }
        dots_n(n, w + r * in_features, xs, in_features, y);
        for (int j = 0; j < n; ++j) out[(t0 + j) * rows + r] = f32_to_bf16(y[j]);
      }
    }
  }
  return 0;
}

// q [T, H, Dk] bf16, kv [slots, Dk] bf16 (the paged cache, flat), indices [T, K] int32 (positions in
// the token's sequence, -1 = empty), block_tables [B, W] int32, seq_ids [T] int64 -> out [T, H, V] bf16.
// sparse_mla_lowp's roundings: score = bf16(q . e) * scale, softmax in fp32, probabilities rounded
// to bf16, out = bf16(sum_k p_k e_k[:V]) with fp32 sums. Threads split the tokens. Returns 2 when an
// index or block number points outside the cache (nothing is read there).
int glm5c_sparse_mla_bf16(const uint16_t* q, const uint16_t* kv, const int32_t* indices, const int32_t* block_tables,
                          const int64_t* seq_ids, uint16_t* out, int64_t tokens, int64_t heads, int64_t dk,
                          int64_t v_dim, int64_t topk, int64_t block_size, int64_t table_rows, int64_t table_width,
                          int64_t slots, float softmax_scale, int threads) {
  if (tokens < 0 || heads <= 0 || dk <= 0 || v_dim <= 0 || v_dim > dk || topk <= 0 || block_size <= 0 ||
      table_rows <= 0 || table_width <= 0 || slots <= 0 || threads <= 0)
    return 1;
  int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
  {
    std::vector<float> scores(heads * topk), acc(heads * v_dim), ef(v_dim);
    std::vector<const uint16_t*> rows(topk);
    const uint16_t* qs[kMaxRows];
    float s[kMaxRows];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t seq = seq_ids[t];
      if (seq < 0 || seq >= table_rows) { bad = 1; continue; }
      for (int64_t k = 0; k < topk; ++k) {
        const int64_t pos = indices[t * topk + k];
        rows[k] = nullptr;
        if (pos < 0) continue;
        const int64_t col = pos / block_size;
        const int64_t slot = col < table_width ? int64_t(block_tables[seq * table_width + col]) * block_size + pos % block_size : -1;
        if (slot < 0 || slot >= slots) { bad = 1; continue; }
        rows[k] = kv + slot * dk;
        for (int64_t h0 = 0; h0 < heads; h0 += kMaxRows) {
          int n = int(std::min<int64_t>(kMaxRows, heads - h0));
          for (int j = 0; j < n; ++j) qs[j] = q + (t * heads + h0 + j) * dk;
          dots_n(n, rows[k], qs, dk, s);
          for (int j = 0; j < n; ++j) scores[(h0 + j) * topk + k] = round_bf16(s[j]) * softmax_scale;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t h = 0; h < heads; ++h) {  // softmax over the valid entries -> bf16 probabilities
        float* sc = scores.data() + h * topk;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t k = 0; k < topk; ++k) if (rows[k]) mx = std::max(mx, sc[k]);
        for (int64_t k = 0; k < topk; ++k) if (rows[k]) { sc[k] = std::exp(sc[k] - mx); sum += sc[k]; }
        for (int64_t k = 0; k < topk; ++k) if (rows[k]) sc[k] = round_bf16(sc[k] / sum);
      }
      for (int64_t k = 0; k < topk; ++k) {
        if (!rows[k]) continue;
        for (int64_t v = 0; v < v_dim; ++v) ef[v] = bf16_to_f32(rows[k][v]);
        for (int64_t h = 0; h < heads; ++h) {
          const float p = scores[h * topk + k];
          float* a = acc.data() + h * v_dim;
          for (int64_t v = 0; v < v_dim; ++v) a[v] += p * ef[v];
        }
      }
      for (int64_t i = 0; i < heads * v_dim; ++i) out[t * heads * v_dim + i] = f32_to_bf16(acc[i]);
    }
  }
  return bad ? 2 : 0;
}

// q [T, H, D] fp32, weights [T, H] fp32, cache [slots, D] bf16 (the paged index cache, flat),
// block_tables [B, W] int32, seq_ids [T] int64, positions [T] int64 -> out [T, topk] int32: the
// topk visible positions (s <= the token's position) with the best scores
//   score(t, s) = sum_h weights[t, h] * relu(q[t, h] . k[s])   (fp32, as indexer_scores_ref)
// and -1 in the slots left empty; with at most topk visible positions, all of them, unscored.
// Order within a row is unspecified (as the reference's). Threads split the tokens. Returns 2 when
// a position or its block lies outside the block table or the cache (nothing is read there).
int glm5c_indexer_topk_bf16(const float* q, const float* weights, const uint16_t* cache, const int32_t* block_tables,
                            const int64_t* seq_ids, const int64_t* positions, int32_t* out, int64_t tokens,
                            int64_t heads, int64_t dim, int64_t topk, int64_t block_size, int64_t table_rows,
                            int64_t table_width, int64_t slots, int threads) {
  if (tokens < 0 || heads <= 0 || dim <= 0 || topk <= 0 || block_size <= 0 || table_rows <= 0 || table_width <= 0 ||
      slots <= 0 || threads <= 0)
    return 1;
  int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
  {
    std::vector<float> scores, tile(dim * 16);
    std::vector<int32_t> order;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      int32_t* row = out + t * topk;
      const int64_t seq = seq_ids[t], visible = positions[t] + 1;
      if (seq < 0 || seq >= table_rows || visible < 1 || visible > table_width * block_size) {
        bad = 1;
        std::fill(row, row + topk, -1);
        continue;
      }
      if (visible <= topk) {  // every visible key is chosen: no scores needed
        for (int64_t i = 0; i < topk; ++i) row[i] = i < visible ? int32_t(i) : -1;
        continue;
      }
      // 16 keys at a time, transposed into fp32 [dim][16]: each product is then a 16-wide FMA over
      // the keys (no horizontal sum per key and head)
      scores.resize(visible);
      for (int64_t s0 = 0; s0 < visible; s0 += 16) {
        const int n = int(std::min<int64_t>(16, visible - s0));
        for (int i = 0; i < 16; ++i) {
          const int64_t s = s0 + i;
          const int64_t slot = i < n ? int64_t(block_tables[seq * table_width + s / block_size]) * block_size +
                                           s % block_size : -1;
          const bool ok = slot >= 0 && slot < slots;
          if (i < n && !ok) bad = 1;
          for (int64_t d = 0; d < dim; ++d) tile[d * 16 + i] = ok ? bf16_to_f32(cache[slot * dim + d]) : 0.f;
        }
        float sc[16];
        key_tile_scores(q + t * heads * dim, weights + t * heads, tile.data(), heads, dim, sc);
        for (int i = 0; i < n; ++i) scores[s0 + i] = sc[i];
      }
      order.resize(visible);
      for (int64_t s = 0; s < visible; ++s) order[s] = int32_t(s);
      std::nth_element(order.begin(), order.begin() + topk, order.end(),
                       [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
      std::copy(order.begin(), order.begin() + topk, row);
    }
  }
  return bad ? 2 : 0;
}

}  // extern "C"
