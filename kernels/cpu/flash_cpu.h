#pragma once
// Internal to kernels/cpu: the plain parameter blocks the flash kernels run on, the tile
// entry points of each instruction set, and the run-time choice between them.
//
// Tensors (strides in elements, last dim contiguous):
//   q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv], out/dout [B, Sq, Hq, Dv],
//   lse fp32 [B, Hq, Sq]; dq/dk/dv have q/k/v's shapes.
#include <cstddef>
#include <cstdint>

#include "distattn/config.h"
#include "distattn/core/dtype.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"

namespace distattn::kernels::cpu {

// The AVX2 units compile through `#pragma GCC target`: x86-64 GCC only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISTATTN_FLASH_AVX2 1
#else
#define DISTATTN_FLASH_AVX2 0
#endif

// kAvx512Bf16: the AVX-512 kernels plus bf16 dot-product tiles (vdpbf16ps) in the forward
// and backward when the inputs are bf16; everything else runs as kAvx512.
// kAmx: kAvx512Bf16 with the forward's and backward's bf16 GEMMs on AMX tiles (tdpbf16ps).
enum class CpuKernelIsa { kAuto, kPortable, kAvx2, kAvx512, kAvx512Bf16, kAmx };

// Forces an instruction set for the next flash_forward/flash_backward calls (tests and
// benchmarks); kAuto goes back to DISTATTN_CPU_KERNEL / CPU detection. Throws if the
// requested set is not available in this build or on this CPU.
void set_cpu_kernel_isa(CpuKernelIsa isa);
// What the next call uses. DISTATTN_CPU_KERNEL=auto|portable|avx2|avx512|avx512bf16|amx is
// read once; auto takes AMX (when Linux grants the tile state), else AVX512-BF16, else
// AVX-512, else AVX2+FMA, else portable.
CpuKernelIsa active_cpu_kernel_isa();
// True for the AVX-512 levels (kAvx512, kAvx512Bf16, kAmx): the AVX-512 kernels run.
inline bool is_avx512_level(CpuKernelIsa isa) {
  return isa == CpuKernelIsa::kAvx512 || isa == CpuKernelIsa::kAvx512Bf16 ||
         isa == CpuKernelIsa::kAmx;
}
// True for the levels with the AVX512-BF16 instructions (kAvx512Bf16, kAmx).
inline bool is_avx512bf16_level(CpuKernelIsa isa) {
  return isa == CpuKernelIsa::kAvx512Bf16 || isa == CpuKernelIsa::kAmx;
}
bool cpu_kernel_isa_available(CpuKernelIsa isa);
const char* cpu_kernel_isa_name(CpuKernelIsa isa);

// One BSHD operand: base pointer, dtype and the batch/seq/head strides (elements).
// For lse ([B, H, Sq]) sh is the head stride and ss the query stride.
struct FlashOperand {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t sb = 0, ss = 0, sh = 0;
};

struct FlashForwardParams {
  FlashOperand q, k, v, out, lse;
  int64_t batch = 0, seq_q = 0, seq_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  float scale = 1.f;
  bool causal = false;
  int64_t q_offset = 0, k_offset = 0, window_left = -1, window_right = -1;
  void (*progress)(void*) = nullptr;
  void* progress_ctx = nullptr;
};

struct FlashBackwardParams : FlashForwardParams {
  FlashOperand dout, dq, dk, dv;
  bool accumulate = false;
};

FlashForwardParams make_forward_params(const TensorView& q, const TensorView& k,
                                       const TensorView& v, const TensorView& out,
                                       const TensorView& lse, const ops::AttentionOptions& opts);

// Throws the out-of-memory error for kernel scratch; defined in a portable unit so that the
// AVX-512 units instantiate no exception-building code (see flash_impl.h).
[[noreturn]] void flash_scratch_alloc_failed(size_t bytes);

void flash_forward_portable(const FlashForwardParams& p);
void flash_backward_portable(const FlashBackwardParams& p);
#if DISTATTN_FLASH_AVX2
void flash_forward_avx2(const FlashForwardParams& p);
void flash_backward_avx2(const FlashBackwardParams& p);
#endif
#if DISTATTN_WITH_AVX512
void flash_forward_avx512(const FlashForwardParams& p);
void flash_backward_avx512(const FlashBackwardParams& p);
#endif
#if DISTATTN_WITH_AVX512BF16
void flash_forward_avx512bf16(const FlashForwardParams& p);
void flash_backward_avx512bf16(const FlashBackwardParams& p);
#endif
#if DISTATTN_WITH_AMX
void flash_forward_amx(const FlashForwardParams& p);
void flash_backward_amx(const FlashBackwardParams& p);
#endif

// Streaming decode tiles (decode_stream_avx512.h): queries of a KV group together against a
// key range that every query sees in full (no mask is applied), Sq * (Hq / Hkv) <=
// kDecodeStreamMaxRows, fp32 out and lse. The AVX-512 levels only.
constexpr int64_t kDecodeStreamMaxRows = 16;
#if DISTATTN_WITH_AVX512
void decode_stream_avx512(const FlashForwardParams& p);
#endif
#if DISTATTN_WITH_AVX512BF16
void decode_stream_avx512bf16(const FlashForwardParams& p);
#endif

}  // namespace distattn::kernels::cpu
