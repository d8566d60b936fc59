// The process-wide thread setting of linmaps and how it combines with OpenMP's per-thread
// nthreads-var ICV.
//
// libgomp keeps nthreads-var per thread: omp_set_num_threads (which threadpoolctl calls for
// threadpool_limits) only changes it for the calling thread, and a thread that never called
// it sees the process default (OMP_NUM_THREADS, else the number of processors). Hence:
//   * set_num_threads stores a process-wide setting (an atomic), applied through a
//     num_threads(...) clause, so it holds for calls from every Python thread;
//   * a calling thread whose ICV differs from the process default has been limited on
//     purpose (threadpool_limits, omp_set_num_threads), and that ICV caps the setting for
//     calls from that thread only;
//   * until set_num_threads is called the setting is the process default itself.
// The one ambiguity: a thread that sets its ICV to exactly the process default cannot be
// told apart from one that never touched it, so threadpool_limits(d) with d the default
// does not cap a larger set_num_threads(n > d).
#include "kernels.hpp"

#include <thread>

namespace linmaps {
namespace threads {
namespace {

// The ICV a fresh thread sees. Read from a new thread so that importing linmaps inside a
// threadpool_limits block does not mistake the temporary limit for the default.
int read_process_default() {
#ifdef _OPENMP
  int value = 1;
  try {
    std::thread probe([&value] { value = omp_get_max_threads(); });
    probe.join();
  } catch (...) {  // no threads available: fall back to this thread's view
    value = omp_get_max_threads();
  }
  return std::max(value, 1);
#else
  return 1;
#endif
}

int process_default() {
  static const int value = read_process_default();
  return value;
}

// 0: not set, follow the process default.
std::atomic<int> g_setting{0};

int calling_thread_icv() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

int setting() {
  const int value = g_setting.load(std::memory_order_relaxed);
  return value > 0 ? value : process_default();
}

void set_setting(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
  g_setting.store(n, std::memory_order_relaxed);
}

int for_call() {
  const int wanted = setting();
  const int icv = calling_thread_icv();
  if (icv != process_default()) return std::max(1, std::min(wanted, icv));
  return wanted;
}

int team_size() {
  const int team = for_call();
  int size = 1;
#pragma omp parallel num_threads(team)
  {
#ifdef _OPENMP
#pragma omp single
    size = omp_get_num_threads();
#endif
  }
  return size;
}

}  // namespace threads
}  // namespace linmaps
