// Output allocation for the CPU kernels, with large blocks kept for reuse.
//
// Why: glibc serves every block of 32 MiB or more with fresh mmap'd pages and unmaps it on free, so each
// large op output pays a page fault per 4 KiB on its first write (~15 ms for 64 MiB here, five times the
// write itself). A training step allocates the same large outputs every iteration; keeping the freed
// blocks (as PyTorch's CUDA caching allocator does on GPUs) makes that cost a one-time one, without holding
// more memory than the outputs need when shapes change from step to step.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torchmoe::cpu {

// at::empty on CPU; blocks of 1 MiB or more come from (and return to) a cache of freed blocks. The pages it
// holds never exceed the most its live blocks needed at once (see output_cache.cpp), and free blocks hold at
// most TORCHMOE_CPU_CACHE_MB MiB (read once; default 4096, 0 turns caching off), the longest-held going first.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the number of bytes freed.
int64_t release_cached_blocks();

// Bytes held in free cached blocks.
int64_t cached_bytes();

}  // namespace torchmoe::cpu
