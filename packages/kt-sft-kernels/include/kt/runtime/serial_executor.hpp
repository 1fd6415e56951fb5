// One background thread that runs submitted jobs one at a time, in submission order. The bindings
// give every thread pool one of these, so calls on a pool (sync or async, from any Python thread)
// never overlap and run in the order they were made (DESIGN.md §3.3: one call in flight per pool).
#pragma once
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace kt::runtime {

class Job {
 public:
  explicit Job(std::function<void()> work) : work_(std::move(work)) {}
  // Blocks until the job has run; rethrows nothing (see error()).
  void wait();
  bool done() const;
  std::exception_ptr error() const;  // what the work threw, once done

 private:
  friend class SerialExecutor;
  // The executor runs a job in two steps so that it is idle again before anyone learns the job
  // finished: a caller's next sync call then always finds it idle and runs on the caller's thread.
  void execute();  // the work; what it throws is kept for error()
  void finish();   // done: wakes wait()
  std::function<void()> work_;  // released (destroyed) on the executor thread right after running
  std::exception_ptr error_;
  mutable std::mutex mutex_;
  std::condition_variable finished_;
  bool done_ = false;
};

class SerialExecutor {
 public:
  SerialExecutor() = default;
  ~SerialExecutor();  // runs what is still queued, then stops the thread
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // Queues work; the thread starts on the first submit. Throws std::runtime_error in a child
  // process when the executor was created before fork().
  std::shared_ptr<Job> submit(std::function<void()> work);
  // Runs work on the calling thread when nothing is queued or running (the job it returns is then
  // done), else submits it. Jobs submitted meanwhile wait for it, so the order of calls still holds.
  // Saves a sync call the two thread hand-offs of submit + wait (tens of microseconds a call).
  std::shared_ptr<Job> run_here_if_idle(std::function<void()> work);
  // True on the executor's own thread (a job submitting to its own executor would deadlock waiting).
  bool on_executor_thread() const;

 private:
  void thread_main();
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  bool busy_ = false;  // a job is running, on the executor thread or (run_here_if_idle) on a caller's
  std::thread thread_;
  int owner_pid_ = 0;
};

}  // namespace kt::runtime
