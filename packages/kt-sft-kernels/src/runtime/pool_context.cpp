#include "kt/runtime/pool_context.hpp"

#include <mutex>
#include <stdexcept>
#include <utility>

#include <unistd.h>

namespace kt::runtime {

std::shared_ptr<Job> PoolContext::submit(std::function<void()> work) {
  if (executor.on_executor_thread()) throw std::logic_error("a pool call was made from the pool's own executor thread");
  return executor.submit(std::move(work));
}

std::shared_ptr<Job> PoolContext::run_here_if_idle(std::function<void()> work) {
  if (caller_pinned) return submit(std::move(work));
  if (executor.on_executor_thread()) throw std::logic_error("a pool call was made from the pool's own executor thread");
  return executor.run_here_if_idle(std::move(work));
}

std::shared_ptr<PoolContext> make_pool_context(int threads, bool pin) {
  auto context = std::make_shared<PoolContext>();
  context->owned = std::make_unique<ThreadPool>(threads, pin);
  context->pool = context->owned.get();
  return context;
}

std::shared_ptr<PoolContext> default_pool_context() {
  // Never destroyed (like the default pool itself): nothing to order at interpreter exit.
  static std::mutex mutex;
  static std::shared_ptr<PoolContext>* context = nullptr;
  static pid_t context_pid = 0;
  std::lock_guard<std::mutex> lock(mutex);
  if (context == nullptr || context_pid != getpid()) {
    auto fresh = std::make_shared<PoolContext>();
    fresh->pool = &default_pool();
    context = new std::shared_ptr<PoolContext>(std::move(fresh));
    context_pid = getpid();
  }
  return *context;
}

}  // namespace kt::runtime
