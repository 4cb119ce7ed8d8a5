// Decode-CP for a paged GQA cache and the cross-rank merge of attention partials
// (distattn/parallel/decode_cp.h). Device-neutral: only ops::* and the Communicator.
#include "distattn/parallel/decode_cp.h"

#include "distattn/ops/elementwise.h"

namespace distattn::parallel {

void merge_partials_across(comm::Communicator& cp, const TensorView& out, const TensorView& lse,
                           Stream stream) {
  DISTATTN_CHECK(out.ndim == 4 && out.is_contiguous() && out.dtype == DType::kFloat32 &&
                     lse.ndim == 3 && lse.is_contiguous() && lse.dtype == DType::kFloat32,
                 "merge_partials_across: out must be packed fp32 [B, S, H, Dv] and lse packed "
                 "fp32 [B, H, S]; got ",
                 out.str(), ", ", lse.str());
  DISTATTN_CHECK(out.size(0) == lse.size(0) && out.size(1) == lse.size(2) &&
                     out.size(2) == lse.size(1) && out.device == lse.device,
                 "merge_partials_across: out ", out.str(), " and lse ", lse.str(),
                 " do not describe the same rows");
  const int p = cp.size();
  if (p == 1) return;
  const Device dev = out.device;
  const int64_t n_out = out.numel(), n = n_out + lse.numel();
  // This rank's partial goes into its block of the gather buffer.
  Tensor gathered = Tensor::empty({p, n}, DType::kFloat32, dev);
  float* mine = gathered.data_as<float>() + cp.rank() * n;
  auto out_at = [&](float* base) {
    return TensorView(base, DType::kFloat32, dev,
                      {out.size(0), out.size(1), out.size(2), out.size(3)});
  };
  auto lse_at = [&](float* base) {
    return TensorView(base + n_out, DType::kFloat32, dev, {lse.size(0), lse.size(1), lse.size(2)});
  };
  ops::tensor_copy(out_at(mine), out, stream);
  ops::tensor_copy(lse_at(mine), lse, stream);
  cp.all_gather(mine, gathered.data(), static_cast<size_t>(n), DType::kFloat32, stream);
  // Merge in rank order (the same order on every rank: identical results everywhere).
  float* acc = gathered.data_as<float>();
  for (int r = 1; r < p; ++r) {
    float* part = gathered.data_as<float>() + r * n;
    ops::attention_merge(out_at(acc), lse_at(acc), out_at(part), lse_at(part), out_at(acc),
                         lse_at(acc), stream);
  }
  ops::tensor_copy(out, out_at(acc), stream);
  ops::tensor_copy(lse, lse_at(acc), stream);
  // `gathered` is released here; on CUDA its cudaFree waits for the copies above.
}

void paged_decode_cp_attention(comm::Communicator& cp, const TensorView& q,
                               const ops::PagedKV& cache, const TensorView& out,
                               const TensorView& lse, const ops::AttentionOptions& opts) {
  DISTATTN_CHECK(out.dtype == DType::kFloat32 && out.is_contiguous() && lse.is_contiguous(),
                 "paged_decode_cp_attention: out must be packed fp32 (the partials cross ranks "
                 "in fp32) and lse packed; got ",
                 out.str(), ", ", lse.str());
  ops::attention_decode_paged(q, cache, out, lse, opts);
  merge_partials_across(cp, out, lse, opts.stream);
}

}  // namespace distattn::parallel
