// Stage profiler (DESIGN.md §3.5): named stages timed with the TSC on the thread that runs them.
//
// Disabled (the default) a timed scope costs one relaxed atomic load. Enabled, each scope adds to its
// thread's per-stage counters (exact totals, never dropped) and appends one event to its thread's
// fixed-size ring (the Chrome trace; the oldest events are overwritten, memory never grows).
// Read the results (stats, trace) while no kernel call is running.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace kt::runtime::profiler {

// The stages, in execution order. A phase (a parallel_for of the layer) is timed once per call on the
// calling thread (wall time) and per task on the thread that runs it (busy time), under one name.
// Some stages only time a part of another phase's tasks (busy time, nested): lora_b and act inside
// gate_up, lora_b inside down, bwd_act, bwd_db_d and bwd_lora_grads_gu_d inside bwd_down, bwd_da_gu
// inside bwd_gate_up. shard_*: a NUMA shard's driver (numa_shards > 1, wall time per shard and call):
// its LoRA slicing, its rounds 0-2, its waits for the other shards (at each barrier, and for the
// slowest shard at the end of the call: recorded on the calling thread). forward and backward are
// whole calls.
#define KT_SFT_PROFILE_STAGES(X) \
  X(route)                       \
  X(convert)                     \
  X(pack)                        \
  X(lora_a_gu)                   \
  X(gate_up)                     \
  X(lora_b)                      \
  X(act)                         \
  X(lora_a_d)                    \
  X(down)                        \
  X(combine)                     \
  X(bwd_lora_bt)                 \
  X(bwd_down)                    \
  X(bwd_act)                     \
  X(bwd_db_d)                    \
  X(bwd_lora_grads_gu_d)         \
  X(bwd_lora_bt_gu)              \
  X(bwd_gate_up)                 \
  X(bwd_da_gu)                   \
  X(bwd_combine)                 \
  X(shard_lora_slice)            \
  X(shard_round1)                \
  X(shard_barrier)               \
  X(shard_round2)                \
  X(forward)                     \
  X(backward)

enum class Stage : std::uint8_t {
#define KT_SFT_STAGE_ENUM(name) name,
  KT_SFT_PROFILE_STAGES(KT_SFT_STAGE_ENUM)
#undef KT_SFT_STAGE_ENUM
      count
};
constexpr int kStageCount = static_cast<int>(Stage::count);
const char* stage_name(Stage s);

// Whether an event is the wall time of a whole phase (caller thread) or one task's busy time.
enum class Kind : std::uint8_t { wall, busy };

extern std::atomic<bool> g_enabled;
inline bool enabled() { return g_enabled.load(std::memory_order_relaxed); }

void enable();   // calibrates the TSC on first use
void disable();
void reset();    // drops every counter and event
double tsc_hz();  // calibrated TSC frequency (calibrates if needed)
std::uint64_t now_ticks();
void record(Stage stage, Kind kind, std::uint64_t begin, std::uint64_t end);

// Events kept per thread (the ring's size); more threads than kMaxThreads share the last slot's
// counters and do not trace.
constexpr std::size_t kRingEvents = std::size_t{1} << 17;  // 3 MB a profiled thread (ADR 0402)
constexpr int kMaxThreads = 256;

struct StageStats {
  std::string name;
  std::uint64_t calls = 0;       // wall events (phase calls); 0 if the stage is only timed per task
  double total_s = 0, mean_s = 0;  // wall time (busy time when the stage has no wall events)
  std::uint64_t tasks = 0;       // busy events
  double busy_s = 0;             // sum of task times over all threads
  int threads = 0;               // threads that ran tasks of this stage
  double imbalance = 0;          // max per-thread busy / mean per-thread busy (1 = balanced)
};
std::vector<StageStats> stats();  // stages that recorded something, in stage order

// Writes a Chrome trace (JSON object with "traceEvents"); returns the number of events written.
std::size_t dump_chrome_trace(const std::string& path);

// RAII timer: records [construction, destruction) when the profiler was enabled at construction.
class Scope {
 public:
  Scope(Stage stage, Kind kind) : stage_(stage), kind_(kind), begin_(enabled() ? now_ticks() : 0) {}
  ~Scope() {
    if (begin_) record(stage_, kind_, begin_, now_ticks());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Stage stage_;
  Kind kind_;
  std::uint64_t begin_;
};

}  // namespace kt::runtime::profiler
