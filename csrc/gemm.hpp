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

}  // namespace detail
}  // namespace linmaps
