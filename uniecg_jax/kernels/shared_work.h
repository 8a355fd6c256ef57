// Items [0, count) shared by the calling thread and `helpers` threads of XLA's intra-op pool, for
// the kernels' FFI handlers (native.py hashes this header into every kernel's build key).
//
// Items are claimed in chunks from a counter, so a helper that starts late (its thread busy
// elsewhere) finds nothing left and the caller never waits on a task that has not started; the
// caller then spins until every claimed chunk is done, yielding the core now and then, since a
// helper descheduled by another busy thread (e.g. PyTorch's spinning OpenMP workers) needs it.
//
// `make_worker()` runs once on each participating thread and returns that thread's
// `void(int64_t begin, int64_t end)` (with its own scratch). A helper may run it after the handler
// has returned, so it must capture what it reads by value (a shared_ptr to the kernel's state),
// and it touches no buffer unless it claims a chunk.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace uniecg {

template <typename MakeWorker>
void RunShared(xla::ffi::ThreadPool pool, int64_t helpers, int64_t count, int64_t chunk,
               MakeWorker make_worker) {
  struct Counter {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counter = std::make_shared<Counter>();
  auto run = [counter, count, chunk, make_worker] {
    auto worker = make_worker();
    for (;;) {
      const int64_t begin = counter->next.fetch_add(chunk);
      if (begin >= count) return;
      const int64_t end = std::min(begin + chunk, count);
      worker(begin, end);
      counter->done.fetch_add(end - begin, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = run;   // Schedule takes its task by value
    pool.Schedule(std::move(task));
  }
  run();
  for (int64_t spins = 1; counter->done.load(std::memory_order_acquire) < count; ++spins) {
    if (spins % 256 == 0) std::this_thread::yield();
  }
}

}  // namespace uniecg
