# Tokenizer fuzz target; include()d from tests/fuzz/CMakeLists.txt after ds_fuzz_target():
#   include(${CMAKE_CURRENT_SOURCE_DIR}/tokenizer.cmake)
#   ./fuzz_tokenizer tests/fuzz/corpus/fuzz_tokenizer -max_total_time=60
# The tokenizer sources are compiled into the target so that they carry the fuzzer's instrumentation.
ds_fuzz_target(fuzz_tokenizer
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer_json.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_encode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/bpe.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/pretokenize.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_utf8.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_unicode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/spm.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/metaspace.c ${CMAKE_SOURCE_DIR}/src/tokenizer/unigram.c
  ${CMAKE_SOURCE_DIR}/src/format/gguf.c ${CMAKE_SOURCE_DIR}/src/quant/quant.c ${DS_FUZZ_UTIL})
target_link_libraries(fuzz_tokenizer PRIVATE PkgConfig::PCRE2 PkgConfig::UTF8PROC)
target_compile_definitions(fuzz_tokenizer PRIVATE DS_TEST_DATA="${CMAKE_SOURCE_DIR}/tests/data")

# Fine-tuning datasets (JSONL → examples), tokenised with the committed Qwen2 tokenizer and template.
ds_fuzz_target(fuzz_dataset ${CMAKE_SOURCE_DIR}/src/train/dataset.c ${CMAKE_SOURCE_DIR}/src/tokenizer/chat_template.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer_json.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_encode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/bpe.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/pretokenize.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_utf8.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_unicode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/spm.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/metaspace.c ${CMAKE_SOURCE_DIR}/src/tokenizer/unigram.c ${DS_FUZZ_UTIL})
target_link_libraries(fuzz_dataset PRIVATE PkgConfig::PCRE2 PkgConfig::UTF8PROC)
target_compile_definitions(fuzz_dataset PRIVATE DS_TEST_DATA="${CMAKE_SOURCE_DIR}/tests/data")
