// Every collective x every dtype x sizes {0, 1, 7, 1000, 1<<20}, in place and out of place,
// against fp64 references (exact for integers and for pure data movement).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/half.h"

namespace distattn::comm {
namespace {

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16,
                                DType::kInt32,   DType::kInt64,   DType::kUInt8};

Communicator& world() {
  static std::unique_ptr<Communicator> w = create_world(Backend::kMpi, Device::cpu());
  return *w;
}

// Every dtype at every size, 1<<20 included (the long-message paths of each MPI type and
// the fp32 widening of bf16/fp16 at size); the big size skips only repetitions (min/max
// and some in-place forms) that the small sizes already cover.
std::vector<size_t> sizes_for(DType) {
  return {0, 1, 7, 1000, size_t{1} << 20};
}

// At 1<<20, the in-place form only for a float, a 16-bit float and an integer type: the
// in-place code paths do not depend on the dtype and the small sizes cover them all.
bool skip_big_in_place(DType t, size_t count, bool in_place) {
  return in_place && count == (size_t{1} << 20) && t != DType::kFloat32 && t != DType::kBFloat16 &&
         t != DType::kInt32;
}

// Element i of rank r's buffer (tensor `salt`), exactly representable in t; integers are
// small enough that a sum over 4 ranks is exact (uint8 included).
double value(DType t, int r, size_t i, uint64_t salt) {
  // A pure function of (salt, rank, index) like testing::test_value, but one mixing round
  // instead of three: the 2^20-element references dominate this test's run time.
  uint64_t h = (i + 1) * 0x9e3779b97f4a7c15ull ^
               (static_cast<uint64_t>(r) + 1) * 0xc2b2ae3d27d4eb4full ^
               (salt + 1) * 0x165667b19e3779f9ull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  const double v = static_cast<double>(h >> 11) * (2.0 / 9007199254740992.0) - 1.0;
  switch (t) {
    case DType::kFloat32:
      return static_cast<float>(v);
    case DType::kFloat64:
      return v;
    case DType::kBFloat16:
      return bf16_t::to_float(bf16_t::from_float(static_cast<float>(v)));
    case DType::kFloat16:
      return fp16_t::to_float(fp16_t::from_float(static_cast<float>(v)));
    case DType::kInt32:
    case DType::kInt64:
      return std::floor(v * 1000);
    case DType::kUInt8:
      return std::floor((v + 1) * 30);
  }
  return 0;
}

void store(void* p, DType t, size_t i, double v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case DType::kFloat64:
      static_cast<double*>(p)[i] = v;
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = bf16_t::from_float(static_cast<float>(v));
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(p)[i] = fp16_t::from_float(static_cast<float>(v));
      break;
    case DType::kInt32:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
      break;
    case DType::kInt64:
      static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v);
      break;
    case DType::kUInt8:
      static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v);
      break;
  }
}

double load(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::kFloat32:
      return static_cast<const float*>(p)[i];
    case DType::kFloat64:
      return static_cast<const double*>(p)[i];
    case DType::kBFloat16:
      return bf16_t::to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat16:
      return fp16_t::to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kInt32:
      return static_cast<const int32_t*>(p)[i];
    case DType::kInt64:
      return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kUInt8:
      return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}

struct Buf {
  std::vector<char> bytes;
  DType t;
  Buf(size_t n, DType dt) : bytes(std::max<size_t>(n, 1) * dtype_size(dt), 0), t(dt) {}
  void* data() { return bytes.data(); }
  void* at(size_t i) { return bytes.data() + i * dtype_size(t); }
  double get(size_t i) const { return load(bytes.data(), t, i); }
  void set(size_t i, double v) { store(bytes.data(), t, i, v); }
};

double reduce_ref(ReduceOp op, DType t, int n, size_t i, uint64_t salt, size_t stride_offset = 0) {
  double acc = value(t, 0, i + stride_offset, salt);
  for (int r = 1; r < n; ++r) {
    const double v = value(t, r, i + stride_offset, salt);
    acc = op == ReduceOp::kSum   ? acc + v
          : op == ReduceOp::kMax ? std::max(acc, v)
                                 : std::min(acc, v);
  }
  return acc;
}

// Allowed |got - ref| for a reduction: exact for integers and min/max; for sums, the
// rounding of the fp64 sum to the storage type plus fp32 accumulation error.
double tolerance(DType t, ReduceOp op, double ref, int n) {
  if (!dtype_is_floating(t) || op != ReduceOp::kSum) return 0;
  switch (t) {
    case DType::kFloat64:
      return 1e-14 * n;
    case DType::kFloat32:
      return 1e-6 * n;
    case DType::kBFloat16:
      return std::ldexp(std::fabs(ref), -8) + 1e-6 * n;
    case DType::kFloat16:
      return std::ldexp(std::fabs(ref), -11) + std::ldexp(1.0, -24) + 1e-6 * n;
    default:
      return 0;
  }
}

std::string label(const char* op, DType t, size_t count, bool in_place) {
  return std::string(op) + " " + dtype_name(t) + " count=" + std::to_string(count) +
         (in_place ? " in-place" : " out-of-place") + " rank " + std::to_string(world().rank());
}

void check_all_reduce(Communicator& c, DType t, ReduceOp op, size_t count, bool in_place,
                      uint64_t salt) {
  const int n = c.size(), me = c.rank();
  Buf send(count, t), recv(count, t);
  for (size_t i = 0; i < count; ++i) send.set(i, value(t, me, i, salt));
  if (in_place) {
    c.all_reduce(send.data(), send.data(), count, t, op);
  } else {
    c.all_reduce(send.data(), recv.data(), count, t, op);
    for (size_t i = 0; i < count; ++i)  // the input is untouched
      ASSERT_EQ(send.get(i), value(t, me, i, salt)) << label("all_reduce", t, count, false);
  }
  const Buf& out = in_place ? send : recv;
  double worst = 0;
  for (size_t i = 0; i < count; ++i) {
    const double ref = reduce_ref(op, t, n, i, salt);
    const double got = out.get(i);
    ASSERT_TRUE(std::isfinite(got)) << label("all_reduce", t, count, in_place) << " i=" << i;
    const double err = std::fabs(got - ref);
    ASSERT_LE(err, tolerance(t, op, ref, n))
        << label("all_reduce", t, count, in_place) << " " << reduce_op_name(op) << " i=" << i
        << " got " << got << " want " << ref;
    worst = std::max(worst, err);
  }
}

TEST(Collectives, AllReduceEveryDTypeOpSizeAndPlacement) {
  Communicator& c = world();
  uint64_t salt = 0;
  for (DType t : kAllDTypes) {
    for (size_t count : sizes_for(t)) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
        if (count == (1u << 20) && op != ReduceOp::kSum) continue;
        for (bool in_place : {false, true}) {
          if (skip_big_in_place(t, count, in_place)) continue;
          check_all_reduce(c, t, op, count, in_place, ++salt);
        }
      }
    }
  }
}

TEST(Collectives, Bf16SumAccumulatesInFp32) {
  // 1 + n * 2^-9 is 1 + something in fp32 but each pairwise bf16 add of 2^-9 to 1 rounds
  // back to 1 (round half to even): only fp32 accumulation reaches 1 + n*2^-9 rounded.
  Communicator& c = world();
  const int n = c.size();
  if (n < 3) GTEST_SKIP() << "needs >= 3 ranks to separate fp32 from pairwise bf16 sums";
  std::vector<uint16_t> v(1, bf16_t::from_float(c.rank() == 0 ? 1.0f : std::ldexp(1.0f, -8)));
  c.all_reduce(v.data(), v.data(), 1, DType::kBFloat16, ReduceOp::kSum);
  const double exact = 1.0 + (n - 1) * std::ldexp(1.0, -8);
  EXPECT_EQ(bf16_t::to_float(v[0]),
            bf16_t::to_float(bf16_t::from_float(static_cast<float>(exact))));
}

// Element i of rank q's input: 1 on rank 0, else 2^-9 (bf16) or 2^-12 (fp16) times a small
// factor: pairwise 16-bit adds to 1 round the small terms away, only fp32 accumulation keeps
// them. The expected sum is the fp64 sum rounded once (exact in fp32 for these values).
double staged_term(int q, size_t i, DType t) {
  if (q == 0) return 1.0;
  return std::ldexp(1.0, t == DType::kBFloat16 ? -9 : -12) * static_cast<double>(1 + i % 3);
}
uint16_t to_half(double v, DType t) {
  return t == DType::kBFloat16 ? bf16_t::from_float(static_cast<float>(v))
                               : fp16_t::from_float(static_cast<float>(v));
}
float from_half(uint16_t v, DType t) {
  return t == DType::kBFloat16 ? bf16_t::to_float(v) : fp16_t::to_float(v);
}

TEST(Collectives, HalfSumsMoveHalfDataAndAccumulateInFp32) {
  // bf16/fp16 sums over > 2 ranks: all-to-all + fp32 sum + second stage (all_reduce), for
  // counts that do not divide by the ranks (empty blocks too), in and out of place.
  Communicator& c = world();
  const int n = c.size();
  if (n < 3) GTEST_SKIP() << "the staged 16-bit sum runs at >= 3 ranks";
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (size_t count : {size_t{1}, size_t{2}, size_t{1000}, size_t{65537}}) {
      for (bool in_place : {false, true}) {
        std::vector<uint16_t> in(count), out(count, 0xffff);
        for (size_t i = 0; i < count; ++i) in[i] = to_half(staged_term(c.rank(), i, t), t);
        if (in_place) {
          c.all_reduce(in.data(), in.data(), count, t, ReduceOp::kSum);
          out = in;
        } else {
          c.all_reduce(in.data(), out.data(), count, t, ReduceOp::kSum);
        }
        size_t wrong = 0;
        for (size_t i = 0; i < count; ++i) {
          double exact = 0;
          for (int q = 0; q < n; ++q) exact += staged_term(q, i, t);
          if (from_half(out[i], t) != from_half(to_half(exact, t), t)) ++wrong;
        }
        EXPECT_EQ(wrong, 0u) << dtype_name(t) << " count " << count << " in_place " << in_place;
      }
      // reduce_scatter: block r of every rank's input, summed.
      const size_t nn = static_cast<size_t>(n);
      std::vector<uint16_t> in(count * nn), out(count, 0xffff);
      for (size_t i = 0; i < count * nn; ++i) in[i] = to_half(staged_term(c.rank(), i, t), t);
      c.reduce_scatter(in.data(), out.data(), count, t, ReduceOp::kSum);
      size_t wrong = 0;
      for (size_t i = 0; i < count; ++i) {
        const size_t g = static_cast<size_t>(c.rank()) * count + i;
        double exact = 0;
        for (int q = 0; q < n; ++q) exact += staged_term(q, g, t);
        if (from_half(out[i], t) != from_half(to_half(exact, t), t)) ++wrong;
      }
      EXPECT_EQ(wrong, 0u) << "reduce_scatter " << dtype_name(t) << " count " << count;
    }
  }
}

TEST(Collectives, StagedHalfSumsInFlightTogetherCompleteInAnyOrder) {
  // Three staged all_reduces in flight at once, waited in a different order on each rank:
  // their second stages start in different orders and must still match their own op.
  Communicator& c = world();
  const int n = c.size();
  if (n < 3) GTEST_SKIP() << "the staged 16-bit sum runs at >= 3 ranks";
  constexpr size_t kCount = 4099;
  std::vector<std::vector<uint16_t>> v(3, std::vector<uint16_t>(kCount));
  for (size_t k = 0; k < 3; ++k)
    for (size_t i = 0; i < kCount; ++i)
      v[k][i] = bf16_t::from_float(static_cast<float>((k + 1) * 8 + (c.rank() + i) % 4));
  std::vector<Handle> hs;
  for (size_t k = 0; k < 3; ++k)
    hs.push_back(c.iall_reduce(v[k].data(), v[k].data(), kCount, DType::kBFloat16, ReduceOp::kSum));
  for (size_t j = 0; j < 3; ++j) hs[(j + static_cast<size_t>(c.rank())) % 3].wait();
  for (size_t k = 0; k < 3; ++k) {
    size_t wrong = 0;
    for (size_t i = 0; i < kCount; ++i) {
      double exact = 0;
      for (int q = 0; q < n; ++q) exact += static_cast<double>((k + 1) * 8 + (q + i) % 4);
      if (bf16_t::to_float(v[k][i]) != static_cast<float>(exact)) ++wrong;
    }
    EXPECT_EQ(wrong, 0u) << "op " << k;
  }
}

TEST(Collectives, AllGatherEveryDTypeSizeAndPlacement) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  uint64_t salt = 100;
  for (DType t : kAllDTypes) {
    for (size_t count : sizes_for(t)) {
      for (bool in_place : {false, true}) {
        // In place at 1<<20: np 1-2 only (np 2 takes the two-rank exchange for large blocks),
        // which keeps np4 fast; small sizes cover the in-place MPI_Iallgather.
        if (in_place && count == (1u << 20) && (n > 2 || skip_big_in_place(t, count, true)))
          continue;
        ++salt;
        Buf send(count, t), recv(count * n, t);
        // A sentinel outside every value range (and representable: uint8 has no -7).
        for (size_t i = 0; i < count * n; ++i) recv.set(i, t == DType::kUInt8 ? 250 : -7);
        Buf& src = in_place ? recv : send;
        for (size_t i = 0; i < count; ++i)
          src.set(in_place ? me * count + i : i, value(t, me, i, salt));
        c.all_gather(in_place ? recv.at(me * count) : send.data(), recv.data(), count, t);
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < count; ++i)
            ASSERT_EQ(recv.get(r * count + i), value(t, r, i, salt))
                << label("all_gather", t, count, in_place) << " block " << r << " i=" << i;
      }
    }
  }
}

TEST(Collectives, ReduceScatterEveryDTypeOpSizeAndPlacement) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  uint64_t salt = 200;
  for (DType t : kAllDTypes) {
    for (size_t count : sizes_for(t)) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
        if (count == (1u << 20) && op != ReduceOp::kSum) continue;
        for (bool in_place : {false, true}) {
          if (skip_big_in_place(t, count, in_place)) continue;
          ++salt;
          Buf send(count * n, t), recv(count, t);
          for (size_t i = 0; i < count * n; ++i) send.set(i, value(t, me, i, salt));
          void* out = in_place ? send.at(me * count) : recv.data();
          c.reduce_scatter(send.data(), out, count, t, op);
          for (size_t i = 0; i < count; ++i) {
            const double ref = reduce_ref(op, t, n, i, salt, me * count);
            const double got = load(out, t, i);
            ASSERT_LE(std::fabs(got - ref), tolerance(t, op, ref, n))
                << label("reduce_scatter", t, count, in_place) << " " << reduce_op_name(op)
                << " i=" << i << " got " << got << " want " << ref;
          }
          if (in_place) {  // the other blocks of the input are left as they were
            for (int r = 0; r < n; ++r)
              for (size_t i = 0; r != me && i < count; ++i)
                ASSERT_EQ(send.get(r * count + i), value(t, me, r * count + i, salt))
                    << label("reduce_scatter", t, count, true) << " block " << r;
          }
        }
      }
    }
  }
}

TEST(Collectives, AllToAllEveryDTypeSizeAndPlacement) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  uint64_t salt = 300;
  for (DType t : kAllDTypes) {
    for (size_t count : sizes_for(t)) {
      for (bool in_place : {false, true}) {
        if (in_place && count == (1u << 20)) continue;
        ++salt;
        Buf send(count * n, t), recv(count * n, t);
        // block j of rank r holds value(r, j*count + i)
        for (size_t i = 0; i < count * n; ++i) send.set(i, value(t, me, i, salt));
        Buf& out = in_place ? send : recv;
        c.all_to_all(send.data(), out.data(), count, t);
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < count; ++i)
            ASSERT_EQ(out.get(r * count + i), value(t, r, me * count + i, salt))
                << label("all_to_all", t, count, in_place) << " from " << r << " i=" << i;
      }
    }
  }
}

TEST(Collectives, BroadcastEveryDTypeSizeRootAndPlacement) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  uint64_t salt = 400;
  for (DType t : kAllDTypes) {
    for (size_t count : sizes_for(t)) {
      for (bool in_place : {false, true}) {
        if (skip_big_in_place(t, count, in_place)) continue;
        ++salt;
        const int root = static_cast<int>(salt % n);
        Buf send(count, t), recv(count, t);
        if (me == root)
          for (size_t i = 0; i < count; ++i)
            (in_place ? recv : send).set(i, value(t, root, i, salt));
        c.broadcast(me == root && !in_place ? send.data() : recv.data(), recv.data(), count, t,
                    root);
        for (size_t i = 0; i < count; ++i)
          ASSERT_EQ(recv.get(i), value(t, root, i, salt))
              << label("broadcast", t, count, in_place) << " root " << root << " i=" << i;
      }
    }
  }
}

// Rank r sends c(r, j) elements to rank j; some are zero.
size_t uneven_count(int r, int j) {
  return static_cast<size_t>((r * 3 + j * 5 + 1) % 7);
}

TEST(Collectives, AllToAllVUnevenCountsWithGaps) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  for (DType t : kAllDTypes) {
    std::vector<size_t> sc(n), sd(n), rc(n), rd(n);
    size_t so = 0, ro = 0;
    for (int j = 0; j < n; ++j) {
      sc[j] = uneven_count(me, j);
      rc[j] = uneven_count(j, me);
      sd[j] = so;
      rd[j] = ro + 2;  // leave a 2-element gap that must stay untouched
      so += sc[j];
      ro += rc[j] + 2;
    }
    Buf send(so, t), recv(ro, t);
    for (int j = 0; j < n; ++j)
      for (size_t k = 0; k < sc[j]; ++k) send.set(sd[j] + k, value(t, me, j * 100 + k, 500));
    for (size_t i = 0; i < ro; ++i) recv.set(i, 3);
    c.all_to_all_v(send.data(), sc, sd, recv.data(), rc, rd, t);
    std::vector<bool> written(ro, false);
    for (int j = 0; j < n; ++j)
      for (size_t k = 0; k < rc[j]; ++k) {
        written[rd[j] + k] = true;
        ASSERT_EQ(recv.get(rd[j] + k), value(t, j, me * 100 + k, 500))
            << "all_to_all_v " << dtype_name(t) << " from " << j << " k=" << k;
      }
    for (size_t i = 0; i < ro; ++i)
      if (!written[i]) ASSERT_EQ(recv.get(i), 3) << "all_to_all_v wrote into a gap at " << i;
  }
}

TEST(Collectives, RingExchangeBothDirectionsWithReversedPostingOnOddRanks) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  const int right = (me + 1) % n, left = (me + n - 1) % n;
  for (size_t count : {size_t{1}, size_t{1000}, size_t{1} << 18}) {
    std::vector<float> to_right(count), to_left(count), from_left(count, -1), from_right(count, -1);
    for (size_t i = 0; i < count; ++i) {
      to_right[i] = static_cast<float>(me * 1000003 + i);
      to_left[i] = -static_cast<float>(me * 1000003 + i) - 1;
    }
    std::vector<P2POp> ops = {P2POp::send(to_right.data(), count, DType::kFloat32, right),
                              P2POp::recv(from_left.data(), count, DType::kFloat32, left),
                              P2POp::send(to_left.data(), count, DType::kFloat32, left),
                              P2POp::recv(from_right.data(), count, DType::kFloat32, right)};
    if (me % 2 == 1) std::reverse(ops.begin(), ops.end());
    c.group(ops);
    // With 2 ranks left == right: the two messages to one peer match in posting order,
    // which the reversal on odd ranks swaps, so there only the pair of values is checked.
    for (size_t i = 0; i < count; ++i) {
      const float want_left = static_cast<float>(left * 1000003 + i);
      const float want_right = -static_cast<float>(right * 1000003 + i) - 1;
      if (n > 2) {
        ASSERT_EQ(from_left[i], want_left) << "count=" << count << " i=" << i;
        ASSERT_EQ(from_right[i], want_right) << "count=" << count << " i=" << i;
      } else {
        ASSERT_EQ(std::min(from_left[i], from_right[i]), std::min(want_left, want_right));
        ASSERT_EQ(std::max(from_left[i], from_right[i]), std::max(want_left, want_right));
      }
    }
  }
}

TEST(Collectives, SendRecvPairs) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  if (n < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<int64_t> buf(77);
  if (me == 0) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<int64_t>(i) * 3 - 50;
    c.send(buf.data(), buf.size(), DType::kInt64, 1);
  } else if (me == 1) {
    c.recv(buf.data(), buf.size(), DType::kInt64, 0);
    for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], static_cast<int64_t>(i) * 3 - 50);
  }
  c.barrier();
}

TEST(Collectives, NonBlockingOpsCompleteThroughTestAndProgress) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  constexpr size_t kCount = 4096;
  std::vector<double> a(kCount, me + 1.0), b(kCount), g(kCount * n);
  std::vector<Handle> hs;
  hs.push_back(c.iall_reduce(a.data(), b.data(), kCount, DType::kFloat64, ReduceOp::kSum));
  hs.push_back(c.iall_gather(a.data(), g.data(), kCount, DType::kFloat64));
  hs.push_back(c.ibarrier());
  EXPECT_TRUE(hs[0].valid());
  int polls = 0;
  for (;;) {
    c.progress();
    bool all = true;
    for (Handle& h : hs) all = h.test() && all;
    if (all) break;
    ASSERT_LT(++polls, 50'000'000) << "non-blocking ops never completed";
  }
  for (Handle& h : hs) EXPECT_TRUE(h.test());  // stays complete
  hs.clear();
  for (size_t i = 0; i < kCount; ++i) ASSERT_EQ(b[i], n * (n + 1) / 2.0);
  for (int r = 0; r < n; ++r) ASSERT_EQ(g[r * kCount], r + 1.0);
  // Destroying an unfinished handle waits for it.
  std::vector<int32_t> x(10, me), y(10, -1);
  { Handle h = c.iall_reduce(x.data(), y.data(), 10, DType::kInt32, ReduceOp::kMax); }
  EXPECT_EQ(y[0], n - 1);
  Handle done;
  EXPECT_TRUE(done.test());
  done.wait();
}

// Handle::wait_on on host memory is wait(): the results are there when it returns (bf16 too,
// whose narrowing runs at completion), the handle is complete, the op is in the ledger once
// and its time is added once, and wait()/test()/wait_on()/destruction afterwards change
// nothing.
TEST(Collectives, WaitOnHostMemoryCompletesLikeWait) {
  std::unique_ptr<Communicator> c = world().split(0, world().rank());
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  const int right = (me + 1) % n, left = (me + n - 1) % n;
  constexpr size_t kCount = 3000;
  std::vector<uint16_t> a(kCount), sum(kCount, 0);
  for (size_t i = 0; i < kCount; ++i)
    a[i] = bf16_t::from_float(static_cast<float>(value(DType::kBFloat16, me, i, 901)));
  std::vector<int32_t> own(kCount), gathered(kCount * n, -1), from_left(kCount, -1);
  for (size_t i = 0; i < kCount; ++i) own[i] = me * 100000 + static_cast<int32_t>(i);
  const P2POp ring[] = {P2POp::send(own.data(), kCount, DType::kInt32, right),
                        P2POp::recv(from_left.data(), kCount, DType::kInt32, left)};
  {
    Handle hr = c->iall_reduce(a.data(), sum.data(), kCount, DType::kBFloat16, ReduceOp::kSum);
    Handle hg = c->iall_gather(own.data(), gathered.data(), kCount, DType::kInt32);
    Handle hp = c->igroup(ring);
    hr.wait_on(nullptr);
    hg.wait_on(nullptr);
    hp.wait_on(nullptr);
    EXPECT_FALSE(hr.valid());
    EXPECT_FALSE(hg.valid());
    EXPECT_FALSE(hp.valid());
    for (size_t i = 0; i < kCount; ++i) {
      const double ref = reduce_ref(ReduceOp::kSum, DType::kBFloat16, n, i, 901);
      const double got = bf16_t::to_float(sum[i]);
      ASSERT_TRUE(std::isfinite(got)) << "i=" << i;
      ASSERT_LE(std::fabs(got - ref), tolerance(DType::kBFloat16, ReduceOp::kSum, ref, n))
          << "i=" << i << " got " << got << " want " << ref;
    }
    for (int r = 0; r < n; ++r)
      for (size_t i = 0; i < kCount; ++i)
        ASSERT_EQ(gathered[r * kCount + i], r * 100000 + static_cast<int32_t>(i))
            << "block " << r << " i=" << i;
    for (size_t i = 0; i < kCount; ++i)
      ASSERT_EQ(from_left[i], left * 100000 + static_cast<int32_t>(i)) << "i=" << i;

    const Ledger& l = c->ledger();
    const double t_reduce = l[OpKind::kAllReduce].seconds;
    EXPECT_GT(t_reduce, 0.0);
    EXPECT_GT(l[OpKind::kAllGather].seconds, 0.0);
    EXPECT_GT(l[OpKind::kSendRecv].seconds, 0.0);
    // Everything after completion is a no-op, the ledger included.
    hr.wait();
    hr.wait_on(nullptr);
    EXPECT_TRUE(hr.test());
    hg.wait_on(nullptr);
    EXPECT_EQ(l[OpKind::kAllReduce].calls, 1u);
    EXPECT_EQ(l[OpKind::kAllGather].calls, 1u);
    EXPECT_EQ(l[OpKind::kSendRecv].calls, 1u);
    EXPECT_EQ(l.total().calls, 3u);
    EXPECT_EQ(l[OpKind::kAllReduce].seconds, t_reduce);
  }  // handles destroyed after wait_on: nothing left to wait for

  // A default (empty) handle accepts wait_on too.
  Handle empty;
  empty.wait_on(nullptr);
  EXPECT_FALSE(empty.valid());
  EXPECT_EQ(c->ledger().total().calls, 3u);
}

// wait_on on an aborted communicator throws kRemoteError, as wait() does (one rank per
// communicator, so the abort strands no peer).
TEST(Collectives, WaitOnAfterAbortThrowsRemoteError) {
  std::unique_ptr<Communicator> solo = world().split(world().rank(), 0);
  ASSERT_NE(solo, nullptr);
  ASSERT_EQ(solo->size(), 1);
  std::vector<float> x(16, 2.0f), y(16, 0.0f);
  Handle h = solo->iall_reduce(x.data(), y.data(), 16, DType::kFloat32, ReduceOp::kSum);
  solo->abort();
  try {
    h.wait_on(nullptr);
    ADD_FAILURE() << "wait_on on an aborted communicator did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kRemoteError) << e.what();
    EXPECT_NE(std::string(e.what()).find("aborted"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(h.valid());
  h.wait_on(nullptr);  // nothing left: a no-op
}

// A tiny DISTATTN_MPI_MAX_COUNT forces every long-message path (chunked reductions,
// derived datatypes, point-to-point all_to_all_v) at small sizes.
TEST(Collectives, LongMessagePathsMatchUnderTinyMaxCount) {
  setenv("DISTATTN_MPI_MAX_COUNT", "7", 1);
  std::unique_ptr<Communicator> c = create_world(Backend::kMpi, Device::cpu());
  unsetenv("DISTATTN_MPI_MAX_COUNT");
  const int n = c->size(), me = c->rank();
  uint64_t salt = 600;
  for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kInt64, DType::kUInt8}) {
    for (size_t count : {size_t{7}, size_t{8}, size_t{1000}}) {
      for (bool in_place : {false, true})
        check_all_reduce(*c, t, ReduceOp::kSum, count, in_place, ++salt);
      // reduce_scatter
      Buf send(count * n, t), recv(count, t);
      ++salt;
      for (size_t i = 0; i < count * n; ++i) send.set(i, value(t, me, i, salt));
      c->reduce_scatter(send.data(), recv.data(), count, t, ReduceOp::kSum);
      for (size_t i = 0; i < count; ++i) {
        const double ref = reduce_ref(ReduceOp::kSum, t, n, i, salt, me * count);
        ASSERT_LE(std::fabs(recv.get(i) - ref), tolerance(t, ReduceOp::kSum, ref, n))
            << "chunked reduce_scatter " << dtype_name(t) << " i=" << i;
      }
      // all_gather, all_to_all, broadcast with derived datatypes
      Buf g(count * n, t);
      c->all_gather(send.data(), g.data(), count, t);
      for (int r = 0; r < n; ++r)
        for (size_t i = 0; i < count; ++i)
          ASSERT_EQ(g.get(r * count + i), value(t, r, i, salt)) << "big-type all_gather";
      if (count == 1000) {
        // Blocks of >= 256 KiB (np 2: the two-rank exchange) with derived datatypes.
        const size_t big = (size_t{300} << 10) / dtype_size(t) + 3;
        Buf bs(big, t), bg(big * n, t);
        for (size_t i = 0; i < big; ++i) bs.set(i, value(t, me, i, salt));
        c->all_gather(bs.data(), bg.data(), big, t);
        for (int r = 0; r < n; ++r)
          for (size_t i = 0; i < big; ++i)
            ASSERT_EQ(bg.get(r * big + i), value(t, r, i, salt)) << "big-type large all_gather";
      }
      Buf a(count * n, t);
      c->all_to_all(send.data(), a.data(), count, t);
      for (int r = 0; r < n; ++r)
        for (size_t i = 0; i < count; ++i)
          ASSERT_EQ(a.get(r * count + i), value(t, r, me * count + i, salt)) << "big-type a2a";
      Buf bc(count, t);
      if (me == n - 1) std::memcpy(bc.data(), send.data(), count * dtype_size(t));
      c->broadcast(bc.data(), bc.data(), count, t, n - 1);
      for (size_t i = 0; i < count; ++i) ASSERT_EQ(bc.get(i), value(t, n - 1, i, salt));
    }
  }
  // all_to_all_v beyond max_count goes point to point
  std::vector<size_t> sc(n), sd(n), rc(n), rd(n);
  for (int j = 0; j < n; ++j) {
    sc[j] = 10 + j;
    sd[j] = j * 20;
    rc[j] = 10 + me;
    rd[j] = j * 20;
  }
  std::vector<int32_t> s(20 * n), r(20 * n, -1);
  for (int j = 0; j < n; ++j)
    for (size_t k = 0; k < sc[j]; ++k) s[sd[j] + k] = me * 1000 + j * 100 + static_cast<int>(k);
  c->all_to_all_v(s.data(), sc, sd, r.data(), rc, rd, DType::kInt32);
  for (int j = 0; j < n; ++j)
    for (size_t k = 0; k < rc[j]; ++k)
      ASSERT_EQ(r[rd[j] + k], j * 1000 + me * 100 + static_cast<int>(k)) << "p2p all_to_all_v";
  // the ring exchange with messages of several chunks
  std::vector<float> out(100, static_cast<float>(me)), in(100, -1);
  const P2POp ops[] = {P2POp::send(out.data(), 100, DType::kFloat32, (me + 1) % n),
                       P2POp::recv(in.data(), 100, DType::kFloat32, (me + n - 1) % n)};
  c->group(ops);
  EXPECT_EQ(in[99], static_cast<float>((me + n - 1) % n));
}

// Real counts past INT_MAX (chunked all_reduce, derived-datatype broadcast). Opt-in: it
// needs ~2.1 GiB per rank, too much for the default suite on small machines.
TEST(Collectives, MessagesOfMoreThanTwoToThe31ElementsWhenEnabled) {
  if (std::getenv("DISTATTN_TEST_LARGE") == nullptr)
    GTEST_SKIP() << "set DISTATTN_TEST_LARGE=1 to run (needs ~2.1 GiB per rank)";
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  const size_t count = (size_t{1} << 31) + 5;
  std::vector<uint8_t> buf(count);
  for (size_t i = 0; i < count; ++i) buf[i] = static_cast<uint8_t>((i + me) % 7);
  c.all_reduce(buf.data(), buf.data(), count, DType::kUInt8, ReduceOp::kSum);
  for (size_t i = 0; i < count; ++i) {
    unsigned want = 0;
    for (int r = 0; r < n; ++r) want += static_cast<unsigned>((i + r) % 7);
    ASSERT_EQ(buf[i], static_cast<uint8_t>(want)) << "i=" << i;
  }
  for (size_t i = 0; i < count; ++i) buf[i] = me == n - 1 ? static_cast<uint8_t>(i % 251) : 0;
  c.broadcast(buf.data(), buf.data(), count, DType::kUInt8, n - 1);
  for (size_t i = 0; i < count; ++i) ASSERT_EQ(buf[i], static_cast<uint8_t>(i % 251)) << i;
}

TEST(Collectives, LedgerCountsDocumentedBytes) {
  std::unique_ptr<Communicator> c = world().split(0, world().rank());
  ASSERT_NE(c, nullptr);
  const uint64_t n = static_cast<uint64_t>(c->size());
  const int me = c->rank();
  std::vector<float> a(1000 * n, 1.0f), b(1000 * n);
  c->all_reduce(a.data(), b.data(), 1000, DType::kFloat32, ReduceOp::kSum);
  c->all_reduce(a.data(), b.data(), 10, DType::kFloat32, ReduceOp::kSum);
  c->all_gather(a.data(), b.data(), 100, DType::kFloat32);
  c->reduce_scatter(a.data(), b.data(), 50, DType::kFloat32, ReduceOp::kMax);
  c->all_to_all(a.data(), b.data(), 30, DType::kFloat32);
  c->broadcast(a.data(), b.data(), 20, DType::kFloat32, 0);
  c->barrier();
  std::vector<size_t> cnt(n), displ(n);
  for (size_t j = 0; j < n; ++j) {
    cnt[j] = j + 1;
    displ[j] = j * 10;
  }
  std::vector<size_t> rcnt(n, static_cast<size_t>(me) + 1);
  c->all_to_all_v(a.data(), cnt, displ, b.data(), rcnt, displ, DType::kFloat32);
  const P2POp ops[] = {P2POp::send(a.data(), 5, DType::kFloat32, (me + 1) % n),
                       P2POp::recv(b.data(), 5, DType::kFloat32, (me + n - 1) % n)};
  c->group(ops);

  const Ledger& l = c->ledger();
  const uint64_t ar = 2 * (n - 1) * 4000 / n + 2 * (n - 1) * 40 / n;
  EXPECT_EQ(l[OpKind::kAllReduce].calls, 2u);
  EXPECT_EQ(l[OpKind::kAllReduce].bytes_sent, ar);
  EXPECT_EQ(l[OpKind::kAllReduce].bytes_recv, ar);
  EXPECT_EQ(l[OpKind::kAllGather].bytes_sent, 400 * (n - 1));
  EXPECT_EQ(l[OpKind::kAllGather].bytes_recv, 400 * (n - 1));
  EXPECT_EQ(l[OpKind::kReduceScatter].bytes_sent, 200 * (n - 1));
  EXPECT_EQ(l[OpKind::kAllToAll].bytes_recv, 120 * (n - 1));
  EXPECT_EQ(l[OpKind::kBroadcast].bytes_sent, me == 0 ? 80 * (n - 1) : 0u);
  EXPECT_EQ(l[OpKind::kBroadcast].bytes_recv, me == 0 ? 0u : 80u);
  EXPECT_EQ(l[OpKind::kBarrier].calls, 1u);
  EXPECT_EQ(l[OpKind::kBarrier].bytes_sent, 0u);
  uint64_t v_sent = 0;
  for (size_t j = 0; j < n; ++j)
    if (static_cast<int>(j) != me) v_sent += 4 * (j + 1);
  EXPECT_EQ(l[OpKind::kAllToAllV].bytes_sent, v_sent);
  EXPECT_EQ(l[OpKind::kAllToAllV].bytes_recv, 4 * (me + 1) * (n - 1));
  EXPECT_EQ(l[OpKind::kSendRecv].bytes_sent, 20u);
  EXPECT_EQ(l[OpKind::kSendRecv].bytes_recv, 20u);
  EXPECT_EQ(l.total().calls, 9u);
  EXPECT_GT(l[OpKind::kAllReduce].seconds, 0.0);
  const std::string s = l.summary();
  EXPECT_NE(s.find("all_reduce calls=2"), std::string::npos) << s;
  EXPECT_NE(s.find("send_recv calls=1 sent=20 recv=20"), std::string::npos) << s;
  c->ledger().reset();
  EXPECT_EQ(c->ledger().total().calls, 0u);
}

template <typename F>
void expect_error(F&& f, Status status, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
  }
}

TEST(Collectives, InvalidArgumentsAreRejectedBeforeTheBackend) {
  Communicator& c = world();
  const int n = c.size();
  float x[8] = {};
  const Status inv = Status::kInvalidArgument;
  expect_error([&] { c.all_reduce(nullptr, x, 4, DType::kFloat32, ReduceOp::kSum); }, inv,
               "all_reduce: send buffer is null but count is 4");
  expect_error([&] { c.all_gather(x, nullptr, 1, DType::kFloat32); }, inv,
               "all_gather: recv buffer is null");
  expect_error([&] { c.all_reduce(x, x, SIZE_MAX / 2, DType::kFloat32, ReduceOp::kSum); }, inv,
               "overflows");
  expect_error([&] { c.all_to_all(x, x, SIZE_MAX / 4, DType::kFloat64); }, inv, "overflows");
  expect_error([&] { c.broadcast(x, x, 1, DType::kFloat32, n); }, inv,
               "root " + std::to_string(n) + " is out of range");
  expect_error([&] { c.broadcast(x, x, 1, DType::kFloat32, -1); }, inv, "out of range");
  expect_error([&] { c.send(x, 1, DType::kFloat32, n + 3); }, inv,
               "names peer " + std::to_string(n + 3));
  expect_error([&] { c.recv(x, 1, DType::kFloat32, -2); }, inv, "names peer -2");
  std::vector<size_t> ok(n, 1), bad(n + 1, 1);
  expect_error([&] { c.all_to_all_v(x, bad, ok, x + 4, ok, ok, DType::kFloat32); }, inv,
               "one entry per rank");
  std::vector<size_t> zero_displ(n, 0);
  expect_error([&] { c.all_to_all_v(x, ok, zero_displ, x, ok, zero_displ, DType::kFloat32); }, inv,
               "in-place all_to_all_v is not supported");
  expect_error([&] { c.split(-5, 0); }, inv, "color -5 is invalid");
  // Zero-length ops accept null buffers and still synchronize correctly.
  c.all_reduce(nullptr, nullptr, 0, DType::kFloat32, ReduceOp::kSum);
  c.broadcast(nullptr, nullptr, 0, DType::kInt32, 0);
  c.barrier();
  EXPECT_FALSE(c.aborted());
}

TEST(Collectives, SplitWithNoColorAndEvenOddGroups) {
  Communicator& c = world();
  const int n = c.size(), me = c.rank();
  // Odd ranks join nothing.
  std::unique_ptr<Communicator> evens = c.split(me % 2 == 0 ? 0 : Communicator::kNoColor, me);
  if (me % 2 == 1) {
    EXPECT_EQ(evens, nullptr);
  } else {
    ASSERT_NE(evens, nullptr);
    EXPECT_EQ(evens->size(), (n + 1) / 2);
    EXPECT_EQ(evens->rank(), me / 2);
    int v = me, sum = 0;
    evens->all_reduce(&v, &sum, 1, DType::kInt32, ReduceOp::kSum);
    int want = 0;
    for (int r = 0; r < n; r += 2) want += r;
    EXPECT_EQ(sum, want);
  }
  // Reversed key order reverses ranks; the timeout is inherited.
  c.set_timeout(std::chrono::milliseconds(123'000));
  std::unique_ptr<Communicator> rev = c.split(0, n - me);
  c.set_timeout(default_timeout());
  ASSERT_NE(rev, nullptr);
  EXPECT_EQ(rev->rank(), n - 1 - me);
  EXPECT_EQ(rev->timeout(), std::chrono::milliseconds(123'000));
  EXPECT_EQ(rev->backend(), Backend::kMpi);
  EXPECT_TRUE(rev->accepts_host_memory());
}

TEST(Collectives, CreateWorldBackends) {
  EXPECT_EQ(parse_backend("mpi"), Backend::kMpi);
  EXPECT_EQ(parse_backend("auto"), Backend::kAuto);
  EXPECT_EQ(parse_backend("nccl"), Backend::kNccl);
  expect_error([] { parse_backend("gloo"); }, Status::kInvalidArgument,
               "supported: auto, mpi, nccl");
  // A CPU device always gets the MPI backend from kAuto.
  std::unique_ptr<Communicator> a = create_world(Backend::kAuto, Device::cpu());
  EXPECT_EQ(a->backend(), Backend::kMpi);
  EXPECT_EQ(a->size(), world().size());
  expect_error([] { create_world(Backend::kNccl, Device::cpu()); }, Status::kInvalidArgument,
               "nccl backend needs a CUDA device");
}

}  // namespace
}  // namespace distattn::comm
