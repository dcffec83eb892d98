module;
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <pthread.h>
#include <unistd.h>

#include <dwarf.h>
#include <elfutils/libdw.h>
#include <elfutils/libdwfl.h>
#include <fmt/format.h>
#include <llvm/Demangle/Demangle.h>

module meshrt.stacks;

namespace meshrt::stacks {

namespace {

// Where the calling thread's stack ends (its highest address): frames are only read below it.
std::uintptr_t stack_end_of_this_thread() noexcept {
  pthread_attr_t attributes;
  if (::pthread_getattr_np(::pthread_self(), &attributes) != 0) return 0;
  void* base = nullptr;
  std::size_t size = 0;
  const int got = ::pthread_attr_getstack(&attributes, &base, &size);
  ::pthread_attr_destroy(&attributes);
  if (got != 0) return 0;
  return reinterpret_cast<std::uintptr_t>(base) + size;  // NOLINT(performance-no-int-to-ptr): an address bound
}

thread_local const ScopedCallerFrames* innermost_caller_frames = nullptr;

constexpr std::uint64_t mix(std::uint64_t h, std::uint64_t value) noexcept {
  h ^= value + 0x9e3779b97f4a7c15ULL + (h << 6U) + (h >> 2U);
  h *= 0xff51afd7ed558ccdULL;
  return h ^ (h >> 33U);
}

std::uint64_t hash_text(std::uint64_t h, std::string_view text) noexcept {
  for (const char c : text) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return mix(h, text.size());
}

bool starts_with_any(std::string_view text, std::initializer_list<std::string_view> prefixes) {
  for (const std::string_view prefix : prefixes) {
    if (text.starts_with(prefix)) return true;
  }
  return false;
}

bool is_module_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.';
}

// LLVM writes a name attached to a named module as "meshrt::MeshDevice@meshrt.mesh::create":
// people read (and grep) "meshrt::MeshDevice::create", so the "@module" or "@module:partition" goes.
std::string without_module_attachments(std::string_view name) {
  std::string out;
  out.reserve(name.size());
  for (std::size_t i = 0; i < name.size(); ++i) {
    if (name[i] != '@') {
      out += name[i];
      continue;
    }
    std::size_t end = i + 1;
    while (end < name.size() && is_module_name_char(name[end])) ++end;
    if (end + 1 < name.size() && name[end] == ':' && name[end + 1] != ':') {
      ++end;
      while (end < name.size() && is_module_name_char(name[end])) ++end;
    }
    i = end - 1;
  }
  return out;
}

// A demangled function without the return type a template's name starts with ("auto ",
// "void ", "decltype(...) "), so that its qualified name comes first.
std::string_view without_return_type(std::string_view function) {
  for (const std::string_view type : {"auto ", "void ", "bool ", "int "}) {
    if (function.starts_with(type)) return function.substr(type.size());
  }
  if (function.starts_with("decltype(")) {
    int depth = 0;
    for (std::size_t i = 0; i < function.size(); ++i) {
      if (function[i] == '(') ++depth;
      if (function[i] == ')' && --depth == 0) {
        return i + 2 <= function.size() ? function.substr(i + 2) : std::string_view{};
      }
    }
  }
  return function;
}

}  // namespace

// Not inlined: the walk starts at this function's own frame, whose return address is the caller's.
// It reads saved frame pointers wherever they lead inside the thread's stack, redzones of
// instrumented frames included: not a load the sanitizers should judge.
[[gnu::noinline]] __attribute__((no_sanitize("address", "thread"))) std::size_t capture(std::span<std::uintptr_t> out, std::size_t skip) noexcept {
  thread_local const std::uintptr_t stack_end = stack_end_of_this_thread();
  const auto* frame = static_cast<const std::uintptr_t*>(__builtin_frame_address(0));
  std::size_t count = 0;
  while (count < out.size()) {
    const auto at = reinterpret_cast<std::uintptr_t>(frame);
    // A frame record is two words: the caller's frame pointer, then the return address.
    if (at % alignof(std::uintptr_t) != 0 || stack_end == 0 || at > stack_end - 2 * sizeof(std::uintptr_t)) break;
    const std::uintptr_t next = frame[0];
    const std::uintptr_t return_address = frame[1];
    if (return_address == 0) break;
    if (skip > 0) {
      --skip;
    } else {
      out[count++] = return_address;
    }
    if (next <= at) break;  // frames lead outwards (to higher addresses), or the chain is broken
    frame = reinterpret_cast<const std::uintptr_t*>(next);  // NOLINT(performance-no-int-to-ptr): the walk itself
  }
  return count;
}

std::uint64_t hash_frames(std::span<const std::uintptr_t> frames, std::uint64_t seed) noexcept {
  std::uint64_t h = mix(seed, frames.size());
  for (const std::uintptr_t address : frames) h = mix(h, address);
  return h;
}

ScopedCallerFrames::ScopedCallerFrames(std::vector<Frame> frames)
    : frames_(std::move(frames)), outer_(innermost_caller_frames) {
  std::uint64_t h = 0x51ed270b27a1f0c3ULL;
  for (const Frame& frame : frames_) h = mix(hash_text(hash_text(h, frame.function), frame.file), frame.line);
  hash_ = h;
  innermost_caller_frames = this;
}

ScopedCallerFrames::~ScopedCallerFrames() { innermost_caller_frames = outer_; }

const ScopedCallerFrames* caller_frames() noexcept { return innermost_caller_frames; }

std::size_t call_site(std::span<const Frame> frames) {
  for (std::size_t i = 0; i < frames.size(); ++i) {
    if (frames[i].interpreted) return i;
  }
  for (std::size_t i = 0; i < frames.size(); ++i) {
    const std::string_view function = without_return_type(frames[i].function);
    // The runtime's own frames and the libraries' (std::invoke, tl::expected's and_then, ...)
    // are the how; the call site is the first frame of the code that asked.
    if (function.empty() || starts_with_any(function, {"meshrt::", "std::", "tl::", "gsl::", "pybind11::", "__"})) {
      continue;
    }
    return i;
  }
  return 0;
}

std::string describe(const Frame& frame) {
  std::string function = frame.function.empty() ? fmt::format("{:#x}", frame.address) : frame.function;
  if (frame.file.empty()) return function;
  if (frame.line == 0) return fmt::format("{} ({})", function, frame.file);
  return fmt::format("{} ({}:{})", function, frame.file, frame.line);
}

struct Symbolizer::State {
  Dwfl_Callbacks callbacks{};
  Dwfl* dwfl{nullptr};
  char* debuginfo_path{nullptr};
  std::unordered_map<std::uintptr_t, std::vector<Frame>> cache;

  State() {
    callbacks.find_elf = dwfl_linux_proc_find_elf;
    callbacks.find_debuginfo = dwfl_standard_find_debuginfo;
    callbacks.debuginfo_path = &debuginfo_path;
    dwfl = dwfl_begin(&callbacks);
    report_modules();
  }
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  State(State&&) = delete;
  State& operator=(State&&) = delete;
  ~State() {
    if (dwfl != nullptr) dwfl_end(dwfl);
  }

  // The process's mapped binaries, as now (again when an address is in none: a library
  // loaded since, as Python loads extension modules).
  void report_modules() const {
    if (dwfl == nullptr) return;
    dwfl_report_begin(dwfl);
    (void)dwfl_linux_proc_report(dwfl, ::getpid());
    (void)dwfl_report_end(dwfl, nullptr, nullptr);
  }

  // The compilation unit covering `pc`. dwfl_module_addrdie finds it by .debug_aranges, which
  // clang does not emit by default: then each unit is asked whether it covers the address.
  static std::optional<Dwarf_Die> unit_of(Dwfl_Module* module, Dwarf_Addr pc, Dwarf_Addr& bias) {
    if (Dwarf_Die* unit = dwfl_module_addrdie(module, pc, &bias); unit != nullptr) return *unit;
    for (Dwarf_Die* unit = dwfl_module_nextcu(module, nullptr, &bias); unit != nullptr;
         unit = dwfl_module_nextcu(module, unit, &bias)) {
      if (dwarf_haspc(unit, pc - bias) > 0) return *unit;
    }
    return std::nullopt;
  }

  // A function's name as people read it: its demangled linkage name, else its plain name.
  static std::string name_of(Dwarf_Die* function) {
    Dwarf_Attribute attribute;
    for (const unsigned int name : {DW_AT_linkage_name, DW_AT_MIPS_linkage_name}) {
      if (dwarf_attr_integrate(function, name, &attribute) == nullptr) continue;
      if (const char* linkage = dwarf_formstring(&attribute); linkage != nullptr) {
        return without_module_attachments(llvm::demangle(std::string_view(linkage)));
      }
    }
    if (dwarf_attr_integrate(function, DW_AT_name, &attribute) != nullptr) {
      if (const char* plain = dwarf_formstring(&attribute); plain != nullptr) return plain;
    }
    return {};
  }

  // Where an inlined call was made from: the file and line in the function it was inlined into.
  static void set_call_location(Dwarf_Die* unit, Dwarf_Die* inlined, Frame& frame) {
    Dwarf_Attribute attribute;
    Dwarf_Word file_index = 0;
    Dwarf_Word line = 0;
    if (dwarf_attr(inlined, DW_AT_call_file, &attribute) != nullptr && dwarf_formudata(&attribute, &file_index) == 0) {
      Dwarf_Files* files = nullptr;
      std::size_t file_count = 0;
      if (dwarf_getsrcfiles(unit, &files, &file_count) == 0 && file_index < file_count) {
        if (const char* file = dwarf_filesrc(files, file_index, nullptr, nullptr); file != nullptr) frame.file = file;
      }
    }
    if (dwarf_attr(inlined, DW_AT_call_line, &attribute) != nullptr && dwarf_formudata(&attribute, &line) == 0) {
      frame.line = static_cast<std::uint32_t>(line);
    }
  }

  // Appends the inlined calls under `parent` that cover `pc`, outermost first. Functions are
  // found at the unit's top level or in namespaces; inside one, blocks and inlined calls nest.
  static bool find_inlined_calls(Dwarf_Die* parent, Dwarf_Addr pc, std::vector<Dwarf_Die>& calls) {
    Dwarf_Die child;
    if (dwarf_child(parent, &child) != 0) return false;
    do {
      const int tag = dwarf_tag(&child);
      if (tag == DW_TAG_namespace) {
        if (find_inlined_calls(&child, pc, calls)) return true;
        continue;
      }
      const bool scope = tag == DW_TAG_subprogram || tag == DW_TAG_inlined_subroutine || tag == DW_TAG_lexical_block;
      if (!scope || dwarf_haspc(&child, pc) <= 0) continue;
      if (tag == DW_TAG_inlined_subroutine) calls.push_back(child);
      (void)find_inlined_calls(&child, pc, calls);
      return true;
    } while (dwarf_siblingof(&child, &child) == 0);
    return false;
  }

  // The inlined calls at `pc`, innermost first.
  static std::vector<Dwarf_Die> inlined_calls(Dwarf_Die* unit, Dwarf_Addr pc) {
    std::vector<Dwarf_Die> calls;
    (void)find_inlined_calls(unit, pc, calls);
    std::ranges::reverse(calls);
    return calls;
  }

  std::vector<Frame> lookup(std::uintptr_t return_address) {
    Frame frame{.address = return_address};
    if (dwfl == nullptr || return_address == 0) return {frame};
    // The call instruction ends just before the return address: look up a byte inside it.
    const Dwarf_Addr pc = return_address - 1;
    Dwfl_Module* module = dwfl_addrmodule(dwfl, pc);
    if (module == nullptr) {
      report_modules();
      module = dwfl_addrmodule(dwfl, pc);
    }
    if (module == nullptr) return {frame};
    if (const char* symbol = dwfl_module_addrname(module, pc); symbol != nullptr) {
      frame.function = without_module_attachments(llvm::demangle(std::string_view(symbol)));
    }
    Dwarf_Addr bias = 0;
    std::optional<Dwarf_Die> unit = unit_of(module, pc, bias);
    if (unit) {
      if (Dwarf_Line* line = dwarf_getsrc_die(&*unit, pc - bias); line != nullptr) {
        int line_number = 0;
        if (const char* file = dwarf_linesrc(line, nullptr, nullptr); file != nullptr) {
          (void)dwarf_lineno(line, &line_number);
          frame.file = file;
          frame.line = static_cast<std::uint32_t>(line_number > 0 ? line_number : 0);
        }
      }
    }
    if (frame.file.empty()) {
      const char* binary = dwfl_module_info(module, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
      if (binary != nullptr) frame.file = binary;
    }
    std::vector<Dwarf_Die> inlined = unit ? inlined_calls(&*unit, pc - bias) : std::vector<Dwarf_Die>{};
    if (inlined.empty() || !unit) return {frame};
    // The address's line is in the innermost inlined function; each inlined call's own location
    // is the line of the next frame out, the function the symbol names last.
    std::vector<Frame> frames;
    frames.reserve(inlined.size() + 1);
    for (std::size_t i = 0; i <= inlined.size(); ++i) {
      Frame named{.address = return_address};
      named.function = i < inlined.size() ? name_of(&inlined[i]) : frame.function;
      if (i == 0) {
        named.file = frame.file;
        named.line = frame.line;
      } else {
        set_call_location(&*unit, &inlined[i - 1], named);
      }
      frames.push_back(std::move(named));
    }
    return frames;
  }
};

Symbolizer::Symbolizer() : state_(std::make_unique<State>()) {}
Symbolizer::Symbolizer(Symbolizer&&) noexcept = default;
Symbolizer& Symbolizer::operator=(Symbolizer&&) noexcept = default;
Symbolizer::~Symbolizer() = default;

std::vector<Frame> Symbolizer::symbolize(std::uintptr_t return_address) {
  const auto found = state_->cache.find(return_address);
  if (found != state_->cache.end()) return found->second;
  std::vector<Frame> frames = state_->lookup(return_address);
  // Bounded: a process with more distinct return addresses than this forgets and starts over.
  constexpr std::size_t max_cached = 1U << 16U;
  if (state_->cache.size() >= max_cached) state_->cache.clear();
  state_->cache.emplace(return_address, frames);
  return frames;
}

}  // namespace meshrt::stacks
