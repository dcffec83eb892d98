# cmake -DMESHRT_BUILD=<build dir> -DCONSUMER=<this folder> -DWORK=<scratch> -DCXX=<compiler>
#       -DSCAN_DEPS=<clang-scan-deps> -P check.cmake
# Installs meshrt from MESHRT_BUILD into WORK/prefix, builds the consumer against that prefix
# only, runs it, and runs the installed meshrt-smi: what a user of the package does.
file(REMOVE_RECURSE "${WORK}")
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "failed (${code}): ${ARGV}\n${out}")
  endif()
  set(output "${out}" PARENT_SCOPE)
endfunction()

run("${CMAKE_COMMAND}" --install "${MESHRT_BUILD}" --prefix "${WORK}/prefix")
run("${CMAKE_COMMAND}" -S "${CONSUMER}" -B "${WORK}/build" -G Ninja "-DCMAKE_CXX_COMPILER=${CXX}"
    "-DCMAKE_CXX_COMPILER_CLANG_SCAN_DEPS=${SCAN_DEPS}" "-DCMAKE_PREFIX_PATH=${WORK}/prefix"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
run("${CMAKE_COMMAND}" --build "${WORK}/build")
run("${WORK}/build/consumer")
if(NOT output MATCHES "meshrt [0-9.]+: 8 device buffers live\nafter the buffer's scope: 0 live, 24 system buffers\nafter close: 0 live")
  message(FATAL_ERROR "the consumer ran but said:\n${output}")
endif()
message(STATUS "consumer: ${output}")
# The internals stay internal: naming any of them is a compile error that names it.
foreach(reach mesh_memory:MeshMemory memory_accessor:memory mesh_access:MeshAccess
              buffer_allocation:BufferAllocation mesh_resident:MeshResident)
  string(REPLACE ":" ";" pair "${reach}")
  list(GET pair 0 target)
  list(GET pair 1 name)
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK}/build" --target "reach_${target}"
                  RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(code EQUAL 0)
    message(FATAL_ERROR "a consumer could reach the runtime's internals: reach_${target} compiled")
  endif()
  if(NOT out MATCHES "error: [^\n]*${name}")
    message(FATAL_ERROR "reach_${target} failed, but not on '${name}':\n${out}")
  endif()
  message(STATUS "internal, as it must be: ${name}")
endforeach()
run("${WORK}/prefix/bin/meshrt-smi" --version)
message(STATUS "installed: ${output}")
# The Python package, where the README says it goes, imported as a user would.
if(PYTHON AND PYTHON_DIR)
  run("${CMAKE_COMMAND}" -E env "PYTHONPATH=${WORK}/prefix/${PYTHON_DIR}" "${PYTHON}" -c
      # Lines, not semicolons: run() passes its arguments on as a list.
      "import meshrt\nm = meshrt.open_mesh_device(meshrt.MeshShape(1, 2))\nb = meshrt.create_mesh_buffer(m, 4096, 2048)\nb.write(bytes(4096))\nm.close()\nprint('meshrt', meshrt.__version__, 'from', meshrt.__file__)")
  if(NOT output MATCHES "meshrt [0-9.]+ from ${WORK}/prefix/${PYTHON_DIR}/meshrt/__init__.py")
    message(FATAL_ERROR "the installed Python package said:\n${output}")
  endif()
  message(STATUS "python: ${output}")
endif()
file(REMOVE_RECURSE "${WORK}")
