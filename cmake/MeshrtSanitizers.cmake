# Sanitizers apply to everything the build compiles and links (our code and tests alike), so a
# report from any frame fails the run. The clang-tidy plugin opts out: clang-tidy loads it into an
# uninstrumented process.
if("${MESHRT_SANITIZER}" STREQUAL "address")
  set(_meshrt_sanitizer_flags -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
elseif("${MESHRT_SANITIZER}" STREQUAL "thread")
  set(_meshrt_sanitizer_flags -fsanitize=thread -fno-omit-frame-pointer)
elseif(NOT "${MESHRT_SANITIZER}" STREQUAL "")
  message(FATAL_ERROR "MESHRT_SANITIZER must be '', 'address' or 'thread', not '${MESHRT_SANITIZER}'")
endif()

add_library(meshrt_sanitizers INTERFACE)
if(_meshrt_sanitizer_flags)
  target_compile_options(meshrt_sanitizers INTERFACE ${_meshrt_sanitizer_flags})
  target_link_options(meshrt_sanitizers INTERFACE ${_meshrt_sanitizer_flags})
endif()
# The asan build is also the fuzzing build: coverage instrumentation everywhere (cheap), and the
# libFuzzer driver linked only into the fuzz targets (tests/fuzz).
if("${MESHRT_SANITIZER}" STREQUAL "address")
  target_compile_options(meshrt_sanitizers INTERFACE -fsanitize=fuzzer-no-link)
endif()
