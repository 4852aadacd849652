# Finds cuDNN (FindCUDAToolkit has no cuDNN target) and defines the imported target
# diffuse::cudnn. Included by cmake/DiffuseCuda.cmake (after find_package(CUDAToolkit)) and by the
# installed diffuseConfig.cmake, next to which it is installed.
#
# Looks for cudnn.h and libcudnn in, first, CUDNN_ROOT (CMake or environment variable: the cuDNN
# prefix), then DIFFUSE_CUDNN_HINT_DIRS (set by the package config: where diffuse found it), the
# CUDA toolkit (CUDAToolkit_INCLUDE_DIRS, CUDAToolkit_LIBRARY_DIR, /usr/local/cuda), then the
# system paths (Debian's libcudnn*-dev: /usr/include, /usr/lib/<arch>). To choose the files
# yourself set the cache variables DIFFUSE_CUDNN_INCLUDE_DIR and DIFFUSE_CUDNN_LIBRARY.
#
# Result:
#   DIFFUSE_CUDNN_FOUND    TRUE / FALSE
#   DIFFUSE_CUDNN_VERSION  e.g. 9.19.0 (from cudnn_version.h), when found
#   diffuse::cudnn         imported target (library + include directory), when found;
#                          GLOBAL if DIFFUSE_CUDNN_GLOBAL is set
include_guard(DIRECTORY)

set(_diffuse_cudnn_hints)
foreach(_root IN ITEMS "${CUDNN_ROOT}" "$ENV{CUDNN_ROOT}")
  if(_root)
    list(APPEND _diffuse_cudnn_hints "${_root}")
  endif()
endforeach()
list(APPEND _diffuse_cudnn_hints ${DIFFUSE_CUDNN_HINT_DIRS})

find_path(DIFFUSE_CUDNN_INCLUDE_DIR cudnn.h
  HINTS ${_diffuse_cudnn_hints} ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda
  PATH_SUFFIXES include
  DOC "Directory containing cudnn.h")
find_library(DIFFUSE_CUDNN_LIBRARY NAMES cudnn
  HINTS ${_diffuse_cudnn_hints} ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib /usr/local/cuda/lib64
  PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu lib/aarch64-linux-gnu
  DOC "The cuDNN library (libcudnn.so)")
mark_as_advanced(DIFFUSE_CUDNN_INCLUDE_DIR DIFFUSE_CUDNN_LIBRARY)

set(DIFFUSE_CUDNN_FOUND FALSE)
set(DIFFUSE_CUDNN_VERSION "")
if(DIFFUSE_CUDNN_INCLUDE_DIR AND DIFFUSE_CUDNN_LIBRARY)
  set(DIFFUSE_CUDNN_FOUND TRUE)
  # cuDNN >= 8 keeps its version in cudnn_version.h, older ones in cudnn.h.
  foreach(_header cudnn_version.h cudnn.h)
    if(NOT DIFFUSE_CUDNN_VERSION AND EXISTS "${DIFFUSE_CUDNN_INCLUDE_DIR}/${_header}")
      file(STRINGS "${DIFFUSE_CUDNN_INCLUDE_DIR}/${_header}" _diffuse_cudnn_lines
           REGEX "^#define CUDNN_(MAJOR|MINOR|PATCHLEVEL) +[0-9]+")
      set(_diffuse_cudnn_parts)
      foreach(_part MAJOR MINOR PATCHLEVEL)
        foreach(_line IN LISTS _diffuse_cudnn_lines)
          if(_line MATCHES "^#define CUDNN_${_part} +([0-9]+)")
            list(APPEND _diffuse_cudnn_parts "${CMAKE_MATCH_1}")
          endif()
        endforeach()
      endforeach()
      list(LENGTH _diffuse_cudnn_parts _diffuse_cudnn_n)
      if(_diffuse_cudnn_n EQUAL 3)
        list(JOIN _diffuse_cudnn_parts "." DIFFUSE_CUDNN_VERSION)
      endif()
    endif()
  endforeach()
  if(NOT DIFFUSE_CUDNN_VERSION)
    set(DIFFUSE_CUDNN_VERSION "unknown")
  endif()

  if(NOT TARGET diffuse::cudnn)
    if(DIFFUSE_CUDNN_GLOBAL)
      add_library(diffuse::cudnn UNKNOWN IMPORTED GLOBAL)
    else()
      add_library(diffuse::cudnn UNKNOWN IMPORTED)
    endif()
    set_target_properties(diffuse::cudnn PROPERTIES
      IMPORTED_LOCATION "${DIFFUSE_CUDNN_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${DIFFUSE_CUDNN_INCLUDE_DIR}")
  endif()
endif()
unset(_diffuse_cudnn_hints)
