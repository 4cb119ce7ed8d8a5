// kernels::cpu::flash_backward: parameter setup and the portable instantiation of the
// FlashAttention-2 style backward (flash_impl.h).
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_impl.h"

namespace distattn::kernels::cpu {

namespace {

FlashOperand grad_operand(const TensorView& t, const TensorView& like, const char* name) {
  DISTATTN_CHECK(t.ndim == 4 && t.stride(3) == 1, "flash backward: ", name,
                 " must be 4-d BSHD with a contiguous last dimension");
  for (int d = 0; d < 4; ++d)
    DISTATTN_CHECK(t.size(d) == like.size(d), "flash backward: ", name, " has shape ",
                   t.shape_str(), " but must match ", like.shape_str());
  DISTATTN_CHECK(t.dtype == like.dtype || t.dtype == DType::kFloat32, "flash backward: ", name,
                 " must be the input dtype or fp32");
  FlashOperand op;
  op.data = t.data;
  op.dtype = t.dtype;
  op.sb = t.stride(0);
  op.ss = t.stride(1);
  op.sh = t.stride(2);
  return op;
}

}  // namespace

void flash_backward_portable(const FlashBackwardParams& p) {
  backward_impl<PortableIsa>(p);
}

void flash_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& dout, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv,
                    const ops::AttentionOptions& opts, const ops::BackwardOptions& bopts) {
  FlashBackwardParams p;
  static_cast<FlashForwardParams&>(p) = make_forward_params(q, k, v, out, lse, opts);
  DISTATTN_CHECK(dout.ndim == 4 && dout.stride(3) == 1,
                 "flash backward: dout must be 4-d BSHD with a contiguous last dimension");
  DISTATTN_CHECK(dout.dtype == DType::kFloat32 || dout.dtype == q.dtype,
                 "flash backward: dout must be q's dtype or fp32");
  p.dout.data = dout.data;
  p.dout.dtype = dout.dtype;
  p.dout.sb = dout.stride(0);
  p.dout.ss = dout.stride(1);
  p.dout.sh = dout.stride(2);
  p.dq = grad_operand(dq, q, "dq");
  p.dk = grad_operand(dk, k, "dk");
  p.dv = grad_operand(dv, v, "dv");
  p.accumulate = bopts.accumulate;
  [[maybe_unused]] const CpuKernelIsa isa = active_cpu_kernel_isa();
#if DISTATTN_WITH_AMX
  if (isa == CpuKernelIsa::kAmx) {
    flash_backward_amx(p);
    return;
  }
#endif
#if DISTATTN_WITH_AVX512BF16
  if (isa == CpuKernelIsa::kAvx512Bf16) {
    flash_backward_avx512bf16(p);
    return;
  }
#endif
#if DISTATTN_WITH_AVX512
  if (is_avx512_level(isa)) {
    flash_backward_avx512(p);
    return;
  }
#endif
#if DISTATTN_FLASH_AVX2
  if (isa == CpuKernelIsa::kAvx2) {
    flash_backward_avx2(p);
    return;
  }
#endif
  flash_backward_portable(p);
}

}  // namespace distattn::kernels::cpu
