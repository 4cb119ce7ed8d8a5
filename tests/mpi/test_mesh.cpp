// DeviceMesh over the MPI world: coordinates, per-axis communicators, errors.
#include <gtest/gtest.h>

#include <vector>

#include "distattn/comm/mesh.h"

namespace distattn::comm {
namespace {

std::shared_ptr<Communicator> world() {
  static std::shared_ptr<Communicator> w = create_world(Backend::kMpi, Device::cpu());
  return w;
}

TEST(DeviceMesh, TwoByTwoAxesAreRowMajorWithInnermostLast) {
  auto w = world();
  if (w->size() != 4) GTEST_SKIP() << "needs 4 ranks";
  const int me = w->rank();
  DeviceMesh mesh(w, {{"ring", 2}, {"ulysses", 2}});
  EXPECT_EQ(mesh.str(), "ring=2 x ulysses=2");
  EXPECT_EQ(mesh.ndim(), 2);
  EXPECT_EQ(mesh.coord("ring"), me / 2);
  EXPECT_EQ(mesh.coord("ulysses"), me % 2);
  EXPECT_EQ(mesh.coords(), (std::vector<int>{me / 2, me % 2}));
  EXPECT_EQ(mesh.rank_of(mesh.coords()), me);
  EXPECT_EQ(mesh.rank_of({1, 0}), 2);
  Communicator& uly = mesh.comm("ulysses");
  Communicator& ring = mesh.comm("ring");
  EXPECT_EQ(uly.size(), 2);
  EXPECT_EQ(uly.rank(), me % 2);
  EXPECT_EQ(ring.rank(), me / 2);
  // ulysses groups {0,1},{2,3}; ring groups {0,2},{1,3}
  int v = me, sum = 0;
  uly.all_reduce(&v, &sum, 1, DType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(sum, me / 2 == 0 ? 0 + 1 : 2 + 3);
  ring.all_reduce(&v, &sum, 1, DType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(sum, me % 2 == 0 ? 0 + 2 : 1 + 3);
  std::vector<int> g(2);
  ring.all_gather(&v, g.data(), 1, DType::kInt32);
  EXPECT_EQ(g, (std::vector<int>{me % 2, me % 2 + 2}));
  // Point to point along an axis uses axis ranks.
  int peer_val = -1;
  const P2POp ops[] = {P2POp::send(&v, 1, DType::kInt32, 1 - uly.rank()),
                       P2POp::recv(&peer_val, 1, DType::kInt32, 1 - uly.rank())};
  uly.group(ops);
  EXPECT_EQ(peer_val, me ^ 1);
  EXPECT_EQ(mesh.comm_ptr("ring").get(), &ring);
}

TEST(DeviceMesh, ThreeAxesWithSizeOneAxis) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  DeviceMesh mesh(w, {{"tp", 1}, {"ring", n}, {"ulysses", 1}});
  EXPECT_EQ(mesh.size("ring"), n);
  EXPECT_EQ(mesh.coord("ring"), me);
  EXPECT_EQ(mesh.coord("tp"), 0);
  EXPECT_EQ(mesh.comm("tp").size(), 1);
  EXPECT_EQ(mesh.comm("ring").size(), n);
  int v = 1, s = 0;
  mesh.comm("ring").all_reduce(&v, &s, 1, DType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(s, n);
  mesh.comm("tp").all_reduce(&v, &s, 1, DType::kInt32, ReduceOp::kSum);
  EXPECT_EQ(s, 1);
}

template <typename F>
void expect_invalid(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(DeviceMesh, ErrorsNameWhatToChange) {
  auto w = world();
  const int n = w->size();
  expect_invalid(
      [&] {
        DeviceMesh(w, {{"tp", 2}, {"ring", 3}});
      },
      "mesh tp=2 x ring=3 has 6 ranks but the world has " + std::to_string(n));
  expect_invalid([&] { DeviceMesh(w, {}); }, "at least one axis");
  expect_invalid([&] { DeviceMesh(w, {{"a", n}, {"a", 1}}); }, "appears twice");
  expect_invalid([&] { DeviceMesh(w, {{"a", 0}}); }, "has size 0");
  expect_invalid([&] { DeviceMesh(nullptr, {{"a", 1}}); }, "needs a communicator");
  DeviceMesh mesh(w, {{"ring", n}});
  expect_invalid([&] { mesh.comm("tp"); }, "has no axis 'tp' (known axes: ring)");
  expect_invalid([&] { mesh.rank_of({n}); }, "out of range for axis 'ring'");
  expect_invalid([&] { mesh.rank_of({0, 0}); }, "1 axes but 2 coordinates");
}

}  // namespace
}  // namespace distattn::comm
