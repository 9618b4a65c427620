// at::parallel_for for bodies that call ATen ops.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

namespace torchmoe::cpu {

// Workers run fn(begin, end) with the caller's thread-local state (dispatch key exclusions, grad mode, ...),
// so ATen ops inside behave as on the caller: below autograd in a kernel, for one.
// A range that at::parallel_for would run inline anyway runs here without capturing the state (about a
// microsecond per call, which decode-sized calls notice).
template <typename Fn>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain_size, const Fn& fn) {
  if (begin >= end) return;
  if (end - begin <= std::max<int64_t>(grain_size, 1) || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(begin, end);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain_size, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard guard(state);
    fn(first, last);
  });
}

}  // namespace torchmoe::cpu
