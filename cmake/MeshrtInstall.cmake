# `cmake --install`: the runtime's libraries with their module interface units, the programs, and
# a CMake package so that a consumer writes find_package(meshrt CONFIG REQUIRED), links
# meshrt::runtime and `import meshrt;` (its build compiles the interface units itself).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MESHRT_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/meshrt")
set(meshrt_installed_modules core alloc unix_socket protocol stacks tracking tracking_client device mesh program tensor ops monitor)
list(TRANSFORM meshrt_installed_modules PREPEND meshrt_)

install(TARGETS ${meshrt_installed_modules} meshrt_runtime
  EXPORT meshrt-targets
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  FILE_SET CXX_MODULES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/meshrt/modules")
install(EXPORT meshrt-targets
  NAMESPACE meshrt::
  DESTINATION "${MESHRT_INSTALL_CMAKEDIR}"
  CXX_MODULES_DIRECTORY cxx-modules)

install(TARGETS meshrt-demo meshrt-alloc-server meshrt-smi RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")

configure_package_config_file("${CMAKE_CURRENT_LIST_DIR}/meshrt-config.cmake.in"
  "${PROJECT_BINARY_DIR}/meshrt-config.cmake" INSTALL_DESTINATION "${MESHRT_INSTALL_CMAKEDIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/meshrt-config-version.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/meshrt-config.cmake" "${PROJECT_BINARY_DIR}/meshrt-config-version.cmake"
  DESTINATION "${MESHRT_INSTALL_CMAKEDIR}")
