// Compiler glue: the host/device annotation and version macros shared by every header.
#pragma once

#define GCOMP_VERSION_MAJOR 0
#define GCOMP_VERSION_MINOR 1
#define GCOMP_VERSION_PATCH 0

// Functions and lambdas that kernels call on both sides carry GCOMP_HD, so the
// same code compiles with g++ (host) and nvcc (host and device).
#if defined(__CUDACC__)
#define GCOMP_HD __host__ __device__
#else
#define GCOMP_HD
#endif
