# train_2d with the flags no other test gives (issue 22: every flag exercised once with a valid
# value), each checked for its effect: --image (a shape from a PNG), --layers/--hidden, --warmup
# with --lr-decay cosine (the logged lr rises, then falls to near 0 at the last step), --prediction
# v with --min-snr (recorded in the checkpoint), --variance small, --save-every/--keep (exactly
# one checkpoint-<step> kept beside checkpoint.safetensors), --eval-every (energy columns in
# train_log.csv at those steps), --plot-every (progress PNGs); then --resume with --sampler
# dpm++2m --sample-steps and --seed. TRAIN_2D, IMAGE (a PNG with dark strokes), OUT.
file(REMOVE_RECURSE ${OUT})
set(common --image ${IMAGE} --T 50 --batch 64 --layers 2 --hidden 32 --prediction v --min-snr 5 --samples 200
           --log-every 10 --seed 4)
execute_process(COMMAND ${TRAIN_2D} ${common} --steps 40 --warmup 10 --lr 0.01 --lr-decay cosine --variance small
                        --save-every 10 --keep 2 --eval-every 20 --plot-every 20 --out ${OUT}/run
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
message("${o}${e}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "train_2d exited with ${rc}")
endif()
# --save-every 10 --keep 2: checkpoint.safetensors (step 40) and the one before it (step 30).
file(GLOB kept ${OUT}/run/checkpoint-*.safetensors)
if(NOT kept MATCHES "checkpoint-00000030\\.safetensors$")
  message(FATAL_ERROR "--keep 2: expected checkpoint-00000030 kept, found '${kept}'")
endif()
list(LENGTH kept nkept)
if(NOT nkept EQUAL 1)
  message(FATAL_ERROR "--keep 2: ${nkept} older checkpoints kept, expected 1")
endif()
# The objective in the checkpoint's metadata (the safetensors header is JSON at the start).
file(READ ${OUT}/run/checkpoint.safetensors head OFFSET 8 LIMIT 16384)  # after the 8-byte length
if(NOT head MATCHES "\"prediction\": *\"v\"" OR NOT head MATCHES "\"min_snr_gamma\": *\"5")
  message(FATAL_ERROR "the checkpoint does not record prediction v and min_snr_gamma 5")
endif()
# --plot-every 20: progress/samples-<step>.png at 20 and 40.
foreach(s 00000020 00000040)
  if(NOT EXISTS ${OUT}/run/progress/samples-${s}.png)
    message(FATAL_ERROR "--plot-every 20: no progress/samples-${s}.png")
  endif()
endforeach()
# train_log.csv: step,loss,lr,grad_norm,images_per_s,elapsed_s,energy_distance,energy_floor.
file(STRINGS ${OUT}/run/train_log.csv rows)
list(GET rows 0 header)
if(NOT header MATCHES "energy_distance,energy_floor")
  message(FATAL_ERROR "--eval-every: no energy columns in train_log.csv ('${header}')")
endif()
set(evaluated "")
foreach(row IN LISTS rows)
  # step,loss,lr,grad_norm,images_per_s,elapsed_s,energy_distance,energy_floor (empty between evaluations)
  if(NOT row MATCHES "^([0-9]+),[^,]*,([^,]*),[^,]*,[^,]*,[^,]*,([^,]*),")
    continue()
  endif()
  set(lr_${CMAKE_MATCH_1} ${CMAKE_MATCH_2})
  if(NOT "${CMAKE_MATCH_3}" STREQUAL "")
    list(APPEND evaluated ${CMAKE_MATCH_1})
  endif()
endforeach()
if(NOT evaluated STREQUAL "20;40")
  message(FATAL_ERROR "--eval-every 20: energy logged at steps '${evaluated}', expected 20;40")
endif()
# --warmup 10 --lr 0.01 --lr-decay cosine: 0.01 at step 10, then falling, and under 1% of it at the
# last step (0.01 (1 + cos(pi 29/30)) / 2 = 2.7e-5; the schedule reaches 0 one step after it).
if(NOT lr_10 EQUAL 0.01 OR NOT lr_30 LESS lr_20 OR NOT lr_20 LESS 0.01 OR NOT lr_40 LESS 0.0001)
  message(FATAL_ERROR "--warmup 10 --lr-decay cosine: lr ${lr_10}, ${lr_20}, ${lr_30}, ${lr_40} at steps 10-40")
endif()
# --resume with another sampler and its step count: continues at step 40, samples with dpm++2m.
execute_process(COMMAND ${TRAIN_2D} ${common} --steps 50 --warmup 10 --lr 0.01 --lr-decay cosine --sampler dpm++2m
                        --sample-steps 5 --out ${OUT}/run --resume ${OUT}/run/checkpoint.safetensors
                RESULT_VARIABLE rc OUTPUT_VARIABLE o ERROR_VARIABLE e)
message("${o}${e}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "train_2d --resume exited with ${rc}")
endif()
if(NOT o MATCHES "resumed from .* at step 40" OR NOT o MATCHES "sampled 200 points with dpm\\+\\+2m, 5 steps")
  message(FATAL_ERROR "the resumed run did not start at step 40 or did not sample with dpm++2m")
endif()
if(NOT o MATCHES "samples ([0-9.]+) +floor")
  message(FATAL_ERROR "no energy distance line")
endif()
