// meshrt-soak — faults under load, and the tracker must stay exact.
//
// Runs N meshrt-loadgen clients against a real meshrt-alloc-server while it SIGKILLs clients in
// the middle of their work and kills (SIGKILL or SIGTERM) and restarts the server. Every client
// ends its life in a hold: it flushes and writes its own account of what is live, per device and
// buffer type. The driver then compares, exactly:
//   - the server's ledger for that pid (count, bytes, and every device and type) with the
//     client's account;
//   - when it kills a client in its hold, the server's reclaimed total grows by exactly the
//     client's live count and the process is gone from the ledger;
//   - when it lets a client go, the client exits 0 (its own table empty, no unknown frees) and
//     the process leaves the ledger;
//   - a client killed mid-work leaves the ledger (its buffers reclaimed);
//   - at the end: nothing active, no unknown or double frees, no malformed input, --verify holds.
// Each comparison that fails is a mismatch, printed with both sides. Results go to --output.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt.testing;

using namespace meshrt::testing;
using namespace std::chrono_literals;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// A client killed in the middle of its work every ~2 s (1 to 3), whatever the run's length.
constexpr double mid_work_kill_every_seconds = 2.0;
// The server stopped (SIGSTOP) for 2 s every ~12 s (6 to 18): clients must neither block nor lose count.
constexpr double server_stop_every_seconds = 12.0;
constexpr auto server_stop_length = std::chrono::seconds(2);

struct Options {
  std::uint32_t clients = 8;
  double seconds = 60;
  std::uint32_t threads = 3;
  std::uint64_t seed = 1;
  std::string bin;
  std::string work;
  std::string output;
};

// The figures of the run; `mismatches` and `unknown_deallocations` must be 0.
struct Results {
  std::uint64_t events{};  // device-buffer allocations and frees the clients made
  std::uint64_t clients_started{};
  std::uint64_t client_kills{};       // SIGKILL, mid-work or in the hold
  std::uint64_t client_kills_in_hold{};
  std::uint64_t clean_exits{};
  std::uint64_t exact_comparisons{};  // a client's account matched the ledger, device by device
  std::uint64_t server_restarts{};
  std::uint64_t server_stops{};        // SIGSTOPped for 2 s, then SIGCONT
  std::uint64_t churning_clients{};    // clients whose work ran in short-lived threads
  std::uint64_t forking_clients{};     // clients that forked children which allocated
  std::uint64_t mismatches{};
  std::uint64_t unknown_deallocations{};
  std::uint64_t double_deallocations{};
  std::uint64_t malformed_messages{};
  std::uint64_t reclaimed_allocations{};
  std::uint64_t resyncs{};
  double seconds{};
};

class Soak {
 public:
  explicit Soak(Options options) : options_(std::move(options)), random_(options_.seed) {
    std::filesystem::create_directories(options_.work);
  }

  Results run() {
    const auto started = Clock::now();
    start_server();
    for (std::uint32_t slot = 0; slot < options_.clients; ++slot) clients_.push_back(start_client());
    const auto deadline = started + std::chrono::duration<double>(options_.seconds);
    // Faults at random times: at least two server restarts, and mid-work client kills.
    const double restarts = std::max(2.0, options_.seconds / 30.0);
    const double restart_every = options_.seconds / (restarts + 1);
    // Restarts on a fixed schedule (each within +-25% of its slot), so a short run gets them all.
    std::uint64_t restarts_due = 1;
    const auto restart_slot = [&](std::uint64_t k) {
      std::uniform_real_distribution<double> spread(-0.25 * restart_every, 0.25 * restart_every);
      return started + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(static_cast<double>(k) * restart_every + spread(random_)));
    };
    auto next_restart = restart_slot(restarts_due);
    auto next_kill = started + jitter(mid_work_kill_every_seconds);
    auto next_stop = started + jitter(server_stop_every_seconds);
    std::uint64_t last_progress = 0;
    while (!clients_.empty()) {
      const auto now = Clock::now();
      const bool running = now < deadline;
      for (std::size_t slot = 0; slot < clients_.size();) {
        if (tend(*clients_[slot])) {
          finish(*clients_[slot]);
          if (running) {
            clients_[slot] = start_client();
          } else {
            clients_.erase(clients_.begin() + static_cast<std::ptrdiff_t>(slot));
            continue;
          }
        }
        ++slot;
      }
      if (running && now >= next_kill) {
        kill_working_client();
        next_kill = Clock::now() + jitter(mid_work_kill_every_seconds);
      }
      if (running && now >= next_stop) {
        // The driver waits it out too: its comparisons need the server.
        server_->signal(SIGSTOP);
        std::this_thread::sleep_for(server_stop_length);
        server_->signal(SIGCONT);
        ++results_.server_stops;
        next_stop = Clock::now() + jitter(server_stop_every_seconds);
      }
      if (running && now >= next_restart) {
        restart_server();
        next_restart = restart_slot(++restarts_due);
      }
      const auto elapsed = static_cast<std::uint64_t>(std::chrono::duration<double>(now - started).count());
      if (elapsed >= last_progress + 10) {
        last_progress = elapsed;
        fmt::print("meshrt-soak: {:4} s: {} clients started, {} killed, {} server restarts, {} exact comparisons, "
                   "{} mismatches\n",
                   elapsed, results_.clients_started, results_.client_kills, results_.server_restarts,
                   results_.exact_comparisons, results_.mismatches);
        std::fflush(stdout);
      }
      std::this_thread::sleep_for(10ms);
    }
    final_checks();
    results_.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return results_;
  }

 private:
  struct Client {
    std::unique_ptr<ChildProcess> process;
    std::string report;
    std::uint64_t number{};
  };

  Clock::duration jitter(double mean_seconds) {
    std::uniform_real_distribution<double> spread(0.5 * mean_seconds, 1.5 * mean_seconds);
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(spread(random_)));
  }

  std::string path(const std::string& name) const { return (std::filesystem::path(options_.work) / name).string(); }

  void start_server() {
    const std::string log = path(fmt::format("server-{}.log", results_.server_restarts));
    server_ = std::make_unique<ChildProcess>(ChildProcess::Options{
        .argv = {options_.bin + "/meshrt-alloc-server", "--socket", socket(), "--summary-interval", "3600"},
        .stdout_path = log,
        .stderr_path = log + ".err",
    });
    if (!eventually([&] { return smi_json().has_value(); }, 30s)) {
      throw std::runtime_error("meshrt-alloc-server did not start; see " + log + ".err");
    }
  }

  // SIGKILL or SIGTERM, alternately: a crash and a clean stop. Clients must resync either way.
  void restart_server() {
    remember_counters();
    server_->signal(results_.server_restarts % 2 == 0 ? SIGKILL : SIGTERM);
    if (!server_->wait_for(30s)) throw std::runtime_error("meshrt-alloc-server did not stop");
    ++results_.server_restarts;
    server_.reset();
    start_server();
  }

  std::string socket() const { return socket_dir_.file("alloc.sock"); }

  std::optional<json> smi_json(std::vector<std::string> arguments = {"--json"}) {
    arguments.insert(arguments.begin(), {options_.bin + "/meshrt-smi", "--socket", socket()});
    const std::string out = path("smi.out");
    ChildProcess smi({.argv = arguments, .stdout_path = out, .stderr_path = out + ".err"});
    const auto code = smi.wait_for(60s);
    if (code != 0) return std::nullopt;
    try {
      return json::parse(smi.standard_output());
    } catch (const json::exception&) {
      return std::nullopt;
    }
  }

  std::unique_ptr<Client> start_client() {
    auto client = std::make_unique<Client>();
    client->number = ++results_.clients_started;
    client->report = path(fmt::format("client-{}.json", client->number));
    std::uniform_real_distribution<double> duration(1.0, 5.0);
    const std::string log = path(fmt::format("client-{}.log", client->number));
    std::vector<std::string> argv{options_.bin + "/meshrt-loadgen", "--threads", std::to_string(options_.threads),
                                  "--duration", fmt::format("{:.2f}", duration(random_)), "--keep",
                                  std::to_string(1 + random_() % 8), "--hold", "600", "--seed",
                                  std::to_string(random_()), "--report", client->report, "--report-interval", "0.2"};
    // A third of the clients work in short-lived threads (thousands over a run), a quarter fork.
    if (random_() % 3 == 0) {
      argv.insert(argv.end(), {"--thread-churn", "20"});
      ++results_.churning_clients;
    }
    if (random_() % 4 == 0) {
      argv.insert(argv.end(), {"--fork-every", "0.3"});
      ++results_.forking_clients;
    }
    client->process = std::make_unique<ChildProcess>(ChildProcess::Options{
        .argv = std::move(argv),
        .environment = {{"MESHRT_ALLOC_TRACKING", "1"}, {"MESHRT_ALLOC_SERVER", socket()}},
        .stdout_path = log,
        .stderr_path = log + ".err",
    });
    return client;
  }

  std::optional<json> report(const Client& client, const char* phase) const {
    const std::string text = read_text(client.report);
    if (text.empty()) return std::nullopt;
    try {
      json parsed = json::parse(text);
      if (phase != nullptr && parsed["phase"] != phase) return std::nullopt;
      return parsed;
    } catch (const json::exception&) {
      return std::nullopt;
    }
  }

  void mismatch(const Client& client, const std::string& what) {
    ++results_.mismatches;
    fmt::print(stderr, "meshrt-soak: MISMATCH for client {} (pid {}): {}\n  logs: {}\n", client.number,
               client.process->pid(), what, options_.work);
  }

  // The client's live buffers as the server sees them, per device and type: "device/type" -> {count, bytes}.
  std::optional<std::map<std::string, std::pair<std::uint64_t, std::uint64_t>>> ledger_of(pid_t pid) {
    auto listing = smi_json({"--buffers", "--pid", std::to_string(pid), "--json"});
    if (!listing) return std::nullopt;
    std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> by_device_type;
    for (const json& buffer : (*listing)["buffers"]) {
      auto& entry = by_device_type[fmt::format("{}/{}", buffer["device"].get<std::uint32_t>(),
                                               buffer["type"].get<std::string>())];
      entry.first += 1;
      entry.second += buffer["size"].get<std::uint64_t>();
    }
    return by_device_type;
  }

  static std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> account_of(const json& report) {
    std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> by_device_type;
    for (const json& device : report["devices"]) {
      for (const auto& [type, figures] : device.items()) {
        if (type == "id" || figures["buffers"] == 0) continue;
        by_device_type[fmt::format("{}/{}", device["id"].get<std::uint32_t>(), type)] = {
            figures["buffers"].get<std::uint64_t>(), figures["bytes"].get<std::uint64_t>()};
      }
    }
    return by_device_type;
  }

  std::optional<json> process_entry(pid_t pid) {
    auto summary = smi_json();
    if (!summary) return std::nullopt;
    for (const json& process : (*summary)["processes"]) {
      if (process["pid"] == pid) return process;
    }
    return json(nullptr);
  }

  bool gone_from_ledger(pid_t pid) {
    const auto entry = process_entry(pid);
    return entry.has_value() && entry->is_null();
  }

  // True when the client has reached its hold (or died): the driver has work to do with it.
  bool tend(Client& client) {
    if (client.process->wait_for(0ms).has_value()) return true;
    return report(client, "hold").has_value();
  }

  void finish(Client& client) {
    if (const auto code = client.process->wait_for(0ms)) {
      mismatch(client, fmt::format("exited by itself with code {} before the driver let it go", *code));
      count_events(client);
      return;
    }
    const json account = *report(client, "hold");
    if (account["flushed"] != true) mismatch(client, "could not flush its events to the server in its hold");
    const auto expected = account_of(account);
    std::optional<std::map<std::string, std::pair<std::uint64_t, std::uint64_t>>> seen;
    const bool exact = eventually(
        [&] {
          const auto entry = process_entry(client.process->pid());
          if (!entry || entry->is_null() || (*entry)["live_allocations"] != account["live_buffers"] ||
              (*entry)["live_bytes"] != account["live_bytes"]) {
            return false;
          }
          seen = ledger_of(client.process->pid());
          return seen == expected;
        },
        20s);
    if (exact) {
      ++results_.exact_comparisons;
    } else {
      const auto entry = process_entry(client.process->pid());
      mismatch(client, fmt::format("its account says {} buffers, {} bytes; the server says {}",
                                   account["live_buffers"].dump(), account["live_bytes"].dump(),
                                   entry ? entry->dump() : std::string("nothing (server not answering)")));
    }
    if (random_() % 4 == 0) {
      kill_in_hold(client, account);
    } else {
      client.process->signal(SIGUSR1);
      const auto code = client.process->wait_for(60s);
      if (code != 0) {
        mismatch(client, fmt::format("let go, it exited with {} (its own table not empty, or an error)",
                                     code ? std::to_string(*code) : std::string("nothing: still running")));
      } else {
        ++results_.clean_exits;
      }
      if (!eventually([&] { return gone_from_ledger(client.process->pid()); }, 20s)) {
        mismatch(client, "exited cleanly but is still in the server's ledger");
      }
    }
    count_events(client);
  }

  void kill_in_hold(Client& client, const json& account) {
    const auto before = smi_json();
    if (!before) {
      mismatch(client, "server not answering before the kill");
      return;
    }
    const std::uint64_t reclaimed_before = (*before)["reclaimed_allocations"].get<std::uint64_t>();
    client.process->signal(SIGKILL);
    (void)client.process->wait_for(30s);
    ++results_.client_kills;
    ++results_.client_kills_in_hold;
    std::uint64_t reclaimed = 0;
    const bool exact = eventually(
        [&] {
          const auto after = smi_json();
          if (!after) return false;
          reclaimed = (*after)["reclaimed_allocations"].get<std::uint64_t>() - reclaimed_before;
          for (const json& process : (*after)["processes"]) {
            if (process["pid"] == client.process->pid()) return false;
          }
          return true;
        },
        20s);
    if (!exact || reclaimed != account["live_buffers"].get<std::uint64_t>()) {
      mismatch(client, fmt::format("killed holding {} buffers, the server reclaimed {}{}",
                                   account["live_buffers"].dump(), reclaimed,
                                   exact ? "" : " and still lists the process"));
    }
  }

  void kill_working_client() {
    std::vector<std::size_t> working;
    for (std::size_t slot = 0; slot < clients_.size(); ++slot) {
      if (!tend(*clients_[slot])) working.push_back(slot);
    }
    if (working.empty()) return;
    auto& client = clients_[working[random_() % working.size()]];
    client->process->signal(SIGKILL);
    (void)client->process->wait_for(30s);
    ++results_.client_kills;
    if (!eventually([&] { return gone_from_ledger(client->process->pid()); }, 20s)) {
      mismatch(*client, "killed mid-work, its buffers were never reclaimed");
    }
    count_events(*client);
    client = start_client();
  }

  void count_events(const Client& client) {
    if (const auto last = report(client, nullptr)) {
      results_.events += (*last)["device_buffers_allocated"].get<std::uint64_t>() +
                         (*last)["device_buffers_freed"].get<std::uint64_t>();
    }
  }

  // Counters live as long as one server: add each server's last figures up.
  void remember_counters() {
    const auto summary = smi_json();
    if (!summary) return;
    const auto add = [&](std::uint64_t& total, const char* key) { total += (*summary)[key].get<std::uint64_t>(); };
    add(results_.unknown_deallocations, "unknown_deallocations");
    add(results_.double_deallocations, "double_deallocations");
    add(results_.malformed_messages, "malformed_messages");
    add(results_.reclaimed_allocations, "reclaimed_allocations");
    add(results_.resyncs, "resyncs");
  }

  void final_checks() {
    const auto summary = smi_json();
    if (!summary) {
      ++results_.mismatches;
      fmt::print(stderr, "meshrt-soak: MISMATCH: the server does not answer at the end\n");
      return;
    }
    remember_counters();
    if ((*summary)["active_allocations"] != 0 || !(*summary)["processes"].empty()) {
      ++results_.mismatches;
      fmt::print(stderr, "meshrt-soak: MISMATCH: at the end the server still has {} active allocations in {}\n",
                 (*summary)["active_allocations"].dump(), (*summary)["processes"].dump());
    }
    if (const auto verify = smi_json({"--verify", "--json"}); !verify || (*verify)["consistent"] != true) {
      ++results_.mismatches;
      fmt::print(stderr, "meshrt-soak: MISMATCH: meshrt-smi --verify: {}\n",
                 verify ? verify->dump() : std::string("failed"));
    }
    // A double free or a malformed frame from our own client is a bug as much as a mismatch.
    if (results_.double_deallocations != 0 || results_.malformed_messages != 0) {
      ++results_.mismatches;
      fmt::print(stderr, "meshrt-soak: MISMATCH: over the run the servers counted {} double frees and {} malformed "
                 "messages from our own clients\n", results_.double_deallocations, results_.malformed_messages);
    }
  }

  Options options_;
  std::mt19937_64 random_;
  TempDirectory socket_dir_;
  std::unique_ptr<ChildProcess> server_;
  std::vector<std::unique_ptr<Client>> clients_;
  Results results_;
};

json to_json(const Results& r) {
  return {{"events", r.events},
          {"clients_started", r.clients_started},
          {"client_kills", r.client_kills},
          {"client_kills_in_hold", r.client_kills_in_hold},
          {"clean_exits", r.clean_exits},
          {"exact_comparisons", r.exact_comparisons},
          {"server_restarts", r.server_restarts},
          {"server_stops", r.server_stops},
          {"churning_clients", r.churning_clients},
          {"forking_clients", r.forking_clients},
          {"mismatches", r.mismatches},
          {"unknown_deallocations", r.unknown_deallocations},
          {"double_deallocations", r.double_deallocations},
          {"malformed_messages", r.malformed_messages},
          {"reclaimed_allocations", r.reclaimed_allocations},
          {"resyncs", r.resyncs},
          {"seconds", r.seconds}};
}

int run(int argc, char** argv) {
  Options options;
  CLI::App app{"meshrt-soak: clients and the allocation server killed under load; the ledger must stay exact"};
  app.add_option("--clients", options.clients, "client processes at once")->check(CLI::Range(1U, 64U));
  app.add_option("--seconds", options.seconds, "how long to inject faults")->check(CLI::PositiveNumber);
  app.add_option("--threads", options.threads, "allocating threads per client")->check(CLI::Range(1U, 16U));
  app.add_option("--seed", options.seed);
  app.add_option("--bin", options.bin, "directory of meshrt-alloc-server, meshrt-smi, meshrt-loadgen")
      ->default_str("this program's directory");
  app.add_option("--work", options.work, "where logs and client reports go (kept)")->default_str("a temp directory");
  app.add_option("--output", options.output, "write the results here as JSON");
  CLI11_PARSE(app, argc, argv);
  if (options.bin.empty()) options.bin = std::filesystem::read_symlink("/proc/self/exe").parent_path().string();
  const TempDirectory scratch;
  if (options.work.empty()) options.work = scratch.path().string();

  fmt::print("meshrt-soak: {} clients x {} threads for {} s (seed {}); logs in {}\n", options.clients,
             options.threads, options.seconds, options.seed, options.work);
  std::fflush(stdout);
  const Results results = Soak(options).run();
  const json figures = to_json(results);
  fmt::print("meshrt-soak: {}\n", figures.dump());
  if (!options.output.empty()) {
    std::filesystem::create_directories(std::filesystem::path(options.output).parent_path());
    std::ofstream(options.output) << figures.dump(2) << '\n';
  }
  const bool exact = results.mismatches == 0 && results.unknown_deallocations == 0 && results.exact_comparisons > 0;
  fmt::print("meshrt-soak: {}\n", exact ? "exact: the ledger matched every client's own account"
                                        : "FAILED: see the mismatches above");
  return exact ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "meshrt-soak: {}\n", error.what());
    return 1;
  }
}
