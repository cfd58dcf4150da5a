// CPU threading for the compiled core: OpenMP, sharing torch's runtime.
//
// torch's CPU wheels ship libgomp with the soname libgomp.so.1. The core links libgomp.so.1
// too and is always loaded after torch (lottery_ext imports torch first), so the dynamic
// loader hands it torch's copy: one OpenMP runtime and one thread pool for the process.
// A private pool (std::thread) measured ~20% slower here: torch's OpenMP workers spin
// after every torch op and steal the cores from a second pool. The thread count comes from
// torch.get_num_threads() on every call.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lottery::cpu {

// Threads worth using for `total` elements: at least kMinPerThread elements each.
constexpr int64_t kMinPerThread = 1 << 15;
inline int threads_for(int64_t total, int max_threads) {
  int64_t t = total / kMinPerThread;
  if (t > max_threads) t = max_threads;
  return t < 1 ? 1 : int(t);
}

// Runs fn(tid, team) on a team of up to `nthreads` threads. The team may be smaller than
// asked (nested parallelism, OMP_DYNAMIC), so callers split work by `team`.
template <class F>
void parallel_run(int nthreads, F&& fn) {
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  fn(0, 1);
}

// The concatenation of `n` tensors (numels[i] elements each) is cut into `parts` contiguous
// ranges of equal size (edges on multiples of 64 elements: no false sharing), so large and
// small tensors balance across threads. The cut depends only on `parts`, never on how many
// threads the runtime grants, so per-part results (histograms, tie counts) are deterministic.
inline int plan_parts(size_t n, const int64_t* numels, int max_threads) {
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += numels[i];
  return threads_for(total, max_threads);
}

// Calls f(part, tensor_index, begin, end) for every piece of every part, parts spread over up
// to `parts` threads; within a part, pieces come in flat order.
template <class F>
void for_each_part(size_t n, const int64_t* numels, int parts, F&& f) {
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += numels[i];
  if (total == 0) return;
  const int64_t chunk = ((total + parts - 1) / parts + 63) / 64 * 64;
  parallel_run(parts, [&](int tid, int team) {
    for (int part = tid; part < parts; part += team) {
      int64_t lo = int64_t(part) * chunk;
      const int64_t hi = lo + chunk < total ? lo + chunk : total;
      int64_t offset = 0;  // start of tensor i in the concatenation
      for (size_t i = 0; i < n && lo < hi; ++i) {
        const int64_t end = offset + numels[i];
        if (lo < end) {
          const int64_t stop = hi < end ? hi : end;
          f(part, i, lo - offset, stop - offset);
          lo = stop;
        }
        offset = end;
      }
    }
  });
}

// for_each_part when the caller needs no per-part state: f(tensor_index, begin, end).
template <class F>
void for_each_range(size_t n, const int64_t* numels, int max_threads, F&& f) {
  for_each_part(n, numels, plan_parts(n, numels, max_threads),
                [&](int, size_t t, int64_t b, int64_t e) { f(t, b, e); });
}

}  // namespace lottery::cpu
