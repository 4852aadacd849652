# Finds NCCL (the collectives of data-parallel training on CUDA, distributed/) and defines the
# imported target diffuse::nccl. Included by cmake/DiffuseCuda.cmake (after find_package(CUDAToolkit))
# and by the installed diffuseConfig.cmake, next to which it is installed. Optional: without it
# the CUDA backend says so in one line, and data-parallel training on CUDA averages the gradients
# through host memory.
#
# Looks for nccl.h and libnccl in NCCL_ROOT (CMake or environment variable), then
# DIFFUSE_NCCL_HINT_DIRS (set by the package config: where diffuse found it), the CUDA toolkit
# (CUDA 13 ships NCCL in its lib/), then the system paths (Debian's libnccl-dev). To choose the
# files yourself set DIFFUSE_NCCL_INCLUDE_DIR and DIFFUSE_NCCL_LIBRARY.
#
# Result:
#   DIFFUSE_NCCL_FOUND    TRUE / FALSE
#   DIFFUSE_NCCL_VERSION  e.g. 2.28.9 (from nccl.h), when found
#   diffuse::nccl         imported target, when found; GLOBAL if DIFFUSE_NCCL_GLOBAL is set
include_guard(DIRECTORY)

set(_diffuse_nccl_hints)
foreach(_root IN ITEMS "${NCCL_ROOT}" "$ENV{NCCL_ROOT}")
  if(_root)
    list(APPEND _diffuse_nccl_hints "${_root}")
  endif()
endforeach()
list(APPEND _diffuse_nccl_hints ${DIFFUSE_NCCL_HINT_DIRS})

find_path(DIFFUSE_NCCL_INCLUDE_DIR nccl.h
  HINTS ${_diffuse_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda
  PATH_SUFFIXES include
  DOC "Directory containing nccl.h")
find_library(DIFFUSE_NCCL_LIBRARY NAMES nccl
  HINTS ${_diffuse_nccl_hints} ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib /usr/local/cuda/lib64
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu lib/aarch64-linux-gnu
  DOC "The NCCL library (libnccl.so)")
mark_as_advanced(DIFFUSE_NCCL_INCLUDE_DIR DIFFUSE_NCCL_LIBRARY)

set(DIFFUSE_NCCL_FOUND FALSE)
set(DIFFUSE_NCCL_VERSION "")
if(DIFFUSE_NCCL_INCLUDE_DIR AND DIFFUSE_NCCL_LIBRARY)
  file(STRINGS "${DIFFUSE_NCCL_INCLUDE_DIR}/nccl.h" _diffuse_nccl_lines REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  set(_diffuse_nccl_parts)
  foreach(_part MAJOR MINOR PATCH)
    foreach(_line IN LISTS _diffuse_nccl_lines)
      if(_line MATCHES "^#define NCCL_${_part} +([0-9]+)")
        list(APPEND _diffuse_nccl_parts "${CMAKE_MATCH_1}")
      endif()
    endforeach()
  endforeach()
  list(JOIN _diffuse_nccl_parts "." DIFFUSE_NCCL_VERSION)
  # ncclAvg (the average in one collective) came with NCCL 2.10.
  if(DIFFUSE_NCCL_VERSION VERSION_LESS 2.10)
    message(STATUS "diffuse: NCCL ${DIFFUSE_NCCL_VERSION} at ${DIFFUSE_NCCL_LIBRARY} is older than 2.10: not used")
  else()
    set(DIFFUSE_NCCL_FOUND TRUE)
    if(NOT TARGET diffuse::nccl)
      if(DIFFUSE_NCCL_GLOBAL)
        add_library(diffuse::nccl UNKNOWN IMPORTED GLOBAL)
      else()
        add_library(diffuse::nccl UNKNOWN IMPORTED)
      endif()
      set_target_properties(diffuse::nccl PROPERTIES
        IMPORTED_LOCATION "${DIFFUSE_NCCL_LIBRARY}"
        INTERFACE_INCLUDE_DIRECTORIES "${DIFFUSE_NCCL_INCLUDE_DIR}")
    endif()
  endif()
endif()
unset(_diffuse_nccl_hints)
