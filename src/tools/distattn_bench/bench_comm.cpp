// distattn-bench comm: nccl-tests-style bandwidth sweep of the Communicator's collectives.
//
//   mpirun -np 4 distattn-bench comm --op all -b 8 -e 16M -f 2 -d fp32 --raw-mpi
//
// One row per (op, size): time is the max over ranks of each rank's mean over -n iterations
// after -w warm-up iterations; algbw = size / time; busbw = algbw * the nccl-tests factor of
// the op (all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast and
// sendrecv 1), so busbw is comparable across rank counts. "size" is the largest buffer of the
// op (nccl-tests convention): all_gather's receive buffer, reduce_scatter's send buffer, the
// per-rank all_to_all buffer; "count" is size / element size.
// With -c 1 every row first runs the op once on buffers filled with small integers (exact in
// every dtype, also after summation) and counts elements that differ from the host-computed
// result (#wrong, summed over ranks).
// --raw-mpi times the same blocking MPI calls (MPI_Allreduce, ..., MPI_Sendrecv) on the same
// host buffers, to show what the Communicator layer costs on top of MPI. Both are timed as
// OSU micro-benchmarks and nccl-tests do (back-to-back calls after warm-up, one barrier per
// loop), in 3 alternating loops each (ours, raw, ...) so both see the same machine load.
// broadcast runs in place on root for both (root's send buffer is its result), as MPI_Bcast
// does; the Communicator's out-of-place form would add root's copy of the buffer.
#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/config.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/runtime.h"
#include "src/tools/distattn_bench/bench_common.h"

namespace distattn::bench {
namespace {

namespace po = boost::program_options;
using comm::Communicator;
using comm::ReduceOp;

enum class CommOp { kAllReduce, kAllGather, kReduceScatter, kAllToAll, kBroadcast, kSendRecv };

struct OpSpec {
  const char* name;
  CommOp op;
  bool reduces;
  bool per_rank_blocks;  // buffers are n blocks: size rounds down to a multiple of n*elt
};

constexpr OpSpec kOps[] = {
    {"all_reduce", CommOp::kAllReduce, true, false},
    {"all_gather", CommOp::kAllGather, false, true},
    {"reduce_scatter", CommOp::kReduceScatter, true, true},
    {"all_to_all", CommOp::kAllToAll, false, true},
    {"broadcast", CommOp::kBroadcast, false, false},
    {"sendrecv", CommOp::kSendRecv, false, false},
};

std::string op_names() {
  std::string s;
  for (const auto& o : kOps) s += std::string(s.empty() ? "" : "|") + o.name;
  return s + "|all";
}

double bus_factor(CommOp op, int n) {
  switch (op) {
    case CommOp::kAllReduce:
      return 2.0 * (n - 1) / n;
    case CommOp::kAllGather:
    case CommOp::kReduceScatter:
    case CommOp::kAllToAll:
      return static_cast<double>(n - 1) / n;
    case CommOp::kBroadcast:
    case CommOp::kSendRecv:
      return 1.0;
  }
  return 1.0;
}

// Element counts of one row.
struct Geometry {
  size_t count = 0;     // "count" column: size / element size
  size_t op_count = 0;  // count argument of the call (per-rank block for blocked ops)
  size_t send = 0;      // elements in the send buffer
  size_t recv = 0;      // elements in the receive buffer
  uint64_t bytes = 0;   // "size" column
};

Geometry geometry(const OpSpec& s, uint64_t size, size_t elt, int n) {
  Geometry g;
  if (s.per_rank_blocks) {
    const size_t per = size / (elt * static_cast<size_t>(n));
    g.op_count = per;
    g.count = per * static_cast<size_t>(n);
    g.send = s.op == CommOp::kAllGather ? per : g.count;
    g.recv = s.op == CommOp::kReduceScatter ? per : g.count;
  } else {
    g.count = g.op_count = g.send = g.recv = size / elt;
  }
  g.bytes = g.count * elt;
  return g;
}

// ---- test data: small integers, exact in every dtype and after summation -------------------

// Values in [-k, k] (signed types) or [0, 2k] (uint8), a hash of (rank, index).
struct DataGen {
  int k = 8;
  bool unsigned_type = false;
  double operator()(int rank, size_t index) const {
    uint64_t h = static_cast<uint64_t>(index) * 0x9e3779b97f4a7c15ull +
                 static_cast<uint64_t>(rank + 1) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 29;
    const int64_t v = static_cast<int64_t>(h % static_cast<uint64_t>(2 * k + 1));
    return static_cast<double>(unsigned_type ? v : v - k);
  }
};

DataGen make_gen(DType dt, int n) {
  DataGen g;
  g.unsigned_type = dt == DType::kUInt8;
  // bf16 holds integers exactly up to 256: keep every partial sum of n ranks within that.
  g.k = std::clamp(256 / std::max(n, 1) / 2, 1, 8);
  return g;
}

constexpr double kSentinel = 99;  // written to receive buffers; outside every data range

void store(void* buf, DType dt, size_t i, double v) {
  switch (dt) {
    case DType::kFloat32:
      static_cast<float*>(buf)[i] = static_cast<float>(v);
      break;
    case DType::kFloat64:
      static_cast<double*>(buf)[i] = v;
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(buf)[i] = bf16_t::from_float(static_cast<float>(v));
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(buf)[i] = fp16_t::from_float(static_cast<float>(v));
      break;
    case DType::kInt32:
      static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v);
      break;
    case DType::kInt64:
      static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v);
      break;
    case DType::kUInt8:
      static_cast<uint8_t*>(buf)[i] = static_cast<uint8_t>(static_cast<int64_t>(v) & 0xff);
      break;
  }
}

double load(const void* buf, DType dt, size_t i) {
  switch (dt) {
    case DType::kFloat32:
      return static_cast<const float*>(buf)[i];
    case DType::kFloat64:
      return static_cast<const double*>(buf)[i];
    case DType::kBFloat16:
      return bf16_t::to_float(static_cast<const uint16_t*>(buf)[i]);
    case DType::kFloat16:
      return fp16_t::to_float(static_cast<const uint16_t*>(buf)[i]);
    case DType::kInt32:
      return static_cast<const int32_t*>(buf)[i];
    case DType::kInt64:
      return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case DType::kUInt8:
      return static_cast<const uint8_t*>(buf)[i];
  }
  return 0;
}

double reduce_ranks(const DataGen& gen, ReduceOp rop, int n, size_t index, DType dt) {
  double acc = gen(0, index);
  for (int q = 1; q < n; ++q) {
    const double v = gen(q, index);
    acc = rop == ReduceOp::kSum   ? acc + v
          : rop == ReduceOp::kMax ? std::max(acc, v)
                                  : std::min(acc, v);
  }
  // uint8 sums wrap around (as in MPI and NCCL).
  if (dt == DType::kUInt8) acc = static_cast<double>(static_cast<int64_t>(acc) & 0xff);
  return acc;
}

// Fills this rank's send buffer (host) for `s`.
void fill_send(const OpSpec& s, const Geometry& g, const DataGen& gen, DType dt, int rank,
               void* host) {
  for (size_t i = 0; i < g.send; ++i) store(host, dt, i, gen(rank, i));
}

// Expected value of receive element i on `rank`.
double expected(const OpSpec& s, const Geometry& g, const DataGen& gen, DType dt, ReduceOp rop,
                int root, int rank, int n, size_t i) {
  const size_t c = g.op_count;
  switch (s.op) {
    case CommOp::kAllReduce:
      return reduce_ranks(gen, rop, n, i, dt);
    case CommOp::kAllGather:
      return gen(static_cast<int>(i / c), i % c);
    case CommOp::kReduceScatter:
      return reduce_ranks(gen, rop, n, static_cast<size_t>(rank) * c + i, dt);
    case CommOp::kAllToAll:
      return gen(static_cast<int>(i / c), static_cast<size_t>(rank) * c + i % c);
    case CommOp::kBroadcast:
      return gen(root, i);
    case CommOp::kSendRecv:
      return gen((rank - 1 + n) % n, i);
  }
  return 0;
}

// ---- raw MPI reference ----------------------------------------------------------------------

template <typename Half, int kOp>
void half_reduce(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) {
    const float x = Half::to_float(a[i]);
    const float y = Half::to_float(b[i]);
    const float r = kOp == 0 ? x + y : kOp == 1 ? std::max(x, y) : std::min(x, y);
    b[i] = Half::from_float(r);
  }
}

class RawMpi {
 public:
  RawMpi() { MPI_Comm_dup(MPI_COMM_WORLD, &comm_); }
  ~RawMpi() {
    for (MPI_Op& op : user_ops_)
      if (op != MPI_OP_NULL) MPI_Op_free(&op);
    MPI_Comm_free(&comm_);
  }
  RawMpi(const RawMpi&) = delete;
  RawMpi& operator=(const RawMpi&) = delete;

  MPI_Comm comm() const { return comm_; }

  static MPI_Datatype datatype(DType dt) {
    switch (dt) {
      case DType::kFloat32:
        return MPI_FLOAT;
      case DType::kFloat64:
        return MPI_DOUBLE;
      case DType::kBFloat16:
      case DType::kFloat16:
        return MPI_UINT16_T;
      case DType::kInt32:
        return MPI_INT32_T;
      case DType::kInt64:
        return MPI_INT64_T;
      case DType::kUInt8:
        return MPI_UINT8_T;
    }
    return MPI_BYTE;
  }

  // MPI has no 16-bit float types: reductions on them use user ops (float math per element).
  MPI_Op op(ReduceOp rop, DType dt) {
    const int k = rop == ReduceOp::kSum ? 0 : rop == ReduceOp::kMax ? 1 : 2;
    if (dt != DType::kBFloat16 && dt != DType::kFloat16)
      return k == 0 ? MPI_SUM : k == 1 ? MPI_MAX : MPI_MIN;
    const int slot = (dt == DType::kBFloat16 ? 0 : 3) + k;
    if (user_ops_[slot] == MPI_OP_NULL) {
      static MPI_User_function* const fns[6] = {half_reduce<bf16_t, 0>, half_reduce<bf16_t, 1>,
                                                half_reduce<bf16_t, 2>, half_reduce<fp16_t, 0>,
                                                half_reduce<fp16_t, 1>, half_reduce<fp16_t, 2>};
      MPI_Op_create(fns[slot], 1, &user_ops_[slot]);
    }
    return user_ops_[slot];
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Op user_ops_[6] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL,
                         MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};
};

void run_raw(RawMpi& raw, const OpSpec& s, const Geometry& g, const void* send, void* recv,
             DType dt, ReduceOp rop, int root, int rank, int n) {
  const MPI_Datatype mt = RawMpi::datatype(dt);
  const int c = static_cast<int>(g.op_count);
  switch (s.op) {
    case CommOp::kAllReduce:
      MPI_Allreduce(send, recv, c, mt, raw.op(rop, dt), raw.comm());
      break;
    case CommOp::kAllGather:
      MPI_Allgather(send, c, mt, recv, c, mt, raw.comm());
      break;
    case CommOp::kReduceScatter:
      MPI_Reduce_scatter_block(send, recv, c, mt, raw.op(rop, dt), raw.comm());
      break;
    case CommOp::kAllToAll:
      MPI_Alltoall(send, c, mt, recv, c, mt, raw.comm());
      break;
    case CommOp::kBroadcast:
      MPI_Bcast(rank == root ? const_cast<void*>(send) : recv, c, mt, root, raw.comm());
      break;
    case CommOp::kSendRecv:
      MPI_Sendrecv(send, c, mt, (rank + 1) % n, 7, recv, c, mt, (rank - 1 + n) % n, 7, raw.comm(),
                   MPI_STATUS_IGNORE);
      break;
  }
}

void run_ours(Communicator& c, const OpSpec& s, const Geometry& g, const void* send, void* recv,
              DType dt, ReduceOp rop, int root) {
  const int rank = c.rank();
  const int n = c.size();
  switch (s.op) {
    case CommOp::kAllReduce:
      c.all_reduce(send, recv, g.op_count, dt, rop);
      break;
    case CommOp::kAllGather:
      c.all_gather(send, recv, g.op_count, dt);
      break;
    case CommOp::kReduceScatter:
      c.reduce_scatter(send, recv, g.op_count, dt, rop);
      break;
    case CommOp::kAllToAll:
      c.all_to_all(send, recv, g.op_count, dt);
      break;
    case CommOp::kBroadcast:
      // In place on root, as MPI_Bcast is: root's data stays in its send buffer (an
      // out-of-place broadcast adds root's copy of the buffer, which raw MPI_Bcast does not do).
      c.broadcast(send, rank == root ? const_cast<void*>(send) : recv, g.op_count, dt, root);
      break;
    case CommOp::kSendRecv: {
      const comm::P2POp ops[2] = {comm::P2POp::send(send, g.op_count, dt, (rank + 1) % n),
                                  comm::P2POp::recv(recv, g.op_count, dt, (rank - 1 + n) % n)};
      c.group(ops);
      break;
    }
  }
}

// Max over ranks of the per-rank mean seconds of `iters` calls, after a barrier.
double time_loop(Communicator& ctl, int iters, const std::function<void()>& call) {
  ctl.barrier();
  const double t0 = now_seconds();
  for (int i = 0; i < iters; ++i) call();
  const double mean = (now_seconds() - t0) / iters;
  return max_over_ranks(ctl, mean);
}

// --raw-mpi, timed as OSU micro-benchmarks and nccl-tests time a collective: `iters`
// back-to-back calls on the same buffers after warm-up, one barrier before the loop. Ours
// and raw run as `rounds` alternating loops each (ours, raw, ours, raw, ...; --rounds,
// default 3), so that both see the same machine load over the row (more, shorter rounds
// follow a drifting load more closely); each time is the max over ranks of the per-rank
// mean over all its loops. Returns {ours, raw}.
std::pair<double, double> time_alternating(Communicator& ctl, int iters, int rounds,
                                           const std::function<void()>& ours,
                                           const std::function<void()>& raw) {
  double sum_ours = 0, sum_raw = 0;
  for (int round = 0; round < rounds; ++round) {
    for (int which = 0; which < 2; ++which) {
      const auto& call = which == 0 ? ours : raw;
      ctl.barrier();
      const double t0 = now_seconds();
      for (int i = 0; i < iters; ++i) call();
      (which == 0 ? sum_ours : sum_raw) += now_seconds() - t0;
    }
  }
  const double calls = static_cast<double>(rounds) * iters;
  return {max_over_ranks(ctl, sum_ours / calls), max_over_ranks(ctl, sum_raw / calls)};
}

ReduceOp parse_redop(const std::string& s) {
  if (s == "sum") return ReduceOp::kSum;
  if (s == "max") return ReduceOp::kMax;
  if (s == "min") return ReduceOp::kMin;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown reduction '", s, "' (use sum, max or min)");
}

std::vector<const OpSpec*> parse_ops(const std::string& list) {
  std::vector<const OpSpec*> out;
  std::stringstream ss(list);
  std::string name;
  while (std::getline(ss, name, ',')) {
    if (name == "all") {
      for (const auto& o : kOps) out.push_back(&o);
      continue;
    }
    const OpSpec* found = nullptr;
    for (const auto& o : kOps)
      if (name == o.name) found = &o;
    DISTATTN_CHECK(found != nullptr, "unknown --op '", name, "' (use ", op_names(),
                   ", or a comma-separated list)");
    out.push_back(found);
  }
  DISTATTN_CHECK(!out.empty(), "--op is empty (use ", op_names(), ")");
  return out;
}

// Sizes b, b*f, ... <= e (or b, b+i, ... with -i).
std::vector<uint64_t> size_sweep(uint64_t b, uint64_t e, double f, uint64_t step) {
  std::vector<uint64_t> out;
  for (uint64_t s = b; s <= e;) {
    out.push_back(s);
    const uint64_t next = step > 0 ? s + step : static_cast<uint64_t>(std::ceil(s * f));
    if (next <= s) break;
    s = next;
  }
  return out;
}

// Owns one buffer on a device (host or CUDA).
class Buffer {
 public:
  Buffer(size_t bytes, Device dev) : dev_(dev), bytes_(std::max<size_t>(bytes, 64)) {
    ptr_ = device_alloc(bytes_, dev_);
  }
  ~Buffer() { device_free(ptr_, dev_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* get() const { return ptr_; }

 private:
  Device dev_;
  size_t bytes_;
  void* ptr_ = nullptr;
};

int run_comm(int argc, char** argv) {
  std::string op_list, dtype_name_arg, backend_arg, device_arg, json_path, redop_arg, minb, maxb,
      stepb;
  double factor = 2;
  int iters = 20, warmup = 5, check = 1, root = 0, rounds = 3;
  bool raw_mpi = false;

  po::options_description desc(
      "distattn-bench comm: bandwidth of the Communicator's collectives (nccl-tests style)");
  // clang-format off
  desc.add_options()
    ("help,h", "this help")
    ("minbytes,b", po::value(&minb)->default_value("8"), "smallest size (bytes; K/M/G suffix)")
    ("maxbytes,e", po::value(&maxb)->default_value("16M"), "largest size (bytes; K/M/G suffix)")
    ("stepfactor,f", po::value(&factor)->default_value(2), "size multiplier between rows (> 1)")
    ("stepbytes,i", po::value(&stepb)->default_value("0"),
     "size increment between rows instead of -f (0: use -f)")
    ("datatype,d", po::value(&dtype_name_arg)->default_value("fp32"),
     "fp32|fp64|bf16|fp16|int32|int64|uint8")
    ("redop,o", po::value(&redop_arg)->default_value("sum"), "sum|max|min (reducing ops)")
    ("root,r", po::value(&root)->default_value(0), "broadcast root")
    ("iters,n", po::value(&iters)->default_value(20), "timed iterations per row")
    ("warmup_iters,w", po::value(&warmup)->default_value(5), "untimed iterations per row")
    ("check,c", po::value(&check)->default_value(1), "1: verify results (#wrong), 0: skip")
    ("op", po::value(&op_list)->default_value("all"),
     "all_reduce|all_gather|reduce_scatter|all_to_all|broadcast|sendrecv|all, or a list a,b")
    ("backend", po::value(&backend_arg)->default_value("auto"), "mpi|nccl|auto")
    ("device", po::value(&device_arg)->default_value("cpu"), "cpu|cuda (buffers' device)")
    ("json", po::value(&json_path)->default_value(""), "write rows to this JSON file")
    ("raw-mpi", po::bool_switch(&raw_mpi),
     "also time the same raw MPI calls on the same buffers (busbw and ours/raw ratio)")
    ("rounds", po::value(&rounds)->default_value(3),
     "--raw-mpi: alternating loops of -n calls each side (ours, raw, ours, ...)");
  // clang-format on
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    DISTATTN_THROW(Status::kInvalidArgument, e.what(), " (see distattn-bench comm --help)");
  }
  const RuntimeInfo& info = runtime_info();
  if (vm.count("help")) {
    if (info.rank == 0) std::cout << desc << "\n";
    return 0;
  }

  const uint64_t min_bytes = parse_size(minb);
  const uint64_t max_bytes = parse_size(maxb);
  const uint64_t step_bytes = parse_size(stepb);
  const DType dt = parse_dtype(dtype_name_arg);
  const ReduceOp rop = parse_redop(redop_arg);
  const comm::Backend backend = comm::parse_backend(backend_arg);
  Device dev = parse_device(device_arg);
  const std::vector<const OpSpec*> ops = parse_ops(op_list);
  DISTATTN_CHECK(min_bytes >= 1 && min_bytes <= max_bytes, "need 1 <= -b (", min_bytes, ") <= -e (",
                 max_bytes, ")");
  DISTATTN_CHECK(step_bytes > 0 || factor > 1.0, "-f must be > 1 (got ", factor,
                 ") unless -i gives a step");
  DISTATTN_CHECK(iters >= 1, "-n must be >= 1 (got ", iters, ")");
  DISTATTN_CHECK(rounds >= 1, "--rounds must be >= 1 (got ", rounds, ")");
  DISTATTN_CHECK(warmup >= 0, "-w must be >= 0 (got ", warmup, ")");
  DISTATTN_CHECK(check == 0 || check == 1, "-c must be 0 or 1 (got ", check, ")");
  DISTATTN_CHECK(root >= 0 && root < info.size, "-r ", root, " is not a rank (0..", info.size - 1,
                 ")");
  if (backend == comm::Backend::kNccl) {
    // In CLI words (not Backend::kMpi): what to type instead.
    DISTATTN_CHECK_STATUS(DISTATTN_WITH_NCCL != 0, Status::kUnsupported,
                          "--backend nccl: this build has no NCCL (configure with "
                          "-DDISTATTN_CUDA=ON on a machine with NCCL); use --backend mpi");
    DISTATTN_CHECK(dev.is_cuda(),
                   "--backend nccl moves GPU memory only and needs --device cuda; use --backend "
                   "mpi for --device cpu");
  }
  if (dev.is_cuda()) {
    DISTATTN_CHECK_STATUS(cuda_device_count() > 0, Status::kUnsupported,
                          "--device cuda but no CUDA device is visible",
                          built_with_cuda() ? "" : " (this build has no CUDA)",
                          "; use --device cpu");
    dev = info.device.is_cuda() ? info.device : Device::cuda(0);
  }
  DISTATTN_CHECK(!(raw_mpi && dev.is_cuda()),
                 "--raw-mpi times host buffers only; use --device cpu with --raw-mpi");

  // The benchmarked communicator, and a separate host one for barriers and reductions of
  // timings and error counts (so the ledger shows only benchmarked traffic, and NCCL, which
  // rejects host memory, needs no special case).
  std::unique_ptr<Communicator> comm = comm::create_world(backend, dev);
  std::unique_ptr<Communicator> ctl = comm::create_world(comm::Backend::kMpi, Device::cpu());
  std::unique_ptr<RawMpi> raw;
  if (raw_mpi) raw = std::make_unique<RawMpi>();
  const int n = comm->size();
  const int rank = comm->rank();
  const size_t elt = dtype_size(dt);
  const DataGen gen = make_gen(dt, n);
  const std::vector<uint64_t> sizes = size_sweep(min_bytes, max_bytes, factor, step_bytes);
  for (const OpSpec* s : ops) {
    // A sweep whose sizes all hold less than one element per rank would print an empty
    // table and exit 0: say what -e must be instead (same decision on every rank).
    const uint64_t need = s->per_rank_blocks ? elt * static_cast<uint64_t>(n) : elt;
    DISTATTN_CHECK(!sizes.empty() && sizes.back() >= need, s->name, ": no size in the sweep (-b ",
                   format_size(min_bytes), " -e ", format_size(max_bytes), ") holds one ",
                   dtype_name(dt), " element", s->per_rank_blocks ? " per rank" : "", " (", need,
                   " bytes", s->per_rank_blocks ? " at " + std::to_string(n) + " ranks" : "",
                   "); use -e ", need, " or more");
  }

  Buffer send_buf(max_bytes, dev), recv_buf(max_bytes, dev);
  std::vector<unsigned char> host_send(std::max<uint64_t>(max_bytes, 64));
  std::vector<unsigned char> host_recv(host_send.size());

  const bool root_prints = rank == 0;
  if (root_prints) {
    std::printf("%s", environment_header().c_str());
    std::printf(
        "# comm: backend %s, device %s, %d ranks, dtype %s, redop %s, root %d, "
        "iters %d, warmup %d, check %d, timeout %.0f s\n",
        comm::backend_name(comm->backend()), dev.str().c_str(), n, dtype_name(dt),
        comm::reduce_op_name(rop), root, iters, warmup, check, comm->timeout().count() / 1000.0);
    std::printf(
        "# time: max over ranks of the per-rank mean; algbw = size/time; "
        "busbw = algbw * op factor (nccl-tests)\n");
  }

  JsonRow header;
  header.set("backend", comm::backend_name(comm->backend()))
      .set("device", dev.str())
      .set("nranks", n)
      .set("type", dtype_name(dt))
      .set("redop", comm::reduce_op_name(rop))
      .set("root", root)
      .set("iters", iters)
      .set("warmup", warmup)
      .set("check", check == 1)
      .set("raw_mpi", raw_mpi)
      .set("rounds", rounds);
  std::vector<JsonRow> rows;
  int64_t wrong_total = 0;
  double busbw_sum = 0;
  int nrows = 0;

  for (const OpSpec* s : ops) {
    if (root_prints) {
      std::printf("#\n# %s", s->name);
      if (s->reduces) std::printf(" (redop %s)", comm::reduce_op_name(rop));
      if (s->op == CommOp::kBroadcast) std::printf(" (root %d)", root);
      std::printf("\n#%11s %13s %6s %10s %9s %9s %7s", "size", "count", "type", "time", "algbw",
                  "busbw", "#wrong");
      if (raw) std::printf(" %9s %9s %7s", "raw time", "raw busbw", "ratio");
      std::printf("\n#%11s %13s %6s %10s %9s %9s %7s", "(B)", "(elements)", "", "(us)", "(GB/s)",
                  "(GB/s)", "");
      if (raw) std::printf(" %9s %9s %7s", "(us)", "(GB/s)", "ours/raw");
      std::printf("\n");
      std::fflush(stdout);
    }
    uint64_t last_bytes = 0;
    for (uint64_t size : sizes) {
      const Geometry g = geometry(*s, size, elt, n);
      if (g.count == 0 || g.bytes == last_bytes) continue;  // too small for n ranks
      last_bytes = g.bytes;

      fill_send(*s, g, gen, dt, rank, host_send.data());
      device_copy(send_buf.get(), dev, host_send.data(), Device::cpu(), g.send * elt);
      const auto call = [&] {
        run_ours(*comm, *s, g, send_buf.get(), recv_buf.get(), dt, rop, root);
      };

      int64_t wrong = 0;
      if (check) {
        for (size_t i = 0; i < g.recv; ++i) store(host_recv.data(), dt, i, kSentinel);
        device_copy(recv_buf.get(), dev, host_recv.data(), Device::cpu(), g.recv * elt);
        call();
        // broadcast runs in place on root: its result is the send buffer.
        const bool bcast_root = s->op == CommOp::kBroadcast && rank == root;
        device_copy(host_recv.data(), Device::cpu(), bcast_root ? send_buf.get() : recv_buf.get(),
                    dev, g.recv * elt);
        for (size_t i = 0; i < g.recv; ++i) {
          const double want = expected(*s, g, gen, dt, rop, root, rank, n, i);
          if (load(host_recv.data(), dt, i) != want) ++wrong;
        }
        wrong = static_cast<int64_t>(sum_over_ranks(*ctl, static_cast<double>(wrong)));
      }
      for (int i = 0; i < warmup; ++i) call();
      double t = 0, raw_t = 0;
      if (raw) {
        const auto raw_call = [&] {
          run_raw(*raw, *s, g, send_buf.get(), recv_buf.get(), dt, rop, root, rank, n);
        };
        for (int i = 0; i < warmup; ++i) raw_call();
        std::tie(t, raw_t) = time_alternating(*ctl, iters, rounds, call, raw_call);
      } else {
        t = time_loop(*ctl, iters, call);
      }

      const double algbw = static_cast<double>(g.bytes) / t / 1e9;
      const double busbw = algbw * bus_factor(s->op, n);
      const double raw_busbw =
          raw ? static_cast<double>(g.bytes) / raw_t / 1e9 * bus_factor(s->op, n) : 0;
      // Ratio of bandwidths = inverse ratio of times (busbw is 0 at one rank).
      const double ratio = raw ? raw_t / t : 0;
      wrong_total += wrong;
      busbw_sum += busbw;
      ++nrows;
      if (root_prints) {
        const std::string wrong_str = check ? std::to_string(wrong) : "N/A";
        std::printf("%12llu %13zu %6s %10.2f %9.3f %9.3f %7s",
                    static_cast<unsigned long long>(g.bytes), g.count, dtype_name(dt), t * 1e6,
                    algbw, busbw, wrong_str.c_str());
        if (raw) std::printf(" %9.2f %9.3f %7.3f", raw_t * 1e6, raw_busbw, ratio);
        std::printf("\n");
        std::fflush(stdout);
        JsonRow row;
        row.set("op", s->name)
            .set("size", g.bytes)
            .set("count", static_cast<uint64_t>(g.count))
            .set("type", dtype_name(dt))
            .set("time_us", t * 1e6)
            .set("algbw", algbw)
            .set("busbw", busbw)
            .set("wrong", check ? wrong : int64_t{-1})
            .set("redop", s->reduces ? comm::reduce_op_name(rop) : "none")
            .set("root", s->op == CommOp::kBroadcast ? root : -1)
            .set("nranks", n);
        if (raw)
          row.set("raw_time_us", raw_t * 1e6).set("raw_busbw", raw_busbw).set("ratio", ratio);
        rows.push_back(row);
      }
    }
  }

  const double avg_busbw = nrows > 0 ? busbw_sum / nrows : 0;
  if (root_prints) {
    std::printf("#\n# Out of bounds values : %lld %s\n", static_cast<long long>(wrong_total),
                wrong_total == 0 ? "OK" : "FAILED");
    std::printf("# Avg bus bandwidth    : %.4f\n#\n", avg_busbw);
    std::printf("# ledger of the benchmarked communicator (rank 0):\n");
    std::istringstream summary(comm->ledger().summary());
    for (std::string line; std::getline(summary, line);) std::printf("#   %s\n", line.c_str());
    std::fflush(stdout);
    header.set("wrong_total", wrong_total).set("avg_busbw", avg_busbw);
    write_json(json_path, "comm", header, rows);
  }
  comm.reset();
  ctl.reset();
  raw.reset();
  return wrong_total == 0 ? 0 : 1;
}

}  // namespace

DISTATTN_BENCH_COMMAND("comm", "bandwidth of all_reduce, all_gather, ... (nccl-tests style)",
                       run_comm);

}  // namespace distattn::bench
