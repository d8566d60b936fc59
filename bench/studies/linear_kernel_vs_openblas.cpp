// linmaps' linear kernels against OpenBLAS (NumPy's own copy) in one process, float32.
//
//   bash bench/studies/linear_kernel_vs_openblas.sh [CSRC_DIR] -- N IN OUT [THREADS] [ROUNDS] [OP]
//
// OP is fwd (y = x w^T + b; OpenBLAS: sgemm then a bias loop, as NumPy's x @ w.T + b),
// gx (grad_x = g w), gw (grad_weight = g^T x) or bwd (all three gradients, OpenBLAS's grad_bias
// a sum loop). Rounds alternate OpenBLAS and linmaps, each a median of ~0.2 s of calls after a
// 0.3 s pause (so that the other library's threads are idle); the medians over rounds are
// printed. Linking the kernels of another checkout (CSRC_DIR) measures before/after pairs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels.hpp"

extern "C" void scipy_cblas_sgemm64_(int order, int trans_a, int trans_b, long m, long n, long k,
                                     float alpha, const float* a, long lda, const float* b,
                                     long ldb, float beta, float* c, long ldc);
extern "C" void scipy_openblas_set_num_threads64_(int);

namespace linmaps {
template <class T>
void linear_forward(const T*, const T*, const T*, T*, const LinearShape&, int);
template <class T>
void linear_backward(const T*, const T*, const T*, T*, T*, T*, const LinearShape&, int);
}  // namespace linmaps

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using Clock = std::chrono::steady_clock;

template <class F>
double median_call_s(F&& f, int reps) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s N IN OUT [THREADS] [ROUNDS] [fwd|gx|gw|bwd]\n", argv[0]);
    return 2;
  }
  const long N = std::atol(argv[1]), n = std::atol(argv[2]), m = std::atol(argv[3]);
  const int threads = argc > 4 ? std::atoi(argv[4]) : 2;
  const int rounds = argc > 5 ? std::atoi(argv[5]) : 10;
  const std::string op = argc > 6 ? argv[6] : "fwd";
  scipy_openblas_set_num_threads64_(threads);
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(N * n), w(m * n), b(m), g(N * m), y(N * m), y_ref(N * m), gx(N * n),
      gw(m * n), gb(m);
  for (auto* v : {&x, &w, &b, &g})
    for (float& e : *v) e = normal(gen);
  linmaps::LinearShape shape{};
  shape.batch = N;
  shape.in = n;
  shape.out = m;

  auto run_linmaps = [&] {
    if (op == "fwd") {
      linmaps::linear_forward<float>(x.data(), w.data(), b.data(), y.data(), shape, threads);
    } else {
      linmaps::linear_backward<float>(g.data(), x.data(), w.data(),
                                      op == "gx" || op == "bwd" ? gx.data() : nullptr,
                                      op == "gw" || op == "bwd" ? gw.data() : nullptr,
                                      op == "bwd" ? gb.data() : nullptr, shape, threads);
    }
  };
  auto run_openblas = [&] {
    if (op == "fwd") {
      scipy_cblas_sgemm64_(kRowMajor, kNoTrans, kTrans, N, m, n, 1.f, x.data(), n, w.data(), n, 0.f,
                           y_ref.data(), m);
      for (long i = 0; i < N; ++i)
        for (long j = 0; j < m; ++j) y_ref[i * m + j] += b[j];
      return;
    }
    if (op == "gx" || op == "bwd")
      scipy_cblas_sgemm64_(kRowMajor, kNoTrans, kNoTrans, N, n, m, 1.f, g.data(), m, w.data(), n,
                           0.f, gx.data(), n);
    if (op == "gw" || op == "bwd")
      scipy_cblas_sgemm64_(kRowMajor, kTrans, kNoTrans, m, n, N, 1.f, g.data(), m, x.data(), n, 0.f,
                           gw.data(), n);
    if (op == "bwd") {
      std::fill(gb.begin(), gb.end(), 0.f);
      for (long i = 0; i < N; ++i)
        for (long j = 0; j < m; ++j) gb[j] += g[i * m + j];
    }
  };

  run_linmaps();
  run_openblas();
  if (op == "fwd") {  // a sanity check; the test suite is the real one
    double worst = 0;
    for (long i = 0; i < N * m; ++i) worst = std::max(worst, double(std::fabs(y[i] - y_ref[i])));
    std::printf("max |linmaps - openblas| = %.3g\n", worst);
  }
  const double flops = (op == "bwd" ? 4.0 : 2.0) * N * n * m;
  const int reps = std::max(3, int(0.2 / (flops / 150e9)));
  std::vector<double> t_linmaps, t_openblas;
  for (int r = 0; r < rounds; ++r) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    t_openblas.push_back(median_call_s(run_openblas, reps));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    t_linmaps.push_back(median_call_s(run_linmaps, reps));
  }
  std::sort(t_linmaps.begin(), t_linmaps.end());
  std::sort(t_openblas.begin(), t_openblas.end());
  const double tl = t_linmaps[rounds / 2], tb = t_openblas[rounds / 2];
  std::printf(
      "%s %ldx%ldx%ld, %d threads: linmaps %.3f ms (%.0f GFLOP/s), openblas %.3f ms "
      "(%.0f GFLOP/s), openblas/linmaps %.3f\n",
      op.c_str(), N, n, m, threads, tl * 1e3, flops / tl / 1e9, tb * 1e3, flops / tb / 1e9,
      tb / tl);
  return 0;
}
