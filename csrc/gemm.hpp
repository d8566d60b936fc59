// Matrix products for the kernels: Eigen's own GEMM (same blocking, same packing, same
// micro-kernel as `dst.noalias() = lhs * rhs`), but with its packing buffers taken from a
// per-thread scratch area that lives across calls instead of being allocated per product.
//
// Why: Eigen allocates its packing buffers (kc x mc and kc x nc, up to a few hundred KiB)
// for every product it evaluates and frees them after, and the bilinear kernels evaluate
// hundreds of small products per call (one per row block and output chunk). Fresh memory
// means page faults, which two threads serialise on (see thread_scratch in kernels.hpp).
//
// Results are those of the plain Eigen expression: the products are the same sequence of
// packing and micro-kernel calls, only the buffers' addresses differ (and they are aligned
// like Eigen's own).
#pragma once

#include <Eigen/Core>

#include "kernels.hpp"

namespace linmaps {
namespace detail {

// Eigen's blocking for a dynamic-size product, as GeneralProduct builds it for
// `dst = lhs * rhs` evaluated on one thread, with the packing buffers pointing into the
// thread's scratch (and not freed by Eigen).
template <class T, int ResOrder>
class ScratchBlocking
    : public Eigen::internal::gemm_blocking_space<ResOrder, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                                  Eigen::Dynamic, 1, false> {
  using Base = Eigen::internal::gemm_blocking_space<ResOrder, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                                    Eigen::Dynamic, 1, false>;

 public:
  ScratchBlocking(Index rows, Index cols, Index depth) : Base(rows, cols, depth, 1, true) {
    // Eigen's packed loads are aligned: start blockB on a 64-byte boundary too.
    const Index size_a = round_up(this->m_mc * this->m_kc, 64 / Index(sizeof(T)));
    const Index size_b = this->m_kc * this->m_nc;
    T* scratch = thread_scratch<T>(kGemmSlot, size_a + size_b);
    this->m_blockA = scratch;
    this->m_blockB = scratch + size_a;
  }
  ~ScratchBlocking() {
    this->m_blockA = nullptr;  // the scratch is not Eigen's to free
    this->m_blockB = nullptr;
  }
  ScratchBlocking(const ScratchBlocking&) = delete;
  ScratchBlocking& operator=(const ScratchBlocking&) = delete;
};

// dst = lhs * rhs (accumulate == false) or dst += lhs * rhs, for direct-access Eigen
// expressions with unit inner stride (Maps, their blocks, and transposes of those).
template <class Dst, class Lhs, class Rhs>
void gemm(Dst&& dst, const Lhs& lhs, const Rhs& rhs, bool accumulate) {
  using T = typename std::decay_t<Dst>::Scalar;
  constexpr int kLhsOrder = Lhs::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int kRhsOrder = Rhs::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  constexpr int kResOrder = std::decay_t<Dst>::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  const Index rows = dst.rows(), cols = dst.cols(), depth = lhs.cols();
  eigen_assert(lhs.rows() == rows && rhs.cols() == cols && rhs.rows() == depth);
  // Vector-shaped products go through Eigen's GEMV, as in Eigen's own product evaluation;
  // GEMV allocates nothing.
  if (rows == 1 || cols == 1) {
    if (accumulate) {
      dst.noalias() += lhs * rhs;
    } else {
      dst.noalias() = lhs * rhs;
    }
    return;
  }
  if (!accumulate) dst.setZero();  // as Eigen does before its GEMM
  if (rows == 0 || cols == 0 || depth == 0) return;
  eigen_assert(lhs.innerStride() == 1 && rhs.innerStride() == 1 && dst.innerStride() == 1);
  ScratchBlocking<T, kResOrder> blocking(rows, cols, depth);
  Eigen::internal::general_matrix_matrix_product<Index, T, kLhsOrder, false, T, kRhsOrder, false,
                                                 kResOrder, 1>::run(rows, cols, depth, lhs.data(),
                                                                    lhs.outerStride(), rhs.data(),
                                                                    rhs.outerStride(), dst.data(),
                                                                    1, dst.outerStride(), T(1),
                                                                    blocking, nullptr);
}

// R = R0 + B A^T for a row-major R (rows x M, contiguous), A (M x K) and B (rows x K), each
// row of R starting as R0 = row_init (M values) or zero, with A packed once per call and
// shared by every worker and the rows of R cut into tasks of task_rows rows: the products
// behind the linear forward (A = weight, B = x, R0 = bias), grad_x (A = weight^T, B = grad)
// and grad_weight (A = x^T, B = grad^T, the batch being the depth).
//
// Why: one Eigen product per output tile packs its own copy of A's and B's rows, so a tiled
// (4096,1024,1024) forward packed the weight 16 times and the input 3 times: 28M packed
// elements for 5M read, 5% of the time, and OpenBLAS (whose threads share packed panels)
// came out ahead. Here A is packed once and each B block once, with Eigen's own packing
// routines and micro-kernel (gebp); docs/kernels.md has the measurements.
//
// A is packed in depth blocks of kc (Eigen's heuristic for this shape), and at most
// kMaxPackedBytes of it at a time: the depth blocks are processed in passes. For each pass,
// run pack(pass, task) for every task in [0, pack_tasks(pass)) (in parallel), then
// multiply(pass, task) for every task in [0, tasks()) (in parallel), which adds that pass's
// depth blocks in order. The blocking depends on the shape only, so results do not depend on
// which worker runs which task. B(r, k) = rhs[r * rhs_stride + k] (RhsOrder ColMajor, rows
// of B contiguous) or rhs[k * rhs_stride + r] (RowMajor).
template <class T, int LhsOrder, int RhsOrder>
class PackedLhsProduct {
  using Traits = Eigen::internal::gebp_traits<T, T>;
  using LhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, LhsOrder>;
  using RhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, RhsOrder>;
  using ResMapper =
      Eigen::internal::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;

 public:
  // Rows of A packed per pack task (a whole number of micro-kernel panels).
  static constexpr Index kPackRows = 8 * Traits::mr;
  // The shared packed copy of A is at most this big (the calling thread keeps it, like the
  // workers' scratch): a 1024 x 1024 float weight fits in one pass.
  static constexpr Index kMaxPackedBytes = Index(8) << 20;

  // A(i, k) = lhs[i * lhs_stride + k] (LhsOrder RowMajor) or lhs[k * lhs_stride + i]
  // (ColMajor). slot: the calling thread's scratch slot for the packed A (two products alive
  // at once need two).
  PackedLhsProduct(const T* lhs, Index lhs_stride, const T* rhs, Index rhs_stride, T* res,
                   const T* row_init, Index rows, Index M, Index K, Index task_rows,
                   int slot = kSharedLhsSlot)
      : lhs_(lhs, lhs_stride),
        rhs_(rhs, rhs_stride),
        res_(res),
        row_init_(row_init),
        rows_(rows),
        M_(M),
        K_(K),
        task_rows_(task_rows) {
    Index mc = M, nc = task_rows;
    kc_ = std::max<Index>(K, 1);
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(kc_, mc, nc, Index(1));
    depth_blocks_ = ceil_div(K, kc_);
    // Each depth block starts on a 64-byte boundary, as Eigen's own packing buffers do.
    block_stride_ = round_up(checked_mul(std::max<Index>(M, 1), kc_), 64 / Index(sizeof(T)));
    blocks_per_pass_ = std::max<Index>(1, kMaxPackedBytes / (block_stride_ * Index(sizeof(T))));
    blocks_per_pass_ = std::min(blocks_per_pass_, std::max<Index>(depth_blocks_, 1));
    packed_ = thread_scratch<T>(slot, block_stride_ * blocks_per_pass_);
  }

  Index passes() const { return ceil_div(depth_blocks_, blocks_per_pass_); }

  Index pack_tasks(Index pass) const { return blocks_in(pass) * ceil_div(M_, kPackRows); }

  void pack(Index pass, Index task) const {
    const Index row_chunks = ceil_div(M_, kPackRows);
    const Index slot = task / row_chunks, i0 = (task % row_chunks) * kPackRows;
    const Index k0 = (pass * blocks_per_pass_ + slot) * kc_, depth = std::min(kc_, K_ - k0);
    const Index rows = std::min(kPackRows, M_ - i0);
    Eigen::internal::gemm_pack_lhs<T, Index, LhsMapper, Traits::mr, Traits::LhsProgress,
                                   typename Traits::LhsPacket4Packing, LhsOrder>
        pack_lhs;
    // Panels of mr rows are laid out one after another, so a chunk starting at a multiple
    // of mr rows is where packing all M rows at once would put it.
    pack_lhs(packed_ + slot * block_stride_ + i0 * depth, lhs_.getSubMapper(i0, k0), depth, rows);
  }

  Index tasks() const { return ceil_div(rows_, task_rows_); }

  // Rows [task * task_rows, ...) of R: set to R0 in pass 0, then this pass's depth blocks
  // added in order.
  void multiply(Index pass, Index task) const {
    const Index r0 = task * task_rows_, rows = std::min(task_rows_, rows_ - r0);
    MatrixView<T> res(res_ + r0 * M_, rows, M_);
    if (pass == 0) {
      if (row_init_ != nullptr) {
        res.rowwise() = ConstRowVectorView<T>(row_init_, M_);
      } else {
        res.setZero();
      }
    }
    if (rows == 0 || M_ == 0 || K_ == 0) return;
    Eigen::internal::gemm_pack_rhs<T, Index, RhsMapper, Traits::nr, RhsOrder> pack_rhs;
    Eigen::internal::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    const ResMapper res_map(res.data(), M_);
    T* block_b = thread_scratch<T>(kGemmSlot, kc_ * task_rows_);
    for (Index slot = 0; slot < blocks_in(pass); ++slot) {
      if (stop_requested()) return;
      const Index k0 = (pass * blocks_per_pass_ + slot) * kc_, depth = std::min(kc_, K_ - k0);
      pack_rhs(block_b, rhs_.getSubMapper(k0, r0), depth, rows);
      gebp(res_map, packed_ + slot * block_stride_, block_b, M_, depth, rows, T(1));
    }
  }

 private:
  Index blocks_in(Index pass) const {
    return std::min(blocks_per_pass_, depth_blocks_ - pass * blocks_per_pass_);
  }

  LhsMapper lhs_;
  RhsMapper rhs_;
  T* res_;
  const T* row_init_;
  Index rows_, M_, K_, task_rows_;
  Index kc_ = 1, depth_blocks_ = 0, block_stride_ = 0, blocks_per_pass_ = 1;
  T* packed_ = nullptr;
};

}  // namespace detail
}  // namespace linmaps
