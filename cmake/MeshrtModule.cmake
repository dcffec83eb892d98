# One way to declare "a meshrt module", used by every module so they all build alike.
#
#   meshrt_add_module(<name>
#     INTERFACES  <.cppm files: the exported surface, under modules/<name>/>
#     INTERNAL    <internal partitions: module units the implementation imports, never exported>
#     SOURCES     <module implementation units, under src/<name>/>
#     MODULES     <meshrt modules this one imports, e.g. core alloc>
#     LIBRARIES   <other libraries it uses>)
#
# Produces the static library meshrt_<name> with alias meshrt::<name>.

add_library(meshrt_warnings INTERFACE)
target_compile_options(meshrt_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow -Wnon-virtual-dtor
  -Wold-style-cast -Wimplicit-fallthrough -Werror
  # Configs are aggregates with defaults, meant to be filled by designated initializers in part.
  -Wno-missing-designated-field-initializers)

function(meshrt_add_module name)
  cmake_parse_arguments(PARSE_ARGV 1 ARG "" "" "INTERFACES;INTERNAL;SOURCES;MODULES;LIBRARIES")
  set(target meshrt_${name})
  add_library(${target} STATIC)
  add_library(meshrt::${name} ALIAS ${target})
  target_sources(${target}
    PUBLIC FILE_SET CXX_MODULES BASE_DIRS "${PROJECT_SOURCE_DIR}/modules" FILES ${ARG_INTERFACES}
    PRIVATE ${ARG_SOURCES})
  if(ARG_INTERNAL)
    target_sources(${target} PRIVATE FILE_SET internal_partitions TYPE CXX_MODULES
                   BASE_DIRS "${PROJECT_SOURCE_DIR}/src" FILES ${ARG_INTERNAL})
  endif()
  target_compile_features(${target} PUBLIC cxx_std_20)
  set(deps)
  foreach(module IN LISTS ARG_MODULES)
    list(APPEND deps meshrt_${module})
  endforeach()
  # Warnings and sanitizer flags are for building meshrt, not for its users: never exported.
  target_link_libraries(${target} PUBLIC ${deps} ${ARG_LIBRARIES} $<BUILD_INTERFACE:meshrt_sanitizers>
                                  PRIVATE $<BUILD_INTERFACE:meshrt_warnings>)
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name} POSITION_INDEPENDENT_CODE ON)
  # The module's files, for white-box test programs that build a private copy of it.
  list(TRANSFORM ARG_INTERFACES PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/")
  set_target_properties(${target} PROPERTIES MESHRT_INTERFACES "${ARG_INTERFACES}" MESHRT_INTERNAL "${ARG_INTERNAL}"
                                             MESHRT_SOURCES "${ARG_SOURCES}")
endfunction()
