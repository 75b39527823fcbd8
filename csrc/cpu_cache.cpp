// A cache of large CPU buffers for the CPU kernels' outputs and intermediates (see common.h).
//
// glibc hands a freed block above its mmap threshold back to the system (or trims it off the heap),
// so the next step's buffer of the same size is fresh memory: one page fault, and the kernel
// zeroing the page, per 4 KiB touched. On this project's 2-core VM a 5.3 MB adapter output (IPT
// 48x48, 576 channels) cost ~1 ms of faults against ~0.4 ms for the GEMM writing it, and a
// training step of the adapter allocates two such buffers (the output, the input gradient) plus
// its h-space intermediates. Blocks of at least kMinBytes are kept here when their tensor dies and
// handed out again for the same size, so their pages stay mapped; at most `limit` bytes are kept
// idle (MOCE_FAST_CPU_CACHE_MB, default 256; 0 turns the cache off). A block given back is kept,
// and the idle blocks given back longest ago go back to the system until the rest fit the limit (a
// block larger than the limit itself goes back at once): blocks of sizes a process no longer asks
// for (a batch-32 step's, before batch-1 steps) make way for those of the sizes in use. (Before,
// a full cache freed the block coming back instead: after the bench's batch-32 cases filled it,
// a later IPT 48x48 batch-1 training step missed one 5.3 MB block per step, its pages fresh each
// time.) A block is never handed out while a tensor holds it; empty_cpu_cache() frees every idle
// block. install_cpu_cache() makes the cache torch's CPU allocator until the matching
// uninstall (the adapters' torch paths on a CPU run so: their own buffers come from it too).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common.h"

namespace moce_fast {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks: the default allocator
constexpr size_t kPage = 4096;
// SetCPUAllocator's priority for installing the cache and putting the replaced allocator back (a
// lower one would be refused once the first install has raised it)
constexpr uint8_t kInstallPriority = 200;

size_t limit_from_env() {
  const char* v = std::getenv("MOCE_FAST_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0, "MOCE_FAST_CPU_CACHE_MB: expected a whole number of MiB >= 0, got '",
              v, "'");
  return size_t(mb) << 20;
}

class BufferCache final : public c10::Allocator {
 public:
  // (small: the CPU allocator when the cache was made, which smaller blocks go to; never the cache
  // itself, which install_cpu_cache makes torch's CPU allocator for a while)
  BufferCache() : small_(c10::GetCPUAllocator()), limit_(limit_from_env()) {}

  // Blocks of kMinBytes or more are "simple" data pointers (context = data, one raw deleter), as
  // oneDNN's raw_allocate / raw_deallocate need of torch's CPU allocator while the cache is it.
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return small_->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // (the block of this size given back last; a scan over at most limit / 1 MiB blocks)
      auto it = idle_.begin();
      while (it != idle_.end() && it->first != size) ++it;
      if (it != idle_.end()) {
        void* ptr = it->second;
        idle_.erase(it);
        idle_bytes_ -= size;
        ++hits_;
        live_[ptr] = size;
        return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
    }
    void* ptr = c10::alloc_cpu(size);  // (outside the lock: a fresh block)
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[ptr] = size;
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(size_t bytes) {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      trim_locked(limit_, freed);
    }
    free_all(freed);
  }

  void empty() {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      trim_locked(0, freed);
    }
    free_all(freed);
  }

  CpuCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {idle_bytes_, limit_, hits_, misses_, idle_.size()};
  }

 private:
  static void release(void* ptr);

  // takes idle blocks out, the one given back longest ago first, until at most `keep` bytes are
  // idle; their pointers go to `freed` (free_all, by the caller, outside the lock)
  void trim_locked(size_t keep, std::vector<void*>& freed) {
    while (idle_bytes_ > keep && !idle_.empty()) {
      idle_bytes_ -= idle_.back().first;
      freed.push_back(idle_.back().second);
      idle_.pop_back();
    }
  }

  static void free_all(const std::vector<void*>& blocks) {
    for (void* p : blocks) c10::free_cpu(p);
  }

  // a block of ours back to the idle ones (the oldest idle ones freed if over the limit, or this
  // one if it alone is larger); any other pointer (a small block, raw-deallocated through the cache
  // while it was installed) to the allocator it came from
  void give_back(void* ptr) {
    enum { kKept, kFree, kSmall } what = kSmall;
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        what = kFree;
        if (size <= limit_) {
          idle_.emplace_front(size, ptr);
          idle_bytes_ += size;
          trim_locked(limit_, freed);  // (never this block: it alone fits)
          what = kKept;
        }
      }
    }
    free_all(freed);
    if (what == kFree)
      c10::free_cpu(ptr);
    else if (what == kSmall)
      small_->raw_deallocate(ptr);
  }

  c10::Allocator* small_;
  std::mutex mu_;
  // idle blocks (size, pointer), the one given back last first
  std::list<std::pair<size_t, void*>> idle_;
  std::unordered_map<void*, size_t> live_;
  size_t idle_bytes_ = 0, limit_;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: a tensor freed during interpreter shutdown still finds it.
BufferCache& cache() {
  static auto* c = new BufferCache();
  return *c;
}

void BufferCache::release(void* ptr) { cache().give_back(ptr); }

}  // namespace

at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "cached_empty: CPU tensors only, got ", options.device());
  return at::detail::empty_generic(shape, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

void set_cpu_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "limit: expected a number of bytes >= 0, got ", bytes);
  cache().set_limit(size_t(bytes));
}

void empty_cpu_cache() { cache().empty(); }

namespace {
std::mutex g_install_mu;
int64_t g_install_depth = 0;
c10::Allocator* g_replaced = nullptr;
}  // namespace

void install_cpu_cache() {
  auto& c = cache();  // (made before it is installed: it keeps the allocator it replaces)
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (g_install_depth++ == 0) {
    g_replaced = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&c, kInstallPriority);
  }
}

void uninstall_cpu_cache() {
  std::lock_guard<std::mutex> lock(g_install_mu);
  TORCH_CHECK(g_install_depth > 0, "uninstall_cpu_cache: the cache is not installed");
  if (--g_install_depth == 0) c10::SetCPUAllocator(g_replaced, kInstallPriority);
}

int64_t cpu_cache_install_depth() {
  std::lock_guard<std::mutex> lock(g_install_mu);
  return g_install_depth;
}

CpuCacheInfo cpu_cache_info() { return cache().info(); }

}  // namespace moce_fast
