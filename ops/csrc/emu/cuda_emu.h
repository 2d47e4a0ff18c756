// CUDA on the CPU for testing: g++ compiles a kernel's .cu against this header, ops/cuda/emulation.py runs it.
//
// Each CUDA thread is a fiber (ucontext) with its own stack; the blocks of a grid run one after
// another, the threads of a block run until they block (at __syncthreads, at a shuffle) or exit, and
// the scheduler then checks CUDA's rules and releases them:
//   __syncthreads: every thread of the block reaches the same barrier (same source line); none has
//     exited, none waits at a shuffle.
//   __syncwarp(mask): a barrier among the lanes of mask: the caller is in mask, and every lane of mask
//     reaches the same __syncwarp (same line and mask; stricter than sm_70+, which lets different
//     call sites meet) with none exited or waiting elsewhere.
//   __shfl_*_sync(mask, ...): the caller is in mask; every lane named in mask reaches the same
//     shuffle (kind, line, mask, width) with none exited or waiting elsewhere; the lane read from is
//     in mask.
//   16-byte vector loads and stores (uint4, float4) and float4 atomics are 16-byte aligned; scalar
//     __ldg and atomics are naturally aligned.
//   __half and __nv_bfloat16 convert exactly as on the GPU (round to nearest even).
//   A thread reads only shared-memory bytes that a thread of its block wrote (compute-sanitizer's
//     initcheck). Shared memory has no races (what compute-sanitizer's racecheck looks for): g++ instruments every
//     load and store of the kernel's translation unit (-fsanitize=kernel-address with our own
//     callbacks, see "Race check" below); per shared-memory byte the header keeps the last writer and
//     the last reader with their barrier epochs, and an access by another thread that no barrier
//     (__syncthreads, __syncwarp) both passed orders after that write (or a write after that read) is
//     an error naming both places. Shuffles and votes are not barriers here: they order no memory.
// A violation stops the launch; emu_launch returns 1 and emu_last_error() says which thread broke
// which rule where. Dynamic shared memory is a heap block of exactly the requested size, filled
// with 0xff at each block's start, so an AddressSanitizer build sees overruns and a missing
// __syncthreads reads NaN instead of a neighbour's value.
//
// Supported built-ins: threadIdx, blockIdx, blockDim, gridDim, __syncthreads, __syncwarp,
// __shfl_sync / _xor / _up / _down (4- and 8-byte values), __ballot_sync, __any_sync,
// __match_any_sync (64-bit keys), __popc, __ffs, __umulhi, __int_as_float, __uint_as_float,
// __longlong_as_double, __ldg, atomicAdd (int, unsigned, float, double; float4 when
// __CUDA_ARCH__ >= 900), min, max, fma, __half, __nv_bfloat16 and their float conversions, uint4,
// float4, make_float4. <cuda_fp16.h> and <cuda_bf16.h> resolve to empty files (ops/cuda/emulation.py),
// so a kernel source includes them as it does for NVRTC and needs no #ifdef for the emulation. Not modelled: warp-level timing, the memory model (the
// blocks run in sequence, so races between blocks and atomics are invisible), occupancy,
// __launch_bounds__ limits, codegen. `extern __shared__ T name[];` is rewritten by ops/cuda/emulation.py
// into a pointer to the launch's dynamic shared memory; `__shared__` arrays become static (the race
// check covers dynamic shared memory only).
//
// __CUDA_ARCH__ is set on the compiler's command line (800, 900, ...) to pick a kernel's arch path.
#ifndef CUDA_EMU_H_
#define CUDA_EMU_H_

#include <dlfcn.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) && !defined(CUDA_EMU_RACE_CHECK)  // kernel-address defines it too
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4;
struct alignas(16) float4;

namespace cuda_emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

inline void check_aligned(const void* p, std::size_t alignment, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0) {
    fail("%s at %p is not %zu-byte aligned", what, p, alignment);
  }
}

}  // namespace cuda_emu

// 16-byte vector types: copying one through a pointer is a 16-byte access and must be aligned.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& o) { *this = o; }
  uint4& operator=(const uint4& o) {
    cuda_emu::check_aligned(this, 16, "uint4 store");
    cuda_emu::check_aligned(&o, 16, "uint4 load");
    std::memcpy(static_cast<void*>(this), &o, 16);
    return *this;
  }
};
struct alignas(16) float4 {
  float x, y, z, w;
  float4() = default;
  float4(const float4& o) { *this = o; }
  float4& operator=(const float4& o) {
    cuda_emu::check_aligned(this, 16, "float4 store");
    cuda_emu::check_aligned(&o, 16, "float4 load");
    std::memcpy(static_cast<void*>(this), &o, 16);
    return *this;
  }
};
inline float4 make_float4(float x, float y, float z, float w) {
  float4 r;
  r.x = x, r.y = y, r.z = z, r.w = w;
  return r;
}

// Half types hold the raw bits; conversions round to nearest even like the GPU's _rn intrinsics.
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b.bits) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fff;  // the GPU's canonical NaN
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even; overflow gives inf
    b.bits = static_cast<unsigned short>(bits >> 16);
  }
  return b;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::fma;  // fma(float, float, float) rounds once, like the GPU's

namespace cuda_emu {

enum class State { kRunnable, kAtBarrier, kAtShuffle, kDone };
// Warp collectives: the shuffles, the votes (each lane gets a lane mask) and __syncwarp (a barrier).
enum class Shuffle { kIdx, kUp, kDown, kXor, kVote, kMatch, kSync };
constexpr const char* kShuffleNames[] = {"__shfl_sync",     "__shfl_up_sync",         "__shfl_down_sync",
                                         "__shfl_xor_sync", "__ballot_sync/__any_sync", "__match_any_sync",
                                         "__syncwarp"};

struct Thread {
  ucontext_t context;
  char* stack = nullptr;
  dim3 index;
  int linear = 0;  // x + y*bx + z*bx*by; lane = linear % 32, warp = linear / 32
  State state = State::kRunnable;
  int line = 0;  // source line of the barrier or shuffle it waits at
  // Shuffle in progress: what this lane offers and what it gets back.
  Shuffle kind = Shuffle::kIdx;
  unsigned mask = 0;
  int operand = 0, width = 32, size = 0;
  unsigned char offered[8] = {}, received[8] = {};
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping for this fiber
};

using Invoker = void (*)(void** args);

// Race check of one block's dynamic shared memory (see the top comment). Vector clocks:
// clock[t * n + u] is the epoch of thread u that thread t is ordered after; a thread's own entry
// counts the barriers it passed (from 1). An access by thread r to a byte that thread w wrote at
// epoch e is ordered after that write iff clock[r][w] > e.
struct SharedByte {
  int writer = -1, reader = -1;
  unsigned write_epoch = 0, read_epoch = 0;
  const void* write_pc = nullptr;  // return address of the instrumentation call: the access's place
  const void* read_pc = nullptr;
};

struct RaceCheck {
  int n = 0;
  std::uintptr_t lo = 0, hi = 0;  // the shared-memory bytes [lo, hi)
  std::vector<unsigned> clock, merged;
  std::vector<SharedByte> bytes;
};

// The block being checked; null outside a block's run, and in builds without the instrumentation.
inline RaceCheck* g_race = nullptr;

struct Launch {
  dim3 grid, block, block_index;
  std::vector<Thread> threads;
  unsigned char* shared = nullptr;
  std::size_t shared_bytes = 0;
  Invoker invoke = nullptr;
  void** args = nullptr;
  Thread* current = nullptr;
  ucontext_t main_context;
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  std::size_t main_stack_size = 0;
  bool failed = false;
  std::string error;
  RaceCheck race;
};

// What the kernels did, for tests that must know a path ran (e.g. sm_90's float4 atomics).
struct Counters {
  unsigned long long barriers, shuffles, vector_loads, atomics, wide_atomics, warp_syncs;
};
inline Counters& counters() {
  static Counters c = {};
  return c;
}

inline Launch*& launch_state() {
  static Launch* state = nullptr;
  return state;
}
inline std::string& last_error() {
  static std::string message;
  return message;
}
constexpr std::size_t kStackBytes = 256 * 1024;

inline Thread& self() {
  Launch* l = launch_state();
  if (l == nullptr || l->current == nullptr) fail("a device built-in was called outside a kernel launch");
  return *l->current;
}

// Fiber switches, annotated so that AddressSanitizer follows the stack changes.
inline void enter(Launch& l, Thread& t) {
  l.current = &t;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&l.main_fake_stack, t.stack, kStackBytes);
#endif
  swapcontext(&l.main_context, &t.context);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(l.main_fake_stack, nullptr, nullptr);
#endif
  l.current = nullptr;
}

inline void leave(bool exiting) {
  Launch& l = *launch_state();
  Thread& t = *l.current;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, l.main_stack_bottom, l.main_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&t.context, &l.main_context);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_main() {
  Launch& l = *launch_state();
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &l.main_stack_bottom, &l.main_stack_size);
#endif
  l.invoke(l.args);
  l.current->state = State::kDone;
  leave(true);
  std::abort();  // a finished fiber is never resumed
}

inline void fail(const char* fmt, ...) {
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  Launch* l = launch_state();
  if (l == nullptr || l->current == nullptr) {
    std::fprintf(stderr, "cuda_emu: %s\n", text);
    std::abort();
  }
  const Thread& t = *l->current;
  char where[160];
  std::snprintf(where, sizeof where, "block (%u,%u,%u) thread (%u,%u,%u): ", l->block_index.x, l->block_index.y,
                l->block_index.z, t.index.x, t.index.y, t.index.z);
  l->failed = true;
  l->error = std::string(where) + text;
  leave(false);  // the launch is abandoned: this fiber never runs again
  std::abort();
}

inline void fail_main(Launch& l, const std::string& message) {
  l.failed = true;
  char where[80];
  std::snprintf(where, sizeof where, "block (%u,%u,%u): ", l.block_index.x, l.block_index.y, l.block_index.z);
  l.error = where + message;
}

inline std::string describe(const Thread& t) {
  switch (t.state) {
    case State::kDone:
      return "has exited";
    case State::kAtBarrier:
      return "waits at __syncthreads on line " + std::to_string(t.line);
    case State::kAtShuffle:
      return "waits at " + std::string(kShuffleNames[static_cast<int>(t.kind)]) + " on line " +
             std::to_string(t.line) + " with mask " + std::to_string(t.mask);
    default:
      return "runs";
  }
}

// Threads `members` pass a barrier together: afterwards each is ordered after everything any of them
// did before it.
inline void race_barrier(RaceCheck& r, const int* members, int count) {
  if (r.n == 0) return;
  r.merged.assign(r.n, 0u);
  for (int i = 0; i < count; ++i) {
    unsigned* row = &r.clock[std::size_t(members[i]) * r.n];
    ++row[members[i]];
    for (int u = 0; u < r.n; ++u) r.merged[u] = row[u] > r.merged[u] ? row[u] : r.merged[u];
  }
  for (int i = 0; i < count; ++i) std::memcpy(&r.clock[std::size_t(members[i]) * r.n], r.merged.data(), 4 * r.n);
}

// Library offset of a code address, which ops/cuda/emulation.py turns into a source line.
inline std::size_t code_offset(const void* pc) {
  Dl_info info;
  if (pc == nullptr || dladdr(pc, &info) == 0) return 0;
  return reinterpret_cast<std::uintptr_t>(pc) - reinterpret_cast<std::uintptr_t>(info.dli_fbase) - 1;
}

// One load or store of `size` bytes at p by the running thread, seen by the instrumentation.
__attribute__((no_sanitize_address)) inline void shared_access(const void* p, std::size_t size, bool write,
                                                                const void* pc) {
  RaceCheck* r = g_race;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  if (r == nullptr || a + size <= r->lo || a >= r->hi) return;
  Launch* l = launch_state();
  if (l->current == nullptr) return;  // the scheduler's own fill
  const int me = l->current->linear;
  const unsigned* mine = &r->clock[std::size_t(me) * r->n];
  const std::size_t first = a < r->lo ? 0 : a - r->lo, last = a + size > r->hi ? r->hi - r->lo : a + size - r->lo;
  for (std::size_t b = first; b < last; ++b) {
    SharedByte& s = r->bytes[b];
    if (!write && s.writer < 0 && s.write_pc == nullptr) {
      fail("thread %d reads shared byte %zu {pc 0x%zx}, which no thread of the block has written", me, b,
           code_offset(pc));
    }
    int other = -1;
    const void* other_pc = nullptr;
    const char* what = nullptr;
    if (s.writer >= 0 && s.writer != me && mine[s.writer] <= s.write_epoch) {
      other = s.writer, other_pc = s.write_pc, what = "wrote";
    } else if (write && s.reader >= 0 && s.reader != me && mine[s.reader] <= s.read_epoch) {
      other = s.reader, other_pc = s.read_pc, what = "read";
    }
    if (other >= 0) {
      fail("shared-memory race: thread %d %s shared byte %zu {pc 0x%zx}, which thread %d %s {pc 0x%zx} "
           "with no barrier between them that both passed",
           me, write ? "writes" : "reads", b, code_offset(pc), other, what, code_offset(other_pc));
    }
    if (write) {
      s.writer = me, s.write_epoch = mine[me], s.write_pc = pc, s.reader = -1;
    } else {
      s.reader = me, s.read_epoch = mine[me], s.read_pc = pc;
    }
  }
}

// Releases the lanes of one pending shuffle once every lane its mask names has arrived at the same one.
inline bool resolve_shuffle(Launch& l, Thread& t) {
  const int n = static_cast<int>(l.threads.size());
  const int warp = t.linear / 32, lane = t.linear % 32;
  Thread* lanes[32] = {};
  for (int k = 0; k < 32; ++k) {
    if (!(t.mask >> k & 1u)) continue;
    const int id = warp * 32 + k;
    if (id >= n) {
      fail_main(l, "lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + " names lane " +
                       std::to_string(k) + " in its shuffle mask, which is past the end of the block");
      return false;
    }
    Thread& o = l.threads[id];
    if (o.state != State::kAtShuffle || o.line != t.line || o.kind != t.kind || o.mask != t.mask ||
        o.width != t.width || o.size != t.size) {
      fail_main(l, "warp " + std::to_string(warp) + ": lane " + std::to_string(lane) + " " + describe(t) +
                       " but lane " + std::to_string(k) + " it names " + describe(o));
      return false;
    }
    lanes[k] = &o;
  }
  if (t.kind == Shuffle::kSync) {
    int members[32], count = 0;
    for (int k = 0; k < 32; ++k) {
      if (lanes[k] != nullptr) members[count++] = lanes[k]->linear;
    }
    race_barrier(l.race, members, count);
  }
  for (int k = 0; k < 32; ++k) {
    Thread* o = lanes[k];
    if (o == nullptr || o->kind == Shuffle::kSync) continue;
    if (o->kind == Shuffle::kVote) {  // received: the lanes whose predicate is set
      unsigned bits = 0;
      for (int j = 0; j < 32; ++j) bits |= unsigned(lanes[j] != nullptr && lanes[j]->offered[0] != 0) << j;
      std::memcpy(o->received, &bits, 4);
      continue;
    }
    if (o->kind == Shuffle::kMatch) {  // received: the lanes offering the same 8 bytes
      unsigned bits = 0;
      for (int j = 0; j < 32; ++j) {
        bits |= unsigned(lanes[j] != nullptr && std::memcmp(lanes[j]->offered, o->offered, 8) == 0) << j;
      }
      std::memcpy(o->received, &bits, 4);
      continue;
    }
    const int w = o->width, base = k / w * w;
    int src = k;
    switch (o->kind) {
      case Shuffle::kIdx:
        src = base + ((o->operand % w) + w) % w;
        break;
      case Shuffle::kUp:
        src = k - base >= o->operand ? k - o->operand : k;
        break;
      case Shuffle::kDown:
        src = k - base + o->operand < w ? k + o->operand : k;
        break;
      case Shuffle::kXor:
        src = k ^ o->operand;
        if (src >= base + w || src > 31) src = k;  // later groups are out of reach: own value
        break;
      default:
        break;
    }
    if (lanes[src] == nullptr) {
      fail_main(l, "warp " + std::to_string(warp) + ": lane " + std::to_string(k) + " reads lane " +
                       std::to_string(src) + " on line " + std::to_string(o->line) + ", which is not in mask " +
                       std::to_string(o->mask));
      return false;
    }
    std::memcpy(o->received, lanes[src]->offered, 8);
  }
  for (Thread* o : lanes) {
    if (o != nullptr) o->state = State::kRunnable;
  }
  return true;
}

// One block: run every fiber until it blocks, release what CUDA would release, repeat.
inline void run_block(Launch& l) {
  std::memset(l.shared, 0xff, l.shared_bytes);
  RaceCheck& r = l.race;
  r.n = static_cast<int>(l.threads.size());
  r.lo = reinterpret_cast<std::uintptr_t>(l.shared);
  r.hi = r.lo + l.shared_bytes;
  r.clock.assign(std::size_t(r.n) * r.n, 0u);
  for (int t = 0; t < r.n; ++t) r.clock[std::size_t(t) * r.n + t] = 1;
  r.bytes.assign(l.shared_bytes, SharedByte{});
  for (Thread& t : l.threads) {
    t.state = State::kRunnable;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_main, 0);
  }
  // Odd blocks run their threads last to first: a kernel that orders memory between threads only by
  // the emulation's scheduling order (a missing barrier on global memory) gets the other order there.
  const bool reverse = (l.block_index.x + l.block_index.y + l.block_index.z) % 2 == 1;
  const int n_threads = static_cast<int>(l.threads.size());
  for (;;) {
    for (int i = 0; i < n_threads; ++i) {
      Thread& t = l.threads[reverse ? n_threads - 1 - i : i];
      if (t.state == State::kRunnable) enter(l, t);
      if (l.failed) return;
    }
    bool released = false;
    for (Thread& t : l.threads) {
      if (t.state == State::kAtShuffle) {
        if (!resolve_shuffle(l, t)) return;
        released = true;
      }
    }
    if (released) continue;
    int done = 0, waiting = 0;
    const Thread* first = nullptr;
    for (const Thread& t : l.threads) {
      done += t.state == State::kDone;
      if (t.state == State::kAtBarrier) {
        ++waiting;
        if (first == nullptr) first = &t;
      }
    }
    if (done == static_cast<int>(l.threads.size())) return;
    for (const Thread& t : l.threads) {
      if (t.state != State::kAtBarrier || t.line != first->line) {
        fail_main(l, "thread " + std::to_string(first->linear) + " " + describe(*first) + " but thread " +
                         std::to_string(t.linear) + " " + describe(t));
        return;
      }
    }
    std::vector<int> all(l.threads.size());
    for (Thread& t : l.threads) {
      all[t.linear] = t.linear;
      t.state = State::kRunnable;
    }
    race_barrier(r, all.data(), r.n);
  }
}

inline void barrier(int line) {
  Thread& t = self();
  ++counters().barriers;
  t.state = State::kAtBarrier;
  t.line = line;
  leave(false);
}

template <typename T>
inline T shuffle(int line, Shuffle kind, unsigned mask, T value, int operand, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 4- or 8-byte values");
  Thread& t = self();
  ++counters().shuffles;
  const int lane = t.linear % 32;
  if (!(mask >> lane & 1u)) fail("%s on line %d: the calling lane %d is not in mask 0x%08x", kShuffleNames[static_cast<int>(kind)], line, lane, mask);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32, got %d", width);
  t.state = State::kAtShuffle;
  t.line = line;
  t.kind = kind;
  t.mask = mask;
  t.operand = operand;
  t.width = width;
  t.size = sizeof(T);
  std::memset(t.offered, 0, 8);
  std::memcpy(t.offered, &value, sizeof(T));
  leave(false);
  T result;
  std::memcpy(&result, t.received, sizeof(T));
  return result;
}

inline void warp_sync(int line, unsigned mask) {
  Thread& t = self();
  ++counters().warp_syncs;
  const int lane = t.linear % 32;
  if (!(mask >> lane & 1u)) fail("__syncwarp on line %d: the calling lane %d is not in mask 0x%08x", line, lane, mask);
  t.state = State::kAtShuffle;
  t.line = line;
  t.kind = Shuffle::kSync;
  t.mask = mask;
  t.operand = 0;
  t.width = 32;
  t.size = 0;
  leave(false);
}

// A vote: every lane of mask offers `value`; the result is a mask of lanes (see resolve_shuffle).
inline unsigned vote(int line, Shuffle kind, unsigned mask, unsigned long long value) {
  Thread& t = self();
  ++counters().shuffles;
  const int lane = t.linear % 32;
  if (!(mask >> lane & 1u)) fail("%s on line %d: the calling lane %d is not in mask 0x%08x", kShuffleNames[static_cast<int>(kind)], line, lane, mask);
  t.state = State::kAtShuffle;
  t.line = line;
  t.kind = kind;
  t.mask = mask;
  t.operand = 0;
  t.width = 32;
  t.size = 8;
  std::memcpy(t.offered, &value, 8);
  leave(false);
  unsigned result;
  std::memcpy(&result, t.received, 4);
  return result;
}

template <typename T>
inline T* dynamic_shared() {
  Launch* l = launch_state();
  return reinterpret_cast<T*>(l->shared);
}

// The kernel table: a name expression and a function that calls the kernel with cuLaunchKernel-style
// arguments (args[i] points at the i-th argument's value).
struct Kernel {
  const char* name;
  Invoker invoke;
  int n_args;
  const unsigned* arg_sizes;
};

template <auto Fn, typename... Args, std::size_t... I>
void call(void** args, std::index_sequence<I...>) {
  Fn(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

template <auto Fn, typename... Args>
Kernel kernel_of(const char* name, void (*)(Args...)) {
  static const unsigned sizes[] = {static_cast<unsigned>(sizeof(Args))..., 0u};
  return Kernel{name, [](void** args) { call<Fn, Args...>(args, std::index_sequence_for<Args...>{}); },
                static_cast<int>(sizeof...(Args)), sizes};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::self().index)
#define blockIdx (::cuda_emu::launch_state()->block_index)
#define blockDim (::cuda_emu::launch_state()->block)
#define gridDim (::cuda_emu::launch_state()->grid)
#define __syncthreads() ::cuda_emu::barrier(__LINE__)
#define __syncwarp(...) ::cuda_emu::warp_sync(__LINE__, CUDA_EMU_FULL_MASK(__VA_ARGS__))
#define CUDA_EMU_FULL_MASK(...) ::cuda_emu::mask_or_full(0, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) ::cuda_emu::vote(__LINE__, ::cuda_emu::Shuffle::kVote, mask, (pred) ? 1u : 0u)
#define __any_sync(mask, pred) \
  static_cast<int>(::cuda_emu::vote(__LINE__, ::cuda_emu::Shuffle::kVote, mask, (pred) ? 1u : 0u) != 0u)
#define __match_any_sync(mask, key) \
  ::cuda_emu::vote(__LINE__, ::cuda_emu::Shuffle::kMatch, mask, static_cast<unsigned long long>(key))
#define __shfl_sync(mask, v, src, ...) \
  CUDA_EMU_SHFL(::cuda_emu::Shuffle::kIdx, mask, v, src, CUDA_EMU_WIDTH(__VA_ARGS__))
#define CUDA_EMU_SHFL(kind, mask, v, operand, width) ::cuda_emu::shuffle(__LINE__, kind, mask, v, operand, width)
#define __shfl_xor_sync(mask, v, operand, ...) \
  CUDA_EMU_SHFL(::cuda_emu::Shuffle::kXor, mask, v, operand, CUDA_EMU_WIDTH(__VA_ARGS__))
#define __shfl_up_sync(mask, v, operand, ...) \
  CUDA_EMU_SHFL(::cuda_emu::Shuffle::kUp, mask, v, operand, CUDA_EMU_WIDTH(__VA_ARGS__))
#define __shfl_down_sync(mask, v, operand, ...) \
  CUDA_EMU_SHFL(::cuda_emu::Shuffle::kDown, mask, v, operand, CUDA_EMU_WIDTH(__VA_ARGS__))
#define CUDA_EMU_WIDTH(...) ::cuda_emu::width_or_warp(0, ##__VA_ARGS__)

namespace cuda_emu {
inline int width_or_warp(int) { return 32; }
inline int width_or_warp(int, int width) { return width; }
inline unsigned mask_or_full(int) { return 0xffffffffu; }
inline unsigned mask_or_full(int, unsigned mask) { return mask; }
}  // namespace cuda_emu

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, 8);
  return d;
}

// Race check: the callbacks g++ calls before each load and store under -fsanitize=kernel-address
// (ops/cuda/emulation.py builds so with -DCUDA_EMU_RACE_CHECK, except for the AddressSanitizer build,
// whose runtime owns these names).
#ifdef CUDA_EMU_RACE_CHECK
#define CUDA_EMU_ACCESS(kind, size, write)                                                      \
  extern "C" __attribute__((no_sanitize_address)) void __asan_##kind##size##_noabort(void* p) { \
    ::cuda_emu::shared_access(p, size, write, __builtin_return_address(0));                    \
  }
CUDA_EMU_ACCESS(load, 1, false)
CUDA_EMU_ACCESS(load, 2, false)
CUDA_EMU_ACCESS(load, 4, false)
CUDA_EMU_ACCESS(load, 8, false)
CUDA_EMU_ACCESS(load, 16, false)
CUDA_EMU_ACCESS(store, 1, true)
CUDA_EMU_ACCESS(store, 2, true)
CUDA_EMU_ACCESS(store, 4, true)
CUDA_EMU_ACCESS(store, 8, true)
CUDA_EMU_ACCESS(store, 16, true)
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(void* p, long size) {
  ::cuda_emu::shared_access(p, static_cast<std::size_t>(size), false, __builtin_return_address(0));
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(void* p, long size) {
  ::cuda_emu::shared_access(p, static_cast<std::size_t>(size), true, __builtin_return_address(0));
}
extern "C" void __asan_handle_no_return(void) {}
// Called around the dynamic initialisers of the translation unit; nothing to do.
extern "C" void __asan_before_dynamic_init(const void*) {}
extern "C" void __asan_after_dynamic_init(void) {}
#endif

inline void __threadfence() {}

template <typename T>
inline T __ldg(const T* p) {
  cuda_emu::check_aligned(p, alignof(T), "__ldg");
  cuda_emu::counters().vector_loads += sizeof(T) == 16;
  return *p;
}

template <typename T>
inline T atomicAdd(T* p, T v) {
  static_assert(std::is_same<T, int>::value || std::is_same<T, unsigned>::value || std::is_same<T, float>::value ||
                    std::is_same<T, double>::value,
                "atomicAdd: int, unsigned, float or double (float4 from sm_90)");
  cuda_emu::check_aligned(p, sizeof(T), "atomicAdd");
  ++cuda_emu::counters().atomics;
  const T old = *p;
  *p = old + v;  // fibers of one OS thread: nothing interleaves
  return old;
}

#if __CUDA_ARCH__ >= 900
inline float4 atomicAdd(float4* p, float4 v) {
  cuda_emu::check_aligned(p, 16, "atomicAdd(float4*)");
  ++cuda_emu::counters().wide_atomics;
  const float4 old = *p;
  p->x += v.x, p->y += v.y, p->z += v.z, p->w += v.w;
  return old;
}
#endif

// The launch entry point ops/cuda/emulation.py calls through ctypes. This header belongs to exactly one
// translation unit (the wrapper ops/cuda/emulation.py generates), which defines the kernel table.
extern "C" {
extern const cuda_emu::Kernel cuda_emu_kernels[];
extern const int cuda_emu_n_kernels;

const char* emu_last_error(void) { return cuda_emu::last_error().c_str(); }
// barriers, shuffles, 16-byte __ldg loads, scalar atomics, float4 atomics, __syncwarps since the last reset.
void emu_counters(unsigned long long* out) {
  const cuda_emu::Counters& c = cuda_emu::counters();
  const unsigned long long values[] = {c.barriers,     c.shuffles,     c.vector_loads,
                                       c.atomics,      c.wide_atomics, c.warp_syncs};
  std::memcpy(out, values, sizeof values);
}
void emu_reset_counters(void) { cuda_emu::counters() = cuda_emu::Counters{}; }
int emu_kernel_count(void) { return cuda_emu_n_kernels; }
const char* emu_kernel_name(int i) { return i >= 0 && i < cuda_emu_n_kernels ? cuda_emu_kernels[i].name : nullptr; }

// Runs kernel `name` on a grid x block launch; 0 on success, 1 with emu_last_error() set otherwise.
int emu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned shared_bytes, void** args,
               const unsigned* arg_sizes, int n_args) {
  using namespace cuda_emu;
  auto error = [](const std::string& message) {
    last_error() = message;
    return 1;
  };
  const Kernel* kernel = nullptr;
  for (int i = 0; i < cuda_emu_n_kernels; ++i) {
    if (std::strcmp(cuda_emu_kernels[i].name, name) == 0) kernel = &cuda_emu_kernels[i];
  }
  if (kernel == nullptr) return error(std::string("no kernel named ") + name + " was compiled");
  if (n_args != kernel->n_args) {
    return error(std::string(name) + " takes " + std::to_string(kernel->n_args) + " arguments, got " +
                 std::to_string(n_args));
  }
  for (int i = 0; i < n_args; ++i) {
    if (arg_sizes[i] != kernel->arg_sizes[i]) {
      return error(std::string(name) + ": argument " + std::to_string(i) + " is " +
                   std::to_string(kernel->arg_sizes[i]) + " bytes, the caller passed " + std::to_string(arg_sizes[i]));
    }
  }
  const unsigned long long n_threads = 1ull * block[0] * block[1] * block[2];
  if (n_threads == 0 || n_threads > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
      grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
    return error("invalid launch configuration: grid (" + std::to_string(grid[0]) + "," + std::to_string(grid[1]) +
                 "," + std::to_string(grid[2]) + "), block (" + std::to_string(block[0]) + "," +
                 std::to_string(block[1]) + "," + std::to_string(block[2]) + ")");
  }
  if (shared_bytes > 48 * 1024) {
    return error("dynamic shared memory of " + std::to_string(shared_bytes) + " bytes exceeds the 48 KiB default");
  }
  Launch l;
  l.grid = dim3{grid[0], grid[1], grid[2]};
  l.block = dim3{block[0], block[1], block[2]};
  l.invoke = kernel->invoke;
  l.args = args;
  l.shared_bytes = shared_bytes;
  l.shared = static_cast<unsigned char*>(::operator new(shared_bytes, std::align_val_t(16)));
  l.threads.resize(n_threads);
  for (unsigned long long i = 0; i < n_threads; ++i) {
    Thread& t = l.threads[i];
    t.linear = static_cast<int>(i);
    t.index = dim3{static_cast<unsigned>(i % block[0]), static_cast<unsigned>(i / block[0] % block[1]),
                   static_cast<unsigned>(i / block[0] / block[1])};
    t.stack = static_cast<char*>(std::malloc(kStackBytes));
  }
  launch_state() = &l;
#ifdef CUDA_EMU_RACE_CHECK
  g_race = &l.race;
#endif
  for (unsigned z = 0; z < grid[2] && !l.failed; ++z) {
    for (unsigned y = 0; y < grid[1] && !l.failed; ++y) {
      for (unsigned x = 0; x < grid[0] && !l.failed; ++x) {
        l.block_index = dim3{x, y, z};
        run_block(l);
      }
    }
  }
  launch_state() = nullptr;
  g_race = nullptr;
  for (Thread& t : l.threads) std::free(t.stack);
  ::operator delete(l.shared, std::align_val_t(16));
  last_error() = l.error;
  return l.failed ? 1 : 0;
}
}

#endif  // CUDA_EMU_H_
