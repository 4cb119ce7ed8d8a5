#pragma once
// NumPy .npy files (format versions 1.0, 2.0 and 3.0 read; 1.0 written, 2.0 when the header
// needs it). C order only, little-endian. Supported element types (descr -> DType):
//   <f4 fp32, <f8 fp64, <f2 fp16, <i4 int32, <i8 int64, |u1 uint8.
// bf16 has no NumPy type: convert to fp32 before writing.
// Errors: Error(kIoError) for files that cannot be opened/read/written, a wrong magic, a
// malformed header or truncated data; Error(kInvalidArgument) for a valid file this code
// does not accept (big-endian or unsupported dtype, Fortran order, unexpected rank/dtype).
// Every message names the file.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "distattn/core/tensor_view.h"

namespace distattn {

struct NpyInfo {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  size_t data_offset = 0;  // bytes from the start of the file to the first element
};

// Parses and checks the header (and that the file holds all the data it declares) without
// reading the data.
NpyInfo read_npy_info(const std::string& path);

struct NpyReadOptions {
  std::optional<DType> dtype;  // required element type of the file (error otherwise)
  int rank = -1;               // required number of dimensions; -1: any
};

// Reads the whole array into a packed CPU tensor of the file's dtype and shape.
Tensor read_npy(const std::string& path, const NpyReadOptions& opts = {});

// Writes a CPU tensor (any strides; bf16 is rejected) in C order. The file is written to
// "<path>.tmp" and renamed, so a failed write never leaves a partial file at `path`.
void write_npy(const std::string& path, const TensorView& t);

}  // namespace distattn
