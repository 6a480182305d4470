# Small helpers so that every library and test is declared the same way.

set(QCAL_WARNING_FLAGS -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare)
if(QCAL_WERROR)
  list(APPEND QCAL_WARNING_FLAGS -Werror)
endif()

set(QCAL_SANITIZER_FLAGS "")
if(QCAL_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "QCAL_FUZZ=ON needs clang (libFuzzer): -DCMAKE_CXX_COMPILER=clang++")
  endif()
  set(QCAL_SANITIZE_ADDRESS ON)
  set(QCAL_SANITIZE_UNDEFINED ON)
  # Coverage instrumentation for libFuzzer in every library; the harnesses link the fuzzer's
  # main (tests/fuzz), the unit tests link none (the sanitizer runtime has the no-op callbacks).
  # -O1 (after the build type's -O3, so it wins): half the compile time under the sanitizers.
  list(APPEND QCAL_SANITIZER_FLAGS -fsanitize=fuzzer-no-link -O1 -gline-tables-only)
endif()
if(QCAL_SANITIZE_ADDRESS)
  list(APPEND QCAL_SANITIZER_FLAGS -fsanitize=address -fno-omit-frame-pointer)
endif()
if(QCAL_SANITIZE_UNDEFINED)
  list(APPEND QCAL_SANITIZER_FLAGS -fsanitize=undefined -fno-sanitize-recover=all)
endif()
if(QCAL_SANITIZE_THREAD)
  list(APPEND QCAL_SANITIZER_FLAGS -fsanitize=thread)
endif()

# Applies the project's compile options to a C++ target.
function(qcal_target_defaults target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${QCAL_WARNING_FLAGS}>
    $<$<COMPILE_LANGUAGE:CXX>:${QCAL_SANITIZER_FLAGS}>)
  target_link_options(${target} PRIVATE ${QCAL_SANITIZER_FLAGS})
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
endfunction()

# qcal_cc_library(NAME name SRCS ... DEPS ...)
function(qcal_cc_library)
  cmake_parse_arguments(ARG "" "NAME" "SRCS;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${ARG_NAME} STATIC ${ARG_SRCS})
  qcal_target_defaults(${ARG_NAME})
  target_link_libraries(${ARG_NAME} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
endfunction()

# OpenBLAS's idle threads spin on sched_yield for about 2^28 cycles after each call before they
# sleep (OPENBLAS_THREAD_TIMEOUT, read when the library loads). With tests two at a time on two
# cores that spinning takes CPU from the other test; 2^4 cycles cut the CPU time of the pipeline
# tests by 27% and their wall time by 13% (docs/OPERATIONS.md, "CI time"). Tests and the `qcal`
# processes they start inherit it.
set(QCAL_TEST_BLAS_ENV "OPENBLAS_THREAD_TIMEOUT=4")

# qcal_cc_test(NAME name SRCS ... DEPS ... [LABELS ...] [TIMEOUT s] [COST s])
# Every test is a GoogleTest binary registered with ctest under its own name. COST: about how many
# seconds the test takes on CI's two cores. `ctest -j` starts the costliest first when it has no
# timings of its own (a clean clone has none), so that the minute-long tests do not start last
# and run alone at the end (docs/OPERATIONS.md, "CI time").
function(qcal_cc_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT;COST" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  qcal_target_defaults(${ARG_NAME})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} qcal_test_support GTest::gtest GTest::gmock GTest::gtest_main)
  set_target_properties(${ARG_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "QCAL_SOURCE_DIR=${PROJECT_SOURCE_DIR};QCAL_BINARY_DIR=${CMAKE_BINARY_DIR};OPENBLAS_NUM_THREADS=1;${QCAL_TEST_BLAS_ENV}"
    SKIP_RETURN_CODE 77)
  if(ARG_LABELS)
    set_tests_properties(${ARG_NAME} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
  if(ARG_COST)
    set_tests_properties(${ARG_NAME} PROPERTIES COST ${ARG_COST})
  endif()
endfunction()
