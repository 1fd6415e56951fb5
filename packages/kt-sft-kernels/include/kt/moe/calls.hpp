// Layer calls queued on a pool (DESIGN.md §3.3 async): the arguments are validated in the calling
// thread when the call is submitted (so a mistake raises there, not at wait()), the work runs on the
// pool's executor in submission order, and a PendingCall that is dropped waits for its work. The
// caller keeps the memory behind every view alive until the call is done (the bindings hold the
// Python owners next to the PendingCall).
#pragma once
#include <exception>
#include <memory>
#include <string>
#include <utility>

#include "kt/moe/layer.hpp"
#include "kt/runtime/pool_context.hpp"

namespace kt::moe {

// Where a call's work runs: queued on the pool's executor (async calls), or on the calling thread
// when the executor is idle (sync calls: PoolContext::run_here_if_idle; the caller must not hold
// anything the work waits for, e.g. Python's GIL).
enum class RunOn { executor, caller_if_idle };

class PendingCall {
 public:
  PendingCall() = default;
  PendingCall(PendingCall&&) = default;
  PendingCall& operator=(PendingCall&& other) noexcept {  // waits for the work it held first
    wait();
    job_ = std::move(other.job_);
    slot_ = std::move(other.slot_);
    return *this;
  }
  PendingCall(const PendingCall&) = delete;
  PendingCall& operator=(const PendingCall&) = delete;
  ~PendingCall() { wait(); }

  void wait() const;                 // blocks until the work ran; throws nothing (see error())
  bool done() const;                 // never blocks
  std::exception_ptr error() const;  // what the work threw, once done
  // forward(save=true), once done without error: the activation cache (then empty).
  std::shared_ptr<ForwardCache> take_cache();

 private:
  friend PendingCall submit_forward(runtime::PoolContext&, MoELayer&, const View&, const View&, const View&,
                                    const View&, const LoRAViews&, bool, RunOn);
  friend PendingCall submit_backward(runtime::PoolContext&, MoELayer&, std::shared_ptr<ForwardCache>, const View&,
                                     const View&, const View&, const LoRAGradViews&, RunOn);
  friend PendingCall testing_failing_call(runtime::PoolContext&, const std::string&);
  struct CacheSlot {
    std::shared_ptr<ForwardCache> cache;
  };
  std::shared_ptr<runtime::Job> job_;
  std::shared_ptr<CacheSlot> slot_;
};

// Validates (validate_forward) and queues layer.forward.
PendingCall submit_forward(runtime::PoolContext& pool, MoELayer& layer, const View& x, const View& ids,
                           const View& weights, const View& out, const LoRAViews& lora, bool save,
                           RunOn where = RunOn::executor);
// Validates (validate_backward: every LoRA gradient of the forward's LoRA required) and queues
// layer.backward; the cache stays alive until the work ran.
PendingCall submit_backward(runtime::PoolContext& pool, MoELayer& layer, std::shared_ptr<ForwardCache> cache,
                            const View& grad_out, const View& grad_x, const View& grad_weights,
                            const LoRAGradViews& grads, RunOn where = RunOn::executor);

// Test hook: a call whose work throws std::invalid_argument(message).
PendingCall testing_failing_call(runtime::PoolContext& pool, const std::string& message);

}  // namespace kt::moe
