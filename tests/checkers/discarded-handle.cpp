// RUN: %clang_tidy --checks='-*,meshrt-discarded-handle,bugprone-unused-return-value' \
// RUN:   --config="{CheckOptions: {meshrt-discarded-handle.HandleTypes: 'Handle', \
// RUN:     bugprone-unused-return-value.CheckedReturnTypes: '::Handle;::Expected'}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error}}:'

#include <utility>

template <class T>
struct Expected {
  T& value() &;
  T&& value() &&;
  T&& operator*() &&;
  bool has_value() const;
};

struct Handle {
  Handle();
  Handle(Handle&&) noexcept;
  ~Handle();
  void deallocate();
  static Expected<Handle> create();
};

Handle make();

void use(Handle& held, bool again) {
  // What bugprone-unused-return-value already reports, once it knows the handle types:
  Handle::create();
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: the value returned by this function should not be disregarded; neglecting it may lead to errors [bugprone-unused-return-value]
  make();
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: the value returned by this function should not be disregarded
  (void)make();
  // CHECK-MESSAGES: :[[@LINE-1]]:9: warning: the value returned by this function should not be disregarded

  // What it misses, and meshrt-discarded-handle reports:
  Handle::create().value();
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: owning buffer handle 'Handle' is discarded: the buffer it owns is freed at the end of this statement; keep the handle in a variable, or call deallocate() if freeing is meant [meshrt-discarded-handle]
  *Handle::create();
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: owning buffer handle 'Handle' is discarded
  Handle{std::move(held)};
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: owning buffer handle 'Handle' is discarded
  if (again) Handle{make()};
  // CHECK-MESSAGES: :[[@LINE-1]]:14: warning: owning buffer handle 'Handle' is discarded
  for (int i = 0; i < 2; ++i) Handle::create().value();
  // CHECK-MESSAGES: :[[@LINE-1]]:31: warning: owning buffer handle 'Handle' is discarded

  // Silent: kept handles, names, moves that keep ownership, explicit frees.
  Handle kept = Handle::create().value();
  auto result = Handle::create();
  Handle other = std::move(kept);
  held;
  held.deallocate();
  other.deallocate();
  (void)result.has_value();
}
