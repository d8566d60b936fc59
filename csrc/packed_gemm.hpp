// A deterministic multi-threaded GEMM whose threads share packed operand panels, built from
// Eigen's own building blocks (gemm_pack_lhs, gemm_pack_rhs, gebp_kernel: the pieces of
// Eigen/src/Core/products/GeneralMatrixMatrix.h).
//
// Why? With one Eigen product per output tile every tile packs its own panels: the weight
// is packed once per batch tile and x once per weight tile. Measured standalone (float32,
// (N, in, out) = (4096, 1024, 1024), y = x w^T, interleaved): one Eigen GEMM per 256 x 480
// tile 159-177 GFLOP/s on 2 threads, this scheme (panels packed once, shared) 170-192; 1
// thread 80 vs 90. In the library the gain is smaller and depends on the shape (see
// use_packed_gemm in linear.cpp).
//
// Why not Eigen's own parallel GEMM? Its split of the rows among threads (and its blocking,
// computeProductBlockingSizes, which takes the thread count) depends on the thread count,
// and so would the results.
//
// The scheme, for a column-major C (M x N) = A (M x K) B (K x N):
//   * K is cut into slabs of at most kc, C into phases (row block x column block, so that
//     a phase's packed A and B fit kPhasePackBytes each) and each phase into task tiles, all
//     from the shape and the scalar type only (plan_packed_gemm).
//   * Each task computes one tile of C: for each slab in order, C_tile += A'(slab, tile
//     rows) B'(slab, tile cols) with Eigen's micro-kernel. The packed panels A'(slab, tile
//     rows) and B'(slab, tile cols) live in buffers shared by the phase; the first task that
//     needs one packs it, the others reuse it.
//   * Each C element is thus produced by one task, by the same sequence of micro-kernel calls
//     on the same packed data whatever the number of threads: the results are bitwise
//     identical for any team.
#pragma once

#include "kernels.hpp"

#include <Eigen/Core>

#include <atomic>
#include <memory>
#include <thread>

namespace linmaps {
namespace detail {

// The constants below were swept on (4096,1024,1024) and (256,512,512), float32, 2 threads,
// interleaved with NumPy in one process (NumPy time / linmaps time). Two runs of the very
// same setting differed by up to 0.07 there (1.17 vs 1.24), so only the large effects are
// meaningful: every other setting tried was within that noise of the defaults.
//
// Depth of one slab: A' micro-panels stream through L1 while a B' tile (kc x task columns)
// stays in the 1 MiB L2. 2 KiB of depth (512 floats, 256 doubles), close to what Eigen
// picks itself (kc = 520 for a 1024-deep float product). 1024 and 4096 floats: same within
// noise (forward 1.22, grad_x 1.25 vs 1.17-1.24, 1.21-1.25).
constexpr Index kSlabBytes = 2048;
// Bytes of packed A and of packed B per phase (each): both stay in the shared L3 (32 MiB)
// while the tasks of the phase sweep them. A 4096-deep grad_weight (1024 x 1024) dropped
// from 1.05 to 0.77 with 4 MiB (twice the phases, half-size tiles); 16 MiB: 0.97, no gain.
constexpr Index kPhasePackBytes = Index(8) << 20;
// Columns of C per task tile: a B' tile of kc x 256 floats is 512 KiB, half the L2. 512
// columns: same within noise (forward 1.23, grad_weight of (256,512,512) 1.11 vs 1.09-1.15).
constexpr Index kTaskColsBytes = 1024;
// Task tiles per phase aimed for (halving tiles down to kMinTaskRows / kMinTaskCols): 4
// divide evenly among 2 or 4 threads. 2 or 8: same within noise.
constexpr Index kPhaseTasks = 4;
constexpr Index kMinTaskRows = 96;
constexpr Index kMinTaskCols = 16;

struct PackedGemmPlan {
  Index M = 0, N = 0, K = 0;             // C is M x N, the depth is K
  Index kc = 1;                          // slab depth
  Index block_rows = 1, block_cols = 1;  // one phase
  Index task_rows = 1, task_cols = 1;    // one task tile within a phase
  Index slabs() const { return K == 0 ? 0 : ceil_div(K, kc); }
};

// Row counts are multiples of 48 (the float micro-panel; 2 double panels) so that every
// tile starts on a micro-panel of the packed A and on a 64-byte boundary; column counts are
// multiples of 16 (4 B' panels of nr = 4).
template <class T>
PackedGemmPlan plan_packed_gemm(Index M, Index N, Index K) {
  PackedGemmPlan plan;
  plan.M = M;
  plan.N = N;
  plan.K = K;
  const Index max_kc = kSlabBytes / Index(sizeof(T));
  plan.kc = K == 0 ? 1 : round_up(ceil_div(K, ceil_div(K, max_kc)), 16);
  const Index depth = std::max<Index>(K, 1);
  const Index pack_elements = kPhasePackBytes / Index(sizeof(T));
  plan.block_rows = std::min(M, std::max<Index>(48, pack_elements / depth / 48 * 48));
  plan.block_cols = std::min(N, std::max<Index>(16, pack_elements / depth / 16 * 16));
  plan.block_rows = std::max<Index>(plan.block_rows, 1);
  plan.block_cols = std::max<Index>(plan.block_cols, 1);
  plan.task_rows = plan.block_rows;
  plan.task_cols = std::min(plan.block_cols, kTaskColsBytes / Index(sizeof(T)));
  auto tasks = [&] {
    return ceil_div(plan.block_rows, plan.task_rows) * ceil_div(plan.block_cols, plan.task_cols);
  };
  while (tasks() < kPhaseTasks) {
    const Index half_rows = round_up(ceil_div(plan.task_rows, 2), 48);
    const Index half_cols = round_up(ceil_div(plan.task_cols, 2), 16);
    const bool can_rows = half_rows >= kMinTaskRows && half_rows < plan.task_rows;
    const bool can_cols = half_cols >= kMinTaskCols && half_cols < plan.task_cols;
    if (can_rows && (plan.task_rows >= plan.task_cols || !can_cols)) {
      plan.task_rows = half_rows;
    } else if (can_cols) {
      plan.task_cols = half_cols;
    } else {
      break;
    }
  }
  return plan;
}

// C (M x N, column-major, leading dimension ldc) = A B, with A M x K stored in LhsOrder
// (leading dimension lda) and B K x N stored in RhsOrder (ldb). finish_tile(row0, rows,
// col0, cols) is called by the task that completed that tile of C, right after its last
// slab (while the tile is still in cache). `team` workers; results do not depend on it.
// extra_task(0 .. extra_tasks-1), independent work of the caller, is queued ahead of the
// tiles of the first phase: big tasks first, and the small tiles then even out the threads.
template <class T, int LhsOrder, int RhsOrder, class FinishTile, class ExtraTask>
void packed_gemm(const PackedGemmPlan& plan, const T* a, Index lda, const T* b, Index ldb, T* c,
                 Index ldc, int team, FinishTile&& finish_tile, Index extra_tasks,
                 ExtraTask&& extra_task) {
  namespace ei = Eigen::internal;
  using Traits = ei::gebp_traits<T, T>;
  using LhsMapper = ei::const_blas_data_mapper<T, Index, LhsOrder>;
  using RhsMapper = ei::const_blas_data_mapper<T, Index, RhsOrder>;
  using ResMapper = ei::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
  const Index M = plan.M, N = plan.N, K = plan.K, kc = plan.kc, slabs = plan.slabs();
  if (M == 0 || N == 0) {
    parallel_for(extra_tasks, team, [&](Index task, int) { extra_task(task); });
    return;
  }

  const LhsMapper lhs(a, lda);
  const RhsMapper rhs(b, ldb);
  const ResMapper res(c, ldc);

  // Allocated on the calling thread, before any parallel region.
  Buffer<T> packed_a(checked_mul(plan.block_rows, K));
  Buffer<T> packed_b(checked_mul(plan.block_cols, K));
  const Index max_panels = plan.slabs() * (ceil_div(plan.block_rows, plan.task_rows) +
                                           ceil_div(plan.block_cols, plan.task_cols));
  std::unique_ptr<std::atomic<int>[]> pack_state(new std::atomic<int>[max_panels]);

  for (Index row0 = 0; row0 < M; row0 += plan.block_rows) {
    for (Index col0 = 0; col0 < N; col0 += plan.block_cols) {
      const Index rows = std::min(plan.block_rows, M - row0);
      const Index cols = std::min(plan.block_cols, N - col0);
      const Index row_tiles = ceil_div(rows, plan.task_rows);
      const Index col_tiles = ceil_div(cols, plan.task_cols);
      // Slab s of the packed A starts at s * kc * rows and holds the block's rows in
      // micro-panel order, so a tile's rows r0.. start at + r0 * slab_depth (likewise B').
      // Panels are packed just in time by the first task that needs them (claimed through
      // `pack_state`: 0 not started, 1 being packed, 2 ready); a task that needs a panel
      // another task is packing waits for it. So one thread packs the next slab's panels
      // while the other multiplies, and no panel is packed twice. Packing only copies, so
      // which task packs a panel does not change any result.
      const Index panels = slabs * (row_tiles + col_tiles);
      for (Index i = 0; i < panels; ++i) pack_state[i].store(0, std::memory_order_relaxed);
      auto ensure_packed = [&](Index panel, auto&& pack) {
        std::atomic<int>& state = pack_state[panel];
        if (state.load(std::memory_order_acquire) == 2) return;
        int expected = 0;
        if (state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
          pack();
          state.store(2, std::memory_order_release);
          return;
        }
        while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
      };
      const Index extras = row0 == 0 && col0 == 0 ? extra_tasks : 0;
      parallel_for(extras + row_tiles * col_tiles, team, [&](Index task, int) {
        if (task < extras) {
          extra_task(task);
          return;
        }
        task -= extras;
        const Index row_tile = task / col_tiles, col_tile = task % col_tiles;
        const Index r0 = row_tile * plan.task_rows, c0 = col_tile * plan.task_cols;
        const Index nr = std::min(plan.task_rows, rows - r0);
        const Index nc = std::min(plan.task_cols, cols - c0);
        for (Index j = 0; j < nc; ++j) {
          std::fill_n(c + (col0 + c0 + j) * ldc + row0 + r0, nr, T(0));
        }
        ei::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
        for (Index slab = 0; slab < slabs; ++slab) {
          const Index k0 = slab * kc, depth = std::min(kc, K - k0);
          T* a_panel = packed_a.data() + k0 * rows + r0 * depth;
          T* b_panel = packed_b.data() + k0 * cols + c0 * depth;
          ensure_packed(slab * (row_tiles + col_tiles) + row_tile, [&] {
            ei::gemm_pack_lhs<T, Index, LhsMapper, Traits::mr, Traits::LhsProgress,
                              typename Traits::LhsPacket4Packing, LhsOrder>
                pack_lhs;
            pack_lhs(a_panel, lhs.getSubMapper(row0 + r0, k0), depth, nr);
          });
          ensure_packed(slab * (row_tiles + col_tiles) + row_tiles + col_tile, [&] {
            ei::gemm_pack_rhs<T, Index, RhsMapper, Traits::nr, RhsOrder> pack_rhs;
            pack_rhs(b_panel, rhs.getSubMapper(k0, col0 + c0), depth, nc);
          });
          gebp(res.getSubMapper(row0 + r0, col0 + c0), a_panel, b_panel, nr, depth, nc, T(1));
        }
        finish_tile(row0 + r0, nr, col0 + c0, nc);
      });
    }
  }
}

template <class T, int LhsOrder, int RhsOrder, class FinishTile>
void packed_gemm(const PackedGemmPlan& plan, const T* a, Index lda, const T* b, Index ldb, T* c,
                 Index ldc, int team, FinishTile&& finish_tile) {
  packed_gemm<T, LhsOrder, RhsOrder>(plan, a, lda, b, ldb, c, ldc, team, finish_tile, 0,
                                     [](Index) {});
}

}  // namespace detail
}  // namespace linmaps
