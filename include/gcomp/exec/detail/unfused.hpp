// Arithmetic that nvcc may not contract into fused multiply-adds, for kernels that promise results bitwise equal to the host's.
#pragma once

#include <cmath>
#include <cstddef>

#include "gcomp/core/config.hpp"

// nvcc contracts a * b + c into one FMA (one rounding instead of two) unless
// the translation unit is built with --fmad=false, and g++ on x86-64 without
// -march does not. Kernels whose results must equal the host's bit for bit
// spell their products and sums with these: on the device they are the
// round-to-nearest intrinsics, which the compiler never fuses, so the user's
// --fmad setting does not matter; on the host they are the plain operators.
// (A host build with -ffp-contract=fast and an FMA-capable -march may still
// fuse the plain operators; the library's tests do not use such flags.)

namespace gcomp::detail {

GCOMP_HD inline float mul_unfused(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GCOMP_HD inline double mul_unfused(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GCOMP_HD inline float add_unfused(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GCOMP_HD inline double add_unfused(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GCOMP_HD inline float sub_unfused(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
GCOMP_HD inline double sub_unfused(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

/// |v| (clears the sign bit, so |-0| = +0), on both sides.
GCOMP_HD inline float magnitude(float v) {
#if defined(__CUDA_ARCH__)
  return ::fabsf(v);
#else
  return std::fabs(v);
#endif
}
GCOMP_HD inline double magnitude(double v) {
#if defined(__CUDA_ARCH__)
  return ::fabs(v);
#else
  return std::fabs(v);
#endif
}

/// out[t] = out[t] + scale * v[t], the product rounded before the sum: the
/// decompress_add of a dense message (identity, dense PowerSGD blocks) as a
/// kernel functor, bitwise the host's `out[t] += scale * v[t]`.
template <class T>
struct add_scaled_entry {
  const T* v;
  T* out;
  T scale;
  GCOMP_HD void operator()(std::size_t t) const { out[t] = add_unfused(out[t], mul_unfused(scale, v[t])); }
};

}  // namespace gcomp::detail
