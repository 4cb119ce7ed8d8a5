// distattn-bench sp: sequence- and head-parallel attention under mpirun.
//
// For each strategy and global sequence length (-b/-e/-f) it prints, on rank 0:
//   time_ms       max over ranks of the mean per-call time after warm-up
//   tflops        attention FLOPs of the whole problem / ranks / time (per-rank rate)
//   par_eff       parallel efficiency = T1 / (P * TP), where T1 is the mean time of the SAME
//                 full problem run by one rank alone with the same cores (measured in this run
//                 after -w warm-up runs, at least one: every rank runs it at once on its own
//                 core(s), so contention matches), TP the strategy's time. 1.0 = perfect
//                 scaling; values are in [0, 1] up to timing noise: a value above 1, or one
//                 from a call under 1 ms, is printed with a trailing "*" (noise).
//   eff_cpu       the same ratio with process CPU times (busy-polling MPI waits count as CPU):
//                 steadier than wall clock when other processes share the cores.
//   comm_MB       bytes this rank sent per call (ledger; max over ranks)
//   exposed_ms    time blocked waiting on communication (not hidden behind compute; max over
//                 ranks of the mean). --device cuda: host-blocked time only (MPI staging
//                 waits); NCCL waits happen on the device and do not show here.
//   peak_MB       peak bytes of distattn tensors allocated during the call (max over ranks)
//   max_abs_err   with -c: max |out - fp64 reference| over sampled query rows of every rank
//                 (of the first call; every later call's out, lse and gradients must equal the
//                 first call's bit for bit: JSON calls_checked, repeat_mismatches)
//   grad_err      with -c --backward: max |dq, dk, dv - fp64 reference| (dq on the sampled
//                 query rows; dk, dv on sampled key rows of one KV head per rank)
// A figure that was not measured (max_abs_err without -c, grad_err without --backward,
// par_eff with --baseline-iters 0) prints "-" (JSON null).
// --json FILE writes one row per (strategy, seq) with keys strategy, ranks, seq, time_ms, tflops,
// parallel_efficiency, comm_bytes_per_rank, exposed_comm_ms, max_abs_err (+ extra keys, among
// them max_grad_abs_err).
//
// --inputs DIR --outputs DIR: rank 0 reads q.npy, k.npy, v.npy (float32 [B, S, H, D]) and
// optionally dout.npy, cu_seqlens.npy (int32 [n_docs + 1], packed documents, B = 1) and
// sinks.npy (float32 [Hq], learned sinks), scatters them in the strategy's layout, runs,
// gathers and writes out.npy and lse.npy (and dq.npy, dk.npy, dv.npy with dout.npy, and
// dsinks.npy with sinks) in global order. --window and --sink-tokens apply.
//
// Masks: --window L,R, --sink-tokens N, --sinks, and packed documents --doc-lens a,b,c or
// --doc-dist longtail (seeded): par_eff's T1 runs the same masked problem on one rank, tflops
// count only visible pairs, and a second line per row gives the balance (max/mean over ranks
// of the forward's visible pairs) and the ring steps run. JSON rows gain window, sink_tokens,
// sinks, docs, visible_pairs_max/mean, balance and steps.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/core/npy.h"
#include "distattn/core/stream.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/runtime.h"
#include "kernels/cpu/reference.h"
#include "src/tools/distattn_bench/bench_common.h"

namespace distattn::bench {
namespace {

namespace po = boost::program_options;
using parallel::ShardRole;
using parallel::SpGroup;
using parallel::SpLayout;
using parallel::SpShape;
using parallel::Strategy;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// CPU time of this process (all threads). On a shared machine wall-clock rates swing with
// other processes' load; CPU time shows what the code did with the cycles it got.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Args {
  std::string strategy = "all";
  std::string device = "cpu";
  std::string dtype = "fp32";
  int64_t batch = 1;
  std::string minseq = "4K", maxseq = "4K";
  int factor = 2;
  int64_t heads = 8;
  int64_t kv_heads = 0;
  int64_t dim = 128;
  int causal = 0;
  int check = 0;
  std::string json;
  int iters = 5;
  int warmup = 1;
  int ulysses = 0;
  int ring = 0;
  bool backward = false;
  int baseline_iters = -1;  // -1: same as --iters (at least 2)
  bool no_progress = false;
  std::string inputs, outputs;
  // Masks: --window L,R, --sink-tokens N, --sinks (learned sink logits, synthetic), packed
  // documents from --doc-lens a,b,c or --doc-dist longtail (--doc-seed).
  std::string window;
  int64_t sink_tokens = 0;
  bool sinks = false;
  std::string doc_lens, doc_dist;
  uint64_t doc_seed = 1;
};

// The mask of one run: documents (cu empty: one sequence), window, sink tokens, sinks.
struct Mask {
  std::vector<int32_t> cu;
  int64_t wl = -1, wr = -1, sink_tokens = 0;
  bool sinks = false;
  bool any() const { return !cu.empty() || wl >= 0 || wr >= 0 || sink_tokens > 0 || sinks; }
};

void parse_window(const std::string& w, Mask& m) {
  bench::parse_window(w, m.wl, m.wr);
}

// Documents of a run with `seq` tokens (empty without --doc-lens / --doc-dist).
std::vector<int32_t> documents_for(const Args& a, int64_t seq) {
  return packed_documents(a.doc_lens, a.doc_dist, a.doc_seed, seq);
}

Mask mask_for(const Args& a, int64_t seq) {
  Mask m;
  parse_window(a.window, m);
  m.sink_tokens = a.sink_tokens;
  m.sinks = a.sinks;
  m.cu = documents_for(a, seq);
  return m;
}

Tensor make_sinks(int64_t heads, Device dev) {
  return synthetic_sinks(heads, dev);
}

void apply(const Mask& m, parallel::SpOptions& o, const Tensor& sinks) {
  o.cu_seqlens = m.cu;
  o.window_left = m.wl;
  o.window_right = m.wr;
  o.sink_tokens = m.sink_tokens;
  if (m.sinks) o.sinks = sinks.view();
}
void apply(const Mask& m, ops::AttentionOptions& o, const Tensor& sinks) {
  o.cu_seqlens = m.cu;
  o.window_left = m.wl;
  o.window_right = m.wr;
  o.sink_tokens = m.sink_tokens;
  if (m.sinks) o.sinks = sinks.view();
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Uniform [-1, 1) from (tensor id, global element index): every rank builds its own shard.
float gen(uint64_t id, uint64_t index) {
  return static_cast<float>(static_cast<double>(mix(mix(id * 7919 + 17) ^ index) >> 11) *
                                (2.0 / 9007199254740992.0) -
                            1.0);
}

// This rank's shard of the synthetic full tensor `id` ([B, S, H, dim], global element
// index ((b*S + pos)*H + h)*dim + d), built without materializing the full tensor.
// Global rows of a rank's local rows (packed documents: cu[doc] + document position).
std::vector<int64_t> global_rows(const SpLayout& l, const SpShape& sh, int rank) {
  if (sh.cu_seqlens.empty()) return parallel::token_positions(l, sh.seq, rank);
  const auto pos = parallel::token_positions(l, sh.cu_seqlens, rank);
  const auto doc = parallel::token_documents(l, sh.cu_seqlens, rank);
  std::vector<int64_t> rows(pos.size());
  for (size_t i = 0; i < pos.size(); ++i) rows[i] = sh.cu_seqlens[doc[i]] + pos[i];
  return rows;
}

Tensor make_shard(const SpLayout& l, const SpShape& sh, int rank, bool kv, uint64_t id, DType dtype,
                  Device dev) {
  const auto pos = global_rows(l, sh, rank);
  const parallel::HeadRange hr =
      kv ? parallel::local_kv_heads(l, sh, rank) : parallel::local_query_heads(l, sh, rank);
  const int64_t H = kv ? sh.heads_kv : sh.heads_q, D = sh.head_dim;
  const int64_t sl = static_cast<int64_t>(pos.size());
  Tensor f = Tensor::empty({sh.batch, sl, hr.size(), D}, DType::kFloat32);
  float* p = f.data_as<float>();
  for (int64_t b = 0; b < sh.batch; ++b)
    for (int64_t i = 0; i < sl; ++i)
      for (int64_t h = 0; h < hr.size(); ++h) {
        const uint64_t base = static_cast<uint64_t>(((b * sh.seq + pos[i]) * H + hr.begin + h) * D);
        float* row = p + ((b * sl + i) * hr.size() + h) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = gen(id, base + static_cast<uint64_t>(d));
      }
  if (dtype != DType::kFloat32) {
    Tensor c = Tensor::empty({sh.batch, sl, hr.size(), D}, dtype);
    convert_dtype_cpu(f.view(), c.view());
    f = std::move(c);
  }
  return dev.is_cpu() ? f : to_device(f.view(), dev);
}

Tensor make_full(const SpShape& sh, bool kv, uint64_t id, DType dtype, Device dev) {
  return make_shard(SpLayout{Strategy::kHeads, 1, 1}, sh, 0, kv, id, dtype, dev);
}

struct Group {
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  SpLayout layout;
  int rank = 0;
  std::vector<comm::Communicator*> comms;
};

Group make_group(Strategy s, const std::shared_ptr<comm::Communicator>& world, const Args& a) {
  Group g;
  const int p = world->size();
  if (s == Strategy::kHybrid) {
    int u = a.ulysses, r = a.ring;
    if (u <= 0 && r <= 0) u = p % 2 == 0 ? 2 : 1;
    if (u <= 0) u = p / std::max(r, 1);
    if (r <= 0) r = p / u;
    DISTATTN_CHECK(u * r == p, "hybrid: --ulysses ", u, " x --ring ", r, " must equal the ", p,
                   " ranks");
    g.mesh = std::make_unique<comm::DeviceMesh>(
        world, comm::DeviceMesh::Axes{{"ring", r}, {"ulysses", u}});
    g.group = SpGroup::from_mesh(*g.mesh);
    g.comms = {g.group.seq, g.group.ulysses};
  } else {
    g.group = SpGroup::flat(*world);
    g.comms = {world.get()};
  }
  g.layout = g.group.layout(s);
  g.rank = g.group.layout_rank(s);
  return g;
}

uint64_t bytes_sent(const Group& g) {
  uint64_t n = 0;
  for (auto* c : g.comms) n += c->ledger().total().bytes_sent;
  return n;
}
void reset_ledgers(const Group& g) {
  for (auto* c : g.comms) c->ledger().reset();
}

// Max |out - reference| over up to `samples` local query rows (all local heads), each row's
// reference computed in fp64 against the full K,V (rebuilt locally).
// Document, position and key range of global row `gr` (one document when cu is empty).
struct RowDoc {
  int64_t begin = 0, len = 0, pos = 0;
};
RowDoc row_doc(const std::vector<int32_t>& cu, int64_t seq, int64_t gr) {
  if (cu.empty()) return {0, seq, gr};
  const auto it = std::upper_bound(cu.begin(), cu.end(), static_cast<int32_t>(gr));
  const int64_t d = (it - cu.begin()) - 1;
  return {cu[d], cu[d + 1] - cu[d], gr - cu[d]};
}

double check_rows(const Group& g, const SpShape& sh, const Tensor& out, DType dtype, bool causal,
                  int samples, const Mask& m, const Tensor& sinks) {
  const auto pos = global_rows(g.layout, sh, g.rank);
  const Tensor sinks_host = m.sinks ? to_device(sinks.view(), Device::cpu()) : Tensor();
  const parallel::HeadRange hr = parallel::local_query_heads(g.layout, sh, g.rank);
  Tensor kf = make_full(sh, true, 2, dtype, Device::cpu());
  Tensor vf = make_full(sh, true, 3, dtype, Device::cpu());
  Tensor ql = make_shard(g.layout, sh, g.rank, false, 1, dtype, Device::cpu());
  Tensor oh = to_device(out.view(), Device::cpu());
  Tensor o64 =
      Tensor::empty({oh.view().size(0), oh.view().size(1), oh.view().size(2), oh.view().size(3)},
                    DType::kFloat64);
  convert_dtype_cpu(oh.view(), o64.view());
  const int64_t sl = static_cast<int64_t>(pos.size());
  const int64_t group = sh.heads_q / sh.heads_kv;
  double err = 0;
  const int64_t n = std::min<int64_t>(samples, sl);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i = n > 1 ? t * (sl - 1) / (n - 1) : 0;
    for (int64_t b = 0; b < sh.batch; ++b)
      for (int64_t h = 0; h < hr.size(); ++h) {
        const int64_t gh = hr.begin + h, kvh = gh / group;
        const RowDoc rd = row_doc(m.cu, sh.seq, pos[static_cast<size_t>(i)]);
        const TensorView q1 = ql.view().slice(0, b, 1).slice(1, i, 1).slice(2, h, 1);
        const TensorView k1 = kf.view().slice(0, b, 1).slice(2, kvh, 1).slice(1, rd.begin, rd.len);
        const TensorView v1 = vf.view().slice(0, b, 1).slice(2, kvh, 1).slice(1, rd.begin, rd.len);
        ops::AttentionOptions o;
        o.causal = causal;
        o.q_offset = rd.pos;
        o.window_left = m.wl;
        o.window_right = m.wr;
        o.sink_tokens = m.sink_tokens;
        if (m.sinks) o.sinks = sinks_host.view().slice(0, gh, 1);
        const auto ref = kernels::cpu::reference_attention_forward(q1, k1, v1, o);
        const double* r = ref.out.data_as<double>();
        const double* got = o64.data_as<double>() + ((b * sl + i) * hr.size() + h) * sh.head_dim;
        for (int64_t d = 0; d < sh.head_dim; ++d) err = std::max(err, std::abs(got[d] - r[d]));
      }
  }
  return err;
}

// Max |grad - fp64 reference| of dq, dk, dv, sampled. dq: up to `samples` local query rows
// (all local heads); a row's dq depends only on that row, so each is one single-row fp64
// backward against the full K, V. dk, dv: one local KV head (different ranks pick different
// heads) of batch 0, up to `samples` local key rows; a key row's gradient sums over every
// query of its group, so this runs the fp64 backward of that head's whole group (O(S^2)).
// Head parallel: replicated KV heads hold only the local query heads' share, so the reference
// sums over exactly those heads.
double check_grads(const Group& g, const SpShape& sh, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv, DType dtype, bool causal, int samples, const Mask& m,
                   const Tensor& sinks) {
  const auto pos = global_rows(g.layout, sh, g.rank);
  const Tensor sinks_host = m.sinks ? to_device(sinks.view(), Device::cpu()) : Tensor();
  const parallel::HeadRange hr = parallel::local_query_heads(g.layout, sh, g.rank);
  const parallel::HeadRange hrk = parallel::local_kv_heads(g.layout, sh, g.rank);
  Tensor qf = make_full(sh, false, 1, dtype, Device::cpu());
  Tensor kf = make_full(sh, true, 2, dtype, Device::cpu());
  Tensor vf = make_full(sh, true, 3, dtype, Device::cpu());
  Tensor df = make_full(sh, false, 4, dtype, Device::cpu());
  auto host64 = [](const Tensor& t) {
    Tensor h = to_device(t.view(), Device::cpu());
    const TensorView hv = h.view();
    Tensor r = Tensor::empty({hv.size(0), hv.size(1), hv.size(2), hv.size(3)}, DType::kFloat64);
    convert_dtype_cpu(hv, r.view());
    return r;
  };
  const Tensor dq64 = host64(dq), dk64 = host64(dk), dv64 = host64(dv);
  const int64_t sl = static_cast<int64_t>(pos.size()), D = sh.head_dim, Dv = sh.dim_v();
  const int64_t group = sh.heads_q / sh.heads_kv;
  ops::AttentionOptions o;
  o.causal = causal;
  o.window_left = m.wl;
  o.window_right = m.wr;
  o.sink_tokens = m.sink_tokens;
  double err = 0;
  const int64_t n = std::min<int64_t>(samples, sl);
  auto sample = [&](int64_t t) { return n > 1 ? t * (sl - 1) / (n - 1) : int64_t{0}; };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i = sample(t), gi = pos[static_cast<size_t>(i)];
    for (int64_t b = 0; b < sh.batch; ++b)
      for (int64_t h = 0; h < hr.size(); ++h) {
        const int64_t gh = hr.begin + h, kvh = gh / group;
        const RowDoc rd = row_doc(m.cu, sh.seq, gi);
        o.q_offset = rd.pos;
        if (m.sinks) o.sinks = sinks_host.view().slice(0, gh, 1);
        const auto ref = kernels::cpu::reference_attention_backward(
            qf.view().slice(0, b, 1).slice(1, gi, 1).slice(2, gh, 1),
            kf.view().slice(0, b, 1).slice(2, kvh, 1).slice(1, rd.begin, rd.len),
            vf.view().slice(0, b, 1).slice(2, kvh, 1).slice(1, rd.begin, rd.len),
            df.view().slice(0, b, 1).slice(1, gi, 1).slice(2, gh, 1), o);
        const double* r = ref.dq.data_as<double>();
        const double* got = dq64.data_as<double>() + ((b * sl + i) * hr.size() + h) * D;
        for (int64_t d = 0; d < D; ++d) err = std::max(err, std::abs(got[d] - r[d]));
      }
  }
  // dk, dv: batch 0, one local KV head, the query heads of its group that this rank holds.
  const int64_t hk = g.rank % hrk.size(), kvh = hrk.begin + hk;
  const int64_t h0 = std::max(kvh * group, hr.begin), h1 = std::min((kvh + 1) * group, hr.end);
  DISTATTN_CHECK(h0 < h1, "sp -c: KV head ", kvh, " has no local query head on rank ", g.rank);
  o.q_offset = 0;
  o.cu_seqlens = m.cu;
  o.sinks = m.sinks ? sinks_host.view().slice(0, h0, h1 - h0) : TensorView();
  const auto ref = kernels::cpu::reference_attention_backward(
      qf.view().slice(0, 0, 1).slice(2, h0, h1 - h0), kf.view().slice(0, 0, 1).slice(2, kvh, 1),
      vf.view().slice(0, 0, 1).slice(2, kvh, 1), df.view().slice(0, 0, 1).slice(2, h0, h1 - h0), o);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = sample(t), gj = pos[static_cast<size_t>(j)];
    const double* rk = ref.dk.data_as<double>() + gj * D;  // [1, S, 1, D]
    const double* rv = ref.dv.data_as<double>() + gj * Dv;
    const double* gk = dk64.data_as<double>() + (j * hrk.size() + hk) * D;
    const double* gv = dv64.data_as<double>() + (j * hrk.size() + hk) * Dv;
    for (int64_t d = 0; d < D; ++d) err = std::max(err, std::abs(gk[d] - rk[d]));
    for (int64_t d = 0; d < Dv; ++d) err = std::max(err, std::abs(gv[d] - rv[d]));
  }
  return err;
}

struct Result {
  double time_s = 0, exposed_s = 0, compute_s = 0, cpu_s = 0;
  uint64_t bytes = 0;
  int64_t peak = 0;
  double err = kNaN;
  double grad_err = kNaN;  // with -c and --backward: max |dq, dk, dv - fp64 reference|
  double pairs_max = 0, pairs_mean = 0;  // forward visible pairs per rank (SpStats)
  int steps = 0;                         // ring steps of the forward (max over ranks)
  // With -c: later calls whose outputs (out, lse, dq, dk, dv) differ from the first call's,
  // bit for bit (the first is the one checked against fp64), summed over ranks.
  int64_t repeat_mismatches = 0;
  int64_t calls_checked = 0;  // calls whose outputs were checked (max over ranks)
};

// The outputs of -c's repeat check: a copy of the first call's bytes, then compared in place
// (host tensors are read where they are; device ones go through one host copy per call).
class OutputSnapshot {
 public:
  explicit OutputSnapshot(std::initializer_list<const Tensor*> ts) : tensors_(ts) {}
  void take() {
    saved_.clear();
    for (const Tensor* t : tensors_) {
      const Tensor h = on_host(*t);
      const TensorView v = h.defined() ? h.view() : t->view();
      const char* p = t->defined() ? static_cast<const char*>(v.data) : nullptr;
      saved_.emplace_back(p, p + bytes(*t));
    }
  }
  bool matches() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = *tensors_[i];
      if (!t.defined()) continue;
      const Tensor h = on_host(t);
      const TensorView v = h.defined() ? h.view() : t.view();
      if (std::memcmp(v.data, saved_[i].data(), saved_[i].size()) != 0) return false;
    }
    return true;
  }

 private:
  static size_t bytes(const Tensor& t) {
    return t.defined() ? t.view().numel() * dtype_size(t.view().dtype) : 0;
  }
  // A host copy of a device tensor; undefined for host tensors (read in place).
  static Tensor on_host(const Tensor& t) {
    return t.defined() && t.view().device.is_cuda() ? to_device(t.view(), Device::cpu()) : Tensor();
  }
  std::vector<const Tensor*> tensors_;
  std::vector<std::vector<char>> saved_;
};

// `ctl`: the host-memory (MPI) world for barriers and reductions of host values; the
// strategy's communicators (g) may be NCCL, which accepts device memory only.
Result run_strategy(Strategy s, Group& g, const SpShape& sh, const Args& a, DType dtype, Device dev,
                    comm::Communicator& ctl, const Mask& m) {
  const SpLayout& l = g.layout;
  Tensor q = make_shard(l, sh, g.rank, false, 1, dtype, dev);
  Tensor k = make_shard(l, sh, g.rank, true, 2, dtype, dev);
  Tensor v = make_shard(l, sh, g.rank, true, 3, dtype, dev);
  const int64_t b = sh.batch, sl = q.view().size(1), hl = q.view().size(2), hkl = k.view().size(2),
                d = sh.head_dim;
  Tensor out = Tensor::empty({b, sl, hl, d}, dtype, dev);
  Tensor lse = Tensor::empty({b, hl, sl}, DType::kFloat32, dev);
  Tensor dout, dq, dk, dv;
  if (a.backward) {
    dout = make_shard(l, sh, g.rank, false, 4, dtype, dev);
    dq = Tensor::empty({b, sl, hl, d}, dtype, dev);
    dk = Tensor::empty({b, sl, hkl, d}, dtype, dev);
    dv = Tensor::empty({b, sl, hkl, d}, dtype, dev);
  }
  parallel::SpStats fst, bst;
  parallel::SpOptions o;
  o.causal = a.causal != 0;
  o.heads_q = sh.heads_q;
  o.heads_kv = sh.heads_kv;
  o.drive_progress = !a.no_progress;
  const Tensor sinks = make_sinks(sh.heads_q, dev);
  Tensor dsinks = Tensor::zeros({sh.heads_q}, DType::kFloat32, dev);
  apply(m, o, sinks);
  if (m.sinks) o.dsinks = dsinks.view();
  Result r;
  // -c: the first call's outputs are checked against the fp64 reference right after it, and
  // every later call's outputs must equal them bit for bit (same inputs, same order of work),
  // so every call is checked and the reference's memory is taken before the steady state.
  OutputSnapshot first({&out, &lse, &dq, &dk, &dv});
  for (int it = 0; it < a.warmup + a.iters; ++it) {
    const bool timed = it >= a.warmup;
    // CUDA: kernels are asynchronous. Start every rank on an idle stream and stop the
    // clock after the call's GPU work (the stream is ordered after all of its transfers).
    stream_synchronize(dev, o.stream);
    ctl.barrier();
    reset_ledgers(g);
    const int64_t before = memory_stats(dev.type).current_bytes;
    reset_peak_memory(dev.type);
    const double t0 = now_seconds(), c0 = cpu_seconds();
    o.stats = &fst;
    parallel::sp_attention_forward(s, g.group, q.view(), k.view(), v.view(), out.view(), lse.view(),
                                   o);
    if (a.backward) {
      o.stats = &bst;
      parallel::sp_attention_backward(s, g.group, q.view(), k.view(), v.view(), out.view(),
                                      dout.view(), lse.view(), dq.view(), dk.view(), dv.view(), o);
    }
    stream_synchronize(dev, o.stream);
    const double t = now_seconds() - t0, ct = cpu_seconds() - c0;
    // Read before the check, whose fp64 reference gathers (full K and V) are not the call's.
    const int64_t call_peak = memory_stats(dev.type).peak_bytes - before;
    if (a.check) {
      if (it == 0) {
        r.err = max_over_ranks(ctl, check_rows(g, sh, out, dtype, o.causal, 16, m, sinks));
        if (a.backward)
          r.grad_err =
              max_over_ranks(ctl, check_grads(g, sh, dq, dk, dv, dtype, o.causal, 16, m, sinks));
        first.take();
      } else if (!first.matches()) {
        ++r.repeat_mismatches;
      }
      ++r.calls_checked;
    }
    if (!timed) continue;
    r.time_s += t;
    r.cpu_s += ct;
    r.exposed_s += fst.exposed_comm_s + (a.backward ? bst.exposed_comm_s : 0);
    r.compute_s += fst.compute_s + (a.backward ? bst.compute_s : 0);
    r.bytes = bytes_sent(g);
    r.peak = std::max(r.peak, call_peak);
    r.pairs_max = fst.visible_pairs;
    r.steps = fst.steps;
  }
  r.pairs_mean = sum_over_ranks(ctl, r.pairs_max) / ctl.size();
  r.pairs_max = max_over_ranks(ctl, r.pairs_max);
  r.steps = static_cast<int>(max_over_ranks(ctl, static_cast<double>(r.steps)));
  const double n = std::max(a.iters, 1);
  r.time_s = max_over_ranks(ctl, r.time_s / n);
  r.cpu_s = max_over_ranks(ctl, r.cpu_s / n);
  r.exposed_s = max_over_ranks(ctl, r.exposed_s / n);
  r.compute_s = max_over_ranks(ctl, r.compute_s / n);
  r.bytes = static_cast<uint64_t>(max_over_ranks(ctl, static_cast<double>(r.bytes)));
  r.peak = static_cast<int64_t>(max_over_ranks(ctl, static_cast<double>(r.peak)));
  if (a.check) {
    r.repeat_mismatches =
        static_cast<int64_t>(sum_over_ranks(ctl, static_cast<double>(r.repeat_mismatches)));
    r.calls_checked =
        static_cast<int64_t>(max_over_ranks(ctl, static_cast<double>(r.calls_checked)));
  }
  return r;
}

struct Baseline {
  double wall_s = kNaN, cpu_s = kNaN;
};

// Calls shorter than this are dominated by timer and scheduling noise on a shared node.
constexpr double kNoiseMs = 1.0;

// "-" for a figure that was not measured (NaN), else printf("%.3g").
std::string number_cell(double v) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

// An efficiency: "-" when not measured, a trailing "*" when it is timing noise (above 1,
// which scaling cannot give, or from a call under kNoiseMs).
std::string efficiency_cell(double v, bool tiny) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f%s", v, tiny || v > 1.0 ? "*" : "");
  return buf;
}

// T1: the full problem on one rank (every rank at once, same threads), mean of iterations:
// wall time (max over ranks) and CPU time (mean over ranks). It is warmed up like the
// strategies (-w runs, at least one, untimed): a cold first call pays page faults on the
// fresh buffers and one-time setup, which inflated T1 and so par_eff above 1.
Baseline baseline(const SpShape& sh, const Args& a, DType dtype, Device dev,
                  comm::Communicator& ctl, const Mask& m) {
  const int iters = a.baseline_iters < 0 ? std::max(a.iters, 2) : a.baseline_iters;
  if (iters == 0) return {};
  Tensor q = make_full(sh, false, 1, dtype, dev);
  Tensor k = make_full(sh, true, 2, dtype, dev);
  Tensor v = make_full(sh, true, 3, dtype, dev);
  const int64_t b = sh.batch, s = sh.seq, d = sh.head_dim;
  Tensor out = Tensor::empty({b, s, sh.heads_q, d}, dtype, dev);
  Tensor lse = Tensor::empty({b, sh.heads_q, s}, DType::kFloat32, dev);
  Tensor dout, dq, dk, dv;
  if (a.backward) {
    dout = make_full(sh, false, 4, dtype, dev);
    dq = Tensor::empty({b, s, sh.heads_q, d}, dtype, dev);
    dk = Tensor::empty({b, s, sh.heads_kv, d}, dtype, dev);
    dv = Tensor::empty({b, s, sh.heads_kv, d}, dtype, dev);
  }
  ops::AttentionOptions o;
  o.causal = a.causal != 0;
  const Tensor sinks = make_sinks(sh.heads_q, dev);
  Tensor dsinks = Tensor::zeros({sh.heads_q}, DType::kFloat32, dev);
  apply(m, o, sinks);
  ops::BackwardOptions bo;
  if (m.sinks) bo.dsinks = dsinks.view();
  double total = 0, cpu = 0;
  const int warmup = std::max(a.warmup, 1);
  for (int it = 0; it < warmup + iters; ++it) {
    stream_synchronize(dev, o.stream);  // CUDA: asynchronous kernels, as in run_strategy
    ctl.barrier();
    const double t0 = now_seconds(), c0 = cpu_seconds();
    ops::attention_forward(q.view(), k.view(), v.view(), out.view(), lse.view(), o);
    if (a.backward)
      ops::attention_backward(q.view(), k.view(), v.view(), out.view(), dout.view(), lse.view(),
                              dq.view(), dk.view(), dv.view(), o, bo);
    stream_synchronize(dev, o.stream);
    if (it < warmup) continue;
    total += now_seconds() - t0;
    cpu += cpu_seconds() - c0;
  }
  Baseline b1;
  b1.wall_s = max_over_ranks(ctl, total / iters);
  b1.cpu_s = sum_over_ranks(ctl, cpu / iters) / ctl.size();
  return b1;
}

// ---- npy interface ---------------------------------------------------------------------------

Tensor recv_tensor(comm::Communicator& w, int peer, std::initializer_list<int64_t> shape,
                   DType dt) {
  Tensor t = Tensor::empty(shape, dt);
  w.recv(t.data(), static_cast<size_t>(t.numel()), dt, peer);
  return t;
}

// Rank 0 holds `full` (fp32); every rank returns its shard converted to `dtype`.
Tensor scatter(comm::Communicator& w, const Group& g, const SpShape& sh, ShardRole role,
               const Tensor& full, DType dtype) {
  const bool kv = role == ShardRole::kKeyValue;
  const int64_t sl = parallel::local_seq_len(g.layout, sh, g.rank);
  const parallel::HeadRange hr = kv ? parallel::local_kv_heads(g.layout, sh, g.rank)
                                    : parallel::local_query_heads(g.layout, sh, g.rank);
  Tensor local;
  if (w.rank() == 0) {
    for (int r = 1; r < w.size(); ++r) {
      // World rank r has layout rank r (row-major mesh {ring, ulysses}; flat otherwise).
      Tensor s = parallel::shard(g.layout, sh, r, role, full.view());
      w.send(s.data(), static_cast<size_t>(s.numel()), DType::kFloat32, r);
    }
    local = parallel::shard(g.layout, sh, 0, role, full.view());
  } else {
    local = recv_tensor(w, 0, {sh.batch, sl, hr.size(), sh.head_dim}, DType::kFloat32);
  }
  if (dtype == DType::kFloat32) return local;
  Tensor c = Tensor::empty({sh.batch, sl, hr.size(), sh.head_dim}, dtype);
  convert_dtype_cpu(local.view(), c.view());
  return c;
}

// Every rank's local result -> rank 0's full fp32 tensor (accumulate: sum replicated shards).
Tensor gather(comm::Communicator& w, const Group& g, const SpShape& sh, ShardRole role,
              const TensorView& local, bool accumulate) {
  Tensor l32 =
      Tensor::empty(std::span<const int64_t>(local.shape.data(), local.ndim), DType::kFloat32);
  convert_dtype_cpu(to_device(local, Device::cpu()).view(), l32.view());
  Tensor full;
  if (w.rank() == 0) {
    if (role == ShardRole::kLse) {
      full = Tensor::zeros({sh.batch, sh.heads_q, sh.seq}, DType::kFloat32);
    } else {
      full = Tensor::zeros(
          {sh.batch, sh.seq, role == ShardRole::kKeyValue ? sh.heads_kv : sh.heads_q, sh.head_dim},
          DType::kFloat32);
    }
    parallel::unshard_into(g.layout, sh, 0, role, l32.view(), full.view(), accumulate);
    for (int r = 1; r < w.size(); ++r) {
      const SpLayout& l = g.layout;
      const bool kv = role == ShardRole::kKeyValue;
      const parallel::HeadRange hr =
          kv ? parallel::local_kv_heads(l, sh, r) : parallel::local_query_heads(l, sh, r);
      const int64_t sl = parallel::local_seq_len(l, sh, r);
      Tensor t = role == ShardRole::kLse
                     ? recv_tensor(w, r, {sh.batch, hr.size(), sl}, DType::kFloat32)
                     : recv_tensor(w, r, {sh.batch, sl, hr.size(), sh.head_dim}, DType::kFloat32);
      parallel::unshard_into(l, sh, r, role, t.view(), full.view(), accumulate);
    }
  } else {
    w.send(l32.data(), static_cast<size_t>(l32.numel()), DType::kFloat32, 0);
  }
  return full;
}

bool file_exists(const std::string& p) {
  FILE* f = std::fopen(p.c_str(), "rb");
  if (f) std::fclose(f);
  return f != nullptr;
}

// Host files are scattered and gathered over `ctl` (MPI, host memory); the strategy runs on
// `dev` over `world`'s communicators (NCCL accepts device memory only).
int run_npy(const Args& a, Strategy s, const std::shared_ptr<comm::Communicator>& world,
            comm::Communicator& ctl, DType dtype, Device dev) {
  comm::Communicator& w = ctl;
  DISTATTN_CHECK(!a.outputs.empty(), "--inputs needs --outputs DIR");
  Group g = make_group(s, world, a);
  // Rank 0 reads, then broadcasts the shapes.
  Tensor q, k, v, dout, cu_t, sinks_t;
  int64_t dims[9] = {0};
  if (w.rank() == 0) {
    NpyReadOptions ro;
    ro.dtype = DType::kFloat32;
    ro.rank = 4;
    q = read_npy(a.inputs + "/q.npy", ro);
    k = read_npy(a.inputs + "/k.npy", ro);
    v = read_npy(a.inputs + "/v.npy", ro);
    const bool has_dout = file_exists(a.inputs + "/dout.npy");
    if (has_dout) dout = read_npy(a.inputs + "/dout.npy", ro);
    const TensorView qv = q.view(), kv = k.view(), vv = v.view();
    DISTATTN_CHECK(kv.shape == vv.shape && kv.size(0) == qv.size(0) && kv.size(1) == qv.size(1) &&
                       kv.size(3) == qv.size(3),
                   "q.npy ", qv.shape_str(), ", k.npy ", kv.shape_str(), ", v.npy ", vv.shape_str(),
                   " must be [B, S, Hq, D], [B, S, Hkv, D], [B, S, Hkv, D]");
    if (has_dout)
      DISTATTN_CHECK(dout.view().shape == qv.shape, "dout.npy ", dout.view().shape_str(),
                     " must have q.npy's shape ", qv.shape_str());
    // Optional: packed documents and learned sinks.
    int64_t n_cu = 0, n_sinks = 0;
    if (file_exists(a.inputs + "/cu_seqlens.npy")) {
      NpyReadOptions co;
      co.dtype = DType::kInt32;
      co.rank = 1;
      cu_t = read_npy(a.inputs + "/cu_seqlens.npy", co);
      n_cu = cu_t.numel();
    }
    if (file_exists(a.inputs + "/sinks.npy")) {
      NpyReadOptions so;
      so.dtype = DType::kFloat32;
      so.rank = 1;
      sinks_t = read_npy(a.inputs + "/sinks.npy", so);
      n_sinks = sinks_t.numel();
      DISTATTN_CHECK(n_sinks == qv.size(2), "sinks.npy has ", n_sinks, " entries but q.npy has ",
                     qv.size(2), " query heads (float32 [Hq])");
    }
    int64_t tmp[9] = {qv.size(0),       qv.size(1), qv.size(2), kv.size(2), qv.size(3),
                      has_dout ? 1 : 0, n_cu,       n_sinks,    0};
    std::memcpy(dims, tmp, sizeof(dims));
  }
  w.broadcast(dims, dims, 9, DType::kInt64, 0);
  SpShape sh{dims[0], dims[1], dims[2], dims[3], dims[4], 0};
  if (dims[6] > 0) {
    if (w.rank() != 0) cu_t = Tensor::empty({dims[6]}, DType::kInt32);
    w.broadcast(cu_t.data(), cu_t.data(), static_cast<size_t>(dims[6]), DType::kInt32, 0);
    sh.cu_seqlens.assign(cu_t.data_as<int32_t>(), cu_t.data_as<int32_t>() + dims[6]);
  }
  if (dims[7] > 0) {
    if (w.rank() != 0) sinks_t = Tensor::empty({dims[7]}, DType::kFloat32);
    w.broadcast(sinks_t.data(), sinks_t.data(), static_cast<size_t>(dims[7]), DType::kFloat32, 0);
  }
  parallel::check_layout(g.layout, sh);
  Mask m;
  parse_window(a.window, m);
  m.sink_tokens = a.sink_tokens;
  m.sinks = dims[7] > 0;
  m.cu = sh.cu_seqlens;
  const Tensor sinks_dev = m.sinks ? to_device(sinks_t.view(), dev) : Tensor();
  Tensor dsinks = Tensor::zeros({sh.heads_q}, DType::kFloat32, dev);
  const bool has_dout = dims[5] != 0;
  Tensor ql = to_device(scatter(w, g, sh, ShardRole::kQuery, q, dtype).view(), dev);
  Tensor kl = to_device(scatter(w, g, sh, ShardRole::kKeyValue, k, dtype).view(), dev);
  Tensor vl = to_device(scatter(w, g, sh, ShardRole::kKeyValue, v, dtype).view(), dev);
  const int64_t b = sh.batch, sl = ql.view().size(1), hl = ql.view().size(2),
                hkl = kl.view().size(2), d = sh.head_dim;
  Tensor out = Tensor::empty({b, sl, hl, d}, dtype, dev);
  Tensor lse = Tensor::empty({b, hl, sl}, DType::kFloat32, dev);
  parallel::SpOptions o;
  o.causal = a.causal != 0;
  o.heads_q = sh.heads_q;
  o.heads_kv = sh.heads_kv;
  apply(m, o, sinks_dev);
  if (m.sinks) o.dsinks = dsinks.view();
  parallel::sp_attention_forward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(),
                                 lse.view(), o);
  stream_synchronize(dev, o.stream);  // CUDA: the results are read back on the host below
  Tensor fo = gather(w, g, sh, ShardRole::kQuery, out.view(), false);
  Tensor fl = gather(w, g, sh, ShardRole::kLse, lse.view(), false);
  if (w.rank() == 0) {
    std::filesystem::create_directories(a.outputs);
    write_npy(a.outputs + "/out.npy", fo.view());
    write_npy(a.outputs + "/lse.npy", fl.view());
  }
  if (has_dout) {
    Tensor dl = to_device(scatter(w, g, sh, ShardRole::kQuery, dout, dtype).view(), dev);
    Tensor dq = Tensor::empty({b, sl, hl, d}, dtype, dev),
           dk = Tensor::empty({b, sl, hkl, d}, dtype, dev),
           dv = Tensor::empty({b, sl, hkl, d}, dtype, dev);
    parallel::sp_attention_backward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(),
                                    dl.view(), lse.view(), dq.view(), dk.view(), dv.view(), o);
    stream_synchronize(dev, o.stream);
    // Head parallel: replicated KV heads hold partial gradients, summed here.
    const bool sum_kv = s == Strategy::kHeads;
    Tensor fdq = gather(w, g, sh, ShardRole::kQuery, dq.view(), false);
    Tensor fdk = gather(w, g, sh, ShardRole::kKeyValue, dk.view(), sum_kv);
    Tensor fdv = gather(w, g, sh, ShardRole::kKeyValue, dv.view(), sum_kv);
    if (w.rank() == 0) {
      write_npy(a.outputs + "/dq.npy", fdq.view());
      write_npy(a.outputs + "/dk.npy", fdk.view());
      write_npy(a.outputs + "/dv.npy", fdv.view());
      if (m.sinks)
        write_npy(a.outputs + "/dsinks.npy", to_device(dsinks.view(), Device::cpu()).view());
    }
  }
  if (w.rank() == 0)
    std::printf("# sp %s: %lld ranks, wrote %s/out.npy, lse.npy%s%s\n", parallel::strategy_name(s),
                static_cast<long long>(w.size()), a.outputs.c_str(),
                has_dout ? ", dq.npy, dk.npy, dv.npy" : "",
                has_dout && m.sinks ? ", dsinks.npy" : "");
  return 0;
}

// Lets `-c 1` / `--causal 0` work next to bare `-c` / `--causal`.
std::vector<std::string> normalize_args(int argc, char** argv) {
  std::vector<std::string> out;
  for (int i = 0; i < argc; ++i) {
    std::string s = argv[i];
    const bool flag = s == "-c" || s == "--check" || s == "--causal" || s == "--backward";
    if (flag && i + 1 < argc &&
        (std::strcmp(argv[i + 1], "0") == 0 || std::strcmp(argv[i + 1], "1") == 0)) {
      out.push_back((s == "-c" ? std::string("--check") : s) + "=" + argv[i + 1]);
      ++i;
      continue;
    }
    out.push_back(s);
  }
  return out;
}

int sp_main(int argc, char** argv) {
  Args a;
  int backward = 0;
  po::options_description desc("distattn-bench sp options");
  // clang-format off
  desc.add_options()
    ("help,h", "this help")
    ("strategy", po::value(&a.strategy)->default_value("all"),
     "heads|ring|zigzag|ulysses|allgather|hybrid|all (or a list a,b)")
    ("device", po::value(&a.device)->default_value("cpu"), "cpu|cuda")
    ("dtype,d", po::value(&a.dtype)->default_value("fp32"), "fp32|bf16|fp16")
    ("batch", po::value(&a.batch)->default_value(1), "batch size")
    ("minseq,b", po::value(&a.minseq)->default_value("4K"), "smallest global sequence (K/M suffix)")
    ("maxseq,e", po::value(&a.maxseq)->default_value("4K"), "largest global sequence")
    ("stepfactor,f", po::value(&a.factor)->default_value(2), "sequence multiplier between rows")
    ("heads", po::value(&a.heads)->default_value(8), "query heads")
    ("kv-heads", po::value(&a.kv_heads)->default_value(0), "KV heads (0: = --heads)")
    ("dim", po::value(&a.dim)->default_value(128), "head dim")
    ("causal", po::value(&a.causal)->default_value(0)->implicit_value(1), "causal mask (0|1)")
    ("check,c", po::value(&a.check)->default_value(0)->implicit_value(1),
     "1: max error vs fp64 reference on 16 sampled query rows per rank (with --backward also "
     "dq on those rows and dk, dv on 16 key rows of one KV head per rank), on the first call; "
     "every later call's outputs must equal the first's bit for bit")
    ("json", po::value(&a.json)->default_value(""), "write rows to this JSON file")
    ("iters,n", po::value(&a.iters)->default_value(5), "timed iterations")
    ("warmup_iters,w", po::value(&a.warmup)->default_value(1), "untimed iterations")
    ("ulysses", po::value(&a.ulysses)->default_value(0), "hybrid: Ulysses degree (default 2)")
    ("ring", po::value(&a.ring)->default_value(0), "hybrid: ring degree (default ranks/ulysses)")
    ("backward", po::value(&backward)->default_value(0)->implicit_value(1),
     "also run (and time) the backward pass")
    ("baseline-iters", po::value(&a.baseline_iters)->default_value(-1),
     "timed iterations of the single-rank full-problem run T1 for par_eff, after -w (at least "
     "1) untimed ones (-1: same as -n, at least 2; 0: skip)")
    ("no-progress", po::bool_switch(&a.no_progress),
     "do not drive communication progress from inside the kernels (to measure overlap)")
    ("window", po::value(&a.window)->default_value(""),
     "sliding window LEFT,RIGHT over document positions (-1: unlimited side; causal: R = 0)")
    ("sink-tokens", po::value(&a.sink_tokens)->default_value(0),
     "the first N keys of each document ignore the window (StreamingLLM sinks)")
    ("sinks", po::bool_switch(&a.sinks), "learned sink logits per query head (gpt-oss style)")
    ("doc-lens", po::value(&a.doc_lens)->default_value(""),
     "packed batch of documents of these lengths a,b,c (K/M suffix; sets the sequence to their "
     "sum, -b/-e are ignored)")
    ("doc-dist", po::value(&a.doc_dist)->default_value(""),
     "longtail: a packed batch of each -b..-e length with long-tail document lengths (Pareto "
     "shape 1.1, minimum 16 tokens, --doc-seed)")
    ("doc-seed", po::value(&a.doc_seed)->default_value(1), "seed of --doc-dist")
    ("inputs", po::value(&a.inputs)->default_value(""),
     "read q.npy, k.npy, v.npy [, dout.npy, cu_seqlens.npy (int32), sinks.npy (fp32 [Hq])]")
    ("outputs", po::value(&a.outputs)->default_value(""), "write out.npy, lse.npy [, grads]");
  // clang-format on
  po::variables_map vm;
  try {
    const auto args = normalize_args(argc, argv);
    std::vector<std::string> rest(args.begin() + 1, args.end());
    po::store(po::command_line_parser(rest).options(desc).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    DISTATTN_THROW(Status::kInvalidArgument, e.what(), " (see distattn-bench sp --help)");
  }
  a.backward = backward != 0;
  auto world_u = comm::create_world(comm::Backend::kAuto, parse_device(a.device));
  std::shared_ptr<comm::Communicator> world(std::move(world_u));
  // Host values (timings, errors, npy shards) travel over an MPI world: with --device cuda
  // the strategies' world may be NCCL, which refuses host memory.
  const std::unique_ptr<comm::Communicator> ctl =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  const int rank = world->rank(), p = world->size();
  if (vm.count("help")) {
    if (rank == 0) {
      std::ostringstream os;
      os << desc;
      std::printf(
          "%s\nparallel efficiency (par_eff, JSON parallel_efficiency) = T1 / (P * TP): T1 is the "
          "mean wall time of the whole problem on one rank alone (every rank runs it at once on "
          "its own cores, after warm-up), TP the strategy's mean time on P ranks. 1 = perfect "
          "scaling; values lie in [0, 1] up to timing noise. eff_cpu is the same ratio with "
          "process CPU times.\n",
          os.str().c_str());
    }
    return 0;
  }
  const Device dev = parse_device(a.device);
  const DType dtype = parse_dtype(a.dtype);
  DISTATTN_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16,
                 "--dtype must be fp32, bf16 or fp16, got ", a.dtype);
  if (a.kv_heads == 0) a.kv_heads = a.heads;
  DISTATTN_CHECK(a.baseline_iters >= -1,
                 "--baseline-iters must be -1 (same as -n), 0 (skip) or "
                 "positive, got ",
                 a.baseline_iters);
  std::vector<Strategy> strategies;
  if (a.strategy == "all") {
    strategies.assign(parallel::all_strategies().begin(), parallel::all_strategies().end());
  } else {
    size_t at = 0;
    while (at <= a.strategy.size()) {
      const size_t comma = a.strategy.find(',', at);
      const std::string name =
          a.strategy.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
      strategies.push_back(parallel::parse_strategy(name));
      if (comma == std::string::npos) break;
      at = comma + 1;
    }
  }
  if (!a.inputs.empty()) {
    DISTATTN_CHECK(strategies.size() == 1, "--inputs runs one strategy: pass --strategy NAME");
    return run_npy(a, strategies[0], world, *ctl, dtype, dev);
  }
  int64_t minseq = static_cast<int64_t>(parse_size(a.minseq));
  int64_t maxseq = static_cast<int64_t>(parse_size(a.maxseq));
  DISTATTN_CHECK(a.doc_lens.empty() || a.doc_dist.empty(),
                 "--doc-lens and --doc-dist exclude each other: pass one");
  if (!a.doc_lens.empty()) minseq = maxseq = documents_for(a, 0).back();  // their sum
  DISTATTN_CHECK(minseq >= 1 && maxseq >= minseq && a.factor >= 2,
                 "need 1 <= -b <= -e and -f >= 2");
  if (rank == 0) {
    std::printf("%s", environment_header().c_str());
    std::printf(
        "# distattn-bench sp: %d ranks, device %s, dtype %s, batch %lld, heads %lld/%lld, "
        "dim %lld, causal %d, %s, iters %d warmup %d\n",
        p, a.device.c_str(), dtype_name(dtype), static_cast<long long>(a.batch),
        static_cast<long long>(a.heads), static_cast<long long>(a.kv_heads),
        static_cast<long long>(a.dim), a.causal, a.backward ? "fwd+bwd" : "fwd", a.iters, a.warmup);
    std::printf(
        "# par_eff = T1 / (P * TP) in [0, 1] (1 = perfect scaling), T1 = the full problem on one "
        "rank (same cores, after warm-up, mean of %d runs), TP = the strategy's time; eff_cpu: "
        "the same with process CPU times; exposed = time blocked on communication\n",
        a.baseline_iters < 0 ? std::max(a.iters, 2) : a.baseline_iters);
    const Mask m0 = mask_for(a, minseq);
    if (m0.any())
      std::printf(
          "# masks: window %s, sink_tokens %lld, learned sinks %d, documents %s; "
          "balance = max/mean over ranks of the forward's visible pairs\n",
          a.window.empty() ? "none" : a.window.c_str(), static_cast<long long>(a.sink_tokens),
          a.sinks ? 1 : 0,
          !a.doc_lens.empty() ? a.doc_lens.c_str()
          : !a.doc_dist.empty()
              ? (a.doc_dist + " (seed " + std::to_string(a.doc_seed) + ")").c_str()
              : "one sequence");
    std::printf("# %-10s %9s %10s %11s %8s %8s %12s %11s %8s %9s %12s %9s\n", "strategy", "seq",
                "time_ms", "tflops/rank", "par_eff", "eff_cpu", "comm_MB/rank", "exposed_ms",
                "exposed%", "peak_MB", "max_abs_err", "grad_err");
  }
  std::vector<JsonRow> rows;
  // With -c, a row whose max error exceeds the dtype's limit (absolute: inputs lie in
  // [-1, 1), so outputs do too) fails the run (exit 1), as `attn -c` does.
  const double tolerance = dtype == DType::kBFloat16  ? 3e-2
                           : dtype == DType::kFloat16 ? 1e-2
                                                      : 1e-4;
  bool all_ok = true;
  bool noisy_rows = false;
  for (int64_t seq = minseq; seq <= maxseq; seq *= a.factor) {
    SpShape sh{a.batch, seq, a.heads, a.kv_heads, a.dim, 0};
    const Mask m = mask_for(a, seq);
    sh.cu_seqlens = m.cu;
    DISTATTN_CHECK(m.cu.empty() || a.batch == 1, "packed documents need --batch 1");
    const Baseline base = baseline(sh, a, dtype, dev, *ctl, m);
    const double t1 = base.wall_s;
    double flops = ops::attention_forward_flops(a.batch, a.heads, seq, seq, a.dim, a.causal != 0) *
                   (a.backward ? 3.5 : 1.0);
    if (m.any()) {
      // Visible pairs of the whole problem under the masks (documents, window, sinks).
      parallel::SpOptions po;
      po.causal = a.causal != 0;
      po.window_left = m.wl;
      po.window_right = m.wr;
      po.sink_tokens = m.sink_tokens;
      const double pairs =
          parallel::rank_visible_pairs(SpLayout{Strategy::kHeads, 1, 1}, sh, 0, po);
      flops =
          4.0 * static_cast<double>(a.batch * a.heads * a.dim) * pairs * (a.backward ? 3.5 : 1.0);
    }
    for (Strategy s : strategies) {
      Group g = make_group(s, world, a);
      try {
        parallel::check_layout(g.layout, sh);
      } catch (const Error& e) {
        if (strategies.size() == 1) throw;
        if (rank == 0)
          std::printf("# %-10s %9lld skipped: %s\n", parallel::strategy_name(s),
                      static_cast<long long>(seq), e.message().c_str());
        continue;
      }
      const Result r = run_strategy(s, g, sh, a, dtype, dev, *ctl, m);
      if (a.check && (!(r.err <= tolerance) || (a.backward && !(r.grad_err <= tolerance)) ||
                      r.repeat_mismatches > 0))
        all_ok = false;
      if (a.check && r.repeat_mismatches > 0 && rank == 0)
        std::printf(
            "# %s: %lld later call(s) of a rank gave outputs that differ from the first "
            "call's (checked against fp64)\n",
            parallel::strategy_name(s), static_cast<long long>(r.repeat_mismatches));
      const double tflops = flops / p / r.time_s / 1e12;
      const double eff = std::isnan(t1) ? kNaN : t1 / (p * r.time_s);
      const double eff_cpu = std::isnan(base.cpu_s) ? kNaN : base.cpu_s / (p * r.cpu_s);
      if (rank == 0) {
        // A figure that was not measured (no -c, no --backward, --baseline-iters 0) prints
        // "-"; an efficiency above 1 or from a call under kNoiseMs is timing noise ("*").
        const bool tiny = r.time_s * 1e3 < kNoiseMs;
        noisy_rows = noisy_rows || tiny || eff > 1.0 || eff_cpu > 1.0;
        std::printf("  %-10s %9lld %10.3f %11.4f %8s %8s %12.3f %11.3f %7.1f%% %9.1f %12s %9s\n",
                    parallel::strategy_name(s), static_cast<long long>(seq), r.time_s * 1e3, tflops,
                    efficiency_cell(eff, tiny).c_str(), efficiency_cell(eff_cpu, tiny).c_str(),
                    r.bytes / 1e6, r.exposed_s * 1e3, 100.0 * r.exposed_s / r.time_s, r.peak / 1e6,
                    number_cell(r.err).c_str(), number_cell(r.grad_err).c_str());
        if (m.any())
          std::printf(
              "  %-10s %9lld   balance %.4f (visible pairs per rank max %.4g mean %.4g), "
              "ring steps %d, documents %zu\n",
              parallel::strategy_name(s), static_cast<long long>(seq),
              r.pairs_mean > 0 ? r.pairs_max / r.pairs_mean : 1.0, r.pairs_max, r.pairs_mean,
              r.steps, m.cu.empty() ? size_t{1} : m.cu.size() - 1);
        std::fflush(stdout);
      }
      JsonRow row;
      row.set("strategy", parallel::strategy_name(s))
          .set("ranks", p)
          .set("seq", seq)
          .set("time_ms", r.time_s * 1e3)
          .set("tflops", tflops)
          .set("parallel_efficiency", eff)
          .set("comm_bytes_per_rank", r.bytes)
          .set("exposed_comm_ms", r.exposed_s * 1e3)
          .set("max_abs_err", r.err)
          .set("max_grad_abs_err", r.grad_err)
          .set("calls_checked", r.calls_checked)
          .set("repeat_mismatches", r.repeat_mismatches)
          .set("baseline_ms", t1 * 1e3)
          .set("compute_ms", r.compute_s * 1e3)
          .set("parallel_efficiency_cpu", eff_cpu)
          .set("cpu_ms", r.cpu_s * 1e3)
          .set("baseline_cpu_ms", base.cpu_s * 1e3)
          .set("peak_bytes_per_rank", static_cast<int64_t>(r.peak))
          .set("causal", a.causal != 0)
          .set("backward", a.backward)
          .set("dtype", dtype_name(dtype))
          .set("heads", a.heads)
          .set("kv_heads", a.kv_heads)
          .set("dim", a.dim)
          .set("batch", a.batch)
          .set("window", a.window.empty() ? std::string("none") : a.window)
          .set("sink_tokens", a.sink_tokens)
          .set("sinks", a.sinks)
          .set("docs", static_cast<int64_t>(m.cu.empty() ? 1 : m.cu.size() - 1))
          .set("visible_pairs_max", r.pairs_max)
          .set("visible_pairs_mean", r.pairs_mean)
          .set("balance", r.pairs_mean > 0 ? r.pairs_max / r.pairs_mean : 1.0)
          .set("steps", r.steps);
      if (s == Strategy::kHybrid) row.set("ulysses", g.layout.ulysses);
      rows.push_back(row);
    }
  }
  if (rank == 0) {
    JsonRow header;
    header.set("ranks", p).set("device", a.device).set("dtype", dtype_name(dtype));
    write_json(a.json, "sp", header, rows);
    if (noisy_rows)
      std::printf(
          "# *: timing noise, not scaling: par_eff/eff_cpu above 1, or a call under %.0f ms "
          "(run larger -b/-e or more -n for a figure that means something)\n",
          kNoiseMs);
    if (a.check)
      std::printf("# check vs fp64 reference (limit %.0e): %s\n", tolerance,
                  all_ok ? "OK" : "FAILED");
  }
  return all_ok ? 0 : 1;
}

}  // namespace

DISTATTN_BENCH_COMMAND("sp", "sequence/head-parallel attention strategies (ring, zigzag, ...)",
                       sp_main);

}  // namespace distattn::bench
