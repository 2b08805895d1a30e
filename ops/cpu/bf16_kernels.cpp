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
//   glm5c_moe_experts_packed_bf16: the same over stacks blocked at load (ops/cpu_kernels.py:
//   block_weight, [E, N / 16, K / 2, 16, 2]) in packed tiles: what a CPU with AVX512-BF16 runs.
//
// glm5c_linear_bf16 (ops/cpu_linear.py; reference ops/__init__.py: linear_ref): x @ w^T, per head;
//   strided rows and transposed weights are read in place (MLA's absorbed w_uk^T and w_uv).
//
// glm5c_sparse_mla_bf16 (ops/dsa_cpu.py; reference ops/dsa.py: sparse_mla_lowp): each token's heads
// attend over its selected cache entries, read straight from the paged cache (no gathered copy).
//
// With AVX512-BF16 the products run as register tiles of 16 weight rows (tiles16: over 16 rows of x
// token-lanes tiles, two vectors of 16 rows of x in the lanes; from 9 octo tiles, two vectors of 8
// rows by 2 element pairs (both bcast_tile); below, quad_tile, 4 rows by 4 pairs; none needs a
// reduction across lanes per dot product), attention's scores as
// dot_tile (a few cache entries against up to 8 heads, one reduction for 16 dot products), x @ W
// and attention's values as weighted_rows (entries paired for vdpbf16ps), and the exponentials
// (softmax, silu) in 16 lanes (exp512).
//
// glm5c_indexer_topk_bf16 (ops/dsa_cpu.py; reference ops/dsa.py: indexer_topk_ref): the indexer's
// scores over the paged key cache and their top-k, per token.
//
// glm5c_route_bf16 (ops/moe_cpu.py; reference ops/moe.py: route_ref): the MoE router, per token:
// fp32 scores against the gate, the group and expert choice, the chosen experts' weights.

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

// Scratch arrays kept by each thread between calls (grown when a call needs more, never zeroed or
// freed): the kernels run several times a layer every step, where fresh std::vectors cost an
// allocation, a zeroing pass and a free each (the free of one over 64 KB makes malloc consolidate
// its bins). One Use per array a thread holds at once; contents are undefined on return.
enum class Use { x_pairs, act_pairs, act, acc, pair_rows, scores, probs, q_pairs, shared_act };
template <class T, Use use>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

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

#if GLM5C_DPBF16
// Tiles of dot products for attention's scores (a token's heads against its selected cache
// entries): 2 entries against up to 8 heads, or 4 against up to 4, 16 accumulators in registers, so
// each 64-byte load feeds several vdpbf16ps, and one reduction (hsum16) per 16 dot products. (The
// linears and experts used these until token-lanes and quad tiles, below, replaced them: no
// reduction across lanes, measured 1.05-1.6x faster on mini's linears at 2-16 rows.)
// x is first packed per tile of 8 rows as [ceil(K / 32)][m][32] bf16, zero past K, so one pointer
// with constant offsets reaches all its rows. (GCC keeps the accumulator arrays in registers only while nothing takes their address:
// no lambdas over them, hsum16 always inlined; check the assembly after changing these.)
constexpr int kTileRows = 8;

inline int64_t packed_len(int64_t len) { return (len + 31) / 32 * 32; }

// xp <- the n rows xs[j][0:len] packed: tile i (rows 8i ..) at xp + i * 8 * packed_len(len).
inline void pack_rows(const uint16_t* const* xs, int n, int64_t len, uint16_t* xp) {
  const int64_t len32 = packed_len(len);
  for (int j0 = 0; j0 < n; j0 += kTileRows) {
    const int m = std::min(kTileRows, n - j0);
    uint16_t* tile = xp + int64_t(j0) * len32;
    for (int64_t k = 0; k < len32; k += 32)
      for (int j = 0; j < m; ++j) {
        uint16_t* dst = tile + k * m + j * 32;
        const int64_t have = std::min<int64_t>(32, std::max<int64_t>(0, len - k));
        memcpy(dst, xs[j0 + j] + k, have * 2);
        memset(dst + have, 0, (32 - have) * 2);
      }
  }
}

// Lane i of the result = the sum of v[kHsumInverse[i]]'s 16 lanes (4 rounds of shuffles and adds).
__attribute__((always_inline)) inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
// hsum16's lane order (a 4 x 4 transpose, its own inverse): permuting its result by this puts
// v[i]'s sum in lane i.
alignas(64) constexpr int32_t kHsumInverse[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// y[r * (16 / R) + j] = dot(w[r][0:len], x_j) for r < R, j < M (R * M <= 16): x_j packed (pack_rows'
// tile), 16 accumulators and one reduction (hsum16) for the lot. next[r]: what the caller reads
// next, prefetched a chunk at a time alongside.
template <int R, int M>
inline void dot_tile(const uint16_t* const* w, int64_t len, const uint16_t* xp, const uint16_t* const* next, float* y) {
  static_assert(R * M <= 16, "16 accumulators");
  constexpr int MS = 16 / R;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  // (the two loops repeat themselves: a lambda holding acc would keep it in memory, not registers)
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(next[r] + k), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(w[r] + k);
    }
    const uint16_t* xk = xp + k * M;
    for (int j = 0; j < M; ++j) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + j * 32);
      for (int r = 0; r < R; ++r) acc[r * MS + j] = _mm512_dpbf16_ps(acc[r * MS + j], wv[r], xv);
    }
  }
  if (k < len) {  // the last partial chunk: weights masked, x is zero past len
    const __mmask32 mask = __mmask32((1ull << (len - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[r] + k);
    const uint16_t* xk = xp + k * M;
    for (int j = 0; j < M; ++j) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + j * 32);
      for (int r = 0; r < R; ++r) acc[r * MS + j] = _mm512_dpbf16_ps(acc[r * MS + j], wv[r], xv);
    }
  }
  _mm512_storeu_ps(y, _mm512_permutexvar_ps(_mm512_load_si512(kHsumInverse), hsum16(acc)));
}

// Lanes per weight row in dot_tile's result (16 / R, without a division).
inline int row_lanes(int R) { return R == 4 ? 4 : 8; }

// dot_tile for R = 2 (m <= 8 rows of x) or R = 4 (m <= 4).
inline void dot_tile_n(int R, int m, const uint16_t* const* w, int64_t len, const uint16_t* xp,
                       const uint16_t* const* next, float* y) {
  if (R == 4) {
    switch (m) {
      case 1: dot_tile<4, 1>(w, len, xp, next, y); break;
      case 2: dot_tile<4, 2>(w, len, xp, next, y); break;
      case 3: dot_tile<4, 3>(w, len, xp, next, y); break;
      default: dot_tile<4, 4>(w, len, xp, next, y); break;
    }
    return;
  }
  switch (m) {
    case 1: dot_tile<2, 1>(w, len, xp, next, y); break;
    case 2: dot_tile<2, 2>(w, len, xp, next, y); break;
    case 3: dot_tile<2, 3>(w, len, xp, next, y); break;
    case 4: dot_tile<2, 4>(w, len, xp, next, y); break;
    case 5: dot_tile<2, 5>(w, len, xp, next, y); break;
    case 6: dot_tile<2, 6>(w, len, xp, next, y); break;
    case 7: dot_tile<2, 7>(w, len, xp, next, y); break;
    default: dot_tile<2, 8>(w, len, xp, next, y); break;
  }
}

// y[0:16] -> bf16 (round to nearest even, as f32_to_bf16), in 16 lanes.
inline void to_bf16_16(const float* y, uint16_t* out) {
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(y)));
}

// round_bf16 in 16 lanes.
inline __m512 round_bf16_16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// For rows r in [r0, r1) (row(r): its elements) and the n packed rows of x, R rows at a time
// (R = 4 while x has at most 4 rows, so a tile still fills 16 accumulators; else 2) against tiles of
// up to 16 / R rows of x: emit(r, R, j0, m, y) with y[i * row_lanes(R) + j] = dot(row(r + i), x_{j0 + j})
// for i < R, j < m; rows past r1 repeat row r1 - 1 (their results are to be ignored). The next R
// rows are prefetched alongside (attention's cache entries lie scattered). Rows outer and tiles of x
// inner while all of x fits in L1 beside the rows (each row read once, x reread from L1), else tiles outer.
template <class Row, class Emit>
inline void dot_rows(Row row, int64_t r0, int64_t r1, int64_t len, const uint16_t* xp, int n, Emit emit) {
  alignas(64) float y[16];
  const int64_t len32 = packed_len(len);
  const int R = n <= 4 ? 4 : 2, tile_rows = row_lanes(R);
  const bool rows_outer = int64_t(n) * len32 * 2 <= 24 * 1024;
  auto run = [&](int64_t r, int j0) {
    const uint16_t *w[4], *next[4];
    for (int i = 0; i < R; ++i) {
      w[i] = row(std::min(r + i, r1 - 1));
      next[i] = row(std::min(r + R + i, r1 - 1));
    }
    const int m = std::min(tile_rows, n - j0);
    dot_tile_n(R, m, w, len, xp + int64_t(j0) * len32, next, y);
    emit(r, R, j0, m, y);
  };
  if (rows_outer) {
    for (int64_t r = r0; r < r1; r += R)
      for (int j0 = 0; j0 < n; j0 += tile_rows) run(r, j0);
  } else {
    for (int j0 = 0; j0 < n; j0 += tile_rows)
      for (int64_t r = r0; r < r1; r += R) run(r, j0);
  }
}

// 16 x 16 fp32 transpose in registers: afterwards v[i] lane j = (before) v[j] lane i.
__attribute__((always_inline)) inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(v[8 * i + j], v[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(v[8 * i + j], v[8 * i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    v[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// Token-lanes tiles, for 17 or more rows of x (prefill-sized steps): x's rows are the lanes, so a
// tile of weight rows needs no reduction across lanes (dot_tile's hsum16 and scattered stores cost
// as much as its products at K = 256): acc += (W_i[2k], W_i[2k+1]) broadcast . (x_m[2k], x_m[2k+1])
// in lane m, two vectors of 16 rows of x per pair of elements (a broadcast feeds two products: 10
// loads per 16 products; one vector needed 17, and ran 0.78-0.89x as fast at 32 to 256 rows), 8
// weight rows at a time (16 accumulators); 16 x 16 transposes at the end put each row of x's
// outputs together. x packed as pairs [ceil(K / 2)][32]. On mini's linears from memory it runs at
// ~850 GFLOP/s (1536 x 512 at 256 rows), 1.05-1.36x oneDNN's speed there.
constexpr int kLanes = 32;  // rows of x a token-lanes tile takes
constexpr int kQuadRows = 4;  // rows of x a quad tile takes (below kOctoMinRows)
constexpr int kOctoMinRows = 9;  // octo tiles from here to 16 rows of x (at 8 two quads are faster)

// xv[k2 * lanes + m] = the bf16 pair x_m[2 k2], x_m[2 k2 + 1] for k2 in [0, ceil(K / 2)) and
// m < lanes (16 or 32), zero for m >= M and past K (16 pairs of 16 rows at a time: transposes of
// 32-bit pairs).
inline void pack_pairs(const uint16_t* const* xs, int M, int64_t K, float* xv, int lanes = 32) {
  const int64_t K2 = (K + 1) / 2;
  for (int half = 0; half < lanes / 16; ++half)
    for (int64_t k2 = 0; k2 < K2; k2 += 16) {
      const int64_t k = 2 * k2;
      const __mmask32 live = k + 32 <= K ? __mmask32(0xffffffffu) : __mmask32((1ull << (K - k)) - 1);
      __m512 v[16];
      for (int m = 0; m < 16; ++m)
        v[m] = 16 * half + m < M ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(live, xs[16 * half + m] + k))
                                 : _mm512_setzero_ps();
      transpose16(v);
      for (int j = 0; j < 16 && k2 + j < K2; ++j) _mm512_storeu_ps(xv + (k2 + j) * lanes + 16 * half, v[j]);
    }
}

// Octo tiles, for 9 to 16 rows of x (a batch-16 decode step): two vectors whose lanes are 8 rows of
// x by 2 pairs of elements, so a 64-bit broadcast of 4 of a weight row's elements feeds two
// products (10 loads per 16 products, as token lanes'; 16 rows of x in one vector's lanes needed 17,
// and ran 0.78-0.96x as fast at 12 and 16 rows), 8 weight rows at a time, the 2 pairs summed at
// the end. x packed by pack_octs: [ceil(K / 4)][2][8][4].
inline void pack_octs(const uint16_t* const* xs, int M, int64_t K, uint16_t* xo) {
  const int64_t K4 = (K + 3) / 4;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int64_t have = std::min<int64_t>(4, K - 4 * k4);
    for (int m = 0; m < 16; ++m) {
      uint16_t* dst = xo + (k4 * 16 + m) * 4;
      if (m < M && have == 4) {
        memcpy(dst, xs[m] + 4 * k4, 8);
      } else {
        for (int e = 0; e < 4; ++e) dst[e] = m < M && e < have ? xs[m][4 * k4 + e] : 0;
      }
    }
  }
}

// emit(m, v) for the M rows of x (M <= 32 / (E / 2)), v lane i = dot(w[i][0:K], x_m) in fp32: the
// token-lanes tile (E = 2, x packed by pack_pairs) or the octo tile (E = 4, pack_octs). Both stream
// E elements of a weight row per step, broadcast to all lanes of two vectors of x (rows w[i] past
// the caller's last repeat a real row, their lanes to be ignored), 8 weight rows at a time;
// next[i]: the rows the caller reads next, prefetched alongside, a cache line per row per 32 elements.
template <int E, class Emit>
inline void bcast_tile(const uint16_t* const* w, const uint16_t* const* next, int64_t K, const uint16_t* x, int M,
                       Emit emit) {
  static_assert(E == 2 || E == 4, "pairs (token lanes) or quads (octo)");
  constexpr int kRows = 16 / (E / 2);  // rows of x per vector
  alignas(64) float out[2 * kRows][16];  // [row of x][weight row]
  auto bcast = [](const uint16_t* p) {
    if constexpr (E == 2) {
      int32_t v;
      memcpy(&v, p, 4);
      return (__m512bh)_mm512_set1_epi32(v);
    } else {
      int64_t v;
      memcpy(&v, p, 8);
      return (__m512bh)_mm512_set1_epi64(v);
    }
  };
  const int64_t KE = K / E;  // whole steps
  for (int h = 0; h < 2; ++h) {  // weight rows 8h .. 8h + 7
    const uint16_t* const* wh = w + 8 * h;
    __m512 acc[16];  // acc[i]: x's first vector, acc[8 + i]: its second, against weight row 8h + i
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __m512bh b0, int i) {  // (inlined: acc stays in registers)
      acc[i] = _mm512_dpbf16_ps(acc[i], b0, (__m512bh)_mm512_loadu_si512(x + k * 64));
      acc[8 + i] = _mm512_dpbf16_ps(acc[8 + i], b0, (__m512bh)_mm512_loadu_si512(x + k * 64 + 32));
    };
    int64_t k = 0;
    for (; k + 32 / E <= KE; k += 32 / E) {
      for (int i = 0; i < 8; ++i) _mm_prefetch((const char*)(next[8 * h + i] + E * k), _MM_HINT_T0);
#pragma GCC unroll 16
      for (int c = 0; c < 32 / E; ++c)
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) step(k + c, bcast(wh[i] + E * (k + c)), i);
    }
    for (; k < KE; ++k)
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) step(k, bcast(wh[i] + E * k), i);
    if (K % E) {  // the last elements, the weights' masked (x is zero past K)
      const __mmask8 live = __mmask8((1u << (K % E)) - 1);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m128i tail = _mm_maskz_loadu_epi16(live, wh[i] + E * KE);
        step(KE, (__m512bh)(E == 2 ? _mm512_broadcastd_epi32(tail) : _mm512_broadcastq_epi64(tail)), i);
      }
    }
    for (int part = 0; part < 2; ++part) {  // x's rows kRows part ..
      __m512 v[16];
      for (int i = 0; i < 8; ++i) {
        const __m512 a = acc[8 * part + i];  // octo: lanes 2m, 2m + 1 hold row m's two pairs
        v[i] = E == 2 ? a : _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));
        v[8 + i] = _mm512_setzero_ps();
      }
      transpose16(v);  // v[m * E / 2] lanes 0-7: weight rows 8h .. 8h + 7 against x's row kRows part + m
      for (int m = 0; m < kRows; ++m)
        _mm256_store_ps(&out[kRows * part + m][8 * h], _mm512_castps512_ps256(v[m * (E / 2)]));
    }
  }
  for (int m = 0; m < M; ++m) emit(m, _mm512_load_ps(out[m]));
}

// Quad tiles, for up to 4 rows of x (an expert's few tokens in a decode step): the lanes are 4 rows
// of x by 4 pairs of elements, so a 128-bit broadcast of 8 of a weight row's elements feeds all 16
// lanes, and 16 weight rows are reduced together at the end (3 shuffles and adds for 4 rows) where
// dot_tile needs a 16-lane reduction per 16 dot products. x packed by pack_quads: [ceil(K / 8)][4][8].
// Against dot_tile, interleaved, mini's weights from memory: linears 1.03-1.22x faster at 4 rows
// of x, 1.01-1.42x at 8 (two quads), mixed at 1 (0.83-1.14x); experts at 4-64 tokens 1.03-1.09x
// with the next expert's first tile prefetched (there memory, not the reductions, bounds them).

// xq[k8 * 32 + j * 8 + e] = x_j[8 k8 + e] for j < 4, zero for j >= M and past K.
inline void pack_quads(const uint16_t* const* xs, int M, int64_t K, uint16_t* xq) {
  const int64_t K8 = (K + 7) / 8;
  for (int64_t k8 = 0; k8 < K8; ++k8)
    for (int j = 0; j < kQuadRows; ++j) {
      uint16_t* dst = xq + k8 * 32 + j * 8;
      const int64_t have = j < M ? std::min<int64_t>(8, K - 8 * k8) : 0;
      if (have > 0) memcpy(dst, xs[j] + 8 * k8, have * 2);
      for (int64_t e = std::max<int64_t>(have, 0); e < 8; ++e) dst[e] = 0;
    }
}

// emit(j, v) for j < M (M <= 4), v lane i = dot(w[i][0:K], x_j), as bcast_tile's.
template <class Emit>
inline void quad_tile(const uint16_t* const* w, const uint16_t* const* next, int64_t K, const uint16_t* xq, int M,
                      Emit emit) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t K8 = K / 8;  // whole chunks of 8
  int64_t k8 = 0;
  for (; k8 + 4 <= K8; k8 += 4) {  // a cache line of each row at a time
    for (int i = 0; i < 16; ++i) _mm_prefetch((const char*)(next[i] + 8 * k8), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512bh xc = (__m512bh)_mm512_loadu_si512(xq + (k8 + c) * 32);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(w[i] + 8 * (k8 + c)))), xc);
    }
  }
  for (; k8 < K8; ++k8) {
    const __m512bh xc = (__m512bh)_mm512_loadu_si512(xq + k8 * 32);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(w[i] + 8 * k8))), xc);
  }
  if (K % 8) {  // the last chunk's weights masked (x is zero past K)
    const __mmask8 live = __mmask8((1u << (K % 8)) - 1);
    const __m512bh xc = (__m512bh)_mm512_loadu_si512(xq + K8 * 32);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_broadcast_i32x4(_mm_maskz_loadu_epi16(live, w[i] + 8 * K8)), xc);
  }
  // acc[i] lane 4j + q: row i's partial sums for x_j. Sum over q, 4 rows at a time: r[g] lane
  // 4j + a = dot(w[4g + a], x_j).
  __m512 r[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512 *a = acc + 4 * g;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    r[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  }
  // 4 x 4 blocks of 128 bits transposed: row j's 16 results together
  const __m512 p = _mm512_shuffle_f32x4(r[0], r[1], 0x44), q = _mm512_shuffle_f32x4(r[2], r[3], 0x44);
  const __m512 u = _mm512_shuffle_f32x4(r[0], r[1], 0xEE), v = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
  const __m512 rows[4] = {_mm512_shuffle_f32x4(p, q, 0x88), _mm512_shuffle_f32x4(p, q, 0xDD),
                          _mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD)};
  for (int j = 0; j < M; ++j) emit(j, rows[j]);
}

// Packed tiles, for weights stored blocked (ops/cpu_kernels.py: block_weight): a matrix
// [N, K] as [N / 16][K / 2][16][2], so a 64-byte load is one element pair of 16 rows, in lanes,
// and each tile of 16 rows is one contiguous stream. acc_j += that load . (x_j's pair broadcast
// from memory, folded into vdpbf16ps): every lane is a useful product for any number of rows of x
// (quad tiles fill 4 of 4 lanes only at multiples of 4 rows, an expert's 1-7 tokens in a decode
// step), one instruction per product (quad tiles also need a 128-bit broadcast each) and no
// reduction at the end. With few rows of x, P partial sums per row keep enough products in flight.
// Mini's experts (bench/cpu_experts.py, figures in ops/moe_cpu.py): 1.27-1.60x faster from L3 than
// on [E, N, K] stacks, 1.06-1.51x from memory, at 1 to 256 tokens.

// acc + w . (the bf16 pair at x, broadcast to 16 lanes), the broadcast folded into the instruction.
__attribute__((always_inline)) inline __m512 dp_bcast(__m512 acc, __m512bh w, const int32_t* x) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
  return acc;
}

// y[j] lane i = dot(tile row i, x_j) for j < M: tile [K2][16][2] bf16, x pairs xv [K2][16] (as
// pack_pairs with 16 lanes), P partial sums per row of x; next[0 : K2 * 32] (what the caller
// reads next) is prefetched alongside, a cache line per pair.
template <int M, int P>
inline void packed_tile(const uint16_t* tile, int64_t K2, const int32_t* xv, const uint16_t* next, __m512* y) {
  static_assert(M * P <= 16, "16 accumulators");
  __m512 acc[M * P];
#pragma GCC unroll 16
  for (int i = 0; i < M * P; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + P <= K2; k += P) {
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      _mm_prefetch((const char*)(next + (k + q) * 32), _MM_HINT_T0);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(tile + (k + q) * 32);
#pragma GCC unroll 16
      for (int j = 0; j < M; ++j) acc[j * P + q] = dp_bcast(acc[j * P + q], w, xv + (k + q) * 16 + j);
    }
  }
  for (; k < K2; ++k) {
    _mm_prefetch((const char*)(next + k * 32), _MM_HINT_T0);
    const __m512bh w = (__m512bh)_mm512_loadu_si512(tile + k * 32);
#pragma GCC unroll 16
    for (int j = 0; j < M; ++j) acc[j * P] = dp_bcast(acc[j * P], w, xv + k * 16 + j);
  }
#pragma GCC unroll 16
  for (int j = 0; j < M; ++j) {
    __m512 s = acc[j * P];
#pragma GCC unroll 8
    for (int q = 1; q < P; ++q) s = _mm512_add_ps(s, acc[j * P + q]);
    y[j] = s;
  }
}

// packed_tile for 1 <= M <= 16 rows of x: 16 / M partial sums (at most 8) per row.
inline void packed_tile_n(int M, const uint16_t* tile, int64_t K2, const int32_t* xv, const uint16_t* next, __m512* y) {
  switch (M) {
    case 1: packed_tile<1, 8>(tile, K2, xv, next, y); break;
    case 2: packed_tile<2, 8>(tile, K2, xv, next, y); break;
    case 3: packed_tile<3, 4>(tile, K2, xv, next, y); break;
    case 4: packed_tile<4, 4>(tile, K2, xv, next, y); break;
    case 5: packed_tile<5, 2>(tile, K2, xv, next, y); break;
    case 6: packed_tile<6, 2>(tile, K2, xv, next, y); break;
    case 7: packed_tile<7, 2>(tile, K2, xv, next, y); break;
    case 8: packed_tile<8, 2>(tile, K2, xv, next, y); break;
    case 9: packed_tile<9, 1>(tile, K2, xv, next, y); break;
    case 10: packed_tile<10, 1>(tile, K2, xv, next, y); break;
    case 11: packed_tile<11, 1>(tile, K2, xv, next, y); break;
    case 12: packed_tile<12, 1>(tile, K2, xv, next, y); break;
    case 13: packed_tile<13, 1>(tile, K2, xv, next, y); break;
    case 14: packed_tile<14, 1>(tile, K2, xv, next, y); break;
    case 15: packed_tile<15, 1>(tile, K2, xv, next, y); break;
    default: packed_tile<16, 1>(tile, K2, xv, next, y); break;
  }
}

// Weight rows r0, r0 + 16, ... < r1 in tiles of 16 (row(r + i) for i < 16: the caller clamps past
// its last row) against the n rows of x (xs): emit(r, j, v) for each tile r and j < n, v lane i =
// dot(row(r + i)[0:K], x_j). Token-lanes tiles for over 16 rows of x, octo tiles from kOctoMinRows,
// else quad tiles; x is packed once (scratch: the caller's, reused), each weight row read once, and
// the rows of the next tile prefetched alongside; during the last tile, after[0:16] (what the
// caller reads next, if not null).
template <class Row, class Emit>
inline void tiles16(Row row, int64_t r0, int64_t r1, int64_t K, const uint16_t* const* xs, int64_t n,
                    std::vector<uint16_t>& scratch, const uint16_t* const* after, Emit emit) {
  if (n <= 0) return;
  const int kind = n > 16 ? 2 : n >= kOctoMinRows ? 1 : 0;  // token lanes, octo, quad
  const int group = kind == 2 ? kLanes : kind == 1 ? 16 : kQuadRows;
  const int64_t groups = (n + group - 1) / group;
  const int64_t group_len = kind == 2 ? (K + 1) / 2 * kLanes * 2 : kind == 1 ? (K + 3) / 4 * 64 : (K + 7) / 8 * 32;  // uint16s
  scratch.resize(groups * group_len);
  for (int64_t g = 0; g < groups; ++g) {
    const int M = int(std::min<int64_t>(group, n - g * group));
    uint16_t* xp = scratch.data() + g * group_len;
    if (kind == 2)
      pack_pairs(xs + g * group, M, K, reinterpret_cast<float*>(xp));
    else if (kind == 1)
      pack_octs(xs + g * group, M, K, xp);
    else
      pack_quads(xs + g * group, M, K, xp);
  }
  for (int64_t r = r0; r < r1; r += 16) {
    const uint16_t *w[16], *next[16];
    for (int i = 0; i < 16; ++i)
      w[i] = row(r + i), next[i] = r + 16 < r1 ? row(r + 16 + i) : after != nullptr ? after[i] : w[i];
    for (int64_t g = 0; g < groups; ++g) {
      const int M = int(std::min<int64_t>(group, n - g * group));
      auto at = [&](int j, __m512 v) { emit(r, g * group + j, v); };
      if (kind == 2)
        bcast_tile<2>(w, next, K, scratch.data() + g * group_len, M, at);
      else if (kind == 1)
        bcast_tile<4>(w, next, K, scratch.data() + g * group_len, M, at);
      else
        quad_tile(w, next, K, scratch.data() + g * group_len, M, at);
    }
  }
}

// e^x in 16 lanes, within ~2 ulp of expf (softmax's exponent, silu's): 2^n * e^r with
// n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor series to r^7; NaN stays NaN.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // e^-104 is 0 in fp32 already (NaN: x)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(v) = v / (1 + e^-v) in 16 lanes.
inline __m512 silu16(__m512 v) {
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

// An expert's activation in 16 lanes, as bf16: bf16(bf16(silu(bf16(g))) * bf16(u)).
inline __m256i expert_act16(__m512 g, __m512 u) {
  const __m512 sg = round_bf16_16(silu16(round_bf16_16(g)));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sg, round_bf16_16(u)));
}

// acc + w * r: one expert's weighted output added to a token's sum. Both splits of the packed
// experts kernel add through this one expression, so they round alike (a compiler may fuse it into
// an FMA, and then does so in both).
inline __m512 add_weighted(__m512 acc, float w, __m512 r) {
  return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w), r));
}

// out_j[v] (bf16) = sum_k p_j[k] e_k[v] for HN rows j and v in [v_begin, v_end): p_j[0:n] bf16,
// e_k = rows[k]. 32 of v at a time, 2 * HN accumulators in registers (HN is a template argument so
// they stay there); vdpbf16ps pairs e_2u and e_2u+1, whose values unpacklo/hi interleave: lane i of
// lo / hi then holds v = 8 (i / 4) + i % 4 (+ 4 for hi). Attention's values (p: a head's
// probabilities, e: cache entries) and x @ W (p: a token's x, e: W's rows).
// unpacklo/hi's lane order undone: v's result is lane kUnpackOrder[v] of [lo, hi] (v < 32).
alignas(64) constexpr int32_t kUnpackOrder[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                                  8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};

template <int HN>
inline void weighted_rows(const uint16_t* const* rows, int64_t n, const uint16_t* const* p, int64_t v_begin,
                          int64_t v_end, uint16_t* const* out) {
  const __m512i order0 = _mm512_load_si512(kUnpackOrder), order1 = _mm512_load_si512(kUnpackOrder + 16);
  for (int64_t v0 = v_begin; v0 < v_end; v0 += 32) {
    const __mmask32 live = v0 + 32 <= v_end ? __mmask32(0xffffffffu) : __mmask32((1ull << (v_end - v0)) - 1);
    __m512 lo_acc[HN], hi_acc[HN];
#pragma GCC unroll 8
    for (int h = 0; h < HN; ++h) lo_acc[h] = hi_acc[h] = _mm512_setzero_ps();
    auto step = [&](const uint16_t* e0, const uint16_t* e1, const int64_t k, const bool pair) {
      const __m512i a = _mm512_maskz_loadu_epi16(live, e0 + v0);
      const __m512i b = pair ? _mm512_maskz_loadu_epi16(live, e1 + v0) : _mm512_setzero_si512();
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 8
      for (int h = 0; h < HN; ++h) {
        uint32_t pp = p[h][k];  // an odd n's last p pairs with 0
        if (pair) memcpy(&pp, p[h] + k, 4);
        const __m512bh pv = (__m512bh)_mm512_set1_epi32(int32_t(pp));
        lo_acc[h] = _mm512_dpbf16_ps(lo_acc[h], lo, pv);
        hi_acc[h] = _mm512_dpbf16_ps(hi_acc[h], hi, pv);
      }
    };
    int64_t k = 0;
    for (; k + 1 < n; k += 2) step(rows[k], rows[k + 1], k, true);
    if (k < n) step(rows[k], rows[k], k, false);
#pragma GCC unroll 8
    for (int h = 0; h < HN; ++h) {  // v order, rounded to bf16 (as to_bf16_16), 32 at a time
      const __m512 v_lo = _mm512_permutex2var_ps(lo_acc[h], order0, hi_acc[h]);
      const __m512 v_hi = _mm512_permutex2var_ps(lo_acc[h], order1, hi_acc[h]);
      _mm512_mask_storeu_epi16(out[h] + v0, live, (__m512i)_mm512_cvtne2ps_pbh(v_hi, v_lo));
    }
  }
}

// weighted_rows for any number of rows j: blocks of 8 (the last by a switch on its size).
inline void weighted_rows_n(const uint16_t* const* rows, int64_t n, const uint16_t* const* p, int64_t m,
                            int64_t v_begin, int64_t v_end, uint16_t* const* out) {
  for (int64_t j0 = 0; j0 < m; j0 += 8) {
    const uint16_t* const* pj = p + j0;
    uint16_t* const* oj = out + j0;
    switch (std::min<int64_t>(8, m - j0)) {
      case 1: weighted_rows<1>(rows, n, pj, v_begin, v_end, oj); break;
      case 2: weighted_rows<2>(rows, n, pj, v_begin, v_end, oj); break;
      case 3: weighted_rows<3>(rows, n, pj, v_begin, v_end, oj); break;
      case 4: weighted_rows<4>(rows, n, pj, v_begin, v_end, oj); break;
      case 5: weighted_rows<5>(rows, n, pj, v_begin, v_end, oj); break;
      case 6: weighted_rows<6>(rows, n, pj, v_begin, v_end, oj); break;
      case 7: weighted_rows<7>(rows, n, pj, v_begin, v_end, oj); break;
      default: weighted_rows<8>(rows, n, pj, v_begin, v_end, oj); break;
    }
  }
}

// One token's sparse MLA once its n selected entries are known (rows[k]: the entry's Dk values):
// scores by tiles (entries x the token's heads, dot_rows), softmax over each head's n scores
// in 16 lanes, then out[h, :V] = sum_k p[h, k] e_k[:V] with vdpbf16ps over pairs of entries (the
// probabilities are bf16 already, as sparse_mla_lowp rounds them). Scratch, the caller's (one per
// thread, reused token after token): sc [H * n2], pb [H * n2], xp [H * packed_len(Dk)], hin and
// hout [H] (row pointers); n2 = n rounded up to even.
inline void sparse_mla_token(const uint16_t* q, const uint16_t* const* rows, int64_t n, int64_t heads, int64_t dk,
                             int64_t v_dim, float softmax_scale, float* sc, uint16_t* pb, uint16_t* xp,
                             const uint16_t** hin, uint16_t** hout, uint16_t* out) {
  const int64_t n2 = (n + 1) / 2 * 2;
  for (int64_t h = 0; h < heads; ++h) hin[h] = q + h * dk;
  pack_rows(hin, int(heads), dk, xp);
  dot_rows(
      [&](int64_t k) { return rows[k]; }, 0, n, dk, xp, int(heads),
      [&](int64_t k, int R, int h0, int m, const float* y) {
        uint16_t b[16];  // score = bf16(q . e) * scale
        to_bf16_16(y, b);
        const int ms = row_lanes(R);
        for (int i = 0; i < R && k + i < n; ++i)
          for (int j = 0; j < m; ++j) sc[(h0 + j) * n2 + k + i] = bf16_to_f32(b[i * ms + j]) * softmax_scale;
      });
  for (int64_t h = 0; h < heads; ++h) {  // softmax in fp32; probabilities to bf16 (0 in the pad slot)
    float* s = sc + h * n2;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + k));
    float m = _mm512_reduce_max_ps(mx);
    for (; k < n; ++k) m = std::max(m, s[k]);
    __m512 sum = _mm512_setzero_ps();
    for (k = 0; k < n; k += 16) {
      const __mmask16 live = k + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + k), _mm512_set1_ps(m)));
      _mm512_mask_storeu_ps(s + k, live, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, e));
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (k = 0; k < n; k += 16) {
      const __mmask16 live = k + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
      const __m256bh p = _mm512_cvtneps_pbh(_mm512_div_ps(_mm512_maskz_loadu_ps(live, s + k), total));
      _mm256_mask_storeu_epi16(pb + h * n2 + k, live, (__m256i)p);
    }
    if (n2 > n) pb[h * n2 + n] = 0;
  }
  // values: out[h] = sum_k p[h, k] e_k[:V]
  for (int64_t h = 0; h < heads; ++h) hin[h] = pb + h * n2, hout[h] = out + h * v_dim;
  weighted_rows_n(rows, n, hin, heads, 0, v_dim, hout);
}
#endif

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

// The (token, slot) pairs of an experts call whose expert is local ([first_expert, first_expert +
// n_experts)), grouped by local expert, in token order within an expert: expert e's pairs are
// [starts[e], starts[e + 1]), pair p belongs to token[p] with routing weight weight[p].
struct ExpertPairs {
  std::vector<int64_t> starts, token;  // starts: per group (the local experts, then a shared expert's)
  std::vector<float> weight;
  int64_t shared_from;  // the first pair of the shared expert's group (every token, in order), or the pair count
  ExpertPairs(const int64_t* ids, const float* weights, int64_t tokens, int64_t top_k, int64_t n_experts,
              int64_t first_expert, bool shared = false)
      : starts(n_experts + 1, 0) {
    for (int64_t p = 0; p < tokens * top_k; ++p) {
      const int64_t e = ids[p] - first_expert;
      if (e >= 0 && e < n_experts) ++starts[e + 1];
    }
    for (int64_t e = 0; e < n_experts; ++e) starts[e + 1] += starts[e];
    token.resize(starts[n_experts]);
    weight.resize(starts[n_experts]);
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t p = 0; p < tokens * top_k; ++p) {
      const int64_t e = ids[p] - first_expert;
      if (e < 0 || e >= n_experts) continue;
      token[fill[e]] = p / top_k;
      weight[fill[e]++] = weights[p];
    }
    shared_from = starts[n_experts];
    if (shared) {
      starts.push_back(shared_from + tokens);
      for (int64_t t = 0; t < tokens; ++t) token.push_back(t), weight.push_back(1.f);
    }
  }
  // The next group after e with pairs (the group count if none).
  int64_t next_chosen(int64_t e) const {
    const int64_t n_experts = int64_t(starts.size()) - 1;
    int64_t f = e + 1;
    while (f < n_experts && starts[f + 1] == starts[f]) ++f;
    return f;
  }
};

#if GLM5C_DPBF16
// out[0:n] = bf16(acc[0:n]), 16 lanes at a time.
inline void to_bf16(const float* acc, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 live = k + 16 <= n ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
    _mm256_mask_storeu_epi16(out + k, live, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, acc + k)));
  }
}
#endif

}  // namespace

extern "C" {

int glm5c_abi_version() { return 5; }

int glm5c_has_avx512bf16() { return GLM5C_DPBF16; }

// Returns 0, or 1 when an argument is out of range (checked by the caller too).
int glm5c_moe_experts_bf16(const uint16_t* x, const int64_t* expert_ids, const float* expert_weights,
                           const uint16_t* gate, const uint16_t* up, const uint16_t* down, uint16_t* out,
                           int64_t tokens, int64_t top_k, int64_t hidden, int64_t inter, int64_t n_experts,
                           int64_t first_expert, int threads) {
  if (tokens < 0 || top_k <= 0 || hidden <= 0 || inter <= 0 || n_experts <= 0 || threads <= 0) return 1;
  const ExpertPairs pairs(expert_ids, expert_weights, tokens, top_k, n_experts, first_expert);
  const std::vector<int64_t>& starts = pairs.starts;
  const std::vector<int64_t>& pair_token = pairs.token;
  const std::vector<float>& pair_weight = pairs.weight;
  std::vector<uint16_t> act(pair_token.size() * inter);  // [pairs, I] bf16, pairs grouped by expert
  std::vector<float> acc(tokens * hidden, 0.f);  // [T, D] fp32

#if GLM5C_DPBF16
  // One pass over the chosen experts (a thread's share): each one's rows of x (x_row(pair)) against
  // its weight rows [r0, r1) (row_of(expert, r), clamped by the caller) in tiles16, the next chosen
  // expert's first tile prefetched during the last; emit(p0, r, j, y) as tiles16's, p0 the
  // expert's first pair.
  auto pass = [&](int64_t r0, int64_t r1, int64_t K, auto x_row, auto row_of, auto emit) {
    std::vector<const uint16_t*> xs;
    std::vector<uint16_t> scratch;
    for (int64_t e = 0; e < n_experts; ++e) {
      const int64_t p0 = starts[e], n = starts[e + 1] - p0;
      if (n == 0 || r1 <= r0) continue;
      xs.resize(n);
      for (int64_t j = 0; j < n; ++j) xs[j] = x_row(p0 + j);
      const int64_t f = pairs.next_chosen(e);
      const uint16_t* after[16];
      for (int l = 0; l < 16; ++l) after[l] = f < n_experts ? row_of(f, r0 + l) : nullptr;
      tiles16([&](int64_t r) { return row_of(e, r); }, r0, r1, K, xs.data(), n, scratch,
              f < n_experts ? after : nullptr, [&](int64_t r, int64_t j, __m512 y) { emit(p0, r, j, y); });
    }
  };
  // Pass 1: tiles of 8 gate rows and their 8 up rows against the expert's tokens.
#pragma omp parallel num_threads(threads)
  {
    int64_t i0, i1;
    row_range(inter, &i0, &i1);
    pass(0, (i1 - i0 + 7) / 8 * 16, hidden, [&](int64_t p) { return x + pair_token[p] * hidden; },
         [&](int64_t e, int64_t v) {  // tile row v: gate (v % 16 < 8) or up row i0 + 8 (v / 16) + v % 8
           const int64_t i = std::min(i0 + 8 * (v / 16) + v % 8, i1 - 1);
           return (v % 16 < 8 ? gate : up) + (e * inter + i) * hidden;
         },
         [&](int64_t p0, int64_t v, int64_t j, __m512 y) {
           // act = bf16(bf16(silu(bf16(g))) * bf16(u)): g in lanes 0-7, u in 8-15
           const int64_t i = i0 + v / 2;
           const __m512 gu = round_bf16_16(y), sg = round_bf16_16(silu16(gu));
           const __m512 u = _mm512_shuffle_f32x4(gu, gu, 0x4E);
           const __mmask16 live = __mmask16((1u << std::min<int64_t>(8, i1 - i)) - 1);
           _mm256_mask_storeu_epi16(act.data() + (p0 + j) * inter + i, live,
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sg, u)));
         });
  }
  // Pass 2: tiles of 16 down rows against the expert's activations, into the fp32 sums.
#pragma omp parallel num_threads(threads)
  {
    int64_t d0, d1;
    row_range(hidden, &d0, &d1);
    pass(d0, d1, inter, [&](int64_t p) { return (const uint16_t*)act.data() + p * inter; },
         [&](int64_t e, int64_t d) { return down + (e * hidden + std::min(d, d1 - 1)) * inter; },
         [&](int64_t p0, int64_t d, int64_t j, __m512 y) {
           const int64_t p = p0 + j;
           const __mmask16 live = __mmask16((1u << std::min<int64_t>(16, d1 - d)) - 1);
           float* a = acc.data() + pair_token[p] * hidden + d;
           const __m512 wy = _mm512_mul_ps(_mm512_set1_ps(pair_weight[p]), round_bf16_16(y));
           _mm512_mask_storeu_ps(a, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, a), wy));
         });
  }
  to_bf16(acc.data(), tokens * hidden, out);
  return 0;
#else
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
#endif
}

namespace {

// The blocked weights of each group of ExpertPairs: local expert e's slices of the stacks, then the
// shared expert's own matrices (group n_experts).
struct ExpertWeights {
  const uint16_t *gate, *up, *down, *shared_gate, *shared_up, *shared_down;
  int64_t n_experts, gu_elems, d_elems;  // elements of one expert's gate (or up), and of its down
  const uint16_t* g(int64_t e) const { return e < n_experts ? gate + e * gu_elems : shared_gate; }
  const uint16_t* u(int64_t e) const { return e < n_experts ? up + e * gu_elems : shared_up; }
  const uint16_t* d(int64_t e) const { return e < n_experts ? down + e * d_elems : shared_down; }
};

#if GLM5C_DPBF16
// Whether threads take whole experts (experts_by_expert): every chosen expert has at most 16 rows
// of x (one packed group: its weights' reads, not its products, bound it) and there are at least
// as many chosen experts as threads.
inline bool experts_whole(const ExpertPairs& pairs, int threads) {
  if (threads < 2) return false;
  int64_t chosen = 0;
  for (size_t e = 0; e + 1 < pairs.starts.size(); ++e) {
    const int64_t n = pairs.starts[e + 1] - pairs.starts[e];
    if (n > 16) return false;
    chosen += n > 0;
  }
  return chosen >= threads;
}

// glm5c_moe_experts_packed_bf16 when experts_whole: threads split the chosen experts (contiguous
// runs of them, balanced by 8 + rows each) and run each whole, gate and up, then down, in one
// parallel region, so each thread's weights are a few long streams (consecutive experts are
// adjacent in the stacks; MBs where the block split reads 128 KB runs) and its activations stay
// its own, each tile prefetching the next one in that order. Each pair's output row is kept; then
// each token's rows are weighted and summed in expert order from zero: the block split's additions
// (add_weighted) in its order, so the result is the same to the bit, whichever thread ran which
// expert (a token's result never depends on the rest of the batch). Mini's experts from memory against the
// block split, 2 threads: 1.09x as fast at 1 token, 1.01x at 4 and 16 in this VM's usual phase;
// at 16 tokens 1.01-1.19x (median ~1.09x) while its two threads sat on different CCDs (a first
// form); whole decode steps 1.5-2.5% shorter at 1, 4 and 16 requests, the same tokens
// (results/2026-11-30-cpu-session7.md). A shared expert (every token's) is not taken whole: the
// threads split its blocks evenly, its gate and up before their routed experts, its down after a
// barrier (its act complete), so a thread's routed share stays balanced by the rule above. (Taken
// whole, as a 17th expert, mini's decode steps were 2% slower at 1 and 4 requests: five experts on
// two threads.)
inline void experts_by_expert(const ExpertPairs& pairs, const uint16_t* x, const ExpertWeights& w, uint16_t* out,
                              int64_t tokens, int64_t hidden, int64_t inter, int threads) {
  const int64_t groups = int64_t(pairs.starts.size()) - 1, n_pairs = int64_t(pairs.token.size());
  const bool shared = pairs.shared_from < n_pairs;
  std::vector<int64_t> chosen;  // the routed experts with pairs (threads take them whole)
  for (int64_t e = 0; e < groups - shared; ++e)
    if (pairs.starts[e + 1] > pairs.starts[e]) chosen.push_back(e);
  std::vector<int64_t> first(tokens + 1, 0), by_token(n_pairs);  // each token's pairs, in expert order
  for (int64_t p = 0; p < n_pairs; ++p) ++first[pairs.token[p] + 1];
  for (int64_t t = 0; t < tokens; ++t) first[t + 1] += first[t];
  {
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) by_token[fill[pairs.token[p]]++] = p;
  }
  const int64_t tile_gu = hidden * 16, tile_d = inter * 16, gu_blocks = inter / 16, d_blocks = hidden / 16;
  float* rows = scratch<float, Use::pair_rows>(n_pairs * hidden);  // [pairs, D]: bf16(down rows . act), each written whole
  uint16_t* shared_act = shared ? scratch<uint16_t, Use::shared_act>(tokens * inter) : nullptr;  // [T, I] bf16
#pragma omp parallel num_threads(threads)
  {
    const int n = omp_get_num_threads(), t = omp_get_thread_num();
    // this thread's run [c0, c1) of `chosen`: the cost (8 + rows) before it is t / n of the total
    int64_t total = 0;
    for (int64_t e : chosen) total += 8 + pairs.starts[e + 1] - pairs.starts[e];
    int64_t c0 = 0, c1 = 0, seen = 0;
    for (size_t c = 0; c < chosen.size(); ++c) {
      if (seen * n < total * t) c0 = c + 1;
      if (seen * n < total * (t + 1)) c1 = c + 1;
      seen += 8 + pairs.starts[chosen[c] + 1] - pairs.starts[chosen[c]];
    }
    int32_t* xv = scratch<int32_t, Use::x_pairs>(hidden / 2 * 16);
    int32_t* av = scratch<int32_t, Use::act_pairs>(inter / 2 * 16);
    uint16_t* act = scratch<uint16_t, Use::act>(16 * inter);
    const uint16_t* xs[16];
    // the shared expert (every token's, at most 16): threads split its blocks evenly, gate and up
    // now, down once every thread's part of its act is in
    const int64_t s0 = gu_blocks * t / n, s1 = gu_blocks * (t + 1) / n;
    if (shared && s0 < s1) {
      for (int64_t j = 0; j < tokens; ++j) xs[j] = x + j * hidden;
      pack_pairs(xs, int(tokens), hidden, reinterpret_cast<float*>(xv), 16);
      const uint16_t *g_s = w.g(groups - 1), *u_s = w.u(groups - 1);
      __m512 yg[16], yu[16];
      for (int64_t b = s0; b < s1; ++b) {
        const uint16_t* next = b + 1 < s1 ? g_s + (b + 1) * tile_gu : c0 < c1 ? w.g(chosen[c0]) : u_s;
        packed_tile_n(int(tokens), g_s + b * tile_gu, hidden / 2, xv, u_s + b * tile_gu, yg);
        packed_tile_n(int(tokens), u_s + b * tile_gu, hidden / 2, xv, next, yu);
        for (int64_t j = 0; j < tokens; ++j)
          _mm256_storeu_si256((__m256i*)(shared_act + j * inter + 16 * b), expert_act16(yg[j], yu[j]));
      }
    }
    if (c0 < c1)  // the first gate tile, while x packs
      for (int64_t l = 0; l < tile_gu; l += 32) _mm_prefetch((const char*)(w.g(chosen[c0]) + l), _MM_HINT_T0);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e = chosen[c], p0 = pairs.starts[e], M = pairs.starts[e + 1] - p0;
      const uint16_t *g_e = w.g(e), *u_e = w.u(e), *d_e = w.d(e);
      const uint16_t* g_next = c + 1 < c1 ? w.g(chosen[c + 1]) : d_e;
      for (int64_t j = 0; j < M; ++j) xs[j] = x + pairs.token[p0 + j] * hidden;
      pack_pairs(xs, int(M), hidden, reinterpret_cast<float*>(xv), 16);
      __m512 yg[16], yu[16];
      for (int64_t b = 0; b < gu_blocks; ++b) {  // act = bf16(bf16(silu(bf16(g))) * bf16(u))
        packed_tile_n(int(M), g_e + b * tile_gu, hidden / 2, xv, u_e + b * tile_gu, yg);
        packed_tile_n(int(M), u_e + b * tile_gu, hidden / 2, xv, b + 1 < gu_blocks ? g_e + (b + 1) * tile_gu : d_e, yu);
        for (int64_t j = 0; j < M; ++j)
          _mm256_storeu_si256((__m256i*)(act + j * inter + 16 * b), expert_act16(yg[j], yu[j]));
      }
      for (int64_t j = 0; j < M; ++j) xs[j] = act + j * inter;
      pack_pairs(xs, int(M), inter, reinterpret_cast<float*>(av), 16);
      __m512 y[16];
      for (int64_t b = 0; b < d_blocks; ++b) {
        packed_tile_n(int(M), d_e + b * tile_d, inter / 2, av, b + 1 < d_blocks ? d_e + (b + 1) * tile_d : g_next, y);
        for (int64_t j = 0; j < M; ++j) _mm512_storeu_ps(rows + (p0 + j) * hidden + 16 * b, round_bf16_16(y[j]));
      }
    }
#pragma omp barrier
    if (shared) {  // the shared expert's down: threads split its blocks (output columns) evenly
      const int64_t h0 = d_blocks * t / n, h1 = d_blocks * (t + 1) / n;
      if (h0 < h1) {
        for (int64_t j = 0; j < tokens; ++j) xs[j] = shared_act + j * inter;
        pack_pairs(xs, int(tokens), inter, reinterpret_cast<float*>(av), 16);
        const uint16_t* d_s = w.d(groups - 1);
        __m512 y[16];
        for (int64_t b = h0; b < h1; ++b) {
          packed_tile_n(int(tokens), d_s + b * tile_d, inter / 2, av, b + 1 < h1 ? d_s + (b + 1) * tile_d : d_s, y);
          for (int64_t j = 0; j < tokens; ++j)
            _mm512_storeu_ps(rows + (pairs.shared_from + j) * hidden + 16 * b, round_bf16_16(y[j]));
        }
      }
#pragma omp barrier
    }
    // out[token] = bf16(its routed pairs' rows added in expert order, from zero), then with a
    // shared expert bf16(that + its row) (the routed and shared outputs added in bf16, as the
    // model adds them); tokens split between the threads
    float* acc = scratch<float, Use::acc>(hidden);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < tokens; ++r) {
      std::fill(acc, acc + hidden, 0.f);
      for (int64_t q = first[r]; q < first[r + 1]; ++q) {
        if (by_token[q] >= pairs.shared_from) continue;
        const float* row = rows + by_token[q] * hidden;
        const float weight = pairs.weight[by_token[q]];
        for (int64_t d = 0; d < hidden; d += 16)
          _mm512_storeu_ps(acc + d, add_weighted(_mm512_loadu_ps(acc + d), weight, _mm512_loadu_ps(row + d)));
      }
      if (shared) {
        const float* row = rows + (pairs.shared_from + r) * hidden;
        for (int64_t d = 0; d < hidden; d += 16)
          _mm512_storeu_ps(acc + d, _mm512_add_ps(round_bf16_16(_mm512_loadu_ps(acc + d)), _mm512_loadu_ps(row + d)));
      }
      to_bf16(acc, hidden, out + r * hidden);
    }
  }
}
#endif
}  // namespace

// glm5c_moe_experts_bf16 over blocked weights (ops/cpu_kernels.py: block_weight): gate, up
// [E, I / 16, D / 2, 16, 2], down [E, D / 16, I / 2, 16, 2] bf16 (I and D multiples of 16), the
// same result with the same roundings. With at most 16 rows per chosen expert (decode steps) and as
// many chosen experts as threads, threads take whole experts (experts_by_expert, the same result to
// the bit). Otherwise threads split each expert's blocks of 16 rows (each thread's share one contiguous
// stream per matrix; 128 KB runs at mini's shapes on two threads, 16 KB on sixteen) and take every
// chosen expert in turn, its rows of x packed once (16 at a time) and its tiles run as
// packed_tile, each prefetching the tile read next. With shared_gate, shared_up, shared_down (one
// expert's blocked matrices, [I / 16, D / 2, 16, 2] and [D / 16, I / 2, 16, 2]; all or none) a
// shared expert runs too, as one more expert that every token chose, and
// out = bf16(routed + bf16(shared)): what adding the shared MLP's output to the routed experts' in
// bf16 gives (MoE.forward), in one call: one parallel region and one pass over x for both.
// Returns 0, 1 when an argument is out of range, 3 when built without AVX512-BF16 (callers pack
// only where glm5c_has_avx512bf16()).
int glm5c_moe_experts_shared_packed_bf16(const uint16_t* x, const int64_t* expert_ids, const float* expert_weights,
                                         const uint16_t* gate, const uint16_t* up, const uint16_t* down,
                                         const uint16_t* shared_gate, const uint16_t* shared_up,
                                         const uint16_t* shared_down, uint16_t* out, int64_t tokens, int64_t top_k,
                                         int64_t hidden, int64_t inter, int64_t n_experts, int64_t first_expert,
                                         int threads) {
  const bool shared = shared_gate != nullptr;
  if (tokens < 0 || top_k <= 0 || hidden <= 0 || inter <= 0 || n_experts <= 0 || threads <= 0 || hidden % 16 ||
      inter % 16 || (shared_up != nullptr) != shared || (shared_down != nullptr) != shared)
    return 1;
#if GLM5C_DPBF16
  const ExpertPairs pairs(expert_ids, expert_weights, tokens, top_k, n_experts, first_expert, shared);
  const ExpertWeights w{gate, up, down, shared_gate, shared_up, shared_down, n_experts, inter * hidden, hidden * inter};
  if (experts_whole(pairs, threads)) {
    experts_by_expert(pairs, x, w, out, tokens, hidden, inter, threads);
    return 0;
  }
  const int64_t groups = int64_t(pairs.starts.size()) - 1;
  std::vector<uint16_t> act(pairs.token.size() * inter);  // [pairs, I] bf16, pairs grouped by expert
  std::vector<float> acc(tokens * hidden, 0.f);  // [T, D] fp32
  std::vector<float> shared_rows(shared ? tokens * hidden : 0);  // [T, D] the shared expert's, bf16 values
  // One pass over the chosen experts, this thread's blocks [b0, b1) of `blocks` per expert, K the
  // weights' row length: tiles(e, b) -> the tiles of block b of expert e (1 or 2, run one after
  // the other, `count` of them), emit(p, b, y) -> y[t] lane i: tile t's row i against pair p's x.
  auto pass = [&](int64_t blocks, int64_t K, int count, auto x_row, auto tiles, auto emit) {
    int64_t b0, b1;
    {
      const int64_t n = omp_get_num_threads(), t = omp_get_thread_num(), per = (blocks + n - 1) / n;
      b0 = std::min(blocks, t * per), b1 = std::min(blocks, (t + 1) * per);
    }
    if (b1 <= b0) return;
    const int64_t K2 = K / 2;
    std::vector<const uint16_t*> xs;
    std::vector<int32_t> xv;
    if (const int64_t f = pairs.next_chosen(-1); f < groups) {  // the first chosen expert's tiles, while its x packs
      const uint16_t* first[2];
      tiles(f, b0, first);
      for (int t = 0; t < count; ++t)
        for (int64_t l = 0; l < K2 * 32; l += 32) _mm_prefetch((const char*)(first[t] + l), _MM_HINT_T0);
    }
    for (int64_t e = 0; e < groups; ++e) {
      const int64_t p0 = pairs.starts[e], n = pairs.starts[e + 1] - p0, f = pairs.next_chosen(e);
      if (n == 0) continue;
      const int64_t groups = (n + 15) / 16;
      xs.resize(n);
      for (int64_t j = 0; j < n; ++j) xs[j] = x_row(p0 + j);
      xv.resize(groups * K2 * 16);
      for (int64_t g = 0; g < groups; ++g)
        pack_pairs(xs.data() + 16 * g, int(std::min<int64_t>(16, n - 16 * g)), K,
                   reinterpret_cast<float*>(xv.data() + g * K2 * 16), 16);
      for (int64_t b = b0; b < b1; ++b) {
        const uint16_t *mine[2], *later[2];
        tiles(e, b, mine);
        if (b + 1 < b1)
          tiles(e, b + 1, later);
        else if (f < groups)
          tiles(f, b0, later);
        else
          later[0] = later[1] = mine[0];
        for (int64_t g = 0; g < groups; ++g) {
          const int M = int(std::min<int64_t>(16, n - 16 * g));
          __m512 y[2][16];
          for (int t = 0; t < count; ++t)  // the first group prefetches what comes next, the rest reread
            packed_tile_n(M, mine[t], K2, xv.data() + g * K2 * 16,
                          g > 0 ? mine[t] : t + 1 < count ? mine[t + 1] : later[0], y[t]);
          for (int j = 0; j < M; ++j) emit(p0 + 16 * g + j, b, y[0][j], y[1][j]);
        }
      }
    }
  };
  const int64_t tile_gu = hidden * 16, tile_d = inter * 16;  // elements in a tile of 16 rows
  // Pass 1: block b's 16 gate rows and 16 up rows -> act[p, 16 b : 16 b + 16].
#pragma omp parallel num_threads(threads)
  pass(inter / 16, hidden, 2, [&](int64_t p) { return x + pairs.token[p] * hidden; },
       [&](int64_t e, int64_t b, const uint16_t** t) {
         t[0] = w.g(e) + b * tile_gu;
         t[1] = w.u(e) + b * tile_gu;
       },
       [&](int64_t p, int64_t b, __m512 g, __m512 u) {
         _mm256_storeu_si256((__m256i*)(act.data() + p * inter + 16 * b), expert_act16(g, u));
       });
  // Pass 2: block b's 16 down rows -> the fp32 sums acc[t, 16 b : 16 b + 16], in expert order
  // (the shared expert's rows to shared_rows).
#pragma omp parallel num_threads(threads)
  pass(hidden / 16, inter, 1, [&](int64_t p) { return (const uint16_t*)act.data() + p * inter; },
       [&](int64_t e, int64_t b, const uint16_t** t) { t[0] = t[1] = w.d(e) + b * tile_d; },
       [&](int64_t p, int64_t b, __m512 y, __m512) {
         if (p >= pairs.shared_from) {
           _mm512_storeu_ps(shared_rows.data() + pairs.token[p] * hidden + 16 * b, round_bf16_16(y));
           return;
         }
         float* a = acc.data() + pairs.token[p] * hidden + 16 * b;
         _mm512_storeu_ps(a, add_weighted(_mm512_loadu_ps(a), pairs.weight[p], round_bf16_16(y)));
       });
  if (shared)
    for (int64_t k = 0; k < tokens * hidden; k += 16)
      _mm512_storeu_ps(acc.data() + k, _mm512_add_ps(round_bf16_16(_mm512_loadu_ps(acc.data() + k)),
                                                     _mm512_loadu_ps(shared_rows.data() + k)));
  to_bf16(acc.data(), tokens * hidden, out);
  return 0;
#else
  (void)x, (void)expert_ids, (void)expert_weights, (void)gate, (void)up, (void)down, (void)out, (void)first_expert;
  return 3;
#endif
}

// glm5c_moe_experts_shared_packed_bf16 without a shared expert.
int glm5c_moe_experts_packed_bf16(const uint16_t* x, const int64_t* expert_ids, const float* expert_weights,
                                  const uint16_t* gate, const uint16_t* up, const uint16_t* down, uint16_t* out,
                                  int64_t tokens, int64_t top_k, int64_t hidden, int64_t inter, int64_t n_experts,
                                  int64_t first_expert, int threads) {
  return glm5c_moe_experts_shared_packed_bf16(x, expert_ids, expert_weights, gate, up, down, nullptr, nullptr, nullptr,
                                              out, tokens, top_k, hidden, inter, n_experts, first_expert, threads);
}

// out [T, H, N] bf16 (contiguous) = per head h: x[:, h] @ W_h^T, fp32 accumulation (H = 1: a
// linear layer; H > 1: MLA's absorbed per-head projections). Strides in elements, a row's elements
// adjacent: x[t, h, i] at x[t * x_token_stride + h * x_head_stride + i]; W_h[o, i] at
// w[h * w_head_stride + o * w_row_stride + i], or with w_transposed at
// w[h * w_head_stride + i * w_row_stride + o] (W_h^T stored row by row: a transposed view such as
// MLA's w_uk^T, read in place). Untransposed, threads split the H * N weight rows and stream each
// once for all T rows of x (with AVX512-BF16: tiles16; else one row against 8 rows at a time); transposed, threads split (head, 32 outputs) blocks: x @ W as
// weighted_rows (the portable path: fp32 loops).
int glm5c_linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t tokens, int64_t heads,
                      int64_t in_features, int64_t out_features, int64_t x_token_stride, int64_t x_head_stride,
                      int64_t w_head_stride, int64_t w_row_stride, int w_transposed, int threads) {
  if (tokens < 0 || heads <= 0 || in_features <= 0 || out_features <= 0 || threads <= 0) return 1;
  const int64_t rows = heads * out_features, K = in_features, N = out_features;
  if (w_transposed) {
    const int64_t col_blocks = (N + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
      std::vector<const uint16_t*> wr(K), xr(tokens);
      std::vector<uint16_t*> orow(tokens);
      int64_t head = -1;
#pragma omp for schedule(static)
      for (int64_t unit = 0; unit < heads * col_blocks; ++unit) {
        const int64_t h = unit / col_blocks, c0 = unit % col_blocks * 32, c1 = std::min(N, c0 + 32);
        if (h != head) {
          head = h;
          for (int64_t i = 0; i < K; ++i) wr[i] = w + h * w_head_stride + i * w_row_stride;
          for (int64_t t = 0; t < tokens; ++t) xr[t] = x + t * x_token_stride + h * x_head_stride, orow[t] = out + (t * heads + h) * N;
        }
#if GLM5C_DPBF16
        weighted_rows_n(wr.data(), K, xr.data(), tokens, c0, c1, orow.data());
#else
        float acc[32];
        for (int64_t t = 0; t < tokens; ++t) {
          std::fill(acc, acc + 32, 0.f);
          for (int64_t i = 0; i < K; ++i) {
            const float xi = bf16_to_f32(xr[t][i]);
            for (int64_t o = c0; o < c1; ++o) acc[o - c0] += xi * bf16_to_f32(wr[i][o]);
          }
          for (int64_t o = c0; o < c1; ++o) orow[t][o] = f32_to_bf16(acc[o - c0]);
        }
#endif
      }
    }
    return 0;
  }
#pragma omp parallel num_threads(threads)
  {
    int64_t r0, r1;
    row_range(rows, &r0, &r1);
#if GLM5C_DPBF16
    std::vector<const uint16_t*> xs(tokens);
    std::vector<uint16_t> scratch;
    for (int64_t s0 = r0; s0 < r1;) {  // one head's rows at a time: [s0, s1)
      const int64_t head = s0 / N, s1 = std::min(r1, (head + 1) * N);
      const uint16_t* wh = w + head * w_head_stride;
      for (int64_t t = 0; t < tokens; ++t) xs[t] = x + t * x_token_stride + head * x_head_stride;
      auto row = [&](int64_t r) { return wh + (std::min(r, s1 - 1) - head * N) * w_row_stride; };
      tiles16(row, s0, s1, K, xs.data(), tokens, scratch, nullptr, [&](int64_t r, int64_t t, __m512 y) {
        const __mmask16 live = __mmask16((1u << std::min<int64_t>(16, s1 - r)) - 1);
        _mm256_mask_storeu_epi16(out + t * rows + r, live, (__m256i)_mm512_cvtneps_pbh(y));
      });
      s0 = s1;
    }
#else
    const uint16_t* xs[kMaxRows];
    float y[kMaxRows];
    for (int64_t t0 = 0; t0 < tokens; t0 += kMaxRows) {
      int n = int(std::min<int64_t>(kMaxRows, tokens - t0));
      int64_t head = -1;
      for (int64_t r = r0; r < r1; ++r) {
        if (r / N != head) {
          head = r / N;
          for (int j = 0; j < n; ++j) xs[j] = x + (t0 + j) * x_token_stride + head * x_head_stride;
        }
        dots_n(n, w + head * w_head_stride + (r - head * N) * w_row_stride, xs, K, y);
        for (int j = 0; j < n; ++j) out[(t0 + j) * rows + r] = f32_to_bf16(y[j]);
      }
    }
#endif
  }
  return 0;
}

int glm5c_linear_packed_multi_bf16(const uint16_t* x, int64_t n_weights, const uint16_t* const* ws,
                                   uint16_t* const* outs, const int64_t* out_features, int64_t tokens,
                                   int64_t in_features, int64_t x_token_stride, int threads);  // (below)

// out [T, H, N] bf16 = per head h: x[:, h] @ W_h^T for W blocked [H, N / 16, K / 2, 16, 2]
// (ops/cpu_kernels.py: block_weight; N a multiple of 16, K even; H = 1: a linear layer, H > 1: MLA's
// absorbed per-head projections), x[t, h] at x + t * x_token_stride + h * x_head_stride (its elements
// adjacent), fp32 accumulation. Threads split the H * N / 16 blocks of 16 outputs (one contiguous
// stream each, its first tile prefetched while x packs); a thread packs its heads' rows of x, 16 at a
// time, and runs each of its tiles as packed_tile against every group of 16 rows (the tile reread
// from cache), prefetching its next tile meanwhile. Returns 0, 1 when an argument is out of range,
// 3 when built without AVX512-BF16.
int glm5c_linear_packed_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t tokens, int64_t heads,
                             int64_t in_features, int64_t out_features, int64_t x_token_stride, int64_t x_head_stride,
                             int threads) {
  if (tokens < 0 || heads <= 0 || in_features <= 0 || out_features <= 0 || in_features % 2 || out_features % 16 ||
      threads <= 0)
    return 1;
  if (heads == 1)  // one linear layer: the multi-weight kernel's single case
    return glm5c_linear_packed_multi_bf16(x, 1, &w, &out, &out_features, tokens, in_features, x_token_stride, threads);
#if GLM5C_DPBF16
  const int64_t K2 = in_features / 2, per_head = out_features / 16, blocks = heads * per_head;
  const int64_t groups = (tokens + 15) / 16, tile = K2 * 32;
  if (tokens == 0) return 0;
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num(), per = (blocks + n - 1) / n;
    const int64_t q0 = std::min(blocks, t * per), q1 = std::min(blocks, (t + 1) * per);
    if (q0 < q1) {
      for (int64_t l = 0; l < tile; l += 32) _mm_prefetch((const char*)(w + q0 * tile + l), _MM_HINT_T0);
      int32_t* xv = scratch<int32_t, Use::x_pairs>(groups * K2 * 16);
      int64_t packed_head = -1;
      for (int64_t q = q0; q < q1; ++q) {  // block q: head q / per_head, outputs 16 (q % per_head) ..
        const int64_t h = q / per_head, b = q % per_head;
        if (h != packed_head) {
          for (int64_t g = 0; g < groups; ++g) {
            const uint16_t* xs[16];
            const int M = int(std::min<int64_t>(16, tokens - 16 * g));
            for (int j = 0; j < M; ++j) xs[j] = x + (16 * g + j) * x_token_stride + h * x_head_stride;
            pack_pairs(xs, M, in_features, reinterpret_cast<float*>(xv + g * K2 * 16), 16);
          }
          packed_head = h;
        }
        const uint16_t* wt = w + q * tile;
        const uint16_t* next = q + 1 < q1 ? wt + tile : wt;
        for (int64_t g = 0; g < groups; ++g) {
          const int M = int(std::min<int64_t>(16, tokens - 16 * g));
          __m512 y[16];
          packed_tile_n(M, wt, K2, xv + g * K2 * 16, g == 0 ? next : wt, y);
          for (int j = 0; j < M; ++j)
            _mm256_storeu_si256((__m256i*)(out + ((16 * g + j) * heads + h) * out_features + 16 * b),
                                (__m256i)_mm512_cvtneps_pbh(y[j]));
        }
      }
    }
  }
  return 0;
#else
  (void)x, (void)w, (void)out, (void)x_token_stride, (void)x_head_stride;
  return 3;
#endif
}

// outs[i] [T, N_i] bf16 = x @ W_i^T for n blocked weights W_i [N_i / 16, K / 2, 16, 2] that read
// the same x [T, K] (rows x_token_stride apart): linear layers side by side (MLA's q_a and kv_a and
// the indexer's keys, an MLP's gate and up) in one parallel region, x packed once per thread.
// Threads split the weights' blocks of 16 outputs, all of them in order, as glm5c_linear_packed_bf16
// splits one weight's. Returns 0, 1 when an argument is out of range, 3 when built without AVX512-BF16.
int glm5c_linear_packed_multi_bf16(const uint16_t* x, int64_t n_weights, const uint16_t* const* ws,
                                   uint16_t* const* outs, const int64_t* out_features, int64_t tokens,
                                   int64_t in_features, int64_t x_token_stride, int threads) {
  if (tokens < 0 || n_weights <= 0 || in_features <= 0 || in_features % 2 || threads <= 0) return 1;
  for (int64_t i = 0; i < n_weights; ++i)
    if (out_features[i] <= 0 || out_features[i] % 16) return 1;
#if GLM5C_DPBF16
  const int64_t K2 = in_features / 2, groups = (tokens + 15) / 16, tile = K2 * 32;
  std::vector<int64_t> first_block(n_weights + 1, 0);  // weight i's blocks: [first_block[i], first_block[i + 1])
  for (int64_t i = 0; i < n_weights; ++i) first_block[i + 1] = first_block[i] + out_features[i] / 16;
  const int64_t blocks = first_block[n_weights];
  if (tokens == 0) return 0;
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num(), per = (blocks + n - 1) / n;
    const int64_t q0 = std::min(blocks, t * per), q1 = std::min(blocks, (t + 1) * per);
    if (q0 < q1) {
      int64_t i = 0;  // the weight holding block q
      while (first_block[i + 1] <= q0) ++i;
      const auto tile_of = [&](int64_t q, int64_t w) { return ws[w] + (q - first_block[w]) * tile; };
      for (int64_t l = 0; l < tile; l += 32) _mm_prefetch((const char*)(tile_of(q0, i) + l), _MM_HINT_T0);
      int32_t* xv = scratch<int32_t, Use::x_pairs>(groups * K2 * 16);
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* xs[16];
        const int M = int(std::min<int64_t>(16, tokens - 16 * g));
        for (int j = 0; j < M; ++j) xs[j] = x + (16 * g + j) * x_token_stride;
        pack_pairs(xs, M, in_features, reinterpret_cast<float*>(xv + g * K2 * 16), 16);
      }
      for (int64_t q = q0; q < q1; ++q) {
        if (q >= first_block[i + 1]) ++i;
        const uint16_t* wt = tile_of(q, i);
        const uint16_t* next = q + 1 >= q1 ? wt : q + 1 < first_block[i + 1] ? wt + tile : tile_of(q + 1, i + 1);
        const int64_t N = out_features[i], b = q - first_block[i];
        for (int64_t g = 0; g < groups; ++g) {
          const int M = int(std::min<int64_t>(16, tokens - 16 * g));
          __m512 y[16];
          packed_tile_n(M, wt, K2, xv + g * K2 * 16, g == 0 ? next : wt, y);
          for (int j = 0; j < M; ++j)
            _mm256_storeu_si256((__m256i*)(outs[i] + (16 * g + j) * N + 16 * b), (__m256i)_mm512_cvtneps_pbh(y[j]));
        }
      }
    }
  }
  return 0;
#else
  (void)x, (void)ws, (void)outs, (void)x_token_stride;
  return 3;
#endif
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
#if GLM5C_DPBF16
#pragma omp parallel num_threads(threads) reduction(| : bad)
  {
    const int64_t topk2 = (topk + 1) / 2 * 2;
    float* scores = scratch<float, Use::scores>(heads * topk2);
    uint16_t* probs = scratch<uint16_t, Use::probs>(heads * topk2);
    uint16_t* xp = scratch<uint16_t, Use::q_pairs>(heads * packed_len(dk));
    std::vector<const uint16_t*> rows(topk), hin(heads);
    std::vector<uint16_t*> hout(heads);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      uint16_t* o = out + t * heads * v_dim;
      const int64_t seq = seq_ids[t];
      int64_t n = 0;  // the selected entries, in order, empty slots left out
      if (seq < 0 || seq >= table_rows) bad = 1;
      else
        for (int64_t k = 0; k < topk; ++k) {
          const int64_t pos = indices[t * topk + k];
          if (pos < 0) continue;
          const int64_t col = pos / block_size;
          const int64_t slot = col < table_width ? int64_t(block_tables[seq * table_width + col]) * block_size + pos % block_size : -1;
          if (slot < 0 || slot >= slots) { bad = 1; continue; }
          rows[n++] = kv + slot * dk;
        }
      if (n == 0) std::fill(o, o + heads * v_dim, uint16_t(0));
      else sparse_mla_token(q + t * heads * dk, rows.data(), n, heads, dk, v_dim, softmax_scale, scores, probs, xp,
                            hin.data(), hout.data(), o);
    }
  }
#else
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
#endif
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

// The MoE router ("noaux_tc"), per token: x [T, D] bf16, gate [E, D] fp32, bias [E] fp32 ->
// weights [T, K] fp32, ids [T, K] int64, as route_ref: score_e = sigmoid(x . gate_e) (fp32), the
// choice score_e + bias_e; with n_group > 1 only the topk_group groups (of E / n_group experts)
// whose two best choices sum highest are eligible; ids the K best eligible choices, best first
// (ties to the lower id); weights their scores, divided by their sum (+1e-20) when `norm`, times
// `scale`. One call replaces a graph's GEMM, three top-k and their glue (~20 us a layer at 16
// tokens on mini). Threads split the tokens from 64. Returns 1 when an argument is out of range.
int glm5c_route_bf16(const uint16_t* x, const float* gate, const float* bias, float* weights, int64_t* ids,
                     int64_t tokens, int64_t hidden, int64_t n_experts, int64_t top_k, int64_t n_group,
                     int64_t topk_group, int norm, float scale, int threads) {
  if (tokens < 0 || hidden <= 0 || n_experts <= 0 || n_group <= 0 || n_experts % n_group || threads <= 0)
    return 1;
  const int64_t per_group = n_experts / n_group;
  if (topk_group < 1 || topk_group > n_group || (n_group > 1 && per_group < 2) || top_k < 1 ||
      top_k > (n_group > 1 ? topk_group * per_group : n_experts))
    return 1;
#pragma omp parallel num_threads(tokens >= 64 ? threads : 1)
  {
    std::vector<float> xf(hidden), score(n_experts), choice(n_experts), group(n_group), best(top_k);
    std::vector<char> eligible(n_experts, 1);
    std::vector<int64_t> kept(topk_group);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t e = 0, d0 = 0;
#if defined(__AVX512F__)
      for (; d0 + 16 <= hidden; d0 += 16)
        _mm512_storeu_ps(xf.data() + d0, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + t * hidden + d0))), 16)));
#endif
      for (; d0 < hidden; ++d0) xf[d0] = bf16_to_f32(x[t * hidden + d0]);
#if defined(__AVX512F__)
      for (; e + 4 <= n_experts; e += 4) {  // four experts' dot products at a time: independent FMA chains
        const float* g = gate + e * hidden;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t d = 0;
        for (; d + 16 <= hidden; d += 16) {
          const __m512 v = _mm512_loadu_ps(xf.data() + d);
          a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(g + d), a0);
          a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(g + hidden + d), a1);
          a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(g + 2 * hidden + d), a2);
          a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(g + 3 * hidden + d), a3);
        }
        float dots[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                         _mm512_reduce_add_ps(a3)};
        for (int i = 0; i < 4; ++i) {
          for (int64_t k = d; k < hidden; ++k) dots[i] += xf[k] * g[i * hidden + k];
          score[e + i] = 1.f / (1.f + std::exp(-dots[i]));
        }
      }
#endif
      for (; e < n_experts; ++e) {
        float dot = 0.f;
        for (int64_t d = 0; d < hidden; ++d) dot += xf[d] * gate[e * hidden + d];
        score[e] = 1.f / (1.f + std::exp(-dot));
      }
      for (e = 0; e < n_experts; ++e) choice[e] = score[e] + bias[e];
      if (n_group > 1) {  // a group's score: its two best choices; the topk_group best groups stay eligible
        for (int64_t g = 0; g < n_group; ++g) {
          float a = -INFINITY, b = -INFINITY;  // best, second best
          for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
            const float c = choice[e];
            if (c > a) b = a, a = c;
            else if (c > b) b = c;
          }
          group[g] = a + b;
        }
        int64_t n_kept = 0;  // the best groups, best first, ties to the lower group
        for (int64_t g = 0; g < n_group; ++g) {
          int64_t at = n_kept;
          while (at > 0 && group[g] > group[kept[at - 1]]) --at;
          if (at >= topk_group) continue;
          for (int64_t i = std::min(n_kept, topk_group - 1); i > at; --i) kept[i] = kept[i - 1];
          kept[at] = g;
          n_kept = std::min(n_kept + 1, topk_group);
        }
        std::fill(eligible.begin(), eligible.end(), 0);
        for (int64_t i = 0; i < topk_group; ++i)
          std::fill(eligible.begin() + kept[i] * per_group, eligible.begin() + (kept[i] + 1) * per_group, 1);
      }
      int64_t* row = ids + t * top_k;
      int64_t n = 0;  // the best eligible choices, best first, ties to the lower id (a NaN ranks last)
      for (int64_t e = 0; e < n_experts; ++e) {
        if (!eligible[e]) continue;
        int64_t at = n;
        while (at > 0 && choice[e] > best[at - 1]) --at;
        if (at >= top_k) continue;
        for (int64_t i = std::min(n, top_k - 1); i > at; --i) best[i] = best[i - 1], row[i] = row[i - 1];
        best[at] = choice[e];
        row[at] = e;
        n = std::min(n + 1, top_k);
      }
      float* w = weights + t * top_k;
      float sum = 0.f;
      for (int64_t i = 0; i < top_k; ++i) sum += (w[i] = score[row[i]]);
      for (int64_t i = 0; i < top_k; ++i) w[i] = norm ? w[i] / (sum + 1e-20f) * scale : w[i] * scale;
    }
  }
  return 0;
}

}  // extern "C"
