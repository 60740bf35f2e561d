// Exact attention for masks with one visible key interval [lo_i, hi_i) per query row, forward and backward.
//
// Part of salience: kernels/native.py compiles this file on first use and calls it through ctypes.
// Each tile of query rows visits only the union of its rows' key intervals, in chunks of keys; scores
// outside a row's own interval are never used. An optional additive bias that depends only on the head and
// j - i (ALiBi, T5 buckets) is read from one vector per head.
//
// * forward: online softmax over the key chunks (running max and sum per row), output and logsumexp;
//   rows with no visible key get output 0 and logsumexp -inf.
// * backward (FlashAttention-2 style): probabilities recomputed from q, k and the saved logsumexp;
//   dS = P * (dP - delta) with delta_i = rowsum(dout * out) - dlse_i; key and value gradients accumulated
//   in place, per query head (the caller sums a head group).
// * dropout (optional): weight (b, h, i, j) is kept with probability 1 - p and scaled by 1 / (1 - p); the
//   keep decision is a hash of (seed, b * H + h, i, j), so the backward regenerates the forward's mask.
//   The logsumexp is that of the undropped weights; with dropout the backward uses
//   dV = (P o Z)^T dO, dS = P o (Z o dO V^T - delta), delta_i = rowsum(dout * out) - dlse_i, where Z holds
//   0 or 1 / (1 - p).
//
// Layout: contiguous (B, H, L, D) for q, out, dout, dq; (B, Hkv, S, D) for k and v; (B, H, S, D) for the
// per-query-head dk, dv. GEMMs are the BLAS sgemm_/dgemm_ that libtorch_cpu exports (MKL in x86 wheels).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fastmath.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);

// Every field is 8 bytes, so the layout matches the ctypes.Structure in native.py with no padding.
struct SalienceIntervalArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // backward: the forward's output; forward: unused
  const void* dout;  // backward only
  const void* lse;   // backward only
  const void* dlse;  // backward only, may be null
  const int64_t* lo;
  const int64_t* hi;
  int64_t lo_batch_stride;  // 0 when every batch row shares the intervals, else L
  const void* bias;         // may be null
  int64_t bias_b_stride;
  int64_t bias_h_stride;
  int64_t bias_offset;  // bias of (row i, key j) at bias[b * bias_b_stride + h * bias_h_stride + j - i + offset]
  void* dq;             // backward outputs (zero-initialised by the caller)
  void* dk;
  void* dv;
  void* out_w;  // forward outputs
  void* lse_w;
  int64_t B, H, Hkv, L, S, D, Dv;
  double scale;
  int64_t tile, kv_chunk, nthreads;
  double dropout_p;  // 0: no dropout
  int64_t seed;
};
}

namespace {

using Args = SalienceIntervalArgs;

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(ta, tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C. op(A) is M x K: A is stored M x K (lda) unless
// trans_a, when it is stored K x M. Likewise op(B) is K x N. BLAS is column-major, and a row-major matrix is
// its transpose in column-major, so this computes C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", static_cast<int>(N), static_cast<int>(M),
            static_cast<int>(K), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
            static_cast<int>(ldc));
}

// exp(x) for x <= ~0 (see fastmath.h); float64 uses the library's exp.
inline float exp_approx(float x) { return salience_math::exp_neg(x); }
inline double exp_approx(double x) { return std::exp(x); }

// max(p[a:z]), -inf when empty; 16 running maxima so that the loop vectorises (a plain max reduction does not
// without -ffast-math)
template <typename T>
T row_max(const T* p, int64_t a, int64_t z) {
  constexpr int W = 16;
  T part[W];
  for (int u = 0; u < W; ++u) part[u] = -std::numeric_limits<T>::infinity();
  int64_t j = a;
  for (; j + W <= z; j += W)
    for (int u = 0; u < W; ++u) part[u] = part[u] > p[j + u] ? part[u] : p[j + u];
  T m = -std::numeric_limits<T>::infinity();
  for (; j < z; ++j) m = m > p[j] ? m : p[j];
  for (int u = 0; u < W; ++u) m = m > part[u] ? m : part[u];
  return m;
}

// Dropout multiplier (0 or 1 / (1 - p)) of weight (bh, i, j): splitmix64's finaliser over the packed index,
// whose top 24 bits give a uniform number in [0, 1).
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

template <typename T>
void dropout_row(T* z, int64_t nc, uint64_t seed, int64_t bh, int64_t i, int64_t c0, double p) {
  const uint64_t row = mix64(seed ^ mix64((static_cast<uint64_t>(bh) << 32) ^ static_cast<uint64_t>(i)));
  const uint32_t threshold = static_cast<uint32_t>(p * 16777216.0);  // keep when u >= p, u = bits / 2^24
  const T keep = static_cast<T>(1.0 / (1.0 - p));
  for (int64_t j = 0; j < nc; ++j) {
    const uint64_t key = row + static_cast<uint64_t>(c0 + j) * 0x9e3779b97f4a7c15ULL;
    const uint32_t u = static_cast<uint32_t>(mix64(key) >> 40);
    z[j] = u >= threshold ? keep : T(0);
  }
}

// The key range [kmin, kmax) a tile of rows needs (empty: kmin >= kmax); rows with lse -inf are skipped.
template <typename T>
void tile_keys(const int64_t* lo, const int64_t* hi, const T* lse, int64_t m, int64_t rows, int64_t S,
               int64_t& kmin, int64_t& kmax) {
  kmin = S;
  kmax = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m + r;
    if (hi[i] > lo[i] && (lse == nullptr || std::isfinite(lse[i]))) {
      kmin = std::min(kmin, lo[i]);
      kmax = std::max(kmax, hi[i]);
    }
  }
}

// The visible columns [a, z) of row i within the chunk of nc keys starting at c0.
inline void row_cols(const int64_t* lo, const int64_t* hi, int64_t i, int64_t c0, int64_t nc, int64_t& a,
                     int64_t& z) {
  a = std::clamp(lo[i] - c0, int64_t(0), nc);
  z = std::clamp(hi[i] - c0, int64_t(0), nc);
  if (hi[i] <= lo[i]) z = a;
}

template <typename T>
void forward(const Args& A) {
  const T* q = static_cast<const T*>(A.q);
  const T* k = static_cast<const T*>(A.k);
  const T* v = static_cast<const T*>(A.v);
  const T* bias = static_cast<const T*>(A.bias);
  T* out = static_cast<T*>(A.out_w);
  T* lse = static_cast<T*>(A.lse_w);
  const int64_t H = A.H, L = A.L, S = A.S, D = A.D, Dv = A.Dv, tile = A.tile, kv_chunk = A.kv_chunk;
  const int64_t group = H / A.Hkv;
  const T scale = static_cast<T>(A.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t ntiles = (L + tile - 1) / tile;
  const int64_t work = A.B * H * ntiles;
#pragma omp parallel num_threads(static_cast<int>(A.nthreads))
  {
    std::vector<T> sbuf(tile * kv_chunk), mx(tile), sum(tile), zbuf(A.dropout_p > 0 ? kv_chunk : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t item = w / ntiles, m = (w % ntiles) * tile;
      const int64_t b = item / H, h = item % H, hk = h / group;
      const int64_t rows = std::min(tile, L - m);
      const T* qt = q + ((b * H + h) * L + m) * D;
      const T* kh = k + (b * A.Hkv + hk) * S * D;
      const T* vh = v + (b * A.Hkv + hk) * S * Dv;
      const int64_t* lo = A.lo + b * A.lo_batch_stride;
      const int64_t* hi = A.hi + b * A.lo_batch_stride;
      const T* gh = bias ? bias + b * A.bias_b_stride + h * A.bias_h_stride : nullptr;
      T* ot = out + ((b * H + h) * L + m) * Dv;
      T* lt = lse + (b * H + h) * L + m;
      std::fill(ot, ot + rows * Dv, T(0));
      int64_t kmin, kmax;
      tile_keys<T>(lo, hi, nullptr, m, rows, S, kmin, kmax);
      for (int64_t r = 0; r < rows; ++r) {
        mx[r] = neg_inf;
        sum[r] = 0;
      }
      for (int64_t c0 = kmin; c0 < kmax; c0 += kv_chunk) {
        const int64_t nc = std::min(kv_chunk, kmax - c0);
        T* P = sbuf.data();
        gemm_rm<T>(false, true, rows, nc, D, scale, qt, D, kh + c0 * D, D, T(0), P, nc);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = m + r;
          T* pr = P + r * nc;
          int64_t a, z;
          row_cols(lo, hi, i, c0, nc, a, z);
          if (gh) {
            const int64_t base = c0 - i + A.bias_offset;
            for (int64_t j = a; j < z; ++j) pr[j] += gh[base + j];
          }
          const T cm = row_max(pr, a, z);
          const T m_new = std::max(mx[r], cm);
          if (m_new == neg_inf) {  // nothing visible so far
            std::fill(pr, pr + nc, T(0));
            continue;
          }
          const T alpha = mx[r] == neg_inf ? T(0) : exp_approx(mx[r] - m_new);
          T s = 0;
          std::fill(pr, pr + a, T(0));
#pragma omp simd reduction(+ : s)
          for (int64_t j = a; j < z; ++j) {
            pr[j] = exp_approx(pr[j] - m_new);
            s += pr[j];
          }
          std::fill(pr + z, pr + nc, T(0));
          sum[r] = sum[r] * alpha + s;
          mx[r] = m_new;
          if (A.dropout_p > 0) {  // the sum above is of the undropped weights; P V uses the dropped ones
            dropout_row(zbuf.data(), nc, static_cast<uint64_t>(A.seed), b * H + h, i, c0, A.dropout_p);
            for (int64_t j = a; j < z; ++j) pr[j] *= zbuf[j];
          }
          if (alpha != T(1)) {
            T* orow = ot + r * Dv;
            for (int64_t d = 0; d < Dv; ++d) orow[d] *= alpha;
          }
        }
        gemm_rm<T>(false, false, rows, Dv, nc, T(1), P, nc, vh + c0 * Dv, Dv, T(1), ot, Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (sum[r] > T(0)) {
          const T inv = T(1) / sum[r];
          T* orow = ot + r * Dv;
          for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
          lt[r] = mx[r] + std::log(sum[r]);
        } else {
          lt[r] = neg_inf;  // no visible key: output stays 0
        }
      }
    }
  }
}

template <typename T>
void backward(const Args& A) {
  const T* q = static_cast<const T*>(A.q);
  const T* k = static_cast<const T*>(A.k);
  const T* v = static_cast<const T*>(A.v);
  const T* out = static_cast<const T*>(A.out);
  const T* dout = static_cast<const T*>(A.dout);
  const T* lse = static_cast<const T*>(A.lse);
  const T* dlse = static_cast<const T*>(A.dlse);
  const T* bias = static_cast<const T*>(A.bias);
  T* dq = static_cast<T*>(A.dq);
  T* dk = static_cast<T*>(A.dk);
  T* dv = static_cast<T*>(A.dv);
  const int64_t H = A.H, L = A.L, S = A.S, D = A.D, Dv = A.Dv, tile = A.tile, kv_chunk = A.kv_chunk;
  const int64_t group = H / A.Hkv;
  const T scale = static_cast<T>(A.scale);
  const int64_t items = A.B * H;
  // Work units: (batch, head) pairs, each split into `splits` runs of query tiles when there are fewer pairs
  // than threads. Split 0 accumulates into dk/dv; the others into zeroed scratch, summed in at the end.
  // The scratch is capped at twice the key/value gradients (or 64 MiB when that is more).
  const int64_t ntiles = (L + tile - 1) / tile;
  const int64_t per_split = items * S * (D + Dv) * static_cast<int64_t>(sizeof(T));
  const int64_t budget = std::max<int64_t>(int64_t(64) << 20, 2 * per_split);
  const int64_t splits = std::max<int64_t>(
      1, std::min({ntiles, (A.nthreads + items - 1) / items, 1 + budget / std::max<int64_t>(1, per_split)}));
  std::vector<T> scratch(splits > 1 ? items * (splits - 1) * S * (D + Dv) : 0, T(0));
#pragma omp parallel num_threads(static_cast<int>(A.nthreads))
  {
    const bool drop = A.dropout_p > 0;
    std::vector<T> pbuf(tile * kv_chunk), gbuf(tile * kv_chunk), delta(tile), zbuf(drop ? tile * kv_chunk : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < items * splits; ++unit) {
      const int64_t item = unit / splits, split = unit % splits;
      const int64_t b = item / H, h = item % H, hk = h / group;
      const T* qh = q + (b * H + h) * L * D;
      const T* oh = out + (b * H + h) * L * Dv;
      const T* doh = dout + (b * H + h) * L * Dv;
      const T* lh = lse + (b * H + h) * L;
      const T* dlh = dlse ? dlse + (b * H + h) * L : nullptr;
      const T* kh = k + (b * A.Hkv + hk) * S * D;
      const T* vh = v + (b * A.Hkv + hk) * S * Dv;
      const int64_t* lo = A.lo + b * A.lo_batch_stride;
      const int64_t* hi = A.hi + b * A.lo_batch_stride;
      const T* gh = bias ? bias + b * A.bias_b_stride + h * A.bias_h_stride : nullptr;
      T* dqh = dq + (b * H + h) * L * D;
      T* dkh = dk + (b * H + h) * S * D;
      T* dvh = dv + (b * H + h) * S * Dv;
      if (split > 0) {
        dkh = scratch.data() + (item * (splits - 1) + split - 1) * S * (D + Dv);
        dvh = dkh + S * D;
      }
      const int64_t m_begin = (ntiles * split / splits) * tile;
      const int64_t m_end = std::min(L, (ntiles * (split + 1) / splits) * tile);
      for (int64_t m = m_begin; m < m_end; m += tile) {
        const int64_t rows = std::min(tile, L - m);
        int64_t kmin, kmax;
        tile_keys<T>(lo, hi, lh, m, rows, S, kmin, kmax);
        if (kmin >= kmax) continue;  // no visible key in the tile: dq rows stay zero
        for (int64_t r = 0; r < rows; ++r) {  // delta_i = rowsum(dout * out) - dlse_i
          T acc = 0;
          const T* x = doh + (m + r) * Dv;
          const T* y = oh + (m + r) * Dv;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < Dv; ++d) acc += x[d] * y[d];
          delta[r] = acc - (dlh ? dlh[m + r] : T(0));
        }
        for (int64_t c0 = kmin; c0 < kmax; c0 += kv_chunk) {
          const int64_t nc = std::min(kv_chunk, kmax - c0);
          T* P = pbuf.data();
          T* G = gbuf.data();
          // scores: P = scale * q_t k_c^T   (rows x nc)
          gemm_rm<T>(false, true, rows, nc, D, scale, qh + m * D, D, kh + c0 * D, D, T(0), P, nc);
          // probabilities from the logsumexp, zero outside each row's interval
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = m + r;
            T* pr = P + r * nc;
            const T l = lh[i];
            int64_t a, z;
            row_cols(lo, hi, i, c0, nc, a, z);
            if (!std::isfinite(l)) z = a;
            std::fill(pr, pr + a, T(0));
            if (gh) {
              const int64_t base = c0 - i + A.bias_offset;
              for (int64_t j = a; j < z; ++j) pr[j] = exp_approx(pr[j] + gh[base + j] - l);
            } else {
              for (int64_t j = a; j < z; ++j) pr[j] = exp_approx(pr[j] - l);
            }
            std::fill(pr + std::max(a, z), pr + nc, T(0));
          }
          if (drop) {
            // dv_c += (P o Z)^T dout_t, with P o Z built in G for the moment
            for (int64_t r = 0; r < rows; ++r) {
              T* zr = zbuf.data() + r * nc;
              dropout_row(zr, nc, static_cast<uint64_t>(A.seed), b * H + h, m + r, c0, A.dropout_p);
              const T* pr = P + r * nc;
              T* gr = G + r * nc;
              for (int64_t j = 0; j < nc; ++j) gr[j] = pr[j] * zr[j];
            }
            gemm_rm<T>(true, false, nc, Dv, rows, T(1), G, nc, doh + m * Dv, Dv, T(1), dvh + c0 * Dv, Dv);
          } else {
            // dv_c += P^T dout_t   (nc x Dv)
            gemm_rm<T>(true, false, nc, Dv, rows, T(1), P, nc, doh + m * Dv, Dv, T(1), dvh + c0 * Dv, Dv);
          }
          // dP = dout_t v_c^T   (rows x nc), through the dropout mask when there is one
          gemm_rm<T>(false, true, rows, nc, Dv, T(1), doh + m * Dv, Dv, vh + c0 * Dv, Dv, T(0), G, nc);
          // dS = P * (dP - delta)
          for (int64_t r = 0; r < rows; ++r) {
            T* gr = G + r * nc;
            const T* pr = P + r * nc;
            const T dl = delta[r];
            if (drop) {
              const T* zr = zbuf.data() + r * nc;
              for (int64_t j = 0; j < nc; ++j) gr[j] = pr[j] * (gr[j] * zr[j] - dl);
            } else {
              for (int64_t j = 0; j < nc; ++j) gr[j] = pr[j] * (gr[j] - dl);
            }
          }
          // dq_t += scale * dS k_c ; dk_c += scale * dS^T q_t
          gemm_rm<T>(false, false, rows, D, nc, scale, G, nc, kh + c0 * D, D, T(1), dqh + m * D, D);
          gemm_rm<T>(true, false, nc, D, rows, scale, G, nc, qh + m * D, D, T(1), dkh + c0 * D, D);
        }
      }
    }
    if (splits > 1) {  // sum the scratch gradients into dk / dv, rows split over the threads
#pragma omp for schedule(static)
      for (int64_t row = 0; row < items * S; ++row) {
        const int64_t item = row / S, j = row % S;
        T* dkr = dk + row * D;
        T* dvr = dv + row * Dv;
        for (int64_t s2 = 0; s2 < splits - 1; ++s2) {
          const T* base = scratch.data() + (item * (splits - 1) + s2) * S * (D + Dv);
          for (int64_t d = 0; d < D; ++d) dkr[d] += base[j * D + d];
          for (int64_t d = 0; d < Dv; ++d) dvr[d] += base[S * D + j * Dv + d];
        }
      }
    }
  }
}

}  // namespace

extern "C" {

int salience_interval_abi() { return 4; }
int64_t salience_interval_args_size() { return static_cast<int64_t>(sizeof(SalienceIntervalArgs)); }

void salience_interval_forward_f32(const SalienceIntervalArgs* a) { forward<float>(*a); }
void salience_interval_forward_f64(const SalienceIntervalArgs* a) { forward<double>(*a); }
void salience_interval_backward_f32(const SalienceIntervalArgs* a) { backward<float>(*a); }
void salience_interval_backward_f64(const SalienceIntervalArgs* a) { backward<double>(*a); }

// The dropout multipliers of a (rows x nc) block at (bh, row i0, key c0), as the kernels draw them: for tests.
void salience_interval_dropout_f64(double* z, int64_t rows, int64_t nc, int64_t seed, int64_t bh, int64_t i0,
                                   int64_t c0, double p) {
  for (int64_t r = 0; r < rows; ++r) dropout_row(z + r * nc, nc, static_cast<uint64_t>(seed), bh, i0 + r, c0, p);
}

}  // extern "C"
