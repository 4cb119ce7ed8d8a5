#pragma once
// DeviceMesh: named axes over a communicator's ranks, row-major, so the LAST axis is the
// innermost one and spans adjacent ranks (same node): DeviceMesh(world, {{"ring",2},{"ulysses",2}})
// puts ranks {0,1} and {2,3} in the same ulysses group and {0,2}, {1,3} in the same ring.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "distattn/comm/communicator.h"

namespace distattn::comm {

class DeviceMesh {
 public:
  using Axes = std::vector<std::pair<std::string, int>>;
  // Collective over `world`. The product of axis sizes must equal world->size().
  DeviceMesh(std::shared_ptr<Communicator> world, Axes axes);

  Communicator& world() const { return *world_; }
  std::shared_ptr<Communicator> world_ptr() const { return world_; }
  const Axes& axes() const { return axes_; }
  int ndim() const { return static_cast<int>(axes_.size()); }
  // Throws naming the known axes when `axis` is unknown.
  int axis_index(const std::string& axis) const;
  int size(const std::string& axis) const;
  int coord(const std::string& axis) const;  // this rank's coordinate along axis
  std::vector<int> coords() const;
  // Communicator over the ranks that differ from this one only along `axis`; its rank
  // equals coord(axis).
  Communicator& comm(const std::string& axis) const;
  std::shared_ptr<Communicator> comm_ptr(const std::string& axis) const;
  // World rank of the given coordinates.
  int rank_of(const std::vector<int>& coords) const;
  std::string str() const;  // "ring=2 x ulysses=2"

 private:
  std::shared_ptr<Communicator> world_;
  Axes axes_;
  std::vector<int> coords_;
  std::vector<std::shared_ptr<Communicator>> axis_comms_;
};

}  // namespace distattn::comm
