#include "ops/cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace torchmoe::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kRounding = size_t{1} << 16;  // sizes differing by a few rows share blocks
constexpr size_t kAlignment = 64;
constexpr size_t kDefaultLimitBytes = size_t{4096} << 20;

size_t cache_limit_from_env() {
  const char* text = std::getenv("TORCHMOE_CPU_CACHE_MB");
  if (text == nullptr || text[0] == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || mb < 0) return kDefaultLimitBytes;
  return static_cast<size_t>(mb) << 20;
}

// Free blocks by size, and the size of every block handed out (the deleter only gets the pointer).
class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t size = (nbytes + kRounding - 1) / kRounding * kRounding;
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        block = it->second.back().block;
        it->second.pop_back();
        if (it->second.empty()) free_.erase(it);
        free_bytes_ -= size;
      }
    }
    if (block == nullptr) {
      block = std::aligned_alloc(kAlignment, size);
      if (block == nullptr) {
        release();  // cached blocks may be what is in the way
        block = std::aligned_alloc(kAlignment, size);
      }
      TORCH_CHECK(block != nullptr, "torchmoe: out of CPU memory allocating ", size, " bytes");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_[block] = size;
    }
    return {block, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t release() {
    std::vector<void*> blocks;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [size, list] : free_) {
        bytes += static_cast<int64_t>(size * list.size());
        for (const auto& f : list) blocks.push_back(f.block);
      }
      free_.clear();
      free_bytes_ = 0;
    }
    for (void* b : blocks) std::free(b);
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

  // Keeps the block, evicting the longest-held free blocks if the cache would exceed its limit: with
  // changing shapes, old sizes stop coming back and the recent ones are the useful ones.
  void put(void* block) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = in_use_.find(block);
      TORCH_INTERNAL_ASSERT(it != in_use_.end(), "torchmoe: freeing a block the output cache does not own");
      const size_t size = it->second;
      in_use_.erase(it);
      if (size > limit_) {
        evicted.push_back(block);
      } else {
        while (free_bytes_ + size > limit_) {
          auto oldest = free_.begin();
          for (auto f = free_.begin(); f != free_.end(); ++f) {
            if (f->second.front().age < oldest->second.front().age) oldest = f;
          }
          evicted.push_back(oldest->second.front().block);
          free_bytes_ -= oldest->first;
          oldest->second.pop_front();
          if (oldest->second.empty()) free_.erase(oldest);
        }
        free_[size].push_back({block, next_age_++});
        free_bytes_ += size;
      }
    }
    for (void* b : evicted) std::free(b);
  }

  const size_t limit_ = cache_limit_from_env();
  std::mutex mutex_;
  struct FreeBlock {
    void* block;
    uint64_t age;  // order of release
  };
  // Per size, oldest first: reuse takes the newest (warm in cache), eviction the oldest.
  std::unordered_map<size_t, std::deque<FreeBlock>> free_;
  uint64_t next_age_ = 0;
  std::unordered_map<void*, size_t> in_use_;
  size_t free_bytes_ = 0;
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
