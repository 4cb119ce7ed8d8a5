// Validation and device dispatch of distattn/ops/dense.h.
#include "distattn/ops/dense.h"

#include "distattn/config.h"
#include "kernels/cpu/dense_cpu.h"
#if DISTATTN_WITH_CUDA
#include "kernels/cuda/dense_cuda.h"
#endif

namespace distattn::ops {

namespace {

// A row-major fp32 matrix view: 2 dims, contiguous last dim, non-negative row stride.
void check_matrix(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK(t.ndim == 2, op, ": ", name, " must be a 2-d matrix; got ", t.str());
  DISTATTN_CHECK_STATUS(t.dtype == DType::kFloat32, Status::kUnsupported, op, ": ", name,
                        " must be fp32; got ", t.str());
  DISTATTN_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " ", t.str(),
                 " must be contiguous in its last dim");
  DISTATTN_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name, " ", t.str(),
                 " has a row stride (", t.stride(0),
                 ") below its row length; rows may not overlap");
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, op, ": ", name, " has no data");
  DISTATTN_CHECK_STATUS(t.device.is_cpu() || (DISTATTN_WITH_CUDA && t.device.is_cuda()),
                        Status::kUnsupported, op, ": ", name, " is on ", t.device.str(),
                        " but this build has no CUDA kernels: pass CPU tensors or build with "
                        "-DDISTATTN_CUDA=ON");
}

void check_same_device(const char* op, const TensorView& a, const char* an, const TensorView& b,
                       const char* bn) {
  DISTATTN_CHECK(a.device == b.device, op, ": ", an, " is on ", a.device.str(), " but ", bn,
                 " is on ", b.device.str(), "; pass tensors of one device");
}

int64_t ld(const TensorView& t) {
  return t.size(0) <= 1 ? t.size(1) : t.stride(0);
}

// [M, H, D] with contiguous D: a [M, H*D] matrix when heads are packed, else strided heads.
void check_heads(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK(t.ndim == 3, op, ": ", name, " must be [rows, heads, dim]; got ", t.str());
  DISTATTN_CHECK_STATUS(t.dtype == DType::kFloat32, Status::kUnsupported, op, ": ", name,
                        " must be fp32; got ", t.str());
  DISTATTN_CHECK(t.size(2) <= 1 || t.stride(2) == 1, op, ": ", name, " ", t.str(),
                 " must be contiguous in its last dim");
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, op, ": ", name, " has no data");
  DISTATTN_CHECK_STATUS(t.device.is_cpu() || (DISTATTN_WITH_CUDA && t.device.is_cuda()),
                        Status::kUnsupported, op, ": ", name, " is on ", t.device.str(),
                        " but this build has no CUDA kernels");
}

}  // namespace

bool matmul_uses_blas() {
  return kernels::cpu::sgemm_uses_blas();
}

const char* matmul_backend() {
  return kernels::cpu::sgemm_backend();
}

void matmul(const TensorView& a, const TensorView& b, const TensorView& c,
            const MatmulOptions& opts) {
  constexpr const char* op = "ops::matmul";
  check_matrix(op, "a", a);
  check_matrix(op, "b", b);
  check_matrix(op, "c", c);
  check_same_device(op, a, "a", b, "b");
  check_same_device(op, a, "a", c, "c");
  const int64_t m = a.size(0), k = a.size(1);
  const int64_t n = opts.transpose_b ? b.size(0) : b.size(1);
  const int64_t kb = opts.transpose_b ? b.size(1) : b.size(0);
  DISTATTN_CHECK(kb == k, op, ": a is ", a.shape_str(), " and b is ", b.shape_str(),
                 opts.transpose_b ? " (transposed)" : "", "; their inner dims (", k, ", ", kb,
                 ") must agree");
  DISTATTN_CHECK(c.size(0) == m && c.size(1) == n, op, ": c is ", c.shape_str(), " but a ",
                 a.shape_str(), " times b", opts.transpose_b ? "^T " : " ", b.shape_str(), " is [",
                 m, ", ", n, "]");
  if (m == 0 || n == 0) return;
  if (c.device.is_cpu()) {
    kernels::cpu::sgemm(m, n, k, a.data_as<float>(), ld(a), b.data_as<float>(), ld(b),
                        c.data_as<float>(), ld(c), opts.accumulate, opts.transpose_b);
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::sgemm(c.device.index, m, n, k, a.data_as<float>(), ld(a), b.data_as<float>(),
                       ld(b), c.data_as<float>(), ld(c), opts.accumulate, opts.transpose_b,
                       opts.stream);
#endif
}

void rms_norm(const TensorView& x, const TensorView& weight, const TensorView& y, float eps,
              Stream stream) {
  constexpr const char* op = "ops::rms_norm";
  check_matrix(op, "x", x);
  check_matrix(op, "y", y);
  check_same_device(op, x, "x", y, "y");
  DISTATTN_CHECK(x.size(0) == y.size(0) && x.size(1) == y.size(1), op, ": x is ", x.shape_str(),
                 " but y is ", y.shape_str(), "; they must have one shape");
  DISTATTN_CHECK(eps >= 0.0f, op, ": eps must be >= 0; got ", eps);
  const float* w = nullptr;
  if (weight.data != nullptr) {
    DISTATTN_CHECK(weight.ndim == 1 && weight.size(0) == x.size(1) &&
                       weight.dtype == DType::kFloat32 && weight.stride(0) == 1,
                   op, ": weight must be a packed fp32 [", x.size(1), "] vector; got ",
                   weight.str());
    check_same_device(op, x, "x", weight, "weight");
    w = weight.data_as<float>();
  }
  if (x.numel() == 0) return;
  if (x.device.is_cpu()) {
    kernels::cpu::rms_norm(x.data_as<float>(), ld(x), w, y.data_as<float>(), ld(y), x.size(0),
                           x.size(1), eps);
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::rms_norm(x.device.index, x.data_as<float>(), ld(x), w, y.data_as<float>(), ld(y),
                          x.size(0), x.size(1), eps, stream);
#endif
}

void rope(const TensorView& x, std::span<const int64_t> positions, double theta, Stream stream) {
  constexpr const char* op = "ops::rope";
  check_heads(op, "x", x);
  DISTATTN_CHECK(x.size(2) % 2 == 0, op, ": the rotary dim must be even; got ", x.size(2));
  DISTATTN_CHECK(static_cast<int64_t>(positions.size()) == x.size(0), op, ": ", positions.size(),
                 " positions for ", x.size(0), " rows of ", x.str(), "; pass one per row");
  DISTATTN_CHECK(theta > 0, op, ": theta must be > 0; got ", theta);
  for (size_t i = 0; i < positions.size(); ++i)
    DISTATTN_CHECK(positions[i] >= 0, op, ": position ", i, " is negative (", positions[i], ")");
  if (x.numel() == 0) return;
  const int64_t ldx = x.size(0) <= 1 ? x.size(1) * x.size(2) : x.stride(0);
  const int64_t ldh = x.size(1) <= 1 ? x.size(2) : x.stride(1);
  if (x.device.is_cpu()) {
    kernels::cpu::rope(x.data_as<float>(), x.size(0), ldx, x.size(1), ldh, x.size(2),
                       positions.data(), theta);
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::rope(x.device.index, x.data_as<float>(), x.size(0), ldx, x.size(1), ldh, x.size(2),
                      positions.data(), theta, stream);
#endif
}

void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, Stream stream) {
  constexpr const char* op = "ops::silu_mul";
  check_matrix(op, "gate", gate);
  check_matrix(op, "up", up);
  check_matrix(op, "out", out);
  check_same_device(op, gate, "gate", up, "up");
  check_same_device(op, gate, "gate", out, "out");
  DISTATTN_CHECK(gate.size(0) == up.size(0) && gate.size(1) == up.size(1) &&
                     out.size(0) == gate.size(0) && out.size(1) == gate.size(1),
                 op, ": gate ", gate.shape_str(), ", up ", up.shape_str(), " and out ",
                 out.shape_str(), " must have one shape");
  if (out.numel() == 0) return;
  if (out.device.is_cpu()) {
    kernels::cpu::silu_mul(gate.data_as<float>(), ld(gate), up.data_as<float>(), ld(up),
                           out.data_as<float>(), ld(out), out.size(0), out.size(1));
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::silu_mul(out.device.index, gate.data_as<float>(), ld(gate), up.data_as<float>(),
                          ld(up), out.data_as<float>(), ld(out), out.size(0), out.size(1), stream);
#endif
}

void embedding(const TensorView& table, std::span<const int32_t> ids, const TensorView& out,
               Stream stream) {
  constexpr const char* op = "ops::embedding";
  check_matrix(op, "table", table);
  check_matrix(op, "out", out);
  check_same_device(op, table, "table", out, "out");
  DISTATTN_CHECK(out.size(0) == static_cast<int64_t>(ids.size()) && out.size(1) == table.size(1),
                 op, ": out is ", out.shape_str(), " but ", ids.size(), " ids of a table ",
                 table.shape_str(), " need [", ids.size(), ", ", table.size(1), "]");
  for (size_t i = 0; i < ids.size(); ++i)
    DISTATTN_CHECK(ids[i] >= 0 && ids[i] < table.size(0), op, ": id ", i, " is ", ids[i],
                   " but the table has ", table.size(0), " rows");
  if (out.numel() == 0) return;
  const int64_t n = table.size(1);
  if (out.device.is_cpu()) {
    for (size_t i = 0; i < ids.size(); ++i) {
      const float* src = table.data_as<float>() + ids[i] * ld(table);
      float* dst = out.data_as<float>() + static_cast<int64_t>(i) * ld(out);
      std::copy(src, src + n, dst);
    }
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::embedding(out.device.index, table.data_as<float>(), ld(table), ids.data(),
                           out.size(0), n, out.data_as<float>(), ld(out), stream);
#endif
}

void argmax_rows(const TensorView& x, std::span<int32_t> out, Stream stream) {
  constexpr const char* op = "ops::argmax_rows";
  check_matrix(op, "x", x);
  DISTATTN_CHECK(x.size(1) >= 1, op, ": x ", x.str(), " has no columns");
  DISTATTN_CHECK(static_cast<int64_t>(out.size()) == x.size(0), op, ": room for ", out.size(),
                 " results but x has ", x.size(0), " rows");
  if (x.size(0) == 0) return;
  if (x.device.is_cpu()) {
    kernels::cpu::argmax_rows(x.data_as<float>(), ld(x), x.size(0), x.size(1), out.data());
    return;
  }
#if DISTATTN_WITH_CUDA
  kernels::cuda::argmax_rows(x.device.index, x.data_as<float>(), ld(x), x.size(0), x.size(1),
                             out.data(), stream);
#endif
}

}  // namespace distattn::ops
