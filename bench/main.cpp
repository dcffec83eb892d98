// meshrt-bench — every figure of the speed targets, measured in one run on this machine.
// Prints a table and writes one JSON object (figures, machine, git commit).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt.bench;
import meshrt.testing;

namespace {

std::string self_path() {
  std::string path(4096, '\0');
  const ssize_t length = ::readlink("/proc/self/exe", path.data(), path.size());
  path.resize(length > 0 ? static_cast<std::size_t>(length) : 0);
  return path;
}

int run(int argc, char** argv) {
  std::string output = "build/bench/results.json";
  std::string git = "unknown";
  std::string blast_socket;
  std::string hold_socket;
  std::uint64_t count = 0;
  CLI::App app{"meshrt-bench: the speed and memory figures of meshrt"};
  app.add_option("--output", output, "where to write the JSON results")->capture_default_str();
  app.add_option("--git", git, "the commit measured (recorded in the results)");
  auto* blast = app.add_option("--blast", blast_socket, "(internal) be an ingest client on this socket");
  auto* hold = app.add_option("--hold", hold_socket, "(internal) hold live allocations on this socket");
  std::string count_socket;
  auto* count_lives = app.add_option("--count-lives", count_socket,
                                     "(internal) under callgrind: device buffer lives, tracked on this socket ('-': untracked)");
  std::vector<std::string> sections;
  app.add_option("--section", sections, "measure only these sections (repeatable; default: all)")
      ->check(CLI::IsMember({"allocator", "tracking", "server", "workload", "python"}));
  app.add_option("count", count, "(internal) events to send, or allocations to hold");
  CLI11_PARSE(app, argc, argv);
  if (*blast) return meshrt::bench::blast(blast_socket, count);
  if (*hold) return meshrt::bench::hold(hold_socket, count);
  if (*count_lives) return meshrt::bench::count_lives(count_socket == "-" ? std::string{} : count_socket, count);

  const meshrt::testing::TempDirectory scratch;
  const std::string self = self_path();
  const meshrt::bench::Context context{self.substr(0, self.rfind('/')), self, scratch.path().string()};
  std::vector<meshrt::bench::Figure> figures;
  const auto wanted = [&](std::string_view section) {
    return sections.empty() || std::ranges::find(sections, section) != sections.end();
  };
  const auto add = [&](std::vector<meshrt::bench::Figure> more, const char* section) {
    fmt::print("measured: {}\n", section);
    std::fflush(stdout);
    figures.insert(figures.end(), more.begin(), more.end());
  };
  if (wanted("allocator")) add(meshrt::bench::allocator_figures(), "allocator");
  if (wanted("tracking")) add(meshrt::bench::tracking_figures(context), "tracking");
  if (wanted("server")) add(meshrt::bench::server_figures(context), "server");
  if (wanted("workload")) add(meshrt::bench::workload_figures(), "the seed's tensor workload");
  if (wanted("python")) add(meshrt::bench::python_figures(context), "Python");

  nlohmann::json results{
      {"machine", {{"cores", std::thread::hardware_concurrency()}, {"compiler", fmt::format("clang {}", __clang_version__)}}},
      {"git", {{"commit", git}}},
  };
  bool all_met = true;
  fmt::print("\n{:<36} {:>16} {:<10} {:<14} {}\n", "figure", "value", "unit", "target", "");
  for (const auto& f : figures) {
    results[f.key] = f.value;
    all_met = all_met && f.met;
    fmt::print("{:<36} {:>16.3f} {:<10} {:<14} {}\n", f.key, f.value, f.unit, f.target,
               f.target.empty() ? "" : (f.met ? "met" : "MISSED"));
  }
  std::ofstream(output) << results.dump(2) << '\n';
  fmt::print("\nwrote {}; {}\n", output, all_met ? "every target met" : "some targets missed");
  return all_met ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "meshrt-bench: {}\n", error.what());
    return 1;
  }
}
