# The API reference (Doxygen, HTML only), included from the top-level CMakeLists.txt.
#
#   DIFFUSE_BUILD_DOCS  ON by default for the top-level project; without doxygen (>= 1.9) or a
#                       python3 for the comment filter, one STATUS line says the docs are skipped.
#
# Target diffuse_docs (not part of ALL): docs/Doxyfile.in configured into <build>/docs/Doxyfile,
# HTML written to <build>/docs/html/index.html (never into the source tree). With the tests,
# ctest test `docs` (label docs) runs the same doxygen and fails on any warning.

option(DIFFUSE_BUILD_DOCS "Build the API reference with Doxygen (target diffuse_docs, ctest label docs)"
       ${PROJECT_IS_TOP_LEVEL})
if(NOT DIFFUSE_BUILD_DOCS)
  return()
endif()

# FAIL_ON_WARNINGS (WARN_AS_ERROR) needs doxygen 1.9.
find_package(Doxygen 1.9 QUIET)
# The filter needs only the standard library; the system python first (a pyenv shim on PATH
# costs a startup per header).
find_program(DIFFUSE_DOCS_PYTHON NAMES python3 HINTS /usr/bin DOC "python3 for docs/doxygen_filter.py")
if(NOT DOXYGEN_FOUND OR NOT DIFFUSE_DOCS_PYTHON)
  message(STATUS "diffuse: doxygen >= 1.9 or python3 not found - API reference (diffuse_docs) skipped "
                 "(Debian: apt install doxygen)")
  return()
endif()
message(STATUS "diffuse: API reference: doxygen ${DOXYGEN_VERSION} (target diffuse_docs, ctest label docs)")

set(DIFFUSE_DOCS_OUTPUT_DIR "${PROJECT_BINARY_DIR}/docs")
# The headers' `//` comments become documentation through this filter (quoted for the shell
# doxygen runs it with).
set(DIFFUSE_DOCS_FILTER "\\\"${DIFFUSE_DOCS_PYTHON}\\\" \\\"${PROJECT_SOURCE_DIR}/docs/doxygen_filter.py\\\"")
configure_file("${PROJECT_SOURCE_DIR}/docs/Doxyfile.in" "${DIFFUSE_DOCS_OUTPUT_DIR}/Doxyfile" @ONLY)

add_custom_target(diffuse_docs
  COMMAND "${CMAKE_COMMAND}" -E rm -rf "${DIFFUSE_DOCS_OUTPUT_DIR}/html"
  COMMAND "${DOXYGEN_EXECUTABLE}" "${DIFFUSE_DOCS_OUTPUT_DIR}/Doxyfile"
  WORKING_DIRECTORY "${DIFFUSE_DOCS_OUTPUT_DIR}"
  COMMENT "diffuse: API reference -> ${DIFFUSE_DOCS_OUTPUT_DIR}/html/index.html"
  VERBATIM)

if(DIFFUSE_BUILD_TESTS)
  # WARN_AS_ERROR = FAIL_ON_WARNINGS makes doxygen exit non-zero after any warning; the regular
  # expression also catches a failing filter (its traceback on doxygen's stderr).
  add_test(NAME docs COMMAND "${DOXYGEN_EXECUTABLE}" "${DIFFUSE_DOCS_OUTPUT_DIR}/Doxyfile"
           WORKING_DIRECTORY "${DIFFUSE_DOCS_OUTPUT_DIR}")
  set_tests_properties(docs PROPERTIES LABELS docs TIMEOUT 300
                       FAIL_REGULAR_EXPRESSION "warning:|error:|Traceback|not found")
endif()
