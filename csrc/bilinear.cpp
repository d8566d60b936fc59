// Bilinear map kernels: z[k,l] = x1[k,:] A[l] x2[k,:]^T + b[l] and its gradients (spec
// section 4), computed with the matrix-product reformulation of spec section 4 ("method 2",
// all outputs at once; docs/kernels.md has the measurements behind the choice).
//
// Notation. One input, P (N x p), goes through the GEMMs; the other, Q (N x q), only through
// row dots and scalings. The weight is used as
//     What (p x L*q),  What[i, l*q + j] = A[l, i, j]   (P = x1, Q = x2)
//                     or A[l, j, i]                   (P = x2, Q = x1, "swapped"),
// read in place one output at a time, or for narrow outputs (q < 64) from a permuted copy
// made once per call (WeightColumns).
// We take p = max(in1, in2): the GEMM depth is then the longer input (better GEMM
// efficiency) and the intermediates, L*q wide per sample, the narrower.
//   forward:   T = P What  (N x Lq),   z[k,l] = sum_j T[k, lq+j] Q[k,j] + b[l]
//   backward:  W[k, lq+j] = dZ[k,l] Q[k,j]
//              dQ[k,j] = sum_l dZ[k,l] T[k, lq+j],   dP = W What^T,   dWhat = P^T W
// T and W are never formed for the whole batch: a block of rows_per_block samples times
// chunk_cols columns lives in a per-thread workspace of kBlockBytes (see kernels.hpp) --
// except when the caller asks the forward to keep T for the backward (KeptLayout below), which
// then does 4 units of N*L*p*q multiply-adds instead of 6.
//
// Why the kept T gives the backward the same bits as computing T again: T is produced in
// "T chunks" (a row block times a column chunk, for_each_t_chunk), the same partition in the
// forward and in the backward, each by the same gemm() call on the same operands into a
// contiguous block of the same alignment (a per-thread workspace, or its place in the kept
// buffer, 64-byte aligned). The product is a fixed sequence of packing and micro-kernel
// operations that depends only on the operand shapes, so each element of T comes out
// identical, and what the backward does with it (the dQ accumulation, in a fixed order) is
// the same code on the same values.
//
// Task grids (shape-only, see kernels.hpp for why that makes results thread-independent):
//   forward   tasks = (row block, group of whole outputs l); each task owns its z entries.
//   backward  stage 1, dP and dQ: tasks = (row block, group of outputs); each row block's
//             dP/dQ rows are sums over all outputs, so with more than one group the groups'
//             partial sums go to separate buffers and are added in group order afterwards.
//             stage 2, dWhat: tasks = column tiles of What; each sums over the whole batch
//             itself, row block after row block, so no batch sum is ever split.
#include <cstdint>
#include <optional>

#include "gemm.hpp"
#include "kernels.hpp"

namespace linmaps {
namespace {

using detail::ceil_div;
using detail::round_up;

// Samples per row block in the forward pass and backward stage 1. Every block repacks its
// What chunk for Eigen's GEBP kernel, so blocks must be tall enough to amortise that (the
// packing costs about 1/rows_per_block of the multiply: 16-row blocks measured 15-25% slower
// than 128-row ones); 128 rows x 512 float columns is the kBlockBytes workspace.
constexpr Index kRowsPerBlock = 128;
// Samples per step of the weight-gradient sum (stage 2): the depth of each GEMM into the
// accumulator, long enough that re-reading the accumulator (p x chunk) costs little.
constexpr Index kRowsPerWeightStep = 256;
// Weight-gradient steps of at most this many samples (batches this small) are summed as outer
// products, without the GEMM.
constexpr Index kOuterProductRows = 2;
// Bounds of the stage-2 column tile of What (its accumulator is p x tile).
constexpr Index kMinWeightTileCols = 96;
constexpr Index kMaxWeightTileCols = 480;
// The stage-2 tile count is rounded up to a multiple of this (so 2 or 4 threads get equal
// shares).
constexpr Index kWeightTilesMultiple = 4;
// Stage-1 partial sums (only used when the batch has fewer than kTargetTasks row blocks)
// never take more than this.
constexpr Index kMaxPartialBytes = Index(32) << 20;
// Outputs at least this wide are multiplied straight from the weight, one at a time (see
// WeightColumns); narrower ones several at a time from a permuted copy.
constexpr Index kDirectMinCols = 64;
// Weights with fewer elements than this are permuted on the calling thread.
constexpr Index kParallelPackElements = Index(1) << 16;

struct Plan {
  Index N = 0, L = 0, p = 0, q = 0;
  bool swapped = false;
  Index lq = 0;         // width of What
  bool direct = false;  // What columns read in place from the weight (see WeightColumns)
  bool serial = false;  // small enough for one thread: no task grid beyond the natural one

  Index rows_per_block = 1;  // forward / stage 1
  Index chunk_cols = 1;      // widest What chunk multiplied at once (workspace columns)
  Index row_blocks() const { return N == 0 ? 0 : ceil_div(N, rows_per_block); }

  Index outputs_per_group = 1;  // forward: whole outputs per task
  Index groups() const { return L == 0 ? 0 : ceil_div(L, outputs_per_group); }

  // The T chunks (see the top of this file): within each group of outputs, chunks of at
  // most t_chunk_cols columns that, in direct mode, never cross an output boundary. In
  // direct mode each output has chunks_per_output chunks; otherwise a chunk is a group.
  Index t_chunk_cols = 1;
  Index chunks_per_output = 1;
  Index t_chunks() const { return direct ? L * chunks_per_output : groups(); }
  Index t_chunk_index(Index c0) const {
    if (!direct) return c0 / (outputs_per_group * q);
    const Index l = c0 / q;
    return l * chunks_per_output + (c0 - l * q) / t_chunk_cols;
  }

  // Stage 2: What's columns cut into weight_tiles tiles of nearly equal width; tile t is
  // [weight_tile_begin(t), weight_tile_begin(t + 1)).
  Index weight_tiles = 0;
  Index weight_tile_max_cols = 1;
  Index weight_tile_begin(Index t) const {
    return detail::split_point(lq, weight_tiles, detail::kPanelMultiple, t);
  }
};

template <class T>
Plan make_plan(const BilinearShape& shape) {
  Plan plan;
  plan.N = shape.batch;
  plan.L = shape.out;
  plan.swapped = shape.in2 > shape.in1;
  plan.p = plan.swapped ? shape.in2 : shape.in1;
  plan.q = plan.swapped ? shape.in1 : shape.in2;
  plan.lq = detail::checked_mul(plan.L, plan.q);
  detail::checked_mul(plan.p, plan.lq);  // the permuted weight must be addressable

  plan.direct = plan.q >= kDirectMinCols;
  plan.rows_per_block = std::max<Index>(1, std::min(plan.N, kRowsPerBlock));
  const Index block_elements = detail::kBlockBytes / Index(sizeof(T));
  plan.chunk_cols = std::max<Index>(detail::kPanelMultiple, block_elements / plan.rows_per_block);

  // Whole outputs per task: as many as fit one chunk, fewer if that leaves fewer than
  // kTargetTasks tasks (the grid then also cuts across outputs).
  const Index q = std::max<Index>(plan.q, 1);
  plan.outputs_per_group = std::max<Index>(1, plan.chunk_cols / q);
  // A problem that runs on one thread (kSerialFlops) needs no more tasks than chunks.
  const Index blocks = std::max<Index>(plan.row_blocks(), 1);
  plan.serial = 2.0 * double(plan.N) * double(plan.L) * double(plan.p) * double(plan.q) <
                detail::kSerialFlops;
  if (!plan.serial && blocks < detail::kTargetTasks && plan.L > 0) {
    const Index groups_wanted = ceil_div(detail::kTargetTasks, blocks);
    plan.outputs_per_group =
        std::min(plan.outputs_per_group, std::max<Index>(1, ceil_div(plan.L, groups_wanted)));
  }

  plan.t_chunk_cols = std::min(plan.chunk_cols, std::max<Index>(plan.outputs_per_group * q, 1));
  plan.chunks_per_output = ceil_div(q, plan.t_chunk_cols);

  Index tile = block_elements / std::max<Index>(plan.p, 1);
  tile = std::clamp(tile, kMinWeightTileCols, kMaxWeightTileCols);
  if (!plan.serial) {
    tile =
        std::min(tile, round_up(ceil_div(plan.lq, detail::kTargetTasks), detail::kPanelMultiple));
  }
  tile = std::max<Index>(detail::kPanelMultiple, tile);
  // A tile count that is a multiple of kTilesMultiple, with tiles of (nearly) equal width:
  // 9 tiles for (256,64,64,64) (8 of 480 columns and one of 256) left one of 2 threads idle
  // for a ninth of stage 2, which then scaled 1.49x from 1 to 2 threads.
  Index tiles = plan.lq == 0 ? 0 : ceil_div(plan.lq, tile);
  if (tiles > 1) tiles = round_up(tiles, kWeightTilesMultiple);
  // At least a panel per tile, so that no tile is empty.
  tiles = std::min(tiles, std::max<Index>(1, plan.lq / detail::kPanelMultiple));
  plan.weight_tiles = tiles;
  for (Index t = 0; t < tiles; ++t) {
    plan.weight_tile_max_cols = std::max(plan.weight_tile_max_cols,
                                         plan.weight_tile_begin(t + 1) - plan.weight_tile_begin(t));
  }
  return plan;
}

// The columns of What, read either from a permuted copy or straight from the weight.
//
// A chunk of What that lies within one output l is just a block of A[l] (or of its
// transpose when swapped): Eigen packs it for its GEBP kernel directly, with no permuted
// copy. Permuting costs a pass over the weight per call, which shows when the batch is short
// (the weight is then a large part of the memory traffic). Measured (float32, 2 threads,
// docs/kernels.md): reading in place raised (64,512,512,8) forward from ~161 to ~189
// GFLOP/s, (64,128,128,64) from ~132 to ~178, and (256,64,64,64) forward+backward from ~121
// to ~174; for q < 64 one output is narrower than Eigen's 48-row panels would like and
// multiplying several outputs per chunk of the permuted copy is as fast or faster
// ((2048,128,16,64): 164 vs 152). Hence kDirectMinCols.
template <class T>
class WeightColumns {
 public:
  WeightColumns(const T* weight, const Plan& plan, int num_threads)
      : weight_(weight),
        p_(plan.p),
        q_(plan.q),
        lq_(plan.lq),
        swapped_(plan.swapped),
        direct_(plan.direct) {
    if (direct_) return;
    permuted_.resize(detail::checked_mul(p_, plan.lq));
    MatrixView<T> what(permuted_.data(), p_, plan.lq);
    const int team =
        permuted_.size() < kParallelPackElements ? 1 : detail::team_for(plan.L, num_threads);
    // Pure copies: the task split cannot affect results.
    detail::parallel_for(plan.L, team, [&](Index l, int) {
      const T* a = weight_ + l * p_ * q_;
      if (!swapped_) {  // A[l] is p x q: its rows are contiguous runs of What's rows
        // (row copies: Eigen's strided block assignment took 0.4 us more of a (4,32,24,8)
        // forward, whose weight is 6144 elements)
        for (Index i = 0; i < p_; ++i) {
          std::copy_n(a + i * q_, q_, permuted_.data() + i * lq_ + l * q_);
        }
      } else {
        what.middleCols(l * q_, q_) = ConstMatrixView<T>(a, q_, p_).transpose();  // q x p
      }
    });
  }

  // Calls fn(chunk) with chunk = What[:, c0 : c0 + width] (p x width) as an Eigen
  // expression. In direct mode the columns must lie within one output.
  template <class Fn>
  void with_chunk(Index c0, Index width, Fn&& fn) const {
    if (!direct_) {
      fn(ConstMatrixView<T>(permuted_.data(), p_, lq_).middleCols(c0, width));
      return;
    }
    const Index l = c0 / q_, j = c0 - l * q_;
    const T* a = weight_ + l * p_ * q_;
    if (!swapped_) {
      fn(ConstMatrixView<T>(a, p_, q_).middleCols(j, width));  // A[l] is p x q
    } else {
      fn(ConstMatrixView<T>(a, q_, p_).middleRows(j, width).transpose());  // A[l] is q x p
    }
  }

 private:
  const T* weight_;
  Index p_, q_, lq_;
  bool swapped_, direct_;
  Buffer<T> permuted_;
};

// Calls fn(c0, c1) for consecutive chunks [c0, c1) covering [begin, end), each at most
// `width` columns and, in direct mode, never crossing an output boundary. In increasing
// order, so accumulations over chunks have a fixed order.
template <class Fn>
void for_each_chunk(Index begin, Index end, Index width, Index q, bool direct, Fn&& fn) {
  Index c0 = begin;
  while (c0 < end) {
    Index c1 = std::min(end, c0 + width);
    if (direct) c1 = std::min(c1, (c0 / q + 1) * q);
    fn(c0, c1);
    c0 = c1;
  }
}

// Calls fn(c0, c1) for the T chunks of outputs [l0, l1), in increasing order; l0 and l1 are
// group boundaries (multiples of outputs_per_group, or L).
template <class Fn>
void for_each_t_chunk(const Plan& plan, Index l0, Index l1, Fn&& fn) {
  for (Index g0 = l0; g0 < l1; g0 += plan.outputs_per_group) {
    const Index g1 = std::min(l1, g0 + plan.outputs_per_group);
    for_each_chunk(g0 * plan.q, g1 * plan.q, plan.t_chunk_cols, plan.q, plan.direct, fn);
  }
}

// Where the forward keeps T for the backward: row block after row block, each block's T
// chunks one after another, every chunk a contiguous (rows x width) matrix starting on a
// 64-byte boundary like the per-thread workspaces (so that Eigen treats both alike).
template <class T>
class KeptLayout {
 public:
  static constexpr Index kAlign = 64 / Index(sizeof(T));

  static Index elements(const Plan& plan) {
    const Index blocks = plan.row_blocks();
    if (blocks == 0) return kAlign;
    const Index last_rows = plan.N - (blocks - 1) * plan.rows_per_block;
    return detail::checked_mul(blocks - 1, region(plan, plan.rows_per_block)) +
           region(plan, last_rows) + kAlign;  // + room to align the start
  }

  KeptLayout(const T* buffer, const Plan& plan)
      : base_(buffer +
              (kAlign - (reinterpret_cast<std::uintptr_t>(buffer) / sizeof(T)) % kAlign) % kAlign),
        plan_(plan),
        full_region_(region(plan, plan.rows_per_block)) {}

  // The T chunk of row block `block` (`rows` rows) that starts at column c0.
  T* chunk(Index block, Index rows, Index c0) const {
    return const_cast<T*>(base_) + block * full_region_ + round_up(rows * c0, kAlign) +
           kAlign * plan_.t_chunk_index(c0);
  }

 private:
  // Chunk i (from column c_i, width w_i) starts at round_up(rows c_i, A) + A i and ends
  // before rows c_i + A - 1 + A i + rows w_i < round_up(rows c_(i+1), A) + A (i + 1).
  static Index region(const Plan& plan, Index rows) {
    return round_up(detail::checked_mul(rows, plan.lq), kAlign) + kAlign * plan.t_chunks();
  }

  const T* base_;
  const Plan& plan_;
  Index full_region_;
};

// Calls fn(l, c_begin, j_begin, length) for every output l whose columns [l*q, (l+1)*q)
// meet [c0, c1): the overlap is What columns [c_begin, c_begin+length), i.e. Q columns
// [j_begin, j_begin+length). In increasing l, so sums over l have a fixed order.
template <class Fn>
void for_each_output_segment(Index c0, Index c1, Index q, Fn&& fn) {
  if (q == 0) return;
  for (Index l = c0 / q; l * q < c1; ++l) {
    const Index begin = std::max(c0, l * q), end = std::min(c1, (l + 1) * q);
    fn(l, begin, begin - l * q, end - begin);
  }
}

// W[k, c - c0] = dZ[k, l] Q[k, j] for c = l*q + j in [c0, c1) and the given rows.
template <class T, class GradBlock, class QBlock, class WBlock>
void fill_w(const GradBlock& dz, const QBlock& q_rows, Index c0, Index c1, Index q, WBlock& w) {
  for_each_output_segment(c0, c1, q, [&](Index l, Index c, Index j, Index len) {
    for (Index k = 0; k < w.rows(); ++k) {
      w.row(k).segment(c - c0, len) = dz(k, l) * q_rows.row(k).segment(j, len);
    }
  });
}

}  // namespace

template <class T>
Index bilinear_kept_elements(const BilinearShape& shape) {
  return KeptLayout<T>::elements(make_plan<T>(shape));
}

template <class T>
void bilinear_forward(const T* x1, const T* x2, const T* weight, const T* bias, T* z_data, T* kept,
                      const BilinearShape& shape, int num_threads) {
  const Plan plan = make_plan<T>(shape);
  const Index N = plan.N, L = plan.L, p = plan.p, q = plan.q;
  ConstMatrixView<T> P(plan.swapped ? x2 : x1, N, p);
  ConstMatrixView<T> Q(plan.swapped ? x1 : x2, N, q);
  MatrixView<T> z(z_data, N, L);

  const double flops = 2.0 * double(N) * double(L) * double(p) * double(q);
  const Index num_tasks = plan.row_blocks() * plan.groups();
  const int team = flops < detail::kSerialFlops ? 1 : detail::team_for(num_tasks, num_threads);

  const WeightColumns<T> what(weight, plan, team);
  std::optional<KeptLayout<T>> kept_t;
  if (kept != nullptr) kept_t.emplace(kept, plan);
  const detail::ThreadWorkspace<T> t_space(detail::kBlockSlot,
                                           kept ? 0 : plan.rows_per_block * plan.t_chunk_cols);

  detail::parallel_for(num_tasks, team, [&](Index task, int worker) {
    const Index block = task / plan.groups(), group = task % plan.groups();
    const Index k0 = block * plan.rows_per_block, rows = std::min(plan.rows_per_block, N - k0);
    const Index l0 = group * plan.outputs_per_group, l1 = std::min(L, l0 + plan.outputs_per_group);
    const auto p_rows = P.middleRows(k0, rows);
    const auto q_rows = Q.middleRows(k0, rows);
    auto z_block = z.block(k0, l0, rows, l1 - l0);
    if (q == 0 || p == 0) z_block.setZero();  // empty sums

    // Columns of What for outputs [l0, l1), a chunk at a time (several chunks per output
    // only when q > chunk_cols; then the row dots are summed chunk by chunk, in order).
    for_each_t_chunk(plan, l0, l1, [&](Index c0, Index c1) {
      if (detail::stop_requested()) return;
      MatrixView<T> t(kept_t ? kept_t->chunk(block, rows, c0) : t_space[worker], rows, c1 - c0);
      what.with_chunk(c0, c1 - c0,
                      [&](const auto& what_chunk) { detail::gemm(t, p_rows, what_chunk, false); });
      for_each_output_segment(c0, c1, q, [&](Index l, Index c, Index j, Index len) {
        const bool first = (c == l * q);
        for (Index k = 0; k < rows; ++k) {
          const T dot = t.row(k).segment(c - c0, len).dot(q_rows.row(k).segment(j, len));
          if (first) {
            z_block(k, l - l0) = dot;
          } else {
            z_block(k, l - l0) += dot;
          }
        }
      });
    });
    if (bias != nullptr) z_block.rowwise() += ConstRowVectorView<T>(bias + l0, l1 - l0);
  });
}

template <class T>
void bilinear_backward(const T* grad, const T* x1, const T* x2, const T* weight, const T* kept,
                       T* grad_x1, T* grad_x2, T* grad_weight, T* grad_bias, bool accumulate,
                       const BilinearShape& shape, int num_threads) {
  const Plan plan = make_plan<T>(shape);
  const Index N = plan.N, L = plan.L, p = plan.p, q = plan.q;
  ConstMatrixView<T> dz(grad, N, L);
  ConstMatrixView<T> P(plan.swapped ? x2 : x1, N, p);
  ConstMatrixView<T> Q(plan.swapped ? x1 : x2, N, q);
  T* grad_p = plan.swapped ? grad_x2 : grad_x1;
  T* grad_q = plan.swapped ? grad_x1 : grad_x2;

  // grad_bias: the batch summed in order k = 0, 1, ... (vectorised across outputs); added to
  // an accumulator at the end, once the call is committed.
  Buffer<T> bias_sum(accumulate && grad_bias != nullptr ? L : 0);
  if (grad_bias != nullptr) {
    RowVectorView<T> db(accumulate ? bias_sum.data() : grad_bias, L);
    db.setZero();
    for (Index k = 0; k < N; ++k) db += dz.row(k);
  }
  const auto add_bias = [&] {
    if (accumulate && grad_bias != nullptr && detail::commit_call()) {
      RowVectorView<T>(grad_bias, L) += ConstRowVectorView<T>(bias_sum.data(), L);
    }
  };
  if (grad_p == nullptr && grad_q == nullptr && grad_weight == nullptr) {
    add_bias();
    return;
  }

  // T is computed again only for dQ, and only when the forward did not keep it.
  std::optional<KeptLayout<T>> kept_t;
  if (kept != nullptr && grad_q != nullptr) kept_t.emplace(kept, plan);
  const bool compute_t = grad_q != nullptr && !kept_t;

  const double gemm_flops = 2.0 * double(N) * double(L) * double(p) * double(q);
  const double flops =
      gemm_flops * ((grad_p ? 1 : 0) + (compute_t ? 1 : 0) + (grad_weight ? 1 : 0)) +
      (kept_t ? double(N) * double(L) * double(q) * 2.0 : 0.0);
  const bool serial = flops < detail::kSerialFlops;

  // Only the stages that multiply by What build it (stage 2 and a kept T do not read it).
  std::optional<WeightColumns<T>> what;
  if (grad_p != nullptr || compute_t) what.emplace(weight, plan, serial ? 1 : num_threads);

  // Stage 1 (dP, dQ, per row block) and stage 2 (dWhat, per column tile) read the same inputs
  // and write different outputs: their tasks form one pool, so that the threads wait at one
  // barrier instead of two (a barrier costs most when another process holds a core).
  // ---- stage 1: dP = W What^T and dQ[k,j] = sum_l dZ[k,l] T[k,lq+j], per row block.
  const bool stage1 = L > 0 && (grad_p != nullptr || grad_q != nullptr);
  if (L == 0) {  // no outputs: both input gradients are empty sums
    if (grad_p != nullptr) MatrixView<T>(grad_p, N, p).setZero();
    if (grad_q != nullptr) MatrixView<T>(grad_q, N, q).setZero();
  }
  const Index blocks = plan.row_blocks();
  // Groups of outputs: 1 when there are enough row blocks, else enough groups for
  // kTargetTasks tasks, as long as the partial sums stay within kMaxPartialBytes. Whole
  // forward groups, so that the T chunks are the forward's.
  Index per_group = std::max<Index>(L, 1);
  Index groups = 1;
  if (stage1 && !plan.serial && blocks > 0 && blocks < detail::kTargetTasks) {
    const Index row_bytes =
        detail::checked_mul(detail::checked_mul(N, (grad_p ? p : 0) + (grad_q ? q : 0)), sizeof(T));
    Index wanted = std::min(ceil_div(detail::kTargetTasks, blocks), L);
    if (row_bytes > 0) wanted = std::min(wanted, 1 + kMaxPartialBytes / row_bytes);
    per_group = round_up(ceil_div(L, std::max<Index>(wanted, 1)), plan.outputs_per_group);
    groups = ceil_div(L, per_group);
  }
  // Group 0 writes straight into the outputs, group g > 0 into partial buffer g - 1.
  const Index extra = stage1 ? std::max<Index>(groups - 1, 0) : 0;
  Buffer<T> partial_p(grad_p ? extra * N * p : 0);
  Buffer<T> partial_q(grad_q ? extra * N * q : 0);

  const Index stage1_tasks = stage1 ? blocks * groups : 0;
  const Index block_elements = plan.rows_per_block * plan.t_chunk_cols;
  const detail::ThreadWorkspace<T> t_space(detail::kBlockSlot, compute_t ? block_elements : 0);
  const detail::ThreadWorkspace<T> w_space(detail::kSecondBlockSlot, grad_p ? block_elements : 0);

  auto stage1_task = [&](Index task, int worker) {
    const Index block = task / groups, group = task % groups;
    const Index k0 = block * plan.rows_per_block, rows = std::min(plan.rows_per_block, N - k0);
    const Index l0 = group * per_group, l1 = std::min(L, l0 + per_group);
    const auto p_rows = P.middleRows(k0, rows);
    const auto q_rows = Q.middleRows(k0, rows);
    const auto dz_rows = dz.middleRows(k0, rows);
    T* dp_base = group == 0 ? grad_p : partial_p.data() + (group - 1) * N * p;
    T* dq_base = group == 0 ? grad_q : partial_q.data() + (group - 1) * N * q;
    MatrixView<T> dp(grad_p ? dp_base + k0 * p : nullptr, grad_p ? rows : 0, p);
    MatrixView<T> dq(grad_q ? dq_base + k0 * q : nullptr, grad_q ? rows : 0, q);
    dp.setZero();
    dq.setZero();

    for_each_t_chunk(plan, l0, l1, [&](Index c0, Index c1) {
      if (detail::stop_requested()) return;
      const Index width = c1 - c0;
      if (grad_q != nullptr) {
        MatrixView<T> t(kept_t ? kept_t->chunk(block, rows, c0) : t_space[worker], rows, width);
        if (compute_t) {
          what->with_chunk(c0, width, [&](const auto& what_chunk) {
            detail::gemm(t, p_rows, what_chunk, false);
          });
        }
        for_each_output_segment(c0, c1, q, [&](Index l, Index c, Index j, Index len) {
          for (Index k = 0; k < rows; ++k) {
            dq.row(k).segment(j, len) += dz_rows(k, l) * t.row(k).segment(c - c0, len);
          }
        });
      }
      if (grad_p != nullptr) {
        MatrixView<T> w(w_space[worker], rows, width);
        fill_w<T>(dz_rows, q_rows, c0, c1, q, w);
        what->with_chunk(c0, width, [&](const auto& what_chunk) {
          detail::gemm(dp, w, what_chunk.transpose(), true);
        });
      }
    });
  };

  // ---- stage 2: dWhat = P^T W, one What column tile per task, summed over the whole batch.
  const Index stage2_tasks = grad_weight != nullptr ? plan.weight_tiles : 0;
  const Index tile_cols = plan.weight_tile_max_cols;
  const Index step_rows = std::max<Index>(1, std::min(N, kRowsPerWeightStep));
  const detail::ThreadWorkspace<T> acc_space(detail::kBlockSlot, p * tile_cols);
  const detail::ThreadWorkspace<T> w2_space(detail::kSecondBlockSlot, step_rows * tile_cols);

  auto stage2_task = [&](Index tile, int worker) {
    const Index c0 = plan.weight_tile_begin(tile), c1 = plan.weight_tile_begin(tile + 1);
    const Index width = c1 - c0;
    MatrixView<T> acc(acc_space[worker], p, width);
    if (N == 0) acc.setZero();  // empty batch sum
    for (Index k0 = 0; k0 < N; k0 += step_rows) {
      if (detail::stop_requested()) return;
      const Index rows = std::min(step_rows, N - k0);
      MatrixView<T> w(w2_space[worker], rows, width);
      fill_w<T>(dz.middleRows(k0, rows), Q.middleRows(k0, rows), c0, c1, q, w);
      if (rows <= kOuterProductRows) {
        // A sum of a few outer products: packing panels for the GEMM kernel would cost more
        // than the products (a (1,16,16,8) weight gradient took 1.3 us through the GEMM).
        for (Index i = 0; i < p; ++i) {
          auto acc_row = acc.row(i);
          for (Index k = 0; k < rows; ++k) {
            if (k0 == 0 && k == 0) {
              acc_row = P(k0, i) * w.row(0);
            } else {
              acc_row += P(k0 + k, i) * w.row(k);
            }
          }
        }
      } else {
        detail::gemm(acc, P.middleRows(k0, rows).transpose(), w, /*accumulate=*/k0 != 0);
      }
    }
    // Scatter the tile back to the (L, in1, in2) layout, or add it to the accumulator there
    // (straight from the tile: no whole gradient is ever formed).
    if (accumulate && !detail::commit_call()) return;
    for_each_output_segment(c0, c1, q, [&](Index l, Index c, Index j, Index len) {
      if (!plan.swapped) {  // dA[l] is p x q
        auto dst = MatrixView<T>(grad_weight + l * p * q, p, q).middleCols(j, len);
        if (accumulate) {
          dst += acc.middleCols(c - c0, len);
        } else {
          dst = acc.middleCols(c - c0, len);
        }
      } else {  // dA[l] is q x p
        auto dst = MatrixView<T>(grad_weight + l * p * q, q, p).middleRows(j, len);
        if (accumulate) {
          dst += acc.middleCols(c - c0, len).transpose();
        } else {
          dst = acc.middleCols(c - c0, len).transpose();
        }
      }
    });
  };

  const Index tasks = stage1_tasks + stage2_tasks;
  const int team = serial ? 1 : detail::team_for(tasks, num_threads);
  detail::parallel_for(tasks, team, [&](Index task, int worker) {
    if (task < stage1_tasks) {
      stage1_task(task, worker);
    } else {
      stage2_task(task - stage1_tasks, worker);
    }
  });

  if (extra > 0) {
    // Add the groups' partial sums in group order, row block by row block.
    detail::parallel_for(
        blocks, serial ? 1 : detail::team_for(blocks, num_threads), [&](Index block, int) {
          const Index k0 = block * plan.rows_per_block;
          const Index rows = std::min(plan.rows_per_block, N - k0);
          for (Index g = 1; g < groups; ++g) {
            if (grad_p != nullptr) {
              MatrixView<T>(grad_p + k0 * p, rows, p) +=
                  ConstMatrixView<T>(partial_p.data() + (g - 1) * N * p + k0 * p, rows, p);
            }
            if (grad_q != nullptr) {
              MatrixView<T>(grad_q + k0 * q, rows, q) +=
                  ConstMatrixView<T>(partial_q.data() + (g - 1) * N * q + k0 * q, rows, q);
            }
          }
        });
  }
  add_bias();
}

template Index bilinear_kept_elements<float>(const BilinearShape&);
template Index bilinear_kept_elements<double>(const BilinearShape&);
template void bilinear_forward<float>(const float*, const float*, const float*, const float*,
                                      float*, float*, const BilinearShape&, int);
template void bilinear_forward<double>(const double*, const double*, const double*, const double*,
                                       double*, double*, const BilinearShape&, int);
template void bilinear_backward<float>(const float*, const float*, const float*, const float*,
                                       const float*, float*, float*, float*, float*, bool,
                                       const BilinearShape&, int);
template void bilinear_backward<double>(const double*, const double*, const double*, const double*,
                                        const double*, double*, double*, double*, double*, bool,
                                        const BilinearShape&, int);

}  // namespace linmaps
