# Adapter-config fuzz target; include()d from tests/fuzz/CMakeLists.txt after ds_fuzz_target():
#   include(${CMAKE_CURRENT_SOURCE_DIR}/adapter.cmake)
#   ./fuzz_adapter_config tests/fuzz/corpus/fuzz_adapter_config -max_total_time=60
# peft_config.c is compiled into the target so that it carries the fuzzer's instrumentation.
ds_fuzz_target(fuzz_adapter_config ${CMAKE_SOURCE_DIR}/src/adapter/peft_config.c ${DS_FUZZ_UTIL})
target_link_libraries(fuzz_adapter_config PRIVATE PkgConfig::PCRE2)

# AdapterHub adapter configs: bottleneck, prefix tuning, unions (ds_bottleneck_config_check) against tiny Llama / Qwen2 shapes.
ds_fuzz_target(fuzz_bottleneck_config ${CMAKE_SOURCE_DIR}/src/adapter/bottleneck.c
  ${CMAKE_SOURCE_DIR}/src/adapter/ah_prefix.c ${CMAKE_SOURCE_DIR}/src/backend/act.c
  ${CMAKE_SOURCE_DIR}/src/format/safetensors.c ${DS_FUZZ_UTIL})

# deltaserve delta adapters: config + safetensors image against a tiny Llama shape (ds_delta_check_mem).
ds_fuzz_target(fuzz_delta ${CMAKE_SOURCE_DIR}/src/adapter/delta.c ${CMAKE_SOURCE_DIR}/src/format/safetensors.c
  ${DS_FUZZ_UTIL})
