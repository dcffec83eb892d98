// meshrt-alloc-server — the bundled allocation server: a foreground daemon on a Unix socket that
// keeps per-device, per-process, per-memory-type ledgers of every client's allocations.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

import meshrt.core;
import meshrt.protocol;
import meshrt.server;

namespace {

int run(int argc, char** argv) {
  meshrt::server::ServerConfig config;
  config.socket_path = meshrt::protocol::default_socket_path();
  std::string group;
  double summary_seconds = 10;
  double activity_seconds = 1;
  bool quiet = false;

  CLI::App app{"meshrt-alloc-server: tracks the device allocations of meshrt processes (see meshrt-smi)"};
  app.add_option("--socket", config.socket_path, "Unix socket to listen on ($MESHRT_ALLOC_SERVER)")
      ->capture_default_str();
  app.add_option("--group", group, "let members of this group connect (socket 0660, directory 0750)");
  app.add_option("--summary-interval", summary_seconds, "seconds between summaries in the log, when something changed")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 86400.0));
  app.add_option("--activity-interval", activity_seconds, "seconds between allocation activity lines in the log")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 3600.0));
  app.add_flag("--quiet", quiet, "log sessions and summaries only, not allocation activity");
  double hello_timeout_seconds = 10;
  std::uint64_t max_pending_mib = config.max_pending_output >> 20U;
  app.add_option("--max-sessions", config.max_sessions, "most connections at once")->capture_default_str();
  app.add_option("--max-sessions-per-process", config.max_sessions_per_process, "most connections from one process")
      ->capture_default_str();
  app.add_option("--hello-timeout", hello_timeout_seconds, "seconds a connection may stay silent before Hello")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 3600.0));
  app.add_option("--max-live-per-process", config.max_live_per_session, "most live allocations one process may hold")
      ->capture_default_str();
  app.add_option("--max-names-per-process", config.max_names_per_session, "most mesh buffer names one process may hold")
      ->capture_default_str();
  app.add_option("--max-stacks-per-process", config.max_stacks_per_session,
                 "most call stacks one process may describe (MESHRT_ALLOC_STACKS=1); more are counted, not kept")
      ->capture_default_str();
  app.add_option("--leak-reports", config.leak_reports,
                 "leak reports kept for meshrt-smi --leaks: those of the last N processes that left buffers behind")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{0}, std::size_t{1} << 16U));
  app.add_option("--history-samples", config.history_samples,
                 "usage samples the timeline keeps for meshrt-smi --timeline (24 bytes each; the oldest go "
                 "first; 0: no timeline)")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{0}, std::size_t{1} << 26U));
  app.add_option("--max-messages-per-second", config.max_messages_per_second, "most frames a second from one session")
      ->capture_default_str()
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 40U));
  app.add_option("--max-pending-output-mib", max_pending_mib,
                 "MiB of replies a monitor may leave unread before it is dropped")
      ->capture_default_str()
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 20U));
  double reply_stall_seconds = 30;
  app.add_option("--reply-stall-timeout", reply_stall_seconds,
                 "seconds a monitor may take none of a buffer list before it is dropped")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 3600.0));
  std::string metrics;
  app.add_option("--metrics", metrics,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464; 0.0.0.0 to expose it)");
  app.set_version_flag("--version", fmt::format("meshrt-alloc-server {} (protocol version {})", meshrt::runtime_version, meshrt::protocol::version));
  app.footer("Exit codes: 0 stopped cleanly (SIGINT/SIGTERM), 1 could not start or failed, 2 bad usage.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::CallForVersion& version) {
    return app.exit(version);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "meshrt-alloc-server: {}\n\n{}", error.what(), app.help());
    return 2;
  }
  if (!group.empty()) config.group = group;
  config.summary_interval = std::chrono::milliseconds(static_cast<std::int64_t>(summary_seconds * 1000));
  config.activity_interval = std::chrono::milliseconds(static_cast<std::int64_t>(activity_seconds * 1000));
  config.log_activity = !quiet;
  config.hello_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(hello_timeout_seconds * 1000));
  config.max_pending_output = static_cast<std::size_t>(max_pending_mib) << 20U;
  config.reply_stall_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(reply_stall_seconds * 1000));
  if (!metrics.empty()) config.metrics_address = metrics;

  auto server = meshrt::server::Server::start(config);
  if (!server) {
    fmt::print(stderr, "meshrt-alloc-server: {}\n", server.error().message);
    return 1;
  }
  if (auto ran = (*server)->run(/*handle_signals=*/true); !ran) {
    fmt::print(stderr, "meshrt-alloc-server: {}\n", ran.error().message);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "meshrt-alloc-server: {}\n", error.what());
    return 1;
  }
}
