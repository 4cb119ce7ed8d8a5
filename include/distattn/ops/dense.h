#pragma once
// Device-neutral dense operations of a transformer block: fp32 matrix products, RMSNorm,
// rotary embedding, SiLU gating, embedding lookup and greedy argmax. The serving layer's
// synthetic model (distattn/serving/model.h) and the MLA layer are written against these;
// each call validates its tensors, then dispatches on their device to kernels/cpu (OpenBLAS
// sgemm when the build found it) or kernels/cuda (cuBLAS).
//
// Matrices are row-major, fp32, contiguous in their last dim; row strides are free, so a
// column block of a wider matrix (e.g. the K part of a fused QKV output) can be passed as is.
// Work on CUDA tensors is enqueued on `stream`; host inputs and outputs (ids, positions,
// argmax results) are copied synchronously.
#include <cstdint>
#include <span>

#include "distattn/core/device.h"
#include "distattn/core/tensor_view.h"

namespace distattn::ops {

struct MatmulOptions {
  bool accumulate = false;   // c += a b instead of c = a b
  bool transpose_b = false;  // b is [N, K]; its transpose is used
  Stream stream = nullptr;
};

// c [M, N] (+)= a [M, K] . b [K, N] (b [N, K] with transpose_b). All fp32, one device.
// c must not overlap a or b.
void matmul(const TensorView& a, const TensorView& b, const TensorView& c,
            const MatmulOptions& opts = {});

// y[i, :] = x[i, :] / sqrt(mean_j x[i, j]^2 + eps) * weight (the sum of squares in fp64 on the
// CPU, fp32 on CUDA). x, y fp32 [M, N] (y may be x); weight fp32 [N], or a view without data
// (TensorView{}) for 1.
void rms_norm(const TensorView& x, const TensorView& weight, const TensorView& y, float eps,
              Stream stream = nullptr);

// Half-split rotary embedding, in place: x fp32 [M, H, D] (D even), row i at position
// positions[i] (host, M values): for j < D/2 the pair (x[j], x[j + D/2]) of every head is
// rotated by the angle positions[i] * theta^(-2j/D) (angles, cos and sin in fp64).
void rope(const TensorView& x, std::span<const int64_t> positions, double theta,
          Stream stream = nullptr);

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up. fp32 [M, N] each; out may be gate or up.
void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out,
              Stream stream = nullptr);

// out[i, :] = table[ids[i], :]. table fp32 [V, N]; ids on the host (M values in [0, V));
// out fp32 [M, N].
void embedding(const TensorView& table, std::span<const int32_t> ids, const TensorView& out,
               Stream stream = nullptr);

// out[i] = the first index of the largest value of row i of x (fp32 [M, N], N >= 1); NaN
// never wins (a row of NaN gives 0). out: M values on the host.
void argmax_rows(const TensorView& x, std::span<int32_t> out, Stream stream = nullptr);

// True when matmul on CPU tensors runs on OpenBLAS (else on a portable blocked loop).
bool matmul_uses_blas();
// What CPU matmul runs on: "OpenBLAS <core kernels>" or "portable". Debian's OpenBLAS 0.3.21
// does not recognise some newer Xeons and reports "Prescott" (SSE3): set
// OPENBLAS_CORETYPE=SkylakeX there (launch/mpirun.sh does on AVX-512 CPUs).
const char* matmul_backend();

}  // namespace distattn::ops
