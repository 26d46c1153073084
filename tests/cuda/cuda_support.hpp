// What every CUDA test shares: a CUDA-error check that fails the test, and a stream of its own.
#pragma once

#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

namespace gcomp_test {

inline void cuda_require(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    FAIL(what, ": ", cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

// A non-blocking stream: nothing orders it with the legacy default stream, so
// a kernel launched on the wrong stream or a missing wait would show.
struct stream_holder {
  cudaStream_t stream = nullptr;
  stream_holder() {
    cuda_require(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~stream_holder() { cudaStreamDestroy(stream); }
  stream_holder(const stream_holder&) = delete;
  stream_holder& operator=(const stream_holder&) = delete;
};

}  // namespace gcomp_test
