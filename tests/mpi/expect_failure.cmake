# Runs a command that must fail cleanly: exit non-zero, within LIMIT seconds,
# with EXPECT (a plain substring) in its output. ctest's PASS_REGULAR_EXPRESSION
# alone would ignore the exit code, hence this script.
#
#   cmake -DCOMMAND=<program|arg|...> -DEXPECT=<text> -DLIMIT=<seconds> -P expect_failure.cmake
#
# COMMAND separates its words with | so that it passes through add_test intact.
foreach(var COMMAND EXPECT LIMIT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "expect_failure.cmake: ${var} is not set")
  endif()
endforeach()
string(REPLACE "|" ";" command "${COMMAND}")

string(TIMESTAMP start "%s" UTC)
execute_process(COMMAND ${command} RESULT_VARIABLE result OUTPUT_VARIABLE out
                ERROR_VARIABLE err TIMEOUT ${LIMIT})
string(TIMESTAMP stop "%s" UTC)
math(EXPR took "${stop} - ${start}")
set(output "${out}${err}")
message("exit: ${result}; took about ${took} s\n--- output ---\n${output}--- end of output ---")

if(result MATCHES "timeout")
  message(FATAL_ERROR "the command still ran after ${LIMIT} s: a failing rank must end the job, "
                      "not hang it")
endif()
if(result STREQUAL "0")
  message(FATAL_ERROR "the command exited 0, but a rank failed: the job must exit non-zero")
endif()
string(FIND "${output}" "${EXPECT}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "the output lacks the expected message: ${EXPECT}")
endif()
message("ok: non-zero exit (${result}) within ${LIMIT} s, with the expected message")
