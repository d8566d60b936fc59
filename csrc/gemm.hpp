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

// R = B A^T for a row-major R (rows x M) and row-major B (rows x K), with A (M x K) packed
// once per call and shared by every worker: the product behind the linear forward (A = the
// weight) and grad_x (A = the weight's transpose), cut into tasks of batch rows.
//
// Why: one Eigen product per output tile packs its own copy of A's rows and B's rows, so a
// tiled (4096,1024,1024) forward packed the weight 16 times and the input 3 times: 28M
// packed elements against 4M + 1M read. Packing took 5% of the time, and OpenBLAS (which
// shares packed panels between its threads) came out ahead. Packing A once and B once, with
// Eigen's own packing routines and micro-kernel (gebp), made that forward 7-10% faster than
// NumPy's (measured in docs/kernels.md).
//
// Usage: run pack(task) for every task in [0, pack_tasks()) (in parallel), then
// multiply(...) for any row blocks (in parallel); A must not change in between. The blocking
// (depth blocks of kc, from Eigen's heuristic for this shape) depends on the shape only, so
// results do not depend on which worker runs which task.
template <class T, int LhsOrder>
class PackedLhsProduct {
  using Traits = Eigen::internal::gebp_traits<T, T>;
  using LhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, LhsOrder>;
  using RhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::ColMajor>;
  using ResMapper =
      Eigen::internal::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;

 public:
  // Rows of A packed per pack task (a whole number of micro-kernel panels).
  static constexpr Index kPackRows = 8 * Traits::mr;

  // A(i, k) = lhs[i * lhs_stride + k] (RowMajor) or lhs[k * lhs_stride + i] (ColMajor).
  // block_rows: the most rows of B one multiply call gets.
  PackedLhsProduct(const T* lhs, Index lhs_stride, Index M, Index K, Index block_rows)
      : lhs_(lhs, lhs_stride), M_(M), K_(K), block_rows_(block_rows) {
    Index mc = M, nc = block_rows;
    kc_ = std::max<Index>(K, 1);
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(kc_, mc, nc, Index(1));
    depth_blocks_ = ceil_div(K, kc_);
    // Each depth block starts on a 64-byte boundary, as Eigen's own packing buffers do.
    block_stride_ = round_up(checked_mul(M, kc_), 64 / Index(sizeof(T)));
    packed_ = thread_scratch<T>(kSharedLhsSlot, std::max<Index>(1, block_stride_ * depth_blocks_));
  }

  // Bytes of the shared packed copy of A for an M x K operand.
  static Index packed_bytes(Index M, Index K) { return checked_mul(M, K) * Index(sizeof(T)); }

  Index pack_tasks() const { return depth_blocks_ * ceil_div(M_, kPackRows); }

  void pack(Index task) const {
    const Index row_chunks = ceil_div(M_, kPackRows);
    const Index block = task / row_chunks, i0 = (task % row_chunks) * kPackRows;
    const Index k0 = block * kc_, depth = std::min(kc_, K_ - k0);
    const Index rows = std::min(kPackRows, M_ - i0);
    Eigen::internal::gemm_pack_lhs<T, Index, LhsMapper, Traits::mr, Traits::LhsProgress,
                                   typename Traits::LhsPacket4Packing, LhsOrder>
        pack_lhs;
    // Panels of mr rows are laid out one after another, so a chunk starting at a multiple
    // of mr rows is where packing all M rows at once would put it.
    pack_lhs(packed_ + block * block_stride_ + i0 * depth, lhs_.getSubMapper(i0, k0), depth, rows);
  }

  // res[r, i] += sum_k rhs[r * rhs_stride + k] * A(i, k) for r in [0, rows), i in [0, M):
  // res rows have stride res_stride. The depth blocks are added in order.
  void multiply(T* res, Index res_stride, const T* rhs, Index rhs_stride, Index rows) const {
    eigen_assert(rows <= block_rows_);
    if (rows == 0 || M_ == 0 || K_ == 0) return;
    Eigen::internal::gemm_pack_rhs<T, Index, RhsMapper, Traits::nr, Eigen::ColMajor> pack_rhs;
    Eigen::internal::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    const RhsMapper rhs_map(rhs, rhs_stride);
    const ResMapper res_map(res, res_stride);
    T* block_b = thread_scratch<T>(kGemmSlot, kc_ * block_rows_);
    for (Index block = 0; block < depth_blocks_; ++block) {
      const Index k0 = block * kc_, depth = std::min(kc_, K_ - k0);
      pack_rhs(block_b, rhs_map.getSubMapper(k0, 0), depth, rows);
      gebp(res_map, packed_ + block * block_stride_, block_b, M_, depth, rows, T(1));
    }
  }

 private:
  LhsMapper lhs_;
  Index M_, K_, block_rows_;
  Index kc_ = 1, depth_blocks_ = 0, block_stride_ = 0;
  T* packed_ = nullptr;
};

}  // namespace detail
}  // namespace linmaps
