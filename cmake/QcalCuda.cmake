# CUDA backend switch. AUTO turns the backend on when nvcc is found (PATH or /usr/local/cuda).
# The CUDA runtime is linked statically-free through CUDA::cudart; the driver library (libcuda)
# is never linked, so binaries run on machines without a GPU and report "no device" at run time.
set(QCAL_HAVE_CUDA OFF)
if(NOT QCAL_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(QCAL_NVCC nvcc PATHS /usr/local/cuda/bin NO_CACHE)
    if(QCAL_NVCC)
      set(CMAKE_CUDA_COMPILER ${QCAL_NVCC})
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # sm_90 machine code only (H100, H200): with "90" CMake also embeds compute_90 PTX, which
    # doubles every binary's fat binary and is never used on sm_90; the GPU bundle's size budget
    # (tools/gpu/pack.sh) counts it.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90-real)
    endif()
    # CMake 3.25 does not know the C++20 flags for nvcc 13; device code is C++17.
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(QCAL_HAVE_CUDA ON)
  elseif(QCAL_CUDA STREQUAL "ON")
    message(FATAL_ERROR "QCAL_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()
message(STATUS "qcal: CUDA backend ${QCAL_HAVE_CUDA}")
