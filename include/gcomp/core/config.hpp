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

// GCC's unrolling hint for host loops; nvcc's front end does not know the
// pragma (and host code compiled by nvcc gains nothing from it), so it is
// dropped there.
#define GCOMP_PRAGMA_STRING(x) #x
#if defined(__CUDACC__)
#define GCOMP_UNROLL(n)
#else
#define GCOMP_UNROLL(n) _Pragma(GCOMP_PRAGMA_STRING(GCC unroll n))
#endif
