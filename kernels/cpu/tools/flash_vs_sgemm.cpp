// Standalone timing of the CPU flash kernels against OpenBLAS sgemm, in one process so both
// see the same machine state. Not part of the CMake build (needs OpenBLAS); build against a
// configured build directory BUILD:
//   g++ -O2 -std=c++20 -fopenmp -I include -I BUILD/include -I . -I tests \
//       kernels/cpu/tools/flash_vs_sgemm.cpp -o flash_vs_sgemm \
//       BUILD/lib/libdistattn_test_common.a BUILD/lib/libdistattn.a -lopenblas \
//       -L/usr/lib/x86_64-linux-gnu/openmpi/lib -lmpi_cxx -lmpi
// Run (native OpenBLAS kernel):
//   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ./flash_vs_sgemm [seq] [full|causal] [dtype]
//       [iters] [heads] [head_dim]
// Prints best-of-N GFLOP/s on wall time, and the same work over process CPU time divided by
// the thread count ("cpu-normalized"): on a shared machine that second figure shows what the
// code does with the cycles it actually got. Attention FLOPs: 4*B*H*Sq*Sk*D forward (half
// when causal), backward 2.5x forward.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/core/tensor_view.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/flash_cpu.h"

using namespace distattn;

namespace {
double wall() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double cpu() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
template <class F>
void time_it(const char* name, double flops, int iters, int threads, F&& f) {
  f();  // warm-up
  double best = 1e30, best_cpu = 1e30;
  for (int i = 0; i < iters; ++i) {
    const double t0 = wall(), c0 = cpu();
    f();
    best = std::min(best, wall() - t0);
    best_cpu = std::min(best_cpu, cpu() - c0);
  }
  std::printf("%-10s %8.3f s  %7.1f GFLOP/s  (cpu-normalized %7.1f GFLOP/s, %d threads)\n", name,
              best, flops / best / 1e9, flops / (best_cpu / threads) / 1e9, threads);
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t S = argc > 1 ? std::atoll(argv[1]) : 4096;
  const bool causal = argc > 2 && std::string(argv[2]) == "causal";
  const DType dt = argc > 3 ? parse_dtype(argv[3]) : DType::kFloat32;
  const int iters = argc > 4 ? std::atoi(argv[4]) : 3;
  const int64_t H = argc > 5 ? std::atoll(argv[5]) : 16;
  const int64_t D = argc > 6 ? std::atoll(argv[6]) : 128;
  const int threads = omp_get_max_threads();

  const int n = 2048;
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b(a.size(), 0.25f), c(a.size());
  std::printf("# OpenBLAS core %s, %d threads; flash isa %s\n", openblas_get_corename(),
              openblas_get_num_threads(),
              kernels::cpu::cpu_kernel_isa_name(kernels::cpu::active_cpu_kernel_isa()));
  time_it("sgemm2048", 2.0 * n * n * n, 5, openblas_get_num_threads(), [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.f, a.data(), n, b.data(), n,
                0.f, c.data(), n);
  });

  Tensor q = Tensor::empty({1, S, H, D}, dt), k = Tensor::empty({1, S, H, D}, dt),
         v = Tensor::empty({1, S, H, D}, dt), dout = Tensor::empty({1, S, H, D}, dt);
  testing::fill_test_data(q, 1, 1);
  testing::fill_test_data(k, 1, 2);
  testing::fill_test_data(v, 1, 3);
  testing::fill_test_data(dout, 1, 4);
  Tensor out = Tensor::empty({1, S, H, D}, dt), lse = Tensor::empty({1, H, S}, DType::kFloat32);
  Tensor dq = Tensor::empty({1, S, H, D}, dt), dk = Tensor::empty({1, S, H, D}, dt),
         dv = Tensor::empty({1, S, H, D}, dt);
  ops::AttentionOptions o;
  o.causal = causal;
  const double flops = 4.0 * H * static_cast<double>(S) * S * D * (causal ? 0.5 : 1.0);
  std::printf("# attention B=1 S=%lld H=%lld D=%lld %s %s\n", static_cast<long long>(S),
              static_cast<long long>(H), static_cast<long long>(D), causal ? "causal" : "full",
              dtype_name(dt));
  time_it("forward", flops, iters, threads,
          [&] { kernels::cpu::flash_forward(q, k, v, out, lse, o); });
  time_it("backward", 2.5 * flops, iters, threads,
          [&] { kernels::cpu::flash_backward(q, k, v, out, dout, lse, dq, dk, dv, o, {}); });
  return 0;
}
