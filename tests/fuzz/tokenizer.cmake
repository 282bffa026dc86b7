# Tokenizer fuzz target; include()d from tests/fuzz/CMakeLists.txt after ds_fuzz_target():
#   include(${CMAKE_CURRENT_SOURCE_DIR}/tokenizer.cmake)
#   ./fuzz_tokenizer tests/fuzz/corpus/fuzz_tokenizer -max_total_time=60
# The tokenizer sources are compiled into the target so that they carry the fuzzer's instrumentation.
# The BPE merge tables, the UTF-8 helpers, the decoder and the string map run several comparisons per
# byte on loop bounds and hash slots; with libFuzzer's comparison tracing (trace-cmp) they took 40% of
# an execution. They keep their edge coverage, ASan and UBSan (fuzz_tok_hot) and lose only the
# comparison tracing; the parsers (tokenizer.json, pre-tokenizer, added-token split, SentencePiece,
# GGUF) keep all of it. Measured: 3.5k → 6.2k executions per CPU-second.
add_library(fuzz_tok_hot OBJECT
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer.c ${CMAKE_SOURCE_DIR}/src/tokenizer/bpe.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_utf8.c ${CMAKE_SOURCE_DIR}/src/util/strmap.c)
target_include_directories(fuzz_tok_hot PRIVATE ${CMAKE_SOURCE_DIR}/include ${CMAKE_SOURCE_DIR}/src)
target_compile_options(fuzz_tok_hot PRIVATE -fsanitize=fuzzer-no-link,address,undefined
  -fno-sanitize-coverage=trace-cmp -fno-omit-frame-pointer)
target_link_libraries(fuzz_tok_hot PRIVATE PkgConfig::CJSON PkgConfig::PCRE2 PkgConfig::UTF8PROC)
set(DS_FUZZ_UTIL_NOMAP ${DS_FUZZ_UTIL})
list(FILTER DS_FUZZ_UTIL_NOMAP EXCLUDE REGEX "/strmap\\.c$")
ds_fuzz_target(fuzz_tokenizer $<TARGET_OBJECTS:fuzz_tok_hot>
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer_json.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_encode.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/pretokenize.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_unicode.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/spm.c ${CMAKE_SOURCE_DIR}/src/tokenizer/metaspace.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/unigram.c ${CMAKE_SOURCE_DIR}/src/format/gguf.c ${CMAKE_SOURCE_DIR}/src/quant/quant.c
  ${DS_FUZZ_UTIL_NOMAP})
target_link_libraries(fuzz_tokenizer PRIVATE PkgConfig::PCRE2 PkgConfig::UTF8PROC)
target_compile_definitions(fuzz_tokenizer PRIVATE DS_TEST_DATA="${CMAKE_SOURCE_DIR}/tests/data")

# Fine-tuning datasets (JSONL → examples), tokenised with the committed Qwen2 tokenizer and template.
# The tokenizer itself is fuzz_tokenizer's subject: here it is built with ASan+UBSan but without the
# fuzzer's coverage instrumentation (fuzz_tok_nocov), so that libFuzzer's per-comparison callbacks in
# the BPE loops (half the time of an input) go to the dataset parser and example builder instead.
add_library(fuzz_tok_nocov OBJECT
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tokenizer_json.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_encode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/bpe.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/pretokenize.c ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_utf8.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/tok_unicode.c ${CMAKE_SOURCE_DIR}/src/tokenizer/spm.c
  ${CMAKE_SOURCE_DIR}/src/tokenizer/metaspace.c ${CMAKE_SOURCE_DIR}/src/tokenizer/unigram.c)
target_include_directories(fuzz_tok_nocov PRIVATE ${CMAKE_SOURCE_DIR}/include ${CMAKE_SOURCE_DIR}/src)
target_compile_options(fuzz_tok_nocov PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer)
target_link_libraries(fuzz_tok_nocov PRIVATE PkgConfig::CJSON PkgConfig::PCRE2 PkgConfig::UTF8PROC)
ds_fuzz_target(fuzz_dataset ${CMAKE_SOURCE_DIR}/src/train/dataset.c ${CMAKE_SOURCE_DIR}/src/tokenizer/chat_template.c
  $<TARGET_OBJECTS:fuzz_tok_nocov> ${DS_FUZZ_UTIL})
target_link_libraries(fuzz_dataset PRIVATE PkgConfig::PCRE2 PkgConfig::UTF8PROC)
target_compile_definitions(fuzz_dataset PRIVATE DS_TEST_DATA="${CMAKE_SOURCE_DIR}/tests/data")
