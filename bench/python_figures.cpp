// The Python figures: bench/python_figures.py run by Debian's interpreter against this build's
// package (build/<preset>/python), its JSON read back. Missed (NaN) when the package was not built.
module;
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

module meshrt.bench;

import meshrt.testing;

namespace meshrt::bench {

std::vector<Figure> python_figures(const Context& context) {
  double buffer_us = std::numeric_limits<double>::quiet_NaN();
  double from_torch = std::numeric_limits<double>::quiet_NaN();
  const std::string package = context.bin_dir + "/../python";
  if (testing::read_text(package + "/meshrt/__init__.py").empty()) {
    fmt::print(stderr, "meshrt-bench: no Python package in {} (MESHRT_BUILD_PYTHON=OFF?): its figures are missed\n",
               package);
  } else {
    testing::ChildProcess run({.argv = {MESHRT_BENCH_PYTHON, MESHRT_BENCH_PYTHON_SCRIPT},
                               .environment = {{"PYTHONPATH", package}},
                               .stdout_path = context.scratch + "/python-figures.out",
                               .stderr_path = context.scratch + "/python-figures.err"});
    if (run.wait_for(std::chrono::minutes(10)) == 0) {
      const auto figures = nlohmann::json::parse(run.standard_output());
      buffer_us = figures["python_buffer_us"].get<double>();
      from_torch = figures["from_torch_gb_per_s"].get<double>();
    } else {
      fmt::print(stderr, "meshrt-bench: {} failed:\n{}\n", MESHRT_BENCH_PYTHON_SCRIPT, run.standard_error());
    }
  }
  return {
      figure("python_buffer_us", buffer_us, "us", Bound::at_most, 5),
      figure("from_torch_gb_per_s", from_torch, "GB/s", Bound::at_least, 0.5),
  };
}

}  // namespace meshrt::bench
