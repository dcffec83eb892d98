// Child processes for integration tests: spawn with a clean environment, capture output to
// files, wait with a deadline, signal, and never leave one running.
module;
#include <cerrno>
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;  // NOLINT: POSIX

export module meshrt.testing:process;

export namespace meshrt::testing {

std::string read_text(const std::string& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// Polls `condition` until it holds or `timeout` passes: every 0.1 ms at first, backing off to
// every 20 ms, so quick things are seen quickly and slow ones cost little.
template <class Condition>
bool eventually(Condition condition, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::chrono::microseconds pause{100};
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds{20'000});
  }
  return true;
}

class ChildProcess {
 public:
  struct Options {
    std::vector<std::string> argv;
    std::vector<std::pair<std::string, std::string>> environment;  // added to a cleaned copy of ours
    std::string stdout_path;
    std::string stderr_path;
  };

  explicit ChildProcess(Options options) : options_(std::move(options)) {
    std::vector<std::string> environment;
    for (char** entry = environ; *entry != nullptr; ++entry) {
      const std::string_view variable(*entry);
      // Tracking is off unless a test turns it on, whatever the caller's shell says.
      if (variable.starts_with("MESHRT_ALLOC_") || variable.starts_with("TT_ALLOC_")) continue;
      environment.emplace_back(variable);
    }
    for (const auto& [name, value] : options_.environment) environment.push_back(name + "=" + value);
    std::vector<char*> argv;
    for (std::string& arg : options_.argv) argv.push_back(arg.data());
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (std::string& entry : environment) envp.push_back(entry.data());
    envp.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, options_.stdout_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, options_.stderr_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int error = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    if (error != 0) {
      std::fprintf(stderr, "cannot spawn %s: %s\n", argv[0], std::strerror(error));
      std::abort();
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ChildProcess(ChildProcess&&) = delete;
  ChildProcess& operator=(ChildProcess&&) = delete;
  ~ChildProcess() {
    if (!status_) {
      ::kill(pid_, SIGKILL);
      (void)wait_for(std::chrono::seconds(10));
    }
  }

  [[nodiscard]] pid_t pid() const { return pid_; }
  void signal(int number) const { ::kill(pid_, number); }

  // The exit code (128 + N when killed by signal N), or nullopt if still running at the deadline.
  std::optional<int> wait_for(std::chrono::milliseconds timeout) {
    if (status_) return status_;
    eventually(
        [&] {
          int raw = 0;
          const pid_t done = ::waitpid(pid_, &raw, WNOHANG);
          if (done == pid_) status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
          return status_.has_value();
        },
        timeout);
    return status_;
  }

  [[nodiscard]] std::string standard_output() const { return read_text(options_.stdout_path); }
  [[nodiscard]] std::string standard_error() const { return read_text(options_.stderr_path); }

 private:
  Options options_;
  pid_t pid_{};
  std::optional<int> status_;
};

}  // namespace meshrt::testing
