// CPU launcher for the fused rewind: parameters back to their snapshot (pruned ones to 0) and
// optimizer state buffers zeroed, in one pass over each tensor's elements.
#include "lottery/api.h"
#include "lottery/dispatch.h"
#include "lottery/math.h"
#include "parallel.h"

namespace lottery::cpu {

void rewind(DType dtype, size_t n, void* const* params, const void* const* snapshots,
            const uint8_t* const* masks, void* const* states, size_t states_per_tensor,
            const int64_t* numels, const Exec& exec) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RewindValue f;
    for_each_range(n, numels, exec.threads, [&](size_t t, int64_t b, int64_t e) {
      T* __restrict p = static_cast<T*>(params[t]);
      const T* __restrict s = static_cast<const T*>(snapshots[t]);
      const uint8_t* __restrict m = masks[t];
      if (m) {
        for (int64_t i = b; i < e; ++i) p[i] = f(s[i], m[i] != 0);
      } else {
        for (int64_t i = b; i < e; ++i) p[i] = s[i];
      }
      for (size_t k = 0; k < states_per_tensor; ++k) {
        T* __restrict st = static_cast<T*>(states[t * states_per_tensor + k]);
        if (st)
          for (int64_t i = b; i < e; ++i) st[i] = T{};
      }
    });
  });
}

}  // namespace lottery::cpu
