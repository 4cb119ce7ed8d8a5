#pragma once
// CUDA bodies of distattn/ops/elementwise.h. Arguments arrive validated by the dispatch layer
// (src/ops/elementwise.cpp): equal shapes, float dtypes (zero: any dtype), non-negative
// strides, numel > 0, CUDA tensors on one device. Work is enqueued on `stream` and never
// synchronizes the host, except copy_from_host / copy_to_host (mixed-device copies).
#include "distattn/core/device.h"
#include "distattn/core/tensor_view.h"

namespace distattn::kernels::cuda {

// dst <- src (dtypes may differ). cudaMemcpyAsync when both are packed in one dtype,
// cudaMemcpy2DAsync when both are rows of contiguous elements, else a strided kernel.
void tensor_copy(const TensorView& dst, const TensorView& src, Stream stream);
// dst += src; dst fp32 or fp64, src any float dtype.
void tensor_add(const TensorView& dst, const TensorView& src, Stream stream);
// t <- 0 (all-zero bits): cudaMemsetAsync / cudaMemset2DAsync, else a strided kernel.
void tensor_zero(const TensorView& t, Stream stream);
// Every element of t <- the low element-size bytes of `bits` (the dispatch layer turns a
// fill value into t's dtype once, for both devices, so CPU and CUDA fills agree bit for bit).
void tensor_fill_bits(const TensorView& t, uint64_t bits, Stream stream);

// Mixed-device copies (synchronous: the stream is synchronized before returning).
// dst (CUDA, any strides/dtype) <- host (CPU, packed, same shape, any float dtype).
void copy_from_host(const TensorView& dst, const TensorView& host, Stream stream);
// host (CPU, packed, src's dtype and shape) <- src (CUDA, any strides).
void copy_to_host(const TensorView& host, const TensorView& src, Stream stream);

}  // namespace distattn::kernels::cuda
