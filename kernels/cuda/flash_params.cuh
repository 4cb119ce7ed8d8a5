#pragma once
// Plain parameter structs of the CUDA attention kernels, filled on the host from validated
// TensorViews (see attention_cuda.cu). Strides are in elements.
#include <cstdint>

#include "kernels/cuda/cuda_common.cuh"

namespace distattn::kernels::cuda {

struct FwdParams {
  // q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv] (paged: k/v are page pools
  // [num_pages, page_size, Hkv, D/Dv] and the batch stride is the page stride).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // [B, Sq, Hq, Dv], dtype out_elt
  float* lse = nullptr;  // [B, Hq, Sq]
  int64_t q_s0 = 0, q_s1 = 0, q_s2 = 0;
  int64_t k_s0 = 0, k_s1 = 0, k_s2 = 0;
  int64_t v_s0 = 0, v_s1 = 0, v_s2 = 0;
  int64_t o_s0 = 0, o_s1 = 0, o_s2 = 0;
  int64_t l_s0 = 0, l_s1 = 0, l_s2 = 0;
  int B = 0, Sq = 0, Hq = 0, Hkv = 0, G = 1, D = 0, Dv = 0;
  int64_t Sk = 0;
  float scale_log2 = 0;  // softmax scale * log2(e): the kernels work in base 2
  Mask mask{false, -1, -1};
  int64_t q_offset = 0, k_offset = 0;
  Elt out_elt = Elt::kF32;
  // K and V rows are 16-byte aligned and their widths multiples of 16 bytes: the CUDA-core
  // kernel loads them 16 bytes at a time.
  bool kv_vec16 = false;

  // Split-KV: split z covers keys [z * split_keys, (z + 1) * split_keys). With
  // num_splits > 1 results go to ws_out [splits, B, Sq, Hq, Dv] and ws_lse
  // [splits, B, Hq, Sq] (packed fp32) for combine_splits.
  int num_splits = 1;
  int64_t split_keys = INT64_MAX / 4;
  float* ws_out = nullptr;
  float* ws_lse = nullptr;

  // Paged cache: key t of batch b is row t % page_size of page
  // page_table[b, t / page_size]; Sk = seq_lens[b], q_offset = Sk - Sq, k_offset = 0.
  const int32_t* page_table = nullptr;
  int64_t pt_s0 = 0, pt_s1 = 0;
  const int32_t* seq_lens = nullptr;
  int64_t sl_s0 = 0;
  int64_t page_size = 0;
};

struct BwdParams {
  FwdParams f;  // q, k, v, out (read), lse (read) and their strides, sizes, mask
  const void* dout = nullptr;
  Elt dout_elt = Elt::kF32;
  int64_t do_s0 = 0, do_s1 = 0, do_s2 = 0;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Elt dq_elt = Elt::kF32, dk_elt = Elt::kF32, dv_elt = Elt::kF32;
  int64_t dq_s0 = 0, dq_s1 = 0, dq_s2 = 0;
  int64_t dk_s0 = 0, dk_s1 = 0, dk_s2 = 0;
  int64_t dv_s0 = 0, dv_s1 = 0, dv_s2 = 0;
  float scale = 0;         // softmax scale (natural)
  float* delta = nullptr;  // [B, Hq, Sq] packed: rowsum(dout * out)
  bool accumulate = false;
};

// Element offsets of a key row (contiguous or paged).
template <bool kPaged>
__device__ __forceinline__ int64_t key_row_offset(const FwdParams& p, int b, int64_t t, int64_t s0,
                                                  int64_t s1) {
  if constexpr (kPaged) {
    const int64_t page = p.page_table[b * p.pt_s0 + (t / p.page_size) * p.pt_s1];
    return page * s0 + (t % p.page_size) * s1;
  } else {
    return b * s0 + t * s1;
  }
}

// Launchers of the tensor-core forward, one translation unit per head-dim family
// (flash_fwd_hdim*.cu); bf16 or fp16 chosen by `bf16`.
void launch_flash_fwd_mma_hdim64(const FwdParams& p, bool bf16, cudaStream_t stream);
void launch_flash_fwd_mma_hdim128(const FwdParams& p, bool bf16, cudaStream_t stream);
void launch_flash_fwd_mma_hdim192(const FwdParams& p, bool bf16, cudaStream_t stream);

// CUDA-core forward (any float dtype, D and Dv <= 256), contiguous or paged, split-KV.
void launch_flash_fwd_simt(const FwdParams& p, DType dtype, bool paged, cudaStream_t stream);
// Folds the num_splits partials of ws_out/ws_lse into out/lse.
void launch_combine_splits(const FwdParams& p, cudaStream_t stream);
// delta = rowsum(dout * out) into p.delta, then dQ, dK, dV on CUDA cores.
void launch_flash_bwd_simt(const BwdParams& p, DType dtype, cudaStream_t stream);
// delta alone (the tensor-core backward's preprocessing).
void launch_bwd_delta(const BwdParams& p, cudaStream_t stream);
// Tensor-core dK/dV and dQ (D == Dv, bf16/fp16, dout in q's dtype, 16-byte aligned rows);
// p.delta must hold delta already.
void launch_flash_bwd_mma_hdim64(const BwdParams& p, bool bf16, cudaStream_t stream);
void launch_flash_bwd_mma_hdim128(const BwdParams& p, bool bf16, cudaStream_t stream);

}  // namespace distattn::kernels::cuda
