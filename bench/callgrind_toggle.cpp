// Callgrind's client request, kept out of the modules: valgrind's macros are C (old-style casts,
// inline assembly) and do nothing when the program runs outside valgrind.
#include <valgrind/callgrind.h>

extern "C" void meshrt_bench_toggle_collect() {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wold-style-cast"
#pragma clang diagnostic ignored "-Wzero-as-null-pointer-constant"
  CALLGRIND_TOGGLE_COLLECT;
#pragma clang diagnostic pop
}
