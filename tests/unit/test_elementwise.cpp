// ops::tensor_copy / tensor_add / tensor_zero / tensor_fill on CPU tensors: every dtype pair,
// packed, transposed, sliced and permuted views of rank 1..4, numel 0, the OpenMP paths, and
// the validation messages. Expected values come from a naive per-element loop in fp64 (one
// multi-index at a time, no coalescing), compared bit for bit; elements of the backing buffers
// outside the views must keep their bytes. Also the CUDA kernels' index arithmetic
// (kernels/cuda/elementwise_index.h), which is plain C++ and so testable without a GPU.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/strided_views.h"
#include "common/test_data.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/elementwise.h"
#include "kernels/cuda/elementwise_index.h"

namespace distattn {
namespace {

using testing::Kind;
using testing::kind_name;
using testing::kKinds;

const DType kFloats[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16};

// ---- naive element access (independent of the code under test) ----

double load(const void* p, DType t) {
  switch (t) {
    case DType::kFloat32:
      return *static_cast<const float*>(p);
    case DType::kFloat64:
      return *static_cast<const double*>(p);
    case DType::kBFloat16:
      return bf16_t::to_float(*static_cast<const uint16_t*>(p));
    case DType::kFloat16:
      return fp16_t::to_float(*static_cast<const uint16_t*>(p));
    default:
      ADD_FAILURE() << "not a float dtype";
      return 0;
  }
}

void store(void* p, DType t, double v) {
  switch (t) {
    case DType::kFloat32:
      *static_cast<float*>(p) = static_cast<float>(v);
      return;
    case DType::kFloat64:
      *static_cast<double*>(p) = v;
      return;
    case DType::kBFloat16:
      *static_cast<uint16_t*>(p) = bf16_t::from_float(static_cast<float>(v));
      return;
    case DType::kFloat16:
      *static_cast<uint16_t*>(p) = fp16_t::from_float(static_cast<float>(v));
      return;
    default:
      ADD_FAILURE() << "not a float dtype";
  }
}

// Element offsets (in elements, from the view's data pointer) of every element, row-major.
std::vector<int64_t> offsets(const TensorView& t) {
  std::vector<int64_t> out;
  const int64_t n = t.numel();
  out.reserve(static_cast<size_t>(n));
  for (int64_t lin = 0; lin < n; ++lin) {
    int64_t rem = lin, off = 0;
    for (int d = t.ndim - 1; d >= 0; --d) {
      off += (rem % t.shape[d]) * t.strides[d];
      rem /= t.shape[d];
    }
    out.push_back(off);
  }
  return out;
}

// A view of `shape` with a layout of kind `kind` inside a larger backing buffer whose every
// element holds test data (so untouched bytes are recognisable).
struct Strided {
  Tensor backing;
  TensorView view;
  int64_t base = 0;  // element offset of view.data in backing
};

Strided make(std::vector<int64_t> shape, DType dtype, Kind kind, uint64_t seed) {
  const testing::StridedLayout l = testing::strided_layout(shape, kind);
  Strided s;
  s.backing = Tensor::empty({l.backing_numel}, dtype);
  testing::fill_test_data(s.backing.view(), seed, 99);
  s.base = l.base;
  s.view = TensorView(static_cast<char*>(s.backing.data()) + s.base * dtype_size(dtype), dtype,
                      Device::cpu(), shape, l.strides);
  return s;
}

// Bytes of the backing outside the view must not change.
void expect_outside_untouched(const Strided& s, const std::vector<char>& before,
                              const std::string& what) {
  std::vector<bool> inside(static_cast<size_t>(s.backing.numel()), false);
  for (int64_t o : offsets(s.view)) inside[static_cast<size_t>(s.base + o)] = true;
  const size_t es = s.backing.view().element_size();
  const char* now = static_cast<const char*>(s.backing.data());
  int64_t changed = 0;
  for (size_t i = 0; i < inside.size(); ++i)
    if (!inside[i] && std::memcmp(now + i * es, before.data() + i * es, es) != 0) ++changed;
  EXPECT_EQ(changed, 0) << what << ": elements outside the view were written";
}

std::vector<char> bytes_of(const Tensor& t) {
  const char* p = static_cast<const char*>(t.data());
  return std::vector<char>(p, p + t.nbytes());
}

const std::vector<std::vector<int64_t>> kShapes = {{7},          {3, 5},       {2, 1, 33},
                                                   {2, 3, 4, 5}, {1, 1, 1, 1}, {4, 1, 3, 17}};

std::string label(const std::vector<int64_t>& shape, DType d, DType s, Kind kd, Kind ks) {
  std::string o = "shape [";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? "," : "") + std::to_string(shape[i]);
  return o + "] dst " + dtype_name(d) + " " + kind_name(kd) + " src " + dtype_name(s) + " " +
         kind_name(ks);
}

TEST(TensorCopy, EveryDtypePairAndLayoutMatchesNaiveLoopBitForBit) {
  uint64_t seed = 1;
  for (const auto& shape : kShapes)
    for (DType dt : kFloats)
      for (DType st : kFloats)
        for (Kind kd : kKinds)
          for (Kind ks : {Kind::kPacked, Kind::kTransposed, Kind::kSliced}) {
            const std::string what = label(shape, dt, st, kd, ks);
            Strided dst = make(shape, dt, kd, seed++);
            Strided src = make(shape, st, ks, seed++);
            const auto before = bytes_of(dst.backing);
            const auto src_before = bytes_of(src.backing);
            ops::tensor_copy(dst.view, src.view);
            const auto od = offsets(dst.view), os = offsets(src.view);
            const size_t de = dtype_size(dt), se = dtype_size(st);
            int64_t wrong = 0;
            for (size_t i = 0; i < od.size(); ++i) {
              char want[8];
              store(want, dt, load(static_cast<const char*>(src.view.data) + os[i] * se, st));
              if (std::memcmp(want, static_cast<const char*>(dst.view.data) + od[i] * de, de))
                ++wrong;
            }
            EXPECT_EQ(wrong, 0) << what;
            expect_outside_untouched(dst, before, what);
            EXPECT_EQ(bytes_of(src.backing), src_before) << what << ": src was modified";
          }
}

TEST(TensorAdd, EveryDstSrcPairAndLayoutMatchesNaiveLoopBitForBit) {
  uint64_t seed = 1000;
  for (const auto& shape : kShapes)
    for (DType dt : {DType::kFloat32, DType::kFloat64})
      for (DType st : kFloats)
        for (Kind kd : kKinds)
          for (Kind ks : {Kind::kPacked, Kind::kTransposed, Kind::kSliced}) {
            const std::string what = label(shape, dt, st, kd, ks);
            Strided dst = make(shape, dt, kd, seed++);
            Strided src = make(shape, st, ks, seed++);
            const auto before = bytes_of(dst.backing);
            const auto od = offsets(dst.view), os = offsets(src.view);
            const size_t de = dtype_size(dt), se = dtype_size(st);
            // fp32 + fp32 adds in fp32; everything else in fp64, rounded once.
            std::vector<double> want(od.size());
            for (size_t i = 0; i < od.size(); ++i) {
              const double a = load(static_cast<const char*>(dst.view.data) + od[i] * de, dt);
              const double b = load(static_cast<const char*>(src.view.data) + os[i] * se, st);
              if (dt == DType::kFloat32 && st == DType::kFloat32) {
                want[i] = static_cast<float>(a) + static_cast<float>(b);
              } else {
                want[i] = dt == DType::kFloat32 ? static_cast<float>(a + b) : a + b;
              }
            }
            ops::tensor_add(dst.view, src.view);
            int64_t wrong = 0;
            for (size_t i = 0; i < od.size(); ++i)
              if (load(static_cast<const char*>(dst.view.data) + od[i] * de, dt) != want[i])
                ++wrong;
            EXPECT_EQ(wrong, 0) << what;
            expect_outside_untouched(dst, before, what);
          }
}

TEST(TensorAdd, RepeatedBf16AccumulationIntoFp32TracksFp64Sum) {
  const int64_t n = 4096, steps = 16;
  Tensor acc = Tensor::zeros({4, n / 4}, DType::kFloat32);
  std::vector<double> exact(n, 0.0);
  std::vector<float> stepwise(n, 0.0f);  // the same sums, rounded to fp32 after every step
  for (int s = 0; s < steps; ++s) {
    Tensor part = Tensor::empty({4, n / 4}, DType::kBFloat16);
    testing::fill_test_data(part.view(), 77, static_cast<uint64_t>(s));
    ops::tensor_add(acc.view(), part.view());
    for (int64_t i = 0; i < n; ++i) {
      exact[i] += bf16_t::to_float(part.data_as<uint16_t>()[i]);
      stepwise[i] += bf16_t::to_float(part.data_as<uint16_t>()[i]);
    }
  }
  double max_err = 0;
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(acc.data_as<float>()[i])) << i;
    ASSERT_EQ(acc.data_as<float>()[i], stepwise[i]) << i;
    max_err = std::max(max_err, std::fabs(acc.data_as<float>()[i] - exact[i]));
  }
  // 16 fp32 roundings of values below 16 in magnitude.
  EXPECT_LT(max_err, 16 * 16 * std::ldexp(1.0, -24));
}

TEST(TensorAdd, InPlaceDoubles) {
  Tensor t = Tensor::empty({3, 9}, DType::kFloat64);
  testing::fill_test_data(t.view(), 5, 5);
  const auto v = testing::to_double_vector(t.view());
  ops::tensor_add(t.view(), t.view());
  for (int64_t i = 0; i < t.numel(); ++i) EXPECT_EQ(t.data_as<double>()[i], 2 * v[i]) << i;
}

TEST(TensorCopy, InPlaceIsANoOp) {
  Tensor t = Tensor::empty({5, 6}, DType::kBFloat16);
  testing::fill_test_data(t.view(), 6, 6);
  const auto before = bytes_of(t);
  ops::tensor_copy(t.view(), t.view());
  EXPECT_EQ(bytes_of(t), before);
}

TEST(TensorZero, ZeroesOnlyTheViewForEveryDtypeAndLayout) {
  uint64_t seed = 5000;
  for (const auto& shape : kShapes)
    for (DType dt : {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16,
                     DType::kInt32, DType::kUInt8})
      for (Kind k : kKinds) {
        const std::string what = label(shape, dt, dt, k, k);
        Strided t = make(shape, dt, k, seed++);
        const auto before = bytes_of(t.backing);
        ops::tensor_zero(t.view);
        const size_t es = dtype_size(dt);
        const char zeros[8] = {};
        int64_t wrong = 0;
        for (int64_t o : offsets(t.view))
          if (std::memcmp(static_cast<const char*>(t.view.data) + o * es, zeros, es)) ++wrong;
        EXPECT_EQ(wrong, 0) << what;
        expect_outside_untouched(t, before, what);
      }
}

TEST(TensorFill, FillsNegativeInfinityAndValuesRoundedLikeAStore) {
  uint64_t seed = 7000;
  const double values[] = {-std::numeric_limits<double>::infinity(), 0.1, -3.0};
  for (const auto& shape : kShapes)
    for (DType dt : kFloats)
      for (Kind k : kKinds)
        for (double v : values) {
          const std::string what = label(shape, dt, dt, k, k) + " value " + std::to_string(v);
          Strided t = make(shape, dt, k, seed++);
          const auto before = bytes_of(t.backing);
          ops::tensor_fill(t.view, v);
          char want[8];
          store(want, dt, v);
          const size_t es = dtype_size(dt);
          int64_t wrong = 0;
          for (int64_t o : offsets(t.view))
            if (std::memcmp(static_cast<const char*>(t.view.data) + o * es, want, es)) ++wrong;
          EXPECT_EQ(wrong, 0) << what;
          expect_outside_untouched(t, before, what);
        }
}

// Large enough for the OpenMP split, once with many rows and once with a few long rows.
TEST(TensorCopy, ParallelPathsMatchNaiveLoop) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{600, 2, 130}, std::vector<int64_t>{2, 70001}}) {
    for (DType st : {DType::kFloat32, DType::kBFloat16}) {
      Strided dst = make(shape, DType::kFloat32, Kind::kSliced, 1);
      Strided src = make(shape, st, Kind::kPermuted, 2);
      const auto before = bytes_of(dst.backing);
      ops::tensor_copy(dst.view, src.view);
      const auto od = offsets(dst.view), os = offsets(src.view);
      int64_t wrong = 0;
      for (size_t i = 0; i < od.size(); ++i)
        if (dst.view.data_as<float>()[od[i]] !=
            static_cast<float>(
                load(static_cast<const char*>(src.view.data) + os[i] * dtype_size(st), st)))
          ++wrong;
      EXPECT_EQ(wrong, 0) << label(shape, DType::kFloat32, st, Kind::kSliced, Kind::kPermuted);
      expect_outside_untouched(dst, before, "parallel copy");
      // And the add of the same pair: dst becomes 2 * src.
      ops::tensor_add(dst.view, src.view);
      wrong = 0;
      for (size_t i = 0; i < od.size(); ++i)
        if (dst.view.data_as<float>()[od[i]] !=
            2.0f * static_cast<float>(
                       load(static_cast<const char*>(src.view.data) + os[i] * dtype_size(st), st)))
          ++wrong;
      EXPECT_EQ(wrong, 0) << "parallel add";
      ops::tensor_zero(dst.view);
      for (int64_t o : od) ASSERT_EQ(dst.view.data_as<float>()[o], 0.0f);
      expect_outside_untouched(dst, before, "parallel zero");
    }
  }
  omp_set_num_threads(saved);
}

TEST(Elementwise, EmptyTensorsAreNoOpsEvenWithoutData) {
  const int64_t shape[] = {3, 0, 4};
  TensorView a(nullptr, DType::kFloat32, Device::cpu(), shape);
  TensorView b(nullptr, DType::kBFloat16, Device::cpu(), shape);
  EXPECT_NO_THROW(ops::tensor_copy(a, b));
  EXPECT_NO_THROW(ops::tensor_add(a, b));
  EXPECT_NO_THROW(ops::tensor_zero(a));
  EXPECT_NO_THROW(ops::tensor_fill(a, 1.0));
}

// The CUDA kernels' indexing (plain C++, checked here without a GPU): coalescing two random
// layouts and unravelling every linear index, on the 32-bit (multiply-high division) and the
// 64-bit path, gives the naive element offsets of both tensors.
TEST(CudaIndexing, CoalescedUnravelMatchesNaiveOffsetsOnBothIndexPaths) {
  namespace ew = kernels::cuda::elementwise;
  std::mt19937 rng(3);
  int64_t wrong = 0;
  for (int c = 0; c < 400; ++c) {
    const int nd = 1 + static_cast<int>(rng() % kMaxDims);
    std::vector<int64_t> shape(nd);
    for (auto& x : shape) x = 1 + rng() % 6;
    auto strides_for = [&](int kind) {
      std::vector<int> order(nd);
      std::iota(order.begin(), order.end(), 0);
      if (kind == 1) std::shuffle(order.begin(), order.end(), rng);
      const int64_t pad = kind == 2 ? rng() % 3 : 0;
      std::vector<int64_t> st(nd);
      int64_t acc = 1;
      for (int k = nd - 1; k >= 0; --k) {
        st[order[k]] = acc;
        acc *= shape[order[k]] + pad;
      }
      return st;
    };
    const auto sa = strides_for(static_cast<int>(rng() % 3));
    const auto sb = strides_for(static_cast<int>(rng() % 3));
    const TensorView a(nullptr, DType::kFloat32, Device::cpu(), shape, sa);
    const TensorView b(nullptr, DType::kFloat32, Device::cpu(), shape, sb);
    const ew::Layout l = ew::coalesce(a, b);
    ASSERT_EQ(l.numel, a.numel());
    const auto oa = offsets(a), ob = offsets(b);
    for (int64_t i = 0; i < l.numel; ++i) {
      int64_t x32, y32, x64, y64;
      ew::unravel<uint32_t>(l, static_cast<uint32_t>(i), x32, y32);
      ew::unravel<uint64_t>(l, static_cast<uint64_t>(i), x64, y64);
      const size_t k = static_cast<size_t>(i);
      wrong += (x32 != oa[k]) + (y32 != ob[k]) + (x64 != oa[k]) + (y64 != ob[k]);
    }
  }
  EXPECT_EQ(wrong, 0);
}

// The multiply-high division is exact at the ends of its range (numerators and divisors
// below 2^31), near powers of two, and for random pairs.
TEST(CudaIndexing, MultiplyHighDivisionIsExact) {
  namespace ew = kernels::cuda::elementwise;
  std::mt19937_64 rng(5);
  const uint32_t nmax = 0x7fffffffu;
  std::vector<uint32_t> divisors = {1, 2, 3, 7, 641, 65537, nmax, nmax - 1, 0x40000001u};
  for (int s = 1; s < 31; ++s)
    for (int e = -1; e <= 1; ++e) divisors.push_back(static_cast<uint32_t>((1u << s) + e));
  for (int k = 0; k < 2000; ++k) divisors.push_back(1 + static_cast<uint32_t>(rng() % nmax));
  int64_t wrong = 0;
  for (uint32_t d : divisors) {
    ew::Layout l{};
    l.nd = 1;
    l.shape[0] = d;
    ew::set_divider(l, 0);
    auto check = [&](uint32_t n) {
      wrong += ((ew::umulhi32(n, l.magic[0]) + n) >> l.shift[0]) != n / d;
    };
    for (uint32_t n : {0u, 1u, d - 1, d, nmax, nmax - 1, nmax - nmax % d, nmax - nmax % d - 1})
      check(n);
    for (int k = 0; k < 200; ++k) check(static_cast<uint32_t>(rng() % (uint64_t{nmax} + 1)));
  }
  EXPECT_EQ(wrong, 0);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Elementwise, RejectsBadArgumentsWithMessagesThatSayWhatToChange) {
  Tensor a = Tensor::zeros({2, 3}, DType::kFloat32);
  Tensor b = Tensor::zeros({3, 2}, DType::kFloat32);
  Tensor h = Tensor::zeros({2, 3}, DType::kFloat16);
  Tensor i = Tensor::zeros({2, 3}, DType::kInt32);

  std::string m = error_of([&] { ops::tensor_copy(a.view(), b.view()); });
  EXPECT_NE(m.find("[2, 3]"), std::string::npos) << m;
  EXPECT_NE(m.find("[3, 2]"), std::string::npos) << m;
  EXPECT_NE(m.find("same shape"), std::string::npos) << m;

  m = error_of([&] { ops::tensor_add(a.view(), b.view()); });
  EXPECT_NE(m.find("[3, 2]"), std::string::npos) << m;

  m = error_of([&] { ops::tensor_copy(a.view(), i.view()); });
  EXPECT_NE(m.find("int32"), std::string::npos) << m;
  EXPECT_NE(m.find("fp32, fp64, bf16 and fp16"), std::string::npos) << m;

  m = error_of([&] { ops::tensor_add(h.view(), a.view()); });
  EXPECT_NE(m.find("fp16"), std::string::npos) << m;
  EXPECT_NE(m.find("must be fp32 or fp64"), std::string::npos) << m;

  m = error_of([&] { ops::tensor_fill(i.view(), 1.0); });
  EXPECT_NE(m.find("int32"), std::string::npos) << m;

  // A (fake) CUDA view: rejected by validation before any device work, whatever the build.
  TensorView g = a.view();
  g.device = Device::cuda(0);
  m = error_of([&] { ops::tensor_add(a.view(), g); });
  EXPECT_NE(m.find("cuda:0"), std::string::npos) << m;
  EXPECT_NE(m.find("one device"), std::string::npos) << m;
  TensorView g1 = a.view();
  g1.device = Device::cuda(1);
  if (built_with_cuda()) {
    m = error_of([&] { ops::tensor_copy(g1, g); });
    EXPECT_NE(m.find("cuda:1"), std::string::npos) << m;
    EXPECT_NE(m.find("two GPUs"), std::string::npos) << m;
  } else {
    m = error_of([&] { ops::tensor_copy(a.view(), g); });
    EXPECT_NE(m.find("-DDISTATTN_CUDA=ON"), std::string::npos) << m;
    m = error_of([&] { ops::tensor_zero(g); });
    EXPECT_NE(m.find("-DDISTATTN_CUDA=ON"), std::string::npos) << m;
  }

  TensorView neg = a.view();
  neg.strides[1] = -1;
  m = error_of([&] { ops::tensor_zero(neg); });
  EXPECT_NE(m.find("negative stride"), std::string::npos) << m;

  TensorView null = a.view();
  null.data = nullptr;
  m = error_of([&] { ops::tensor_copy(null, a.view()); });
  EXPECT_NE(m.find("null data pointer"), std::string::npos) << m;
}

}  // namespace
}  // namespace distattn
