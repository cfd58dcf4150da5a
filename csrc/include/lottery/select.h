// Radix selection on magnitudes: |x| as an unsigned integer key whose order is the order of
// |x| (the float's bits with the sign cleared: +0 < denormals < normals < inf < NaN). An
// exact k-th smallest magnitude is found digit by digit, most significant first, from
// histograms of the digit among the elements that match the digits found so far.
// Shared by csrc/cpu/select.cpp and the CUDA kernels.
#pragma once

#include <cstring>

#include "lottery/dtype.h"

namespace lottery {

template <typename T>
struct MagnitudeKey;

template <>
struct MagnitudeKey<float> {
  using U = uint32_t;
  static constexpr int kBits = 31;
  static constexpr U kInf = 0x7F800000u;
  LOTTERY_HD static LOTTERY_INLINE U key(float x) {
    U u;
    memcpy(&u, &x, sizeof(u));
    return u & 0x7FFFFFFFu;
  }
};

template <>
struct MagnitudeKey<double> {
  using U = uint64_t;
  static constexpr int kBits = 63;
  static constexpr U kInf = 0x7FF0000000000000ull;
  LOTTERY_HD static LOTTERY_INLINE U key(double x) {
    U u;
    memcpy(&u, &x, sizeof(u));
    return u & 0x7FFFFFFFFFFFFFFFull;
  }
};

template <>
struct MagnitudeKey<half_t> {
  using U = uint32_t;
  static constexpr int kBits = 15;
  static constexpr U kInf = 0x7C00u;
  LOTTERY_HD static LOTTERY_INLINE U key(half_t x) { return x.bits & 0x7FFFu; }
};

template <>
struct MagnitudeKey<bfloat16_t> {
  using U = uint32_t;
  static constexpr int kBits = 15;
  static constexpr U kInf = 0x7F80u;
  LOTTERY_HD static LOTTERY_INLINE U key(bfloat16_t x) { return x.bits & 0x7FFFu; }
};

// One histogram pass: digit = (key >> shift) & (2^bits - 1), counted for the candidates whose
// key matches `prefix` on `prefix_mask` (the digits selected by earlier passes).
struct DigitPass {
  int shift, bits;
  uint64_t prefix, prefix_mask;
  LOTTERY_HD LOTTERY_INLINE bool matches(uint64_t key) const {
    return (key & prefix_mask) == prefix;
  }
  LOTTERY_HD LOTTERY_INLINE uint64_t digit(uint64_t key) const {
    return (key >> shift) & ((uint64_t(1) << bits) - 1);
  }
};

// Mask rule for an exact count: keep key > t; prune key < t; of the keys equal to t, prune
// the first `ties_to_prune` in flat order (the caller passes, per range, how many of the
// ties before this range were already pruned).
struct ThresholdRule {
  uint64_t t_key;
  LOTTERY_HD LOTTERY_INLINE bool keep(uint64_t key, bool tie_pruned) const {
    return key > t_key || (key == t_key && !tie_pruned);
  }
};

}  // namespace lottery
