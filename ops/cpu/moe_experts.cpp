// MoE experts for a CPU's BF16 graphs: each chosen expert's weights read once, by the tokens routed
// to it (ops/moe_cpu.py builds this file with g++ and calls it through ctypes; its reference is
// ops/moe.py: experts_ref). A plain C ABI over raw pointers: no torch headers, so it builds in ~1 s.
//
//   x [T, D] bf16, expert_ids [T, K] int64 (global ids), expert_weights [T, K] fp32,
//   gate, up [E, I, D] bf16, down [E, D, I] bf16, local experts [first_expert, first_expert + E)
//   -> out [T, D] bf16 = sum over the token's local (expert, weight) pairs of
//      weight * down_e(silu(gate_e x) * up_e x), rounded to bf16 where experts_ref rounds:
//      each linear's output, silu's, the product's; the sum is fp32, in expert order.
//
// Two passes, each split across threads by weight rows (every thread reads its slice of every
// chosen expert, so each weight byte is read once): gate/up rows i -> act [pairs, I] bf16, then
// down rows d -> out[:, d]. Dot products use AVX512-BF16 (vdpbf16ps: bf16 pairs into fp32) where
// the compiler targets it (-march=native on a CPU that has it), else fp32 FMAs the compiler
// vectorises.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
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

}  // extern "C"
