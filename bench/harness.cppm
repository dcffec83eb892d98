// meshrt.bench — the benchmark harness (warm-up, repetitions, medians) and the figures it reports.
module;
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <time.h>

export module meshrt.bench;

export namespace meshrt::bench {

using Clock = std::chrono::steady_clock;

// Which time a measurement counts: wall-clock, or the CPU time of the calling thread only (what
// the application thread itself pays, without the time other threads and processes take from it
// on a 2-core machine).
enum class Timing : std::uint8_t { wall, thread_cpu };

inline double now_ns(Timing timing) {
  if (timing == Timing::wall) {
    return std::chrono::duration<double, std::nano>(Clock::now().time_since_epoch()).count();
  }
  timespec time{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time);
  return static_cast<double>(time.tv_sec) * 1e9 + static_cast<double>(time.tv_nsec);
}

// Runs `batch` (which performs `operations` operations) `warmups` times unmeasured, then
// `repetitions` times measured; returns the median nanoseconds per operation.
template <class Batch>
double median_ns_per_op(Batch&& batch, std::uint64_t operations, int repetitions = 9, int warmups = 2,
                        Timing timing = Timing::wall) {
  for (int i = 0; i < warmups; ++i) batch();
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(repetitions));
  for (int i = 0; i < repetitions; ++i) {
    const double start = now_ns(timing);
    batch();
    samples.push_back((now_ns(timing) - start) / static_cast<double>(operations));
  }
  std::ranges::sort(samples);
  return samples[samples.size() / 2];
}

// Two batches measured alternately, so that a noisy neighbour hits both alike; the median of each.
template <class A, class B>
std::pair<double, double> paired_medians(A&& a, B&& b, std::uint64_t operations, int repetitions = 11,
                                         Timing timing = Timing::wall) {
  a();
  b();
  std::vector<double> as;
  std::vector<double> bs;
  for (int i = 0; i < repetitions; ++i) {
    double start = now_ns(timing);
    a();
    as.push_back((now_ns(timing) - start) / static_cast<double>(operations));
    start = now_ns(timing);
    b();
    bs.push_back((now_ns(timing) - start) / static_cast<double>(operations));
  }
  std::ranges::sort(as);
  std::ranges::sort(bs);
  return {as[as.size() / 2], bs[bs.size() / 2]};
}

// One reported number, with the target it is held to.
struct Figure {
  std::string key;
  double value{};
  std::string unit;
  std::string target;  // e.g. "<= 1.10"; empty when the figure is informational
  bool met{true};
};

enum class Bound : std::uint8_t { at_most, at_least, none };

inline Figure figure(std::string key, double value, std::string unit, Bound bound = Bound::none, double limit = 0) {
  Figure f{std::move(key), value, std::move(unit), {}, true};
  if (bound == Bound::at_most) {
    f.target = "<= " + std::to_string(limit);
    f.met = value <= limit;
  } else if (bound == Bound::at_least) {
    f.target = ">= " + std::to_string(limit);
    f.met = value >= limit;
  }
  return f;
}

struct Context {
  std::string bin_dir;    // where meshrt-alloc-server and this program live
  std::string self;       // this program, for the client processes it starts
  std::string scratch;    // a private directory for sockets
};

// The sections; each measures its figures in one run so that ratios compare like with like.
std::vector<Figure> allocator_figures();
std::vector<Figure> tracking_figures(const Context& context);
std::vector<Figure> server_figures(const Context& context);
std::vector<Figure> workload_figures();
std::vector<Figure> python_figures(const Context& context);
// Run under callgrind by tracking_figures: `lives` device buffer lives on the main thread,
// counted (collection on) only around them; tracked through a client of `socket`, or untracked
// when it is empty.
int count_lives(const std::string& socket, std::uint64_t lives);
// The client process of the ingest benchmark: sends `events` as fast as it can, then Goodbye.
int blast(const std::string& socket, std::uint64_t events);
// The holder process of the memory benchmark: keeps `live` allocations until stdin closes.
int hold(const std::string& socket, std::uint64_t live);

}  // namespace meshrt::bench
