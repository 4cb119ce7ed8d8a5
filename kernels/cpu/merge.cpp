// LSE merge of two attention partials over disjoint key sets (the one merge primitive of
// DESIGN.md): lse = m + log(e^(a-m) + e^(b-m)), out = e^(a-lse) out_a + e^(b-lse) out_b.
// A side whose lse is -inf contributes nothing (its out is never read, so garbage or NaN
// there cannot leak); both -inf gives out = 0, lse = -inf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "distattn/core/half.h"
#include "kernels/cpu/attention_cpu.h"

namespace distattn::kernels::cpu {

void merge(const TensorView& out_a, const TensorView& lse_a, const TensorView& out_b,
           const TensorView& lse_b, const TensorView& out, const TensorView& lse) {
  const int64_t B = out.size(0), Sq = out.size(1), H = out.size(2), Dv = out.size(3);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto lse_at = [](const TensorView& t, int64_t b, int64_t h, int64_t i) -> float* {
    return t.data_as<float>() + b * t.stride(0) + h * t.stride(1) + i * t.stride(2);
  };
  auto row_at = [](const TensorView& t, int64_t b, int64_t i, int64_t h) -> float* {
    return t.data_as<float>() + b * t.stride(0) + i * t.stride(1) + h * t.stride(2);
  };
  // Each (b, i, h) row reads both inputs before writing, so out may alias out_a or out_b.
#pragma omp parallel for collapse(2) schedule(static) if (B * Sq * H * Dv > (1 << 15))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const float la = *lse_at(lse_a, b, h, i);
        const float lb = *lse_at(lse_b, b, h, i);
        const float* oa = row_at(out_a, b, i, h);
        const float* ob = row_at(out_b, b, i, h);
        float* o = row_at(out, b, i, h);
        if (std::isnan(la) || std::isnan(lb)) {  // a broken input stays visible
          const float nan = std::numeric_limits<float>::quiet_NaN();
          for (int64_t e = 0; e < Dv; ++e) o[e] = nan;
          *lse_at(lse, b, h, i) = nan;
          continue;
        }
        const float m = std::max(la, lb);
        if (m == neg_inf) {
          for (int64_t e = 0; e < Dv; ++e) o[e] = 0.0f;
          *lse_at(lse, b, h, i) = neg_inf;
          continue;
        }
        const float ea = la == neg_inf ? 0.0f : std::exp(la - m);
        const float eb = lb == neg_inf ? 0.0f : std::exp(lb - m);
        const float sum = ea + eb;
        const float wa = ea / sum, wb = eb / sum;
        if (wa == 0.0f) {
          for (int64_t e = 0; e < Dv; ++e) o[e] = wb * ob[e];
        } else if (wb == 0.0f) {
          for (int64_t e = 0; e < Dv; ++e) o[e] = wa * oa[e];
        } else {
          for (int64_t e = 0; e < Dv; ++e) o[e] = wa * oa[e] + wb * ob[e];
        }
        *lse_at(lse, b, h, i) = m + std::log(sum);
      }
}

namespace {
// Float of any storage dtype at element e of a BSHD row.
float load(const TensorView& t, const char* row, int64_t e) {
  switch (t.dtype) {
    case DType::kFloat32:
      return reinterpret_cast<const float*>(row)[e];
    case DType::kBFloat16:
      return bf16_t::to_float(reinterpret_cast<const uint16_t*>(row)[e]);
    case DType::kFloat16:
      return fp16_t::to_float(reinterpret_cast<const uint16_t*>(row)[e]);
    default:
      return static_cast<float>(reinterpret_cast<const double*>(row)[e]);
  }
}
const char* row_ptr(const TensorView& t, int64_t b, int64_t i, int64_t h) {
  return static_cast<const char*>(t.data) + (b * t.stride(0) + i * t.stride(1) + h * t.stride(2)) *
                                                static_cast<int64_t>(t.element_size());
}
}  // namespace

void apply_sinks(const TensorView& out, const TensorView& lse, const TensorView& sinks) {
  const int64_t B = out.size(0), Sq = out.size(1), H = out.size(2), Dv = out.size(3);
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for collapse(2) schedule(static) if (B * Sq * H * Dv > (1 << 15))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const float s = sinks.data_as<const float>()[h * sinks.stride(0)];
        float* l = lse.data_as<float>() + b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2);
        float* o = out.data_as<float>() + b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
        if (*l == neg_inf) {  // no visible key: only the sink is left
          for (int64_t e = 0; e < Dv; ++e) o[e] = 0.0f;
          *l = s;
          continue;
        }
        const float m = std::max(*l, s);
        const float nl = m + std::log(std::exp(*l - m) + std::exp(s - m));
        const float w = std::exp(*l - nl);
        for (int64_t e = 0; e < Dv; ++e) o[e] *= w;
        *l = nl;
      }
}

void sinks_backward(const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& sinks, const TensorView& dsinks, bool accumulate) {
  const int64_t B = out.size(0), Sq = out.size(1), H = out.size(2), Dv = out.size(3);
  for (int64_t h = 0; h < H; ++h) {
    const double s = sinks.data_as<const float>()[h * sinks.stride(0)];
    double acc = 0;
#pragma omp parallel for collapse(2) reduction(+ : acc) schedule(static) if (B * Sq * Dv > (1 << 15))
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sq; ++i) {
        const double l =
            lse.data_as<const float>()[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)];
        const char* o = row_ptr(out, b, i, h);
        const char* d = row_ptr(dout, b, i, h);
        double dot = 0;
        for (int64_t e = 0; e < Dv; ++e)
          dot += static_cast<double>(load(out, o, e)) * static_cast<double>(load(dout, d, e));
        if (dot != 0) acc += std::exp(s - l) * dot;
      }
    float* ds = dsinks.data_as<float>() + h * dsinks.stride(0);
    *ds = static_cast<float>((accumulate ? *ds : 0.0) - acc);
  }
}

}  // namespace distattn::kernels::cpu
