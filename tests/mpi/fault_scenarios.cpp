// Workloads for the fault-injection tests (tests/fault_injection.sh sets DISTATTN_FAULT and
// checks how the job ends). Each scenario checks every result; a rank prints
// "scenario <name> OK on rank <r>" when all of its results matched, and any distattn::Error
// is printed as "rank <r> caught Error(<status>): <message>" before the rank exits 1 through
// runtime_finalize (which ends the job with MPI_Abort when a peer is gone or stuck).
//   fault_scenarios collectives [rounds]   all_reduce, all_gather, reduce_scatter, all_to_all,
//                                          broadcast, barrier on the world, `rounds` times
//   fault_scenarios sendrecv [rounds [count]]  batched send/recv of `count` fp32 (default
//                                          65536) to both ring neighbours
//   fault_scenarios sp STRATEGY            one sp forward + backward vs the fp64 reference
//   fault_scenarios nccl [rounds]          all_reduce of device buffers over the NCCL backend
//                                          (one GPU per rank; exit 77 "skipped: no GPU" else)
// Not a gtest binary: a fault ends the process in ways gtest cannot report.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/runtime.h"
#include "kernels/cpu/reference.h"

namespace {

using namespace distattn;
using comm::Communicator;

// Small integers: exact in fp32 after summation over a few ranks.
float value(int rank, size_t i) {
  return static_cast<float>(static_cast<int>((i * 7 + static_cast<size_t>(rank) * 13) % 17) - 8);
}

// Buffers an aborted op may still write after the scenario unwound: MPI owns abandoned
// requests' buffers until they complete, so they are never freed (a global keeps them
// reachable for LeakSanitizer).
std::vector<std::vector<float>*>& kept() {
  static auto* v = new std::vector<std::vector<float>*>;
  return *v;
}
std::vector<float>& buffer(size_t n) {
  kept().push_back(new std::vector<float>(n));
  return *kept().back();
}

void expect(bool ok, const std::string& what) {
  if (!ok) DISTATTN_THROW(Status::kInternal, "wrong result: ", what);
}

void collectives(Communicator& w, int rounds) {
  const int n = w.size(), me = w.rank();
  const size_t c = 4096;  // elements per rank block
  std::vector<float>& send = buffer(c * n);
  std::vector<float>& recv = buffer(c * n);
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < c; ++i) send[i] = value(me, i);
    w.all_reduce(send.data(), recv.data(), c, DType::kFloat32, comm::ReduceOp::kSum);
    for (size_t i = 0; i < c; ++i) {
      float want = 0;
      for (int r = 0; r < n; ++r) want += value(r, i);
      expect(recv[i] == want, "all_reduce element " + std::to_string(i));
    }
    w.all_gather(send.data(), recv.data(), c, DType::kFloat32);
    for (size_t i = 0; i < c * n; ++i)
      expect(recv[i] == value(static_cast<int>(i / c), i % c), "all_gather");
    for (size_t i = 0; i < c * n; ++i) send[i] = value(me, i);
    w.reduce_scatter(send.data(), recv.data(), c, DType::kFloat32, comm::ReduceOp::kSum);
    for (size_t i = 0; i < c; ++i) {
      float want = 0;
      for (int r = 0; r < n; ++r) want += value(r, static_cast<size_t>(me) * c + i);
      expect(recv[i] == want, "reduce_scatter");
    }
    w.all_to_all(send.data(), recv.data(), c, DType::kFloat32);
    for (size_t i = 0; i < c * n; ++i)
      expect(recv[i] == value(static_cast<int>(i / c), static_cast<size_t>(me) * c + i % c),
             "all_to_all");
    const int root = round % n;
    w.broadcast(send.data(), recv.data(), c, DType::kFloat32, root);
    for (size_t i = 0; i < c; ++i) expect(recv[i] == value(root, i), "broadcast");
    w.barrier();
  }
}

void sendrecv(Communicator& w, int rounds, size_t c) {
  const int n = w.size(), me = w.rank();
  const int next = (me + 1) % n, prev = (me - 1 + n) % n;
  std::vector<float>& a = buffer(c);
  std::vector<float>& b = buffer(c);
  std::vector<float>& from_prev = buffer(c);
  std::vector<float>& from_next = buffer(c);
  for (size_t i = 0; i < c; ++i) {
    a[i] = value(me, i);
    b[i] = value(me + 100, i);
  }
  for (int round = 0; round < rounds; ++round) {
    const comm::P2POp ops[4] = {comm::P2POp::send(a.data(), c, DType::kFloat32, next),
                                comm::P2POp::send(b.data(), c, DType::kFloat32, prev),
                                comm::P2POp::recv(from_prev.data(), c, DType::kFloat32, prev),
                                comm::P2POp::recv(from_next.data(), c, DType::kFloat32, next)};
    w.group(ops);
    for (size_t i = 0; i < c; ++i) {
      expect(from_prev[i] == value(prev, i), "send_recv from the previous rank");
      expect(from_next[i] == value(next + 100, i), "send_recv from the next rank");
    }
  }
}

// NCCL backend: all_reduce of a device buffer, `rounds` times, checked on the host.
void nccl(int rounds) {
  const int world = runtime_info().size;
  if (!built_with_cuda() || cuda_device_count() < world) {
    std::printf("skipped: no GPU (the nccl scenario needs one GPU per rank)\n");
    runtime_finalize();
    std::exit(77);
  }
  std::unique_ptr<Communicator> w = comm::create_world(comm::Backend::kNccl, runtime_info().device);
  const int n = w->size(), me = w->rank();
  const size_t c = 1 << 16;
  std::vector<float>& host = buffer(c);
  const Device dev = runtime_info().device;
  void* d = device_alloc(c * sizeof(float), dev);  // never freed: an aborted op may write it
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < c; ++i) host[i] = value(me, i);
    device_copy(d, dev, host.data(), Device::cpu(), c * sizeof(float));
    w->all_reduce(d, d, c, DType::kFloat32, comm::ReduceOp::kSum);
    device_copy(host.data(), Device::cpu(), d, dev, c * sizeof(float));
    for (size_t i = 0; i < c; ++i) {
      float want = 0;
      for (int r = 0; r < n; ++r) want += value(r, i);
      expect(host[i] == want, "nccl all_reduce element " + std::to_string(i));
    }
  }
  (void)w.release();  // an aborted NCCL communicator is not destroyed under a pending kernel
}

double max_rel_err(const std::vector<double>& got, const Tensor& ref) {
  const auto st = testing::compare(
      got, std::vector<double>(ref.data_as<double>(), ref.data_as<double>() + ref.numel()));
  return st.non_finite > 0 ? INFINITY : st.rel();
}

std::vector<double> rebuild(Communicator& w, const parallel::SpLayout& layout,
                            const parallel::SpShape& sh, int rank, parallel::ShardRole role,
                            const TensorView& local, std::initializer_list<int64_t> shape) {
  Tensor full = Tensor::zeros(shape, DType::kFloat64);
  Tensor local64 =
      Tensor::empty(std::span<const int64_t>(local.shape.data(), local.ndim), DType::kFloat64);
  convert_dtype_cpu(local, local64.view());
  parallel::unshard_into(layout, sh, rank, role, local64.view(), full.view(), true);
  w.all_reduce(full.data(), full.data(), static_cast<size_t>(full.numel()), DType::kFloat64,
               comm::ReduceOp::kSum);
  return std::vector<double>(full.data_as<double>(), full.data_as<double>() + full.numel());
}

void sp(const std::shared_ptr<Communicator>& w, const std::string& name) {
  using namespace parallel;
  const Strategy s = parse_strategy(name);
  const int p = w->size();
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  if (s == Strategy::kHybrid) {
    const int u = p % 2 == 0 ? 2 : 1;
    mesh = std::make_unique<comm::DeviceMesh>(
        w, comm::DeviceMesh::Axes{{"ring", p / u}, {"ulysses", u}});
    group = SpGroup::from_mesh(*mesh);
  } else {
    group = SpGroup::flat(*w);
  }
  const SpLayout layout = group.layout(s);
  const int lr = group.layout_rank(s);
  SpShape sh;
  sh.batch = 1;
  sh.seq = 16 * p;
  sh.heads_q = 4;
  sh.heads_kv = 2;
  sh.head_dim = 16;
  check_layout(layout, sh);
  const int64_t b = sh.batch, sq = sh.seq, d = sh.head_dim;
  Tensor q = Tensor::empty({b, sq, sh.heads_q, d}, DType::kFloat32);
  Tensor k = Tensor::empty({b, sq, sh.heads_kv, d}, DType::kFloat32);
  Tensor v = Tensor::empty({b, sq, sh.heads_kv, d}, DType::kFloat32);
  Tensor dout = Tensor::empty({b, sq, sh.heads_q, d}, DType::kFloat32);
  testing::fill_test_data(q.view(), 3, 1);
  testing::fill_test_data(k.view(), 3, 2);
  testing::fill_test_data(v.view(), 3, 3);
  testing::fill_test_data(dout.view(), 3, 4);
  ops::AttentionOptions ro;
  ro.causal = true;
  const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), ro);
  const auto rb =
      kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), ro);
  Tensor ql = shard(layout, sh, lr, ShardRole::kQuery, q.view());
  Tensor kl = shard(layout, sh, lr, ShardRole::kKeyValue, k.view());
  Tensor vl = shard(layout, sh, lr, ShardRole::kKeyValue, v.view());
  Tensor dol = shard(layout, sh, lr, ShardRole::kQuery, dout.view());
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
  Tensor out = Tensor::empty({b, sl, hl, d}, DType::kFloat32);
  Tensor lse = Tensor::empty({b, hl, sl}, DType::kFloat32);
  Tensor dq = Tensor::empty({b, sl, hl, d}, DType::kFloat32);
  Tensor dk = Tensor::empty({b, sl, hkl, d}, DType::kFloat32);
  Tensor dv = Tensor::empty({b, sl, hkl, d}, DType::kFloat32);
  SpOptions o;
  o.causal = true;
  o.heads_q = sh.heads_q;
  o.heads_kv = sh.heads_kv;
  sp_attention_forward(s, group, ql.view(), kl.view(), vl.view(), out.view(), lse.view(), o);
  sp_attention_backward(s, group, ql.view(), kl.view(), vl.view(), out.view(), dol.view(),
                        lse.view(), dq.view(), dk.view(), dv.view(), o);
  const struct {
    const char* name;
    ShardRole role;
    const Tensor* local;
    const Tensor* ref;
    std::initializer_list<int64_t> shape;
    double tol;
  } checks[] = {
      {"out", ShardRole::kQuery, &out, &ref.out, {b, sq, sh.heads_q, d}, 1e-5},
      {"lse", ShardRole::kLse, &lse, &ref.lse, {b, sh.heads_q, sq}, 1e-5},
      {"dq", ShardRole::kQuery, &dq, &rb.dq, {b, sq, sh.heads_q, d}, 2e-5},
      {"dk", ShardRole::kKeyValue, &dk, &rb.dk, {b, sq, sh.heads_kv, d}, 2e-5},
      {"dv", ShardRole::kKeyValue, &dv, &rb.dv, {b, sq, sh.heads_kv, d}, 2e-5},
  };
  for (const auto& c : checks) {
    const double err =
        max_rel_err(rebuild(*w, layout, sh, lr, c.role, c.local->view(), c.shape), *c.ref);
    expect(err <= c.tol, std::string(c.name) + " of " + name + ": relative error " +
                             std::to_string(err) + " above " + std::to_string(c.tol));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const RuntimeInfo& info = runtime_init(&argc, &argv, {.use_gpu = true});
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--tag=", 6) != 0) args.emplace_back(argv[i]);  // for pgrep
  int rc = 0;
  try {
    if (args.empty()) DISTATTN_THROW(Status::kInvalidArgument, "usage: fault_scenarios SCENARIO");
    std::shared_ptr<Communicator> w = comm::create_world(comm::Backend::kMpi, Device::cpu());
    const std::string& what = args[0];
    const int rounds = args.size() > 1 && what != "sp" ? std::atoi(args[1].c_str()) : 3;
    if (what == "collectives")
      collectives(*w, rounds);
    else if (what == "sendrecv")
      sendrecv(*w, rounds, args.size() > 2 ? std::strtoul(args[2].c_str(), nullptr, 10) : 65536);
    else if (what == "sp" && args.size() > 1)
      sp(w, args[1]);
    else if (what == "nccl")
      nccl(rounds);
    else
      DISTATTN_THROW(
          Status::kInvalidArgument, "unknown scenario '", what,
          "' (collectives [rounds], sendrecv [rounds [count]], sp STRATEGY, nccl [rounds])");
    std::printf("scenario %s OK on rank %d\n", what.c_str(), info.rank);
    std::fflush(stdout);
  } catch (const Error& e) {
    std::fprintf(stderr, "rank %d caught Error(%s): %s\n", info.rank, status_name(e.status()),
                 e.what());
    std::fflush(stderr);
    rc = 1;
  }
  runtime_finalize();
  return rc;
}
