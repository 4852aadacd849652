# mnist_classifier end to end on a tiny dataset: TEST_LENET's hidden "[.cli]"
# case writes OUT/data (IDX, train plain and test gzipped), OUT/samples.npy
# (uint8 [100,1,16,16]: train digits), OUT/labels.npy and OUT/samples28.npy; then
# `train` runs 1 epoch and `score` must print its lines, write the JSON, and
# refuse 28x28 samples for a 16x16 classifier with one clear line.
file(REMOVE_RECURSE ${OUT})
file(MAKE_DIRECTORY ${OUT})
execute_process(COMMAND ${CMAKE_COMMAND} -E env DIFFUSE_CLI_DIR=${OUT} ${TEST_LENET} "[.cli]"
                RESULT_VARIABLE rc0 OUTPUT_VARIABLE o0 ERROR_VARIABLE e0)
if(NOT rc0 EQUAL 0)
  message(FATAL_ERROR "writing the tiny dataset failed (${rc0}):\n${o0}${e0}")
endif()

execute_process(COMMAND ${CLI} train --data ${OUT}/data --size 16 --epochs 1 --batch 16 --out ${OUT}/lenet16.safetensors
                RESULT_VARIABLE rc1 OUTPUT_VARIABLE o1 ERROR_VARIABLE e1)
message("${o1}${e1}")
if(NOT rc1 EQUAL 0)
  message(FATAL_ERROR "mnist_classifier train exited with ${rc1}")
endif()
if(NOT o1 MATCHES "epoch 1/1  loss [0-9.]+  train accuracy [0-9.]+  [0-9]+ images/s")
  message(FATAL_ERROR "no epoch progress line")
endif()
if(NOT o1 MATCHES "test accuracy [0-9.]+ \\(") 
  message(FATAL_ERROR "no test accuracy line")
endif()
if(NOT EXISTS ${OUT}/lenet16.safetensors)
  message(FATAL_ERROR "no classifier file written")
endif()

execute_process(COMMAND ${CLI} score --classifier ${OUT}/lenet16.safetensors --samples ${OUT}/samples.npy
                        --labels ${OUT}/labels.npy --data ${OUT}/data --json ${OUT}/score.json
                RESULT_VARIABLE rc2 OUTPUT_VARIABLE o2 ERROR_VARIABLE e2)
message("${o2}${e2}")
if(NOT rc2 EQUAL 0)
  message(FATAL_ERROR "mnist_classifier score exited with ${rc2}")
endif()
set(num "[0-9]+\\.[0-9]+")
foreach(re "predicted classes:(  [0-9]:[0-9]+)+\n"
           "conditional accuracy: ${num} "
           "per digit:(  [0-9]:${num})+\n"
           "FD-LeNet: ${num}  floor \\(real train vs test, same N\\): ${num}  ratio ${num}\n")
  if(NOT o2 MATCHES "${re}")
    message(FATAL_ERROR "score output does not match '${re}'")
  endif()
endforeach()
file(READ ${OUT}/score.json js)
foreach(key n cond_accuracy per_class predicted_hist fd fd_floor fd_ratio)
  string(JSON v ERROR_VARIABLE err GET "${js}" ${key})
  if(err)
    message(FATAL_ERROR "score.json has no '${key}': ${err}")
  endif()
endforeach()
string(JSON n GET "${js}" n)
if(NOT n EQUAL 100)
  message(FATAL_ERROR "score.json says n = ${n}, expected 100")
endif()
# Chance is 0.1; one epoch on these bars classifies half the samples right (0.50 here, classes
# all or nothing), so a classifier or score that ignores its input stays far below the floor.
set(ACC_FLOOR 0.3)
# The numbers, not only their presence: the predicted histogram counts every sample, a Frechet
# distance is positive here (train digits against test digits), the ratio is on fd / fd_floor's side of 1, and
# the samples are digits the classifier was trained on.
string(JSON nh LENGTH "${js}" predicted_hist)
set(total 0)
math(EXPR last "${nh} - 1")
foreach(i RANGE ${last})
  string(JSON c GET "${js}" predicted_hist ${i})
  math(EXPR total "${total} + ${c}")
endforeach()
if(NOT nh EQUAL 10 OR NOT total EQUAL 100)
  message(FATAL_ERROR "predicted_hist has ${nh} classes summing to ${total}; expected 10 summing to 100")
endif()
string(JSON acc GET "${js}" cond_accuracy)
string(JSON fd GET "${js}" fd)
string(JSON fdf GET "${js}" fd_floor)
string(JSON ratio GET "${js}" fd_ratio)
if(acc LESS ${ACC_FLOOR} OR acc GREATER 1)
  message(FATAL_ERROR "cond_accuracy ${acc}: expected ${ACC_FLOOR} to 1")
endif()
if(NOT fd GREATER 0 OR NOT fdf GREATER 0)
  message(FATAL_ERROR "fd ${fd}, fd_floor ${fdf}: expected both positive")
endif()
# CMake has no float arithmetic: the ratio is checked for its side of 1.
if(NOT ratio GREATER 0 OR (ratio GREATER 1 AND fd LESS fdf) OR (ratio LESS 1 AND fd GREATER fdf))
  message(FATAL_ERROR "fd_ratio ${ratio} does not agree with fd ${fd} / fd_floor ${fdf}")
endif()

# Without labels: no conditional accuracy, still the FD line.
execute_process(COMMAND ${CLI} score --classifier ${OUT}/lenet16.safetensors --samples ${OUT}/samples.npy --data ${OUT}/data
                RESULT_VARIABLE rc3 OUTPUT_VARIABLE o3 ERROR_VARIABLE e3)
if(NOT rc3 EQUAL 0 OR o3 MATCHES "conditional accuracy" OR NOT o3 MATCHES "FD-LeNet: ${num}  floor")
  message(FATAL_ERROR "score without labels (${rc3}):\n${o3}${e3}")
endif()

# Wrong size: one line on stderr naming both sizes, non-zero exit.
execute_process(COMMAND ${CLI} score --classifier ${OUT}/lenet16.safetensors --samples ${OUT}/samples28.npy
                        --labels ${OUT}/labels.npy --data ${OUT}/data
                RESULT_VARIABLE rc4 OUTPUT_VARIABLE o4 ERROR_VARIABLE e4)
message("${e4}")
if(rc4 EQUAL 0)
  message(FATAL_ERROR "score accepted 28x28 samples for a 16x16 classifier")
endif()
if(NOT e4 MATCHES "^mnist_classifier: error: [^\n]*samples28.npy: images are 28x28 but the classifier [^\n]* takes 16x16\n$")
  message(FATAL_ERROR "unexpected error message for wrong-size samples: ${e4}")
endif()

# The other flags, valid (issue 22: every flag exercised once): a narrower network, another
# learning rate, AdamW, no shifts, bilinear resizing and a seed; then the floor drawn with another
# seed, which differs from seed 0's (the real digits drawn for it are others).
execute_process(COMMAND ${CLI} train --data ${OUT}/data --epochs 1 --batch 8 --c1 4 --c2 8 --lr 0.003 --weight-decay 0.01
                        --shift 0 --resize bilinear --seed 7 --device cpu --out ${OUT}/lenet_flags.safetensors
                RESULT_VARIABLE rc5 OUTPUT_VARIABLE o5 ERROR_VARIABLE e5)
message("${o5}${e5}")
if(NOT rc5 EQUAL 0 OR NOT o5 MATCHES "test accuracy [0-9.]+ \\(" OR NOT EXISTS ${OUT}/lenet_flags.safetensors)
  message(FATAL_ERROR "mnist_classifier train with --c1/--c2/--lr/--weight-decay/--shift/--resize/--seed (${rc5})")
endif()
file(READ ${OUT}/lenet_flags.safetensors head OFFSET 8 LIMIT 4096)
if(NOT head MATCHES "\"seed\": *\"7\"" OR NOT head MATCHES "\"resize\": *\"bilinear\"")
  message(FATAL_ERROR "the classifier file does not record --seed 7 and --resize bilinear")
endif()
execute_process(COMMAND ${CLI} score --classifier ${OUT}/lenet16.safetensors --samples ${OUT}/samples.npy --data ${OUT}/data
                        --seed 3 --device cpu
                RESULT_VARIABLE rc6 OUTPUT_VARIABLE o6 ERROR_VARIABLE e6)
if(NOT rc6 EQUAL 0 OR NOT o6 MATCHES "floor \\(real train vs test, same N\\): (${num})" OR NOT o3 MATCHES "floor \\(real")
  message(FATAL_ERROR "score --seed 3 (${rc6}):\n${o6}${e6}")
endif()
set(floor3 ${CMAKE_MATCH_1})
string(REGEX MATCH "same N\\): (${num})" _m "${o3}")
if(floor3 STREQUAL CMAKE_MATCH_1)
  message(FATAL_ERROR "score --seed 3 gave the same floor as seed 0 (${floor3}): the seed is not used")
endif()
