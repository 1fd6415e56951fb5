#include "kt/moe/calls.hpp"

#include <functional>
#include <stdexcept>
#include <utility>

#include "kt/moe/validate.hpp"

namespace kt::moe {
namespace {

std::shared_ptr<runtime::Job> start(runtime::PoolContext& pool, RunOn where, std::function<void()> work) {
  return where == RunOn::caller_if_idle ? pool.run_here_if_idle(std::move(work)) : pool.submit(std::move(work));
}

}  // namespace

void PendingCall::wait() const {
  if (job_) job_->wait();
}

bool PendingCall::done() const { return !job_ || job_->done(); }

std::exception_ptr PendingCall::error() const { return job_ ? job_->error() : nullptr; }

std::shared_ptr<ForwardCache> PendingCall::take_cache() {
  if (!slot_) return nullptr;
  wait();
  return std::move(slot_->cache);
}

PendingCall submit_forward(runtime::PoolContext& pool, MoELayer& layer, const View& x, const View& ids,
                           const View& weights, const View& out, const LoRAViews& lora, bool save, RunOn where) {
  validate_forward(layer.config(), x, ids, weights, out, lora);
  PendingCall call;
  if (save) call.slot_ = std::make_shared<PendingCall::CacheSlot>();
  MoELayer* target = &layer;
  call.job_ = start(pool, where, [target, x, ids, weights, out, lora, save, slot = call.slot_] {
    ForwardCachePtr cache = target->forward_validated(x, ids, weights, out, lora, save);
    if (!save) return;
    if (!cache) throw std::logic_error("internal error: MoELayer::forward(save=true) returned no cache");
    slot->cache = std::shared_ptr<ForwardCache>(std::move(cache));
  });
  return call;
}

PendingCall submit_backward(runtime::PoolContext& pool, MoELayer& layer, std::shared_ptr<ForwardCache> cache,
                            const View& grad_out, const View& grad_x, const View& grad_weights,
                            const LoRAGradViews& grads, RunOn where) {
  if (!cache) throw std::invalid_argument("saved: this forward's activation cache is gone");
  if (cache_layer(*cache) != &layer) throw std::invalid_argument("backward: the saved forward belongs to another layer");
  validate_backward(layer.config(), cache_tokens(*cache), cache_x(*cache), cache_lora(*cache), grad_out, grad_x,
                    grad_weights, grads, /*all_lora_grads=*/true);
  PendingCall call;
  MoELayer* target = &layer;
  call.job_ = start(pool, where, [target, cache = std::move(cache), grad_out, grad_x, grad_weights, grads] {
    target->backward_validated(*cache, grad_out, grad_x, grad_weights, grads);
  });
  return call;
}

PendingCall testing_failing_call(runtime::PoolContext& pool, const std::string& message) {
  PendingCall call;
  call.job_ = pool.submit([message] { throw std::invalid_argument(message); });
  return call;
}

}  // namespace kt::moe
