# Exact resume through the CLI: STEPS steps straight must give the same
# samples.csv, byte for byte, as STEPS/2 steps, then --resume to STEPS.
set(common --dataset moons --log-every 100000 --samples 500)
math(EXPR half "${STEPS} / 2")
execute_process(COMMAND ${TRAIN_2D} ${common} --steps ${STEPS} --out ${OUT}/straight RESULT_VARIABLE rc1 OUTPUT_VARIABLE o1 ERROR_VARIABLE e1)
execute_process(COMMAND ${TRAIN_2D} ${common} --steps ${half} --out ${OUT}/split RESULT_VARIABLE rc2 OUTPUT_VARIABLE o2 ERROR_VARIABLE e2)
execute_process(COMMAND ${TRAIN_2D} ${common} --steps ${STEPS} --out ${OUT}/split --resume ${OUT}/split/checkpoint.safetensors
                RESULT_VARIABLE rc3 OUTPUT_VARIABLE o3 ERROR_VARIABLE e3)
message("${o1}${e1}${o2}${e2}${o3}${e3}")
if(NOT rc1 EQUAL 0 OR NOT rc2 EQUAL 0 OR NOT rc3 EQUAL 0)
  message(FATAL_ERROR "train_2d exited with ${rc1} / ${rc2} / ${rc3}")
endif()
if(NOT o3 MATCHES "resumed from .* at step ${half}")
  message(FATAL_ERROR "the third run did not resume at step ${half}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${OUT}/straight/samples.csv ${OUT}/split/samples.csv RESULT_VARIABLE diff)
if(NOT diff EQUAL 0)
  message(FATAL_ERROR "samples after resume differ from the straight run")
endif()
