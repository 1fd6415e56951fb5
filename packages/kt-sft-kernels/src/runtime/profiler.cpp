// Stage profiler: per-thread counters and event rings, TSC calibration, stats and Chrome trace.
#include "kt/runtime/profiler.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <x86intrin.h>
#define KT_SFT_HAVE_RDTSC 1
#endif

namespace kt::runtime::profiler {

std::atomic<bool> g_enabled{false};

namespace {

constexpr const char* kStageNames[] = {
#define KT_SFT_STAGE_NAME(name) #name,
    KT_SFT_PROFILE_STAGES(KT_SFT_STAGE_NAME)
#undef KT_SFT_STAGE_NAME
};
static_assert(sizeof(kStageNames) / sizeof(kStageNames[0]) == kStageCount);

struct Event {
  std::uint64_t begin, end;
  Stage stage;
  Kind kind;
};

// One thread's data. Only its thread writes; readers (stats, trace) run while kernels are idle.
// The counters are atomics (relaxed) so a concurrent read is merely stale, never undefined.
struct Slot {
  std::atomic<std::uint64_t> count[2][kStageCount] = {};
  std::atomic<std::uint64_t> ticks[2][kStageCount] = {};
  std::unique_ptr<Event[]> ring = std::make_unique<Event[]>(kRingEvents);
  std::atomic<std::uint64_t> written{0};  // events ever written; ring index = written % kRingEvents
  bool traced = true;                     // false for the shared overflow slot

  void clear() {
    for (auto& per_kind : count)
      for (auto& c : per_kind) c.store(0, std::memory_order_relaxed);
    for (auto& per_kind : ticks)
      for (auto& t : per_kind) t.store(0, std::memory_order_relaxed);
    written.store(0, std::memory_order_relaxed);
  }
};

struct Registry {
  std::mutex mutex;  // guards slot creation, calibration and the readers
  std::unique_ptr<Slot> slots[kMaxThreads];
  std::atomic<int> used{0};
  double hz = 0;
};

Registry& registry() {
  static Registry r;
  return r;
}

Slot& my_slot() {
  thread_local Slot* slot = nullptr;
  if (slot) return *slot;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  int index = r.used.load(std::memory_order_relaxed);
  if (index < kMaxThreads) {
    r.slots[index] = std::make_unique<Slot>();
    r.used.store(index + 1, std::memory_order_release);
  } else {
    index = kMaxThreads - 1;  // overflow: share the last slot's counters (racy counts, no trace)
    r.slots[index]->traced = false;
  }
  slot = r.slots[index].get();
  return *slot;
}

double calibrate_locked(Registry& r) {
  if (r.hz > 0) return r.hz;
#ifdef KT_SFT_HAVE_RDTSC
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const std::uint64_t c0 = __rdtsc();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto t1 = clock::now();
  const std::uint64_t c1 = __rdtsc();
  const double seconds = std::chrono::duration<double>(t1 - t0).count();
  r.hz = static_cast<double>(c1 - c0) / seconds;
#else
  r.hz = 1e9;  // now_ticks() counts steady_clock nanoseconds
#endif
  return r.hz;
}

std::string json_escape(const char* s) {
  std::string out;
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    out += *s;
  }
  return out;
}

}  // namespace

const char* stage_name(Stage s) {
  const int i = static_cast<int>(s);
  return i >= 0 && i < kStageCount ? kStageNames[i] : "?";
}

std::uint64_t now_ticks() {
#ifdef KT_SFT_HAVE_RDTSC
  return __rdtsc();
#else
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
#endif
}

void enable() {
  Registry& r = registry();
  {
    const std::lock_guard<std::mutex> lock(r.mutex);
    calibrate_locked(r);
  }
  g_enabled.store(true, std::memory_order_relaxed);
}

void disable() { g_enabled.store(false, std::memory_order_relaxed); }

void reset() {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const int used = r.used.load(std::memory_order_acquire);
  for (int i = 0; i < used; ++i) r.slots[i]->clear();
}

double tsc_hz() {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  return calibrate_locked(r);
}

void record(Stage stage, Kind kind, std::uint64_t begin, std::uint64_t end) {
  Slot& s = my_slot();
  const int k = static_cast<int>(kind), st = static_cast<int>(stage);
  const std::uint64_t ticks = end > begin ? end - begin : 0;
  s.count[k][st].store(s.count[k][st].load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  s.ticks[k][st].store(s.ticks[k][st].load(std::memory_order_relaxed) + ticks, std::memory_order_relaxed);
  if (!s.traced) return;
  const std::uint64_t n = s.written.load(std::memory_order_relaxed);
  s.ring[n % kRingEvents] = Event{begin, end, stage, kind};
  s.written.store(n + 1, std::memory_order_release);
}

std::vector<StageStats> stats() {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const double hz = calibrate_locked(r);
  const int used = r.used.load(std::memory_order_acquire);
  std::vector<StageStats> out;
  for (int st = 0; st < kStageCount; ++st) {
    StageStats s;
    s.name = kStageNames[st];
    std::uint64_t wall_ticks = 0, busy_ticks = 0, max_thread_busy = 0;
    for (int i = 0; i < used; ++i) {
      const Slot& slot = *r.slots[i];
      s.calls += slot.count[0][st].load(std::memory_order_relaxed);
      wall_ticks += slot.ticks[0][st].load(std::memory_order_relaxed);
      const std::uint64_t tasks = slot.count[1][st].load(std::memory_order_relaxed);
      const std::uint64_t busy = slot.ticks[1][st].load(std::memory_order_relaxed);
      if (tasks == 0) continue;
      s.tasks += tasks;
      busy_ticks += busy;
      max_thread_busy = std::max(max_thread_busy, busy);
      ++s.threads;
    }
    if (s.calls == 0 && s.tasks == 0) continue;
    s.busy_s = static_cast<double>(busy_ticks) / hz;
    if (s.calls) {
      s.total_s = static_cast<double>(wall_ticks) / hz;
      s.mean_s = s.total_s / static_cast<double>(s.calls);
    } else {
      s.total_s = s.busy_s;
      s.mean_s = s.busy_s / static_cast<double>(s.tasks);
    }
    s.imbalance = busy_ticks ? static_cast<double>(max_thread_busy) * s.threads / static_cast<double>(busy_ticks) : 0;
    out.push_back(s);
  }
  return out;
}

std::size_t dump_chrome_trace(const std::string& path) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const double hz = calibrate_locked(r);
  const int used = r.used.load(std::memory_order_acquire);
  // Timestamps relative to the oldest event kept, in microseconds.
  std::uint64_t origin = UINT64_MAX;
  for (int i = 0; i < used; ++i) {
    const Slot& s = *r.slots[i];
    const std::uint64_t n = s.written.load(std::memory_order_acquire);
    const std::uint64_t first = n > kRingEvents ? n - kRingEvents : 0;
    for (std::uint64_t e = first; e < n; ++e) origin = std::min(origin, s.ring[e % kRingEvents].begin);
  }
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("profiler: cannot open '" + path + "' for writing");
  // The origin on steady_clock (CLOCK_MONOTONIC, Python's perf_counter on Linux), so the trace can be
  // merged with other timelines even after the ring dropped the oldest events. Anchored on a (ticks,
  // steady) pair taken now: the 20 ms calibration's rate error then spans only the trace itself, not
  // the minutes since calibration (which drifted by milliseconds in a long test session).
  const double now_s = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  const std::uint64_t now = now_ticks();
  const double origin_steady_s =
      origin == UINT64_MAX ? 0.0 : now_s - (static_cast<double>(now) - static_cast<double>(origin)) / hz;
  std::fprintf(f,
               "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"tsc_hz\":%.1f,\"ring_events_per_thread\":%zu,"
               "\"origin_steady_s\":%.6f},",
               hz, kRingEvents, origin_steady_s);
  std::fprintf(f, "\"traceEvents\":[");
  std::size_t written = 0;
  const double us_per_tick = 1e6 / hz;
  for (int i = 0; i < used; ++i) {
    std::fprintf(f, "%s{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,\"args\":{\"name\":\"kt thread %d\"}}",
                 i ? "," : "", i, i);
    const Slot& s = *r.slots[i];
    if (!s.traced) continue;
    const std::uint64_t n = s.written.load(std::memory_order_acquire);
    const std::uint64_t first = n > kRingEvents ? n - kRingEvents : 0;
    for (std::uint64_t e = first; e < n; ++e) {
      const Event& ev = s.ring[e % kRingEvents];
      const std::string name = json_escape(stage_name(ev.stage));
      std::fprintf(f, ",{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f}",
                   name.c_str(), ev.kind == Kind::wall ? "phase" : "task", i,
                   static_cast<double>(ev.begin - origin) * us_per_tick,
                   static_cast<double>(ev.end - ev.begin) * us_per_tick);
      ++written;
    }
  }
  std::fprintf(f, "]}\n");
  const bool ok = std::fclose(f) == 0;
  if (!ok) throw std::runtime_error("profiler: writing '" + path + "' failed");
  return written;
}

}  // namespace kt::runtime::profiler
