// comm/bootstrap.h: a communicator from an application's MPI communicator (its Fortran
// handle, as mpi4py hands it over), and the NCCL id path's checks (NCCL init itself needs
// GPUs; on a CPU machine only the validation and, with NCCL built in, the id are testable).
#include <gtest/gtest.h>
#include <mpi.h>

#include <functional>
#include <string>
#include <vector>

#include "distattn/comm/bootstrap.h"
#include "distattn/config.h"

namespace distattn {
namespace {

TEST(Bootstrap, MpiCommunicatorFromAFortranHandleDuplicatesIt) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm half = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, rank % 2, rank, &half);
  int half_rank = 0, half_size = 1;
  MPI_Comm_rank(half, &half_rank);
  MPI_Comm_size(half, &half_size);
  auto c = comm::create_mpi_communicator(MPI_Comm_c2f(half));
  MPI_Comm_free(&half);  // the duplicate outlives the application's communicator
  EXPECT_EQ(c->rank(), half_rank);
  EXPECT_EQ(c->size(), half_size);
  std::vector<int> x(3, rank);
  c->all_reduce(x.data(), x.data(), x.size(), DType::kInt32, comm::ReduceOp::kSum);
  int expect = 0;
  for (int r = rank % 2; r < size; r += 2) expect += r;
  EXPECT_EQ(x[0], expect);
}

TEST(Bootstrap, MpiNullHandleIsRefused) {
  try {
    comm::create_mpi_communicator(MPI_Comm_c2f(MPI_COMM_NULL));
    FAIL() << "MPI_COMM_NULL accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument);
    EXPECT_NE(e.message().find("MPI_COMM_NULL"), std::string::npos) << e.message();
  }
}

Status status_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.status();
  }
  return Status::kSuccess;
}

TEST(Bootstrap, NcclCommunicatorChecksItsArguments) {
  const std::vector<uint8_t> id(comm::kNcclUniqueIdBytes, 0), short_id(5, 0);
  EXPECT_EQ(status_of([&] { comm::create_nccl_communicator(short_id, 0, 1, Device::cuda(0)); }),
            Status::kInvalidArgument);
  EXPECT_EQ(status_of([&] { comm::create_nccl_communicator(id, 2, 2, Device::cuda(0)); }),
            Status::kInvalidArgument);
  EXPECT_EQ(status_of([&] { comm::create_nccl_communicator(id, 0, 1, Device::cpu()); }),
            Status::kInvalidArgument);
  if (!DISTATTN_WITH_NCCL) {
    EXPECT_EQ(status_of([] { comm::nccl_unique_id(); }), Status::kUnsupported);
    EXPECT_EQ(status_of([&] { comm::create_nccl_communicator(id, 0, 1, Device::cuda(0)); }),
              Status::kUnsupported);
  } else {
    EXPECT_EQ(comm::nccl_unique_id().size(), comm::kNcclUniqueIdBytes);
    if (cuda_device_count() == 0) {
      EXPECT_EQ(status_of([&] { comm::create_nccl_communicator(id, 0, 1, Device::cuda(0)); }),
                Status::kInvalidArgument);
    }
  }
}

}  // namespace
}  // namespace distattn
