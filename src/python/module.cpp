// distattn._distattn: the nanobind extension under the `distattn` Python package.
//
// A skin over the C++ API: arrays cross as DLPack tensors and become TensorViews over the
// caller's memory (no copies, no implicit conversions: nanobind's import is called with
// convert=false and no dtype/order constraint); every check and every strategy runs in C++;
// distattn::Error becomes distattn.Error (or a subclass by status) with the same message.
// The C++ call runs with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "distattn/comm/bootstrap.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/config.h"
#include "distattn/core/error.h"
#include "distattn/core/tensor_view.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/runtime.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace distattn::python {
namespace {

using comm::Communicator;
using comm::DeviceMesh;
using parallel::ShardRole;
using parallel::SpLayout;
using parallel::SpShape;
using parallel::Strategy;

// ---- errors ------------------------------------------------------------------------------

// Python exception types by status: distattn.Error (RuntimeError) and subclasses that also
// derive from the matching built-in, so `except ValueError` catches bad arguments.
struct ErrorTypes {
  PyObject* base = nullptr;
  PyObject* invalid = nullptr;      // kInvalidArgument: also ValueError
  PyObject* unsupported = nullptr;  // kUnsupported: also NotImplementedError
  PyObject* timeout = nullptr;      // kTimeout: also TimeoutError
  PyObject* remote = nullptr;       // kRemoteError
};
ErrorTypes g_errors;

PyObject* error_type(Status s) {
  switch (s) {
    case Status::kInvalidArgument:
      return g_errors.invalid;
    case Status::kUnsupported:
      return g_errors.unsupported;
    case Status::kTimeout:
      return g_errors.timeout;
    case Status::kRemoteError:
      return g_errors.remote;
    default:
      return g_errors.base;
  }
}

PyObject* new_error_type(nb::module_& m, const char* name, const char* doc, PyObject* extra_base) {
  const std::string qualified = std::string("distattn.") + name;
  PyObject* bases = extra_base == nullptr ? nullptr : PyTuple_Pack(2, g_errors.base, extra_base);
  PyObject* t = PyErr_NewExceptionWithDoc(qualified.c_str(), doc,
                                          bases == nullptr ? PyExc_RuntimeError : bases, nullptr);
  Py_XDECREF(bases);
  if (t == nullptr) throw nb::python_error();
  m.attr(name) = nb::handle(t);
  return t;
}

void register_errors(nb::module_& m) {
  g_errors.base = new_error_type(
      m, "Error",
      "A distattn::Error from the C++ library. str(e) is the C++ what() (with the "
      "'[distattn <status> rank r file:line]' prefix); e.message is the message alone, "
      "e.status the status name, e.rank the rank that raised it (-1 before init).",
      nullptr);
  g_errors.invalid = new_error_type(
      m, "InvalidArgumentError", "Bad input; the message says what to change.", PyExc_ValueError);
  g_errors.unsupported =
      new_error_type(m, "UnsupportedError", "A valid request this build or device cannot do.",
                     PyExc_NotImplementedError);
  g_errors.timeout =
      new_error_type(m, "TimeoutError", "The communication watchdog fired.", PyExc_TimeoutError);
  g_errors.remote = new_error_type(m, "RemoteError",
                                   "Another rank failed or the communicator was aborted.", nullptr);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* type = error_type(e.status());
      nb::object exc = nb::steal(PyObject_CallOneArg(type, nb::str(e.what()).ptr()));
      if (!exc.is_valid()) return;  // the Python error is set
      exc.attr("status") = nb::str(status_name(e.status()));
      exc.attr("rank") = nb::int_(e.rank());
      exc.attr("message") = nb::str(e.message().c_str());
      PyErr_SetObject(type, exc.ptr());
    }
  });
}

// ---- DLPack <-> TensorView --------------------------------------------------------------

using InArray = nb::ndarray<nb::ro>;  // read-only is fine (q, k, v, dout, ...)
using OutArray = nb::ndarray<>;       // written in place: must be writable
using PyArray = nb::ndarray<nb::array_api>;

std::string describe_dtype(nb::dlpack::dtype t) {
  static const char* names[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string s = t.code < 7 ? names[t.code] : "dlpack-code-" + std::to_string(t.code);
  s += std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

// distattn dtypes and their DLPack codes (one lane each), both directions.
struct DTypePair {
  DType dtype;
  nb::dlpack::dtype dl;
};
constexpr uint8_t code(nb::dlpack::dtype_code c) {
  return static_cast<uint8_t>(c);
}
using Code = nb::dlpack::dtype_code;
constexpr DTypePair kDTypes[] = {
    {DType::kFloat32, {code(Code::Float), 32, 1}}, {DType::kFloat64, {code(Code::Float), 64, 1}},
    {DType::kFloat16, {code(Code::Float), 16, 1}}, {DType::kBFloat16, {code(Code::Bfloat), 16, 1}},
    {DType::kInt32, {code(Code::Int), 32, 1}},     {DType::kInt64, {code(Code::Int), 64, 1}},
    {DType::kUInt8, {code(Code::UInt), 8, 1}},
};

DType to_dtype(nb::dlpack::dtype t, const char* name) {
  for (const DTypePair& p : kDTypes)
    if (p.dl == t) return p.dtype;
  DISTATTN_THROW(Status::kInvalidArgument, name, " has element type ", describe_dtype(t),
                 ", which distattn does not take; use float32, bfloat16 or float16 (attention), "
                 "or float64/int32/int64/uint8 (collectives)");
}

nb::dlpack::dtype to_dlpack_dtype(DType t) {
  for (const DTypePair& p : kDTypes)
    if (p.dtype == t) return p.dl;
  DISTATTN_THROW(Status::kInternal, "no DLPack code for dtype ", dtype_name(t));
}

Device to_device(int type, int id, const char* name) {
  switch (type) {
    case nb::device::cpu::value:
    case nb::device::cuda_host::value:  // pinned host memory is host memory
      return Device::cpu();
    case nb::device::cuda::value:
    case nb::device::cuda_managed::value:
      return Device::cuda(id);
    default:
      DISTATTN_THROW(Status::kInvalidArgument, name, " lives on DLPack device type ", type,
                     ", which distattn does not take; pass CPU or CUDA memory (e.g. x.cpu())");
  }
}

template <typename A>
TensorView view_of(const A& a, const char* name) {
  const size_t nd = a.ndim();
  DISTATTN_CHECK(nd <= size_t(kMaxDims), name, " has ", nd, " dims; distattn takes at most ",
                 kMaxDims);
  std::array<int64_t, kMaxDims> shape{}, strides{};
  for (size_t i = 0; i < nd; ++i) {
    shape[i] = int64_t(a.shape(i));
    strides[i] = a.stride(i);
  }
  return TensorView(const_cast<void*>(static_cast<const void*>(a.data())),
                    to_dtype(a.dtype(), name), to_device(a.device_type(), a.device_id(), name),
                    std::span<const int64_t>(shape.data(), nd),
                    std::span<const int64_t>(strides.data(), nd));
}

std::string py_type_name(nb::handle h) {
  return nb::cast<std::string>(nb::type_name(h.type()));
}

// A DLPack argument: the imported array (kept alive for the call) and its view.
template <bool Writable>
struct Arg {
  std::conditional_t<Writable, OutArray, InArray> array;
  TensorView view;

  // Drops the reference to the caller's array; `view` stays (valid while the caller keeps
  // the array alive).
  void release() { array = decltype(array)(); }

  Arg(nb::handle h, const char* name) {
    if (!nb::try_cast(h, array, /*convert=*/false)) {
      if constexpr (Writable) {
        InArray ro;
        DISTATTN_CHECK(!nb::try_cast(h, ro, false), name,
                       " is read-only, but distattn writes its result into it in place; pass a "
                       "writable array (numpy: np.empty_like(x); torch: torch.empty_like(x))");
      }
      DISTATTN_THROW(Status::kInvalidArgument, name,
                     ": expected an array that supports DLPack (__dlpack__/__dlpack_device__: "
                     "torch.Tensor, numpy.ndarray, CuPy or JAX array, or a DLPack capsule), got ",
                     py_type_name(h));
    }
    view = view_of(array, name);
  }
};
using In = Arg<false>;
using Out = Arg<true>;

// An owning array for Python (a Tensor kept alive by the array's capsule).
PyArray to_python(Tensor t) {
  auto* owned = new Tensor(std::move(t));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  const TensorView& v = owned->view();
  std::array<size_t, kMaxDims> shape{};
  for (int i = 0; i < v.ndim; ++i) shape[size_t(i)] = size_t(v.shape[size_t(i)]);
  const int dev = v.device.is_cuda() ? nb::device::cuda::value : nb::device::cpu::value;
  return PyArray(v.data, size_t(v.ndim), shape.data(), owner, v.strides.data(),
                 to_dlpack_dtype(v.dtype), dev, v.device.is_cuda() ? v.device.index : 0);
}

// ---- small conversions ----------------------------------------------------------------

comm::ReduceOp parse_op(const std::string& op) {
  if (op == "sum") return comm::ReduceOp::kSum;
  if (op == "max") return comm::ReduceOp::kMax;
  if (op == "min") return comm::ReduceOp::kMin;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown reduction '", op, "' (use sum, max or min)");
}

ShardRole parse_role(const std::string& r) {
  if (r == "query" || r == "q") return ShardRole::kQuery;
  if (r == "kv" || r == "key_value") return ShardRole::kKeyValue;
  if (r == "lse") return ShardRole::kLse;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown shard role '", r,
                 "' (use 'query' for q/out/dout/dq, 'kv' for k/v/dk/dv, 'lse' for lse)");
}

Stream to_stream(uintptr_t s) {
  return reinterpret_cast<Stream>(s);
}

std::pair<int64_t, int64_t> range(parallel::HeadRange r) {
  return {r.begin, r.end};
}

// The communicators of an SpGroup, kept alive as long as the group (and the mesh they come
// from, if any).
struct Group {
  std::shared_ptr<Communicator> seq;
  std::shared_ptr<Communicator> ulysses;
  std::shared_ptr<DeviceMesh> mesh;

  parallel::SpGroup get() const { return {seq.get(), ulysses.get()}; }
};

// Packed documents, windows and sinks of one call (issue 12); views stay valid for the call.
struct Masks {
  std::vector<int32_t> cu;
  int64_t window_left = -1, window_right = -1, sink_tokens = 0;
  std::optional<In> sinks;
  std::optional<Out> dsinks;

  void apply(parallel::SpOptions& o) const {
    o.cu_seqlens = cu;
    o.window_left = window_left;
    o.window_right = window_right;
    o.sink_tokens = sink_tokens;
    if (sinks) o.sinks = sinks->view;
    if (dsinks) o.dsinks = dsinks->view;
  }
};

Masks masks(std::optional<std::vector<int32_t>> cu, int64_t wl, int64_t wr, int64_t sink_tokens,
            nb::handle sinks, nb::handle dsinks) {
  Masks m;
  if (cu) m.cu = *cu;
  m.window_left = wl;
  m.window_right = wr;
  m.sink_tokens = sink_tokens;
  if (!sinks.is_none()) m.sinks.emplace(sinks, "sinks");
  if (!dsinks.is_none()) m.dsinks.emplace(dsinks, "dsinks");
  return m;
}

parallel::SpOptions options(bool causal, std::optional<float> scale, int64_t heads_q,
                            int64_t heads_kv, uintptr_t stream, bool drive_progress,
                            parallel::SpStats* stats) {
  parallel::SpOptions o;
  o.causal = causal;
  o.softmax_scale = scale;
  o.heads_q = heads_q;
  o.heads_kv = heads_kv;
  o.stream = to_stream(stream);
  o.drive_progress = drive_progress;
  o.stats = stats;
  return o;
}

// SpStats of one call, and the wall time of the whole C++ call (checks to return) measured
// here without the GIL: what the Python layer adds to a call is its wall time minus call_s.
struct CallStats {
  parallel::SpStats sp;
  double call_s = 0;
};

template <typename F>
CallStats run_timed(F&& call) {
  CallStats cs;
  nb::gil_scoped_release release;
  const auto t0 = std::chrono::steady_clock::now();
  call(&cs.sp);
  cs.call_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return cs;
}

// One forward's imported arrays and options, kept for its backward (SavedCall in Python):
// the arrays hold the callers' DLPack tensors alive, so the views stay valid.
struct SavedCall {
  SavedCall(Strategy s, Group g, In q_, In k_, In v_, Out o, Out l, Masks m)
      : strategy(s),
        group(std::move(g)),
        q(std::move(q_)),
        k(std::move(k_)),
        v(std::move(v_)),
        out(std::move(o)),
        lse(std::move(l)),
        masks(std::move(m)) {}
  Strategy strategy;
  Group group;
  In q, k, v;
  Out out, lse;
  Masks masks;
  bool causal = false;
  std::optional<float> scale;
  int64_t heads_q = 0, heads_kv = 0;
  bool drive_progress = true;
  CallStats forward_stats;

  parallel::SpOptions opts(uintptr_t stream, parallel::SpStats* st) const {
    parallel::SpOptions o = options(causal, scale, heads_q, heads_kv, stream, drive_progress, st);
    masks.apply(o);
    return o;
  }
  // out, lse <- sp_attention_forward; its Stats are kept in forward_stats.
  void forward(uintptr_t stream) {
    forward_stats = run_timed([&](parallel::SpStats* st) {
      parallel::sp_attention_forward(strategy, group.get(), q.view, k.view, v.view, out.view,
                                     lse.view, opts(stream, st));
    });
  }
};

// A SavedCall of the arguments of sp_attention_forward (imports and checks them).
std::unique_ptr<SavedCall> saved_call(const std::string& strategy, const Group& g, nb::handle q,
                                      nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                                      bool causal, std::optional<float> scale, int64_t heads_q,
                                      int64_t heads_kv, bool drive_progress,
                                      std::optional<std::vector<int32_t>> cu_seqlens,
                                      int64_t window_left, int64_t window_right,
                                      int64_t sink_tokens, nb::handle sinks) {
  auto c = std::make_unique<SavedCall>(
      parallel::parse_strategy(strategy), g, In(q, "q"), In(k, "k"), In(v, "v"), Out(out, "out"),
      Out(lse, "lse"),
      masks(cu_seqlens, window_left, window_right, sink_tokens, sinks, nb::none()));
  c->causal = causal;
  c->scale = scale;
  c->heads_q = heads_q;
  c->heads_kv = heads_kv;
  c->drive_progress = drive_progress;
  return c;
}

nb::dict ledger_dict(const comm::Ledger& l) {
  nb::dict d;
  for (int k = 0; k < int(comm::OpKind::kCount); ++k) {
    const comm::LedgerEntry& e = l[comm::OpKind(k)];
    if (e.calls == 0) continue;
    nb::dict row;
    row["calls"] = e.calls;
    row["bytes_sent"] = e.bytes_sent;
    row["bytes_recv"] = e.bytes_recv;
    row["seconds"] = e.seconds;
    d[comm::op_kind_name(comm::OpKind(k))] = row;
  }
  return d;
}

// A collective from `send` to `recv`: imports both, then runs `op(send, recv, stream)` with
// the GIL released.
template <typename Op>
void send_recv(nb::handle send, nb::handle recv, uintptr_t stream, Op&& op) {
  const In s(send, "send");
  const Out r(recv, "recv");
  nb::gil_scoped_release release;
  op(s.view, r.view, to_stream(stream));
}

// An op on one buffer (`Writable`: received into): imports it, then runs `op(buf, stream)`
// with the GIL released.
template <bool Writable, typename Op>
void on_buffer(nb::handle buf, uintptr_t stream, Op&& op) {
  const Arg<Writable> b(buf, "buf");
  nb::gil_scoped_release release;
  op(b.view, to_stream(stream));
}

std::shared_ptr<Communicator> share(std::unique_ptr<Communicator> c) {
  return std::shared_ptr<Communicator>(std::move(c));
}

// ---- bindings --------------------------------------------------------------------------

void bind_runtime(nb::module_& m) {
  nb::class_<RuntimeInfo>(m, "RuntimeInfo", "Where this process runs (distattn::RuntimeInfo).")
      .def_ro("rank", &RuntimeInfo::rank)
      .def_ro("size", &RuntimeInfo::size)
      .def_ro("local_rank", &RuntimeInfo::local_rank, "rank among the processes on this node")
      .def_ro("local_size", &RuntimeInfo::local_size)
      .def_ro("hostname", &RuntimeInfo::hostname)
      .def_ro("cuda_devices", &RuntimeInfo::cuda_devices, "visible CUDA devices on this node")
      .def_prop_ro(
          "device", [](const RuntimeInfo& i) { return i.device.str(); },
          "bound device: 'cpu' or 'cuda:N' (N = local_rank % cuda_devices)")
      .def("__repr__", [](const RuntimeInfo& i) {
        return "RuntimeInfo(rank=" + std::to_string(i.rank) + ", size=" + std::to_string(i.size) +
               ", local_rank=" + std::to_string(i.local_rank) + ", host='" + i.hostname +
               "', device='" + i.device.str() + "')";
      });

  m.def(
      "runtime_init",
      [](bool use_gpu, bool verbose) {
        RuntimeOptions o;
        o.use_gpu = use_gpu;
        o.verbose = verbose;
        nb::gil_scoped_release release;
        return runtime_init(nullptr, nullptr, o);
      },
      "use_gpu"_a = false, "verbose"_a = false, nb::rv_policy::copy,
      "Initializes MPI once (MPI_THREAD_MULTIPLE when available) and binds a GPU when "
      "use_gpu; safe to call again. distattn.init() calls it.");
  m.def("runtime_finalize", &runtime_finalize, nb::call_guard<nb::gil_scoped_release>(),
        "Finalizes MPI if runtime_init initialized it (bounded by the watchdog).");
  m.def("runtime_initialized", &runtime_initialized);
  m.def("runtime_info", &runtime_info, nb::rv_policy::copy);
  m.def(
      "view_info",
      [](nb::handle array) {
        const In a(array, "array");
        nb::dict d;
        d["data"] = reinterpret_cast<uintptr_t>(a.view.data);
        d["dtype"] = dtype_name(a.view.dtype);
        d["device"] = a.view.device.str();
        d["shape"] = std::vector<int64_t>(a.view.shape.begin(), a.view.shape.begin() + a.view.ndim);
        d["strides"] =
            std::vector<int64_t>(a.view.strides.begin(), a.view.strides.begin() + a.view.ndim);
        return d;
      },
      "array"_a,
      "The TensorView distattn makes of a DLPack array, as a dict (data pointer, dtype, device, "
      "shape, strides in elements): the caller's memory, never a copy.");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("built_with_nccl", [] { return DISTATTN_WITH_NCCL != 0; });
  m.def("cuda_device_count", &cuda_device_count);
}

void bind_communicator(nb::module_& m) {
  auto c = nb::class_<Communicator>(
      m, "Communicator",
      "A distattn communicator (MPI or NCCL backend). Collectives take DLPack arrays "
      "(packed row-major, on a device the backend accepts) and run with the GIL released; "
      "every op is counted in ledger().");
  c.def("rank", &Communicator::rank)
      .def("size", &Communicator::size)
      .def_prop_ro("backend", [](const Communicator& x) { return comm::backend_name(x.backend()); })
      .def("accepts_device_memory", &Communicator::accepts_device_memory)
      .def("accepts_host_memory", &Communicator::accepts_host_memory)
      .def(
          "all_reduce",
          [](Communicator& x, nb::handle send, nb::handle recv, const std::string& op,
             uintptr_t stream) {
            const comm::ReduceOp rop = parse_op(op);
            if (recv.is_none()) {  // in place: send is written, so it must be writable
              const Out s(send, "send");
              nb::gil_scoped_release release;
              x.all_reduce(s.view, s.view, rop, to_stream(stream));
              return;
            }
            send_recv(send, recv, stream,
                      [&](auto& s, auto& r, Stream st) { x.all_reduce(s, r, rop, st); });
          },
          "send"_a, "recv"_a = nb::none(), "op"_a = "sum", "stream"_a = 0,
          "recv <- reduction of send over ranks (op: sum, max, min); in place when recv is None.")
      .def(
          "all_gather",
          [](Communicator& x, nb::handle send, nb::handle recv, uintptr_t stream) {
            send_recv(send, recv, stream,
                      [&](auto& s, auto& r, Stream st) { x.all_gather(s, r, st); });
          },
          "send"_a, "recv"_a, "stream"_a = 0,
          "recv (size() * send.numel() elements) <- every rank's send, rank r's block at r.")
      .def(
          "reduce_scatter",
          [](Communicator& x, nb::handle send, nb::handle recv, const std::string& op,
             uintptr_t stream) {
            const comm::ReduceOp rop = parse_op(op);
            send_recv(send, recv, stream,
                      [&](auto& s, auto& r, Stream st) { x.reduce_scatter(s, r, rop, st); });
          },
          "send"_a, "recv"_a, "op"_a = "sum", "stream"_a = 0,
          "recv <- reduction over ranks of block rank() of send (size() * recv.numel()).")
      .def(
          "all_to_all",
          [](Communicator& x, nb::handle send, nb::handle recv, uintptr_t stream) {
            send_recv(send, recv, stream,
                      [&](auto& s, auto& r, Stream st) { x.all_to_all(s, r, st); });
          },
          "send"_a, "recv"_a, "stream"_a = 0, "Block j of send goes to rank j.")
      .def(
          "broadcast",
          [](Communicator& x, nb::handle buf, int root, uintptr_t stream) {
            on_buffer<true>(buf, stream, [&](auto& b, Stream st) { x.broadcast(b, b, root, st); });
          },
          "buf"_a, "root"_a = 0, "stream"_a = 0, "buf <- root's buf (in place).")
      .def(
          "send",
          [](Communicator& x, nb::handle buf, int peer, uintptr_t stream) {
            on_buffer<false>(buf, stream, [&](auto& b, Stream st) { x.send(b, peer, st); });
          },
          "buf"_a, "peer"_a, "stream"_a = 0)
      .def(
          "recv",
          [](Communicator& x, nb::handle buf, int peer, uintptr_t stream) {
            on_buffer<true>(buf, stream, [&](auto& b, Stream st) { x.recv(b, peer, st); });
          },
          "buf"_a, "peer"_a, "stream"_a = 0)
      .def("barrier", &Communicator::barrier, nb::call_guard<nb::gil_scoped_release>())
      .def(
          "split",
          [](Communicator& x, std::optional<int> color, int key) {
            nb::gil_scoped_release release;
            return share(x.split(color ? *color : Communicator::kNoColor, key));
          },
          "color"_a, "key"_a = 0,
          "Ranks with the same color form a new communicator ordered by (key, old rank); "
          "color=None joins none and returns None. Collective.")
      .def("abort", &Communicator::abort,
           "Marks the communicator unusable (later ops raise RemoteError).")
      .def_prop_ro("aborted", &Communicator::aborted)
      .def_prop_rw(
          "timeout", [](const Communicator& x) { return x.timeout().count() / 1000.0; },
          [](Communicator& x, double s) {
            DISTATTN_CHECK(s > 0, "timeout must be positive seconds, got ", s);
            x.set_timeout(std::chrono::milliseconds(int64_t(s * 1000)));
          },
          "watchdog timeout in seconds (DISTATTN_COMM_TIMEOUT_S)")
      .def(
          "ledger", [](const Communicator& x) { return ledger_dict(x.ledger()); },
          "Per-op accounting: {op: {calls, bytes_sent, bytes_recv, seconds}} for ops with calls.")
      .def(
          "ledger_summary", [](const Communicator& x) { return x.ledger().summary(); },
          "One line per op kind with calls > 0.")
      .def(
          "reset_ledger", [](Communicator& x) { x.ledger().reset(); }, "Zeroes the ledger.")
      .def("__repr__",
           [](const Communicator& x) {
             return std::string("<distattn.Communicator ") + comm::backend_name(x.backend()) +
                    " rank " + std::to_string(x.rank()) + "/" + std::to_string(x.size()) + ">";
           })
      .def_static(
          "from_mpi4py",
          [](nb::handle mpi4py_comm) {
            // comm.py2f(): the Fortran handle, MPI's portable integer form of a communicator.
            const int64_t fint = nb::cast<int64_t>(mpi4py_comm.attr("py2f")());
            runtime_init(nullptr, nullptr);  // MPI is up (mpi4py); record rank and placement
            nb::gil_scoped_release release;
            return share(comm::create_mpi_communicator(fint));
          },
          "comm"_a,
          "A duplicate of an mpi4py communicator (collective over it). mpi4py must use the "
          "same MPI library as distattn.")
      .def_static(
          "from_nccl_id",
          [](nb::bytes id, int rank, int size, int device) {
            const auto* p = static_cast<const uint8_t*>(id.data());
            const std::vector<uint8_t> bytes(p, p + id.size());
            nb::gil_scoped_release release;
            return share(comm::create_nccl_communicator(bytes, rank, size, Device::cuda(device)));
          },
          "id"_a, "rank"_a, "size"_a, "device"_a,
          "Rank `rank` of a `size`-rank NCCL communicator on cuda:`device`, from the bytes of "
          "nccl_unique_id() created on one rank and sent to all (collective). "
          "distattn.torch.nccl_communicator() does the exchange over a torch.distributed group.");

  m.def(
      "create_world",
      [](const std::string& backend, std::optional<std::string> device) {
        const Device d = device ? parse_device(*device) : runtime_info().device;
        const comm::Backend b = comm::parse_backend(backend);
        nb::gil_scoped_release release;
        return share(comm::create_world(b, d));
      },
      "backend"_a = "auto", "device"_a = nb::none(),
      "The world communicator (runtime_init first). backend: auto | mpi | nccl; device: "
      "'cpu', 'cuda[:N]' or None for the runtime's bound device.");
  m.def(
      "nccl_unique_id",
      [] {
        const std::vector<uint8_t> id = comm::nccl_unique_id();
        return nb::bytes(reinterpret_cast<const char*>(id.data()), id.size());
      },
      "A fresh NCCL unique id (128 bytes); raises UnsupportedError when built without NCCL.");

  nb::class_<DeviceMesh>(m, "DeviceMesh",
                         "Named axes over a communicator, row-major (the LAST axis is innermost "
                         "= adjacent ranks): DeviceMesh(world, [('ring', 2), ('ulysses', 2)]).")
      .def(nb::new_([](std::shared_ptr<Communicator> world,
                       std::vector<std::pair<std::string, int>> axes) {
             nb::gil_scoped_release release;
             return std::make_shared<DeviceMesh>(std::move(world), std::move(axes));
           }),
           "world"_a, "axes"_a, "Collective over world; the axis sizes must multiply to its size.")
      .def("world", &DeviceMesh::world_ptr)
      .def_prop_ro("axes", &DeviceMesh::axes)
      .def("size", &DeviceMesh::size, "axis"_a)
      .def("coord", &DeviceMesh::coord, "axis"_a, "this rank's coordinate along axis")
      .def("coords", &DeviceMesh::coords)
      .def("comm", &DeviceMesh::comm_ptr, "axis"_a,
           "Communicator over the ranks that differ from this one only along axis.")
      .def("rank_of", &DeviceMesh::rank_of, "coords"_a)
      .def("__str__", &DeviceMesh::str)
      .def("__repr__", [](const DeviceMesh& x) { return "<distattn.DeviceMesh " + x.str() + ">"; });
}

void bind_layout(nb::module_& m) {
  m.def(
      "strategies",
      [] {
        std::vector<std::string> out;
        for (Strategy s : parallel::all_strategies()) out.emplace_back(parallel::strategy_name(s));
        return out;
      },
      "All strategy names, as parse_strategy accepts them.");
  m.def(
      "parse_strategy",
      [](const std::string& name) {
        return std::string(parallel::strategy_name(parallel::parse_strategy(name)));
      },
      "name"_a, "The canonical strategy name; raises InvalidArgumentError listing the names.");

  nb::class_<SpLayout>(m, "Layout",
                       "How a problem is laid out over ranks (SpLayout): strategy, ranks and, "
                       "for hybrid, the Ulysses degree (ring degree = ranks / ulysses).")
      .def(
          "__init__",
          [](SpLayout* self, const std::string& strategy, int ranks, int ulysses) {
            new (self) SpLayout{parallel::parse_strategy(strategy), ranks, ulysses};
          },
          "strategy"_a, "ranks"_a, "ulysses"_a = 1)
      .def_prop_ro("strategy",
                   [](const SpLayout& l) { return parallel::strategy_name(l.strategy); })
      .def_ro("ranks", &SpLayout::ranks)
      .def_ro("ulysses", &SpLayout::ulysses)
      .def("ring_degree", &SpLayout::ring_degree)
      .def("ulysses_degree", &SpLayout::ulysses_degree)
      .def("__repr__", [](const SpLayout& l) {
        return std::string("Layout('") + parallel::strategy_name(l.strategy) +
               "', ranks=" + std::to_string(l.ranks) + ", ulysses=" + std::to_string(l.ulysses) +
               ")";
      });

  nb::class_<SpShape>(m, "Shape",
                      "Global problem extents (full tensors); head_dim_v=0 means head_dim.")
      .def(
          "__init__",
          [](SpShape* self, int64_t batch, int64_t seq, int64_t heads_q, int64_t heads_kv,
             int64_t head_dim, int64_t head_dim_v) {
            new (self) SpShape{batch, seq, heads_q, heads_kv, head_dim, head_dim_v};
          },
          "batch"_a, "seq"_a, "heads_q"_a, "heads_kv"_a, "head_dim"_a, "head_dim_v"_a = 0)
      .def_rw("batch", &SpShape::batch)
      .def_rw("seq", &SpShape::seq)
      .def_rw("heads_q", &SpShape::heads_q)
      .def_rw("heads_kv", &SpShape::heads_kv)
      .def_rw("head_dim", &SpShape::head_dim)
      .def_rw("head_dim_v", &SpShape::head_dim_v)
      .def_rw("cu_seqlens", &SpShape::cu_seqlens,
              "packed documents (n_docs + 1 int offsets, batch 1); [] = one document")
      .def_rw("min_split_chunk", &SpShape::min_split_chunk)
      .def("dim_v", &SpShape::dim_v)
      .def("__repr__", [](const SpShape& s) {
        return "Shape(batch=" + std::to_string(s.batch) + ", seq=" + std::to_string(s.seq) +
               ", heads_q=" + std::to_string(s.heads_q) +
               ", heads_kv=" + std::to_string(s.heads_kv) +
               ", head_dim=" + std::to_string(s.head_dim) +
               ", head_dim_v=" + std::to_string(s.head_dim_v) + ")";
      });

  m.def("check_layout", &parallel::check_layout, "layout"_a, "shape"_a,
        "Raises InvalidArgumentError naming the multiple a sequence length must have, or the "
        "bad head counts.");
  m.def(
      "local_seq_len",
      [](const SpLayout& l, int64_t global_seq) { return parallel::local_seq_len(l, global_seq); },
      "layout"_a, "global_seq"_a, "Local sequence length of every rank.");
  m.def(
      "token_positions",
      [](const std::string& strategy, int64_t global_seq, int ranks, int rank) {
        return parallel::token_positions(parallel::parse_strategy(strategy), global_seq, ranks,
                                         rank);
      },
      "strategy"_a, "global_seq"_a, "ranks"_a, "rank"_a,
      "Global positions (list of int) of rank's local rows, in local row order (for RoPE).");
  m.def(
      "token_positions",
      [](const SpLayout& l, int64_t global_seq, int rank) {
        return parallel::token_positions(l, global_seq, rank);
      },
      "layout"_a, "global_seq"_a, "rank"_a);
  m.def(
      "split_heads",
      [](int64_t heads, int parts, int rank) {
        return range(parallel::split_heads(heads, parts, rank));
      },
      "heads"_a, "parts"_a, "rank"_a, "(begin, end) of rank's balanced share of heads.");
  m.def(
      "local_query_heads",
      [](const SpLayout& l, const SpShape& s, int rank) {
        return range(parallel::local_query_heads(l, s, rank));
      },
      "layout"_a, "shape"_a, "rank"_a, "(begin, end): heads: its split; others: all heads.");
  m.def(
      "local_kv_heads",
      [](const SpLayout& l, const SpShape& s, int rank) {
        return range(parallel::local_kv_heads(l, s, rank));
      },
      "layout"_a, "shape"_a, "rank"_a,
      "(begin, end): heads: the KV heads its queries use; others: all KV heads.");
  m.def(
      "shard",
      [](const SpLayout& l, const SpShape& s, int rank, const std::string& role, nb::handle full) {
        const In f(full, "full");
        const ShardRole r = parse_role(role);
        Tensor t;
        {
          nb::gil_scoped_release release;
          t = parallel::shard(l, s, rank, r, f.view);
        }
        return to_python(std::move(t));
      },
      "layout"_a, "shape"_a, "rank"_a, "role"_a, "full"_a,
      "rank's shard of a full tensor as a new packed array (DLPack) on full's device. role: "
      "'query' (q, out, dout, dq [B, S, Hq, D]), 'kv' (k, v, dk, dv), 'lse' (fp32 [B, Hq, S]).");
  m.def(
      "unshard_into",
      [](const SpLayout& l, const SpShape& s, int rank, const std::string& role, nb::handle local,
         nb::handle full, bool accumulate) {
        const In lo(local, "local");
        const Out f(full, "full");
        const ShardRole r = parse_role(role);
        nb::gil_scoped_release release;
        parallel::unshard_into(l, s, rank, r, lo.view, f.view, accumulate);
      },
      "layout"_a, "shape"_a, "rank"_a, "role"_a, "local"_a, "full"_a, "accumulate"_a = false,
      "Writes (or adds, accumulate=True; fp32/fp64) rank's local shard into its place in full.");
  m.def("rank_forward_flops", &parallel::rank_forward_flops, "layout"_a, "shape"_a, "rank"_a,
        "causal"_a);
}

void bind_attention(nb::module_& m) {
  nb::class_<Group>(m, "Group",
                    "The communicators a strategy runs over (SpGroup): flat(comm) for 1-D "
                    "strategies, from_mesh(mesh) for hybrid (ring and ulysses axes).")
      .def_static(
          "flat",
          [](std::shared_ptr<Communicator> c) {
            return Group{std::move(c), nullptr, nullptr};
          },
          "comm"_a)
      .def_static(
          "from_mesh",
          [](std::shared_ptr<DeviceMesh> mesh, const std::string& ring_axis,
             const std::string& ulysses_axis) {
            return Group{mesh->comm_ptr(ring_axis), mesh->comm_ptr(ulysses_axis), mesh};
          },
          "mesh"_a, "ring_axis"_a = "ring", "ulysses_axis"_a = "ulysses")
      .def_prop_ro("seq", [](const Group& g) { return g.seq; })
      .def_prop_ro("ulysses", [](const Group& g) { return g.ulysses; })
      .def(
          "layout",
          [](const Group& g, const std::string& s) {
            return g.get().layout(parallel::parse_strategy(s));
          },
          "strategy"_a, "The Layout these communicators give a strategy.")
      .def(
          "layout_rank",
          [](const Group& g, const std::string& s) {
            return g.get().layout_rank(parallel::parse_strategy(s));
          },
          "strategy"_a, "This rank's layout rank (hybrid: ring_rank * U + ulysses_rank).");

  nb::class_<CallStats>(m, "Stats",
                        "Where the time of one call went on this rank (SpStats), and call_s.")
      .def_prop_ro("total_s", [](const CallStats& c) { return c.sp.total_s; })
      .def_prop_ro("exposed_comm_s", [](const CallStats& c) { return c.sp.exposed_comm_s; })
      .def_prop_ro("compute_s", [](const CallStats& c) { return c.sp.compute_s; })
      .def_prop_ro("steps", [](const CallStats& c) { return c.sp.steps; })
      .def_prop_ro("visible_pairs", [](const CallStats& c) { return c.sp.visible_pairs; })
      .def_ro("call_s", &CallStats::call_s,
              "wall seconds of the whole C++ call (checks included), timed by the binding")
      .def("__repr__", [](const CallStats& c) {
        return "Stats(total_s=" + std::to_string(c.sp.total_s) +
               ", exposed_comm_s=" + std::to_string(c.sp.exposed_comm_s) +
               ", compute_s=" + std::to_string(c.sp.compute_s) +
               ", steps=" + std::to_string(c.sp.steps) + ", call_s=" + std::to_string(c.call_s) +
               ")";
      });

  m.def(
      "sp_attention_forward",
      [](const std::string& strategy, const Group& g, nb::handle q, nb::handle k, nb::handle v,
         nb::handle out, nb::handle lse, bool causal, std::optional<float> scale, int64_t heads_q,
         int64_t heads_kv, uintptr_t stream, bool drive_progress,
         std::optional<std::vector<int32_t>> cu_seqlens, int64_t window_left, int64_t window_right,
         int64_t sink_tokens, nb::handle sinks) {
        const std::unique_ptr<SavedCall> c =
            saved_call(strategy, g, q, k, v, out, lse, causal, scale, heads_q, heads_kv,
                       drive_progress, cu_seqlens, window_left, window_right, sink_tokens, sinks);
        c->forward(stream);
        return c->forward_stats;
      },
      "strategy"_a, "group"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, nb::kw_only(),
      "causal"_a = false, "softmax_scale"_a = nb::none(), "heads_q"_a = 0, "heads_kv"_a = 0,
      "stream"_a = 0, "drive_progress"_a = true, "cu_seqlens"_a = nb::none(), "window_left"_a = -1,
      "window_right"_a = -1, "sink_tokens"_a = 0, "sinks"_a = nb::none(),
      "out, lse <- exact attention of the local queries over all keys of the global sequence "
      "(sp_attention_forward). Written in place; returns Stats.");
  m.def(
      "sp_attention_backward",
      [](const std::string& strategy, const Group& g, nb::handle q, nb::handle k, nb::handle v,
         nb::handle out, nb::handle dout, nb::handle lse, nb::handle dq, nb::handle dk,
         nb::handle dv, bool causal, std::optional<float> scale, int64_t heads_q, int64_t heads_kv,
         uintptr_t stream, bool drive_progress, std::optional<std::vector<int32_t>> cu_seqlens,
         int64_t window_left, int64_t window_right, int64_t sink_tokens, nb::handle sinks,
         nb::handle dsinks) {
        const Strategy s = parallel::parse_strategy(strategy);
        const In aq(q, "q"), ak(k, "k"), av(v, "v"), ao(out, "out"), ado(dout, "dout"),
            al(lse, "lse");
        const Out adq(dq, "dq"), adk(dk, "dk"), adv(dv, "dv");
        const Masks m = masks(cu_seqlens, window_left, window_right, sink_tokens, sinks, dsinks);
        return run_timed([&](parallel::SpStats* st) {
          parallel::SpOptions o =
              options(causal, scale, heads_q, heads_kv, stream, drive_progress, st);
          m.apply(o);
          parallel::sp_attention_backward(s, g.get(), aq.view, ak.view, av.view, ao.view, ado.view,
                                          al.view, adq.view, adk.view, adv.view, o);
        });
      },
      "strategy"_a, "group"_a, "q"_a, "k"_a, "v"_a, "out"_a, "dout"_a, "lse"_a, "dq"_a, "dk"_a,
      "dv"_a, nb::kw_only(), "causal"_a = false, "softmax_scale"_a = nb::none(), "heads_q"_a = 0,
      "heads_kv"_a = 0, "stream"_a = 0, "drive_progress"_a = true, "cu_seqlens"_a = nb::none(),
      "window_left"_a = -1, "window_right"_a = -1, "sink_tokens"_a = 0, "sinks"_a = nb::none(),
      "dsinks"_a = nb::none(),
      "dq, dk, dv <- gradients for the local shards from the forward's out and lse "
      "(sp_attention_backward). Written in place; returns Stats.");

  nb::class_<SavedCall>(
      m, "SavedCall",
      "One sp_attention_forward that keeps its imported q, k, v, out, lse (the caller's "
      "memory, never copied) and options for the backward (distattn.torch's autograd "
      "Function): backward() imports only dout and the gradients.")
      .def_ro("stats", &SavedCall::forward_stats, "Stats of the forward")
      .def(
          "backward",
          [](const SavedCall& c, nb::handle dout, nb::handle dq, nb::handle dk, nb::handle dv,
             uintptr_t stream, nb::handle dsinks) {
            const In ado(dout, "dout");
            const Out adq(dq, "dq"), adk(dk, "dk"), adv(dv, "dv");
            std::optional<Out> ads;
            if (!dsinks.is_none()) ads.emplace(dsinks, "dsinks");
            return run_timed([&](parallel::SpStats* st) {
              parallel::SpOptions o = c.opts(stream, st);
              if (ads) o.dsinks = ads->view;
              parallel::sp_attention_backward(c.strategy, c.group.get(), c.q.view, c.k.view,
                                              c.v.view, c.out.view, ado.view, c.lse.view, adq.view,
                                              adk.view, adv.view, o);
            });
          },
          "dout"_a, "dq"_a, "dk"_a, "dv"_a, "stream"_a = 0, "dsinks"_a = nb::none(),
          "dq, dk, dv (and dsinks) <- sp_attention_backward of the saved forward. Returns "
          "Stats.");
  m.def(
      "sp_attention_forward_saved",
      [](const std::string& strategy, const Group& g, nb::handle q, nb::handle k, nb::handle v,
         nb::handle out, nb::handle lse, bool causal, std::optional<float> scale, int64_t heads_q,
         int64_t heads_kv, uintptr_t stream, bool drive_progress,
         std::optional<std::vector<int32_t>> cu_seqlens, int64_t window_left, int64_t window_right,
         int64_t sink_tokens, nb::handle sinks, bool keep_arrays) {
        auto c =
            saved_call(strategy, g, q, k, v, out, lse, causal, scale, heads_q, heads_kv,
                       drive_progress, cu_seqlens, window_left, window_right, sink_tokens, sinks);
        c->forward(stream);
        if (!keep_arrays) {
          c->q.release();
          c->k.release();
          c->v.release();
          c->out.release();
          c->lse.release();
        }
        return c;
      },
      "strategy"_a, "group"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "causal"_a = false,
      "softmax_scale"_a = nb::none(), "heads_q"_a = 0, "heads_kv"_a = 0, "stream"_a = 0,
      "drive_progress"_a = true, "cu_seqlens"_a = nb::none(), "window_left"_a = -1,
      "window_right"_a = -1, "sink_tokens"_a = 0, "sinks"_a = nb::none(), "keep_arrays"_a = true,
      "sp_attention_forward (arguments in order, no keywords needed), returning a SavedCall "
      "whose backward() reuses this call's q, k, v, out, lse and options. keep_arrays=False "
      "drops the SavedCall's references to those arrays (their views stay): the caller must "
      "then keep them alive until the last backward() (distattn.torch's autograd Function "
      "does: they are its saved tensors, and autograd frees them right after the backward).");
}

}  // namespace
}  // namespace distattn::python

NB_MODULE(_distattn, m) {
  using namespace distattn::python;
  m.doc() = "distattn C++ bindings (use the `distattn` package, not this module directly).";
  // Module-level caches (the world communicator) may outlive interpreter teardown order.
  nb::set_leak_warnings(false);
  register_errors(m);
  bind_runtime(m);
  bind_communicator(m);
  bind_layout(m);
  bind_attention(m);
}
