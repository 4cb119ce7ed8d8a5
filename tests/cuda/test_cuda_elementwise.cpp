// ops::tensor_copy / tensor_add / tensor_zero / tensor_fill on CUDA tensors against the CPU
// implementation (itself checked against a naive fp64 loop in tests/unit/test_elementwise.cpp):
// every dtype pair, packed / transposed / sliced / permuted views of rank 1..4, the copy and
// memset engine paths and the strided kernels, NaN-poisoned destinations, mixed CPU/CUDA
// copies, work chained on a non-blocking stream, and element offsets past 2^32 bytes with more
// than 2^31 elements (64-bit indexing). Whole backing buffers are compared byte for byte, so a
// write outside a view fails too. Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/strided_views.h"
#include "common/test_data.h"
#include "distattn/config.h"
#include "distattn/core/half.h"
#include "distattn/ops/elementwise.h"
#include "tests/cuda/cuda_test_util.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace distattn::testing {
namespace {

#if DISTATTN_WITH_CUDA

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

const DType kFloats[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16};

// The same view of a backing buffer on the host and on the GPU.
struct Pair {
  Tensor host_backing, dev_backing;
  TensorView host, dev;
};

// A view of `shape` inside a larger 1-D backing (kind picks the layout). The backing holds
// test data, or NaN everywhere when `poison` (float dtypes).
Pair make(const std::vector<int64_t>& shape, DType dtype, Kind kind, uint64_t seed, bool poison) {
  const StridedLayout l = strided_layout(shape, kind);
  Pair p;
  p.host_backing = Tensor::empty({l.backing_numel}, dtype);
  if (poison) {
    Tensor nan = Tensor::empty({l.backing_numel}, DType::kFloat64);
    std::fill_n(nan.data_as<double>(), nan.numel(), std::numeric_limits<double>::quiet_NaN());
    convert_dtype_cpu(nan.view(), p.host_backing.view());
  } else {
    fill_test_data(p.host_backing.view(), seed, 11);
  }
  p.dev_backing = to_device(p.host_backing.view(), gpu());
  // cudaMemcpy from pageable memory may return before the DMA lands, and the legacy stream
  // does not order the tests' non-blocking streams.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const int64_t off = l.base * static_cast<int64_t>(dtype_size(dtype));
  p.host = TensorView(static_cast<char*>(p.host_backing.data()) + off, dtype, Device::cpu(), shape,
                      l.strides);
  p.dev =
      TensorView(static_cast<char*>(p.dev_backing.data()) + off, dtype, gpu(), shape, l.strides);
  return p;
}

// Device backing == host backing, byte for byte (after the stream has finished).
void expect_same_backing(const Pair& p, const std::string& what) {
  const Tensor back = to_device(p.dev_backing.view(), Device::cpu());
  const size_t es = p.host_backing.view().element_size();
  const char* a = static_cast<const char*>(back.data());
  const char* b = static_cast<const char*>(p.host_backing.data());
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < back.numel(); ++i)
    if (std::memcmp(a + i * es, b + i * es, es) != 0) {
      if (first < 0) first = i;
      ++wrong;
    }
  EXPECT_EQ(wrong, 0) << what << ": first differing backing element " << first;
}

// No NaN/Inf left in the (host) view: a poisoned element the op should have written.
void expect_finite(const TensorView& host_view, const std::string& what) {
  int64_t bad = 0;
  for (double x : to_double_vector(host_view)) bad += std::isfinite(x) ? 0 : 1;
  EXPECT_EQ(bad, 0) << what << ": non-finite elements in the destination";
}

class TestStream {
 public:
  TestStream() { EXPECT_EQ(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), cudaSuccess); }
  ~TestStream() { (void)cudaStreamDestroy(s_); }
  distattn::Stream get() const { return s_; }
  void sync() const { EXPECT_EQ(cudaStreamSynchronize(s_), cudaSuccess); }

 private:
  cudaStream_t s_ = nullptr;
};

// Sliced {40, 300}: rows of >= 512 bytes take the 2-D copy / memset path.
const std::vector<std::vector<int64_t>> kShapes = {
    {7}, {3, 5}, {2, 1, 33}, {2, 3, 4, 5}, {1, 1, 1, 1}, {4, 1, 3, 17}, {3, 129, 2, 64}, {40, 300}};

std::string label(const std::vector<int64_t>& shape, DType d, DType s, Kind kd, Kind ks) {
  std::string o = "shape [";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? "," : "") + std::to_string(shape[i]);
  return o + "] dst " + dtype_name(d) + " " + kind_name(kd) + " src " + dtype_name(s) + " " +
         kind_name(ks);
}

TEST(CudaElementwise, CopyMatchesCpuForEveryDtypePairAndLayoutIntoPoisonedDestinations) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  uint64_t seed = 1;
  for (const auto& shape : kShapes)
    for (DType dt : kFloats)
      for (DType st : kFloats)
        for (Kind kd : kKinds)
          for (Kind ks : {Kind::kPacked, Kind::kTransposed, Kind::kSliced}) {
            const std::string what = label(shape, dt, st, kd, ks);
            Pair dst = make(shape, dt, kd, seed++, /*poison=*/true);
            Pair src = make(shape, st, ks, seed++, false);
            ops::tensor_copy(dst.dev, src.dev, stream.get());
            ops::tensor_copy(dst.host, src.host);
            stream.sync();
            expect_same_backing(dst, what);
            expect_same_backing(src, what + " (src)");
            expect_finite(dst.host, what);
          }
}

// Same-dtype strided copies move raw bits: every pattern, NaN payloads included, arrives.
TEST(CudaElementwise, SameDtypeStridedCopyIsBitExact) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  const std::vector<int64_t> shape = {5, 7, 33};
  for (DType t : kFloats) {
    Pair dst = make(shape, t, Kind::kSliced, 1, true);
    Pair src = make(shape, t, Kind::kTransposed, 2, false);
    // Random bytes: NaNs with any payload, infinities, subnormals.
    uint64_t x = 0x9e3779b97f4a7c15ull;
    auto* bytes = static_cast<unsigned char*>(src.host_backing.data());
    for (size_t i = 0; i < src.host_backing.nbytes(); ++i) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      bytes[i] = static_cast<unsigned char>(x);
    }
    CUDA_OK(cudaMemcpy(src.dev_backing.data(), src.host_backing.data(), src.host_backing.nbytes(),
                       cudaMemcpyHostToDevice));
    CUDA_OK(cudaDeviceSynchronize());
    ops::tensor_copy(dst.dev, src.dev, stream.get());
    ops::tensor_copy(dst.host, src.host);
    stream.sync();
    expect_same_backing(dst, std::string("raw bits ") + dtype_name(t));
  }
}

// fp32 -> bf16 / fp16 from random bit patterns (NaNs with any payload and sign, infinities,
// subnormals, values that overflow fp16): rounding, overflow and the NaN pattern written must
// equal the CPU conversion byte for byte.
TEST(CudaElementwise, NarrowingCopyOfRandomFp32BitsMatchesCpu) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  const std::vector<int64_t> shape = {9, 17, 65};  // ~40 NaNs among random fp32 bit patterns
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    Pair dst = make(shape, t, Kind::kSliced, 1, true);
    Pair src = make(shape, DType::kFloat32, Kind::kTransposed, 2, false);
    uint64_t x = 0x2545f4914f6cdd1dull;
    auto* bytes = static_cast<unsigned char*>(src.host_backing.data());
    for (size_t i = 0; i < src.host_backing.nbytes(); ++i) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      bytes[i] = static_cast<unsigned char>(x);
    }
    CUDA_OK(cudaMemcpy(src.dev_backing.data(), src.host_backing.data(), src.host_backing.nbytes(),
                       cudaMemcpyHostToDevice));
    CUDA_OK(cudaDeviceSynchronize());
    ops::tensor_copy(dst.dev, src.dev, stream.get());
    ops::tensor_copy(dst.host, src.host);
    stream.sync();
    expect_same_backing(dst, std::string("fp32 bits -> ") + dtype_name(t));
  }
}

TEST(CudaElementwise, AddMatchesCpuForEveryDstSrcPairAndLayout) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  uint64_t seed = 1000;
  for (const auto& shape : kShapes)
    for (DType dt : {DType::kFloat32, DType::kFloat64})
      for (DType st : kFloats)
        for (Kind kd : kKinds)
          for (Kind ks : {Kind::kPacked, Kind::kTransposed, Kind::kSliced}) {
            const std::string what = label(shape, dt, st, kd, ks);
            Pair dst = make(shape, dt, kd, seed++, false);
            Pair src = make(shape, st, ks, seed++, false);
            ops::tensor_add(dst.dev, src.dev, stream.get());
            ops::tensor_add(dst.host, src.host);
            stream.sync();
            expect_same_backing(dst, what);
          }
}

TEST(CudaElementwise, ZeroAndFillMatchCpuForEveryDtypeAndLayout) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  uint64_t seed = 5000;
  for (const auto& shape : kShapes)
    for (DType dt : kFloats)
      for (Kind k : kKinds) {
        const std::string what = label(shape, dt, dt, k, k);
        Pair z = make(shape, dt, k, seed++, /*poison=*/true);
        ops::tensor_zero(z.dev, stream.get());
        ops::tensor_zero(z.host);
        stream.sync();
        expect_same_backing(z, what + " zero");
        expect_finite(z.host, what + " zero");
        for (double v : {-std::numeric_limits<double>::infinity(), 0.1, -3.0}) {
          Pair f = make(shape, dt, k, seed++, false);
          ops::tensor_fill(f.dev, v, stream.get());
          ops::tensor_fill(f.host, v);
          stream.sync();
          expect_same_backing(f, what + " fill " + std::to_string(v));
        }
      }
}

TEST(CudaElementwise, MixedDeviceCopiesStageThroughTheHost) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  uint64_t seed = 9000;
  for (const auto& shape : kShapes)
    for (DType dt : {DType::kFloat32, DType::kBFloat16})
      for (DType st : {DType::kFloat32, DType::kFloat16})
        for (Kind kd : {Kind::kPacked, Kind::kSliced, Kind::kTransposed})
          for (Kind ks : {Kind::kPacked, Kind::kSliced, Kind::kPermuted}) {
            const std::string what = label(shape, dt, st, kd, ks);
            // CPU -> CUDA: the device backing must equal a CPU -> CPU copy's backing.
            Pair dst = make(shape, dt, kd, seed++, true);
            Pair src = make(shape, st, ks, seed++, false);
            ops::tensor_copy(dst.dev, src.host, stream.get());  // synchronous by contract
            ops::tensor_copy(dst.host, src.host);
            expect_same_backing(dst, what + " host->device");
            // CUDA -> CPU into a fresh poisoned host view.
            Pair back = make(shape, dt, kd, seed++, true);
            Pair ref = make(shape, dt, kd, seed, true);
            ops::tensor_copy(back.host, src.dev, stream.get());
            ops::tensor_copy(ref.host, src.host);
            const auto a = to_double_vector(back.host), b = to_double_vector(ref.host);
            int64_t wrong = 0;
            for (size_t i = 0; i < a.size(); ++i) wrong += (a[i] == b[i]) ? 0 : 1;
            EXPECT_EQ(wrong, 0) << what << " device->host";
          }
}

// copy, add, add, copy on one non-blocking stream with no synchronization in between: each
// op must be ordered after the previous one on that stream.
TEST(CudaElementwise, ChainedOpsOnANonBlockingStreamAreOrdered) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  const int64_t B = 2, S = 4099, H = 8, D = 64;
  Tensor src_h = Tensor::empty({B, S, H, D}, DType::kBFloat16);
  fill_test_data(src_h.view(), 3, 3);
  Tensor src = to_device(src_h.view(), gpu());
  Tensor acc = Tensor::empty({B, S, H / 2, D}, DType::kFloat32, gpu());
  Tensor out = Tensor::empty({B, S, H / 2, D}, DType::kBFloat16, gpu());
  CUDA_OK(cudaDeviceSynchronize());  // the upload has landed (see make())
  const TensorView heads = src.view().slice(2, 2, H / 2);
  ops::tensor_copy(acc.view(), heads, stream.get());
  ops::tensor_add(acc.view(), heads, stream.get());
  ops::tensor_add(acc.view(), acc.view(), stream.get());
  ops::tensor_copy(out.view(), acc.view(), stream.get());
  stream.sync();
  const auto got = to_double_vector(out.view());
  const auto in = to_double_vector(src_h.view().slice(2, 2, H / 2));
  ASSERT_EQ(got.size(), in.size());
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    // 4x a bf16 value is exact in fp32 and in bf16.
    wrong += got[i] == 4 * in[i] ? 0 : 1;
  }
  EXPECT_EQ(wrong, 0);
}

// device_copy and device_memset_zero (behind to_device and Tensor::zeros) use the legacy
// default stream, which non-blocking streams do not wait for; they must be complete when they
// return (a pageable upload may otherwise still be in its DMA, a memset or a device-to-device
// copy still queued). Each is followed at once by a copy on a non-blocking stream that must
// see its result. 64 MiB makes every one of them take long enough to lose such a race.
TEST(CudaElementwise, LegacyStreamCopiesAndZerosCompleteBeforeWorkOnOtherStreams) {
  DISTATTN_SKIP_WITHOUT_GPU();
  TestStream stream;
  const int64_t n = int64_t{16} << 20;  // fp32: 64 MiB
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  Tensor a = Tensor::empty({n}, DType::kFloat32, gpu());
  Tensor b = Tensor::empty({n}, DType::kFloat32, gpu());
  Tensor c = Tensor::empty({n}, DType::kFloat32, gpu());
  std::vector<float> host(static_cast<size_t>(n));
  auto count_not = [&](const Tensor& t, float want) -> int64_t {
    if (cudaMemcpy(host.data(), t.data(), bytes, cudaMemcpyDeviceToHost) != cudaSuccess) return -1;
    return std::count_if(host.begin(), host.end(), [want](float x) { return !(x == want); });
  };
  // Old contents that a too-early reader would see: all bits set (NaN).
  CUDA_OK(cudaMemset(a.data(), 0xff, bytes));
  CUDA_OK(cudaMemset(c.data(), 0xff, bytes));
  CUDA_OK(cudaDeviceSynchronize());

  device_memset_zero(a.data(), gpu(), bytes);
  ops::tensor_copy(b.view(), a.view(), stream.get());
  stream.sync();
  EXPECT_EQ(count_not(b, 0.0f), 0) << "device_memset_zero then a copy on another stream";

  std::fill(host.begin(), host.end(), 1.5f);  // pageable source
  device_copy(a.data(), gpu(), host.data(), Device::cpu(), bytes);
  ops::tensor_copy(b.view(), a.view(), stream.get());
  stream.sync();
  EXPECT_EQ(count_not(b, 1.5f), 0) << "pageable upload then a copy on another stream";

  device_copy(c.data(), gpu(), a.data(), gpu(), bytes);
  ops::tensor_copy(b.view(), c.view(), stream.get());
  stream.sync();
  EXPECT_EQ(count_not(b, 1.5f), 0) << "device-to-device copy then a copy on another stream";

  c = Tensor();  // its 1.5s are likely what the next allocation of this size gets back
  Tensor z = Tensor::zeros({n}, DType::kFloat32, gpu());
  ops::tensor_copy(b.view(), z.view(), stream.get());
  stream.sync();
  EXPECT_EQ(count_not(b, 0.0f), 0) << "Tensor::zeros then a copy on another stream";
}

bool have_free_gpu_memory(size_t bytes) {
  size_t free_b = 0, total_b = 0;
  return cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && free_b > bytes + (size_t{1} << 30);
}

// A view whose elements lie past 2^32 bytes: a copy of two rows, the second at element
// offset 2^31 (bf16, byte offset 4 GiB), to and from a small packed tensor.
TEST(CudaElementwise, LargeElementOffsetsUse64BitArithmetic) {
  DISTATTN_SKIP_WITHOUT_GPU();
  const int64_t row = 4096, far = int64_t{1} << 31;
  const size_t bytes = static_cast<size_t>(far + row) * 2;
  if (!have_free_gpu_memory(bytes)) GTEST_SKIP() << "skipped: needs 5 GiB of free GPU memory";
  TestStream stream;
  Tensor big = Tensor::empty({far + row}, DType::kBFloat16, gpu());
  const int64_t shape[] = {2, row}, strides[] = {far, 1};
  const TensorView rows(big.data(), DType::kBFloat16, gpu(), shape, strides);
  Tensor small_h = Tensor::empty({2, row}, DType::kFloat32);
  fill_test_data(small_h.view(), 4, 4);
  Tensor small = to_device(small_h.view(), gpu());
  CUDA_OK(cudaDeviceSynchronize());  // the upload has landed (see make())
  ops::tensor_zero(big.view().slice(0, far - row, 2 * row), stream.get());  // around 2^31
  ops::tensor_copy(rows, small.view(), stream.get());  // fp32 -> bf16: the strided kernel
  Tensor back = Tensor::empty({2, row}, DType::kFloat32, gpu());
  ops::tensor_copy(back.view(), rows, stream.get());
  stream.sync();
  const auto got = to_double_vector(back.view());
  const auto want = to_double_vector(small_h.view());
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i)
    wrong += got[i] == static_cast<double>(bf16_t(static_cast<float>(want[i]))) ? 0 : 1;
  EXPECT_EQ(wrong, 0);
  // The zeroed elements just before 2^31 are untouched by the row copy.
  const auto before = to_double_vector(big.view().slice(0, far - row, row));
  EXPECT_EQ(std::count(before.begin(), before.end(), 0.0), row);
}

// More than 2^31 elements: the kernels switch to 64-bit indices. Every other byte of a
// 4 GiB uint8 buffer is zeroed by the strided fill kernel; windows at the start, around
// index 2^31 and at the end are checked.
TEST(CudaElementwise, ZeroOfMoreThan2Pow31ElementsReachesTheEnd) {
  DISTATTN_SKIP_WITHOUT_GPU();
  const int64_t n = (int64_t{1} << 31) + 4099;
  const size_t bytes = static_cast<size_t>(2 * n);
  if (!have_free_gpu_memory(bytes)) GTEST_SKIP() << "skipped: needs 5 GiB of free GPU memory";
  TestStream stream;
  Tensor buf = Tensor::empty({2 * n}, DType::kUInt8, gpu());
  CUDA_OK(cudaMemsetAsync(buf.data(), 0xff, bytes, static_cast<cudaStream_t>(stream.get())));
  const int64_t shape[] = {n}, strides[] = {2};
  ops::tensor_zero(TensorView(buf.data(), DType::kUInt8, gpu(), shape, strides), stream.get());
  stream.sync();
  const int64_t window = 1 << 16;
  for (int64_t start : {int64_t{0}, (int64_t{1} << 32) - window, 2 * n - window}) {
    std::vector<uint8_t> h(static_cast<size_t>(window));
    CUDA_OK(cudaMemcpy(h.data(), static_cast<uint8_t*>(buf.data()) + start,
                       static_cast<size_t>(window), cudaMemcpyDeviceToHost));
    int64_t wrong = 0;
    for (int64_t i = 0; i < window; ++i)
      wrong += h[static_cast<size_t>(i)] != (((start + i) % 2 == 0) ? 0 : 0xff);
    EXPECT_EQ(wrong, 0) << "window at byte " << start;
  }
}

#else

TEST(CudaElementwise, SkippedWithoutCudaBuild) {
  GTEST_SKIP() << "skipped: built without CUDA";
}

#endif

}  // namespace
}  // namespace distattn::testing
