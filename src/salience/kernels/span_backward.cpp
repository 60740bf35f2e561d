// Backward of exact attention for masks with one visible key interval [lo_i, hi_i) per query row.
//
// Part of salience (see kernels/native.py, which compiles this file on first use and calls it through
// ctypes). FlashAttention-2 style: the probabilities are recomputed from q, k and the saved logsumexp,
// tile by tile. Unlike torch's CPU flash backward, each tile of query rows visits only the keys that some
// row of the tile can see (the union of its rows' intervals), and the key and value gradients are
// accumulated in place, so a sliding window or a set of packed documents costs work in proportion to the
// visible keys and needs no per-window gradient buffers.
//
// Layout: contiguous (B, H, L, D) for q, out, dout and dq; (B, Hkv, S, D) for k and v; the key and value
// gradients are written per *query* head, (B, H, S, D), and summed over a head group by the caller.
// An optional additive bias that depends only on the head and j - i (ALiBi, T5 buckets) comes as one
// vector per (batch, head): row (b * H + h) of `bias`, entry j - i + bias_offset, added to the scaled score.
// GEMMs are the BLAS sgemm_/dgemm_ that libtorch_cpu exports (MKL in the x86 wheels).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

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
void gemm_rm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb,
             T beta, T* C, int ldc) {
  blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// exp(x) for x <= ~0 (scores minus their row's logsumexp), written so that the compiler vectorises it:
// range reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for exp(r), then 2^n from the
// exponent bits. Relative error about 2 ulp; 0 below -87 (where float exp underflows anyway).
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;  // ln2 split in two so that n * hi is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline double exp_approx(double x) { return std::exp(x); }

template <typename T>
void span_backward(const T* q, const T* k, const T* v, const T* out, const T* dout, const T* lse, const T* dlse,
                   const int64_t* lo, const int64_t* hi, int64_t lo_batch_stride, const T* bias,
                   int64_t bias_row_stride, int64_t bias_offset, T* dq, T* dk, T* dv, int64_t B,
                   int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv, double scale_d,
                   int64_t tile, int64_t kv_chunk, int nthreads) {
  const T scale = static_cast<T>(scale_d);
  const int64_t group = H / Hkv;
  const int64_t items = B * H;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> pbuf(tile * kv_chunk), gbuf(tile * kv_chunk), delta(tile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / H, h = item % H, hk = h / group;
      const T* qh = q + (b * H + h) * L * D;
      const T* oh = out + (b * H + h) * L * Dv;
      const T* doh = dout + (b * H + h) * L * Dv;
      const T* lh = lse + (b * H + h) * L;
      const T* dlh = dlse ? dlse + (b * H + h) * L : nullptr;
      const T* kh = k + (b * Hkv + hk) * S * D;
      const T* vh = v + (b * Hkv + hk) * S * Dv;
      const int64_t* lob = lo + b * lo_batch_stride;
      const int64_t* hib = hi + b * lo_batch_stride;
      const T* gh = bias ? bias + (b * H + h) * bias_row_stride : nullptr;
      T* dqh = dq + (b * H + h) * L * D;
      T* dkh = dk + (b * H + h) * S * D;
      T* dvh = dv + (b * H + h) * S * Dv;
      for (int64_t m = 0; m < L; m += tile) {
        const int64_t rows = std::min(tile, L - m);
        int64_t kmin = S, kmax = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = m + r;
          if (hib[i] > lob[i] && std::isfinite(lh[i])) {
            kmin = std::min(kmin, lob[i]);
            kmax = std::max(kmax, hib[i]);
          }
        }
        if (kmin >= kmax) continue;  // no visible key in the tile: dq rows stay zero
        for (int64_t r = 0; r < rows; ++r) {  // delta_i = rowsum(dout * out) - dlse_i
          T acc = 0;
          const T* a = doh + (m + r) * Dv;
          const T* c = oh + (m + r) * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc += a[d] * c[d];
          delta[r] = acc - (dlh ? dlh[m + r] : T(0));
        }
        const int R = static_cast<int>(rows);
        for (int64_t c0 = kmin; c0 < kmax; c0 += kv_chunk) {
          const int64_t nc = std::min(kv_chunk, kmax - c0);
          const int NC = static_cast<int>(nc);
          T* P = pbuf.data();
          T* G = gbuf.data();
          // scores: P = scale * q_t k_c^T   (rows x nc)
          gemm_rm<T>(false, true, R, NC, static_cast<int>(D), scale, qh + m * D, static_cast<int>(D), kh + c0 * D,
                     static_cast<int>(D), T(0), P, NC);
          // probabilities from the logsumexp, zero outside each row's interval
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = m + r;
            T* pr = P + r * nc;
            const T l = lh[i];
            const int64_t a = std::clamp(lob[i] - c0, int64_t(0), nc);
            const int64_t z = std::clamp(hib[i] - c0, int64_t(0), nc);
            if (!(hib[i] > lob[i]) || !std::isfinite(l) || z <= a) {
              std::fill(pr, pr + nc, T(0));
              continue;
            }
            std::fill(pr, pr + a, T(0));
            if (gh) {
              const int64_t base = c0 - i + bias_offset;  // gh[base + j]: the bias of key c0 + j for row i
              for (int64_t j = a; j < z; ++j) pr[j] = exp_approx(pr[j] + gh[base + j] - l);
            } else {
              for (int64_t j = a; j < z; ++j) pr[j] = exp_approx(pr[j] - l);
            }
            std::fill(pr + z, pr + nc, T(0));
          }
          // dv_c += P^T dout_t   (nc x Dv)
          gemm_rm<T>(true, false, NC, static_cast<int>(Dv), R, T(1), P, NC, doh + m * Dv, static_cast<int>(Dv), T(1),
                     dvh + c0 * Dv, static_cast<int>(Dv));
          // dP = dout_t v_c^T   (rows x nc)
          gemm_rm<T>(false, true, R, NC, static_cast<int>(Dv), T(1), doh + m * Dv, static_cast<int>(Dv), vh + c0 * Dv,
                     static_cast<int>(Dv), T(0), G, NC);
          // dS = P * (dP - delta)
          for (int64_t r = 0; r < rows; ++r) {
            T* gr = G + r * nc;
            const T* pr = P + r * nc;
            const T dl = delta[r];
            for (int64_t j = 0; j < nc; ++j) gr[j] = pr[j] * (gr[j] - dl);
          }
          // dq_t += scale * dS k_c ; dk_c += scale * dS^T q_t
          gemm_rm<T>(false, false, R, static_cast<int>(D), NC, scale, G, NC, kh + c0 * D, static_cast<int>(D), T(1),
                     dqh + m * D, static_cast<int>(D));
          gemm_rm<T>(true, false, NC, static_cast<int>(D), R, scale, G, NC, qh + m * D, static_cast<int>(D), T(1),
                     dkh + c0 * D, static_cast<int>(D));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

int salience_span_backward_abi() { return 2; }

void salience_span_backward_f32(const float* q, const float* k, const float* v, const float* out, const float* dout,
                                const float* lse, const float* dlse, const int64_t* lo, const int64_t* hi,
                                int64_t lo_batch_stride, const float* bias, int64_t bias_row_stride,
                                int64_t bias_offset, float* dq, float* dk, float* dv, int64_t B, int64_t H,
                                int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv, double scale, int64_t tile,
                                int64_t kv_chunk, int nthreads) {
  span_backward<float>(q, k, v, out, dout, lse, dlse, lo, hi, lo_batch_stride, bias, bias_row_stride, bias_offset,
                       dq, dk, dv, B, H, Hkv, L, S, D, Dv, scale, tile, kv_chunk, nthreads);
}

void salience_span_backward_f64(const double* q, const double* k, const double* v, const double* out,
                                const double* dout, const double* lse, const double* dlse, const int64_t* lo,
                                const int64_t* hi, int64_t lo_batch_stride, const double* bias,
                                int64_t bias_row_stride, int64_t bias_offset, double* dq, double* dk, double* dv,
                                int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv,
                                double scale, int64_t tile, int64_t kv_chunk, int nthreads) {
  span_backward<double>(q, k, v, out, dout, lse, dlse, lo, hi, lo_batch_stride, bias, bias_row_stride,
                        bias_offset, dq, dk, dv, B, H, Hkv, L, S, D, Dv, scale, tile, kv_chunk, nthreads);
}

}  // extern "C"
