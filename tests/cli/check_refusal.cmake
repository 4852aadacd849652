# A tool refuses bad input: runs CMD (its arguments separated by "|"), and fails unless the exit
# code is non-zero and the output (stdout and stderr) matches EXPECT, a regular expression.
string(REPLACE "|" ";" cmd "${CMD}")
execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "exited with 0; expected a refusal")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "exit code ${rc}, but the output does not match '${EXPECT}'")
endif()
