// Storage types for 16-bit floats and their conversions to the float "opmath" type.
// The compiled core never sees torch, so it carries its own half/bfloat16 types:
// plain 16-bit payloads, converted with hardware instructions where the compiler has them.
#pragma once

#include <cstring>

#include "lottery/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace lottery {

struct alignas(2) half_t {
  uint16_t bits;
};
struct alignas(2) bfloat16_t {
  uint16_t bits;
};

// Arithmetic is done in OpMath<T>: float for 16-bit storage, T otherwise (as torch does).
template <typename T>
struct OpMathT {
  using type = T;
};
template <>
struct OpMathT<half_t> {
  using type = float;
};
template <>
struct OpMathT<bfloat16_t> {
  using type = float;
};
template <typename T>
using OpMath = typename OpMathT<T>::type;

LOTTERY_HD LOTTERY_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
LOTTERY_HD LOTTERY_INLINE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- bfloat16: upper half of a float32, round-to-nearest-even, quiet NaN as torch does.
LOTTERY_HD LOTTERY_INLINE float load(bfloat16_t x) { return bits_float(uint32_t(x.bits) << 16); }
LOTTERY_HD LOTTERY_INLINE bfloat16_t store_bf16(float f) {
  uint32_t u = float_bits(f);
  if (f != f) return bfloat16_t{uint16_t(0x7FC0)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

// ---- float16 (IEEE binary16).
#if !defined(__CUDA_ARCH__) && !defined(__FLT16_MANT_DIG__)
// Portable bit-level conversions for host compilers without _Float16.
LOTTERY_HD inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_float(sign);  // signed zero
    // Subnormal half: value = man * 2^-24, exact in float.
    float f = float(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}
LOTTERY_HD inline uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (u > 0x7F800000u ? 0x200u : 0u));
  if (u >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to inf
  if (u < 0x38800000u) {                                  // subnormal or zero half
    // Add a magic number so the FPU does the round-to-nearest-even shift for us.
    float r = bits_float(u) + 0.5f;
    return uint16_t(sign | uint16_t(float_bits(r) - float_bits(0.5f)));
  }
  uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return uint16_t(sign | uint16_t(u >> 13));
}
#endif

LOTTERY_HD LOTTERY_INLINE float load(half_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#elif defined(__FLT16_MANT_DIG__)
  _Float16 h;
  memcpy(&h, &x.bits, 2);
  return float(h);
#else
  return half_bits_to_float(x.bits);
#endif
}
LOTTERY_HD LOTTERY_INLINE half_t store_half(float f) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#elif defined(__FLT16_MANT_DIG__)
  _Float16 h = _Float16(f);
  half_t r;
  memcpy(&r.bits, &h, 2);
  return r;
#else
  return half_t{float_to_half_bits(f)};
#endif
}

LOTTERY_HD LOTTERY_INLINE float load(float x) { return x; }
LOTTERY_HD LOTTERY_INLINE double load(double x) { return x; }

// store<T>(opmath value) -> storage value
template <typename T>
LOTTERY_HD LOTTERY_INLINE T store(OpMath<T> v) {
  return T(v);
}
template <>
LOTTERY_HD LOTTERY_INLINE half_t store<half_t>(float v) {
  return store_half(v);
}
template <>
LOTTERY_HD LOTTERY_INLINE bfloat16_t store<bfloat16_t>(float v) {
  return store_bf16(v);
}

}  // namespace lottery
