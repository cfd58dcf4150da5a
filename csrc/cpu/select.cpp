// CPU launchers for exact magnitude selection (lottery/select.h): radix histograms over a
// list of tensors without concatenating them (one histogram, or one per tensor), and
// exact-count mask construction (two passes over host memory: no scratch needed).
#include "lottery/select.h"

#include <vector>

#include "lottery/api.h"
#include "lottery/dispatch.h"
#include "parallel.h"

namespace lottery::cpu {
namespace {

// Counting goes into a uint32 histogram (half the cache footprint of int64: 256 KB for a
// 16-bit digit, L2-resident), added into the part's int64 histogram every kFlush elements (so
// it never overflows) and at the end. Measured at 25M float32: int64 counts 59 ms, uint32 +
// the block test below 17 ms; interleaved sub-histograms only made it slower (more cache).
constexpr int64_t kFlush = int64_t(1) << 30;

template <typename T, bool HAS_MASK>
void histogram_range(const T* __restrict x, const uint8_t* __restrict mask, DigitPass pass,
                     uint32_t* __restrict counts, int64_t* __restrict hist, int64_t& nan_count,
                     int64_t b, int64_t e) {
  using K = MagnitudeKey<T>;
  const int64_t bins = int64_t(1) << pass.bits;
  constexpr int64_t kBlock = 64;  // vectorised "does anything here match?" test per block
  int64_t nans = 0;
  for (int64_t lo = b; lo < e; lo += kFlush) {
    const int64_t hi = e - lo > kFlush ? lo + kFlush : e;
    for (int64_t blk = lo; blk < hi; blk += kBlock) {
      const int64_t end = hi - blk > kBlock ? blk + kBlock : hi;
      // After the first pass few elements match the prefix: test a block with a vectorised
      // reduction and touch the histogram only for blocks that have a match.
      int any = 0;
      for (int64_t i = blk; i < end; ++i) {
        const bool cand = !HAS_MASK || mask[i];
        const uint64_t key = K::key(x[i]);
        nans += cand && key > K::kInf;
        any |= cand && pass.matches(key);
      }
      if (!any) continue;
      for (int64_t i = blk; i < end; ++i) {
        if (HAS_MASK && !mask[i]) continue;
        const uint64_t key = K::key(x[i]);
        if (pass.matches(key)) ++counts[pass.digit(key)];
      }
    }
    for (int64_t d = 0; d < bins; ++d) {
      hist[d] += counts[d];
      counts[d] = 0;
    }
  }
  nan_count += nans;
}

// Counts keys equal to t_key (candidates only) in [b, e).
template <typename T>
int64_t count_ties(const T* __restrict x, const uint8_t* __restrict mask, uint64_t t_key, int64_t b,
                   int64_t e) {
  int64_t c = 0;
  for (int64_t i = b; i < e; ++i) c += (!mask || mask[i]) && MagnitudeKey<T>::key(x[i]) == t_key;
  return c;
}

}  // namespace

void magnitude_histogram(DType dtype, size_t n, const void* const* tensors,
                         const uint8_t* const* masks, const int64_t* numels, const DigitPass& pass,
                         int64_t* hist, const Exec& exec) {
  const int64_t bins = int64_t(1) << pass.bits;
  const int parts = plan_parts(n, numels, exec.threads);
  // Per-part histograms: memory bounded by threads x bins, never by N.
  std::vector<int64_t> local(size_t(parts) * bins, 0), nans(parts, 0);
  std::vector<uint32_t> counts(size_t(parts) * bins, 0);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_part(n, numels, parts, [&](int part, size_t t, int64_t b, int64_t e) {
      const T* x = static_cast<const T*>(tensors[t]);
      int64_t* h = local.data() + size_t(part) * bins;
      uint32_t* c = counts.data() + size_t(part) * bins;
      if (masks[t])
        histogram_range<T, true>(x, masks[t], pass, c, h, nans[part], b, e);
      else
        histogram_range<T, false>(x, nullptr, pass, c, h, nans[part], b, e);
    });
  });
  for (int part = 0; part < parts; ++part) {
    hist[bins] += nans[part];
    const int64_t* h = local.data() + size_t(part) * bins;
    for (int64_t i = 0; i < bins; ++i) hist[i] += h[i];
  }
}

// One threaded pass per tensor: the per-layer lists are a few large tensors, each of which
// fills the threads on its own.
void magnitude_histogram_batched(DType dtype, size_t n, const void* const* tensors,
                                 const uint8_t* const* masks, const int64_t* numels, int shift,
                                 int bits, const uint64_t* prefixes, uint64_t prefix_mask,
                                 int64_t* hist, const Exec& exec) {
  const size_t row = (size_t(1) << bits) + 1;
  for (size_t i = 0; i < n; ++i)
    magnitude_histogram(dtype, 1, tensors + i, masks + i, numels + i,
                        DigitPass{shift, bits, prefixes[i], prefix_mask}, hist + i * row, exec);
}

size_t threshold_mask_scratch_bytes(size_t, const int64_t*) { return 0; }

void threshold_mask(DType dtype, size_t n, const void* const* tensors,
                    const uint8_t* const* old_masks, uint8_t* const* out_masks,
                    const int64_t* numels, uint64_t t_key, int64_t ties_to_prune, void*, size_t,
                    const Exec& exec) {
  const int parts = plan_parts(n, numels, exec.threads);
  std::vector<int64_t> ties(size_t(parts) + 1, 0);  // ties per part, then prefix sums
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using K = MagnitudeKey<T>;
    const ThresholdRule rule{t_key};
    // Pass 1: ties per part. Pass 2: write masks; a tie is pruned while the running tie
    // count (flat order over the whole list) is below ties_to_prune.
    for_each_part(n, numels, parts, [&](int part, size_t t, int64_t b, int64_t e) {
      const T* x = static_cast<const T*>(tensors[t]);
      ties[part + 1] += count_ties<T>(x, old_masks[t], t_key, b, e);
    });
    for (int i = 0; i < parts; ++i) ties[i + 1] += ties[i];
    for_each_part(n, numels, parts, [&](int part, size_t t, int64_t b, int64_t e) {
      const T* x = static_cast<const T*>(tensors[t]);
      const uint8_t* old = old_masks[t];
      uint8_t* out = out_masks[t];
      int64_t seen = ties[part];  // ties before this piece, in flat order
      for (int64_t i = b; i < e; ++i) {
        const bool candidate = !old || old[i];
        const uint64_t key = K::key(x[i]);
        out[i] = candidate && rule.keep(key, seen < ties_to_prune);
        seen += candidate && key == t_key;
      }
      ties[part] = seen;
    });
  });
}

}  // namespace lottery::cpu
