// RUN: %clang_tidy --checks='-*,meshrt-ownership-escape' \
// RUN:   --config="{CheckOptions: {meshrt-ownership-escape.BufferTypes: 'Buffer;MeshBuffer', \
// RUN:     meshrt-ownership-escape.AllowedFactories: 'Buffer::create'}}" \
// RUN:   %s -- -std=c++20 | FileCheck %s --check-prefix=CHECK-MESSAGES --implicit-check-not='{{warning|error}}:'
// RUN: cp %s %t.cpp && cp %S/seed.h %T/seed.h
// RUN: %clang_tidy --checks='-*,meshrt-ownership-escape' --fix \
// RUN:   --config="{CheckOptions: {meshrt-ownership-escape.BufferTypes: 'Buffer;MeshBuffer', \
// RUN:     meshrt-ownership-escape.AllowedFactories: 'Buffer::create'}}" \
// RUN:   %t.cpp -- -std=c++20 -I%S > /dev/null
// RUN: FileCheck %s --check-prefix=CHECK-FIXES < %t.cpp

#include "seed.h"

struct Widget {};

std::unique_ptr<Buffer> make() {
  return std::unique_ptr<Buffer>(new Buffer());
  // CHECK-MESSAGES: :[[@LINE-1]]:10: warning: owning handle built from a raw buffer pointer outside the factories; buffers come only from Buffer::create() [meshrt-ownership-escape]
  // CHECK-FIXES: {{^}}  return std::make_unique<Buffer>();
}

void leaks(std::unique_ptr<Buffer> owned, std::shared_ptr<Buffer> shared) {
  Buffer* raw = new Buffer;
  // CHECK-MESSAGES: :[[@LINE-1]]:17: warning: raw 'new' of buffer type 'Buffer': a buffer must be owned by its RAII handle from the start; create it with Buffer::create() [meshrt-ownership-escape]
  delete raw;
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: raw 'delete' of buffer type 'Buffer': only its owning handle may end a buffer; let the handle go out of scope or call deallocate() [meshrt-ownership-escape]
  Buffer* escaped = owned.release();
  // CHECK-MESSAGES: :[[@LINE-1]]:27: warning: 'release()' lets a buffer escape its owning handle, so no destructor will report its Free; move the handle instead [meshrt-ownership-escape]
  std::unique_ptr<Buffer> adopted(escaped);
  // CHECK-MESSAGES: :[[@LINE-1]]:27: warning: owning handle built from a raw buffer pointer outside the factories
  shared.reset(adopted.get());
  // CHECK-MESSAGES: :[[@LINE-1]]:3: warning: owning handle built from a raw buffer pointer outside the factories
  shared.reset();             // giving a buffer back is fine
  auto moved = std::move(owned);  // moving the handle keeps ownership
  Widget* other = new Widget;     // not a buffer type
  delete other;
}

std::unique_ptr<Buffer> Buffer::create() { return std::unique_ptr<Buffer>(new Buffer()); }  // the factory
