#pragma once
// CPU bodies of distattn/ops/dense.h. Arguments arrive validated by src/ops/dense.cpp (fp32,
// CPU, last dims contiguous, consistent shapes); raw pointers and row strides in elements.
#include <cstdint>

namespace distattn::kernels::cpu {

// c[m, n] (+)= a[m, k] b[k, n], or a[m, k] b[n, k]^T when transpose_b. A few rows (m <= 32,
// decode batches): a register-blocked kernel that streams b once (dense_small_m.h; AVX-512
// when the CPU has it). Else OpenBLAS cblas_sgemm when the build found it (its own threads:
// OPENBLAS_NUM_THREADS / OMP_NUM_THREADS), else a cache-blocked OpenMP loop.
void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc, bool accumulate, bool transpose_b);
bool sgemm_uses_blas();
// "OpenBLAS <core>" (the kernels OpenBLAS picked for this CPU) or "portable".
const char* sgemm_backend();

void rms_norm(const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy, int64_t m,
              int64_t n, float eps);
// x rows of `heads` heads of `dim` values; row i's heads start at x + i * ldx, head h at
// + h * ldh.
void rope(float* x, int64_t m, int64_t ldx, int64_t heads, int64_t ldh, int64_t dim,
          const int64_t* positions, double theta);
void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out, int64_t ldo,
              int64_t m, int64_t n);
void argmax_rows(const float* x, int64_t ldx, int64_t m, int64_t n, int32_t* out);

}  // namespace distattn::kernels::cpu
