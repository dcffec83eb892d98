// meshrt.tracking_client — the processor that streams every allocation and free to the
// allocation server over its Unix socket. Importing this module (`import meshrt;` does) makes
// Tracker::process_default() start one when MESHRT_ALLOC_TRACKING=1 (ADR 0019).
module;
#include <memory>

export module meshrt.tracking_client;

import meshrt.tracking;
export import :client;

namespace meshrt::detail {
// The processor Tracker::process_default() gets from this module: a started client when the
// environment asks for one, else none.
[[nodiscard]] std::shared_ptr<EventProcessor> client_from_environment();
}  // namespace meshrt::detail

namespace {
// Runs when this module is initialized: before main() in every program that imports it. The
// module's initializer is called from each importer's static initialization, so ASan's
// initialization-order check (on in the asan preset) sees this unit's global written while
// another unit initializes and calls it a fiasco; it is not one: the global is only written
// here, by its own initializer, and never read. It is kept out of that check, nothing else.
[[maybe_unused]] __attribute__((no_sanitize("address"))) const bool environment_client_provided = [] {
  meshrt::Tracker::provide_default_processor(&meshrt::detail::client_from_environment);
  return true;
}();
}  // namespace
