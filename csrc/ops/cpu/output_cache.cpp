// The cache keeps one invariant: the memory it holds (pages of live blocks plus pages of free blocks) never
// exceeds the most the live blocks ever needed at once, so it cannot raise a process's peak memory over running
// without it. Three rules keep it (the bound of PyTorch's CUDA caching allocator and of jemalloc's decay, made
// strict):
//  - best fit: a request takes the smallest free block at least its size;
//  - trimming: a block handed out for fewer bytes than it has resident gives the pages past the request back
//    to the OS (madvise(MADV_DONTNEED); the block keeps its address range and refaults them if reused larger),
//    so a live output never holds more pages than it asked for;
//  - freeing before growing: a request that needs G new resident bytes (all of them on a miss, the part past a
//    reused block's resident pages on a hit) first unmaps the longest-held free blocks holding at least G bytes
//    of pages (or all of them).
// Blocks are mmap'd and munmap'd by the cache itself, so a block it lets go returns its pages to the OS at once
// (glibc would keep freed blocks below its mmap threshold in its heap).
#include "ops/cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace torchmoe::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kRounding = size_t{1} << 16;  // sizes differing by a few rows share blocks (page multiple)
constexpr size_t kDefaultLimitBytes = size_t{4096} << 20;

size_t cache_limit_from_env() {
  const char* text = std::getenv("TORCHMOE_CPU_CACHE_MB");
  if (text == nullptr || text[0] == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || mb < 0) return kDefaultLimitBytes;
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  size_t size;      // mapped bytes
  size_t resident;  // bytes from the start that may hold pages (an upper bound)
  uint64_t age;     // order of release (free blocks)
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t size = (nbytes + kRounding - 1) / kRounding * kRounding;
    void* block = nullptr;
    std::vector<std::pair<void*, size_t>> unmap;
    size_t trim_from = 0, trim_to = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit; among equal sizes the most recently freed (warmest).
      auto fit = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const Block& b = it->second;
        if (b.size < size) continue;
        if (fit == free_.end() || b.size < fit->second.size ||
            (b.size == fit->second.size && b.age > fit->second.age)) {
          fit = it;
        }
      }
      size_t needed = size;  // new resident bytes this request adds
      Block taken{size, size, 0};
      if (fit != free_.end()) {
        block = fit->first;
        taken = fit->second;
        free_bytes_ -= taken.resident;
        needed = taken.resident >= size ? 0 : size - taken.resident;
        if (taken.resident > size) {
          trim_from = size;
          trim_to = taken.resident;
        }
        taken.resident = size;
        free_.erase(fit);
      }
      evict_locked(needed, unmap);
      if (block != nullptr) in_use_[block] = taken;
    }
    for (const auto& [b, s] : unmap) munmap(b, s);
    if (block != nullptr) {
      if (trim_to > trim_from) madvise(static_cast<char*>(block) + trim_from, trim_to - trim_from, MADV_DONTNEED);
    } else {
      void* mapped = map_block(size);
      if (mapped == MAP_FAILED) {
        release();  // free blocks of other sizes may be what is in the way
        mapped = map_block(size);
      }
      TORCH_CHECK(mapped != MAP_FAILED, "torchmoe: out of CPU memory allocating ", size, " bytes");
      block = mapped;
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_[block] = Block{size, size, 0};
    }
    return {block, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release() {
    std::vector<std::pair<void*, size_t>> unmap;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      bytes = static_cast<int64_t>(free_bytes_);
      for (const auto& [b, info] : free_) unmap.emplace_back(b, info.size);
      free_.clear();
      free_bytes_ = 0;
    }
    for (const auto& [b, s] : unmap) munmap(b, s);
    return bytes;
  }

  int64_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(free_bytes_);
  }

  static BlockCache& instance() {
    static auto* cache = [] {
      auto* c = new BlockCache();  // never destroyed: outputs may be freed during static destruction
      // A fork while another thread holds the lock (DataLoader workers fork) must not leave the child's
      // copy locked forever: hold it across the fork.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return c;
    }();
    return *cache;
  }

 private:
  static void give_back(void* block) { instance().put(block); }

  static void* map_block(size_t size) {
    return mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }

  // Moves the longest-held free blocks to `unmap` until they held at least `bytes` resident bytes (or none
  // is left).
  void evict_locked(size_t bytes, std::vector<std::pair<void*, size_t>>& unmap) {
    size_t evicted = 0;
    while (evicted < bytes && !free_.empty()) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.age < oldest->second.age) oldest = it;
      }
      evicted += oldest->second.resident;
      free_bytes_ -= oldest->second.resident;
      unmap.emplace_back(oldest->first, oldest->second.size);
      free_.erase(oldest);
    }
  }

  // Keeps the block, evicting the longest-held free blocks if the cache would exceed its limit.
  void put(void* block) {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = in_use_.find(block);
      TORCH_INTERNAL_ASSERT(it != in_use_.end(), "torchmoe: freeing a block the output cache does not own");
      Block info = it->second;
      in_use_.erase(it);
      if (info.resident > limit_) {
        unmap.emplace_back(block, info.size);
      } else {
        if (free_bytes_ + info.resident > limit_) evict_locked(free_bytes_ + info.resident - limit_, unmap);
        info.age = next_age_++;
        free_.emplace_back(block, info);
        free_bytes_ += info.resident;
      }
    }
    for (const auto& [b, s] : unmap) munmap(b, s);
  }

  const size_t limit_ = cache_limit_from_env();
  std::mutex mutex_;
  std::vector<std::pair<void*, Block>> free_;  // a few dozen at most: linear scans
  uint64_t next_age_ = 0;
  std::unordered_map<void*, Block> in_use_;
  size_t free_bytes_ = 0;  // resident bytes of the free blocks
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

int64_t release_cached_blocks() { return BlockCache::instance().release(); }

int64_t cached_bytes() { return BlockCache::instance().free_bytes(); }

// No tensor arguments, so no backend key to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(torchmoe, CompositeExplicitAutograd, m) {
  m.impl("_cpu_cache_bytes", &cached_bytes);
  m.impl("_cpu_cache_release", &release_cached_blocks);
}

}  // namespace torchmoe::cpu
