// Linear map kernels: y = x weight^T + bias and its gradients (spec section 2).
//
// Each output is cut into a fixed grid of tiles (a function of the shape only, see
// plan_tiles); a tile is one Eigen GEMM over the full summed dimension, so no sum is ever
// split differently for different thread counts. The one exception is the weight gradient
// of a small weight with a long batch: there the batch is cut into a fixed number of chunks
// whose partial sums are added in chunk order afterwards (still shape-only).
#include "gemm.hpp"
#include "kernels.hpp"

#include <optional>
#include <vector>

namespace linmaps {
namespace {

using detail::ceil_div;
using detail::round_up;

// Tile limits for one output. Eigen's GEMM runs faster on bigger tiles (each tile packs its
// own operand panels, and small tiles sit in Eigen's less efficient edge paths): measured
// single-threaded, float32, depth 1024: a 256 x 240 tile ran at 81 GFLOP/s, 256 x 480 at
// 107, the whole 4096 x 1024 x 1024 product at 100. So tiles start at max_rows x max_cols
// and are only cut further (down to min_rows x min_cols) until the grid has `target` tiles.
struct TileLimits {
  Index max_rows, max_cols, min_rows, min_cols, target;
};
// Tiles asked for per output. Fewer than the kTargetTasks of kernels.hpp: a linear map's
// outputs are single GEMMs, and for them tile efficiency beat finer balancing. Measured,
// float32, 2 threads: (256,512,512) forward 135-143 GFLOP/s with 8 tiles, 152-179 with 4;
// backward 148 with 8 grad_x tiles, 192 with 4 (grad_x and grad_weight tiles share one task
// pool, so the backward has 8 tasks anyway). 4 also divides evenly among 2 or 4 threads.
constexpr Index kLinearTiles = 4;
// Outputs whose depth is an input width (y, grad_x): at most 256 x 480 (10 GEBP panels).
constexpr TileLimits kOutputTiles{256, 480, 64, 96, kLinearTiles};
// grad_weight, whose depth is the whole batch: bigger tiles (a 1024 x 1024 gradient over a
// 4096 batch: 88 GFLOP/s in 256 x 384 tiles, 95 in 512 x 512, 100 in one piece). When the
// gradient is too small for kLinearTiles tiles, the batch is cut into chunks instead.
constexpr TileLimits kWeightTiles{512, 1008, 128, 128, kLinearTiles};

// The batch is split for the weight gradient only into chunks of at least this many rows,
// and only while the partial sums fit kMaxPartialBytes.
constexpr Index kMinBatchChunk = 1024;
constexpr Index kMaxPartialBytes = Index(16) << 20;

// Columns of grad summed per grad_bias task.
constexpr Index kBiasChunk = 1024;

constexpr Index kRowGranule = 16;

// A row-major output cut into row_count x col_count tiles of nearly equal size; column
// boundaries on multiples of the GEBP panel (Eigen evaluates a row-major product as the
// transposed column-major one, so our columns are its micro-kernel's rows), row boundaries
// on multiples of 16.
struct TileGrid {
  Index rows = 0, cols = 0;  // the output being tiled
  Index row_count = 0, col_count = 0;
  Index size() const { return row_count * col_count; }
  Index row0(Index tile) const {
    return detail::split_point(rows, row_count, kRowGranule, tile / col_count);
  }
  Index col0(Index tile) const {
    return detail::split_point(cols, col_count, detail::kPanelMultiple, tile % col_count);
  }
  Index nrows(Index tile) const {
    return detail::split_point(rows, row_count, kRowGranule, tile / col_count + 1) - row0(tile);
  }
  Index ncols(Index tile) const {
    return detail::split_point(cols, col_count, detail::kPanelMultiple, tile % col_count + 1) -
           col0(tile);
  }
};

// Tiles of about equal size: `count` tiles over `extent`, rounded up to `granule`.
Index balanced_tile(Index extent, Index count, Index granule) {
  return std::max<Index>(1, std::min(extent, round_up(ceil_div(extent, count), granule)));
}

// Tile a rows x cols row-major output: start from tiles of at most max_rows x max_cols,
// then cut the larger side into twice as many tiles until there are `target` tiles or the
// tiles reach their minimum size. Column tiles are multiples of the GEBP panel (Eigen
// evaluates a row-major product as the transposed column-major one, so our columns are its
// micro-kernel's rows); row tiles multiples of 16.
TileGrid plan_tiles(Index rows, Index cols, const TileLimits& limits) {
  TileGrid grid;
  grid.rows = rows;
  grid.cols = cols;
  if (rows == 0 || cols == 0) return grid;
  Index row_count = std::max<Index>(1, ceil_div(rows, limits.max_rows));
  Index col_count = std::max<Index>(1, ceil_div(cols, limits.max_cols));
  Index tile_rows = balanced_tile(rows, row_count, kRowGranule);
  Index tile_cols = balanced_tile(cols, col_count, detail::kPanelMultiple);
  while (ceil_div(rows, tile_rows) * ceil_div(cols, tile_cols) < limits.target) {
    const Index split_cols = balanced_tile(cols, 2 * col_count, detail::kPanelMultiple);
    const Index split_rows = balanced_tile(rows, 2 * row_count, kRowGranule);
    const bool can_split_cols = split_cols >= limits.min_cols && split_cols < tile_cols;
    const bool can_split_rows = split_rows >= limits.min_rows && split_rows < tile_rows;
    if (can_split_cols && (tile_cols >= tile_rows || !can_split_rows)) {
      col_count *= 2;
      tile_cols = split_cols;
    } else if (can_split_rows) {
      row_count *= 2;
      tile_rows = split_rows;
    } else {
      break;
    }
  }
  // At most one tile per granule, so that no tile is empty.
  const Index max_row_count = std::max<Index>(1, rows / kRowGranule);
  const Index max_col_count = std::max<Index>(1, cols / detail::kPanelMultiple);
  grid.row_count = std::min(ceil_div(rows, tile_rows), max_row_count);
  grid.col_count = std::min(ceil_div(cols, tile_cols), max_col_count);
  // A tile count that is a multiple of kLinearTiles, so that 2 or 4 threads get equal
  // shares: (64,4096,4096) had 9 output tiles (8 x 480 columns + 256), and one of 2 threads
  // ran a sixth longer than the other.
  if (grid.size() > 1) {
    for (Index extra = 0; extra < kLinearTiles && grid.size() % kLinearTiles != 0; ++extra) {
      if (grid.col_count + 1 <= max_col_count) {
        ++grid.col_count;
      } else if (grid.row_count + 1 <= max_row_count) {
        ++grid.row_count;
      } else {
        break;
      }
    }
  }
  return grid;
}

double gemm_flops(Index a, Index b, Index c) {
  return 2.0 * static_cast<double>(a) * static_cast<double>(b) * static_cast<double>(c);
}

// The products with a long output (at least 256 rows: the forward and grad_x of a batch of
// 256 or more, grad_weight of a weight with 256 or more outputs) run with their other
// operand packed once and shared (detail::PackedLhsProduct), in tasks of rows of the output:
// kTargetTasks tasks of 32-128 rows (multiples of 16), or more tasks of 128 rows. A 128-row
// block of the output's own operand, packed, is kc x 128 (kc ~ 520 floats: 266 KiB) and
// stays in L2 while the micro-kernel streams the shared panels past it. Shorter outputs use
// tiles. Measured against 128-row tasks only (float32, 2 threads, medians of 15 alternating
// rounds in one process): (512,256,256) grad_x 0.49 -> 0.34 ms, forward 0.41 -> 0.34 ms;
// (256,512,512) backward 1.41 -> 1.36 ms; no shape slower.
constexpr Index kSharedRows = 128;
constexpr Index kMinSharedRows = 32;
// Forward tiles (batches shorter than 256) computed column-major: see linear_forward.
constexpr Index kColumnMajorMaxRows = 64;
constexpr Index kColumnMajorMinWeightBytes = Index(2) << 20;

bool use_packed_product(Index out_rows, Index out_cols, Index depth) {
  return out_rows >= detail::kTargetTasks * kMinSharedRows && out_cols > 0 && depth > 0;
}

// Rows per task of a packed product with out_rows rows of output.
Index packed_task_rows(Index out_rows) {
  return std::clamp(round_up(ceil_div(out_rows, detail::kTargetTasks), 16), kMinSharedRows,
                    kSharedRows);
}

// Runs packed products (detail::PackedLhsProduct; null ones are skipped) together, pass by
// pass: one parallel region packs every product's operand for the pass, the next runs every
// product's row tasks for it, so two products wait at two barriers per pass instead of four.
// Each product adds its own depth blocks in order, as it would alone. `extra` more tasks,
// extra_task(i), join the last region (the only region when there is no product).
template <class Extra, class... Products>
void run_packed(bool serial, int num_threads, Index extra, Extra&& extra_task,
                const Products*... products) {
  Index passes = 1;
  ((products ? passes = std::max(passes, products->passes()) : 0), ...);
  for (Index pass = 0; pass < passes; ++pass) {
    auto count = [&](const auto* product, bool packing) {
      if (product == nullptr || pass >= product->passes()) return Index(0);
      return packing ? product->pack_tasks(pass) : product->tasks();
    };
    // Task `task` of a region: a product's task, or else extra task (task - their tasks).
    auto run_task = [&](Index task, bool packing) {
      bool done = false;
      auto try_product = [&](const auto* product) {
        const Index n = done ? 0 : count(product, packing);
        if (task >= n) {
          task -= n;
          return;
        }
        if (packing) {
          product->pack(pass, task);
        } else {
          product->multiply(pass, task);
        }
        done = true;
      };
      (try_product(products), ...);
      if (!done) extra_task(task);
    };
    const Index pack_tasks = (Index(0) + ... + count(products, true));
    detail::parallel_for(pack_tasks, serial ? 1 : detail::team_for(pack_tasks, num_threads),
                         [&](Index task, int) { run_task(task, true); });
    const Index tasks =
        (Index(0) + ... + count(products, false)) + (pass + 1 == passes ? extra : 0);
    detail::parallel_for(tasks, serial ? 1 : detail::team_for(tasks, num_threads),
                         [&](Index task, int) { run_task(task, false); });
  }
}

}  // namespace

template <class T>
void linear_forward(const T* x_data, const T* weight_data, const T* bias_data, T* y_data,
                    const LinearShape& shape, int num_threads) {
  const Index N = shape.batch, n = shape.in, m = shape.out;
  ConstMatrixView<T> x(x_data, N, n);
  ConstMatrixView<T> weight(weight_data, m, n);
  MatrixView<T> y(y_data, N, m);

  const bool serial = gemm_flops(N, m, n) < detail::kSerialFlops;

  // y starts as the bias (or zero) and the product accumulates into it, as PyTorch's addmm
  // does: one pass over y fewer than adding the bias afterwards.
  if (use_packed_product(N, m, n)) {
    // A = weight (m x n, row-major), B = x.
    const detail::PackedLhsProduct<T, Eigen::RowMajor, Eigen::ColMajor> product(
        weight_data, n, x_data, n, y_data, bias_data, N, m, n, packed_task_rows(N));
    run_packed(serial, num_threads, 0, [](Index) {}, &product);
    return;
  }

  const TileGrid grid = plan_tiles(N, m, kOutputTiles);
  const int team = serial ? 1 : detail::team_for(grid.size(), num_threads);
  // A row-major tile is Eigen's column-major product weight x^T, whose left operand (the
  // weight) Eigen packs 48 rows at a time: 48 streams through memory at once, which the
  // prefetchers do not keep up with once the weight comes from L3 or DRAM. As the right
  // operand of x w^T (a column-major tile in scratch, copied into y after), the weight is
  // packed 4 rows at a time. That pays where the weight dominates: short tiles, or a weight
  // bigger than L2. Measured (float32, 2 threads, ms, row-major -> column-major tiles):
  // (64,4096,4096) 16.0 -> 12.8, (8,2048,2048) 1.24 -> 0.72, (128,2048,2048) 6.3 -> 6.1;
  // (128,512,512), 1 MiB of weight, 0.36 -> 0.37, so it keeps row-major tiles.
  const bool column_major_tiles =
      N <= kColumnMajorMaxRows ||
      detail::checked_mul(m, n) * Index(sizeof(T)) > kColumnMajorMinWeightBytes;
  detail::parallel_for(grid.size(), team, [&](Index tile, int) {
    const Index r0 = grid.row0(tile), c0 = grid.col0(tile);
    const Index rows = grid.nrows(tile), cols = grid.ncols(tile);
    if (column_major_tiles) {
      // The tile as the column-major product x w^T (weight = right operand), then copied.
      T* scratch = detail::thread_scratch<T>(detail::kBlockSlot, rows * cols);
      ColumnMajorView<T> tile_t(scratch, rows, cols);
      detail::gemm(tile_t, x.middleRows(r0, rows), weight.middleRows(c0, cols).transpose(), false);
      if (bias_data != nullptr) {
        y.block(r0, c0, rows, cols) =
            tile_t.rowwise() + ConstRowVectorView<T>(bias_data + c0, cols);
      } else {
        y.block(r0, c0, rows, cols) = tile_t;
      }
      return;
    }
    auto y_tile = y.block(r0, c0, rows, cols);
    if (bias_data != nullptr) {
      y_tile.rowwise() = ConstRowVectorView<T>(bias_data + c0, cols);
    } else {
      y_tile.setZero();
    }
    // Empty depth (n == 0): nothing is added, y is the bias (the empty sum is zero).
    detail::gemm(y_tile, x.middleRows(r0, rows), weight.middleRows(c0, cols).transpose(), true);
  });
}

template <class T>
void linear_backward(const T* grad_data, const T* x_data, const T* weight_data, T* grad_x_data,
                     T* grad_weight_data, T* grad_bias_data, const LinearShape& shape,
                     int num_threads) {
  const Index N = shape.batch, n = shape.in, m = shape.out;
  ConstMatrixView<T> grad(grad_data, N, m);
  ConstMatrixView<T> x(x_data, N, n);
  ConstMatrixView<T> weight(weight_data, m, n);

  // grad_x = grad weight (N x n, depth m) and grad_weight = grad^T x (m x n, depth N): each
  // either a packed product in tasks of output rows (a long output, see kMinSharedRows) or
  // output tiles. The tiles and the grad_bias tasks form one pool of tasks.
  const bool packed_x = grad_x_data != nullptr && use_packed_product(N, n, m);
  const bool packed_w = grad_weight_data != nullptr && use_packed_product(m, n, N);
  const TileGrid x_grid = grad_x_data && !packed_x ? plan_tiles(N, n, kOutputTiles) : TileGrid{};

  // Tiled grad_weight: tiles of the (m, n) output over the whole batch. When the weight is
  // too small to give kLinearTiles tiles, the batch is also split into a fixed number of
  // chunks (for kLinearTiles tasks in all): chunk 0 writes into grad_weight, the others into
  // partial buffers that are added in chunk order afterwards.
  TileGrid w_grid;
  Index chunks = 1, chunk_rows = N;
  if (grad_weight_data != nullptr && !packed_w) {
    w_grid = plan_tiles(m, n, kWeightTiles);
    const Index tiles = std::max<Index>(w_grid.size(), 1);
    if (tiles < kLinearTiles && N >= 2 * kMinBatchChunk) {
      const Index partial_bytes = std::max<Index>(detail::checked_mul(m * n, sizeof(T)), 1);
      Index wanted = ceil_div(kLinearTiles, tiles);
      wanted = std::min({wanted, N / kMinBatchChunk, 1 + kMaxPartialBytes / partial_bytes});
      if (wanted > 1) {
        chunk_rows = round_up(ceil_div(N, wanted), 16);
        chunks = ceil_div(N, chunk_rows);
      }
    }
  }
  Buffer<T> partials(chunks > 1 ? (chunks - 1) * m * n : 0);

  const Index bias_tasks = grad_bias_data ? ceil_div(m, kBiasChunk) : 0;
  const Index w_tasks = chunks * w_grid.size();
  const Index x_tasks = x_grid.size();
  const Index pool_tasks = w_tasks + x_tasks + bias_tasks;

  double flops = 0;
  if (grad_x_data) flops += gemm_flops(N, n, m);
  if (grad_weight_data) flops += gemm_flops(m, n, N);
  const bool serial = flops < detail::kSerialFlops;

  auto pool_task = [&](Index task) {
    if (task < w_tasks) {
      const Index chunk = task / w_grid.size(), tile = task % w_grid.size();
      const Index k0 = chunk * chunk_rows, rows = std::min(chunk_rows, N - k0);
      T* out = chunk == 0 ? grad_weight_data : partials.data() + (chunk - 1) * m * n;
      MatrixView<T> dw(out, m, n);
      const Index r0 = w_grid.row0(tile), c0 = w_grid.col0(tile);
      const Index nr = w_grid.nrows(tile), nc = w_grid.ncols(tile);
      // N == 0: the product with empty depth assigns zeros (an empty sum).
      detail::gemm(dw.block(r0, c0, nr, nc), grad.block(k0, r0, rows, nr).transpose(),
                   x.block(k0, c0, rows, nc), false);
      return;
    }
    task -= w_tasks;
    if (task < x_tasks) {
      MatrixView<T> dx(grad_x_data, N, n);
      const Index r0 = x_grid.row0(task), c0 = x_grid.col0(task);
      const Index nr = x_grid.nrows(task), nc = x_grid.ncols(task);
      detail::gemm(dx.block(r0, c0, nr, nc), grad.middleRows(r0, nr), weight.middleCols(c0, nc),
                   false);
      return;
    }
    task -= x_tasks;
    // grad_bias: the batch summed in order k = 0, 1, ..., whole rows at a time (vectorised
    // across columns, fixed order).
    const Index c0 = task * kBiasChunk, nc = std::min(kBiasChunk, m - c0);
    RowVectorView<T> db(grad_bias_data + c0, nc);
    db.setZero();
    for (Index k = 0; k < N; ++k) db += grad.row(k).segment(c0, nc);
  };

  // The packed products run together (each with its own packed buffer); the pool joins
  // their last region.
  // grad_x: A(i, k) = weight[k, i] (the weight read column-major), B = grad.
  std::optional<detail::PackedLhsProduct<T, Eigen::ColMajor, Eigen::ColMajor>> x_product;
  // grad_weight: A(i, k) = x[k, i] (x read column-major), B(r, k) = grad[k, r].
  std::optional<detail::PackedLhsProduct<T, Eigen::ColMajor, Eigen::RowMajor>> w_product;
  if (packed_x) {
    x_product.emplace(weight_data, n, grad_data, m, grad_x_data, nullptr, N, n, m,
                      packed_task_rows(N));
  }
  if (packed_w) {
    w_product.emplace(x_data, n, grad_data, m, grad_weight_data, nullptr, m, n, N,
                      packed_task_rows(m), detail::kSecondSharedLhsSlot);
  }
  run_packed(serial, num_threads, pool_tasks, pool_task, x_product ? &*x_product : nullptr,
             w_product ? &*w_product : nullptr);

  if (chunks > 1) {
    // Add the batch chunks' partial weight gradients in chunk order, tile by tile.
    detail::parallel_for(w_grid.size(), serial ? 1 : detail::team_for(w_grid.size(), num_threads),
                         [&](Index tile, int) {
                           MatrixView<T> dw(grad_weight_data, m, n);
                           const Index r0 = w_grid.row0(tile), c0 = w_grid.col0(tile);
                           const Index nr = w_grid.nrows(tile), nc = w_grid.ncols(tile);
                           for (Index chunk = 1; chunk < chunks; ++chunk) {
                             ConstMatrixView<T> part(partials.data() + (chunk - 1) * m * n, m, n);
                             dw.block(r0, c0, nr, nc) += part.block(r0, c0, nr, nc);
                           }
                         });
  }
}

template void linear_forward<float>(const float*, const float*, const float*, float*,
                                    const LinearShape&, int);
template void linear_forward<double>(const double*, const double*, const double*, double*,
                                     const LinearShape&, int);
template void linear_backward<float>(const float*, const float*, const float*, float*, float*,
                                     float*, const LinearShape&, int);
template void linear_backward<double>(const double*, const double*, const double*, double*, double*,
                                      double*, const LinearShape&, int);

}  // namespace linmaps
