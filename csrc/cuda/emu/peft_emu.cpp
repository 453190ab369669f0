// Fiber scheduler behind peft_emu.h (test-only CPU emulation of CUDA blocks; see the header).
#include "peft_emu.h"

#include <ucontext.h>

#include <vector>

namespace peft_emu {

dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
};

std::vector<Fiber> g_fibers;
std::vector<float> g_slots;
ucontext_t g_sched;
int g_current = -1;
BlockFn g_fn = nullptr;
const void* g_kernel = nullptr;
const void* g_args = nullptr;

void fiber_entry() {
  g_fn(g_kernel, g_args);
  g_fibers[g_current].done = true;  // returning switches to uc_link (the scheduler)
}

int linear_tid() { return threadIdx_.x + blockDim_.x * (threadIdx_.y + blockDim_.y * threadIdx_.z); }

}  // namespace

void barrier() { swapcontext(&g_fibers[g_current].ctx, &g_sched); }

float shfl_xor(float v, int lane_mask) {
  const int t = linear_tid();
  g_slots[t] = v;
  barrier();
  const int partner = (t & ~31) | ((t & 31) ^ lane_mask);
  const float r = partner < static_cast<int>(g_slots.size()) ? g_slots[partner] : v;
  barrier();
  return r;
}

void run_grid(dim3 grid, dim3 block, BlockFn fn, const void* kernel, const void* args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  g_fn = fn;
  g_kernel = kernel;
  g_args = args;
  gridDim_ = grid;
  blockDim_ = block;
  g_fibers.resize(nthreads);
  g_slots.assign(nthreads, 0.f);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx_ = dim3(bx, by, bz);
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = g_fibers[i];
          if (f.stack.empty()) f.stack.resize(kStackBytes);
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &g_sched;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        // Rounds: each live fiber runs until its next barrier or its end, so after a round every live thread waits
        // at the same barrier (CUDA's rule for correct code) and the next round releases them all.
        for (bool live = true; live;) {
          live = false;
          for (int i = 0; i < nthreads; ++i) {
            if (g_fibers[i].done) continue;
            g_current = i;
            threadIdx_ = g_fibers[i].tid;
            swapcontext(&g_sched, &g_fibers[i].ctx);
            live = live || !g_fibers[i].done;
          }
        }
      }
  g_current = -1;
}

}  // namespace peft_emu
