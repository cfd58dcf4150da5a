// dtype code -> C++ storage type: the host-side dispatch of both launchers (CPU and CUDA).
#pragma once

#include <stdexcept>

#include "lottery/dtype.h"

namespace lottery {

template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32:
      return f(float{});
    case DType::Float64:
      return f(double{});
    case DType::Float16:
      return f(half_t{});
    case DType::BFloat16:
      return f(bfloat16_t{});
  }
  // Unreachable from Python: _validate.py only passes the codes above.
  throw std::invalid_argument("lottery_ext: unknown dtype code");
}

}  // namespace lottery
