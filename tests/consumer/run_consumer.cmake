# Build and run tests/consumer against diffuse (ctest drives this with cmake -P).
#
#   -DMODE=subdirectory|package   how the consumer gets diffuse
#   -DCONSUMER_SOURCE=dir         tests/consumer
#   -DDIFFUSE_SOURCE=dir          the diffuse source tree (subdirectory mode)
#   -DMAIN_BUILD_DIR=dir          diffuse build tree to install (package mode)
#   -DINSTALL_PREFIX=dir          where to install it (package mode; wiped first)
#   -DWORK_DIR=dir                scratch directory (wiped first)
#   -DCXX_COMPILER=path -DGENERATOR=name [-DMAKE_PROGRAM=path] [-DBUILD_TYPE=cfg]
#   [-DCONSUMER_BUILD_TYPE=cfg]   the consumer's own build type (default BUILD_TYPE); BUILD_TYPE
#                                 is the main build's (what package mode installs)
#
# Any failing step is fatal.
cmake_minimum_required(VERSION 3.25)

foreach(var MODE CONSUMER_SOURCE WORK_DIR CXX_COMPILER GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

set(mode_args "")
if(MODE STREQUAL "subdirectory")
  if(NOT DIFFUSE_SOURCE)
    message(FATAL_ERROR "run_consumer.cmake: subdirectory mode needs -DDIFFUSE_SOURCE")
  endif()
  list(APPEND mode_args "-DDIFFUSE_SOURCE=${DIFFUSE_SOURCE}")
elseif(MODE STREQUAL "package")
  if(NOT MAIN_BUILD_DIR OR NOT INSTALL_PREFIX)
    message(FATAL_ERROR "run_consumer.cmake: package mode needs -DMAIN_BUILD_DIR and -DINSTALL_PREFIX")
  endif()
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE must be subdirectory or package (got '${MODE}')")
endif()

set(config_args "")
set(build_type_arg "")
if(BUILD_TYPE)
  set(config_args --config "${BUILD_TYPE}")
endif()
if(NOT DEFINED CONSUMER_BUILD_TYPE)
  set(CONSUMER_BUILD_TYPE "${BUILD_TYPE}")
endif()
set(consumer_config_args "")
if(CONSUMER_BUILD_TYPE)
  set(consumer_config_args --config "${CONSUMER_BUILD_TYPE}")
  set(build_type_arg "-DCMAKE_BUILD_TYPE=${CONSUMER_BUILD_TYPE}")
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

if(MODE STREQUAL "package")
  file(REMOVE_RECURSE "${INSTALL_PREFIX}")
  message(STATUS "consumer: installing ${MAIN_BUILD_DIR} into ${INSTALL_PREFIX}")
  execute_process(
    COMMAND "${CMAKE_COMMAND}" --install "${MAIN_BUILD_DIR}" --prefix "${INSTALL_PREFIX}" ${config_args}
    COMMAND_ERROR_IS_FATAL ANY)
  list(APPEND mode_args
    "-DCMAKE_PREFIX_PATH=${INSTALL_PREFIX}"
    "-DDIFFUSE_EXPECTED_PREFIX=${INSTALL_PREFIX}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
endif()

set(make_program_arg "")
if(MAKE_PROGRAM)
  set(make_program_arg "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()

# The package is this build's (CUDA as it was built); as a subproject diffuse decides alone.
set(cuda_arg "")
if(MODE STREQUAL "package")
  set(cuda_arg -DDIFFUSE_CUDA=OFF)
endif()
message(STATUS "consumer: configuring (${MODE})")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${WORK_DIR}/build"
          -G "${GENERATOR}" ${make_program_arg}
          "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" ${build_type_arg}
          "-DDIFFUSE_MODE=${MODE}" ${cuda_arg} ${mode_args}
  OUTPUT_VARIABLE configure_out
  COMMAND_ERROR_IS_FATAL ANY)
message("${configure_out}")
if(MODE STREQUAL "subdirectory")
  # A C++-only consumer that says nothing about CUDA: diffuse follows it (no CUDA probed, even
  # with nvcc on the machine).
  if(NOT configure_out MATCHES "diffuse: CUDA off, as in the parent project")
    message(FATAL_ERROR "consumer: add_subdirectory(diffuse) did not follow the C++-only parent's CUDA choice")
  endif()
  file(STRINGS "${WORK_DIR}/build/CMakeCache.txt" cuda_cache REGEX "^CMAKE_CUDA_(COMPILER|ARCHITECTURES)")
  if(cuda_cache)
    message(FATAL_ERROR "consumer: CUDA settings in a C++-only consumer's cache: ${cuda_cache}")
  endif()
endif()

message(STATUS "consumer: building")
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${WORK_DIR}/build" ${consumer_config_args}
  COMMAND_ERROR_IS_FATAL ANY)

set(exe "${WORK_DIR}/build/bin/diffuse_consumer")
if(NOT EXISTS "${exe}" AND EXISTS "${exe}.exe")
  set(exe "${exe}.exe")
endif()
message(STATUS "consumer: running ${exe}")
execute_process(COMMAND "${exe}" cpu COMMAND_ERROR_IS_FATAL ANY)
# Without diffuse::cuda the program has no CUDA backend: asking for it fails in one line.
execute_process(COMMAND "${exe}" cuda RESULT_VARIABLE rc ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "no CUDA backend")
  message(FATAL_ERROR "consumer: '${exe} cuda' should fail saying there is no CUDA backend; got ${rc}: ${err}")
endif()
# The installed package header-only (diffuse::headers): the same program, all compiled here.
if(MODE STREQUAL "package")
  set(exe_headers "${WORK_DIR}/build/bin/diffuse_consumer_headers")
  if(NOT EXISTS "${exe_headers}" AND EXISTS "${exe_headers}.exe")
    set(exe_headers "${exe_headers}.exe")
  endif()
  execute_process(COMMAND "${exe_headers}" cpu COMMAND_ERROR_IS_FATAL ANY)
endif()
# Linked with diffuse::cuda (an installed CUDA build): trains on the CPU, and on the GPU where there is one.
set(exe_cuda "${WORK_DIR}/build/bin/diffuse_consumer_cuda")
if(EXISTS "${exe_cuda}")
  execute_process(COMMAND "${exe_cuda}" cpu COMMAND_ERROR_IS_FATAL ANY)
  execute_process(COMMAND "${exe_cuda}" cuda RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0 AND NOT err MATCHES "CUDA device")
    message(FATAL_ERROR "consumer: '${exe_cuda} cuda' failed without naming the device problem: ${rc}: ${err}")
  endif()
  message(STATUS "consumer: with diffuse::cuda, cuda: ${out}${err}")
endif()
message(STATUS "consumer: ${MODE} OK")
