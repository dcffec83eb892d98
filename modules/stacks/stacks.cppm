// meshrt.stacks — who called: the calling thread's return addresses, taken by walking its frame
// pointers (every meshrt preset keeps them), and their names, files and lines, found in the
// process's own DWARF (libdw) and demangled (LLVM's demangler: it reads module-attached names,
// which libstdc++ 12's does not). Capturing is cheap and lock-free; symbolizing is slow and
// belongs on a background thread (ADR 0024).
module;
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

export module meshrt.stacks;

export namespace meshrt::stacks {

// The most frames a captured stack keeps: deeper callers are cut off.
inline constexpr std::size_t max_frames = 64;

// Return addresses of the calling thread, innermost first, starting with the caller of
// capture() and skipping `skip` more; at most out.size(). The walk stops at the end of the
// frame chain, at a frame outside the thread's stack, or at one that does not lead outwards,
// so a caller built without frame pointers cuts the stack short but never crashes it.
[[nodiscard]] std::size_t capture(std::span<std::uintptr_t> out, std::size_t skip = 0) noexcept;

// A frame as people read it. Native frames have an address; frames an interpreter gave
// (Python's, through ScopedCallerFrames) have none.
struct Frame {
  std::uint64_t address{};
  std::string function;  // demangled; "" when unknown
  std::string file;      // source file, or the binary when there is no line information
  std::uint32_t line{};  // 0 when unknown
  bool interpreted{};    // a frame of an interpreter's own stack (Python), not a native one
  friend bool operator==(const Frame&, const Frame&) = default;
};

// Names return addresses of this process. Not thread-safe: one per thread that symbolizes.
// Addresses are cached, so a stack seen again costs one look-up per frame.
class Symbolizer {
 public:
  Symbolizer();
  Symbolizer(const Symbolizer&) = delete;
  Symbolizer& operator=(const Symbolizer&) = delete;
  Symbolizer(Symbolizer&&) noexcept;
  Symbolizer& operator=(Symbolizer&&) noexcept;
  ~Symbolizer();

  // The frames of the call that returns to `return_address` (the call instruction is just before
  // it), innermost first: the functions the optimizer inlined there, each at the line it was
  // called from, then the function the address is in. One frame when nothing was inlined; never none.
  [[nodiscard]] std::vector<Frame> symbolize(std::uintptr_t return_address);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Frames an interpreter supplies for the calls made on this thread while it lives: the Python
// binding takes them at its entry, while it holds the GIL, so the allocation's stack shows
// where in Python it came from. Innermost first. Scopes nest: the innermost one counts.
class ScopedCallerFrames {
 public:
  explicit ScopedCallerFrames(std::vector<Frame> frames);
  ScopedCallerFrames(const ScopedCallerFrames&) = delete;
  ScopedCallerFrames& operator=(const ScopedCallerFrames&) = delete;
  ScopedCallerFrames(ScopedCallerFrames&&) = delete;
  ScopedCallerFrames& operator=(ScopedCallerFrames&&) = delete;
  ~ScopedCallerFrames();

  [[nodiscard]] std::span<const Frame> frames() const { return frames_; }
  [[nodiscard]] std::uint64_t hash() const { return hash_; }

 private:
  std::vector<Frame> frames_;
  std::uint64_t hash_{};
  const ScopedCallerFrames* outer_{};
};

// The innermost ScopedCallerFrames of this thread, or null.
[[nodiscard]] const ScopedCallerFrames* caller_frames() noexcept;

// Mixes return addresses (and a seed, e.g. the interpreter frames' hash) into a 64-bit key.
[[nodiscard]] std::uint64_t hash_frames(std::span<const std::uintptr_t> frames, std::uint64_t seed = 0) noexcept;

// The frame people mean by "the call site": the innermost interpreted frame when there is one
// (a Python test's line), else the innermost native frame outside meshrt and the standard
// library; the innermost frame when every one is inside. Index into `frames`, or none when empty.
[[nodiscard]] std::size_t call_site(std::span<const Frame> frames);

// "function (file:line)", or what of it is known.
[[nodiscard]] std::string describe(const Frame& frame);

}  // namespace meshrt::stacks
