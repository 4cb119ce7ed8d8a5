// .npy reader/writer (format: numpy.lib.format). The header is a Python dict literal,
// e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with spaces to an
// aligned length and ended by '\n'; we parse just those three keys.
#include "distattn/core/npy.h"

#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

namespace distattn {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

struct DescrName {
  const char* descr;
  DType dtype;
};
// '<' little-endian, '|' not applicable (1 byte), '=' native (little-endian on our hosts).
constexpr DescrName kDescrs[] = {
    {"f4", DType::kFloat32}, {"f8", DType::kFloat64}, {"f2", DType::kFloat16},
    {"i4", DType::kInt32},   {"i8", DType::kInt64},   {"u1", DType::kUInt8},
};

std::string descr_of(DType t) {
  for (const auto& d : kDescrs)
    if (d.dtype == t) return (t == DType::kUInt8 ? "|" : "<") + std::string(d.descr);
  DISTATTN_THROW(Status::kInvalidArgument, "write_npy: dtype ", dtype_name(t),
                 " has no NumPy equivalent; convert to fp32 first");
}

[[noreturn]] void bad_header(const std::string& path, const std::string& why) {
  DISTATTN_THROW(Status::kIoError, "'", path, "' has a malformed .npy header: ", why);
}

// Value text following 'key': in the header dict.
size_t find_key(const std::string& h, const std::string& path, const char* key) {
  const std::string pattern = std::string("'") + key + "'";
  const size_t at = h.find(pattern);
  if (at == std::string::npos) bad_header(path, std::string("no '") + key + "' entry");
  size_t p = at + pattern.size();
  while (p < h.size() && std::isspace(static_cast<unsigned char>(h[p]))) ++p;
  if (p >= h.size() || h[p] != ':') bad_header(path, std::string("no ':' after '") + key + "'");
  ++p;
  while (p < h.size() && std::isspace(static_cast<unsigned char>(h[p]))) ++p;
  return p;
}

NpyInfo parse_header(const std::string& h, const std::string& path) {
  NpyInfo info;
  // descr
  size_t p = find_key(h, path, "descr");
  if (p >= h.size() || (h[p] != '\'' && h[p] != '"')) bad_header(path, "descr is not a string");
  const size_t end = h.find(h[p], p + 1);
  if (end == std::string::npos) bad_header(path, "unterminated descr string");
  const std::string descr = h.substr(p + 1, end - p - 1);
  bool found = false;
  if (descr.size() == 3 && (descr[0] == '<' || descr[0] == '|' || descr[0] == '=')) {
    for (const auto& d : kDescrs)
      if (descr.compare(1, 2, d.descr) == 0) {
        info.dtype = d.dtype;
        found = true;
      }
  }
  DISTATTN_CHECK(found, "'", path, "' holds dtype '", descr,
                 "', which is not supported (little-endian <f4, <f8, <f2, <i4, <i8, |u1); "
                 "convert it, e.g. arr.astype('<f4')");
  // fortran_order
  p = find_key(h, path, "fortran_order");
  if (h.compare(p, 4, "True") == 0) {
    DISTATTN_THROW(Status::kInvalidArgument, "'", path,
                   "' is stored in Fortran order; save a C-ordered array "
                   "(np.save(path, np.ascontiguousarray(arr)))");
  }
  if (h.compare(p, 5, "False") != 0) bad_header(path, "fortran_order is neither True nor False");
  // shape
  p = find_key(h, path, "shape");
  if (p >= h.size() || h[p] != '(') bad_header(path, "shape is not a tuple");
  const size_t close = h.find(')', p);
  if (close == std::string::npos) bad_header(path, "unterminated shape tuple");
  size_t i = p + 1;
  while (i < close) {
    while (i < close && (std::isspace(static_cast<unsigned char>(h[i])) || h[i] == ',')) ++i;
    if (i >= close) break;
    if (!std::isdigit(static_cast<unsigned char>(h[i])))
      bad_header(path, "shape entry is not a non-negative integer");
    int64_t v = 0;
    while (i < close && std::isdigit(static_cast<unsigned char>(h[i]))) {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) bad_header(path, "shape overflows");
      v = v * 10 + (h[i] - '0');
      ++i;
    }
    if (i < close && h[i] == 'L') ++i;  // Python 2 long suffix
    info.shape.push_back(v);
  }
  DISTATTN_CHECK_STATUS(info.shape.size() <= static_cast<size_t>(kMaxDims),
                        Status::kInvalidArgument, "'", path, "' has ", info.shape.size(),
                        " dimensions; at most ", kMaxDims, " are supported");
  return info;
}

uint64_t element_count(const std::vector<int64_t>& shape, const std::string& path) {
  uint64_t n = 1;
  for (int64_t s : shape) {
    if (s != 0 && n > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(s))
      bad_header(path, "element count overflows");
    n *= static_cast<uint64_t>(s);
  }
  return n;
}

// Reads the header; leaves `f` positioned at the data.
NpyInfo read_header(std::ifstream& f, const std::string& path) {
  DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "cannot open '", path, "' for reading");
  char pre[kMagicLen + 2] = {};
  f.read(pre, sizeof(pre));
  DISTATTN_CHECK_STATUS(f.gcount() == static_cast<std::streamsize>(sizeof(pre)) &&
                            std::memcmp(pre, kMagic, kMagicLen) == 0,
                        Status::kIoError, "'", path,
                        "' is not a .npy file (missing the \\x93NUMPY magic)");
  const int major = static_cast<unsigned char>(pre[kMagicLen]);
  DISTATTN_CHECK_STATUS(major >= 1 && major <= 3, Status::kIoError, "'", path,
                        "' uses .npy format version ", major, ".",
                        static_cast<int>(static_cast<unsigned char>(pre[kMagicLen + 1])),
                        "; versions 1.0 to 3.0 are supported");
  uint64_t header_len = 0;
  const int len_bytes = major == 1 ? 2 : 4;
  unsigned char lb[4] = {};
  f.read(reinterpret_cast<char*>(lb), len_bytes);
  DISTATTN_CHECK_STATUS(f.gcount() == len_bytes, Status::kIoError, "'", path,
                        "' is truncated inside the .npy header");
  for (int i = len_bytes - 1; i >= 0; --i) header_len = (header_len << 8) | lb[i];
  DISTATTN_CHECK_STATUS(header_len <= (1u << 24), Status::kIoError, "'", path,
                        "' declares an implausible header length ", header_len);
  std::string h(static_cast<size_t>(header_len), '\0');
  f.read(h.data(), static_cast<std::streamsize>(header_len));
  DISTATTN_CHECK_STATUS(f.gcount() == static_cast<std::streamsize>(header_len), Status::kIoError,
                        "'", path, "' is truncated inside the .npy header");
  NpyInfo info = parse_header(h, path);
  info.data_offset =
      kMagicLen + 2 + static_cast<size_t>(len_bytes) + static_cast<size_t>(header_len);
  // The file must hold exactly the declared data.
  std::error_code ec;
  const uintmax_t file_size = std::filesystem::file_size(path, ec);
  DISTATTN_CHECK_STATUS(!ec, Status::kIoError, "cannot stat '", path, "': ", ec.message());
  const uint64_t need = element_count(info.shape, path) * dtype_size(info.dtype);
  DISTATTN_CHECK_STATUS(file_size >= info.data_offset + need, Status::kIoError, "'", path,
                        "' is truncated: its header declares ", need, " data bytes but only ",
                        file_size - info.data_offset, " follow");
  DISTATTN_CHECK_STATUS(file_size == info.data_offset + need, Status::kIoError, "'", path, "' has ",
                        file_size - info.data_offset - need,
                        " bytes after the declared data (corrupt or not a single array)");
  return info;
}

}  // namespace

NpyInfo read_npy_info(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return read_header(f, path);
}

Tensor read_npy(const std::string& path, const NpyReadOptions& opts) {
  std::ifstream f(path, std::ios::binary);
  const NpyInfo info = read_header(f, path);
  if (opts.rank >= 0) {
    DISTATTN_CHECK(static_cast<int>(info.shape.size()) == opts.rank, "'", path, "' has ",
                   info.shape.size(), " dimensions but ", opts.rank, " are required");
  }
  if (opts.dtype.has_value()) {
    DISTATTN_CHECK(info.dtype == *opts.dtype, "'", path, "' holds ", dtype_name(info.dtype),
                   " but ", dtype_name(*opts.dtype), " is required");
  }
  Tensor t = Tensor::empty(std::span<const int64_t>(info.shape), info.dtype);
  f.read(static_cast<char*>(t.data()), static_cast<std::streamsize>(t.nbytes()));
  DISTATTN_CHECK_STATUS(f.gcount() == static_cast<std::streamsize>(t.nbytes()), Status::kIoError,
                        "reading the data of '", path, "' failed");
  return t;
}

void write_npy(const std::string& path, const TensorView& t) {
  DISTATTN_CHECK(t.device.is_cpu(), "write_npy('", path, "'): tensor ", t.str(),
                 " must be on the CPU; copy it with to_device first");
  const std::string descr = descr_of(t.dtype);
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, "write_npy('", path,
                 "'): tensor has a null data pointer");
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
  for (int d = 0; d < t.ndim; ++d)
    dict += std::to_string(t.shape[d]) + (t.ndim == 1 ? "," : d + 1 < t.ndim ? ", " : "");
  dict += "), }";
  // Pad so that magic + version + length + header is a multiple of 64 (as NumPy does).
  int major = 1;
  size_t prefix = kMagicLen + 2 + 2;
  size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  if (total - prefix > 65535) {
    major = 2;
    prefix = kMagicLen + 2 + 4;
    total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  }
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict += '\n';
  const Tensor packed = to_device(t, Device::cpu());  // C order, strides gathered
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DISTATTN_CHECK_STATUS(f.good(), Status::kIoError, "cannot open '", tmp, "' for writing");
    f.write(kMagic, kMagicLen);
    const char ver[2] = {static_cast<char>(major), 0};
    f.write(ver, 2);
    const uint64_t hl = dict.size();
    char lb[4] = {static_cast<char>(hl & 0xff), static_cast<char>((hl >> 8) & 0xff),
                  static_cast<char>((hl >> 16) & 0xff), static_cast<char>((hl >> 24) & 0xff)};
    f.write(lb, major == 1 ? 2 : 4);
    f.write(dict.data(), static_cast<std::streamsize>(dict.size()));
    f.write(static_cast<const char*>(packed.data()), static_cast<std::streamsize>(packed.nbytes()));
    f.close();
    if (!f.good()) {
      std::remove(tmp.c_str());
      DISTATTN_THROW(Status::kIoError, "writing '", tmp, "' failed (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    DISTATTN_THROW(Status::kIoError, "cannot rename '", tmp, "' to '", path, "': ", ec.message());
  }
}

}  // namespace distattn
