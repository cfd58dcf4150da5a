// Portability macros shared by the CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__)
#define LOTTERY_HD __host__ __device__
#define LOTTERY_INLINE __forceinline__
#else
#define LOTTERY_HD
#define LOTTERY_INLINE inline __attribute__((always_inline))
#endif

#include <cstdint>

namespace lottery {

// Data type codes shared with python/lottery_ext/_radix.py (DTYPE_CODES).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace lottery
