# Finds gcomp's optional dependencies and sets the GCOMP_* options to "on if
# found" unless the user set them. Nothing is downloaded.

# gcomp_option(NAME "doc" FOUND) - defaults NAME to FOUND; asking for a part
# that is not there is an error rather than a silent skip.
function(gcomp_option name doc found)
  if(DEFINED CACHE{${name}})
    if(${name} AND NOT ${found})
      message(FATAL_ERROR "${name}=ON but its dependency was not found")
    endif()
  else()
    set(${name} ${${found}} CACHE BOOL "${doc}")
  endif()
endfunction()

find_package(doctest CONFIG QUIET)
if(NOT doctest_FOUND)
  find_path(GCOMP_DOCTEST_INCLUDE_DIR doctest/doctest.h)
  if(GCOMP_DOCTEST_INCLUDE_DIR)
    add_library(doctest::doctest INTERFACE IMPORTED)
    set_target_properties(doctest::doctest PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${GCOMP_DOCTEST_INCLUDE_DIR})
    set(doctest_FOUND TRUE)
  endif()
endif()
gcomp_option(GCOMP_BUILD_TESTS "Build the tests (needs doctest)" doctest_FOUND)

find_package(benchmark CONFIG QUIET)
gcomp_option(GCOMP_BUILD_BENCH "Build the Google Benchmark benchmarks" benchmark_FOUND)
set(GCOMP_ALWAYS TRUE)
gcomp_option(GCOMP_BUILD_EXAMPLES "Build the examples" GCOMP_ALWAYS)

find_package(OpenMP QUIET)
gcomp_option(GCOMP_WITH_OPENMP "Build the Thrust/OpenMP tests" OpenMP_CXX_FOUND)

find_package(MPI QUIET COMPONENTS CXX)
gcomp_option(GCOMP_WITH_MPI "Build the MPI adapter's tests and examples" MPI_CXX_FOUND)

# CUDA: nvcc from the toolkit (PATH or /usr/local/cuda), never a download.
set(GCOMP_CUDA_FOUND FALSE)
if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    set(GCOMP_CUDA_FOUND TRUE)
  endif()
endif()
gcomp_option(GCOMP_WITH_CUDA "Build the CUDA tests and benchmarks (nvcc; run only where a GPU is)" GCOMP_CUDA_FOUND)
if(GCOMP_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # sm_90 code for Hopper plus compute_90 PTX that newer GPUs JIT-compile.
    set(CMAKE_CUDA_ARCHITECTURES "90-real;90-virtual")
  endif()
  enable_language(CUDA)
endif()

# CCCL (Thrust, CUB, libcu++) headers ship with the CUDA toolkit.
find_path(GCOMP_CCCL_INCLUDE_DIR thrust/version.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include
  PATH_SUFFIXES cccl NO_DEFAULT_PATH)

# NCCL: header and library inside the CUDA toolkit.
find_path(GCOMP_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
find_library(GCOMP_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
set(GCOMP_NCCL_FOUND FALSE)
if(GCOMP_WITH_CUDA AND GCOMP_NCCL_INCLUDE_DIR AND GCOMP_NCCL_LIBRARY)
  set(GCOMP_NCCL_FOUND TRUE)
endif()
gcomp_option(GCOMP_WITH_NCCL "Build the NCCL adapter's tests" GCOMP_NCCL_FOUND)

# zlib (zlib1g-dev): the Fashion-MNIST example reads the data set's gzip'd IDX files.
find_package(ZLIB QUIET)

# LibTorch from Debian's libtorch-dev (oracles for optimizer tests, the trainer).
find_package(Torch CONFIG QUIET)
gcomp_option(GCOMP_WITH_TORCH "Build the LibTorch-based tests and examples" Torch_FOUND)

# gcomp_link_torch(target): links LibTorch (its headers come in as system
# headers, so our -Werror does not apply to them) and defines GCOMP_HAVE_TORCH.
function(gcomp_link_torch target)
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES})
  target_compile_definitions(${target} PRIVATE GCOMP_HAVE_TORCH=1)
endfunction()

# Warnings are errors in the project's own targets.
function(gcomp_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>)
endfunction()

# nvcc options of the project's CUDA targets (tests/cuda, bench/cuda):
# --extended-lambda for the library's [=] GCOMP_HD lambdas, -std=c++20 by hand
# (CMake 3.25 knows no CUDA_STANDARD 20 for nvcc), -Wall -Wextra on the host
# passes (not -Werror: CCCL is not guaranteed warning-free under nvcc), and
# sm_90 code plus compute_90 PTX unless CMAKE_CUDA_ARCHITECTURES says
# otherwise. BITWISE adds --fmad=false: nvcc otherwise contracts a * b + c
# into one FMA where the host rounds twice, and bitwise host/device
# comparisons would fail.
function(gcomp_cuda_options target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "BITWISE" "" "")
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "90-real;90-virtual")
  endif()
  set(fmad)
  if(arg_BITWISE)
    set(fmad --fmad=false)
  endif()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --extended-lambda ${fmad} -Xcompiler=-Wall,-Wextra>)
endfunction()
