// Thread pool: one atomic job word publishes each parallel_for (its generation), tells whether
// workers may still join it and counts those inside; tasks are handed out through one atomic
// counter; workers spin for a short while after a job (back-to-back kernel phases find them awake),
// then sleep on a condition variable. A call returns once every task is done: it closes the job when
// the last task is handed out and waits only for the workers inside, never for a sleeping worker
// to wake up (on a VM that wake-up took up to ~2 ms, longer than a small phase itself).
#include "kt/runtime/thread_pool.hpp"
#include "kt/runtime/default_threads.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#include <unistd.h>

#include "kt/runtime/topology.hpp"

namespace kt::runtime {
namespace {

// The job word: generation (bits 33..63), closed (bit 32: every task is handed out, no worker may
// join), workers inside the job (bits 0..31).
constexpr std::uint64_t kClosed = std::uint64_t{1} << 32;
constexpr int kGenerationShift = 33;
inline std::uint64_t generation_of(std::uint64_t job) { return job >> kGenerationShift; }
inline std::uint32_t inside_of(std::uint64_t job) { return static_cast<std::uint32_t>(job); }

// How long an idle thread polls before it sleeps.
constexpr auto kSpinTime = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls ready() for up to kSpinTime; true if it became true.
template <class Ready>
bool spin_until(const Ready& ready) {
  const auto deadline = std::chrono::steady_clock::now() + kSpinTime;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    // Oversubscribed hosts: let the thread we wait for run.
    std::this_thread::yield();
  }
}

// One logical CPU per usable physical core (topology.cpp), ascending, for pinning.
std::vector<int> one_cpu_per_core() {
  std::vector<int> chosen;
  for (const NumaNode& node : read_topology("/").nodes) chosen.insert(chosen.end(), node.cores.begin(), node.cores.end());
  std::sort(chosen.begin(), chosen.end());
  if (chosen.empty()) chosen = affinity_cpus();
  return chosen;
}

bool pin_thread(std::thread& thread, int cpu) {
#if defined(__linux__)
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(thread.native_handle(), sizeof set, &set) == 0;
#else
  (void)thread, (void)cpu;
  return false;
#endif
}

// Threads of pools that outlived a fork(): they do not exist in the child, so they can be neither
// joined nor destroyed. Kept here, deliberately never freed.
void abandon_after_fork(std::vector<std::thread>& threads) {
  static auto* graveyard = new std::vector<std::thread>();
  for (std::thread& t : threads) graveyard->push_back(std::move(t));
  threads.clear();
}

}  // namespace

struct ThreadPool::Impl {
  int size = 1;
  bool pinned = false;
  std::vector<int> cpus;  // per thread (index 0 = caller); empty when not pinned
  pid_t owner_pid = 0;
  std::vector<std::thread> workers;

  // The job being run; written by the caller before `job` gets its new generation.
  const std::function<void(std::int64_t, int)>* fn = nullptr;
  std::int64_t num_tasks = 0;
  std::atomic<std::int64_t> next_task{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;  // guarded by error_mutex
  std::mutex error_mutex;

  std::atomic<std::uint64_t> job{kClosed};  // the job word (above); generation 0 is never run
  std::atomic<bool> stopping{false};
  std::mutex sleep_mutex;
  std::condition_variable wake_workers;
  std::condition_variable job_finished;

  std::mutex call_mutex;  // one parallel_for at a time

  void run_tasks(int thread);
  void worker_main(int thread);
  void start_workers();

  // The pool whose tasks this thread is running (to reject nested calls that would deadlock).
  static thread_local const Impl* running_here;
};

thread_local const ThreadPool::Impl* ThreadPool::Impl::running_here = nullptr;

void ThreadPool::Impl::run_tasks(int thread) {
  const Impl* const previous = running_here;
  running_here = this;
  struct Restore {
    const Impl* previous;
    ~Restore() { running_here = previous; }
  } restore{previous};
  while (!failed.load(std::memory_order_relaxed)) {
    const std::int64_t task = next_task.fetch_add(1, std::memory_order_relaxed);
    if (task >= num_tasks) break;
    try {
      (*fn)(task, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
}

void ThreadPool::Impl::worker_main(int thread) {
  std::uint64_t seen = 0;  // the generation this worker last looked at
  for (;;) {
    const auto has_news = [&] {
      return generation_of(job.load(std::memory_order_acquire)) != seen || stopping.load(std::memory_order_acquire);
    };
    if (!spin_until(has_news)) {
      std::unique_lock<std::mutex> lock(sleep_mutex);
      wake_workers.wait(lock, has_news);
    }
    if (stopping.load(std::memory_order_acquire)) return;
    // Join the current job unless it is closed (then its caller may already have returned).
    std::uint64_t word = job.load(std::memory_order_acquire);
    seen = generation_of(word);
    bool joined = false;
    while (!(word & kClosed) && generation_of(word) == seen) {
      if (job.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;
    run_tasks(thread);
    const std::uint64_t before = job.fetch_sub(1, std::memory_order_acq_rel);
    if ((before & kClosed) && inside_of(before) == 1) {  // the last one out of a closed job
      std::lock_guard<std::mutex> lock(sleep_mutex);
      job_finished.notify_one();
    }
  }
}

ThreadPool::ThreadPool(int threads, bool pin) : impl_(std::make_unique<Impl>()) {
  if (threads < 0)
    throw std::invalid_argument("threads must be >= 0 (0 = physical cores), got " + std::to_string(threads));
  impl_->size = threads == 0 ? default_thread_count() : threads;  // ADR 0901
  impl_->pinned = pin;
  if (pin) {
    const std::vector<int> cores = one_cpu_per_core();
    for (int i = 0; i < impl_->size; ++i) impl_->cpus.push_back(cores[static_cast<std::size_t>(i) % cores.size()]);
  }
  impl_->start_workers();
}

ThreadPool::ThreadPool(const std::vector<int>& cpus) : impl_(std::make_unique<Impl>()) {
  if (cpus.empty()) throw std::invalid_argument("cpus: a pool needs at least one CPU");
  const std::vector<int> allowed = affinity_cpus();
  for (int cpu : cpus)
    if (!std::binary_search(allowed.begin(), allowed.end(), cpu))
      throw std::invalid_argument("cpus: CPU " + std::to_string(cpu) +
                                  " is not in this process's affinity mask (sched_getaffinity)");
  impl_->size = static_cast<int>(cpus.size());
  impl_->pinned = true;
  impl_->cpus = cpus;
  impl_->start_workers();
}

void ThreadPool::Impl::start_workers() {
  owner_pid = getpid();
  workers.reserve(static_cast<std::size_t>(size - 1));
  try {
    for (int i = 1; i < size; ++i) {
      const int cpu = cpus.empty() ? -1 : cpus[static_cast<std::size_t>(i)];
      workers.emplace_back([this, i] { worker_main(i); });
      // Pinned here, not by the worker itself, so the mask is in place when the constructor returns.
      if (cpu >= 0) pin_thread(workers.back(), cpu);  // best effort: a refusal only costs speed
    }
  } catch (...) {
    // Thread creation failed part-way: stop the ones that started, then report.
    stopping.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex);
    }
    wake_workers.notify_all();
    for (std::thread& t : workers) t.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  if (getpid() != impl_->owner_pid) {
    abandon_after_fork(impl_->workers);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(impl_->sleep_mutex);
    impl_->stopping.store(true, std::memory_order_release);
  }
  impl_->wake_workers.notify_all();
  for (std::thread& t : impl_->workers) t.join();
}

int ThreadPool::size() const { return impl_->size; }
bool ThreadPool::pinned() const { return impl_->pinned; }
const std::vector<int>& ThreadPool::cpus() const { return impl_->cpus; }

std::vector<std::vector<int>> ThreadPool::worker_affinity() const {
  std::vector<std::vector<int>> masks;
#if defined(__linux__)
  for (const std::thread& t : impl_->workers) {
    std::vector<int> mask;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (pthread_getaffinity_np(const_cast<std::thread&>(t).native_handle(), sizeof set, &set) == 0)
      for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
        if (CPU_ISSET(cpu, &set)) mask.push_back(cpu);
    masks.push_back(std::move(mask));
  }
#endif
  return masks;
}

void ThreadPool::parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t, int)>& fn) {
  Impl& p = *impl_;
  if (Impl::running_here == &p)
    throw std::logic_error("ThreadPool.parallel_for called from inside one of its own tasks");
  if (getpid() != p.owner_pid)
    throw std::runtime_error("this thread pool was created before fork(); create a new one in the child process");
  if (num_tasks <= 0) return;

  std::lock_guard<std::mutex> call_lock(p.call_mutex);
  p.fn = &fn;
  p.num_tasks = num_tasks;
  p.next_task.store(0, std::memory_order_relaxed);
  p.failed.store(false, std::memory_order_relaxed);
  p.first_error = nullptr;

  // A single task or a single thread needs no workers.
  const bool use_workers = p.size > 1 && num_tasks > 1;
  if (use_workers) {
    {
      std::lock_guard<std::mutex> lock(p.sleep_mutex);  // a worker going to sleep sees it or is woken
      const std::uint64_t next = generation_of(p.job.load(std::memory_order_relaxed)) + 1;
      p.job.store(next << kGenerationShift, std::memory_order_release);  // open, nobody inside
    }
    p.wake_workers.notify_all();
  }
  p.run_tasks(0);
  if (use_workers) {
    // Every task is handed out: close the job and wait for the workers still running one.
    const std::uint64_t word = p.job.fetch_or(kClosed, std::memory_order_acq_rel);
    const auto all_done = [&p] { return inside_of(p.job.load(std::memory_order_acquire)) == 0; };
    if (inside_of(word) != 0 && !spin_until(all_done)) {
      std::unique_lock<std::mutex> lock(p.sleep_mutex);
      p.job_finished.wait(lock, all_done);
    }
  }
  p.fn = nullptr;
  if (p.first_error) std::rethrow_exception(std::exchange(p.first_error, nullptr));
}

int default_pool_threads() {
  const char* env = std::getenv("KT_SFT_NUM_THREADS");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(env, &end, 10);
  if (errno != 0 || end == env || *end != '\0' || value < 0 || value > 4096) {
    throw std::invalid_argument(std::string("KT_SFT_NUM_THREADS='") + env +
                                "' is not a thread count (an integer in [0, 4096]; 0 = physical cores)");
  }
  return static_cast<int>(value);
}

ThreadPool& default_pool() {
  // Never destroyed: its workers sleep until the process exits, so no exit-time ordering issue
  // with other static objects or with jobs still queued by the bindings.
  static std::mutex mutex;
  static ThreadPool* pool = nullptr;
  static pid_t pool_pid = 0;
  std::lock_guard<std::mutex> lock(mutex);
  if (pool == nullptr || pool_pid != getpid()) {
    pool = new ThreadPool(default_pool_threads());  // a pool from before fork() is left behind
    pool_pid = getpid();
  }
  return *pool;
}

std::vector<int> affinity_cpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
      if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
#endif
  if (cpus.empty()) {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < n; ++i) cpus.push_back(static_cast<int>(i));
  }
  return cpus;
}

bool pin_current_thread(int cpu) {
#if defined(__linux__)
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
#else
  (void)cpu;
  return false;
#endif
}

std::vector<int> current_thread_affinity() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (pthread_getaffinity_np(pthread_self(), sizeof set, &set) == 0)
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
      if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
#endif
  return cpus;
}

int physical_cores_available() {
  // The topology reader cuts the mask to physical cores and to the cgroup CPU limit.
  return std::max(1, read_topology("/").physical_cores());
}

}  // namespace kt::runtime
