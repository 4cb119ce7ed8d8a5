#pragma once
// Small dense helpers shared by the MLA files (fp32 GEMMs, RMSNorm, RoPE, deterministic
// values). Internal: not installed.
#include <cstdint>

namespace distattn::parallel::mla_detail {

// c[m,n] (+)= a[m,k] b[k,n]; row strides lda/ldb/ldc (elements).
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate = false);
// c[m,n] (+)= a[m,k] b[n,k]^T.
void gemm_bt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate = false);
// x[i] /= sqrt(mean(x^2) + eps) for each of n rows of width d (row stride ld).
void rms_normalize_rows(float* x, int64_t n, int64_t d, int64_t ld, float eps);
// Half-split rotary embedding of v[d] at position pos (d even).
void rope_inplace(float* v, int64_t d, int64_t pos, double theta);
void rope_inplace(double* v, int64_t d, int64_t pos, double theta);

}  // namespace distattn::parallel::mla_detail
