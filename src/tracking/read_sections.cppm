// Read sections: how a Tracker knows when no record() still uses a listener list it replaced,
// so that a removed processor is destroyed (and its thread stopped) instead of kept forever.
//
// Each thread that records has a slot of its own. Entering a read announces it in the slot with
// a plain store on a line no other thread writes; a writer that replaced a list makes every
// thread's stores visible with one membarrier(2) (an asymmetric fence: the rare writer pays, the
// reader does not) and waits until every read that had begun is over. Where membarrier is not
// available (a seccomp profile that forbids it), the reader's store is an exchange instead. The same announcement carries the highest
// buffer id the thread has recorded an Alloc for, which is how a processor that joins late
// learns where its view starts (ADR 0012).
module;
#include <atomic>
#include <cstdint>
#include <memory>

module meshrt.tracking:read_sections;

namespace meshrt::detail {

struct ReaderSlot {
  // Bit 0: inside a read. Above it: reads begun, so a writer tells a new read from an old one.
  std::atomic<std::uint64_t> state{0};
  // One past the highest buffer id this thread recorded an Alloc for (through any tracker).
  std::atomic<std::uint64_t> high_water{0};
};

// While it lives, this thread is inside a read: lists loaded now stay valid. Nests.
class ReadSection {
 public:
  // `allocated_end`: one past the highest buffer id of the Allocs about to be recorded (0: none).
  explicit ReadSection(std::uint64_t allocated_end = 0);
  ReadSection(const ReadSection&) = delete;
  ReadSection& operator=(const ReadSection&) = delete;
  ~ReadSection();

 private:
  ReaderSlot* slot_{nullptr};  // this thread's own, alive while the thread is
  std::shared_ptr<ReaderSlot> temporary_slot_;
  std::uint64_t begun_{0};
  bool outermost_{false};
  bool temporary_{false};  // a slot for this read only: its thread's own is gone
};

// Forks this process is the child of, counted from the first call: a wait for a thread of the
// parent (one that was joining a processor at the fork) must not go on in the child.
[[nodiscard]] std::uint64_t forks_seen();
// True when this thread is inside a read (a processor or hook calling back into the tracker).
[[nodiscard]] bool inside_read_section();
// Returns true once every read that had begun before the call has ended. Not from inside a read.
// False (at once) when the fence it needs failed: the caller must then keep what it replaced.
[[nodiscard]] bool wait_for_read_sections();
// One past the highest buffer id any thread has announced an Alloc for. Seen by a call made
// after a list was published: every Alloc of a higher id is recorded with that list or a later one.
[[nodiscard]] std::uint64_t announced_high_water();

}  // namespace meshrt::detail
