// bfloat16 products with AVX512-BF16 (vdpbf16ps): C (M, N) = A (M, K) B (N, K)^T, float32
// results. Built into the modules compiled for AVX-512 (avx512, native) and used only where
// the CPU also has AVX512-BF16; python/linmaps/_bf16_kernel.py chooses the path.
//
// vdpbf16ps multiplies bfloat16 pairs exactly and adds them to a float32 accumulator, each
// addition rounded to nearest even; it treats subnormal inputs as zero and flushes subnormal
// results to zero (Intel SDM, VDPBF16PS). Every output element is the sum over k in the same
// order (k pair by k pair, from an accumulator starting at zero) whatever the thread count:
// threads share out whole output tiles (detail::parallel_for, which also stops the call for a
// Ctrl-C), so results are bitwise identical for any count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "linmaps.hpp"

#if defined(__x86_64__) && defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
#define LINMAPS_BF16_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace linmaps {
namespace {

bool cpu_has_avx512_bf16() {
#ifdef LINMAPS_BF16_KERNEL
  // CPUID leaf 7, sub-leaf 1, EAX bit 5. The module itself runs only on an AVX-512 CPU whose
  // OS saves the AVX-512 state (the avx512/native dispatch), which vdpbf16ps also needs.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax >> 5) & 1u;
#else
  return false;
#endif
}

#ifdef LINMAPS_BF16_KERNEL
// The output tile of the micro-kernel: 8 rows by 2 x 16 float32 columns (16 accumulators).
constexpr Index kTileRows = 8;
constexpr Index kTileCols = 32;

// A (rows_total, k) bfloat16 matrix as pairs along k: out[r * k2 + p] holds elements 2p (low half)
// and 2p + 1 (high half) of row r, zero past the end of k and for the rows beyond rows_total
// (padding up to a whole tile).
void pack_pairs(const std::uint16_t* src, Index rows_total, Index k, Index padded_rows,
                std::uint32_t* out) {
  const Index k2 = (k + 1) / 2;
  if (k2 == 0) return;  // no pairs: `out` may be the null data of an empty vector
  for (Index r = 0; r < padded_rows; ++r) {
    std::uint32_t* row_out = out + r * k2;
    if (r >= rows_total) {
      std::memset(row_out, 0, sizeof(std::uint32_t) * k2);
      continue;
    }
    const std::uint16_t* row = src + r * k;
    for (Index p = 0; p < k / 2; ++p) {
      row_out[p] = std::uint32_t(row[2 * p]) | (std::uint32_t(row[2 * p + 1]) << 16);
    }
    if (k % 2) row_out[k2 - 1] = row[k - 1];
  }
}

// B's pairs reordered by tile: for the columns [32 t, 32 t + 32), pair p of all 32 columns is
// contiguous (two zmm loads). `pairs` is B packed by pack_pairs, with n padded to tiles.
void interleave_columns(const std::uint32_t* pairs, Index padded_cols, Index k2,
                        std::uint32_t* out) {
  for (Index t = 0; t < padded_cols / kTileCols; ++t) {
    std::uint32_t* tile = out + t * kTileCols * k2;
    for (Index p = 0; p < k2; ++p) {
      for (Index c = 0; c < kTileCols; ++c)
        tile[p * kTileCols + c] = pairs[(t * kTileCols + c) * k2 + p];
    }
  }
}

// One tile: c_tile[8][32] = sum over pairs p of a_pairs[row][p] . b_tile[p][col].
__attribute__((target("avx512f,avx512bf16"))) void micro_kernel(const std::uint32_t* a_pairs,
                                                                const std::uint32_t* b_tile,
                                                                Index k2, float* c_tile) {
  __m512 acc[kTileRows][2];
  for (Index r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (Index p = 0; p < k2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b_tile + p * kTileCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b_tile + p * kTileCols + 16);
    for (Index r = 0; r < kTileRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_pairs[r * k2 + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (Index r = 0; r < kTileRows; ++r) {
    _mm512_storeu_ps(c_tile + r * kTileCols, acc[r][0]);
    _mm512_storeu_ps(c_tile + r * kTileCols + 16, acc[r][1]);
  }
}

void gemm_nt(const std::uint16_t* a, const std::uint16_t* b, float* c, Index m, Index n, Index k,
             int num_threads) {
  const Index k2 = (k + 1) / 2;
  const Index row_tiles = (m + kTileRows - 1) / kTileRows;
  const Index col_tiles = (n + kTileCols - 1) / kTileCols;
  std::vector<std::uint32_t> a_pairs(static_cast<size_t>(row_tiles * kTileRows * k2));
  std::vector<std::uint32_t> b_pairs(static_cast<size_t>(col_tiles * kTileCols * k2));
  std::vector<std::uint32_t> b_tiles(b_pairs.size());
  pack_pairs(a, m, k, row_tiles * kTileRows, a_pairs.data());
  pack_pairs(b, n, k, col_tiles * kTileCols, b_pairs.data());
  interleave_columns(b_pairs.data(), col_tiles * kTileCols, k2, b_tiles.data());
  const Index tiles = row_tiles * col_tiles;
  // Below kSerialFlops the call stays on the calling thread (waking the team costs more).
  const double flops = 2.0 * double(m) * double(n) * double(k);
  const int team = flops < detail::kSerialFlops ? 1 : detail::team_for(tiles, num_threads);
  // Tile t covers rows of row tile t % row_tiles: consecutive tiles share B's column tile.
  detail::parallel_for(tiles, team, [&](Index t, int) {
    const Index col_tile = t / row_tiles, row_tile = t % row_tiles;
    alignas(64) float c_tile[kTileRows * kTileCols];
    micro_kernel(a_pairs.data() + row_tile * kTileRows * k2,
                 b_tiles.data() + col_tile * kTileCols * k2, k2, c_tile);
    const Index row0 = row_tile * kTileRows, col0 = col_tile * kTileCols;
    const Index rows = std::min(kTileRows, m - row0), cols = std::min(kTileCols, n - col0);
    for (Index r = 0; r < rows; ++r) {
      std::memcpy(c + (row0 + r) * n + col0, c_tile + r * kTileCols, sizeof(float) * cols);
    }
  });
}
#endif

// The path this module can take for bfloat16 products: "avx512_bf16" when it was built with
// the kernel and the CPU has the instruction, else "float32" (the caller widens to float32).
std::string bf16_path() {
#ifdef LINMAPS_BF16_KERNEL
  if (cpu_has_avx512_bf16()) return "avx512_bf16";
#endif
  return "float32";
}

Array<float> bf16_gemm_nt_py(const Array<std::uint16_t>& a, const Array<std::uint16_t>& b) {
  binding::require_ndim(a, "a", 2);
  binding::require_ndim(b, "b", 2);
  const Index m = a.shape(0), k = a.shape(1), n = b.shape(0);
  binding::require_shape(b, "b", {n, k});
  binding::require_aligned(a, "a");
  binding::require_aligned(b, "b");
  if (bf16_path() != "avx512_bf16") {
    throw std::runtime_error("bf16_gemm_nt: this module or CPU has no AVX512-BF16 kernel");
  }
  Array<float> c = binding::new_array<float>({m, n});
#ifdef LINMAPS_BF16_KERNEL
  if (m > 0 && n > 0) {
    const std::uint16_t *a_data = a.data(), *b_data = b.data();
    float* c_data = c.mutable_data();
    const double flops = binding::product_flops({m, n, k});
    const int num_threads = binding::threads_for(flops);
    binding::CallScope call(flops);
    {
      binding::ReleaseGil release(flops);
      gemm_nt(a_data, b_data, c_data, m, n, k, num_threads);
    }
    call.raise_if_stopped();
  }
#endif
  return c;
}

}  // namespace

void bind_bf16(py::module_& m) {
  m.def("bf16_path", &bf16_path,
        "'avx512_bf16' if this module has the AVX512-BF16 kernel and the CPU runs it, else "
        "'float32'.");
  m.def("bf16_gemm_nt", &bf16_gemm_nt_py, py::arg("a").noconvert(), py::arg("b").noconvert(),
        "a (M, K) @ b (N, K).T for bfloat16 bits (uint16): float32 (M, N), float32 sums.");
}

}  // namespace linmaps
