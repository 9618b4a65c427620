// A small pool for short, pure-compute task lists (grouped_mm's skinny products in a decode step).
//
// Why not at::parallel_for: an OpenMP region ends at a barrier that waits for every thread of the team to
// arrive, even one the OS has not scheduled yet. On a busy machine (more runnable threads than cores) that
// wait is a scheduler time slice, milliseconds, for a decode-size product that takes a fraction of one. Here
// the caller and the helpers claim tasks from a shared counter, and the caller waits only for tasks already
// claimed: a helper that wakes up after the last task was claimed does nothing, so the caller never waits
// for a thread to start. With idle cores the helpers wake within microseconds and share the work.
#pragma once

#include <cstdint>
#include <functional>

namespace torchmoe::cpu {

// Runs task(i) for every i in [0, num_tasks), on the calling thread and up to min(num_tasks,
// at::get_num_threads()) - 1 helper threads; returns when all have finished. Tasks run on threads without
// the caller's ATen thread-local state: they must be plain computation (no ATen ops) and must not throw.
// Inside an at::parallel_for region, or with one thread, everything runs on the caller.
void run_claimed(int64_t num_tasks, const std::function<void(int64_t)>& task);

}  // namespace torchmoe::cpu
