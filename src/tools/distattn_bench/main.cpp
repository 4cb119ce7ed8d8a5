// distattn-bench: one binary, one subcommand per benchmark family
// (`distattn-bench comm|attn|sp|mla ...`). Runs under mpirun; rank 0 prints.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "distattn/core/error.h"
#include "distattn/runtime.h"
#include "src/tools/distattn_bench/bench_common.h"

namespace {
void usage() {
  std::printf(
      "usage: distattn-bench <command> [options]   (run under mpirun for several ranks)\n\n");
  for (const auto& [name, cmd] : distattn::bench::commands())
    std::printf("  %-8s %s\n", name.c_str(), cmd.help.c_str());
  std::printf("\n`distattn-bench <command> --help` lists a command's options.\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const auto it = distattn::bench::commands().find(argv[1]);
  if (it == distattn::bench::commands().end()) {
    std::fprintf(stderr, "distattn-bench: unknown command '%s'\n\n", argv[1]);
    usage();
    return 2;
  }
  int size = 1;
  try {
    const auto& info = distattn::runtime_init(&argc, &argv, {.use_gpu = true});
    size = info.size;
    const std::string command = argv[1];
    std::string prog = "distattn-bench " + command;
    argv[1] = prog.data();
    const int rc = it->second.fn(argc - 1, argv + 1);
    distattn::runtime_finalize();
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "distattn-bench: %s\n", e.what());
    if (size > 1) distattn::runtime_abort(1, e.what());  // don't leave peers waiting
    distattn::runtime_finalize();
    return 1;
  }
}
