// All-pairs bilinear map kernels (biaffine scores):
//     S[b, i, j, o] = sum_{a,c} x1[b, i, a] W[o, a, c] x2[b, j, c] + bias[o]
// and its gradients, for every row i of x1[b] against every row j of x2[b].
//
// Notation. Wf (out*in1 x in2) is the weight read as one matrix, rows (o, a): no copy.
// Per batch entry b, with X1 = x1[b] (I x in1), X2 = x2[b] (J x in2), G = dS[b] (I x J*out):
//   V  = X2 Wf^T                 (J x out*in1, read as J*out x in1, rows (j, o))
//   S[b] = X1 V^T                (I x J*out: the output layout (i, j, o) as it is)
//   dX1 = G V,   dV = G^T X1,    dX2 = dV Wf  (dV read as J x out*in1)
//   dWf = sum_b dV^T X2          (dV read as J x out*in1)
// Every step is a plain matrix product (gemm.hpp). V and dV are never formed for a whole
// batch entry at once: the rows j of X2 are taken in blocks of rows_j, so that a block of V
// (rows_j x out*in1) fits kPairsBlockBytes, in a per-thread workspace.
//
// Task grids (shape-only, see kernels.hpp for why that makes results thread-independent):
//   forward    tasks = (batch entry, j block); each task owns its S entries.
//   backward   stage 1, dX1 and dX2: tasks = batch entries; dX1 is summed over the j blocks
//              in order inside the task.
//              stage 2, dW: tasks = tiles of in1 (the a index of W[o, a, c]); each task sums
//              its tile over the whole batch itself, entry after entry and j block after j
//              block, from its own columns of dV (G^T X1[:, tile], computed again: a tile's
//              columns of dV are all it needs, so the tiles together compute dV once more).
//              No batch sum is ever split between tasks.
#include <algorithm>

#include "gemm.hpp"
#include "kernels.hpp"

namespace linmaps {
namespace {

using detail::ceil_div;

template <class T>
using StridedMatrixView = Eigen::Map<RowMajorMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMatrixView = Eigen::Map<const RowMajorMatrix<T>, 0, Eigen::OuterStride<>>;

// Budget for one per-thread block (a block of V or dV, or a weight-gradient tile's
// accumulator). It bounds the extra memory of a call at a few such blocks per thread whatever
// the batch and sentence lengths, and is large enough that each block is a matrix product of
// a useful size.
constexpr Index kPairsBlockBytes = Index(4) << 20;

struct PairsPlan {
  Index B = 0, I = 0, J = 0, in1 = 0, in2 = 0, out = 0;
  Index oi = 0;         // out * in1: the width of V's rows (j)
  Index rows_j = 1;     // rows of X2 per block
  Index j_blocks = 0;   // blocks per batch entry
  Index a_tiles = 0;    // stage-2 tiles of in1
  bool serial = false;  // small enough for one thread
  Index a_tile_begin(Index t) const { return detail::split_point(in1, a_tiles, 1, t); }
};

template <class T>
PairsPlan make_pairs_plan(const PairsShape& shape) {
  PairsPlan plan;
  plan.B = shape.batch;
  plan.I = shape.rows1;
  plan.J = shape.rows2;
  plan.in1 = shape.in1;
  plan.in2 = shape.in2;
  plan.out = shape.out;
  plan.oi = detail::checked_mul(plan.out, plan.in1);
  detail::checked_mul(plan.oi, plan.in2);  // the weight must be addressable
  const Index block_elements = kPairsBlockBytes / Index(sizeof(T));
  plan.rows_j = std::clamp<Index>(block_elements / std::max<Index>(plan.oi, 1), 1,
                                  std::max<Index>(plan.J, 1));
  plan.j_blocks = plan.J == 0 ? 0 : ceil_div(plan.J, plan.rows_j);
  const double flops =
      2.0 * double(plan.B) * double(plan.J) * double(plan.oi) * (double(plan.in2) + double(plan.I));
  plan.serial = flops < detail::kSerialFlops;
  // Stage 2: enough tiles for kTargetTasks tasks when worth it, and tiles narrow enough that
  // the accumulator (out * tile x in2) fits the block budget (at least one column each).
  Index tiles = plan.serial ? 1 : detail::kTargetTasks;
  const Index max_tile = std::max<Index>(
      1, block_elements / std::max<Index>(detail::checked_mul(plan.out, plan.in2), 1));
  tiles = std::max(tiles, ceil_div(plan.in1, max_tile));
  plan.a_tiles = std::min(tiles, plan.in1);
  return plan;
}

}  // namespace

template <class T>
void bilinear_pairs_forward(const T* x1, const T* x2, const T* weight, const T* bias, T* s,
                            const PairsShape& shape, int num_threads) {
  const PairsPlan plan = make_pairs_plan<T>(shape);
  const Index I = plan.I, J = plan.J, in1 = plan.in1, in2 = plan.in2, out = plan.out;
  const Index oi = plan.oi;
  const Index tasks = plan.B * plan.j_blocks;
  if (tasks == 0) return;
  const ConstMatrixView<T> wf(weight, oi, in2);
  const detail::ThreadWorkspace<T> v_space(detail::kBlockSlot, plan.rows_j * oi);
  const int team = plan.serial ? 1 : detail::team_for(tasks, num_threads);
  detail::parallel_for(tasks, team, [&](Index task, int worker) {
    const Index b = task / plan.j_blocks, j0 = (task % plan.j_blocks) * plan.rows_j;
    const Index nj = std::min(plan.rows_j, J - j0);
    T* v_data = v_space[worker];
    MatrixView<T> v(v_data, nj, oi);
    detail::gemm(v, ConstMatrixView<T>(x2 + (b * J + j0) * in2, nj, in2), wf.transpose(), false);
    StridedMatrixView<T> s_block(s + b * I * J * out + j0 * out, I, nj * out,
                                 Eigen::OuterStride<>(J * out));
    detail::gemm(s_block, ConstMatrixView<T>(x1 + b * I * in1, I, in1),
                 ConstMatrixView<T>(v_data, nj * out, in1).transpose(), false);
    if (bias != nullptr && out > 0) {
      const ConstRowVectorView<T> bias_row(bias, out);
      for (Index i = 0; i < I; ++i) {
        for (Index j = 0; j < nj; ++j) {
          RowVectorView<T>(s_block.row(i).data() + j * out, out) += bias_row;
        }
      }
    }
  });
}

template <class T>
void bilinear_pairs_backward(const T* grad, const T* x1, const T* x2, const T* weight, T* grad_x1,
                             T* grad_x2, T* grad_weight, T* grad_bias, const PairsShape& shape,
                             int num_threads) {
  const PairsPlan plan = make_pairs_plan<T>(shape);
  const Index B = plan.B, I = plan.I, J = plan.J, in1 = plan.in1, in2 = plan.in2, out = plan.out;
  const Index oi = plan.oi;
  const ConstMatrixView<T> wf(weight, oi, in2);
  // G[b] restricted to the j block [j0, j0 + nj): I x nj*out, rows J*out apart.
  const auto grad_block = [&](Index b, Index j0, Index nj) {
    return ConstStridedMatrixView<T>(grad + b * I * J * out + j0 * out, I, nj * out,
                                     Eigen::OuterStride<>(J * out));
  };

  if (grad_x1 != nullptr || grad_x2 != nullptr) {
    const detail::ThreadWorkspace<T> v_space(detail::kBlockSlot, plan.rows_j * oi);
    const detail::ThreadWorkspace<T> dv_space(detail::kSecondBlockSlot, plan.rows_j * oi);
    const int team = plan.serial ? 1 : detail::team_for(B, num_threads);
    detail::parallel_for(B, team, [&](Index b, int worker) {
      const ConstMatrixView<T> x1_b(x1 + b * I * in1, I, in1);
      T* const dx1_data = grad_x1 != nullptr ? grad_x1 + b * I * in1 : nullptr;
      MatrixView<T> dx1_b(dx1_data, dx1_data != nullptr ? I : 0, in1);
      dx1_b.setZero();
      for (Index j0 = 0; j0 < J; j0 += plan.rows_j) {
        if (detail::stop_requested()) return;
        const Index nj = std::min(plan.rows_j, J - j0);
        const auto g = grad_block(b, j0, nj);
        const ConstMatrixView<T> x2_block(x2 + (b * J + j0) * in2, nj, in2);
        if (grad_x1 != nullptr) {
          T* v_data = v_space[worker];
          detail::gemm(MatrixView<T>(v_data, nj, oi), x2_block, wf.transpose(), false);
          detail::gemm(dx1_b, g, ConstMatrixView<T>(v_data, nj * out, in1), true);
        }
        if (grad_x2 != nullptr) {
          T* dv_data = dv_space[worker];
          detail::gemm(MatrixView<T>(dv_data, nj * out, in1), g.transpose(), x1_b, false);
          detail::gemm(MatrixView<T>(grad_x2 + (b * J + j0) * in2, nj, in2),
                       ConstMatrixView<T>(dv_data, nj, oi), wf, false);
        }
      }
    });
  }

  if (grad_weight != nullptr) {
    Index widest = 0;
    for (Index t = 0; t < plan.a_tiles; ++t) {
      widest = std::max(widest, plan.a_tile_begin(t + 1) - plan.a_tile_begin(t));
    }
    const detail::ThreadWorkspace<T> dv_space(detail::kBlockSlot, plan.rows_j * out * widest);
    const detail::ThreadWorkspace<T> acc_space(detail::kSecondBlockSlot,
                                               detail::checked_mul(out * widest, in2));
    const int team = plan.serial ? 1 : detail::team_for(plan.a_tiles, num_threads);
    detail::parallel_for(plan.a_tiles, team, [&](Index t, int worker) {
      const Index a0 = plan.a_tile_begin(t), width = plan.a_tile_begin(t + 1) - a0;
      // acc[(o, a - a0), c] = dW[o, a, c] for the tile's a.
      MatrixView<T> acc(acc_space[worker], out * width, in2);
      acc.setZero();
      T* dv_data = dv_space[worker];
      for (Index b = 0; b < B; ++b) {
        const ConstStridedMatrixView<T> x1_tile(x1 + b * I * in1 + a0, I, width,
                                                Eigen::OuterStride<>(in1));
        for (Index j0 = 0; j0 < J; j0 += plan.rows_j) {
          if (detail::stop_requested()) return;
          const Index nj = std::min(plan.rows_j, J - j0);
          // dV's columns a0 .. a0 + width: (nj*out x width), rows (j, o).
          detail::gemm(MatrixView<T>(dv_data, nj * out, width), grad_block(b, j0, nj).transpose(),
                       x1_tile, false);
          detail::gemm(acc, ConstMatrixView<T>(dv_data, nj, out * width).transpose(),
                       ConstMatrixView<T>(x2 + (b * J + j0) * in2, nj, in2), true);
        }
      }
      for (Index o = 0; o < out; ++o) {
        MatrixView<T>(grad_weight + (o * in1 + a0) * in2, width, in2) =
            acc.middleRows(o * width, width);
      }
    });
  }

  if (grad_bias != nullptr) {
    // The sum over every (b, i, j), in that order, on the calling thread.
    RowVectorView<T> db(grad_bias, out);
    db.setZero();
    const Index rows = B * I * J;
    for (Index r = 0; r < rows; ++r) {
      db += ConstRowVectorView<T>(grad + r * out, out);
    }
  }
}

template void bilinear_pairs_forward<float>(const float*, const float*, const float*, const float*,
                                            float*, const PairsShape&, int);
template void bilinear_pairs_forward<double>(const double*, const double*, const double*,
                                             const double*, double*, const PairsShape&, int);
template void bilinear_pairs_backward<float>(const float*, const float*, const float*, const float*,
                                             float*, float*, float*, float*, const PairsShape&,
                                             int);
template void bilinear_pairs_backward<double>(const double*, const double*, const double*,
                                              const double*, double*, double*, double*, double*,
                                              const PairsShape&, int);

}  // namespace linmaps
