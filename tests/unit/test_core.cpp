// Core types: bf16/fp16 conversions (round to nearest even, NaN, inf, subnormals),
// TensorView slicing/strides/reshape, dtype/device parsing, Error formatting.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "distattn/core/dtype.h"
#include "distattn/core/error.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"

namespace distattn {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Reference bf16 rounding: the nearer of the two bf16 neighbours (truncation toward zero
// and one ulp away), ties to the even one; exact in double.
uint16_t bf16_reference(float f) {
  const uint32_t u = to_bits(f);
  const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
  const double dl = std::fabs(static_cast<double>(f) - from_bits(lo));
  const double dh = std::fabs(static_cast<double>(from_bits(hi)) - f);
  if (dl < dh) return static_cast<uint16_t>(lo >> 16);
  if (dh < dl) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>(((lo >> 16) & 1u) ? hi >> 16 : lo >> 16);
}

TEST(Half, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16_t::from_float(1.0f), 0x3f80);
  EXPECT_EQ(bf16_t::from_float(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie -> even
  EXPECT_EQ(bf16_t::from_float(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie -> even
  EXPECT_EQ(bf16_t::from_float(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(bf16_t::from_float(-2.0f), 0xc000);
  EXPECT_EQ(bf16_t::from_float(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(bf16_t::from_float(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bf16_t::from_float(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(bf16_t::from_float(-0.0f), 0x8000);
  const float sub = std::ldexp(1.0f, -130);  // fp32 subnormal, exact in bf16
  EXPECT_EQ(bf16_t::to_float(bf16_t::from_float(sub)), sub);
  EXPECT_TRUE(std::isnan(bf16_t::to_float(bf16_t::from_float(std::nanf("")))));
  // A NaN whose payload sits only in the low bits must not round into inf.
  EXPECT_TRUE(std::isnan(bf16_t::to_float(bf16_t::from_float(from_bits(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(bf16_t::to_float(bf16_t::from_float(from_bits(0xffffffffu)))));
}

TEST(Half, Bf16MatchesReferenceOnRandomFloatsAndRoundTripsEveryPattern) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = rng();
    const float f = from_bits(u);
    if (!std::isfinite(f) || std::fabs(f) > 1e38f) continue;
    ASSERT_EQ(bf16_t::from_float(f), bf16_reference(f)) << std::hex << u;
  }
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = bf16_t::to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(bf16_t::from_float(f), b) << std::hex << b;
  }
}

TEST(Half, Fp16RoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(fp16_t::from_float(1.0f), 0x3c00);
  EXPECT_EQ(fp16_t::from_float(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(fp16_t::from_float(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even
  EXPECT_EQ(fp16_t::from_float(65504.0f), 0x7bff);
  EXPECT_EQ(fp16_t::from_float(65519.0f), 0x7bff);
  EXPECT_EQ(fp16_t::from_float(65520.0f), 0x7c00);  // halfway to 65536 -> inf
  EXPECT_EQ(fp16_t::from_float(-1e10f), 0xfc00);
  EXPECT_EQ(fp16_t::from_float(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(fp16_t::from_float(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(fp16_t::from_float(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even (zero)
  EXPECT_EQ(fp16_t::from_float(1.5f * std::ldexp(1.0f, -25)), 0x0001);
  EXPECT_EQ(fp16_t::from_float(3 * std::ldexp(1.0f, -25)), 0x0002);  // 1.5 ulp tie -> 2
  EXPECT_EQ(fp16_t::from_float(-0.0f), 0x8000);
  EXPECT_EQ(fp16_t::to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_t::to_float(0x03ff), 1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_t::to_float(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(fp16_t::to_float(fp16_t::from_float(std::nanf("")))));
  EXPECT_TRUE(std::isnan(fp16_t::to_float(0x7e00)));
}

TEST(Half, Fp16MatchesCompilerConversionAndRoundTripsEveryPattern) {
#if defined(__FLT16_MAX__)
  std::mt19937 rng(11);
  for (int i = 0; i < 400000; ++i) {
    // Exponents around the fp16 range, where the interesting rounding happens.
    const uint32_t u = (rng() & 0x807fffffu) | ((100u + rng() % 60u) << 23);
    const float f = from_bits(u);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    ASSERT_EQ(fp16_t::from_float(f), want) << std::hex << u;
  }
#endif
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = fp16_t::to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp16_t::from_float(f), b) << std::hex << b;
  }
}

TEST(DType, NamesSizesAndParsing) {
  EXPECT_EQ(dtype_size(DType::kBFloat16), 2u);
  EXPECT_EQ(dtype_size(DType::kInt64), 8u);
  EXPECT_TRUE(dtype_is_floating(DType::kFloat16));
  EXPECT_FALSE(dtype_is_floating(DType::kUInt8));
  for (DType t : {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16,
                  DType::kInt32, DType::kInt64, DType::kUInt8})
    EXPECT_EQ(parse_dtype(dtype_name(t)), t);
  EXPECT_EQ(parse_dtype("half"), DType::kFloat16);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBFloat16);
  try {
    parse_dtype("fp8");
    ADD_FAILURE() << "fp8 parsed";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument);
    EXPECT_NE(e.message().find("supported: fp32, fp64, bf16"), std::string::npos);
  }
  EXPECT_EQ(parse_device("cuda:3"), Device::cuda(3));
  EXPECT_EQ(parse_device("cpu"), Device::cpu());
  EXPECT_EQ(Device::cuda(1).str(), "cuda:1");
  EXPECT_THROW(parse_device("cuda:x"), Error);
  EXPECT_THROW(parse_device("tpu"), Error);
}

TEST(TensorView, PackedStridesSliceAndReshape) {
  std::vector<float> data(2 * 3 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  TensorView t(data.data(), DType::kFloat32, Device::cpu(), {2, 3, 4});
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.str(), "fp32[2, 3, 4] on cpu");

  TensorView s = t.slice(1, 1, 2);  // [2, 2, 4], not packed
  EXPECT_EQ(s.shape_str(), "[2, 2, 4]");
  EXPECT_EQ(s.stride(0), 12);
  EXPECT_FALSE(s.is_contiguous());
  const int64_t idx[] = {1, 1, 3};
  EXPECT_EQ(*static_cast<float*>(s.element_ptr(idx)), 1 * 12 + 2 * 4 + 3);
  TensorView s0 = t.slice(0, 1, 1);  // outer slice stays packed
  EXPECT_TRUE(s0.is_contiguous());
  EXPECT_EQ(*s0.data_as<float>(), 12.0f);
  TensorView last = t.slice(-1, 2, 2);
  EXPECT_EQ(*last.data_as<float>(), 2.0f);

  TensorView r = t.reshape({6, 4});
  EXPECT_EQ(r.stride(0), 4);
  EXPECT_EQ(r.data, t.data);
  TensorView e = t.slice(1, 0, 0);
  EXPECT_TRUE(e.empty());
}

template <typename F>
void expect_invalid(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(TensorView, ErrorsSayWhatIsWrong) {
  std::vector<float> data(24);
  TensorView t(data.data(), DType::kFloat32, Device::cpu(), {2, 3, 4});
  expect_invalid([&] { t.slice(1, 2, 2); }, "slice [2, 4) out of range for dim 1");
  expect_invalid([&] { t.slice(3, 0, 1); }, "slice dim 3 out of range");
  expect_invalid([&] { t.reshape({5, 5}); }, "changes the element count");
  expect_invalid([&] { t.slice(1, 0, 2).reshape({16}); }, "reshape needs a contiguous tensor");
  expect_invalid(
      [&] {
        TensorView(data.data(), DType::kFloat32, Device::cpu(), {2, -1});
      },
      "negative extent -1");
  expect_invalid(
      [&] {
        TensorView(data.data(), DType::kFloat32, Device::cpu(), {1, 1, 1, 1, 1, 1, 1});
      },
      "exceeds the maximum");
  const int64_t bad[] = {0, 0};
  expect_invalid([&] { t.element_ptr(bad); }, "index has 2 dims, tensor has 3");
}

TEST(Tensor, OwnsMemoryAndConvertsDTypes) {
  Tensor a = Tensor::zeros({3, 5}, DType::kFloat32);
  EXPECT_EQ(a.view().numel(), 15);
  EXPECT_EQ(a.data_as<float>()[14], 0.0f);
  for (int i = 0; i < 15; ++i) a.data_as<float>()[i] = 0.1f * i;
  Tensor b = Tensor::empty({3, 5}, DType::kBFloat16);
  convert_dtype_cpu(a.view(), b.view());
  for (int i = 0; i < 15; ++i)
    EXPECT_EQ(b.data_as<uint16_t>()[i], bf16_t::from_float(0.1f * i)) << i;
}

TEST(Error, FormatsStatusRankLocationAndMessage) {
  const int saved = error_rank();
  set_error_rank(3);
  Error e(Status::kTimeout, "all_reduce stuck", "/some/dir/file.cpp", 42);
  EXPECT_STREQ(e.what(), "[distattn timeout rank 3 file.cpp:42] all_reduce stuck");
  EXPECT_EQ(e.message(), "all_reduce stuck");
  EXPECT_EQ(e.rank(), 3);
  EXPECT_EQ(e.status(), Status::kTimeout);
  set_error_rank(-1);
  Error plain(Status::kIoError, "cannot open x.npy");
  EXPECT_STREQ(plain.what(), "[distattn I/O error] cannot open x.npy");
  set_error_rank(saved);
  try {
    const int heads = 7;
    DISTATTN_CHECK(heads % 2 == 0, "heads (", heads, ") must be divisible by 2");
    ADD_FAILURE() << "check passed";
  } catch (const Error& err) {
    EXPECT_EQ(err.status(), Status::kInvalidArgument);
    EXPECT_EQ(err.message(), "heads (7) must be divisible by 2");
    EXPECT_NE(std::string(err.what()).find("test_core.cpp:"), std::string::npos);
  }
  EXPECT_STREQ(status_name(Status::kRemoteError), "remote error");
  const std::runtime_error& base = e;  // usable as a std::runtime_error
  EXPECT_NE(std::string(base.what()).find("stuck"), std::string::npos);
}

}  // namespace
}  // namespace distattn
