# CUDA detection for diffuse (included from the top-level CMakeLists.txt at
# file scope, because enable_language() must not be called inside a function).
#
#   DIFFUSE_CUDA=AUTO  (default) enable CUDA when a working nvcc is found
#   DIFFUSE_CUDA=ON    require CUDA (configure fails without nvcc)
#   DIFFUSE_CUDA=OFF   CPU only, no CUDA probing at all
#
# nvcc lookup: CMAKE_CUDA_COMPILER or $CUDACXX if given; else nvcc on PATH; else
# /usr/local/cuda/bin/nvcc (the default toolkit location, often not on PATH).
#
# CMAKE_CUDA_ARCHITECTURES, unless given (or $CUDAARCHS is set): "native" when
# `nvidia-smi -L` lists a GPU, otherwise "80;90" (A100 + H100).
#
# Result: cache variable DIFFUSE_HAVE_CUDA (ON/OFF); when ON, CUDA is an enabled
# language and CUDAToolkit (CUDA::cudart, CUDA::cublas, ...) has been found, and
# cmake/DiffuseFindCudnn.cmake has looked for cuDNN (DIFFUSE_CUDNN_FOUND, target
# diffuse::cudnn; hint: -DCUDNN_ROOT=<prefix>). One STATUS line says which of
# cuBLAS and cuDNN were found; diffuse::cuda links those that were.

# As a subproject (add_subdirectory), diffuse follows the parent's choice: CUDA only when the
# parent has enabled the CUDA language (then AUTO), unless DIFFUSE_CUDA is set. A plain C++
# project thus never gets nvcc probed, CUDA enabled or CUDA architectures in its cache.
set(_diffuse_cuda_default AUTO)
if(NOT PROJECT_IS_TOP_LEVEL AND NOT DEFINED CACHE{DIFFUSE_CUDA})
  get_property(_diffuse_parent_langs GLOBAL PROPERTY ENABLED_LANGUAGES)
  if(NOT "CUDA" IN_LIST _diffuse_parent_langs)
    set(_diffuse_cuda_default OFF)
    message(STATUS "diffuse: CUDA off, as in the parent project (enable_language(CUDA) there, or "
                   "-DDIFFUSE_CUDA=ON, for diffuse::cuda)")
  endif()
endif()
set(DIFFUSE_CUDA ${_diffuse_cuda_default} CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set_property(CACHE DIFFUSE_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${DIFFUSE_CUDA}" _diffuse_cuda_mode)
if(_diffuse_cuda_mode MATCHES "^(1|TRUE|YES|Y)$")
  set(_diffuse_cuda_mode ON)
elseif(_diffuse_cuda_mode MATCHES "^(0|FALSE|NO|N)$")
  set(_diffuse_cuda_mode OFF)
endif()
if(NOT _diffuse_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "diffuse: DIFFUSE_CUDA must be AUTO, ON or OFF (got '${DIFFUSE_CUDA}')")
endif()

set(_diffuse_have_cuda OFF)
if(NOT _diffuse_cuda_mode STREQUAL "OFF")
  # Point CMake at the default toolkit location when nvcc is not on PATH.
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    # Search $PATH only: CMake's own search would also accept e.g. a
    # /usr/local/bin/nvcc wrapper script, from which it cannot identify the toolkit.
    find_program(_diffuse_nvcc_on_path nvcc NO_CACHE NO_PACKAGE_ROOT_PATH NO_CMAKE_PATH
                 NO_CMAKE_ENVIRONMENT_PATH NO_CMAKE_SYSTEM_PATH NO_CMAKE_INSTALL_PREFIX)
    if(NOT _diffuse_nvcc_on_path AND EXISTS /usr/local/cuda/bin/nvcc)
      set(ENV{CUDACXX} /usr/local/cuda/bin/nvcc)
    endif()
  endif()

  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(_diffuse_cuda_archs "80;90")
    execute_process(COMMAND nvidia-smi -L
                    RESULT_VARIABLE _diffuse_smi_rc OUTPUT_VARIABLE _diffuse_smi_out
                    ERROR_QUIET TIMEOUT 30)
    if(_diffuse_smi_rc EQUAL 0 AND _diffuse_smi_out MATCHES "GPU [0-9]+:")
      set(_diffuse_cuda_archs native)
    endif()
    set(CMAKE_CUDA_ARCHITECTURES "${_diffuse_cuda_archs}" CACHE STRING "CUDA architectures to build for")
  endif()

  if(_diffuse_cuda_mode STREQUAL "AUTO")
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(_diffuse_have_cuda ON)
    endif()
  else()
    set(_diffuse_have_cuda ON)   # ON: enable_language fails loudly without nvcc
  endif()
endif()

if(_diffuse_have_cuda)
  enable_language(CUDA)
  # CMake 3.25's FindCUDAToolkit marks CUDA::nvToolsExt deprecated whenever the project requires
  # CMake >= 3.25, and stops with "set_property could not find TARGET CUDA::nvToolsExt" when the
  # toolkit has no such library (CUDA 13). Nothing here uses it: look with a lower minimum.
  set(_diffuse_cmake_min "${CMAKE_MINIMUM_REQUIRED_VERSION}")
  set(CMAKE_MINIMUM_REQUIRED_VERSION 3.24)
  find_package(CUDAToolkit REQUIRED)
  set(CMAKE_MINIMUM_REQUIRED_VERSION "${_diffuse_cmake_min}")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  # diffuse::cuda links the shared CUDA::cudart; do not add a static cudart too.
  if(NOT DEFINED CMAKE_CUDA_RUNTIME_LIBRARY)
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  endif()
  # CMake < 3.26 does not know nvcc's C++20 flag; nvcc >= 12 accepts -std=c++20.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION
     AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
     AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  message(STATUS "diffuse: CUDA enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES})")

  # cuBLAS comes with the toolkit; cuDNN is a separate install that CMake has no module for.
  set(DIFFUSE_CUDNN_GLOBAL ON)   # visible to add_subdirectory() consumers in parent directories
  include(${CMAKE_CURRENT_LIST_DIR}/DiffuseFindCudnn.cmake)
  set(DIFFUSE_NCCL_GLOBAL ON)
  include(${CMAKE_CURRENT_LIST_DIR}/DiffuseFindNccl.cmake)
  if(TARGET CUDA::cublas)
    get_target_property(_diffuse_cublas_loc CUDA::cublas IMPORTED_LOCATION)
    set(_diffuse_cublas_msg "cuBLAS ${_diffuse_cublas_loc}")
  else()
    set(_diffuse_cublas_msg "cuBLAS NOT found in the CUDA toolkit")
  endif()
  if(DIFFUSE_CUDNN_FOUND)
    set(_diffuse_cudnn_msg "cuDNN ${DIFFUSE_CUDNN_VERSION} ${DIFFUSE_CUDNN_LIBRARY} (${DIFFUSE_CUDNN_INCLUDE_DIR}/cudnn.h)")
  else()
    set(_diffuse_cudnn_msg "cuDNN NOT found (set CUDNN_ROOT to its prefix)")
  endif()
  if(DIFFUSE_NCCL_FOUND)
    set(_diffuse_nccl_msg "NCCL ${DIFFUSE_NCCL_VERSION} ${DIFFUSE_NCCL_LIBRARY}")
  else()
    set(_diffuse_nccl_msg "NCCL NOT found (set NCCL_ROOT; without it data-parallel CUDA training goes through host memory)")
  endif()
  message(STATUS "diffuse: CUDA libraries: ${_diffuse_cublas_msg}; ${_diffuse_cudnn_msg}; ${_diffuse_nccl_msg}")
elseif(_diffuse_cuda_mode STREQUAL "OFF")
  message(STATUS "diffuse: CUDA disabled (DIFFUSE_CUDA=OFF) - building CPU-only")
else()
  message(STATUS "diffuse: nvcc not found - building CPU-only")
endif()
set(DIFFUSE_HAVE_CUDA ${_diffuse_have_cuda} CACHE INTERNAL "diffuse is built with CUDA")
