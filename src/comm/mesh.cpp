// DeviceMesh: named row-major axes over a communicator, one sub-communicator per axis.
#include "distattn/comm/mesh.h"

#include <sstream>

namespace distattn::comm {

namespace {
std::string axes_str(const DeviceMesh::Axes& axes) {
  std::ostringstream os;
  for (size_t i = 0; i < axes.size(); ++i)
    os << (i ? " x " : "") << axes[i].first << '=' << axes[i].second;
  return os.str();
}
}  // namespace

DeviceMesh::DeviceMesh(std::shared_ptr<Communicator> world, Axes axes)
    : world_(std::move(world)), axes_(std::move(axes)) {
  DISTATTN_CHECK(world_ != nullptr, "DeviceMesh needs a communicator, got nullptr");
  DISTATTN_CHECK(!axes_.empty(), "DeviceMesh needs at least one axis, e.g. {{\"ring\", ",
                 world_->size(), "}}");
  int64_t product = 1;
  for (size_t i = 0; i < axes_.size(); ++i) {
    const auto& [name, n] = axes_[i];
    DISTATTN_CHECK(!name.empty(), "DeviceMesh axis ", i, " has an empty name");
    DISTATTN_CHECK(n >= 1, "DeviceMesh axis '", name, "' has size ", n, "; sizes must be >= 1");
    for (size_t j = 0; j < i; ++j)
      DISTATTN_CHECK(axes_[j].first != name, "DeviceMesh axis name '", name, "' appears twice in ",
                     axes_str(axes_), "; axis names must be unique");
    product *= n;
  }
  DISTATTN_CHECK(product == world_->size(), "mesh ", axes_str(axes_), " has ", product,
                 " ranks but the world has ", world_->size(),
                 "; choose axis sizes whose product is ", world_->size(), " (or launch with -np ",
                 product, ")");

  const int r = world_->rank();
  const int nd = ndim();
  coords_.assign(static_cast<size_t>(nd), 0);
  int stride = 1;
  std::vector<int> strides(static_cast<size_t>(nd));
  for (int d = nd - 1; d >= 0; --d) {
    strides[static_cast<size_t>(d)] = stride;
    coords_[static_cast<size_t>(d)] = (r / stride) % axes_[static_cast<size_t>(d)].second;
    stride *= axes_[static_cast<size_t>(d)].second;
  }
  // Ranks that differ only along axis d share the color "my rank with coordinate d zeroed";
  // keyed by the coordinate, so the sub-communicator's rank equals coord(d).
  axis_comms_.reserve(static_cast<size_t>(nd));
  for (int d = 0; d < nd; ++d) {
    const int c = coords_[static_cast<size_t>(d)];
    const int color = r - c * strides[static_cast<size_t>(d)];
    std::shared_ptr<Communicator> sub = world_->split(color, c);
    DISTATTN_CHECK_STATUS(
        sub != nullptr && sub->rank() == c && sub->size() == axes_[static_cast<size_t>(d)].second,
        Status::kInternal, "DeviceMesh: split for axis '", axes_[static_cast<size_t>(d)].first,
        "' gave an unexpected group");
    axis_comms_.push_back(std::move(sub));
  }
}

int DeviceMesh::axis_index(const std::string& axis) const {
  for (size_t i = 0; i < axes_.size(); ++i)
    if (axes_[i].first == axis) return static_cast<int>(i);
  std::ostringstream known;
  for (size_t i = 0; i < axes_.size(); ++i) known << (i ? ", " : "") << axes_[i].first;
  DISTATTN_THROW(Status::kInvalidArgument, "mesh ", str(), " has no axis '", axis,
                 "' (known axes: ", known.str(), ")");
}

int DeviceMesh::size(const std::string& axis) const {
  return axes_[static_cast<size_t>(axis_index(axis))].second;
}

int DeviceMesh::coord(const std::string& axis) const {
  return coords_[static_cast<size_t>(axis_index(axis))];
}

std::vector<int> DeviceMesh::coords() const {
  return coords_;
}

Communicator& DeviceMesh::comm(const std::string& axis) const {
  return *axis_comms_[static_cast<size_t>(axis_index(axis))];
}

std::shared_ptr<Communicator> DeviceMesh::comm_ptr(const std::string& axis) const {
  return axis_comms_[static_cast<size_t>(axis_index(axis))];
}

int DeviceMesh::rank_of(const std::vector<int>& coords) const {
  DISTATTN_CHECK(coords.size() == axes_.size(), "mesh ", str(), " has ", axes_.size(), " axes but ",
                 coords.size(), " coordinates were given");
  int r = 0;
  for (size_t d = 0; d < axes_.size(); ++d) {
    DISTATTN_CHECK(coords[d] >= 0 && coords[d] < axes_[d].second, "coordinate ", coords[d],
                   " is out of range for axis '", axes_[d].first, "' of size ", axes_[d].second);
    r = r * axes_[d].second + coords[d];
  }
  return r;
}

std::string DeviceMesh::str() const {
  return axes_str(axes_);
}

}  // namespace distattn::comm
