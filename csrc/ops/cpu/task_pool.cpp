#include "ops/cpu/task_pool.h"

#include <ATen/Parallel.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace torchmoe::cpu {
namespace {

struct Job {
  const std::function<void(int64_t)>* task;  // only called for a claimed index, so never after run() returns
  int64_t num_tasks;
  std::atomic<int> seats{0};  // helpers that may still join (pool threads left from wider calls stay out)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
};

void work_on(Job& job) {
  for (int64_t i = job.next.fetch_add(1, std::memory_order_relaxed); i < job.num_tasks;
       i = job.next.fetch_add(1, std::memory_order_relaxed)) {
    (*job.task)(i);
    job.finished.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  static Pool& instance() {
    static auto* pool = [] {
      auto* p = new Pool();  // never destroyed: detached helpers wait on it until the process exits
      // A fork while a helper holds the lock must not leave the child's copy locked. The child has none of
      // the helpers (it starts its own when it needs them), and its copy of the condition variable still
      // counts the parent's waiting helpers (glibc's broadcast could wait for them forever): it gets a fresh
      // one (the old one is left as it is).
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] {
                       Pool& pool = instance();
                       pool.helpers_ = 0;
                       pool.current_.reset();
                       pool.wake_ = new std::condition_variable();
                       pool.mutex_.unlock();
                     });
      return p;
    }();
    return *pool;
  }

  void run(int64_t num_tasks, const std::function<void(int64_t)>& task, int helpers) {
    auto job = std::make_shared<Job>();
    job->task = &task;
    job->num_tasks = num_tasks;
    job->seats.store(helpers, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (helpers_ < helpers) {
        std::thread([this] { helper_loop(); }).detach();
        ++helpers_;
      }
      current_ = job;
      ++generation_;
    }
    wake_->notify_all();
    work_on(*job);
    // Every task is claimed; wait for the ones helpers are still running.
    for (int spins = 0; job->finished.load(std::memory_order_acquire) < num_tasks; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (current_ == job) current_.reset();
  }

 private:
  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_->wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = current_;
      }
      if (job && job->seats.fetch_sub(1, std::memory_order_relaxed) > 0) work_on(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable* wake_ = new std::condition_variable();  // replaced in a forked child
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  int helpers_ = 0;
};

}  // namespace

void run_claimed(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  const int64_t wanted = std::min<int64_t>(num_tasks, at::get_num_threads());
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(wanted);
  if (threads <= 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  Pool::instance().run(num_tasks, task, threads - 1);
}

}  // namespace torchmoe::cpu
