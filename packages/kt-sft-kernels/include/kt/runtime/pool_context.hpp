// A thread pool as callers of the layer API see it: the pool plus the executor that serializes every
// call made on it (a sync call is an async call and a wait), so calls on one pool run one at a time,
// in the order they were made (DESIGN.md §3.3), whichever thread makes them.
#pragma once
#include <functional>
#include <memory>

#include "kt/runtime/serial_executor.hpp"
#include "kt/runtime/thread_pool.hpp"

namespace kt::runtime {

struct PoolContext {
  std::unique_ptr<ThreadPool> owned;  // null for the process default pool
  ThreadPool* pool = nullptr;
  // True when the executor thread was pinned as the pool's thread 0 (pinned pools from a CPU list):
  // then every call runs there, never on the caller's thread.
  bool caller_pinned = false;
  SerialExecutor executor;  // declared last: destroyed (drained, joined) before the pool

  // Queues work on the executor. Throws if called from the executor's own thread (it would wait for itself).
  std::shared_ptr<Job> submit(std::function<void()> work);
  // A sync call: runs work on the calling thread when the executor is idle and not pinned
  // (SerialExecutor::run_here_if_idle), else queues it like submit().
  std::shared_ptr<Job> run_here_if_idle(std::function<void()> work);
};

// A context owning a new pool of `threads` threads (0: the physical cores this process may use).
std::shared_ptr<PoolContext> make_pool_context(int threads, bool pin);
// The process-wide context around default_pool(); a fresh one in a child process after fork().
std::shared_ptr<PoolContext> default_pool_context();

}  // namespace kt::runtime
