// libFuzzer harness: the .npy reader (distattn::read_npy_info / read_npy, src/core/npy.cpp).
// Any byte string is written to a file and read back. The reader must either throw
// distattn::Error (kIoError / kInvalidArgument) or return a tensor that agrees with its
// header: numel * element size <= file size - data offset, the bytes equal the file's; that tensor
// written with write_npy and read again must give the same dtype, shape and bytes. Never a crash,
// an out-of-bounds read (ASan) or another exception type.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "distattn/core/error.h"
#include "distattn/core/npy.h"

namespace {

const std::string& scratch_path(const char* suffix) {
  static const std::string base =
      (std::filesystem::temp_directory_path() / ("distattn_fuzz_npy_" + std::to_string(getpid())))
          .string();
  static std::string paths[2] = {base + ".in.npy", base + ".out.npy"};
  return paths[suffix[0] == 'o' ? 1 : 0];
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_npy: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace distattn;
  const std::string& in = scratch_path("in");
  {
    FILE* f = std::fopen(in.c_str(), "wb");
    if (f == nullptr) fail("cannot write the scratch file");
    if (size > 0 && std::fwrite(data, 1, size, f) != size) fail("short write");
    std::fclose(f);
  }
  NpyInfo info;
  try {
    info = read_npy_info(in);
  } catch (const Error&) {
    return 0;  // rejected with a message: fine
  }
  if (info.data_offset > size) fail("data offset beyond the end of the file");
  Tensor t;
  try {
    t = read_npy(in);
  } catch (const Error&) {
    fail("read_npy_info accepted a file that read_npy rejects");
  }
  if (t.dtype() != info.dtype) fail("dtype differs between read_npy_info and read_npy");
  if (static_cast<size_t>(t.view().ndim) != info.shape.size()) fail("rank differs");
  for (size_t i = 0; i < info.shape.size(); ++i)
    if (t.view().size(static_cast<int>(i)) != info.shape[i]) fail("shape differs");
  if (t.nbytes() > size - info.data_offset) fail("more data than the file holds");
  if (t.nbytes() > 0 && std::memcmp(t.data(), data + info.data_offset, t.nbytes()) != 0)
    fail("data differs from the file's bytes");
  // Round trip through the writer.
  const std::string& out = scratch_path("out");
  write_npy(out, t.view());
  Tensor back = read_npy(out);
  if (back.dtype() != t.dtype() || back.nbytes() != t.nbytes() || back.view().ndim != t.view().ndim)
    fail("write_npy/read_npy round trip changed dtype, rank or size");
  if (t.nbytes() > 0 && std::memcmp(back.data(), t.data(), t.nbytes()) != 0)
    fail("write_npy/read_npy round trip changed the data");
  return 0;
}
