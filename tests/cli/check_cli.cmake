# A tool's exit code and output: runs CMD (its arguments separated by "|") and fails unless the
# output (stdout and stderr) matches EXPECT, a regular expression, and the exit code is 0 when
# EXIT is 0, or non-zero when EXIT is "refusal" (the default). ctest's PASS_REGULAR_EXPRESSION
# alone ignores the exit code: a tool that printed the right error and exited 0 would pass.
if(NOT DEFINED EXIT)
  set(EXIT refusal)
endif()
string(REPLACE "|" ";" cmd "${CMD}")
execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(EXIT STREQUAL "refusal")
  if(rc EQUAL 0)
    message(FATAL_ERROR "exited with 0; expected a refusal")
  endif()
  if(NOT rc MATCHES "^[0-9]+$")  # "Child aborted", a signal: a crash is not a refusal
    message(FATAL_ERROR "did not exit normally (${rc}); expected a refusal")
  endif()
elseif(NOT rc STREQUAL "0")
  message(FATAL_ERROR "exit code ${rc}; expected 0")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "exit code ${rc}, but the output does not match '${EXPECT}'")
endif()
