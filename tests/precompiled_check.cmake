# ctest precompiled_not_instantiated: the symbols of tests/precompiled_probe.cpp's object file.
# The float code that diffuse::precompiled holds must be used there (undefined: a call into the
# library) and not compiled there (defined: an instantiation or JSON code in the user's file).
#   cmake -DNM=<nm> -DOBJECTS=<object files> -P precompiled_check.cmake
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" -C --defined-only "${obj}" OUTPUT_VARIABLE defined COMMAND_ERROR_IS_FATAL ANY)
  execute_process(COMMAND "${NM}" -C --undefined-only "${obj}" OUTPUT_VARIABLE undefined COMMAND_ERROR_IS_FATAL ANY)
  set(used
    "diffuse::TrainerCore<float>::run\\(\\)"
    "diffuse::Tape<float>::backward\\("
    "diffuse::detail::linear_act_impl<float>\\("
    "diffuse::conv2d<float>\\("
    "diffuse::group_norm<float>\\("
    "diffuse::ddpm_sample<float>\\("
    "diffuse::save_checkpoint<float>\\("
    "diffuse::timestep_embedding<float>\\(")
  foreach(sym IN LISTS used)
    if(NOT undefined MATCHES "${sym}")
      message(FATAL_ERROR "${obj}: ${sym} is not called from the library (not used, or compiled here)")
    endif()
    if(defined MATCHES "${sym}")
      message(FATAL_ERROR "${obj}: ${sym} is compiled in this file although diffuse::precompiled has it "
                          "(a missing DIFFUSE_FLOAT_INSTANCE, or `inline` on the template)")
    endif()
  endforeach()
  foreach(sym "nlohmann::" "diffuse::safetensors::File::parse" "diffuse::CsvLog::CsvLog" "diffuse::Adam<float>::step_cpu" "diffuse::detail::binary<float>\\(")
    if(defined MATCHES "${sym}")
      message(FATAL_ERROR "${obj}: ${sym} code is compiled in this file although diffuse::precompiled has it")
    endif()
  endforeach()
endforeach()
message(STATUS "precompiled: the probe calls the library's float code and compiles none of it")
