#pragma once
// Host-side 16-bit float storage types. Conversions round to nearest even; NaN stays NaN.
#include <cstdint>
#include <cstring>

namespace distattn {

struct bf16_t {
  uint16_t bits = 0;
  bf16_t() = default;
  explicit bf16_t(float f) : bits(from_float(f)) {}
  operator float() const { return to_float(bits); }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  static float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct fp16_t {
  uint16_t bits = 0;
  fp16_t() = default;
  explicit fp16_t(float f) : bits(from_float(f)) {}
  operator float() const { return to_float(bits); }

  static uint16_t from_float(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
    if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
    if (x < 0x38800000u) {  // subnormal or zero in fp16
      if (x < 0x33000000u) return static_cast<uint16_t>(sign);
      const uint32_t e = x >> 23;
      uint32_t m = (x & 0x7fffffu) | 0x800000u;
      const uint32_t shift = 126 - e;  // 113 - e + 13
      const uint32_t half_bit = 1u << (shift - 1);
      uint32_t r = m >> shift;
      const uint32_t rem = m & ((1u << shift) - 1);
      if (rem > half_bit || (rem == half_bit && (r & 1u))) ++r;
      return static_cast<uint16_t>(sign | r);
    }
    uint32_t r = ((x >> 13) - (112u << 10));
    const uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  static float to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
      if (m == 0) {
        u = sign;
      } else {  // subnormal: normalize
        e = 113;
        while ((m & 0x400u) == 0) {
          m <<= 1;
          --e;
        }
        m &= 0x3ffu;
        u = sign | (e << 23) | (m << 13);
      }
    } else if (e == 31) {
      u = sign | 0x7f800000u | (m << 13);
    } else {
      u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

static_assert(sizeof(bf16_t) == 2 && sizeof(fp16_t) == 2);

}  // namespace distattn
