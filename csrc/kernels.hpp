// The compute kernels of linmaps and the tiling/threading machinery they share.
//
// Nothing here knows about Python: the kernels take raw pointers to row-major, contiguous
// buffers plus their sizes, so that the same sources can later be compiled once per
// instruction set. The pybind11 layer (bind_*.cpp, linmaps.hpp) validates, allocates the
// outputs while holding the GIL and calls these with the GIL released.
//
// Determinism contract: every kernel splits its work into a grid of tasks that depends only
// on the problem shape and the scalar type, never on the number of threads. Each task
// computes a fixed set of output elements completely (or a fixed partial sum that is then
// combined in a fixed order), so the floating-point operations, and therefore the results,
// are bitwise identical whatever the number of threads and whichever thread runs a task.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace linmaps {

// 64-bit sizes and indices throughout (Eigen::Index is std::ptrdiff_t).
using Index = Eigen::Index;
static_assert(sizeof(Index) == sizeof(std::int64_t), "linmaps needs a 64-bit Eigen::Index");

template <class T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixView = Eigen::Map<RowMajorMatrix<T>>;
template <class T>
using ConstMatrixView = Eigen::Map<const RowMajorMatrix<T>>;
template <class T>
using ColumnMajorView =
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;
template <class T>
using RowVectorView = Eigen::Map<RowVector<T>>;
template <class T>
using ConstRowVectorView = Eigen::Map<const RowVector<T>>;
// Scratch memory: Eigen's allocator aligns to EIGEN_MAX_ALIGN_BYTES and leaves it
// uninitialised (every kernel writes before it reads).
template <class T>
using Buffer = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// ---------------------------------------------------------------------------------------
// Kernels (explicitly instantiated for float and double in linear.cpp / bilinear.cpp).
// A null output pointer means "gradient not requested": its work is skipped entirely.
// `num_threads` is an upper bound on the OpenMP team; results do not depend on it.

struct LinearShape {
  Index batch;  // N
  Index in;     // n
  Index out;    // m
};

// y (N,m) = x (N,n) weight(m,n)^T + bias(m); bias may be null.
template <class T>
void linear_forward(const T* x, const T* weight, const T* bias, T* y, const LinearShape& shape,
                    int num_threads);

// grad_x (N,n) = grad weight; grad_weight (m,n) = grad^T x; grad_bias (m) = sum_k grad[k,:].
template <class T>
void linear_backward(const T* grad, const T* x, const T* weight, T* grad_x, T* grad_weight,
                     T* grad_bias, const LinearShape& shape, int num_threads);

struct BilinearShape {
  Index batch;  // N
  Index in1;    // m
  Index in2;    // n
  Index out;    // L
};

// z (N,L): z[k,l] = x1[k,:] weight[l] x2[k,:]^T + bias[l]; bias may be null.
// `kept`, if not null, receives the forward's intermediate T (bilinear.cpp) for the backward:
// at least bilinear_kept_elements<T>(shape) elements, any alignment.
template <class T>
void bilinear_forward(const T* x1, const T* x2, const T* weight, const T* bias, T* z, T* kept,
                      const BilinearShape& shape, int num_threads);

// `kept`, if not null, is what bilinear_forward kept for the same arguments: the backward
// reads T from it instead of computing it again (same bits either way).
// `accumulate`: grad_weight and grad_bias are accumulators that receive += the gradients (as
// numpy.add(acc, grad, out=acc) rounds each element), all or nothing (commit_call).
template <class T>
void bilinear_backward(const T* grad, const T* x1, const T* x2, const T* weight, const T* kept,
                       T* grad_x1, T* grad_x2, T* grad_weight, T* grad_bias, bool accumulate,
                       const BilinearShape& shape, int num_threads);

// Size of the buffer bilinear_forward keeps T in, for this shape.
template <class T>
Index bilinear_kept_elements(const BilinearShape& shape);

// All-pairs bilinear map (pairs.cpp): x1 (B,I,in1), x2 (B,J,in2), weight (out,in1,in2),
// s (B,I,J,out): s[b,i,j,o] = x1[b,i,:] weight[o] x2[b,j,:]^T + bias[o]; bias may be null.
struct PairsShape {
  Index batch;  // B
  Index rows1;  // I
  Index rows2;  // J
  Index in1;
  Index in2;
  Index out;
};

template <class T>
void bilinear_pairs_forward(const T* x1, const T* x2, const T* weight, const T* bias, T* s,
                            const PairsShape& shape, int num_threads);

// grad (B,I,J,out); each output null when not requested.
template <class T>
void bilinear_pairs_backward(const T* grad, const T* x1, const T* x2, const T* weight, T* grad_x1,
                             T* grad_x2, T* grad_weight, T* grad_bias, const PairsShape& shape,
                             int num_threads);

// ---------------------------------------------------------------------------------------
// Threads (threads.cpp).
//
// OpenMP's own "number of threads" (the nthreads-var ICV that omp_set_num_threads sets) is
// per calling thread, so it cannot carry a process-wide setting. linmaps keeps its own
// process-wide setting and passes it to every parallel region in a num_threads clause. The
// calling thread's ICV still acts as a cap when something (threadpoolctl's
// threadpool_limits, or user code calling omp_set_num_threads) changed it from the process
// default; see threads.cpp.
namespace threads {
// The process-wide state shared by every instruction-set module (threads.cpp): the baseline
// module creates it, the others use that one.
struct ProcessState;
ProcessState* new_process_state();
void use_process_state(ProcessState* state);
// OpenMP's process default (OMP_NUM_THREADS, else the CPUs), as read at import.
int openmp_default();
// The most threads linmaps ever asks for (a small multiple of the usable CPUs).
int cap();
// The process-wide setting (the OpenMP default until set_setting is called), at most cap().
int setting();
// n >= 1; stored as min(n, cap()).
void set_setting(int n);
// Threads a call made now from the calling thread may use: the setting, capped by the
// calling thread's OpenMP ICV if that was changed from the process default; 1 in a forked
// child of a process that had started an OpenMP team.
int for_call();
// Records that an OpenMP team of more than one thread was started (see in_forked_child).
void note_team_started();
bool in_forked_child();
// The team size an OpenMP parallel region opened like the kernels open theirs actually gets
// (diagnostics and tests).
int team_size();
// The OpenBLAS threads callback (NumPy's BLAS on linmaps' pool): install it into the loaded
// library at `path` (the setter's symbol name, or "" when it has none; blas_refresh calls it),
// remove it from every library, list the libraries that have it, and count the BLAS calls it
// ran.
std::string blas_install(const std::string& path);
// Whether OpenBLAS libraries get the callback: on, give it to those loaded now; off, take it
// back from all.
void blas_set_sharing(bool enable);
// When sharing: give the callback to OpenBLAS libraries loaded since the last look (cheap
// when none was: one look at the dynamic loader's count of loaded objects).
void blas_refresh();
// Whether blas_refresh has looked for libraries since sharing was switched on.
bool blas_looked();
void blas_uninstall();
std::vector<std::pair<std::string, std::string>> blas_installed();
long long blas_calls();
// Contention (threads.cpp, "Sharing the CPUs"): each thread of a long enough parallel region
// looks at its end how long it waited for a CPU; the team a call of `flops` may use now,
// given what the looks found.
void look_for_contention(int team);
int contention_cap(int num_threads, double flops);
// Regions shorter than this do not look (a look reads a /proc file, about 0.8 us): the wait
// accrues in the thread's counter and the next look counts it.
constexpr std::int64_t kContentionLookNs = 100'000;
// How many times a smaller team was engaged (diagnostics and tests).
long long contention_engaged();
}  // namespace threads

// ---------------------------------------------------------------------------------------
// Shared tiling helpers (used by linear.cpp and bilinear.cpp).
namespace detail {

inline Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }
inline Index round_up(Index a, Index b) { return ceil_div(a, b) * b; }

// Start of part i of `count` nearly equal parts of [0, extent), rounded down to a multiple of
// granule; part `count` starts at the end. (i * extent / count without forming i * extent.)
inline Index split_point(Index extent, Index count, Index granule, Index i) {
  if (i >= count) return extent;
  const Index exact = i * (extent / count) + i * (extent % count) / count;
  return exact / granule * granule;
}

// a * b for non-negative sizes, refusing to wrap around.
inline Index checked_mul(Index a, Index b) {
  if (a != 0 && b > std::numeric_limits<Index>::max() / a) {
    throw std::overflow_error("linmaps: array size overflows a 64-bit index");
  }
  return a * b;
}

// Problems cheaper than this many flops run on the calling thread without opening a
// parallel region: waking the OpenMP team costs a few microseconds, about what a 2-core
// split saves on a ~1 MFLOP problem (80 GFLOP/s per core -> 12 us of work).
constexpr double kSerialFlops = 1.0e6;

// The grids aim for at least this many tasks when the problem is large enough, so that 2-4
// threads get balanced work under dynamic scheduling. A constant, never the thread count.
constexpr Index kTargetTasks = 8;

// Budget (bytes) for one per-thread intermediate block (T = P W-hat or W = dZ (x) Q of spec
// section 4). 256 KiB is a quarter of a Zen 4 core's 1 MiB L2: the block is produced by a
// GEMM and consumed right after (row dots, dY accumulation, the second GEMM) while it is
// still in L2, next to the operand panels Eigen packs for the GEMM itself.
constexpr Index kBlockBytes = Index(256) * 1024;

// Eigen's GEBP micro-kernel works on panels of 3 SIMD packets of rows (48 floats / 24
// doubles with AVX-512); tile widths that are multiples of 48 keep it on its fastest path
// for both types. (Only a performance hint: any width is correct.)
constexpr Index kPanelMultiple = 48;

// Number of workers to allocate scratch for, and to ask OpenMP for.
inline int team_for(Index num_tasks, int num_threads) {
  if (num_tasks <= 1 || num_threads <= 1) return 1;
  return static_cast<int>(std::min<Index>(num_tasks, num_threads));
}

inline int worker_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Stopping a running call (Ctrl-C). The binding layer gives the calling thread a CallStop
// whose poll function (run on the calling thread only, at most every kPollInterval, with the
// GIL taken just for the check) says whether Python has a KeyboardInterrupt pending. Between
// tasks, and inside long tasks at stop_requested(), every thread of the call then skips the
// rest of the work; the binding raises instead of returning the (incomplete) outputs.
// Skipping never reads out of bounds: the outputs and scratch of skipped tasks are just left
// unset, and they are discarded.
// A clock cheap enough to read between tasks of a microsecond call: the kernel's tick-based
// CLOCK_MONOTONIC_COARSE (a few ns through the vDSO; a few ms of resolution, plenty for a
// 50 ms poll interval).
inline std::int64_t coarse_now_ns() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return std::int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}

struct CallStop {
  using Poll = bool (*)();
  static constexpr std::int64_t kPollIntervalNs = 50000000;  // 50 ms
  enum State : int { kRunning, kStopped, kCommitted };
  explicit CallStop(Poll poll_fn)
      : poll(poll_fn), next_poll_ns(coarse_now_ns() + kPollIntervalNs) {}
  std::atomic<int> state{kRunning};
  Poll poll;
  std::int64_t next_poll_ns;
  // Held while polling and while committing, so that a call is never both stopped (Python's
  // KeyboardInterrupt raised by the poll) and committed.
  std::mutex poll_mutex;

  bool stopped() const { return state.load(std::memory_order_acquire) == kStopped; }

  // Whether the call should stop; `caller`: the current thread is the calling thread, which
  // polls when it is time (never once the call is committed).
  bool check(bool caller) {
    if (caller && poll != nullptr && state.load(std::memory_order_relaxed) == kRunning) {
      const std::int64_t now = coarse_now_ns();
      if (now >= next_poll_ns) {
        next_poll_ns = now + kPollIntervalNs;
        std::lock_guard<std::mutex> lock(poll_mutex);
        if (state.load(std::memory_order_relaxed) == kRunning && poll()) {
          state.store(kStopped, std::memory_order_release);
        }
      }
    }
    return stopped();
  }

  // See commit_call.
  bool commit() {
    if (state.load(std::memory_order_acquire) == kCommitted) return true;
    std::lock_guard<std::mutex> lock(poll_mutex);
    int expected = kRunning;
    state.compare_exchange_strong(expected, kCommitted, std::memory_order_acq_rel);
    return state.load(std::memory_order_acquire) == kCommitted;
  }
};

// The CallStop of the call the current thread works for (the calling thread's is set by
// CallerState, the workers' by parallel_for for the length of their part), and whether the
// current thread is the calling thread (the one that may poll).
inline thread_local CallStop* t_call_stop = nullptr;
inline thread_local bool t_is_caller = false;
// Calls running on the current thread as their calling thread (CallerState): more than one
// when a call starts in the middle of another on the same thread. That happens: the poll runs
// Python's signal handlers (PyErr_CheckSignals), and a handler may call linmaps. Each such
// level has its own scratch (thread_scratch), since the interrupted call still uses its own,
// and so may the other threads of its team (the shared packed operands).
inline thread_local int t_call_depth = 0;

// Whether the current call should stop; on the calling thread, also polls when it is time.
inline bool stop_requested() {
  CallStop* stop = t_call_stop;
  return stop != nullptr && stop->check(t_is_caller);
}

// Called by a kernel before it first changes memory that outlives a stopped call (adding to a
// caller's gradient accumulator): false if the call has been asked to stop (then it must
// change nothing), else true, and from then on the call is never stopped and the calling
// thread stops polling: it runs to the end, and a Ctrl-C that comes meanwhile stays pending in
// Python, which raises it as soon as the call returns. So an interrupted call leaves the
// accumulator either untouched or completely updated, never half of it.
inline bool commit_call() {
  CallStop* stop = t_call_stop;
  return stop == nullptr || stop->commit();
}

// Runs body(task, worker) for task in [0, num_tasks), worker in [0, team). Tasks are handed
// out dynamically; which worker runs which task never affects results (see the top of this
// file). No exception escapes the parallel region: the first one is captured, the remaining
// tasks are skipped, and it is rethrown on the calling thread. Once the call is asked to
// stop (stop_requested), the remaining tasks are skipped too.
template <class Body>
void parallel_for(Index num_tasks, int team, Body&& body) {
  if (team <= 1 || num_tasks <= 1) {
    CallStop* const stop = t_call_stop;
    const bool caller = t_is_caller;
    for (Index task = 0; task < num_tasks; ++task) {
      if (stop != nullptr && stop->check(caller)) break;
      body(task, 0);
    }
    return;
  }
  threads::note_team_started();
  CallStop* const call_stop = t_call_stop;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const auto region_start = std::chrono::steady_clock::now();
  // Inside another call's parallel region (a call made by a signal handler that the poll ran on
  // thread 0, see t_call_depth) this region is nested: OpenMP gives it one thread unless nested
  // parallelism was enabled, which changes no result (see the top of this file).
#pragma omp parallel num_threads(team)
  {
    // The encountering (calling) thread is thread 0 and keeps its own state.
    const bool worker = worker_id() != 0;
    CallStop* const worker_stop = t_call_stop;
    if (worker) t_call_stop = call_stop;
#pragma omp for schedule(dynamic, 1) nowait
    for (Index task = 0; task < num_tasks; ++task) {
      if (failed.load(std::memory_order_relaxed) || stop_requested()) continue;
      try {
        body(task, worker_id());
      } catch (...) {
#pragma omp critical(linmaps_parallel_for_error)
        {
          if (!error) error = std::current_exception();
        }
        failed.store(true, std::memory_order_relaxed);
      }
    }
    if (std::chrono::steady_clock::now() - region_start >=
        std::chrono::nanoseconds(threads::kContentionLookNs)) {
      threads::look_for_contention(team);
    }
    if (worker) t_call_stop = worker_stop;
  }
  if (error) std::rethrow_exception(error);
}

// Per-thread scratch memory, kept for the thread's lifetime: slot kGemmSlot holds the
// packing buffers of the matrix products (gemm.hpp), the other slots the kernels'
// per-worker blocks (T, W and accumulators, ThreadWorkspace below).
//
// Why per thread and kept: memory allocated per call comes back from glibc as fresh pages,
// and the first touch of a fresh page is a page fault; when both threads of a call fault at
// once they serialise on the process's memory map. Measured (float32, (256,64,64,64),
// bilinear weight gradient, 1 MiB of workspaces and 1 MiB of output per call): 1 thread
// 1.44 ms, 2 threads 1.34-1.67 ms, no speed-up; 0.76 ms on 2 threads once no page was
// fresh (glibc's trimming off). The buffers grow to the largest block a thread has needed
// (at most a few MiB: they are sized by blocks, never by the batch), like the per-thread
// buffers of OpenBLAS.
//
// Buffer data is aligned to EIGEN_MAX_ALIGN_BYTES in every thread, so every worker sees the
// same alignment: Eigen's vectorised reductions peel according to alignment, and identical
// alignment keeps results identical whichever worker runs a task.
constexpr int kGemmSlot = 0;
// Two per-worker blocks a kernel uses at the same time (T and W, or accumulator and W).
constexpr int kBlockSlot = 1;
constexpr int kSecondBlockSlot = 2;
// The packed left operands that all workers of one call read (PackedLhsProduct in gemm.hpp),
// held by the calling thread: up to two products run together (linear grad_x, grad_weight).
constexpr int kSharedLhsSlot = 3;
constexpr int kSecondSharedLhsSlot = 4;
constexpr int kScratchSlots = 5;

// What a thread keeps of one scratch slot between calls (CallerState): the blocks of
// the kernels stay far below this; only a shared packed operand of a very large weight
// (PackedLhsProduct) goes above it, and that is freed when the call ends.
constexpr Index kKeptScratchBytes = Index(16) << 20;

// The scratch of the current thread at `level`: level 0 for a worker and for a call that
// no other call on its thread has interrupted; level d for a call made in the middle of d
// others on the same thread (t_call_depth), which must not touch theirs.
template <class T>
Buffer<T>* scratch_slots(int level) {
  thread_local Buffer<T> outermost[kScratchSlots];
  if (level == 0) return outermost;
  // Each set at a fixed address (a growing vector moves only the pointers).
  thread_local std::vector<std::unique_ptr<Buffer<T>[]>> nested;
  if (nested.size() < static_cast<std::size_t>(level)) nested.resize(level);
  std::unique_ptr<Buffer<T>[]>& slots = nested[level - 1];
  if (!slots) slots.reset(new Buffer<T>[kScratchSlots]);
  return slots.get();
}

inline int scratch_level() { return t_call_depth > 1 ? t_call_depth - 1 : 0; }

template <class T>
T* thread_scratch(int slot, Index elements) {
  Buffer<T>& buffer = scratch_slots<T>(scratch_level())[slot];
  if (buffer.size() < elements) {
    buffer.resize(0);  // free first: never hold both the old and the new buffer
    buffer.resize(elements);
  }
  return buffer.data();
}

// Frees the current thread's scratch slots at `level` that are larger than `keep` bytes.
inline void trim_thread_scratch(int level, Index keep) {
  for (int slot = 0; slot < kScratchSlots; ++slot) {
    Buffer<float>& f = scratch_slots<float>(level)[slot];
    if (f.size() * Index(sizeof(float)) > keep) f.resize(0);
    Buffer<double>& d = scratch_slots<double>(level)[slot];
    if (d.size() * Index(sizeof(double)) > keep) d.resize(0);
  }
}

// The calling thread's part of one call, for the length of the call: its CallStop (null: the
// call neither polls nor can be stopped) and its own level of scratch. It puts everything back
// as it found it when it ends, so that a call made in the middle of another on the same thread
// (see t_call_depth) leaves the interrupted call's state intact: its stop (without which that
// call would never poll again, and a Ctrl-C would wait for its end) and its scratch.
class CallerState {
 public:
  // trim: free the thread's oversized scratch (above kKeptScratchBytes) when the call ends;
  // the scratch of a nested call is freed whole (such calls are rare).
  CallerState(CallStop* stop, bool trim)
      : trim_(trim), saved_stop_(t_call_stop), saved_is_caller_(t_is_caller) {
    t_call_stop = stop;
    t_is_caller = stop != nullptr;
    ++t_call_depth;
  }
  ~CallerState() {
    const int level = scratch_level();
    if (level > 0) {
      trim_thread_scratch(level, 0);
    } else if (trim_) {
      trim_thread_scratch(0, kKeptScratchBytes);
    }
    --t_call_depth;
    t_call_stop = saved_stop_;
    t_is_caller = saved_is_caller_;
  }
  CallerState(const CallerState&) = delete;
  CallerState& operator=(const CallerState&) = delete;

 private:
  bool trim_;
  CallStop* saved_stop_;
  bool saved_is_caller_;
};

// A block of `elements` per worker in slot `slot` (kBlockSlot or kSecondBlockSlot) of the
// thread that runs the task: `space[worker]` is called inside a task and returns that
// thread's buffer (allocated on its first use; a failure is an exception inside the task,
// which parallel_for carries out).
template <class T>
class ThreadWorkspace {
 public:
  ThreadWorkspace(int slot, Index elements)
      : slot_(slot), elements_(std::max<Index>(elements, 1)) {}
  T* operator[](int /*worker*/) const { return thread_scratch<T>(slot_, elements_); }

 private:
  int slot_;
  Index elements_;
};

}  // namespace detail
}  // namespace linmaps
