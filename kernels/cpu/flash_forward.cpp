// kernels::cpu::flash_forward: parameter setup, instruction-set choice, and the portable
// instantiation of the tiled online-softmax forward (flash_impl.h).
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "distattn/config.h"
#if DISTATTN_WITH_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/flash_impl.h"

namespace distattn::kernels::cpu {

namespace {

std::atomic<int> g_forced_isa{static_cast<int>(CpuKernelIsa::kAuto)};

CpuKernelIsa env_isa() {
  static const CpuKernelIsa isa = [] {
    const char* e = std::getenv("DISTATTN_CPU_KERNEL");
    const std::string s = e != nullptr ? e : "";
    if (s.empty() || s == "auto") return CpuKernelIsa::kAuto;
    if (s == "portable") return CpuKernelIsa::kPortable;
    if (s == "avx2") return CpuKernelIsa::kAvx2;
    if (s == "avx512") return CpuKernelIsa::kAvx512;
    if (s == "avx512bf16") return CpuKernelIsa::kAvx512Bf16;
    if (s == "amx") return CpuKernelIsa::kAmx;
    DISTATTN_THROW(Status::kInvalidArgument, "DISTATTN_CPU_KERNEL='", s,
                   "' is not understood: use auto, portable, avx2, avx512, avx512bf16 or amx");
  }();
  return isa;
}

FlashOperand operand(const TensorView& t) {
  FlashOperand op;
  op.data = t.data;
  op.dtype = t.dtype;
  op.sb = t.stride(0);
  op.ss = t.stride(1);
  op.sh = t.stride(2);
  return op;
}

FlashOperand lse_operand(const TensorView& t) {
  FlashOperand op;
  op.data = t.data;
  op.dtype = t.dtype;
  op.sb = t.stride(0);
  op.sh = t.stride(1);
  op.ss = t.stride(2);
  return op;
}

#if DISTATTN_WITH_AMX
// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), and Linux's permission to use the
// tile data state, asked for once per process (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16);
// refused or unknown: no AMX, the other levels run.
bool amx_tiles_usable() {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    if (((edx >> 24) & 1u) == 0 || ((edx >> 22) & 1u) == 0) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}
#endif

bool storage_dtype_ok(DType t) {
  return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16;
}

}  // namespace

bool cpu_kernel_isa_available(CpuKernelIsa isa) {
  switch (isa) {
    case CpuKernelIsa::kAuto:
    case CpuKernelIsa::kPortable:
      return true;
    case CpuKernelIsa::kAvx2:
#if DISTATTN_FLASH_AVX2
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case CpuKernelIsa::kAvx512:
#if DISTATTN_WITH_AVX512
      // Every AVX-512 CPU has FMA and F16C (clang's builtin does not know "f16c").
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case CpuKernelIsa::kAvx512Bf16:
#if DISTATTN_WITH_AVX512BF16
      return cpu_kernel_isa_available(CpuKernelIsa::kAvx512) &&
             __builtin_cpu_supports("avx512bf16");
#else
      return false;
#endif
    case CpuKernelIsa::kAmx:
#if DISTATTN_WITH_AMX
      return cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16) && amx_tiles_usable();
#else
      return false;
#endif
  }
  return false;
}

const char* cpu_kernel_isa_name(CpuKernelIsa isa) {
  switch (isa) {
    case CpuKernelIsa::kAuto:
      return "auto";
    case CpuKernelIsa::kPortable:
      return "portable";
    case CpuKernelIsa::kAvx2:
      return "avx2";
    case CpuKernelIsa::kAvx512:
      return "avx512";
    case CpuKernelIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuKernelIsa::kAmx:
      return "amx";
  }
  return "?";
}

void set_cpu_kernel_isa(CpuKernelIsa isa) {
  DISTATTN_CHECK_STATUS(cpu_kernel_isa_available(isa), Status::kUnsupported,
                        "CPU kernel instruction set '", cpu_kernel_isa_name(isa),
                        "' is not available (build without it or CPU lacks it); use "
                        "portable or auto");
  g_forced_isa.store(static_cast<int>(isa));
}

CpuKernelIsa active_cpu_kernel_isa() {
  CpuKernelIsa isa = static_cast<CpuKernelIsa>(g_forced_isa.load());
  if (isa == CpuKernelIsa::kAuto) isa = env_isa();
  if (isa == CpuKernelIsa::kAuto) {
    if (cpu_kernel_isa_available(CpuKernelIsa::kAmx)) return CpuKernelIsa::kAmx;
    if (cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16)) return CpuKernelIsa::kAvx512Bf16;
    if (cpu_kernel_isa_available(CpuKernelIsa::kAvx512)) return CpuKernelIsa::kAvx512;
    if (cpu_kernel_isa_available(CpuKernelIsa::kAvx2)) return CpuKernelIsa::kAvx2;
    return CpuKernelIsa::kPortable;
  }
  DISTATTN_CHECK_STATUS(cpu_kernel_isa_available(isa), Status::kUnsupported,
                        "DISTATTN_CPU_KERNEL=", cpu_kernel_isa_name(isa),
                        " is not available on this build/CPU; use portable or auto");
  return isa;
}

FlashForwardParams make_forward_params(const TensorView& q, const TensorView& k,
                                       const TensorView& v, const TensorView& out,
                                       const TensorView& lse, const ops::AttentionOptions& opts) {
  // The dispatch layer validated shapes; these checks guard what the tiles rely on.
  DISTATTN_CHECK(q.ndim == 4 && k.ndim == 4 && v.ndim == 4 && out.ndim == 4 && lse.ndim == 3,
                 "flash kernel: q/k/v/out must be 4-d BSHD and lse 3-d [B, H, Sq]");
  DISTATTN_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1,
                 "flash kernel: q, k, v and out need a contiguous last (head_dim) dimension");
  DISTATTN_CHECK(storage_dtype_ok(q.dtype) && k.dtype == q.dtype && v.dtype == q.dtype,
                 "flash kernel: q, k, v must share one dtype among fp32, bf16, fp16");
  DISTATTN_CHECK(out.dtype == q.dtype || out.dtype == DType::kFloat32,
                 "flash kernel: out must be q's dtype or fp32");
  DISTATTN_CHECK(lse.dtype == DType::kFloat32, "flash kernel: lse must be fp32");
  DISTATTN_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
                 "flash kernel: query heads must be a multiple of KV heads");
  FlashForwardParams p;
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.out = operand(out);
  p.lse = lse_operand(lse);
  p.batch = q.size(0);
  p.seq_q = q.size(1);
  p.heads_q = q.size(2);
  p.head_dim = q.size(3);
  p.seq_k = k.size(1);
  p.heads_kv = k.size(2);
  p.head_dim_v = v.size(3);
  p.scale = opts.scale_for(p.head_dim);
  p.causal = opts.causal;
  p.q_offset = opts.q_offset;
  p.k_offset = opts.k_offset;
  p.window_left = opts.window_left;
  p.window_right = opts.window_right;
  p.progress = opts.progress;
  p.progress_ctx = opts.progress_ctx;
  return p;
}

void flash_scratch_alloc_failed(size_t bytes) {
  DISTATTN_THROW(Status::kInternal, "CPU flash kernel: cannot allocate ", bytes,
                 " bytes of scratch memory; use smaller batch/sequence chunks or fewer threads "
                 "(OMP_NUM_THREADS)");
}

void flash_forward_portable(const FlashForwardParams& p) {
  forward_impl<PortableIsa>(p);
}

void flash_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse,
                   const ops::AttentionOptions& opts) {
  const FlashForwardParams p = make_forward_params(q, k, v, out, lse, opts);
  const CpuKernelIsa isa = active_cpu_kernel_isa();
#if DISTATTN_WITH_AMX
  if (isa == CpuKernelIsa::kAmx) {
    flash_forward_amx(p);
    return;
  }
#endif
#if DISTATTN_WITH_AVX512BF16
  if (isa == CpuKernelIsa::kAvx512Bf16) {
    flash_forward_avx512bf16(p);
    return;
  }
#endif
#if DISTATTN_WITH_AVX512
  if (is_avx512_level(isa)) {
    flash_forward_avx512(p);
    return;
  }
#endif
#if DISTATTN_FLASH_AVX2
  if (isa == CpuKernelIsa::kAvx2) {
    flash_forward_avx2(p);
    return;
  }
#endif
  flash_forward_portable(p);
}

}  // namespace distattn::kernels::cpu
