// meshrt-fork-client — a tracked process that forks while it holds buffers, for the fork tests.
//
//   meshrt-fork-client allocate          the child opens its own mesh, allocates, frees, drops its
//                                        copies of the parent's buffers and returns from main
//   meshrt-fork-client exec PROGRAM ...  the child execs PROGRAM (a tracked process of its own)
//   meshrt-fork-client linger            the child sleeps (60 s at most) and the parent does not
//                                        wait for it: the parent's session must end with the parent
//   meshrt-fork-client storm             60 forks, each soon after the parent opened a mesh and
//                                        made 200 allocations and frees, at a different point of
//                                        the sender's 5 ms cycle; each child returns from main at
//                                        once. Prints "storm: N of 60 children failed" and exits 0
//                                        only if none did (under LeakSanitizer a child fails if
//                                        its exit finds a leak)
//
// The parent holds 3 buffers on a 1x2 mesh (6 device buffers). Except in storm, it then waits
// for the child (at most 30 s: a child that hangs at exit fails the run with exit 3), prints
// "child PID exited CODE", then "holding" and waits for SIGUSR1 (at most 60 s) before it frees
// everything and exits 0.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

import meshrt;
import meshrt.testing;

namespace {
// A test client counts every device buffer it makes: its meshes open without system buffers
// (ADR 0020), which the demo's tests cover.
meshrt::DeviceSpec client_spec() { return meshrt::testing::without_system_buffers(meshrt::DeviceSpec::wormhole_b0()); }
}  // namespace

using namespace meshrt;
using namespace std::chrono_literals;

namespace {

volatile std::sig_atomic_t resumed = 0;
extern "C" void resume(int /*signal*/) { resumed = 1; }

MeshBuffer replicated(MeshDevice& mesh, std::uint64_t size, std::string name) {
  return MeshBuffer::create(mesh,
                            ReplicatedBufferConfig{.size = size, .name = std::move(name)},
                            {.page_size = 1024, .buffer_type = BufferType::dram})
      .value();
}

// The child's life in "allocate" mode: everything it does goes through the inherited tracker.
int child_allocates(std::vector<MeshBuffer>& inherited) {
  auto mesh = MeshDevice::create({1, 1}, client_spec()).value();
  std::vector<MeshBuffer> own;
  own.push_back(replicated(mesh, 4096, "child"));
  own.push_back(replicated(mesh, 8192, "child"));
  own.pop_back();
  inherited.clear();  // its copies of the parent's buffers: their Frees must not reach the parent's session
  return 0;
}

// The child's exit code, 128 + signal if killed, or -1 if it is still running after 30 s (then killed).
int wait_for(pid_t child) {
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (::waitpid(child, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(child, SIGKILL);
      (void)::waitpid(child, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(1ms);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int storm(MeshDevice& mesh) {
  constexpr int children = 60;
  int failed = 0;
  for (int round = 0; round < children; ++round) {
    // A mesh opened describes its devices: the sender's next pass takes them off a queue it shares.
    auto burst = MeshDevice::create({1, 2}, client_spec()).value();
    for (int i = 0; i < 200; ++i) (void)replicated(i % 2 == 0 ? burst : mesh, 1024, {});
    std::this_thread::sleep_for(std::chrono::microseconds(round % 8 * 700));  // forks across the sender's cycle
    std::fflush(stdout);  // or the child would print what the parent had not yet
    const pid_t child = ::fork();
    if (child < 0) {
      std::perror("fork");
      return 1;
    }
    if (child == 0) return -1;  // main returns: static destructors, and LeakSanitizer's check
    if (const int code = wait_for(child); code != 0) {
      std::printf("child %d exited %d\n", child, code);
      ++failed;
    }
  }
  std::printf("storm: %d of %d children failed\n", failed, children);
  return failed == 0 ? 0 : 4;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || (args[0] != "allocate" && args[0] != "linger" && args[0] != "storm" &&
                        (args[0] != "exec" || args.size() < 2))) {
    std::fprintf(stderr, "usage: meshrt-fork-client allocate | linger | storm | exec PROGRAM [ARGS...]\n");
    return 2;
  }
  std::signal(SIGUSR1, resume);
  auto mesh = MeshDevice::create({1, 2}, client_spec()).value();
  std::vector<MeshBuffer> buffers;
  for (int i = 0; i < 3; ++i) buffers.push_back(replicated(mesh, 1 << 20, "parent " + std::to_string(i)));

  if (args[0] == "storm") {
    const int code = storm(mesh);
    if (code < 0) return 0;  // a child, done
    return code;
  }

  const pid_t child = ::fork();
  if (child < 0) {
    std::perror("fork");
    return 1;
  }
  if (child == 0) {
    if (args[0] == "linger") {
      for (int i = 0; i < 6000; ++i) std::this_thread::sleep_for(10ms);
      ::_exit(0);
    }
    if (args[0] == "exec") {
      std::vector<char*> exec_argv;
      for (std::size_t i = 1; i < args.size(); ++i) exec_argv.push_back(argv[i + 1]);
      exec_argv.push_back(nullptr);
      ::execv(exec_argv[0], exec_argv.data());
      std::perror("execv");
      ::_exit(127);
    }
    return child_allocates(buffers);  // a normal exit: static destructors and all
  }

  if (args[0] == "linger") {
    std::printf("child %d lingering\nholding\n", child);
    std::fflush(stdout);
    for (int i = 0; i < 6000 && resumed == 0; ++i) std::this_thread::sleep_for(10ms);
    return 0;
  }
  const int code = wait_for(child);
  if (code < 0) {
    std::printf("child %d hung at exit\n", child);
    return 3;
  }
  std::printf("child %d exited %d\n", child, code);
  // The parent goes on allocating after the fork: its session must be intact.
  buffers.push_back(replicated(mesh, 2048, "after fork"));
  buffers.pop_back();
  std::printf("holding\n");
  std::fflush(stdout);
  for (int i = 0; i < 6000 && resumed == 0; ++i) std::this_thread::sleep_for(10ms);
  return 0;
}
