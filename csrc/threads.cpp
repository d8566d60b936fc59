// The process-wide thread policy of linmaps: the thread setting and its cap, what a forked
// child does, and the OpenBLAS threads callback that runs NumPy's BLAS on linmaps' OpenMP
// pool (docs/kernels.md section 5 and docs/performance.md, "Mixing").
//
// Thread setting. libgomp keeps nthreads-var per thread: omp_set_num_threads (which
// threadpoolctl calls for threadpool_limits) only changes it for the calling thread, and a
// thread that never called it sees the process default (OMP_NUM_THREADS, else the number of
// processors). Hence:
//   * set_num_threads stores a process-wide setting (an atomic), applied through a
//     num_threads(...) clause, so it holds for calls from every Python thread;
//   * a calling thread whose ICV differs from the process default has been limited on
//     purpose (threadpool_limits, omp_set_num_threads), and that ICV caps the setting for
//     calls from that thread only;
//   * until set_num_threads is called the setting is the process default itself;
//   * nothing asks for more than cap() threads (kCapPerCpu per usable CPU).
// The one ambiguity: a thread that sets its ICV to exactly the process default cannot be
// told apart from one that never touched it, so threadpool_limits(d) with d the default
// does not cap a larger set_num_threads(n > d).
//
// Sharing the CPUs. A parallel region ends when its last thread does: when another program
// holds a core, the OS deschedules one of linmaps' threads for a time slice (milliseconds),
// and a call of a tenth of a millisecond waits for it. Beside one busy single-threaded
// process on 2 cores, a (32,64,64,32) bilinear step ran at 0.30 of its idle speed on 2
// threads and 0.54 on 1 (Zen 4). So each thread of a region longer than kContentionLookNs
// reads, at its end, how long it has waited for a CPU while runnable (its run delay, in
// /proc/self/task/TID/schedstat). The waits are summed over windows of kWindowNs of thread
// time; a window in which the threads waited kContendedShare of it engages a smaller team
// (the region's team less one, at least 1) for the calls between kSerialFlops and
// kContendedFlops, for a period that starts at kContendedPeriodNs and doubles, up to
// kContendedPeriodMaxNs, while the contention is found again as soon as a period ends.
// Larger calls keep every thread: their regions are long enough that a time slice lost
// costs them less than a thread. A thread slow to wake on an idle virtual CPU waits
// microseconds, not a share of the window, so the idle machine keeps every thread. The team
// never changes results (the top of kernels.hpp). LINMAPS_ADAPTIVE_TEAM=0 turns this off;
// without schedstat (a kernel built without it) the team stays as set.
//
// State shared by every instruction-set module. linmaps loads one extension module per
// instruction set (_core, _core_avx2, ...), each with its own copy of this file's statics,
// but they share one libgomp. The process-wide state (the setting, whether an OpenMP team
// was ever started, the fork flag, the BLAS libraries given the callback) therefore lives in
// one ProcessState, created by the baseline module _core (always imported first) and handed
// to the others through a capsule.
#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels.hpp"

namespace linmaps {
namespace threads {

// OpenBLAS's caller-managed threading (openblas_set_threads_callback_function, OpenBLAS
// 0.3.27 and later): exec_blas hands every parallel BLAS call's jobs to the callback.
using BlasJob = void (*)(int thread_num, void* job_data, int job_arg);
using BlasThreadsCallback = void (*)(int sync, BlasJob job, int num_jobs, std::size_t job_size,
                                     void* jobs, int job_arg);
using BlasCallbackSetter = void (*)(BlasThreadsCallback);

struct BlasLibrary {
  std::string path, symbol;
  void* handle;  // keeps the library loaded while it holds our callback
  BlasCallbackSetter set_callback;
};

struct ProcessState {
  std::atomic<int> setting{0};  // 0: not set, follow the process default
  std::atomic<bool> team_started{false};
  std::atomic<bool> forked_child{false};
  std::atomic<long long> blas_calls{0};
  std::atomic<bool> blas_sharing{false};
  std::atomic<unsigned long long> loaded_objects_seen{0};
  std::mutex blas_mutex;
  std::vector<BlasLibrary> blas_libraries;
  // Held while a parallel BLAS call runs on the pool: see linmaps_blas_threads.
  std::mutex blas_call_mutex;
  // Sharing the CPUs (above); times in steady_clock nanoseconds.
  bool adaptive_team = true;
  std::atomic<long long> window_delay_ns{0}, window_wall_ns{0};
  std::atomic<std::int64_t> contended_until_ns{std::numeric_limits<std::int64_t>::min() / 2};
  std::atomic<std::int64_t> contended_period_ns{0};
  std::atomic<int> contended_team{0};
  std::atomic<long long> contention_engaged{0};
};

namespace {

ProcessState* g_state = nullptr;

// Looks are summed over a window of kWindowNs of the team threads' time; a window in which
// they waited for a CPU at least kContendedShare of it (and kContendedDelayNs in all)
// engages a smaller team. Measured on 2 cores (Zen 4), a (32,64,64,32) step in a loop: the
// threads waited 1.2% of their time on the idle machine, 43% beside a busy process.
constexpr long long kWindowNs = 100'000'000;
constexpr long long kContendedDelayNs = 5'000'000;
constexpr double kContendedShare = 0.2;
constexpr std::int64_t kContendedPeriodNs = 100'000'000;
constexpr std::int64_t kContendedPeriodMaxNs = 1'600'000'000;
constexpr double kContendedFlops = 2.0e9;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// This thread's schedstat file (/proc/self/task/TID/schedstat: time on the CPU, time waiting
// for one) and what it read there last. fd -1 before the first look, -2 where there is none.
struct DelayLook {
  int fd = -1;
  long long delay_ns = 0, wall_ns = 0;
};
thread_local DelayLook t_look;

// The thread's run delay: nanoseconds it was runnable but waited for a CPU.
bool read_run_delay(int fd, long long& delay) {
  char text[128];
  const ssize_t got = pread(fd, text, sizeof(text) - 1, 0);
  if (got <= 0) return false;
  text[got] = '\0';
  unsigned long long on_cpu = 0, waited = 0;
  if (std::sscanf(text, "%llu %llu", &on_cpu, &waited) != 2) return false;
  delay = static_cast<long long>(waited);
  return true;
}

void forget_looks_in_child() {
  if (t_look.fd >= 0) close(t_look.fd);
  t_look = DelayLook();
}

int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(CPU_COUNT(&set), 1);
  return std::max<int>(static_cast<int>(std::thread::hardware_concurrency()), 1);
}

// Threads beyond the CPUs only add switching to compute-bound kernels; a small factor still
// lets tests and users oversubscribe on purpose (3 threads on 2 CPUs), and the cap keeps an
// absurd request (OMP_NUM_THREADS=999999, set_num_threads(10**5)) from starting thousands
// of OS threads, which libgomp aborts the process over when it cannot create them.
constexpr int kCapPerCpu = 4;

// The ICV a fresh thread sees. Read from a new thread so that importing linmaps inside a
// threadpool_limits block does not mistake the temporary limit for the default.
int read_openmp_default() {
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

int calling_thread_icv() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Runs jobs [first, num_jobs) on new threads and job `own` on this one, all at once.
void run_jobs_on_new_threads(BlasJob job, int first, int num_jobs, std::size_t job_size, char* jobs,
                             int job_arg, int own) noexcept {
  std::vector<std::thread> extra;
  try {
    extra.reserve(static_cast<std::size_t>(num_jobs - first));
    for (int j = first; j < num_jobs; ++j) extra.emplace_back(job, j, jobs + j * job_size, job_arg);
  } catch (...) {
    // OpenBLAS's level-3 jobs wait for each other, so running fewer at once could hang:
    // fail loudly, as OpenBLAS itself does when it cannot create a thread.
    std::fputs("linmaps: could not start a thread for a BLAS call\n", stderr);
    std::abort();
  }
  if (own >= 0) job(own, jobs + own * job_size, job_arg);
  for (auto& thread : extra) thread.join();
}

// Whether a parallel region opened now with num_threads(n) is sure to get n threads.
bool full_team_guaranteed(int n) {
#ifdef _OPENMP
  return omp_get_active_level() < omp_get_max_active_levels() && !omp_get_dynamic() &&
         omp_get_thread_limit() >= 4 * n;
#else
  (void)n;
  return false;
#endif
}

// The callback OpenBLAS calls instead of waking its own threads: the jobs of one parallel
// BLAS call, every one of which must run at the same time as the others (OpenBLAS's level-3
// jobs wait for each other's packed panels). They run on linmaps' OpenMP team, one job per
// thread, so NumPy's BLAS and linmaps share one pool instead of two that spin against each
// other. OpenBLAS chooses the number of jobs (its own thread count): what NumPy computes,
// and how it splits it, is unchanged.
void linmaps_blas_threads(int /*sync*/, BlasJob job, int num_jobs, std::size_t job_size,
                          void* job_data, int job_arg) {
  char* jobs = static_cast<char*>(job_data);
  if (num_jobs <= 0) return;
  g_state->blas_calls.fetch_add(1, std::memory_order_relaxed);
  if (num_jobs == 1) {
    job(0, jobs, job_arg);
    return;
  }
  // OpenBLAS gives job i of every call the same per-index work buffer (its own server never
  // runs two calls' jobs i at once: job i belongs to its worker thread i). Parallel calls
  // from several threads therefore run one at a time, as they mostly do on OpenBLAS's own
  // threads, which two calls cannot share either. Measured without this: wrong products
  // from 4 Python threads multiplying at once.
  std::lock_guard<std::mutex> one_call_at_a_time(g_state->blas_call_mutex);
  if (!full_team_guaranteed(num_jobs) || g_state->forked_child.load(std::memory_order_relaxed)) {
    run_jobs_on_new_threads(job, 1, num_jobs, job_size, jobs, job_arg, 0);
    return;
  }
  note_team_started();
#pragma omp parallel num_threads(num_jobs)
  {
#ifdef _OPENMP
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int thread = 0, team = 1;
#endif
    if (team >= num_jobs) {
      job(thread, jobs + thread * job_size, job_arg);
    } else if (thread == 0) {  // a smaller team after all: the missing jobs get new threads
      run_jobs_on_new_threads(job, team, num_jobs, job_size, jobs, job_arg, 0);
    } else {
      job(thread, jobs + thread * job_size, job_arg);
    }
  }
}

// In a forked child only the forking thread exists. GNU libgomp cannot use a pool whose
// threads were not forked (a parallel region hangs), so a child of a process that ever
// started an OpenMP team computes on its calling thread; and the BLAS libraries get their
// own threads back (OpenBLAS restarts its pool in the child by itself).
//
// The pool belongs to libgomp, not to linmaps: PyTorch's wheel and a source build of linmaps
// share one libgomp, and so one pool, so after a single linmaps call in the parent PyTorch's
// own parallel regions in the child (a matmul, AccumulateGrad) hang too. The forking thread's
// nthreads-var ICV set to 1 makes every parallel region it starts without a num_threads
// clause, which is how PyTorch's at::parallel_for and MKL open theirs, run on this thread
// alone, as DataLoader workers do with torch.set_num_threads(1). Threads created in the child
// start with the process default and a fresh pool of their own, which works.
void after_fork_in_child() {
  forget_looks_in_child();  // the file this thread opened is its parent thread's
  if (g_state == nullptr || !g_state->team_started.load(std::memory_order_relaxed)) return;
  g_state->forked_child.store(true, std::memory_order_relaxed);
#ifdef _OPENMP
  omp_set_num_threads(1);
#endif
  // No lock: the child has one thread, and the mutexes may have been held by a thread that
  // does not exist here.
  new (&g_state->blas_call_mutex) std::mutex();
  for (const auto& library : g_state->blas_libraries) library.set_callback(nullptr);
  new (&g_state->blas_mutex) std::mutex();
  g_state->blas_libraries.clear();
  g_state->blas_sharing.store(false, std::memory_order_relaxed);
}

// dl_iterate_phdr's count of objects ever loaded into the process (glibc's dlpi_adds).
unsigned long long loaded_objects() {
  unsigned long long adds = 0;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t size, void* data) {
        if (size >= offsetof(dl_phdr_info, dlpi_adds) + sizeof(info->dlpi_adds)) {
          *static_cast<unsigned long long*>(data) = info->dlpi_adds;
        }
        return 1;  // the first object is enough
      },
      &adds);
  return adds;
}

std::vector<std::string> loaded_openblas_paths() {
  std::vector<std::string> paths;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        const std::string path = info->dlpi_name ? info->dlpi_name : "";
        const std::string name = path.substr(path.find_last_of('/') + 1);
        std::string lower = name;
        for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        if (lower.find("openblas") != std::string::npos) {
          static_cast<std::vector<std::string>*>(data)->push_back(path);
        }
        return 0;
      },
      &paths);
  return paths;
}

}  // namespace

ProcessState* new_process_state() {
  g_state = new ProcessState();  // never freed: BLAS libraries may hold the callback
  const char* adaptive = std::getenv("LINMAPS_ADAPTIVE_TEAM");
  g_state->adaptive_team = adaptive == nullptr || std::string(adaptive) != "0";
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  openmp_default();  // read the OpenMP process default now, not on the first call
  return g_state;
}

void use_process_state(ProcessState* state) {
  g_state = state;
  openmp_default();
}

int openmp_default() {
  static const int value = read_openmp_default();
  return value;
}

int cap() {
  static const int value = kCapPerCpu * usable_cpus();
  return value;
}

int setting() {
  const int value = g_state->setting.load(std::memory_order_relaxed);
  return value > 0 ? value : std::min(openmp_default(), cap());
}

void set_setting(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
  g_state->setting.store(std::min(n, cap()), std::memory_order_relaxed);
}

int for_call() {
  if (g_state->forked_child.load(std::memory_order_relaxed)) return 1;
  const int wanted = setting();
  const int icv = calling_thread_icv();
  if (icv != openmp_default()) return std::max(1, std::min(wanted, icv));
  return wanted;
}

namespace {

void engage_smaller_team(int team, std::int64_t now) {
  const std::int64_t until = g_state->contended_until_ns.load(std::memory_order_relaxed);
  if (now < until) {  // already engaged: a smaller team, the same deadline
    const int current = g_state->contended_team.load(std::memory_order_relaxed);
    g_state->contended_team.store(std::max(1, std::min(current, team - 1)),
                                  std::memory_order_relaxed);
    return;
  }
  // Found again right after the last period ended: the contention lasts, look less often.
  std::int64_t period = g_state->contended_period_ns.load(std::memory_order_relaxed);
  period = (period > 0 && now - until < kContendedPeriodNs)
               ? std::min(2 * period, kContendedPeriodMaxNs)
               : kContendedPeriodNs;
  g_state->contended_period_ns.store(period, std::memory_order_relaxed);
  g_state->contended_team.store(std::max(1, team - 1), std::memory_order_relaxed);
  g_state->contended_until_ns.store(now + period, std::memory_order_relaxed);
  g_state->contention_engaged.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

void look_for_contention(int team) {
  if (!g_state->adaptive_team || t_look.fd == -2) return;
  if (t_look.fd == -1) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/task/%ld/schedstat",
                  static_cast<long>(syscall(SYS_gettid)));
    t_look.fd = open(path, O_RDONLY | O_CLOEXEC);
    if (t_look.fd < 0 || !read_run_delay(t_look.fd, t_look.delay_ns)) {
      if (t_look.fd >= 0) close(t_look.fd);
      t_look.fd = -2;  // no schedstat in this kernel: the team stays as set
      return;
    }
    t_look.wall_ns = now_ns();
    return;
  }
  long long delay = 0;
  if (!read_run_delay(t_look.fd, delay)) return;
  const std::int64_t now = now_ns();
  const long long waited = delay - t_look.delay_ns, elapsed = now - t_look.wall_ns;
  t_look.delay_ns = delay;
  t_look.wall_ns = now;
  g_state->window_delay_ns.fetch_add(waited, std::memory_order_relaxed);
  const long long window = g_state->window_wall_ns.fetch_add(elapsed, std::memory_order_relaxed);
  if (window < kWindowNs && window + elapsed >= kWindowNs) {  // this look closes the window
    const long long window_delay = g_state->window_delay_ns.exchange(0);
    const long long window_wall = g_state->window_wall_ns.exchange(0);
    if (window_delay >= kContendedDelayNs &&
        static_cast<double>(window_delay) >= kContendedShare * static_cast<double>(window_wall)) {
      engage_smaller_team(team, now);
    }
  }
}

int contention_cap(int num_threads, double flops) {
  if (num_threads <= 1 || flops >= kContendedFlops || flops < detail::kSerialFlops) {
    return num_threads;
  }
  if (now_ns() >= g_state->contended_until_ns.load(std::memory_order_relaxed)) return num_threads;
  return std::max(1,
                  std::min(num_threads, g_state->contended_team.load(std::memory_order_relaxed)));
}

long long contention_engaged() {
  return g_state->contention_engaged.load(std::memory_order_relaxed);
}

void note_team_started() {
  if (!g_state->team_started.load(std::memory_order_relaxed)) {
    g_state->team_started.store(true, std::memory_order_relaxed);
  }
}

bool in_forked_child() { return g_state->forked_child.load(std::memory_order_relaxed); }

int team_size() {
  const int team = for_call();
  if (team <= 1) return 1;
  note_team_started();
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

std::string blas_install(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_state->blas_mutex);
  for (const auto& library : g_state->blas_libraries) {
    if (library.path == path) return library.symbol;
  }
  if (g_state->forked_child.load(std::memory_order_relaxed)) return "";
  // RTLD_NOLOAD: only a library this process has loaded already (NumPy's, SciPy's).
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return "";
  // The setter's name in plain OpenBLAS and in the scipy-openblas wheels NumPy and SciPy
  // bundle (symbol prefix scipy_, suffix 64_ for the 64-bit-integer build).
  static const char* const names[] = {
      "openblas_set_threads_callback_function",
      "scipy_openblas_set_threads_callback_function64_",
      "scipy_openblas_set_threads_callback_function",
      "openblas_set_threads_callback_function64_",
  };
  for (const char* name : names) {
    auto setter = reinterpret_cast<BlasCallbackSetter>(dlsym(handle, name));
    if (setter == nullptr) continue;
    setter(&linmaps_blas_threads);
    g_state->blas_libraries.push_back({path, name, handle, setter});
    return name;
  }
  dlclose(handle);
  return "";
}

void blas_uninstall() {
  std::lock_guard<std::mutex> lock(g_state->blas_mutex);
  for (const auto& library : g_state->blas_libraries) {
    library.set_callback(nullptr);
    // The handle stays open: a BLAS call that read the callback just before may still be
    // calling into this module.
  }
  g_state->blas_libraries.clear();
}

std::vector<std::pair<std::string, std::string>> blas_installed() {
  std::lock_guard<std::mutex> lock(g_state->blas_mutex);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& library : g_state->blas_libraries)
    out.emplace_back(library.path, library.symbol);
  return out;
}

void blas_set_sharing(bool enable) {
  g_state->blas_sharing.store(enable, std::memory_order_relaxed);
  g_state->loaded_objects_seen.store(0, std::memory_order_relaxed);
  if (!enable) blas_uninstall();
}

void blas_refresh() {
  if (!g_state->blas_sharing.load(std::memory_order_relaxed)) return;
  const unsigned long long adds = loaded_objects();
  if (adds != 0 && adds == g_state->loaded_objects_seen.load(std::memory_order_relaxed)) return;
  g_state->loaded_objects_seen.store(adds, std::memory_order_relaxed);
  for (const auto& path : loaded_openblas_paths()) blas_install(path);
}

bool blas_looked() { return g_state->loaded_objects_seen.load(std::memory_order_relaxed) != 0; }

long long blas_calls() { return g_state->blas_calls.load(std::memory_order_relaxed); }

}  // namespace threads
}  // namespace linmaps
