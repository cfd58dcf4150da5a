// CUDA launchers for exact magnitude selection (lottery/select.h): radix histograms over a list
// of tensors (one histogram, or one per tensor), and exact-count mask construction. The keys,
// digits and the tie rule are the ones csrc/cpu/select.cpp uses (MagnitudeKey, DigitPass,
// ThresholdRule).
//
// Work is cut into tiles that never straddle two tensors, so every tile has one base address
// (16-byte vector loads when it is aligned) and the tiles in (tensor, tile) order are the flat
// order of the concatenation. Each launch carries a table of up to ~80-96 tensors by value
// (under 4 KB of parameters) with the first tile of each tensor; longer lists take several
// launches. 64-bit element offsets throughout (tiles index 32-bit within a launch).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "lottery/api_cuda.h"
#include "lottery/select.h"
#include "multi_tensor_apply.cuh"

namespace lottery::cuda {
namespace {

using detail::aligned_to;
using detail::for_each_element;
using detail::kVec;
using detail::vload;
using detail::vload_or;
using detail::vstore;

// Largest s in [0, n) with begin[s] <= tile (begin strictly increasing, begin[0] == 0).
__device__ LOTTERY_INLINE int find_slot(const uint32_t* begin, int n, uint32_t tile) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (begin[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ LOTTERY_INLINE uint64_t key_of(T x) {
  return uint64_t(MagnitudeKey<T>::key(x));
}

// ---------------------------------------------------------------------------------------------
// histograms

constexpr int kHistThreads = 512;
constexpr int64_t kHistTile = 16384;                  // elements per tile
constexpr int kHistMaxTensors = 80;                   // tensors per launch (parameter budget)
constexpr uint32_t kHistMaxTilesPerBlock = 1u << 17;  // 2^31 elements: uint32 bins never wrap

struct HistMeta {
  const void* x[kHistMaxTensors];
  const uint8_t* mask[kHistMaxTensors];
  int64_t numel[kHistMaxTensors];
  uint64_t prefix[kHistMaxTensors];          // the prefix this tensor's keys must match
  int64_t* row[kHistMaxTensors];             // the histogram this tensor counts into
  uint32_t tile_begin[kHistMaxTensors + 1];  // first tile of each tensor; [n]: tiles in total
  int n;
};
static_assert(sizeof(HistMeta) + sizeof(DigitPass) <= detail::kParamBudget);

// Adds the shared-memory histogram into `row` (int64, global) and clears it.
__device__ LOTTERY_INLINE void flush(uint32_t* sh, int row_len, int64_t* row) {
  __syncthreads();
  for (int i = int(threadIdx.x); i < row_len; i += int(blockDim.x)) {
    const uint32_t c = sh[i];
    if (c) {
      atomicAdd(reinterpret_cast<unsigned long long*>(row + i), static_cast<unsigned long long>(c));
      sh[i] = 0;
    }
  }
  __syncthreads();
}

constexpr uint32_t kNoBin = 0xFFFFFFFFu;

// ++sh[bin] (nothing for kNoBin). When every converged lane of the warp has the same bin (ties:
// the zeros of pruned weights, a constant tensor...), one lane adds them all: one shared atomic
// instead of a 32-way conflict on one address.
__device__ LOTTERY_INLINE void count_bin(uint32_t* sh, uint32_t bin) {
  namespace cg = cooperative_groups;
  const cg::coalesced_group g = cg::coalesced_threads();
  const uint32_t first = g.shfl(bin, 0);
  if (g.all(bin == first)) {
    if (g.thread_rank() == 0 && first != kNoBin) atomicAdd(&sh[first], g.size());
  } else if (bin != kNoBin) {
    atomicAdd(&sh[bin], 1u);
  }
}

template <typename T, bool HAS_MASK>
__device__ LOTTERY_INLINE void histogram_tile(const T* x, const uint8_t* mask, int len,
                                              const DigitPass& pass, uint32_t* sh, int bins) {
  using K = MagnitudeKey<T>;
  constexpr int V = kVec<T>;
  const bool aligned = aligned_to<16>(x) && aligned_to<V>(mask);
  for_each_element<V>(len, aligned, [&](int i, auto width) {
    constexpr int N = decltype(width)::value;
    T xv[N];
    uint8_t keep[N];
    vload(xv, x + i);
    vload_or<HAS_MASK>(keep, mask, i, uint8_t(1));
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const uint64_t key = key_of(xv[k]);
      const bool cand = keep[k] != 0;
      if (cand && key > uint64_t(K::kInf)) atomicAdd(&sh[bins], 1u);  // NaN candidate
      count_bin(sh, cand && pass.matches(key) ? uint32_t(pass.digit(key)) : kNoBin);
    }
  });
}

// Block b takes the contiguous tile range [total * b / grid, total * (b + 1) / grid), counts
// into a shared-memory histogram of 2^bits + 1 uint32, and adds it to the row of its tensor:
// once at the end (one histogram) or at every tensor boundary it crosses (BATCHED).
template <typename T, bool BATCHED>
__global__ void __launch_bounds__(kHistThreads)
    histogram_kernel(const __grid_constant__ HistMeta meta, const DigitPass pass) {
  extern __shared__ uint32_t sh[];
  const int bins = 1 << pass.bits;
  const int row_len = bins + 1;
  for (int i = int(threadIdx.x); i < row_len; i += int(blockDim.x)) sh[i] = 0;
  __syncthreads();
  const uint64_t total = meta.tile_begin[meta.n];
  const uint32_t t0 = uint32_t(total * blockIdx.x / gridDim.x);
  const uint32_t t1 = uint32_t(total * (blockIdx.x + 1) / gridDim.x);
  if (t0 >= t1) return;  // uniform over the block
  int slot = find_slot(meta.tile_begin, meta.n, t0);
  for (uint32_t tile = t0; tile < t1; ++tile) {
    while (tile >= meta.tile_begin[slot + 1]) {  // next tensor (uniform over the block)
      if constexpr (BATCHED) flush(sh, row_len, meta.row[slot]);
      ++slot;
    }
    const int64_t start = int64_t(tile - meta.tile_begin[slot]) * kHistTile;
    const int64_t rest = meta.numel[slot] - start;
    const int len = rest < kHistTile ? int(rest) : int(kHistTile);
    const T* x = static_cast<const T*>(meta.x[slot]) + start;
    const uint8_t* mask = meta.mask[slot];
    DigitPass p = pass;
    p.prefix = meta.prefix[slot];
    if (mask)
      histogram_tile<T, true>(x, mask + start, len, p, sh, bins);
    else
      histogram_tile<T, false>(x, nullptr, len, p, sh, bins);
  }
  flush(sh, row_len, meta.row[slot]);
}

void check_pass(int shift, int bits, const char* what) {
  if (bits < 1 || bits > kMaxHistogramBits)
    throw std::invalid_argument(std::string(what) + ": bits must be in [1, " +
                                std::to_string(kMaxHistogramBits) + "] on CUDA, got " +
                                std::to_string(bits));
  if (shift < 0 || shift > 63)
    throw std::invalid_argument(std::string(what) + ": shift must be in [0, 63], got " +
                                std::to_string(shift));
}

int64_t tiles_of(int64_t numel, int64_t tile) { return numel > 0 ? (numel + tile - 1) / tile : 0; }

// prefixes == nullptr: one histogram `hist` and pass.prefix for every tensor; otherwise tensor
// t matches prefixes[t] and counts into row t of `hist`.
template <typename T, bool BATCHED>
void launch_histograms(const char* name, size_t n, const void* const* tensors,
                       const uint8_t* const* masks, const int64_t* numels, const DigitPass& pass,
                       const uint64_t* prefixes, int64_t* hist, int device, cudaStream_t stream) {
  const int row_len = (1 << pass.bits) + 1;
  const size_t smem = size_t(row_len) * sizeof(uint32_t);
  int per_sm = 0;
  detail::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, histogram_kernel<T, BATCHED>,
                                                              kHistThreads, smem),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const uint64_t resident = uint64_t(detail::sm_count(device)) * uint64_t(std::max(per_sm, 1));

  HistMeta meta;
  std::memset(static_cast<void*>(&meta), 0, sizeof(meta));
  int nt = 0;
  uint64_t tiles = 0;
  const auto launch = [&] {
    meta.n = nt;
    meta.tile_begin[nt] = uint32_t(tiles);
    uint64_t grid = std::min<uint64_t>(tiles, resident);
    grid = std::max<uint64_t>(grid, (tiles + kHistMaxTilesPerBlock - 1) / kHistMaxTilesPerBlock);
    histogram_kernel<T, BATCHED><<<unsigned(grid), kHistThreads, smem, stream>>>(meta, pass);
    detail::check_launch(name);
    nt = 0;
    tiles = 0;
  };
  constexpr uint64_t kMaxTiles = uint64_t(1) << 31;  // per launch (32-bit tile indices)
  for (size_t t = 0; t < n; ++t) {
    const uint64_t count = uint64_t(tiles_of(numels[t], kHistTile));
    if (count == 0) continue;
    if (count > kMaxTiles) throw std::invalid_argument(std::string(name) + ": tensor too large");
    if (nt == kHistMaxTensors || tiles + count > kMaxTiles) launch();
    meta.x[nt] = tensors[t];
    meta.mask[nt] = masks[t];
    meta.numel[nt] = numels[t];
    meta.prefix[nt] = BATCHED ? prefixes[t] : pass.prefix;
    meta.row[nt] = BATCHED ? hist + int64_t(t) * row_len : hist;
    meta.tile_begin[nt] = uint32_t(tiles);
    tiles += count;
    ++nt;
  }
  if (nt > 0) launch();
}

// ---------------------------------------------------------------------------------------------
// exact-count masks

constexpr int kMaskThreads = 256;
constexpr int64_t kMaskTile = 16384;  // elements per tile (a multiple of kMaskThreads * 16)
constexpr int kMaskMaxTensors = 96;
constexpr int kScanThreads = 512;
constexpr int kScanItems = 4;

struct MaskMeta {
  const void* x[kMaskMaxTensors];
  const uint8_t* old[kMaskMaxTensors];  // null: every element is a candidate
  uint8_t* out[kMaskMaxTensors];        // may alias old
  int64_t numel[kMaskMaxTensors];
  uint32_t tile_begin[kMaskMaxTensors + 1];
  int n;
  int64_t tile_base;  // index of this launch's first tile among all tiles of the call
};
static_assert(sizeof(MaskMeta) + 3 * sizeof(int64_t) <= detail::kParamBudget);

struct TileRef {
  int slot;
  int64_t start;
  int len;
};

__device__ LOTTERY_INLINE TileRef tile_ref(const MaskMeta& meta) {
  const uint32_t tile = blockIdx.x;
  const int slot = find_slot(meta.tile_begin, meta.n, tile);
  const int64_t start = int64_t(tile - meta.tile_begin[slot]) * kMaskTile;
  const int64_t rest = meta.numel[slot] - start;
  return {slot, start, rest < kMaskTile ? int(rest) : int(kMaskTile)};
}

// counts[tile_base + b] = candidates with key == t_key in tile b.
template <typename T>
__global__ void __launch_bounds__(kMaskThreads)
    tie_count_kernel(const __grid_constant__ MaskMeta meta, const uint64_t t_key, int64_t* counts) {
  constexpr int V = kVec<T>;
  const TileRef r = tile_ref(meta);
  const T* x = static_cast<const T*>(meta.x[r.slot]) + r.start;
  const uint8_t* old = meta.old[r.slot];
  if (old) old += r.start;
  const bool aligned = aligned_to<16>(x) && aligned_to<V>(old);
  int c = 0;
  for_each_element<V>(r.len, aligned, [&](int i, auto width) {
    constexpr int N = decltype(width)::value;
    T xv[N];
    uint8_t cand[N];
    vload(xv, x + i);
    if (old) {
      vload(cand, old + i);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) cand[k] = 1;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) c += (cand[k] != 0 && key_of(xv[k]) == t_key) ? 1 : 0;
  });
  using Reduce = cub::BlockReduce<int, kMaskThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) counts[meta.tile_base + blockIdx.x] = total;
}

// In place: a[i] = a[0] + ... + a[i-1] for i < n, and a[n] = the total. One block.
__global__ void __launch_bounds__(kScanThreads) exclusive_scan_kernel(int64_t* a, int64_t n) {
  using Scan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t first = base + int64_t(threadIdx.x) * kScanItems;
    int64_t v[kScanItems];
    int64_t sum = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      v[k] = first + k < n ? a[first + k] : 0;
      sum += v[k];
    }
    int64_t before = 0, aggregate = 0;
    Scan(tmp).ExclusiveSum(sum, before, aggregate);
    int64_t run = carry + before;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (first + k < n) a[first + k] = run;
      run += v[k];
    }
    carry += aggregate;
    __syncthreads();  // tmp is reused by the next round
  }
  if (threadIdx.x == 0) a[n] = carry;
}

// out = candidate && rule.keep(key, tie_pruned) with one tie_pruned for the whole tile.
template <typename T, bool HAS_OLD>
__device__ LOTTERY_INLINE void write_uniform(const T* x, const uint8_t* old, uint8_t* out, int len,
                                             const ThresholdRule rule, bool tie_pruned) {
  constexpr int V = kVec<T>;
  const bool aligned = aligned_to<16>(x) && aligned_to<V>(old) && aligned_to<V>(out);
  for_each_element<V>(len, aligned, [&](int i, auto width) {
    constexpr int N = decltype(width)::value;
    T xv[N];
    uint8_t o[N];
    vload(xv, x + i);
    if constexpr (HAS_OLD) vload(o, old + i);  // read before the write: out may alias old
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const bool cand = HAS_OLD ? o[k] != 0 : true;
      o[k] = uint8_t(cand && rule.keep(key_of(xv[k]), tie_pruned));
    }
    vstore(out + i, o);
  });
}

// The tile that holds the ties_to_prune-th tie: each thread takes V consecutive elements per
// round (blocked order), a block scan gives the ties before each thread in flat order.
template <typename T>
__device__ LOTTERY_INLINE void write_scanned(const T* x, const uint8_t* old, uint8_t* out, int len,
                                             const ThresholdRule rule, int64_t seen0,
                                             int64_t ties_to_prune) {
  constexpr int V = kVec<T>;
  using Scan = cub::BlockScan<int, kMaskThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const bool aligned = aligned_to<16>(x) && aligned_to<V>(old) && aligned_to<V>(out);
  int64_t running = seen0;  // ties before this round, in flat order over the whole list
  for (int base = 0; base < len; base += kMaskThreads * V) {  // uniform trip count
    const int i0 = base + int(threadIdx.x) * V;
    const bool full = i0 + V <= len;
    T xv[V];
    uint8_t cand[V];
    if (aligned && full) {
      vload(xv, x + i0);
      if (old) {
        vload(cand, old + i0);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) cand[k] = 1;
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const bool valid = i0 + k < len;
        xv[k] = valid ? x[i0 + k] : T{};
        cand[k] = valid ? (old ? old[i0 + k] : uint8_t(1)) : uint8_t(0);
      }
    }
    uint64_t key[V];
    int ties = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      key[k] = key_of(xv[k]);
      ties += (cand[k] != 0 && key[k] == rule.t_key) ? 1 : 0;
    }
    int before = 0, aggregate = 0;
    Scan(tmp).ExclusiveSum(ties, before, aggregate);
    int64_t seen = running + before;
    uint8_t o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const bool cand_k = cand[k] != 0;
      o[k] = uint8_t(cand_k && rule.keep(key[k], seen < ties_to_prune));
      seen += (cand_k && key[k] == rule.t_key) ? 1 : 0;
    }
    if (aligned && full) {
      vstore(out + i0, o);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (i0 + k < len) out[i0 + k] = o[k];
    }
    running += aggregate;
    __syncthreads();  // tmp is reused by the next round
  }
}

// scan == nullptr: no tie is pruned (ties_to_prune == 0). Otherwise scan[g] / scan[g + 1] are
// the ties before / up to the end of tile g: a tile whose ties are all before or all after the
// ties_to_prune-th one is written element-wise, only the one straddling it is scanned.
template <typename T>
__global__ void __launch_bounds__(kMaskThreads)
    threshold_mask_kernel(const __grid_constant__ MaskMeta meta, const uint64_t t_key,
                          const int64_t ties_to_prune, const int64_t* scan) {
  const TileRef r = tile_ref(meta);
  const T* x = static_cast<const T*>(meta.x[r.slot]) + r.start;
  const uint8_t* old = meta.old[r.slot];
  if (old) old += r.start;
  uint8_t* out = meta.out[r.slot] + r.start;
  const ThresholdRule rule{t_key};
  int64_t before = 0;
  int mode = 0;  // 0: ties kept, 1: ties pruned, 2: straddles
  if (scan) {
    const int64_t g = meta.tile_base + int64_t(blockIdx.x);
    before = scan[g];
    const int64_t through = scan[g + 1];
    mode = before >= ties_to_prune ? 0 : (through <= ties_to_prune ? 1 : 2);
  }
  if (mode == 2)
    write_scanned<T>(x, old, out, r.len, rule, before, ties_to_prune);
  else if (old)
    write_uniform<T, true>(x, old, out, r.len, rule, mode == 1);
  else
    write_uniform<T, false>(x, nullptr, out, r.len, rule, mode == 1);
}

// Tables of the launches covering the list, in flat order; returns the number of tiles.
int64_t plan_masks(size_t n, const void* const* tensors, const uint8_t* const* old_masks,
                   uint8_t* const* out_masks, const int64_t* numels, std::vector<MaskMeta>& metas) {
  constexpr uint64_t kMaxTiles = uint64_t(1) << 30;  // per launch: gridDim.x and 32-bit tiles
  int64_t total = 0;
  MaskMeta* m = nullptr;
  uint64_t tiles = 0;
  const auto close = [&] {
    if (m) {
      m->tile_begin[m->n] = uint32_t(tiles);
      total += int64_t(tiles);
    }
  };
  for (size_t t = 0; t < n; ++t) {
    const uint64_t count = uint64_t(tiles_of(numels[t], kMaskTile));
    if (count == 0) continue;
    if (count > kMaxTiles) throw std::invalid_argument("threshold_mask: tensor too large");
    if (!m || m->n == kMaskMaxTensors || tiles + count > kMaxTiles) {
      close();
      metas.emplace_back();
      m = &metas.back();
      std::memset(static_cast<void*>(m), 0, sizeof(*m));
      m->tile_base = total;
      tiles = 0;
    }
    m->x[m->n] = tensors[t];
    m->old[m->n] = old_masks[t];
    m->out[m->n] = out_masks[t];
    m->numel[m->n] = numels[t];
    m->tile_begin[m->n] = uint32_t(tiles);
    tiles += count;
    ++m->n;
  }
  close();
  return total;
}

}  // namespace

void magnitude_histogram(DType dtype, size_t n, const void* const* tensors,
                         const uint8_t* const* masks, const int64_t* numels, const DigitPass& pass,
                         int64_t* hist, const Exec& exec) {
  check_pass(pass.shift, pass.bits, "magnitude_histogram");
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) total += numels[t] > 0 ? numels[t] : 0;
  if (total == 0) return;
  if (!hist) throw std::invalid_argument("magnitude_histogram: hist is null");
  const detail::DeviceGuard guard(exec.device);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_histograms<T, false>("magnitude_histogram", n, tensors, masks, numels, pass, nullptr,
                                hist, exec.device, static_cast<cudaStream_t>(exec.stream));
  });
}

void magnitude_histogram_batched(DType dtype, size_t n, const void* const* tensors,
                                 const uint8_t* const* masks, const int64_t* numels, int shift,
                                 int bits, const uint64_t* prefixes, uint64_t prefix_mask,
                                 int64_t* hist, const Exec& exec) {
  check_pass(shift, bits, "magnitude_histogram_batched");
  int64_t total = 0;
  for (size_t t = 0; t < n; ++t) total += numels[t] > 0 ? numels[t] : 0;
  if (total == 0) return;
  if (!hist || !prefixes)
    throw std::invalid_argument("magnitude_histogram_batched: hist or prefixes is null");
  const DigitPass pass{shift, bits, 0, prefix_mask};
  const detail::DeviceGuard guard(exec.device);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_histograms<T, true>("magnitude_histogram_batched", n, tensors, masks, numels, pass,
                               prefixes, hist, exec.device, static_cast<cudaStream_t>(exec.stream));
  });
}

size_t threshold_mask_scratch_bytes(size_t n, const int64_t* numels) {
  int64_t tiles = 0;
  for (size_t t = 0; t < n; ++t) tiles += tiles_of(numels[t], kMaskTile);
  return tiles ? size_t(tiles + 1) * sizeof(int64_t) : 0;
}

void threshold_mask(DType dtype, size_t n, const void* const* tensors,
                    const uint8_t* const* old_masks, uint8_t* const* out_masks,
                    const int64_t* numels, uint64_t t_key, int64_t ties_to_prune, void* scratch,
                    size_t scratch_bytes, const Exec& exec) {
  if (ties_to_prune < 0) throw std::invalid_argument("threshold_mask: ties_to_prune < 0");
  std::vector<MaskMeta> metas;
  const int64_t tiles = plan_masks(n, tensors, old_masks, out_masks, numels, metas);
  if (tiles == 0) return;
  int64_t* scan = nullptr;
  if (ties_to_prune > 0) {
    const size_t need = size_t(tiles + 1) * sizeof(int64_t);
    if (!scratch || scratch_bytes < need)
      throw std::invalid_argument("threshold_mask: scratch of " + std::to_string(scratch_bytes) +
                                  " bytes, " + std::to_string(need) + " needed");
    if (reinterpret_cast<uintptr_t>(scratch) % alignof(int64_t))
      throw std::invalid_argument("threshold_mask: scratch is not 8-byte aligned");
    scan = static_cast<int64_t*>(scratch);
  }
  const detail::DeviceGuard guard(exec.device);
  const auto s = static_cast<cudaStream_t>(exec.stream);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (scan) {
      for (const MaskMeta& m : metas) {
        tie_count_kernel<T><<<m.tile_begin[m.n], kMaskThreads, 0, s>>>(m, t_key, scan);
        detail::check_launch("threshold_mask/tie_count");
      }
      exclusive_scan_kernel<<<1, kScanThreads, 0, s>>>(scan, tiles);
      detail::check_launch("threshold_mask/exclusive_scan");
    }
    for (const MaskMeta& m : metas) {
      threshold_mask_kernel<T>
          <<<m.tile_begin[m.n], kMaskThreads, 0, s>>>(m, t_key, ties_to_prune, scan);
      detail::check_launch("threshold_mask/write");
    }
  });
}

}  // namespace lottery::cuda
