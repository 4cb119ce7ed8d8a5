// .npy reading and writing: round trips of every supported dtype, files laid out exactly as
// NumPy writes them (v1 and v2 headers), and a clear Error naming the file for every kind of
// bad input.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include "common/test_data.h"
#include "distattn/core/npy.h"

namespace distattn::testing {
namespace {

class Npy : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("distattn_test_npy_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A file with the given raw header dict (padded like NumPy) and data bytes.
  std::string write_raw(const std::string& name, const std::string& dict, size_t data_bytes,
                        int major = 1) {
    const size_t prefix = 6 + 2 + (major == 1 ? 2 : 4);
    std::string h = dict;
    const size_t total = (prefix + h.size() + 1 + 63) / 64 * 64;
    h.append(total - prefix - h.size() - 1, ' ');
    h += '\n';
    std::string bytes = "\x93NUMPY";
    bytes += static_cast<char>(major);
    bytes += '\0';
    for (int i = 0; i < (major == 1 ? 2 : 4); ++i)
      bytes += static_cast<char>((h.size() >> (8 * i)) & 0xff);
    bytes += h;
    for (size_t i = 0; i < data_bytes; ++i) bytes += static_cast<char>(i * 7);
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }

  std::filesystem::path dir_;
};

void expect_error(const std::function<void()>& fn, Status status,
                  std::initializer_list<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected an Error containing '" << *fragments.begin() << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    for (const auto& f : fragments)
      EXPECT_NE(e.message().find(f), std::string::npos) << "missing '" << f << "' in " << e.what();
  }
}

TEST_F(Npy, RoundTripsEverySupportedDtype) {
  for (DType dt : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kInt32, DType::kInt64,
                   DType::kUInt8}) {
    Tensor t = Tensor::empty({2, 3, 5}, dt);
    fill_test_data(t, 1, static_cast<uint64_t>(dt));
    const std::string p = path(std::string("rt_") + dtype_name(dt) + ".npy");
    write_npy(p, t);
    const NpyInfo info = read_npy_info(p);
    EXPECT_EQ(info.data_offset % 64, 0u) << "header padded to 64 bytes like NumPy";
    Tensor r = read_npy(p);
    ASSERT_EQ(r.dtype(), dt);
    ASSERT_EQ(r.view().shape_str(), "[2, 3, 5]");
    EXPECT_EQ(std::memcmp(r.data(), t.data(), t.nbytes()), 0) << dtype_name(dt);
  }
}

TEST_F(Npy, WritesStridedViewsInCOrderAndScalarsAndVectors) {
  Tensor t = Tensor::empty({4, 6}, DType::kFloat32);
  for (int i = 0; i < 24; ++i) t.data_as<float>()[i] = static_cast<float>(i);
  // Columns 1..3 of every other row: shape [2, 3], strides [12, 1].
  const int64_t shape[2] = {2, 3}, strides[2] = {12, 1};
  TensorView v(t.data_as<float>() + 1, DType::kFloat32, Device::cpu(), shape, strides);
  write_npy(path("s.npy"), v);
  Tensor r = read_npy(path("s.npy"), {.dtype = DType::kFloat32, .rank = 2});
  const float want[6] = {1, 2, 3, 13, 14, 15};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(r.data_as<float>()[i], want[i]);
  Tensor vec = Tensor::zeros({7}, DType::kInt32);
  write_npy(path("v.npy"), vec);
  EXPECT_EQ(read_npy_info(path("v.npy")).shape, std::vector<int64_t>{7});
  Tensor scalar = Tensor::empty(std::span<const int64_t>(), DType::kFloat64);
  scalar.data_as<double>()[0] = 2.5;
  write_npy(path("c.npy"), scalar);
  Tensor rs = read_npy(path("c.npy"));
  EXPECT_EQ(rs.view().ndim, 0);
  EXPECT_EQ(rs.data_as<double>()[0], 2.5);
  // The header text is what NumPy itself writes for this array.
  std::ifstream f(path("v.npy"), std::ios::binary);
  std::string head(read_npy_info(path("v.npy")).data_offset, '\0');
  f.read(head.data(), static_cast<std::streamsize>(head.size()));
  EXPECT_NE(head.find("{'descr': '<i4', 'fortran_order': False, 'shape': (7,), }"),
            std::string::npos)
      << head;
  EXPECT_EQ(head.back(), '\n');
}

TEST_F(Npy, ReadsNumPyStyleV1AndV2Files) {
  const std::string p1 =
      write_raw("v1.npy", "{'descr': '<f2', 'fortran_order': False, 'shape': (3, 2), }", 12);
  EXPECT_EQ(read_npy(p1).dtype(), DType::kFloat16);
  const std::string p2 =
      write_raw("v2.npy", "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", 16, 2);
  Tensor r = read_npy(p2);
  EXPECT_EQ(r.dtype(), DType::kInt64);
  EXPECT_EQ(r.numel(), 2);
  // Key order and spacing are free in the dict.
  const std::string p3 =
      write_raw("v3.npy", "{'shape':(4,),'fortran_order':False,'descr':'|u1'}", 4);
  EXPECT_EQ(read_npy(p3).numel(), 4);
}

TEST_F(Npy, RejectsBadFilesWithClearMessages) {
  expect_error([&] { read_npy(path("missing.npy")); }, Status::kIoError,
               {"cannot open", "missing.npy"});
  std::ofstream(path("text.npy")) << "hello, this is not numpy";
  expect_error([&] { read_npy(path("text.npy")); }, Status::kIoError,
               {"text.npy", "not a .npy file"});
  const std::string be =
      write_raw("be.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8);
  expect_error([&] { read_npy(be); }, Status::kInvalidArgument, {"be.npy", "'>f4'", "astype"});
  const std::string cplx =
      write_raw("c8.npy", "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16);
  expect_error([&] { read_npy(cplx); }, Status::kInvalidArgument, {"c8.npy", "'<c8'"});
  const std::string fortran =
      write_raw("f.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16);
  expect_error([&] { read_npy(fortran); }, Status::kInvalidArgument, {"f.npy", "Fortran order"});
  const std::string trunc =
      write_raw("t.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20);
  expect_error([&] { read_npy(trunc); }, Status::kIoError,
               {"t.npy", "truncated", "24 data bytes but only 20"});
  const std::string extra =
      write_raw("x.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 12);
  expect_error([&] { read_npy(extra); }, Status::kIoError, {"x.npy", "4 bytes after"});
  const std::string noshape = write_raw("n.npy", "{'descr': '<f4', 'fortran_order': False}", 4);
  expect_error([&] { read_npy(noshape); }, Status::kIoError, {"n.npy", "no 'shape' entry"});
  const std::string ok =
      write_raw("ok.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24);
  expect_error([&] { read_npy(ok, {.rank = 4}); }, Status::kInvalidArgument,
               {"ok.npy", "2 dimensions but 4 are required"});
  expect_error([&] { read_npy(ok, {.dtype = DType::kFloat64}); }, Status::kInvalidArgument,
               {"ok.npy", "holds fp32 but fp64 is required"});
  // Truncated inside the header itself.
  std::ofstream(path("h.npy"), std::ios::binary)
      << std::string("\x93NUMPY\x01\x00\x40\x00{'de", 14);
  expect_error([&] { read_npy(path("h.npy")); }, Status::kIoError, {"h.npy", "truncated inside"});
}

TEST_F(Npy, WriteRejectsBf16AndLeavesNoPartialFile) {
  Tensor b = Tensor::zeros({3}, DType::kBFloat16);
  expect_error([&] { write_npy(path("b.npy"), b); }, Status::kInvalidArgument,
               {"bf16", "convert to fp32"});
  EXPECT_FALSE(std::filesystem::exists(path("b.npy")));
  Tensor f = Tensor::zeros({3}, DType::kFloat32);
  expect_error([&] { write_npy(path("no_such_dir/x.npy"), f); }, Status::kIoError,
               {"no_such_dir/x.npy.tmp"});
}

}  // namespace
}  // namespace distattn::testing
