// cuda_emu.h -- run CUDA-style kernels on the host with g++ (fusedres's test-time CUDA emulator).
//
// Adopted from the project's emulator prototype; fusedres additions: a log of launched kernels by name
// (emu::launch_log, filled by KERNEL_LAUNCH in csrc/cuda/cuda_compat.cuh) and fault injection
// (Config::drop_sync_file/line: one __syncthreads call site becomes a no-op) so tests can show that a
// missing barrier is caught.
//
// Every simulated GPU thread of a block is a fiber on the calling OS thread. Blocks run one
// after another. A fiber runs until it reaches a synchronisation point (__syncthreads*,
// __syncwarp, __shfl*_sync, __ballot/any/all_sync) or exits; when every fiber of the block is
// parked, the scheduler completes whatever barriers / warp collectives are complete and runs
// the released fibers again, in ascending, descending or random thread order.
// Deadlocks and divergent barriers raise emu::Error from emu::launch().
//
// Knobs: emu::config() or env EMU_ORDER=asc|desc|rand, EMU_STACK_KB=64, EMU_POISON=1.
#pragma once
#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers only"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_FAST_SWITCH 1  // hand-written context switch (no sigprocmask syscall per switch)
#endif

// If the CUDA toolkit headers are on the include path, reuse their dim3/uint3 so that
// host-usable CUDA headers (cuda_fp16.h, cuda_bf16.h) can be mixed in; then override keywords.
#if defined(__has_include)
#if __has_include(<vector_types.h>) && !defined(EMU_NO_CUDA_HEADERS)
#include <vector_types.h>
#define EMU_HAVE_VECTOR_TYPES 1
#endif
#endif
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __constant__
#undef __managed__
#undef __launch_bounds__
#undef __align__
#undef __shared__

// ------------------------------------------------------------------ CUDA keywords
#define EMU_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one after another, so a function-local static is "per block" shared memory.
// The section lets the scheduler poison it at every block start (GCC ignores the section
// attribute on statics of template instantiations, so those are not poisoned).
#define __shared__ [[gnu::section("emu_shared")]] static
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

#ifndef EMU_HAVE_VECTOR_TYPES
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};
#endif
inline uint3 threadIdx{0, 0, 0};  // set by the scheduler before each fiber resumes
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------ math / bit intrinsics
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// The fast intrinsics as the hardware evaluates them, so that their error shows in the tests: __fdividef is
// a * rcp(b) (two roundings), __expf is ex2(x * log2(e)) with the product rounded to float first (the error that
// grows with |x|; MUFU.EX2's own ~2 ulp are not modelled).
inline float __fdividef(float a, float b) { return a * (1.0f / b); }
inline float __expf(float x) { return std::exp2(x * 1.44269504f); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// Rounded one by one: the host build targets no FMA instructions, so nothing contracts these.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------ atomics
// Fibers only switch at synchronisation points, so plain read-modify-write is atomic here.
namespace emu::detail { template <class T> struct ident { using type = T; }; }
template <class T> inline T atomicAdd(T* p, typename emu::detail::ident<T>::type v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, typename emu::detail::ident<T>::type v) { T o = *p; *p = o - v; return o; }
template <class T> inline T atomicMax(T* p, typename emu::detail::ident<T>::type v) { T o = *p; *p = o < v ? v : o; return o; }
template <class T> inline T atomicMin(T* p, typename emu::detail::ident<T>::type v) { T o = *p; *p = v < o ? v : o; return o; }
template <class T> inline T atomicExch(T* p, typename emu::detail::ident<T>::type v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicCAS(T* p, typename emu::detail::ident<T>::type c, typename emu::detail::ident<T>::type v) {
  T o = *p; if (o == c) *p = v; return o;
}

// ------------------------------------------------------------------ runtime
namespace emu {
struct Error : std::runtime_error { using std::runtime_error::runtime_error; };
enum class Order { Ascending, Descending, Random };
struct Config {
  Order order = Order::Ascending;
  size_t stack_bytes = 64 * 1024;  // per simulated thread (guard page below it)
  bool poison = true;              // fill shared memory with 0xFF bytes at every block start
  bool strict_exit = true;         // threads exited while others wait at __syncthreads -> error
  unsigned seed = 12345;           // for Order::Random
  // Fault injection: the __syncthreads() whose call site is line drop_sync_line of a file whose path ends
  // with drop_sync_file does nothing (a deliberately missing barrier). Empty file: off.
  std::string drop_sync_file;
  int drop_sync_line = 0;
};
inline Config& config() {
  static Config c = [] {
    Config k;
    if (const char* s = std::getenv("EMU_ORDER")) k.order = s[0] == 'd' ? Order::Descending : s[0] == 'r' ? Order::Random : Order::Ascending;
    if (const char* s = std::getenv("EMU_STACK_KB")) k.stack_bytes = std::strtoul(s, nullptr, 10) * 1024;
    if (const char* s = std::getenv("EMU_POISON")) k.poison = s[0] != '0';
#ifdef EMU_ASAN
    k.stack_bytes = std::max<size_t>(k.stack_bytes, 256 * 1024);  // ASan frames are larger
#endif
    return k;
  }();
  return c;
}
struct Stats { uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, barriers = 0, warp_ops = 0, undefined_shfl = 0; };
inline Stats& stats() { static Stats s; return s; }
// Launches per kernel, keyed by the kernel expression as written at the launch site (KERNEL_LAUNCH).
inline std::map<std::string, uint64_t>& launch_log() { static std::map<std::string, uint64_t> m; return m; }
inline void record_launch(const char* kernel) { ++launch_log()[kernel]; }

namespace detail {
enum class St : uint8_t { Runnable, Barrier, Warp, Exited };
enum class Op : uint8_t { None, Sync, SyncCount, SyncAnd, SyncOr, ShflIdx, ShflUp, ShflDown, ShflXor, SyncWarp, Ballot, Any, All };
inline const char* op_name(Op o) {
  static const char* n[] = {"-", "__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or", "__shfl_sync",
                            "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__syncwarp", "__ballot_sync", "__any_sync", "__all_sync"};
  return n[int(o)];
}

struct Fiber {
#ifdef EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;
  size_t stack_size = 0;
  uint3 tid{};
  St st = St::Runnable;
  Op op = Op::None;
  unsigned mask = 0;
  int param = 0, width = 32, line = 0;
  uint64_t val = 0, result = 0;
  const char* file = "";
#ifdef EMU_ASAN
  void* fake = nullptr;
#endif
};

struct Launch {
  void (*call)(void*) = nullptr;
  void* obj = nullptr;
  std::vector<Fiber> f;
  unsigned n = 0;
  int cur = -1;
  std::string error;
  unsigned char* dsmem = nullptr;
  size_t dsmem_bytes = 0;
#ifdef EMU_FAST_SWITCH
  void* sched_sp = nullptr;
  uint64_t fpcsr = 0;
#else
  ucontext_t sched_uc;
#endif
#ifdef EMU_ASAN
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
};
inline Launch* g_launch = nullptr;
inline uint64_t g_block_epoch = 0;  // incremented at every block start (block_shared poisons once per block)

// One mmap'ed region, one slot per simulated thread: [guard page | stack].
struct StackPool {
  char* base = nullptr;
  size_t page = 0, slot = 0, total = 0;
  unsigned count = 0;
  void ensure(unsigned n, size_t bytes) {
    page = size_t(sysconf(_SC_PAGESIZE));
    size_t want = (bytes + page - 1) / page * page + page;
    if (base && n <= count && want == slot) return;
    if (base) munmap(base, total);
    slot = want; total = slot * n; count = n;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { base = nullptr; throw Error("cuda_emu: cannot mmap fiber stacks"); }
    base = static_cast<char*>(p);
    for (unsigned i = 0; i < n; ++i) mprotect(base + i * slot, page, PROT_NONE);
  }
};
inline StackPool& stacks() { static StackPool p; return p; }

inline void install_segv_handler() {  // turns a guard-page hit into a readable message
#ifndef EMU_ASAN
  static bool done = false;
  if (done) return;
  done = true;
  struct sigaction old{};
  sigaction(SIGSEGV, nullptr, &old);
  if (old.sa_handler != SIG_DFL) return;  // somebody else (pytest, ASan, ...) owns SIGSEGV
  static char alt[64 * 1024];
  stack_t ss{};
  ss.ss_sp = alt; ss.ss_size = sizeof alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
  sa.sa_sigaction = [](int, siginfo_t* si, void*) {
    StackPool& p = stacks();
    char* a = static_cast<char*>(si->si_addr);
    if (p.base && a >= p.base && a < p.base + p.total && size_t(a - p.base) % p.slot < p.page) {
      const char m[] = "cuda_emu: simulated-thread stack overflow (guard page hit); raise EMU_STACK_KB\n";
      ssize_t r = write(2, m, sizeof m - 1); (void)r;
    }
  };  // returning re-executes the fault with the default action
  sigaction(SIGSEGV, &sa, nullptr);
#endif
}

#ifdef EMU_FAST_SWITCH
// void emu_ctx_switch(void** save_sp, void* new_sp): save callee-saved regs + MXCSR/x87 CW.
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
asm(".text\n.weak emu_ctx_switch\n.type emu_ctx_switch,@function\n.p2align 4\nemu_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size emu_ctx_switch,.-emu_ctx_switch\n");
#endif

inline std::string where(const Launch& L, int i) {
  char b[128];
  const Fiber& f = L.f[i];
  std::snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, f.tid.x, f.tid.y, f.tid.z);
  return b;
}

// ---- switching (scheduler side and fiber side)
inline void resume(Launch& L, int i) {
  Fiber& f = L.f[i];
  L.cur = i;
  threadIdx = f.tid;
  ++stats().switches;
#ifdef EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
#ifdef EMU_FAST_SWITCH
  emu_ctx_switch(&L.sched_sp, f.sp);
#else
  swapcontext(&L.sched_uc, &f.uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void park(bool exiting = false) {  // called on a fiber
  Launch& L = *g_launch;
  Fiber& f = L.f[L.cur];
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake, L.sched_bottom, L.sched_size);
#else
  (void)exiting;
#endif
#ifdef EMU_FAST_SWITCH
  emu_ctx_switch(&f.sp, L.sched_sp);
#else
  swapcontext(&f.uc, &L.sched_uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake, &L.sched_bottom, &L.sched_size);
#endif
}

[[noreturn]] inline void fail(const std::string& msg) {  // called on a fiber
  Launch& L = *g_launch;
  L.error = msg + " at " + where(L, L.cur);
  L.f[L.cur].st = St::Exited;
  park(true);
  std::abort();
}

inline void fiber_entry() {
  Launch& L = *g_launch;
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.sched_bottom, &L.sched_size);
#endif
  try {
    L.call(L.obj);
  } catch (const std::exception& e) {
    L.error = std::string("exception in kernel: ") + e.what();
  } catch (...) {
    L.error = "unknown exception in kernel";
  }
  L.f[L.cur].st = St::Exited;
  park(true);
  std::abort();  // never resumed
}

inline void init_fiber(Launch& L, Fiber& f) {
  (void)L;
  f.st = St::Runnable;
  f.op = Op::None;
#ifdef EMU_ASAN
  __asan_unpoison_memory_region(f.stack, f.stack_size);  // frames of exited fibers stay poisoned
  f.fake = nullptr;
#endif
#ifdef EMU_FAST_SWITCH
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(f.stack + f.stack_size) & ~uintptr_t(15));
  *--sp = nullptr;                                          // fake return address of fiber_entry
  *--sp = reinterpret_cast<void*>(&fiber_entry);            // popped by 'ret'
  for (int k = 0; k < 6; ++k) *--sp = nullptr;              // rbp rbx r12..r15
  *--sp = reinterpret_cast<void*>(L.fpcsr);                 // MXCSR | x87 CW << 32
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = f.stack_size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_entry, 0);
#endif
}

// ---- called on fibers by the intrinsics
inline Launch& current(const char* what) {
  if (!g_launch || g_launch->cur < 0) {
    std::fprintf(stderr, "cuda_emu: %s called outside emu::launch\n", what);
    std::abort();
  }
  return *g_launch;
}
inline uint64_t block_op(Op op, uint64_t pred, const char* file, int line) {
  Launch& L = current(op_name(op));
  Fiber& f = L.f[L.cur];
  f.op = op; f.val = pred; f.file = file; f.line = line; f.st = St::Barrier;
  park();
  return f.result;
}
inline uint64_t warp_op(Op op, unsigned mask, uint64_t val, int param, int width, const char* file, int line) {
  Launch& L = current(op_name(op));
  Fiber& f = L.f[L.cur];
  const unsigned lane = unsigned(L.cur) & 31u;
  if (!((mask >> lane) & 1u)) fail(std::string(op_name(op)) + ": mask does not contain the calling lane");
  if (width < 1 || width > 32 || (width & (width - 1))) fail(std::string(op_name(op)) + ": width must be a power of 2 <= 32");
  f.op = op; f.mask = mask; f.val = val; f.param = param; f.width = width; f.file = file; f.line = line; f.st = St::Warp;
  park();
  return f.result;
}

// ---- scheduler side
// Complete every warp collective whose non-exited participants (lanes named in the mask)
// all wait at the same kind of collective with the same mask.
inline bool resolve_warps(Launch& L) {
  bool progress = false;
  for (unsigned i = 0; i < L.n; ++i) {
    Fiber& f = L.f[i];
    if (f.st != St::Warp) continue;
    const unsigned base = i & ~31u, M = f.mask;
    unsigned present = 0;
    bool ready = true;
    for (unsigned l = 0; l < 32 && ready; ++l) {
      if (!((M >> l) & 1u) || base + l >= L.n) continue;
      const Fiber& g = L.f[base + l];
      if (g.st == St::Exited) continue;
      if (g.st != St::Warp || g.op != f.op || g.mask != M) ready = false;
      else present |= 1u << l;
    }
    if (!ready) continue;
    uint64_t bits = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((present >> l) & 1u && L.f[base + l].val) bits |= 1ull << l;
    for (unsigned l = 0; l < 32; ++l) {
      if (!((present >> l) & 1u)) continue;
      Fiber& g = L.f[base + l];
      const unsigned seg = unsigned(32 - g.width) & 31u, b = unsigned(g.param) & 31u;
      const unsigned maxl = (l & seg) | (31u & ~seg), minl = l & seg;  // PTX shfl.sync semantics
      unsigned j = l;
      bool ok = true;
      switch (g.op) {
        case Op::ShflUp: j = l - b; ok = int(l) - int(b) >= int(minl); break;
        case Op::ShflDown: j = l + b; ok = j <= maxl; break;
        case Op::ShflXor: j = l ^ b; ok = j <= maxl; break;
        case Op::ShflIdx: j = minl | (b & ~seg); ok = j <= maxl; break;
        default: break;
      }
      if (!ok) j = l;
      if (g.op == Op::ShflUp || g.op == Op::ShflDown || g.op == Op::ShflXor || g.op == Op::ShflIdx) {
        if ((present >> j) & 1u) g.result = L.f[base + j].val;
        else { g.result = ~0ull; ++stats().undefined_shfl; }  // source lane inactive: undefined -> poison
      } else if (g.op == Op::Ballot) g.result = bits;
      else if (g.op == Op::Any) g.result = bits != 0;
      else if (g.op == Op::All) g.result = bits == present;
      g.st = St::Runnable;
    }
    ++stats().warp_ops;
    progress = true;
  }
  return progress;
}

inline std::string state_dump(const Launch& L) {
  std::map<std::string, std::pair<unsigned, std::string>> groups;  // description -> (count, sample threads)
  for (unsigned i = 0; i < L.n; ++i) {
    const Fiber& f = L.f[i];
    char d[256];
    if (f.st == St::Exited) std::snprintf(d, sizeof d, "exited");
    else if (f.st == St::Barrier) std::snprintf(d, sizeof d, "waiting in %s at %s:%d", op_name(f.op), f.file, f.line);
    else if (f.st == St::Warp) std::snprintf(d, sizeof d, "waiting in %s(mask=0x%08x) at %s:%d", op_name(f.op), f.mask, f.file, f.line);
    else std::snprintf(d, sizeof d, "runnable");
    auto& g = groups[d];
    if (g.first++ < 4) g.second += (g.second.empty() ? "" : ",") + std::to_string(i);
  }
  std::string s;
  for (auto& [d, g] : groups) s += "\n    " + std::to_string(g.first) + " thread(s) " + d + " (e.g. tid " + g.second + (g.first > 4 ? ",...)" : ")");
  return s;
}

inline void poison_shared(Launch& L) {
  if (!config().poison) return;
  if (L.dsmem_bytes) std::memset(L.dsmem, 0xFF, L.dsmem_bytes);
  if (__start_emu_shared && +__stop_emu_shared > +__start_emu_shared)
    for (volatile char* p = __start_emu_shared; p < __stop_emu_shared; ++p) *p = char(0xFF);
}

inline void run_block(Launch& L, std::vector<int>& order, std::mt19937& rng) {
  ++g_block_epoch;
  poison_shared(L);
  for (auto& f : L.f) init_fiber(L, f);
  char blk[64];
  std::snprintf(blk, sizeof blk, "block (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z);
  for (;;) {
    if (config().order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order)
      if (L.f[i].st == St::Runnable) {
        resume(L, i);
        if (!L.error.empty()) throw Error("cuda_emu: " + L.error);
      }
    L.cur = -1;
    unsigned exited = 0, at_bar = 0;
    for (auto& f : L.f) exited += f.st == St::Exited, at_bar += f.st == St::Barrier;
    if (exited == L.n) return;
    bool progress = resolve_warps(L);
    if (at_bar && at_bar + exited == L.n) {  // every live thread waits at a block barrier
      const Fiber* first = nullptr;
      uint64_t cnt = 0;
      for (auto& f : L.f) {
        if (f.st != St::Barrier) continue;
        if (!first) first = &f;
        else if (f.op != first->op || f.line != first->line || std::strcmp(f.file, first->file) != 0)
          throw Error(std::string("cuda_emu: divergent barrier in ") + blk + ": threads wait at different barriers:" + state_dump(L));
        cnt += f.val != 0;
      }
      if (exited && config().strict_exit)
        throw Error(std::string("cuda_emu: divergent __syncthreads in ") + blk + ": " + std::to_string(exited) +
                    " thread(s) exited while others wait:" + state_dump(L));
      for (auto& f : L.f)
        if (f.st == St::Barrier) {
          f.result = f.op == Op::SyncCount ? cnt : f.op == Op::SyncAnd ? cnt == at_bar : f.op == Op::SyncOr ? cnt != 0 : 0;
          f.st = St::Runnable;
        }
      ++stats().barriers;
      progress = true;
    }
    if (!progress) throw Error(std::string("cuda_emu: deadlock in ") + blk + ":" + state_dump(L));
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t smem, void (*call)(void*), void* obj) {
  if (g_launch) throw Error("cuda_emu: launch from inside a kernel is not supported");
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 0x7fffffffu)
    throw Error("cuda_emu: invalid launch configuration");
  if (smem > 227 * 1024) throw Error("cuda_emu: dynamic shared memory request too large");
  const Config& cfg = config();
  install_segv_handler();
  Launch L;
  L.call = call; L.obj = obj; L.n = unsigned(nt);
  L.f.resize(nt);
  stacks().ensure(L.n, cfg.stack_bytes);
  for (unsigned i = 0; i < L.n; ++i) {
    Fiber& f = L.f[i];
    f.stack = stacks().base + size_t(i) * stacks().slot + stacks().page;
    f.stack_size = stacks().slot - stacks().page;
    f.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
#ifdef EMU_FAST_SWITCH
  uint32_t mx = __builtin_ia32_stmxcsr();
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  L.fpcsr = uint64_t(mx) | (uint64_t(cw) << 32);
#endif
  std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem ? smem : 1]);  // exact size: ASan sees overruns
  L.dsmem = dyn.get();
  L.dsmem_bytes = smem;
  blockDim = block;
  gridDim = grid;
  struct Reset { ~Reset() { g_launch = nullptr; } } reset;
  g_launch = &L;
  std::vector<int> order(L.n);
  std::iota(order.begin(), order.end(), 0);
  if (cfg.order == Order::Descending) std::reverse(order.begin(), order.end());
  std::mt19937 rng(cfg.seed);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block(L, order, rng);
        ++stats().blocks;
      }
  ++stats().launches;
  stats().threads += nt * grid.x * grid.y * grid.z;
}
}  // namespace detail

inline void* dynamic_smem() { return detail::current("dynamic shared memory").dsmem; }

// Static shared memory declared through a registering macro (STATIC_SHARED in fusedres's cuda_compat.cuh):
// called by every thread that reaches the declaration; the first call of each block fills the array with 0xFF
// bytes (when Config::poison), so reads of values the block has not written are visible (NaN in floating point).
inline void block_shared(void* p, size_t bytes) {
  detail::current("static shared memory");
  static std::map<void*, uint64_t> last_poisoned;
  uint64_t& epoch = last_poisoned[p];
  if (epoch == detail::g_block_epoch) return;
  epoch = detail::g_block_epoch;
  if (config().poison) std::memset(p, 0xFF, bytes);
}

// emu::launch(kernel, grid, block, dynamic_smem_bytes, args...)  ==  kernel<<<grid, block, smem>>>(args...)
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "emu::launch: wrong number of kernel arguments");
  std::tuple<std::decay_t<P>...> packed(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  auto body = [&]() { std::apply(kernel, packed); };  // each simulated thread gets its own copies
  detail::run_grid(grid, block, smem, [](void* o) { (*static_cast<decltype(body)*>(o))(); }, &body);
}
}  // namespace emu

// ------------------------------------------------------------------ synchronisation intrinsics
// __builtin_FILE/LINE as default arguments record the call site for divergence reports.
namespace emu::detail {
inline bool dropped_sync(const char* file, int line) {
  const Config& c = config();
  if (c.drop_sync_file.empty() || line != c.drop_sync_line) return false;
  const size_t n = std::strlen(file), m = c.drop_sync_file.size();
  return n >= m && c.drop_sync_file.compare(0, m, file + (n - m)) == 0;
}
}  // namespace emu::detail
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  if (emu::detail::dropped_sync(f, l)) return;
  emu::detail::block_op(emu::detail::Op::Sync, 0, f, l);
}
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(emu::detail::block_op(emu::detail::Op::SyncCount, p != 0, f, l));
}
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(emu::detail::block_op(emu::detail::Op::SyncAnd, p != 0, f, l));
}
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(emu::detail::block_op(emu::detail::Op::SyncOr, p != 0, f, l));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  emu::detail::warp_op(emu::detail::Op::SyncWarp, mask, 0, 0, 32, f, l);
}
inline unsigned __ballot_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return unsigned(emu::detail::warp_op(emu::detail::Op::Ballot, mask, p != 0, 0, 32, f, l));
}
inline int __any_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(emu::detail::warp_op(emu::detail::Op::Any, mask, p != 0, 0, 32, f, l));
}
inline int __all_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(emu::detail::warp_op(emu::detail::Op::All, mask, p != 0, 0, 32, f, l));
}
namespace emu::detail {
template <class T> inline T shfl(Op op, unsigned mask, T var, int param, int width, const char* f, int l) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type larger than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_op(op, mask, bits, param, width, f, l);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu::detail
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int w = warpSize, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::detail::shfl(emu::detail::Op::ShflIdx, m, v, src, w, f, l);
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = warpSize, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::detail::shfl(emu::detail::Op::ShflUp, m, v, int(d), w, f, l);
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = warpSize, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::detail::shfl(emu::detail::Op::ShflDown, m, v, int(d), w, f, l);
}
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = warpSize, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return emu::detail::shfl(emu::detail::Op::ShflXor, m, v, lm, w, f, l);
}
