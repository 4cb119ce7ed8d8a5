#pragma once
// CUDA bodies of distattn/ops/dense.h. Arguments arrive validated by src/ops/dense.cpp (fp32
// CUDA tensors on one device, last dims contiguous, consistent shapes); raw device pointers,
// row strides in elements. Work is enqueued on `stream`; host inputs (ids, positions) are
// uploaded on it and argmax_rows synchronizes it to return its host result.
#include <cstdint>

#include "distattn/core/device.h"

namespace distattn::kernels::cuda {

// cuBLAS sgemm (fp32 math, no TF32), one handle per device and host thread.
void sgemm(int device, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc, bool accumulate, bool transpose_b, Stream stream);
void rms_norm(int device, const float* x, int64_t ldx, const float* weight, float* y, int64_t ldy,
              int64_t m, int64_t n, float eps, Stream stream);
void rope(int device, float* x, int64_t m, int64_t ldx, int64_t heads, int64_t ldh, int64_t dim,
          const int64_t* host_positions, double theta, Stream stream);
void silu_mul(int device, const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out,
              int64_t ldo, int64_t m, int64_t n, Stream stream);
void embedding(int device, const float* table, int64_t ldt, const int32_t* host_ids, int64_t m,
               int64_t n, float* out, int64_t ldo, Stream stream);
void argmax_rows(int device, const float* x, int64_t ldx, int64_t m, int64_t n, int32_t* host_out,
                 Stream stream);

}  // namespace distattn::kernels::cuda
