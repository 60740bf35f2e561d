// Decoding attention: a few query rows per sequence against a long, contiguous or paged, key/value cache.
//
// Part of salience: kernels/decode.py compiles this file on first use (through native.build_library) and
// calls it through ctypes. Forward only.
//
// Work items are (sequence b, kv head, key split); for paged caches and caches stored with the heads inside each
// key (flash-attention's (B, S, Hkv, D) order) (sequence b, all kv heads, key split), see head_group. An item reads each key and value of its kv heads once for all the G = H / Hkv query heads and L
// rows that share each (a (G*L) x D block of query rows, in tiles of at most 8 rows that stay in registers while
// a chunk of 16 KiB of keys sits in L1, see chunk_keys). Keys are converted to float32 in
// registers (bfloat16 by a shift, float16 by F16C) and every sum runs in float32, with an online softmax
// (running max, sum and unnormalised output per row). Each row reads only the keys of its interval
// [lo, hi): the item's key range is the union of its rows' intervals, and in a chunk where some row cannot see
// some key, that row's scores there are replaced (not multiplied) by -inf and its value sum skips them, so
// whatever those keys hold (NaN included) never reaches the row.
//
// Paged caches: logical key p of sequence b is slot p % block_size of pool block block_table[b, p / bs];
// each chunk looks up its keys' addresses and reads them in place (no gather copy).
//
// Flash-decoding: a sequence's key range is split into pieces so that there are enough items for the
// threads; each item leaves (max, sum, unnormalised output) per row, and a second pass merges the pieces by
// logsumexp (adding the sink logit, if any) into the output and its logsumexp.
//
// Vector code: AVX-512 (16 lanes; with AVX512-BF16, bfloat16 q.k by vdpbf16ps; with AMX-BF16, bfloat16 q.k of 16
// or 32 keys at a time on the tile unit) or AVX2+FMA+F16C (8 lanes), chosen at compile time by -march=native (the
// build cache is keyed by the CPU flags), with a scalar fallback for other CPUs and for the D % lanes tails.
//
// Memory: the keys and values PREFETCH (64) keys ahead are prefetched a few lines per key from inside the compute
// loops (see Ahead), so that reading memory overlaps the arithmetic instead of following it.
//
// Score of row (h, i) and visible key p: s = scale * q.k; s = softcap * tanh(s / softcap) if softcap > 0;
// s -= slope[b, h] * |q_pos[b, i] - p| if slopes are given.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmath.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define SALIENCE_AMX 1
#endif
#include <cstdlib>

extern "C" {
// Every field is 8 bytes, so the layout matches the ctypes.Structure in decode.py with no padding.
struct SalienceDecodeArgs {
  const float* q;             // (B, H, L, D) float32, contiguous
  const void* k;              // cache of dtype `dtype`; last dim contiguous
  const void* v;
  int64_t k_s0, k_s1, k_s2;   // element strides of k over (batch or pool block, kv head, slot)
  int64_t v_s0, v_s1, v_s2;
  const int64_t* block_table;  // null: contiguous cache; else (B, max_blocks)
  int64_t max_blocks, block_size;
  const int64_t* lo;  // (B, L)
  const int64_t* hi;
  const float* slopes;    // (B, H) or null
  const int64_t* q_pos;   // (B, L) (with slopes)
  const float* sinks;     // (B, H) or null
  float* out;             // (B, H, L, Dv)
  float* lse;             // (B, H, L)
  int64_t B, H, Hkv, L, D, Dv;
  double scale, softcap;  // softcap 0: none
  int64_t nthreads, dtype;  // dtype 0 float32, 1 bfloat16, 2 float16
  int64_t min_split;        // fewest keys per piece of a split key range
  int64_t num_blocks;       // pool blocks (paged) ...
  int64_t capacity;         // ... and logical keys per sequence, for salience_decode_check
  const uint16_t* q16;      // bfloat16 caches: q as given (B, H, L, D) bfloat16, for the AVX512-BF16 dots
};
}

namespace {

using Args = SalienceDecodeArgs;
constexpr int64_t CHUNK = 64;  // most keys per online-softmax step, and the row stride of the score buffer
constexpr int MAX_NR = 8;      // query rows per register tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------ scalar loads

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400u));
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct F32 { using T = float; static float one(const float* p) { return *p; } };
struct BF16 {
  using T = uint16_t;
  static float one(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};
struct F16 { using T = uint16_t; static float one(const uint16_t* p) { return half_to_float(*p); } };

// ---------------------------------------------------------------------------------------- vector lanes

#if defined(__AVX512F__)
constexpr int W = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }  // b where a is NaN
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(V a) { return _mm512_reduce_max_ps(a); }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline V vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// 2W bfloat16 values in one load: the even-indexed ones (shifted up) and the odd-indexed ones (low half cleared).
inline void vload_bf16_pairs(const uint16_t* p, V& even, V& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
// out[0..3] = the lane sums of a0..a3: 128-bit quarters combined pairwise, then within each quarter
inline void vsum4(V a0, V a1, V a2, V a3, float* out) {
  const V c0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const V c1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  V d = _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
  d = _mm512_add_ps(d, _mm512_permute_ps(d, 0x4E));
  d = _mm512_add_ps(d, _mm512_permute_ps(d, 0xB1));
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, d)));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float x) { return _mm256_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }  // b where a is NaN
inline float vhmax(V a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float vsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline V vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vload_bf16_pairs(const uint16_t* p, V& even, V& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void vsum4(V a0, V a1, V a2, V a3, float* out) {
  const V h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#else
constexpr int W = 1;
struct V { float x; };
inline V vzero() { return {0.0f}; }
inline V vset(float x) { return {x}; }
inline V vfma(V a, V b, V c) { return {std::fma(a.x, b.x, c.x)}; }
inline V vmul(V a, V b) { return {a.x * b.x}; }
inline V vadd(V a, V b) { return {a.x + b.x}; }
inline V vmax(V a, V b) { return {a.x > b.x ? a.x : b.x}; }  // b where a is NaN
inline float vsum(V a) { return a.x; }
inline float vhmax(V a) { return a.x; }
inline void vstore(float* p, V a) { *p = a.x; }
inline V vload(const float* p) { return {*p}; }
inline V vload_bf16(const uint16_t* p) { return {BF16::one(p)}; }
inline V vload_f16(const uint16_t* p) { return {half_to_float(*p)}; }
inline void vload_bf16_pairs(const uint16_t* p, V& even, V& odd) {
  even = {BF16::one(p)};
  odd = {BF16::one(p + 1)};
}
inline void vsum4(V a0, V a1, V a2, V a3, float* out) {
  out[0] = a0.x;
  out[1] = a1.x;
  out[2] = a2.x;
  out[3] = a3.x;
}
#endif

template <typename C> inline V vget(const typename C::T* p);
template <> inline V vget<F32>(const float* p) { return vload(p); }
template <> inline V vget<BF16>(const uint16_t* p) { return vload_bf16(p); }
template <> inline V vget<F16>(const uint16_t* p) { return vload_f16(p); }

// The largest of x[a..z), skipping NaN (-inf when all are NaN or the range is empty); the sum of x[a..z).
inline float range_max(const float* x, int64_t a, int64_t z) {
  V m = vset(NEG_INF);
  int64_t j = a;
  for (; j + W <= z; j += W) m = vmax(vload(x + j), m);
  float r = vhmax(m);
  for (; j < z; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

inline float range_sum(const float* x, int64_t a, int64_t z) {
  V acc = vzero();
  int64_t j = a;
  for (; j + W <= z; j += W) acc = vadd(acc, vload(x + j));
  float r = vsum(acc);
  for (; j < z; ++j) r += x[j];
  return r;
}

using salience_math::exp_neg;  // exp(x) for x <= 0, about 2 ulp (fastmath.h)

// tanh(x) in float32, branch-free so that its loop vectorises: Cephes' odd polynomial below |x| = 0.625, else
// (1 - e) / (1 + e) with e = exp(-2|x|); relative error a few ulp.
inline float tanh_f(float x) {
  const float ax = std::fabs(x), z = x * x;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float e = exp_neg(-2.0f * ax);
  const float big = std::copysign((1.0f - e) / (1.0f + e), x);
  return ax < 0.625f ? small : big;
}

// ------------------------------------------------------------------------------------------- one item

// Addresses of the keys and values of a chunk ahead, prefetched a few lines at a time from inside the compute
// loops of the current chunk (a burst of prefetches would fill the line-fill buffers and stall the loads).
template <typename T>
struct Ahead {
  const T* k[CHUNK];
  const T* v[CHUNK];
  int64_t n;
};

// Prefetch (into L1) the cache lines holding bytes [from, to) of p.
inline void prefetch_span(const void* p, int64_t from, int64_t to) {
#if defined(__AVX512F__) || defined(__AVX2__)
  const char* c = static_cast<const char*>(p);
  for (int64_t o = from; o < to; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
  _mm_prefetch(c + to - 1, _MM_HINT_T0);
#else
  (void)p, (void)from, (void)to;
#endif
}

// The keys j .. j + u - 1 of the chunk ahead (those it has), each key's first `bytes` bytes.
template <typename T>
inline void prefetch_keys(const Ahead<T>* pf, int64_t j, int64_t u, int64_t bytes) {
  if (pf)
    for (int64_t x = 0; x < u; ++x)
      if (j + x < pf->n) prefetch_span(pf->k[j + x], 0, bytes);
}

// One tile of at most 8 query rows of a work item: query pointers, intervals clipped to the item's key range,
// ALiBi terms, and where its partial results (running max m, sum l, unnormalised output o) live.
struct Rows {
  int nr;
  const float* q[MAX_NR];
  const uint16_t* q16[MAX_NR];  // bfloat16 caches only
  const uint32_t* qv;           // AMX: the rows' bfloat16 queries in the tile layout (amx_queries), or null
  int64_t lo[MAX_NR], hi[MAX_NR], qpos[MAX_NR];
  float slope[MAX_NR];
  float* m;
  float* l;
  float* o;  // nr x Dv
};

// Key and value addresses of keys [c0, c0 + n) of (b, hk): in place, contiguous or through the block table.
template <typename C>
void key_addresses(const Args& A, int64_t b, int64_t hk, int64_t c0, int64_t n, const typename C::T** kp,
                   const typename C::T** vp) {
  using T = typename C::T;
  const T* k = static_cast<const T*>(A.k);
  const T* v = static_cast<const T*>(A.v);
  if (!A.block_table) {
    const T* kb = k + b * A.k_s0 + hk * A.k_s1;
    const T* vb = v + b * A.v_s0 + hk * A.v_s1;
    for (int64_t j = 0; j < n; ++j) {
      kp[j] = kb + (c0 + j) * A.k_s2;
      vp[j] = vb + (c0 + j) * A.v_s2;
    }
    return;
  }
  const int64_t bs = A.block_size;
  const int64_t* table = A.block_table + b * A.max_blocks;
  int64_t blk = c0 / bs, slot = c0 % bs;
  const T* kb = k + table[blk] * A.k_s0 + hk * A.k_s1;
  const T* vb = v + table[blk] * A.v_s0 + hk * A.v_s1;
  for (int64_t j = 0; j < n; ++j) {
    kp[j] = kb + slot * A.k_s2;
    vp[j] = vb + slot * A.v_s2;
    if (++slot == bs && j + 1 < n) {
      slot = 0;
      ++blk;
      kb = k + table[blk] * A.k_s0 + hk * A.k_s1;
      vb = v + table[blk] * A.v_s0 + hk * A.v_s1;
    }
  }
}

// s[r * CHUNK + j] = q_r . k_j for the tile's rows and KU consecutive keys from j (float32 sums): NR * KU
// independent FMA chains, reduced four at a time.
template <typename C, int NR, int KU>
inline void dots_step(const Rows& t, const typename C::T* const* kp, int64_t j, int64_t D, float* s) {
  constexpr int N = NR * KU, N4 = (N + 3) / 4 * 4;
  const int64_t Dw = D / W * W;
  V acc[N4];
  for (int u = 0; u < N4; ++u) acc[u] = vzero();
  for (int64_t d = 0; d < Dw; d += W) {
    V kk[KU];
    for (int u = 0; u < KU; ++u) kk[u] = vget<C>(kp[j + u] + d);
    for (int r = 0; r < NR; ++r) {
      const V qq = vload(t.q[r] + d);
      for (int u = 0; u < KU; ++u) acc[u * NR + r] = vfma(qq, kk[u], acc[u * NR + r]);
    }
  }
  float sums[N4];
  for (int u = 0; u < N4; u += 4) vsum4(acc[u], acc[u + 1], acc[u + 2], acc[u + 3], sums + u);
  for (int u = 0; u < KU; ++u)
    for (int r = 0; r < NR; ++r) {
      float x = sums[u * NR + r];
      for (int64_t d = Dw; d < D; ++d) x += t.q[r][d] * C::one(kp[j + u] + d);
      s[r * CHUNK + j + u] = x;
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bfloat16 keys against the bfloat16 query as given: vdpbf16ps multiplies 32 pairs exactly and sums in float32,
// with no conversion of the keys.
template <int NR, int KU>
inline void dots_step_bf16(const Rows& t, const uint16_t* const* kp, int64_t j, int64_t D, float* s) {
  constexpr int N = NR * KU, N4 = (N + 3) / 4 * 4;
  const int64_t Dw = D / 32 * 32;
  V acc[N4];
  for (int u = 0; u < N4; ++u) acc[u] = vzero();
  for (int64_t d = 0; d < Dw; d += 32) {
    __m512bh kk[KU];
    for (int u = 0; u < KU; ++u) kk[u] = (__m512bh)_mm512_loadu_si512(kp[j + u] + d);
    for (int r = 0; r < NR; ++r) {
      const __m512bh qq = (__m512bh)_mm512_loadu_si512(t.q16[r] + d);
      for (int u = 0; u < KU; ++u) acc[u * NR + r] = _mm512_dpbf16_ps(acc[u * NR + r], qq, kk[u]);
    }
  }
  float sums[N4];
  for (int u = 0; u < N4; u += 4) vsum4(acc[u], acc[u + 1], acc[u + 2], acc[u + 3], sums + u);
  for (int u = 0; u < KU; ++u)
    for (int r = 0; r < NR; ++r) {
      float x = sums[u * NR + r];
      for (int64_t d = Dw; d < D; ++d) x += t.q[r][d] * BF16::one(kp[j + u] + d);
      s[r * CHUNK + j + u] = x;
    }
}
constexpr bool HAVE_DPBF16 = true;
#else
template <int NR, int KU>
inline void dots_step_bf16(const Rows&, const uint16_t* const*, int64_t, int64_t, float*) {}
constexpr bool HAVE_DPBF16 = false;
#endif

// ------------------------------------------------------------------------------------------------ AMX
// Where the CPU has AMX-BF16 (and Linux grants the tile state), bfloat16 q.k runs on the tile unit: for 16 or 32
// keys at a time, C (keys x rows, float32) += K (keys x 32 d, read in place: the keys must be evenly spaced) times
// the rows' queries laid out as the B operand (amx_queries), over D / 32 blocks. Products are exact and the sums
// float32, as with vdpbf16ps. SALIENCE_DECODE_AMX=0 in the environment turns it off (tests compare both). The
// B operand has 16 query columns and a row tile at most 8 rows, so two tiles of a kv head share one product
// (run_pair): speculative decoding's 16-32 rows per kv head run 1.08-1.15x faster than one tile per product.
#if defined(SALIENCE_AMX)
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_wanted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  const char* env = std::getenv("SALIENCE_DECODE_AMX");
  return permitted && !(env && env[0] == '0');
}

// Every tile 16 rows of 64 bytes: 0, 1 accumulators, 2, 3 keys, 4 queries.
void amx_begin() {
  TileConfig c{};
  c.palette = 1;
  for (int i = 0; i < 5; ++i) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}
void amx_end() { _tile_release(); }

// The B operand for a tile of rows: block kb (d in [32 kb, 32 kb + 32)) is 16 rows of 16 uint32, row i column
// col0 + n holding row n's q[32 kb + 2i] and q[32 kb + 2i + 1]. col0 = 0 starts a layout (other columns 0);
// col0 = the first tile's rows adds a second tile's rows beside them (two tiles of at most 8 rows per product).
void amx_queries(const Rows& t, int64_t D, uint32_t* qv, int col0 = 0) {
  if (col0 == 0) std::fill(qv, qv + D / 32 * 256, 0u);
  for (int r = 0; r < t.nr; ++r) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(t.q16[r]);
    for (int64_t kb = 0; kb < D / 32; ++kb)
      for (int i = 0; i < 16; ++i) qv[kb * 256 + i * 16 + col0 + r] = q[kb * 16 + i];
  }
}

// s0[r * CHUNK + j + x] = q_r . k_{j + x} for the N0 rows of columns 0.. of qv, and s1[...] for the n1 rows of
// columns N0.. (a second tile; n1 = 0 for none), x < 16 g: g = 1 or 2 groups of 16 evenly spaced keys, the first
// from k0, the second from k1 (anywhere: in a paged cache, the next block). Two groups keep two independent
// chains of tile products in flight.
template <int N0>
void amx_dots(const uint32_t* qv, float* s0, int n1, float* s1, const uint16_t* k0, const uint16_t* k1, int64_t ks,
              int g, int64_t D, int64_t j) {
  alignas(64) float c[2 * 256];
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t kb = 0; kb < D / 32; ++kb) {
    _tile_loadd(4, qv + kb * 256, 64);
    _tile_loadd(2, k0 + kb * 32, ks * 2);
    _tile_dpbf16ps(0, 2, 4);
    if (g == 2) {
      _tile_loadd(3, k1 + kb * 32, ks * 2);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  _tile_stored(0, c, 64);
  if (g == 2) _tile_stored(1, c + 256, 64);
  for (int r = 0; r < N0; ++r)
    for (int x = 0; x < 16 * g; ++x) s0[r * CHUNK + j + x] = c[x * 16 + r];
  for (int r = 0; r < n1; ++r)
    for (int x = 0; x < 16 * g; ++x) s1[r * CHUNK + j + x] = c[x * 16 + N0 + r];
}
#else
bool amx_wanted() { return false; }
void amx_begin() {}
void amx_end() {}
void amx_queries(const Rows&, int64_t, uint32_t*, int = 0) {}
template <int N0>
void amx_dots(const uint32_t*, float*, int, float*, const uint16_t*, const uint16_t*, int64_t, int, int64_t, int64_t) {}
#endif

// Keys j .. j + m of kp evenly spaced by ks elements (one tile load can read them).
template <typename T>
bool evenly_spaced(const T* const* kp, int64_t j, int64_t m, int64_t ks) {
  for (int64_t x = 1; x < m; ++x)
    if (kp[j + x] != kp[j] + x * ks) return false;
  return true;
}

// The AMX groups of keys from j0 on, for one tile (t1 null) or two tiles of rows at once (t0's qv then holds both
// tiles' queries, see amx_queries): scores to s0 (and s1), the keys PREFETCH ahead prefetched as they go. Returns
// where the groups stop (the first key that is not in an evenly spaced group of 16).
template <int N0>
int64_t amx_groups(const Rows& t0, const Rows* t1, const uint16_t* const* kp, int64_t j0, int64_t n, int64_t D,
                   int64_t ks, float* s0, float* s1, const Ahead<uint16_t>* pf) {
  int64_t j = j0;
  while (j + 16 <= n) {
    const int g = !evenly_spaced(kp, j, 16, ks) ? 0 : j + 32 <= n && evenly_spaced(kp, j + 16, 16, ks) ? 2 : 1;
    if (g == 0) break;
    amx_dots<N0>(t0.qv, s0, t1 ? t1->nr : 0, s1, kp[j], g == 2 ? kp[j + 16] : nullptr, ks, g, D, j);
    prefetch_keys(pf, j, 16 * g, D * 2);
    j += 16 * g;
  }
  return j;
}

// Scores of the tile's rows for keys [j0, n) of the chunk (those before j0 are already in s).
template <typename C, int NR>
void dots(const Rows& t, const typename C::T* const* kp, int64_t n, int64_t D, int64_t ks, float* s,
          const Ahead<typename C::T>* pf, int64_t j0 = 0) {
  constexpr int KU = NR <= 2 ? 4 : NR <= 4 ? 2 : 1;  // about 8 accumulators
  const int64_t kb = D * static_cast<int64_t>(sizeof(typename C::T));
  auto ahead = [&](int64_t j, int u) { prefetch_keys(pf, j, u, kb); };
  int64_t j = j0;
  if constexpr (HAVE_DPBF16 && std::is_same<C, BF16>::value) {
    if (t.qv) j = amx_groups<NR>(t, nullptr, kp, j, n, D, ks, s, nullptr, pf);
    if (t.q16[0]) {
      for (; j + KU <= n; j += KU) dots_step_bf16<NR, KU>(t, kp, j, D, s), ahead(j, KU);
      for (; j < n; ++j) dots_step_bf16<NR, 1>(t, kp, j, D, s), ahead(j, 1);
      return;
    }
  }
  for (; j + KU <= n; j += KU) dots_step<C, NR, KU>(t, kp, j, D, s), ahead(j, KU);
  for (; j < n; ++j) dots_step<C, NR, 1>(t, kp, j, D, s), ahead(j, 1);
}

// bfloat16 values are summed in "paired" order: within each block of PAIR = 2W values starting at a multiple
// of PAIR, output slot i < W holds value 2i and slot W + i holds value 2i + 1, so that one load and two integer
// operations give both halves in float32 (vload_bf16_pairs). Values past the last whole block keep their order.
// merge_item puts the slots back in order.
constexpr int64_t PAIR = 2 * W;

// o[r] += sum_j p[r, j] v_j for NR rows (o and p strided by Dv and CHUNK) over DU blocks from d, all n keys.
template <int NR, int DU>
inline void accumulate_pairs(float* o, int64_t Dv, const uint16_t* const* vp, int64_t n, int64_t d, const float* p,
                             const Ahead<uint16_t>* pf) {
  V acc[2 * DU][NR];
  for (int u = 0; u < 2 * DU; ++u)
    for (int r = 0; r < NR; ++r) acc[u][r] = vload(o + r * Dv + d + u * W);
  for (int64_t j = 0; j < n; ++j) {
    if (pf && j < pf->n) prefetch_span(pf->v[j], d * 2, (d + DU * PAIR) * 2);
    V ev[DU], od[DU];
    for (int u = 0; u < DU; ++u) vload_bf16_pairs(vp[j] + d + u * PAIR, ev[u], od[u]);
    for (int r = 0; r < NR; ++r) {
      const V pr = vset(p[r * CHUNK + j]);
      for (int u = 0; u < DU; ++u) {
        acc[2 * u][r] = vfma(pr, ev[u], acc[2 * u][r]);
        acc[2 * u + 1][r] = vfma(pr, od[u], acc[2 * u + 1][r]);
      }
    }
  }
  for (int u = 0; u < 2 * DU; ++u)
    for (int r = 0; r < NR; ++r) vstore(o + r * Dv + d + u * W, acc[u][r]);
}

// The whole blocks of Dv for NR rows, at most GROUP rows per pass (the accumulators stay in registers).
template <int NR>
void accumulate_blocks(float* o, int64_t Dv, const uint16_t* const* vp, int64_t n, const float* p,
                       const Ahead<uint16_t>* pf) {
  constexpr int GROUP = W >= 16 ? 8 : 4;
  if constexpr (NR > GROUP) {
    accumulate_blocks<GROUP>(o, Dv, vp, n, p, pf);
    accumulate_blocks<NR - GROUP>(o + GROUP * Dv, Dv, vp, n, p + GROUP * CHUNK, nullptr);
  } else {
    constexpr int DU = W >= 16 ? (NR <= 2 ? 4 : NR <= 4 ? 2 : 1) : (NR <= 1 ? 4 : NR <= 2 ? 2 : 1);
    const int64_t Dp = Dv / PAIR * PAIR;
    int64_t d = 0;
    for (; d + DU * PAIR <= Dp; d += DU * PAIR) accumulate_pairs<NR, DU>(o, Dv, vp, n, d, p, pf);
    for (; d < Dp; d += PAIR) accumulate_pairs<NR, 1>(o, Dv, vp, n, d, p, pf);
  }
}

// o_r += sum_j p[r, j] v_j over the chunk, for every row of the tile (all rows see all n keys).
// DU vectors of each row's output at a time: NR * DU independent FMA chains (about 8), each broadcast of a
// probability used DU times.
template <typename C, int NR, int DU>
inline void accumulate_step(const Rows& t, const typename C::T* const* vp, int64_t n, int64_t Dv, int64_t d,
                            const float* p, const Ahead<typename C::T>* pf) {
  constexpr int64_t SZ = sizeof(typename C::T);
  V acc[DU][NR];
  for (int u = 0; u < DU; ++u)
    for (int r = 0; r < NR; ++r) acc[u][r] = vload(t.o + r * Dv + d + u * W);
  for (int64_t j = 0; j < n; ++j) {
    if (pf && j < pf->n) prefetch_span(pf->v[j], d * SZ, (d + DU * W) * SZ);
    V vv[DU];
    for (int u = 0; u < DU; ++u) vv[u] = vget<C>(vp[j] + d + u * W);
    for (int r = 0; r < NR; ++r) {
      const V pr = vset(p[r * CHUNK + j]);
      for (int u = 0; u < DU; ++u) acc[u][r] = vfma(pr, vv[u], acc[u][r]);
    }
  }
  for (int u = 0; u < DU; ++u)
    for (int r = 0; r < NR; ++r) vstore(t.o + r * Dv + d + u * W, acc[u][r]);
}

template <typename C, int NR>
void accumulate_all(const Rows& t, const typename C::T* const* vp, int64_t n, int64_t Dv, const float* p,
                    const Ahead<typename C::T>* pf) {
  constexpr int DU = NR <= 2 ? 4 : NR <= 4 ? 2 : 1;
  const int64_t Dw = Dv / W * W;
  int64_t d = 0;
  if constexpr (std::is_same<C, BF16>::value) {
    accumulate_blocks<NR>(t.o, Dv, vp, n, p, pf);
    d = Dv / PAIR * PAIR;
  }
  for (; d + DU * W <= Dw; d += DU * W) accumulate_step<C, NR, DU>(t, vp, n, Dv, d, p, pf);
  for (; d < Dw; d += W) accumulate_step<C, NR, 1>(t, vp, n, Dv, d, p, pf);
  constexpr int64_t SZ = sizeof(typename C::T);
  if (pf && Dw < Dv)
    for (int64_t j = 0; j < pf->n; ++j) prefetch_span(pf->v[j], Dw * SZ, Dv * SZ);
  for (int64_t d = Dw; d < Dv; ++d)
    for (int r = 0; r < NR; ++r) {
      float x = t.o[r * Dv + d];
      for (int64_t j = 0; j < n; ++j) x += p[r * CHUNK + j] * C::one(vp[j] + d);
      t.o[r * Dv + d] = x;
    }
}

// o_r += sum_j p[r, j] v_j over keys [a, z) of the chunk only, for one row r (boundary chunks).
template <typename C>
void accumulate_row(float* o, const typename C::T* const* vp, int64_t a, int64_t z, int64_t Dv, const float* p) {
  const int64_t Dw = Dv / W * W;
  int64_t d0 = 0;
  if constexpr (std::is_same<C, BF16>::value) {  // paired order (see PAIR)
    for (; d0 + PAIR <= Dv; d0 += PAIR) {
      V e = vload(o + d0), f = vload(o + d0 + W), ev, od;
      for (int64_t j = a; j < z; ++j) {
        vload_bf16_pairs(vp[j] + d0, ev, od);
        e = vfma(vset(p[j]), ev, e);
        f = vfma(vset(p[j]), od, f);
      }
      vstore(o + d0, e);
      vstore(o + d0 + W, f);
    }
  }
  for (int64_t d = d0; d < Dw; d += W) {
    V acc = vload(o + d);
    for (int64_t j = a; j < z; ++j) acc = vfma(vset(p[j]), vget<C>(vp[j] + d), acc);
    vstore(o + d, acc);
  }
  for (int64_t d = Dw; d < Dv; ++d) {
    float x = o[d];
    for (int64_t j = a; j < z; ++j) x += p[j] * C::one(vp[j] + d);
    o[d] = x;
  }
}

// Scores -> probabilities for row r on keys [a, z) of a chunk starting at c0 (others get p = 0); updates the
// running max m, sum l and rescales o. Returns false when the row has seen no key yet. The loops vectorise.
bool softmax_row(const Args& A, const Rows& t, int r, int64_t c0, int64_t n, int64_t a, int64_t z, float* s) {
  const float scale = static_cast<float>(A.scale), cap = static_cast<float>(A.softcap);
#pragma omp simd
  for (int64_t j = a; j < z; ++j) s[j] *= scale;
  if (cap > 0) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (int64_t j = a; j < z; ++j) s[j] = cap * tanh_f(s[j] * inv);
  }
  if (A.slopes) {
    const float slope = t.slope[r], base = static_cast<float>(t.qpos[r] - c0);
#pragma omp simd
    for (int64_t j = a; j < z; ++j) s[j] -= slope * std::fabs(base - static_cast<float>(j));
  }
  const float mx = range_max(s, a, z);  // a NaN score is skipped here but stays in s
  for (int64_t j = 0; j < a; ++j) s[j] = 0.0f;
  for (int64_t j = z; j < n; ++j) s[j] = 0.0f;
  const float m_old = t.m[r], m_new = std::max(m_old, mx);
  if (m_new == NEG_INF) return false;  // nothing visible yet (a NaN score stays NaN through p, l and o)
#pragma omp simd
  for (int64_t j = a; j < z; ++j) s[j] = exp_neg(s[j] - m_new);
  const float sum = range_sum(s, a, z);
  if (m_old != m_new) {
    const float alpha = m_old == NEG_INF ? 0.0f : exp_neg(m_old - m_new);
    float* o = t.o + r * A.Dv;
#pragma omp simd
    for (int64_t d = 0; d < A.Dv; ++d) o[d] *= alpha;
    t.l[r] *= alpha;
  }
  t.l[r] += sum;
  t.m[r] = m_new;
  return true;
}

// One tile of NR rows over one chunk of keys [c0, c0 + n).
// (j0: the scores of keys [0, j0) are already in s, see run_pair.)
template <typename C, int NR>
void tile_chunk(const Args& A, const Rows& t, int64_t c0, int64_t n, const typename C::T* const* kp,
                const typename C::T* const* vp, float* s, const Ahead<typename C::T>* pf, int64_t j0) {
  dots<C, NR>(t, kp, n, A.D, A.k_s2, s, pf, j0);
  bool all = true;
  int64_t a[NR], z[NR];
  for (int r = 0; r < NR; ++r) {
    a[r] = std::min(std::max(t.lo[r] - c0, int64_t(0)), n);
    z[r] = std::max(std::min(t.hi[r] - c0, n), a[r]);
    all = all && a[r] == 0 && z[r] == n;
    if (!softmax_row(A, t, r, c0, n, a[r], z[r], s + r * CHUNK)) {
      all = false;
      z[r] = a[r];
    }
  }
  if (all) {
    accumulate_all<C, NR>(t, vp, n, A.Dv, s, pf);
    return;
  }
  if (pf)
    for (int64_t j = 0; j < pf->n; ++j) prefetch_span(pf->v[j], 0, A.Dv * static_cast<int64_t>(sizeof(typename C::T)));
  for (int r = 0; r < NR; ++r)
    if (z[r] > a[r]) accumulate_row<C>(t.o + r * A.Dv, vp, a[r], z[r], A.Dv, s + r * CHUNK);
}

template <typename C>
void tile_chunk_n(const Args& A, const Rows& t, int64_t c0, int64_t n, const typename C::T* const* kp,
                  const typename C::T* const* vp, float* s, const Ahead<typename C::T>* pf, int64_t j0 = 0) {
  switch (t.nr) {
    case 1: return tile_chunk<C, 1>(A, t, c0, n, kp, vp, s, pf, j0);
    case 2: return tile_chunk<C, 2>(A, t, c0, n, kp, vp, s, pf, j0);
    case 3: return tile_chunk<C, 3>(A, t, c0, n, kp, vp, s, pf, j0);
    case 4: return tile_chunk<C, 4>(A, t, c0, n, kp, vp, s, pf, j0);
    case 5: return tile_chunk<C, 5>(A, t, c0, n, kp, vp, s, pf, j0);
    case 6: return tile_chunk<C, 6>(A, t, c0, n, kp, vp, s, pf, j0);
    case 7: return tile_chunk<C, 7>(A, t, c0, n, kp, vp, s, pf, j0);
    default: return tile_chunk<C, 8>(A, t, c0, n, kp, vp, s, pf, j0);
  }
}

// Two tiles of a kv head over one chunk with AMX: one tile product serves both tiles' rows (16 query columns
// instead of two products of at most 8), then each tile finishes its chunk (softmax, values) as alone.
template <typename C>
void run_pair(const Args& A, const Rows& t0, const Rows& t1, int64_t c0, int64_t n, const typename C::T* const* kp,
              const typename C::T* const* vp, float* s, float* s1, const Ahead<typename C::T>* pf) {
  int64_t j0 = 0;
  if constexpr (std::is_same<C, BF16>::value) {
    auto groups = [&](auto n0) { return amx_groups<decltype(n0)::value>(t0, &t1, kp, 0, n, A.D, A.k_s2, s, s1, pf); };
    switch (t0.nr) {  // the first tile's rows as a compile-time count, as in the one-tile path
      case 1: j0 = groups(std::integral_constant<int, 1>{}); break;
      case 2: j0 = groups(std::integral_constant<int, 2>{}); break;
      case 3: j0 = groups(std::integral_constant<int, 3>{}); break;
      case 4: j0 = groups(std::integral_constant<int, 4>{}); break;
      case 5: j0 = groups(std::integral_constant<int, 5>{}); break;
      case 6: j0 = groups(std::integral_constant<int, 6>{}); break;
      case 7: j0 = groups(std::integral_constant<int, 7>{}); break;
      default: j0 = groups(std::integral_constant<int, 8>{}); break;
    }
  }
  tile_chunk_n<C>(A, t0, c0, n, kp, vp, s, pf, j0);
  tile_chunk_n<C>(A, t1, c0, n, kp, vp, s1, nullptr, j0);
}

// The tile of rows [r0, r0 + nr) of item (b, hk), over keys [ka, kz): row r = g * L + i is query head
// hk * G + g, query row i. Partial results go to part (m, l, o for each of the item's rows).
Rows make_tile(const Args& A, int64_t b, int64_t hk, int64_t ka, int64_t kz, int64_t r0, int nr, float* part) {
  const int64_t G = A.H / A.Hkv, L = A.L, R = G * L;
  Rows t;
  t.nr = nr;
  t.m = part + r0;
  t.l = part + R + r0;
  t.o = part + 2 * R + r0 * A.Dv;
  for (int r = 0; r < nr; ++r) {
    const int64_t g = (r0 + r) / L, i = (r0 + r) % L, h = hk * G + g;
    t.q[r] = A.q + ((b * A.H + h) * L + i) * A.D;
    t.q16[r] = A.q16 ? A.q16 + ((b * A.H + h) * L + i) * A.D : nullptr;
    t.qv = nullptr;
    t.lo[r] = std::max(A.lo[b * L + i], ka);
    t.hi[r] = std::min(A.hi[b * L + i], kz);
    t.slope[r] = A.slopes ? A.slopes[b * A.H + h] : 0.0f;
    t.qpos[r] = A.q_pos ? A.q_pos[b * L + i] : 0;
  }
  return t;
}

// Keys per chunk: 16 KiB of 128-wide keys (64 bfloat16/float16 or 32 float32 ones), so that a chunk's keys and
// values and the ones being prefetched stay in L1 while the chunk's rows use them.
template <typename C>
constexpr int64_t chunk_keys() {
  return sizeof(typename C::T) == 2 ? 64 : 32;
}

// The keys and values PREFETCH keys ahead (the chunk that starts there) are prefetched from inside the loops of the
// current chunk (see Ahead): the hardware prefetchers alone leave the chunk loop waiting on memory, and they stop
// at page and block edges.
constexpr int64_t PREFETCH = 64;

// One work item: keys [ka, kz) of sequence b for all the rows of kv heads hk0 .. hk0 + nh - 1, chunk by chunk,
// the heads in turn within each chunk; head hk0 + h leaves its partial results at part + h * part_stride. Chunks
// after the first start at multiples of chunk_keys (so that paged blocks of 16 or more keys give evenly spaced
// groups of 16 for AMX). qbuf: room for the AMX query layouts of every tile, or null (no AMX).
template <typename C>
void run_item(const Args& A, int64_t b, int64_t hk0, int64_t nh, int64_t ka, int64_t kz, float* part,
              int64_t part_stride, float* s, float* s1, uint32_t* qbuf) {
  using T = typename C::T;
  const int64_t R = A.H / A.Hkv * A.L, ntiles = (R + MAX_NR - 1) / MAX_NR, qsize = A.D / 32 * 256;
  Rows tiles[64];  // nh * ntiles <= 64 (head_group)
  for (int64_t h = 0; h < nh; ++h) {
    float* ph = part + h * part_stride;
    std::fill(ph, ph + R, NEG_INF);
    std::fill(ph + R, ph + R * (2 + A.Dv), 0.0f);
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r0 = t * R / ntiles, r1 = (t + 1) * R / ntiles;  // balanced tiles of <= 8 rows
      Rows& tt = tiles[h * ntiles + t];
      tt = make_tile(A, b, hk0 + h, ka, kz, r0, static_cast<int>(r1 - r0), ph);
      if (qbuf) amx_queries(tt, A.D, qbuf + (h * ntiles + t) * qsize), tt.qv = qbuf + (h * ntiles + t) * qsize;
    }
    if (qbuf)  // tiles 2i and 2i + 1 share a tile product: 2i's layout gets 2i + 1's rows beside its own
      for (int64_t t = h * ntiles; t + 1 < (h + 1) * ntiles; t += 2)
        amx_queries(tiles[t + 1], A.D, const_cast<uint32_t*>(tiles[t].qv), tiles[t].nr);
  }
  const T* kp[CHUNK];
  const T* vp[CHUNK];
  Ahead<T> ahead;
  constexpr int64_t CK = chunk_keys<C>();
  for (int64_t c0 = ka; c0 < kz;) {
    const int64_t next = std::min(kz, (c0 / CK + 1) * CK), n = next - c0;
    const int64_t c1 = (c0 / CK + PREFETCH / CK) * CK;
    ahead.n = c1 < kz ? std::min(CK, kz - c1) : 0;
    for (int64_t h = 0; h < nh; ++h) {
      if (ahead.n) key_addresses<C>(A, b, hk0 + h, c1, ahead.n, ahead.k, ahead.v);
      key_addresses<C>(A, b, hk0 + h, c0, n, kp, vp);
      bool first = true;
      auto sees = [&](const Rows& tt) {
        bool any = false;
        for (int r = 0; r < tt.nr; ++r) any = any || (tt.lo[r] < c0 + n && tt.hi[r] > c0 && tt.lo[r] < tt.hi[r]);
        return any;
      };
      for (int64_t t = h * ntiles; t < (h + 1) * ntiles; ++t) {
        const Ahead<T>* pf = first && ahead.n ? &ahead : nullptr;
        if (!sees(tiles[t])) continue;
        const bool pair = qbuf && (t - h * ntiles) % 2 == 0 && t + 1 < (h + 1) * ntiles && sees(tiles[t + 1]);
        if (pair)
          run_pair<C>(A, tiles[t], tiles[t + 1], c0, n, kp, vp, s, s1, pf), ++t;
        else
          tile_chunk_n<C>(A, tiles[t], c0, n, kp, vp, s, pf);
        first = false;
      }
    }
    c0 = next;
  }
}

// How many kv heads one item reads side by side: all of them (as many as 64 row tiles allow) when a key's heads
// lie next to each other: paged pools (an item reads whole blocks instead of one head's slice of each) and caches
// stored with the heads inside each key, as flash-attention lays them out ((B, S, Hkv, D) passed transposed:
// one head's keys alone are a stride of Hkv * D, a few hundred bytes out of every few KiB). One for (B, Hkv, S, D)
// caches, where each head's keys are one stream already.
int64_t head_group(const Args& A) {
  const bool interleaved = A.k_s1 < A.k_s2 && A.v_s1 < A.v_s2;
  if (!A.block_table && !interleaved) return 1;
  const int64_t ntiles = (A.H / A.Hkv * A.L + MAX_NR - 1) / MAX_NR;
  int64_t g = std::max<int64_t>(1, std::min(A.Hkv, 64 / ntiles));
  while (A.Hkv % g) --g;
  return g;
}

// Merge the pieces of (b, hk) by logsumexp, with the sink logit as one more term; writes out and lse.
void merge_item(const Args& A, int64_t b, int64_t hk, const float* parts, int64_t npieces) {
  const int64_t G = A.H / A.Hkv, L = A.L, R = G * L, Dv = A.Dv, stride = R * (2 + Dv);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hk * G + r / L, i = r % L;
    const float sink = A.sinks ? A.sinks[b * A.H + h] : NEG_INF;
    float M = sink;
    for (int64_t s = 0; s < npieces; ++s) M = std::max(M, parts[s * stride + r]);
    float* o = A.out + ((b * A.H + h) * L + i) * Dv;
    float* lse = A.lse + (b * A.H + h) * L + i;
    std::fill(o, o + Dv, 0.0f);
    if (M == NEG_INF) {
      *lse = NEG_INF;
      continue;
    }
    double tot = A.sinks ? std::exp(static_cast<double>(sink) - M) : 0.0;
    for (int64_t s = 0; s < npieces; ++s) {
      const float m = parts[s * stride + r];
      if (m == NEG_INF) continue;
      const float w = std::exp(m - M);
      tot += static_cast<double>(w) * parts[s * stride + R + r];
      const float* po = parts + s * stride + 2 * R + r * Dv;
      int64_t d = 0;
      if (A.dtype == 1)  // bfloat16 sums are in paired order (see PAIR)
        for (; d + PAIR <= Dv; d += PAIR)
          for (int64_t i = 0; i < W; ++i) {
            o[d + 2 * i] += w * po[d + i];
            o[d + 2 * i + 1] += w * po[d + W + i];
          }
      for (; d < Dv; ++d) o[d] += w * po[d];
    }
    const float inv = static_cast<float>(1.0 / tot);
    for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    *lse = M + static_cast<float>(std::log(tot));
  }
}

// Key range of each sequence (the union of its rows' intervals) and how many pieces to split it into; returns
// the total number of (key, kv head) pairs to read.
int64_t plan(const Args& A, int64_t nh, std::vector<int64_t>& ka, std::vector<int64_t>& kz,
             std::vector<int64_t>& pieces) {
  int64_t total = 0;
  for (int64_t b = 0; b < A.B; ++b) {
    int64_t a = std::numeric_limits<int64_t>::max(), z = 0;
    for (int64_t i = 0; i < A.L; ++i)
      if (A.hi[b * A.L + i] > A.lo[b * A.L + i]) {
        a = std::min(a, A.lo[b * A.L + i]);
        z = std::max(z, A.hi[b * A.L + i]);
      }
    if (z == 0) a = 0;
    ka[b] = a;
    kz[b] = z;
    total += (z - a) * A.Hkv;
  }
  // about 32 items (pieces x groups of nh heads) per thread, so that the dynamic schedule balances sequences of
  // different lengths; no piece shorter than min_split keys
  const int64_t want = 32 * nh * A.nthreads;
  const int64_t piece = std::max<int64_t>(A.min_split, (total + want - 1) / want);
  for (int64_t b = 0; b < A.B; ++b) pieces[b] = std::max<int64_t>(1, (kz[b] - ka[b] + piece - 1) / piece);
  return total;
}

// Below this many (key, kv head) pairs one thread does the whole call: waking the others costs more.
constexpr int64_t PARALLEL_MIN = 2048;

// Items are (kv head, piece) with the pieces of each (b, kv head) adjacent. The thread that finishes the last
// piece of a (b, kv head) merges its pieces, so there is no barrier between the two passes.
template <typename C>
void forward(const Args& A) {
  const int64_t R = A.H / A.Hkv * A.L, stride = R * (2 + A.Dv), nh = head_group(A);
  std::vector<int64_t> ka(A.B), kz(A.B), pieces(A.B), first(A.B + 1, 0);
  const int64_t total = plan(A, nh, ka, kz, pieces);
  for (int64_t b = 0; b < A.B; ++b) first[b + 1] = first[b] + pieces[b];
  const int64_t per_head = first[A.B], items = per_head * (A.Hkv / nh);
  std::vector<float> parts(static_cast<size_t>(per_head * A.Hkv * stride));
  std::vector<int64_t> item_b(per_head);
  std::vector<std::atomic<int64_t>> done(static_cast<size_t>(A.B * A.Hkv));
  for (auto& x : done) x.store(0);
  for (int64_t b = 0; b < A.B; ++b)
    for (int64_t s = first[b]; s < first[b + 1]; ++s) item_b[s] = b;
  const int nt = static_cast<int>(total < PARALLEL_MIN ? 1 : std::min(A.nthreads, items));
  const bool amx = std::is_same<C, BF16>::value && A.q16 && A.D % 32 == 0 && amx_wanted();
  // piece p of sequence b starts at its share of the range, rounded down to a multiple of 16 keys
  auto start = [&](int64_t b, int64_t p) {
    const int64_t at = (ka[b] + (kz[b] - ka[b]) * p / pieces[b]) / 16 * 16;
    return p == 0 ? ka[b] : p == pieces[b] ? kz[b] : std::max(ka[b], at);
  };
#pragma omp parallel num_threads(nt)
  {
    alignas(64) float s[MAX_NR * CHUNK];
    std::vector<float> s1(amx && R > MAX_NR ? MAX_NR * CHUNK : 0);  // run_pair's second score buffer
    std::vector<uint32_t> qbuf(amx ? static_cast<size_t>(nh * ((R + MAX_NR - 1) / MAX_NR) * (A.D / 32) * 256) : 0);
    if (amx) amx_begin();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t w = 0; w < items; ++w) {
      const int64_t hk0 = w / per_head * nh, e = w % per_head, b = item_b[e], p = e - first[b];
      run_item<C>(A, b, hk0, nh, start(b, p), start(b, p + 1), parts.data() + (hk0 * per_head + e) * stride,
                  per_head * stride, s, s1.data(), amx ? qbuf.data() : nullptr);
      for (int64_t hk = hk0; hk < hk0 + nh; ++hk)
        if (done[b * A.Hkv + hk].fetch_add(1, std::memory_order_acq_rel) + 1 == pieces[b])
          merge_item(A, b, hk, parts.data() + (hk * per_head + first[b]) * stride, pieces[b]);
    }
    if (amx) amx_end();
  }
}

}  // namespace

extern "C" {

int salience_decode_abi() { return 3; }
int64_t salience_decode_args_size() { return static_cast<int64_t>(sizeof(SalienceDecodeArgs)); }
int salience_decode_lanes() { return W; }
// 1 when bfloat16 q.k runs on AMX tiles in this process (compiled in, granted by Linux, SALIENCE_DECODE_AMX not 0)
int salience_decode_amx() { return amx_wanted() ? 1 : 0; }
int64_t salience_decode_max_rows() { return MAX_NR * 64; }

// 0 when every bound lies in [0, capacity] and every pool block that some row reads is in [0, num_blocks);
// else 1 (decode.py then words the error).
int64_t salience_decode_check(const SalienceDecodeArgs* a) {
  const Args& A = *a;
  for (int64_t b = 0; b < A.B; ++b) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (int64_t i = 0; i < A.L; ++i) {
      const int64_t x = A.lo[b * A.L + i], y = A.hi[b * A.L + i];
      if (x < 0 || x > A.capacity || y < 0 || y > A.capacity) return 1;
      if (y > x) {
        lo = std::min(lo, x);
        hi = std::max(hi, y);
      }
    }
    if (A.block_table && hi > 0)
      for (int64_t j = lo / A.block_size; j <= (hi - 1) / A.block_size; ++j) {
        const int64_t e = A.block_table[b * A.max_blocks + j];
        if (e < 0 || e >= A.num_blocks) return 1;
      }
  }
  return 0;
}

void salience_decode_forward(const SalienceDecodeArgs* a) {
  if (a->dtype == 1)
    forward<BF16>(*a);
  else if (a->dtype == 2)
    forward<F16>(*a);
  else
    forward<F32>(*a);
}

}  // extern "C"
