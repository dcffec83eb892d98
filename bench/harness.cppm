// meshrt.bench — a small benchmark harness: warm-up, repetitions, medians, and the results file.
module;
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

export module meshrt.bench;

export namespace meshrt::bench {

using Clock = std::chrono::steady_clock;

// Runs `batch` (which performs `operations` operations) `warmups` times unmeasured, then
// `repetitions` times measured; returns the median nanoseconds per operation.
template <class Batch>
double median_ns_per_op(Batch&& batch, std::uint64_t operations, int repetitions = 9, int warmups = 2) {
  for (int i = 0; i < warmups; ++i) batch();
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(repetitions));
  for (int i = 0; i < repetitions; ++i) {
    const auto start = Clock::now();
    batch();
    const auto elapsed = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
    samples.push_back(elapsed / static_cast<double>(operations));
  }
  std::ranges::sort(samples);
  return samples[samples.size() / 2];
}

// Two batches measured alternately, so that a noisy neighbour hits both alike; returns the
// median of each.
template <class A, class B>
std::pair<double, double> paired_medians(A&& a, B&& b, std::uint64_t operations, int repetitions = 11) {
  a();
  b();
  std::vector<double> as;
  std::vector<double> bs;
  for (int i = 0; i < repetitions; ++i) {
    auto start = Clock::now();
    a();
    as.push_back(std::chrono::duration<double, std::nano>(Clock::now() - start).count() / static_cast<double>(operations));
    start = Clock::now();
    b();
    bs.push_back(std::chrono::duration<double, std::nano>(Clock::now() - start).count() / static_cast<double>(operations));
  }
  std::ranges::sort(as);
  std::ranges::sort(bs);
  return {as[as.size() / 2], bs[bs.size() / 2]};
}

}  // namespace meshrt::bench
