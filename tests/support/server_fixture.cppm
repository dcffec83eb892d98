// meshrt.testing.fixture — a private allocation server for integration tests, and the client
// processes and meshrt-smi runs they need around it.
module;
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

export module meshrt.testing.fixture;

import meshrt.testing;

export namespace meshrt::testing {

// What each device of a Wormhole mesh (the demo's 2x4) opens with, SystemBuffers::defaults
// written out so that tests compute it independently (ADR 0020): a command queue and a dispatch
// buffer in DRAM (8 + 6 MiB) and a 4 KiB page of L1 on each of its 64 worker cores.
inline constexpr std::uint64_t system_buffers_per_device = 3;
inline constexpr std::uint64_t system_dram_per_device = std::uint64_t{8 + 6} * 1024 * 1024;
inline constexpr std::uint64_t system_l1_per_device = std::uint64_t{64} * 4096;
// The demo's seed scenario on its 2x4 mesh: 16 buffers per device, and the system buffers.
inline constexpr std::uint64_t seed_buffers = 16 * 8;
inline constexpr std::uint64_t seed_system_buffers = system_buffers_per_device * 8;

class ServerFixture {
 public:
  // `bin` holds the programs; `server_flags` go to every server this fixture starts.
  explicit ServerFixture(std::string bin, std::vector<std::string> server_flags = {})
      : bin_(std::move(bin)), server_flags_(std::move(server_flags)) {
    start_server();
  }

  void start_server() {
    ++servers_started_;
    server_.reset();  // never two servers on one socket
    std::vector<std::string> argv{bin_ + "/meshrt-alloc-server", "--socket", socket(), "--summary-interval", "0.5"};
    argv.insert(argv.end(), server_flags_.begin(), server_flags_.end());
    server_ = std::make_unique<ChildProcess>(ChildProcess::Options{
        .argv = std::move(argv),
        .stdout_path = dir_.file(name("server", servers_started_, "out")),
        .stderr_path = dir_.file(name("server", servers_started_, "err")),
    });
    REQUIRE(eventually([&] { return smi_json().has_value(); }));
  }

  ChildProcess& server() { return *server_; }
  [[nodiscard]] const std::string& bin() const { return bin_; }
  [[nodiscard]] std::string socket() const { return dir_.file("alloc.sock"); }
  [[nodiscard]] std::string server_log() const { return read_text(dir_.file(name("server", servers_started_, "out"))); }
  [[nodiscard]] std::string file(const std::string& base) const { return dir_.file(base); }
  [[nodiscard]] const TempDirectory& directory() const { return dir_; }

  // Runs meshrt-smi with `arguments`; its exit code and output.
  std::pair<int, std::string> smi(std::vector<std::string> arguments) {
    arguments.insert(arguments.begin(), {bin_ + "/meshrt-smi", "--socket", socket()});
    const std::string out = name("smi", ++smi_runs_, "out");
    ChildProcess smi({.argv = arguments, .stdout_path = dir_.file(out), .stderr_path = dir_.file(out + ".err")});
    const auto code = smi.wait_for(std::chrono::seconds(60));
    REQUIRE(code.has_value());
    return {*code, smi.standard_output() + smi.standard_error()};
  }

  std::optional<nlohmann::json> smi_json() {
    auto [code, output] = smi({"--json"});
    if (code != 0) return std::nullopt;
    return nlohmann::json::parse(output);
  }

  nlohmann::json summary() {
    auto result = smi_json();
    REQUIRE(result.has_value());
    return *result;
  }

  std::uint64_t active() { return summary()["active_allocations"].get<std::uint64_t>(); }
  // Live buffers of one category ("buffer", "system", ...) on every device: the seed's own
  // buffers are counted apart from the system buffers of the meshes that hold them (ADR 0020).
  std::uint64_t active(std::string_view category);

  // A tracked client process; its output goes to files named after it.
  std::unique_ptr<ChildProcess> client(std::vector<std::string> argv,
                                       std::vector<std::pair<std::string, std::string>> environment = {}) {
    const std::string out = name("client", ++clients_, "out");
    environment.emplace_back("MESHRT_ALLOC_TRACKING", "1");
    environment.emplace_back("MESHRT_ALLOC_SERVER", socket());
    return std::make_unique<ChildProcess>(ChildProcess::Options{
        .argv = std::move(argv),
        .environment = std::move(environment),
        .stdout_path = dir_.file(out),
        .stderr_path = dir_.file(out + ".err"),
    });
  }

  std::unique_ptr<ChildProcess> demo(std::vector<std::string> flags) {
    flags.insert(flags.begin(), bin_ + "/meshrt-demo");
    return client(std::move(flags));
  }

 private:
  static std::string name(const std::string& what, int number, const std::string& extension) {
    return what + "-" + std::to_string(number) + "." + extension;
  }

  std::string bin_;
  std::vector<std::string> server_flags_;
  TempDirectory dir_;
  std::unique_ptr<ChildProcess> server_;
  int servers_started_{};
  int smi_runs_{};
  int clients_{};
};

// meshrt-loadgen's report at `path` once it has reached `phase` ("working", "hold", "done").
std::optional<nlohmann::json> loadgen_report(const std::string& path, const std::string& phase) {
  const std::string text = read_text(path);
  if (text.empty()) return std::nullopt;
  nlohmann::json report = nlohmann::json::parse(text);
  if (report["phase"] != phase) return std::nullopt;
  return report;
}

// The entry of process `pid` in a summary, if it has a session.
std::optional<nlohmann::json> process_of(const nlohmann::json& summary, std::int64_t pid) {
  for (const nlohmann::json& process : summary["processes"]) {
    if (process["pid"] == pid) return process;
  }
  return std::nullopt;
}

// Live buffers of `category` on every device and of every type, as a summary says.
std::uint64_t active_in(const nlohmann::json& summary, std::string_view category) {
  std::uint64_t live = 0;
  for (const nlohmann::json& device : summary["devices"]) {
    for (const auto& [type, usage] : device.items()) {
      if (!usage.is_object() || !usage.contains("categories")) continue;
      const nlohmann::json& categories = usage["categories"];
      if (categories.contains(category)) live += categories[std::string(category)].value("buffers", std::uint64_t{0});
    }
  }
  return live;
}

std::uint64_t ServerFixture::active(std::string_view category) { return active_in(summary(), category); }

// Bytes of device `device`'s memory of `type` held by buffers of `category`, as a summary says.
std::uint64_t used(const nlohmann::json& summary, std::uint32_t device, const char* type, std::string_view category) {
  for (const nlohmann::json& d : summary["devices"]) {
    if (d["id"] != device) continue;
    const nlohmann::json& categories = d[type].contains("categories") ? d[type]["categories"] : nlohmann::json::object();
    return categories.contains(category) ? categories[std::string(category)].value("used_bytes", std::uint64_t{0}) : 0;
  }
  return 0;
}

// What a summary must say once every client has ended well: nothing live, lost or unknown.
void check_ledger_clean(const nlohmann::json& summary) {
  CHECK(summary["active_allocations"] == 0);
  CHECK(summary["unknown_deallocations"] == 0);
  CHECK(summary["double_deallocations"] == 0);
  CHECK(summary["reclaimed_allocations"] == 0);
  CHECK(summary["leaked_at_exit"] == 0);
  CHECK(summary["total_allocations"] == summary["total_deallocations"]);
}

// Bytes of device `device`'s memory of `type` in use (every category), as a summary says.
std::uint64_t used(const nlohmann::json& summary, std::uint32_t device, const char* type) {
  for (const nlohmann::json& d : summary["devices"]) {
    if (d["id"] == device) return d[type]["used_bytes"].get<std::uint64_t>();
  }
  return 0;
}

}  // namespace meshrt::testing
