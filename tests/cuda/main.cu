// The main of every CUDA test: runs doctest where a GPU is, else exits 77 (ctest's SKIP_RETURN_CODE).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("%s: no CUDA device (%s); skipped\n", argc > 0 ? argv[0] : "test",
                status != cudaSuccess ? cudaGetErrorString(status) : "count is 0");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
