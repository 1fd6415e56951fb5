#include "kt/runtime/serial_executor.hpp"

#include <stdexcept>
#include <utility>
#include <vector>

#include <unistd.h>

namespace kt::runtime {

void Job::execute() {
  try {
    work_();
  } catch (...) {
    error_ = std::current_exception();
  }
  work_ = nullptr;  // free what the work captured before anyone is told it finished
}

void Job::finish() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
  }
  finished_.notify_all();
}

void Job::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  finished_.wait(lock, [this] { return done_; });
}

bool Job::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

std::exception_ptr Job::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

SerialExecutor::~SerialExecutor() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (!thread_.joinable()) return;
  if (getpid() != owner_pid_) {
    // Created before fork(): the thread does not exist in this process; it can only be abandoned.
    static auto* graveyard = new std::vector<std::thread>();
    graveyard->push_back(std::move(thread_));
    return;
  }
  thread_.join();
}

std::shared_ptr<Job> SerialExecutor::submit(std::function<void()> work) {
  auto job = std::make_shared<Job>(std::move(work));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (thread_.joinable() && getpid() != owner_pid_)
      throw std::runtime_error("this thread pool was created before fork(); create a new one in the child process");
    if (!thread_.joinable()) {
      owner_pid_ = static_cast<int>(getpid());
      thread_ = std::thread([this] { thread_main(); });
    }
    queue_.push_back(job);
  }
  wake_.notify_one();
  return job;
}

std::shared_ptr<Job> SerialExecutor::run_here_if_idle(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (thread_.joinable() && getpid() != owner_pid_)
      throw std::runtime_error("this thread pool was created before fork(); create a new one in the child process");
    const bool idle = !busy_ && queue_.empty();
    if (idle) busy_ = true;
    if (!idle) {
      auto job = std::make_shared<Job>(std::move(work));
      if (!thread_.joinable()) {  // busy with another caller's inline job: the thread runs this one after it
        owner_pid_ = static_cast<int>(getpid());
        thread_ = std::thread([this] { thread_main(); });
      }
      queue_.push_back(job);
      wake_.notify_one();
      return job;
    }
  }
  auto job = std::make_shared<Job>(std::move(work));
  job->execute();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    busy_ = false;
  }
  job->finish();
  wake_.notify_one();  // jobs submitted while this one ran
  return job;
}

bool SerialExecutor::on_executor_thread() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::this_thread::get_id() == thread_.get_id();
}

void SerialExecutor::thread_main() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return (stopping_ || !queue_.empty()) && !busy_; });
      if (queue_.empty()) return;  // stopping, and nothing left to run
      job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    job->execute();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = false;
    }
    job->finish();
  }
}

}  // namespace kt::runtime
