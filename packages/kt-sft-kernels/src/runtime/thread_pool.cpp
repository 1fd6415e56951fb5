// Thread pool: a generation counter publishes each parallel_for; tasks are handed out through one
// atomic counter; workers spin for a short while after a job (back-to-back kernel phases find them
// awake), then sleep on a condition variable.
#include "kt/runtime/thread_pool.hpp"
#include "kt/runtime/default_threads.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
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
#include <fcntl.h>
#include <unistd.h>

namespace kt::runtime {
namespace {

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

// A small non-negative integer from a sysfs file; -1 if unreadable. Plain POSIX I/O: this runs
// when the default pool is created, and needs neither iostreams nor locales.
int read_sysfs_int(int cpu, const char* name) {
  char path[128];
  std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/%s", cpu, name);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char text[32];
  const ssize_t got = ::read(fd, text, sizeof text - 1);
  ::close(fd);
  if (got <= 0) return -1;
  int value = 0;
  ssize_t i = 0;
  for (; i < got && text[i] >= '0' && text[i] <= '9'; ++i) {
    value = value * 10 + (text[i] - '0');
    if (value > 1 << 24) return -1;
  }
  return i > 0 ? value : -1;
}

// (package, core) of a logical CPU, or {-1, -1} if the topology is unreadable.
std::pair<int, int> core_of(int cpu) {
  const int package = read_sysfs_int(cpu, "physical_package_id");
  const int core = read_sysfs_int(cpu, "core_id");
  if (package < 0 || core < 0) return {-1, -1};
  return {package, core};
}

// One logical CPU per physical core of the affinity mask, for pinning.
std::vector<int> one_cpu_per_core() {
  std::vector<int> chosen;
  std::vector<std::pair<int, int>> seen;
  for (int cpu : affinity_cpus()) {
    const std::pair<int, int> key = core_of(cpu);
    if (key.first >= 0 && std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
    seen.push_back(key);
    chosen.push_back(cpu);
  }
  return chosen;
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
  pid_t owner_pid = 0;
  std::vector<std::thread> workers;

  // The job being run; written by the caller before `generation` is bumped.
  const std::function<void(std::int64_t, int)>* fn = nullptr;
  std::int64_t num_tasks = 0;
  std::atomic<std::int64_t> next_task{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;  // guarded by error_mutex
  std::mutex error_mutex;

  std::atomic<std::uint64_t> generation{0};
  std::atomic<int> workers_running{0};  // workers that have not finished the current job
  std::atomic<bool> stopping{false};
  std::mutex sleep_mutex;
  std::condition_variable wake_workers;
  std::condition_variable job_finished;

  std::mutex call_mutex;  // one parallel_for at a time

  void run_tasks(int thread);
  void worker_main(int thread, int cpu);

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

void ThreadPool::Impl::worker_main(int thread, int cpu) {
#if defined(__linux__)
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);  // best effort: a refusal only costs speed
  }
#else
  (void)cpu;
#endif
  std::uint64_t seen = 0;
  for (;;) {
    const auto has_news = [&] {
      return generation.load(std::memory_order_acquire) != seen || stopping.load(std::memory_order_acquire);
    };
    if (!spin_until(has_news)) {
      std::unique_lock<std::mutex> lock(sleep_mutex);
      wake_workers.wait(lock, has_news);
    }
    if (stopping.load(std::memory_order_acquire)) return;
    seen = generation.load(std::memory_order_acquire);
    run_tasks(thread);
    if (workers_running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
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
  impl_->owner_pid = getpid();
  const std::vector<int> cpus = pin ? one_cpu_per_core() : std::vector<int>{};
  impl_->workers.reserve(static_cast<std::size_t>(impl_->size - 1));
  try {
    for (int i = 1; i < impl_->size; ++i) {
      const int cpu = cpus.empty() ? -1 : cpus[static_cast<std::size_t>(i) % cpus.size()];
      impl_->workers.emplace_back([impl = impl_.get(), i, cpu] { impl->worker_main(i, cpu); });
    }
  } catch (...) {
    // Thread creation failed part-way: stop the ones that started, then report.
    impl_->stopping.store(true);
    {
      std::lock_guard<std::mutex> lock(impl_->sleep_mutex);
    }
    impl_->wake_workers.notify_all();
    for (std::thread& t : impl_->workers) t.join();
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
    p.workers_running.store(p.size - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(p.sleep_mutex);
      p.generation.fetch_add(1, std::memory_order_release);
    }
    p.wake_workers.notify_all();
  }
  p.run_tasks(0);
  if (use_workers) {
    const auto all_done = [&p] { return p.workers_running.load(std::memory_order_acquire) == 0; };
    if (!spin_until(all_done)) {
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

int physical_cores_available() {
  const std::vector<int> cpus = affinity_cpus();
  std::vector<std::pair<int, int>> cores;
  cores.reserve(cpus.size());
  for (int cpu : cpus) {
    const std::pair<int, int> key = core_of(cpu);
    if (key.first < 0) return static_cast<int>(cpus.size());
    cores.push_back(key);
  }
  std::sort(cores.begin(), cores.end());
  const auto distinct = std::unique(cores.begin(), cores.end()) - cores.begin();
  return std::max(1, static_cast<int>(distinct));
}

}  // namespace kt::runtime
