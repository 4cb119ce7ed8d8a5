#pragma once
// Device-neutral elementwise helpers on TensorViews of any strides (rank <= kMaxDims, strides
// in elements, non-negative). Float dtypes fp32, fp64, bf16, fp16: bf16/fp16 values are
// converted through fp32, fp64 values stay in double (an fp64 -> bf16/fp16 store rounds to
// fp32 first, on every device alike).
//
// Work on CUDA tensors is enqueued on `stream` (asynchronous to the host, ordered with the
// other ops on that stream); work on CPU tensors runs now (OpenMP over rows when large).
// dst and src may be the same view (in place); other partial overlaps are not allowed.
#include "distattn/core/device.h"
#include "distattn/core/tensor_view.h"

namespace distattn::ops {

// dst <- src. Same shape; dtypes may differ (converted). Same device, or one CPU and one CUDA
// tensor (then staged through a packed host copy: the slow path, synchronous to the host).
void tensor_copy(const TensorView& dst, const TensorView& src, Stream stream = nullptr);

// dst += src. dst fp32 or fp64; src any float dtype; same shape; same device. fp32 + fp32 adds
// in fp32; a pair with an fp64 side adds in fp64 (the sum of two fp32 values rounded once).
void tensor_add(const TensorView& dst, const TensorView& src, Stream stream = nullptr);

// t <- 0 for any dtype and any strides (all-zero bits). Packed tensors (and CUDA tensors whose
// rows are contiguous) use a memset: cudaMemsetAsync / cudaMemset2DAsync on `stream`.
void tensor_zero(const TensorView& t, Stream stream = nullptr);

// t <- value for a float tensor of any strides (value rounded to t's dtype as a store from
// double would be: fp64 exact, others through fp32). E.g. an LSE initialised to -inf.
void tensor_fill(const TensorView& t, double value, Stream stream = nullptr);

}  // namespace distattn::ops
