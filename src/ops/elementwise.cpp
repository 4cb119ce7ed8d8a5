// Validation, device dispatch and the CPU bodies of distattn/ops/elementwise.h.
//
// CPU: the shapes are first coalesced (size-1 dims dropped, dims merged where both tensors
// are contiguous across them), so a packed copy is one memcpy and a BSHD slice is a few long
// rows. Rows are then split over OpenMP threads when the tensor is large. Each row is a
// memcpy (same dtype, unit strides), a strided element move (same dtype), or a typed
// conversion loop (dtypes differ); add has a unit-stride fp32 loop the compiler vectorises.
#include "distattn/ops/elementwise.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "distattn/config.h"
#include "distattn/core/half.h"
#include "src/ops/elementwise_layout.h"
#if DISTATTN_WITH_CUDA
#include "kernels/cuda/elementwise_cuda.h"
#endif

namespace distattn::ops {

namespace {

// ---- validation -------------------------------------------------------------------------

bool is_float(DType t) {
  return dtype_is_floating(t);
}

void check_view(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK(t.ndim >= 0 && t.ndim <= kMaxDims, op, ": ", name, " has ", t.ndim,
                 " dims; at most ", kMaxDims, " are supported");
  for (int d = 0; d < t.ndim; ++d) {
    DISTATTN_CHECK(t.shape[d] >= 0, op, ": ", name, " has a negative size in dim ", d, " (",
                   t.shape_str(), ")");
    DISTATTN_CHECK(t.shape[d] <= 1 || t.strides[d] >= 0, op, ": ", name,
                   " has a negative stride in dim ", d, " (", t.strides[d],
                   "); pass a view with non-negative strides");
  }
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, op, ": ", name, " has a null data pointer (",
                 t.str(), ")");
}

void check_float(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK_STATUS(is_float(t.dtype), Status::kUnsupported, op, ": ", name, " is ",
                        dtype_name(t.dtype), "; supported dtypes are fp32, fp64, bf16 and fp16 (",
                        t.str(), ")");
}

void check_same_shape(const char* op, const TensorView& dst, const TensorView& src) {
  bool ok = dst.ndim == src.ndim;
  for (int d = 0; ok && d < dst.ndim; ++d) ok = dst.shape[d] == src.shape[d];
  DISTATTN_CHECK(ok, op, ": dst has shape ", dst.shape_str(), " but src has shape ",
                 src.shape_str(), "; pass views of the same shape");
}

void check_device_supported(const char* op, const char* name, const TensorView& t) {
  DISTATTN_CHECK_STATUS(t.device.is_cpu() || (DISTATTN_WITH_CUDA && t.device.is_cuda()),
                        Status::kUnsupported, op, ": ", name, " is on ", t.device.str(),
                        " but this build has no CUDA kernels: pass CPU tensors or build with "
                        "-DDISTATTN_CUDA=ON");
}

// ---- coalesced layout (CPU) ------------------------------------------------------------

// The coalesced dims (src/ops/elementwise_layout.h; nd = 0 for a single element), walked as
// rows: row = the last coalesced dim.
struct Layout : CoalescedDims {
  int64_t row() const { return nd ? shape[nd - 1] : 1; }
  int64_t row_sa() const { return nd ? sa[nd - 1] : 1; }
  int64_t row_sb() const { return nd ? sb[nd - 1] : 1; }
  int64_t rows() const {
    int64_t r = 1;
    for (int d = 0; d + 1 < nd; ++d) r *= shape[d];
    return r;
  }
};

Layout coalesce(const TensorView& a, const TensorView& b) {
  return {coalesce_dims(a, b)};
}

// Elements below which the CPU loops stay on one thread: a parallel region costs a few
// microseconds, and smaller copies take tens of microseconds on one core.
constexpr int64_t kParallelMinElements = int64_t{1} << 17;

// Calls body(offset_a, offset_b, count) over pieces of rows: offsets in elements of the
// first element of the piece, count elements along the row dim (strides row_sa/row_sb).
template <typename Body>
void for_each_piece(const Layout& l, Body&& body) {
  const int64_t n = l.row(), rows = l.rows();
  const int64_t total = n * rows;
  // Offsets of row r, unravelled over the leading dims.
  auto row_offsets = [&](int64_t r, int64_t& oa, int64_t& ob) {
    oa = 0;
    ob = 0;
    for (int d = l.nd - 2; d >= 0; --d) {
      const int64_t i = r % l.shape[d];
      r /= l.shape[d];
      oa += i * l.sa[d];
      ob += i * l.sb[d];
    }
  };
  // Rows [r0, r1), offsets advanced like an odometer (no division per row).
  auto run_rows = [&](int64_t r0, int64_t r1) {
    if (r0 >= r1) return;
    std::array<int64_t, kMaxDims> idx{};
    int64_t rem = r0;
    for (int d = l.nd - 2; d >= 0; --d) {
      idx[d] = rem % l.shape[d];
      rem /= l.shape[d];
    }
    int64_t oa = 0, ob = 0;
    row_offsets(r0, oa, ob);
    for (int64_t r = r0; r < r1; ++r) {
      body(oa, ob, n);
      for (int d = l.nd - 2; d >= 0; --d) {
        if (++idx[d] < l.shape[d]) {
          oa += l.sa[d];
          ob += l.sb[d];
          break;
        }
        oa -= (l.shape[d] - 1) * l.sa[d];
        ob -= (l.shape[d] - 1) * l.sb[d];
        idx[d] = 0;
      }
    }
  };
  const int threads =
      total >= kParallelMinElements && !omp_in_parallel() ? std::max(1, omp_get_max_threads()) : 1;
  if (threads == 1) return run_rows(0, rows);
  // Dynamic scheduling over 8 blocks per thread: on a busy machine a thread that is not
  // scheduled promptly does not hold the others up (a static split ran 2-3x slower than one
  // thread on 2 loaded cores).
  const int64_t blocks = 8 * static_cast<int64_t>(threads);
  if (rows >= blocks) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) run_rows(rows * b / blocks, rows * (b + 1) / blocks);
    return;
  }
  // Few long rows: split each row into chunks too.
  const int64_t per_row = (blocks + rows - 1) / rows;
  const int64_t chunk = std::max<int64_t>(4096, (n + per_row - 1) / per_row);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t items = rows * chunks;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = it / chunks, c0 = (it % chunks) * chunk;
    int64_t oa = 0, ob = 0;
    row_offsets(r, oa, ob);
    body(oa + c0 * l.row_sa(), ob + c0 * l.row_sb(), std::min(chunk, n - c0));
  }
}

// ---- typed element loops ------------------------------------------------------------------

// Storage tags: values of bf16/fp16 tensors are uint16_t bits.
struct Bf16 {
  using storage = uint16_t;
  using compute = float;
  static float load(uint16_t b) { return bf16_t::to_float(b); }
  static uint16_t store(float v) { return bf16_t::from_float(v); }
};
struct Fp16 {
  using storage = uint16_t;
  using compute = float;
  static float load(uint16_t b) { return fp16_t::to_float(b); }
  static uint16_t store(float v) { return fp16_t::from_float(v); }
};
struct F32 {
  using storage = float;
  using compute = float;
  static float load(float x) { return x; }
  static float store(float v) { return v; }
};
struct F64 {
  using storage = double;
  using compute = double;
  static double load(double x) { return x; }
  static double store(double v) { return v; }
};

// Arithmetic type of a (dst, src) pair: double when either side is fp64, else float. A
// value from double reaches a 16-bit type through float (as every path of distattn does).
template <typename D, typename S>
using ComputeT = std::conditional_t<std::is_same_v<typename D::compute, double> ||
                                        std::is_same_v<typename S::compute, double>,
                                    double, float>;

template <typename D>
typename D::storage store_as(double v) {
  if constexpr (std::is_same_v<D, F64>) {
    return v;
  } else {
    return D::store(static_cast<float>(v));
  }
}
template <typename D>
typename D::storage store_as(float v) {
  return D::store(v);
}

template <typename D, typename S>
void convert_piece(void* dst, int64_t sd, const void* src, int64_t ss, int64_t n) {
  using C = ComputeT<D, S>;
  auto* d = static_cast<typename D::storage*>(dst);
  const auto* s = static_cast<const typename S::storage*>(src);
  if (sd == 1 && ss == 1) {
    for (int64_t i = 0; i < n; ++i) d[i] = store_as<D>(static_cast<C>(S::load(s[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) d[i * sd] = store_as<D>(static_cast<C>(S::load(s[i * ss])));
  }
}

template <typename D, typename S>
void add_piece(void* dst, int64_t sd, const void* src, int64_t ss, int64_t n) {
  using C = ComputeT<D, S>;
  auto* d = static_cast<typename D::storage*>(dst);
  const auto* s = static_cast<const typename S::storage*>(src);
  if (sd == 1 && ss == 1) {
    for (int64_t i = 0; i < n; ++i)
      d[i] = store_as<D>(static_cast<C>(D::load(d[i])) + static_cast<C>(S::load(s[i])));
  } else {
    for (int64_t i = 0; i < n; ++i)
      d[i * sd] =
          store_as<D>(static_cast<C>(D::load(d[i * sd])) + static_cast<C>(S::load(s[i * ss])));
  }
}

template <typename T>
void move_piece(void* dst, int64_t sd, const void* src, int64_t ss, int64_t n) {
  auto* d = static_cast<T*>(dst);
  const auto* s = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) d[i * sd] = s[i * ss];
}

template <typename T>
void fill_piece(void* dst, int64_t sd, T v, int64_t n) {
  auto* d = static_cast<T*>(dst);
  if (sd == 1) {
    std::fill_n(d, n, v);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i * sd] = v;
  }
}

using PieceFn = void (*)(void*, int64_t, const void*, int64_t, int64_t);

// F(tag) for the tag of a float dtype.
template <typename F>
auto with_float_tag(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(F32{});
    case DType::kFloat64:
      return f(F64{});
    case DType::kBFloat16:
      return f(Bf16{});
    case DType::kFloat16:
      return f(Fp16{});
    default:
      break;
  }
  DISTATTN_THROW(Status::kInternal, "elementwise: unexpected dtype ", dtype_name(t));
}

PieceFn convert_fn(DType dst, DType src) {
  return with_float_tag(dst, [&](auto d) {
    return with_float_tag(
        src, [&](auto s) -> PieceFn { return &convert_piece<decltype(d), decltype(s)>; });
  });
}

PieceFn add_fn(DType dst, DType src) {
  return with_float_tag(dst, [&](auto d) {
    return with_float_tag(src, [&](auto s) -> PieceFn {
      using D = decltype(d);
      if constexpr (std::is_same_v<D, F32> || std::is_same_v<D, F64>) {
        return &add_piece<D, decltype(s)>;
      } else {
        return nullptr;  // rejected by validation
      }
    });
  });
}

PieceFn move_fn(size_t element_size) {
  switch (element_size) {
    case 1:
      return &move_piece<uint8_t>;
    case 2:
      return &move_piece<uint16_t>;
    case 4:
      return &move_piece<uint32_t>;
    case 8:
      return &move_piece<uint64_t>;
    default:
      break;
  }
  DISTATTN_THROW(Status::kInternal, "elementwise: unexpected element size ", element_size);
}

char* at(const TensorView& t, int64_t elem_offset) {
  return static_cast<char*>(t.data) + elem_offset * static_cast<int64_t>(t.element_size());
}

void copy_cpu(const TensorView& dst, const TensorView& src) {
  if (dst.data == src.data && dst.dtype == src.dtype && dst.strides == src.strides) return;
  const Layout l = coalesce(dst, src);
  const int64_t sd = l.row_sa(), ss = l.row_sb();
  if (dst.dtype == src.dtype && (sd == 1 || l.row() <= 1) && (ss == 1 || l.row() <= 1)) {
    const int64_t es = static_cast<int64_t>(dst.element_size());
    for_each_piece(l, [&](int64_t od, int64_t os, int64_t n) {
      std::memcpy(at(dst, od), at(src, os), static_cast<size_t>(n * es));
    });
    return;
  }
  const PieceFn fn =
      dst.dtype == src.dtype ? move_fn(dst.element_size()) : convert_fn(dst.dtype, src.dtype);
  for_each_piece(
      l, [&](int64_t od, int64_t os, int64_t n) { fn(at(dst, od), sd, at(src, os), ss, n); });
}

void add_cpu(const TensorView& dst, const TensorView& src) {
  const Layout l = coalesce(dst, src);
  const int64_t sd = l.row_sa(), ss = l.row_sb();
  const PieceFn fn = add_fn(dst.dtype, src.dtype);
  for_each_piece(
      l, [&](int64_t od, int64_t os, int64_t n) { fn(at(dst, od), sd, at(src, os), ss, n); });
}

// Element-sized bit pattern fill (zero: all-zero bits for every dtype).
void fill_bits_cpu(const TensorView& t, uint64_t bits) {
  const Layout l = coalesce(t, t);
  const int64_t st = l.row_sa();
  const size_t es = t.element_size();
  if (bits == 0 && (st == 1 || l.row() <= 1)) {
    for_each_piece(l, [&](int64_t o, int64_t, int64_t n) {
      std::memset(at(t, o), 0, static_cast<size_t>(n) * es);
    });
    return;
  }
  for_each_piece(l, [&](int64_t o, int64_t, int64_t n) {
    switch (es) {
      case 1:
        return fill_piece<uint8_t>(at(t, o), st, static_cast<uint8_t>(bits), n);
      case 2:
        return fill_piece<uint16_t>(at(t, o), st, static_cast<uint16_t>(bits), n);
      case 4:
        return fill_piece<uint32_t>(at(t, o), st, static_cast<uint32_t>(bits), n);
      default:
        return fill_piece<uint64_t>(at(t, o), st, bits, n);
    }
  });
}

// The bits of `value` stored as one element of a float dtype (CPU and CUDA fills alike).
uint64_t value_bits(DType t, double value) {
  uint64_t bits = 0;
  with_float_tag(t, [&](auto tag) {
    using T = decltype(tag);
    const typename T::storage v = store_as<T>(value);
    std::memcpy(&bits, &v, sizeof(v));
    return 0;
  });
  return bits;
}

#if DISTATTN_WITH_CUDA
std::vector<int64_t> shape_of(const TensorView& t) {
  return std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.ndim);
}
#endif

}  // namespace

void tensor_copy(const TensorView& dst, const TensorView& src, Stream stream) {
  constexpr const char* op = "tensor_copy";
  check_view(op, "dst", dst);
  check_view(op, "src", src);
  check_float(op, "dst", dst);
  check_float(op, "src", src);
  check_same_shape(op, dst, src);
  check_device_supported(op, "dst", dst);
  check_device_supported(op, "src", src);
  DISTATTN_CHECK(dst.device == src.device || dst.device.type != src.device.type, op, ": dst is on ",
                 dst.device.str(), " but src is on ", src.device.str(),
                 "; copy between two GPUs is not supported (stage through the host or use one "
                 "device)");
  if (dst.numel() == 0) return;
  if (dst.device.is_cpu() && src.device.is_cpu()) return copy_cpu(dst, src);
#if DISTATTN_WITH_CUDA
  if (dst.device.is_cuda() && src.device.is_cuda())
    return kernels::cuda::tensor_copy(dst, src, stream);
  const auto shape = shape_of(dst);
  if (dst.device.is_cuda()) {
    // Gather (still in src's dtype) into a packed host buffer; the device converts/scatters.
    Tensor host = Tensor::empty(shape, src.dtype, Device::cpu());
    copy_cpu(host.view(), src);
    kernels::cuda::copy_from_host(dst, host.view(), stream);
  } else {
    Tensor host = Tensor::empty(shape, src.dtype, Device::cpu());
    kernels::cuda::copy_to_host(host.view(), src, stream);
    copy_cpu(dst, host.view());
  }
#else
  (void)stream;
#endif
}

void tensor_add(const TensorView& dst, const TensorView& src, Stream stream) {
  constexpr const char* op = "tensor_add";
  check_view(op, "dst", dst);
  check_view(op, "src", src);
  DISTATTN_CHECK_STATUS(dst.dtype == DType::kFloat32 || dst.dtype == DType::kFloat64,
                        Status::kUnsupported, op, ": dst is ", dtype_name(dst.dtype),
                        " but must be fp32 or fp64 (accumulate in an fp32 buffer and convert "
                        "with tensor_copy at the end)");
  check_float(op, "src", src);
  check_same_shape(op, dst, src);
  check_device_supported(op, "dst", dst);
  DISTATTN_CHECK(dst.device == src.device, op, ": dst is on ", dst.device.str(), " but src is on ",
                 src.device.str(),
                 "; both must be on one device (move src with tensor_copy first)");
  if (dst.numel() == 0) return;
  if (dst.device.is_cpu()) return add_cpu(dst, src);
#if DISTATTN_WITH_CUDA
  kernels::cuda::tensor_add(dst, src, stream);
#else
  (void)stream;
#endif
}

void tensor_zero(const TensorView& t, Stream stream) {
  constexpr const char* op = "tensor_zero";
  check_view(op, "t", t);
  check_device_supported(op, "t", t);
  if (t.numel() == 0) return;
  if (t.device.is_cpu()) return fill_bits_cpu(t, 0);
#if DISTATTN_WITH_CUDA
  kernels::cuda::tensor_zero(t, stream);
#else
  (void)stream;
#endif
}

void tensor_fill(const TensorView& t, double value, Stream stream) {
  constexpr const char* op = "tensor_fill";
  check_view(op, "t", t);
  check_float(op, "t", t);
  check_device_supported(op, "t", t);
  if (t.numel() == 0) return;
  if (t.device.is_cpu()) return fill_bits_cpu(t, value_bits(t.dtype, value));
#if DISTATTN_WITH_CUDA
  kernels::cuda::tensor_fill_bits(t, value_bits(t.dtype, value), stream);
#else
  (void)stream;
#endif
}

}  // namespace distattn::ops
