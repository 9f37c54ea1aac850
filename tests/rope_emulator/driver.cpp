// Entry points of the RoPE host emulator (tests/_rope_emu.py builds it with -DFI_ROPE_FORMS=<0, 1 or 2>): the
// unmodified rope_kernel and launch_rope of rope.cuh, whose launches (launch_kernel) run here thread by thread.
#include "prelude.h"
#include "rope.cuh"

#include <set>

using namespace flashinfer;

namespace emu {
static std::set<const void*> kernels;  // the kernel instances launched since emu_reset

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t, cudaStream_t, bool, Args&&... args) {
  kernels.insert(reinterpret_cast<const void*>(kernel));
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      for (unsigned tx = 0; tx < block.x; ++tx) {
        bid = {bx, by, 0};
        tid = {tx, 0, 0};
        kernel(args...);
      }
    }
  }
  return cudaSuccess;
}
}  // namespace emu

extern "C" {
int emu_kernels_launched() { return static_cast<int>(emu::kernels.size()); }
void emu_reset() { emu::kernels.clear(); }
void emu_set_sms(int sms) { emu::sms = sms; }

// strides: q, k, q_out, k_out (token, head), elements. rope_theta 0: the cos/sin cache launcher (cache, cache_rows,
// cache_stride, record), else the frequency-table one (pos_ids, or indptr/offsets of batch_size requests).
int emu_rope(int bf16, const void* q, const void* k, void* q_out, void* k_out, const int64_t* strides, int nnz,
             int num_q_heads, int num_k_heads, int head_dim, int rotary_dim, int interleave, const void* pos_ids,
             const void* indptr, const void* offsets, int pos_int64, int indptr_int64, int batch_size,
             const float* cache, int64_t cache_rows, int64_t cache_stride, double rope_theta, int64_t* record) {
  RopeParams p{};
  p.q = q, p.k = k, p.q_out = q_out, p.k_out = k_out;
  p.q_stride_n = strides[0], p.q_stride_h = strides[1], p.k_stride_n = strides[2], p.k_stride_h = strides[3];
  p.q_out_stride_n = strides[4], p.q_out_stride_h = strides[5];
  p.k_out_stride_n = strides[6], p.k_out_stride_h = strides[7];
  p.nnz = nnz, p.num_q_heads = num_q_heads, p.num_k_heads = num_k_heads;
  p.head_dim = head_dim, p.rotary_dim = rotary_dim, p.interleave = interleave;
  p.pos_ids = pos_ids, p.indptr = indptr, p.offsets = offsets;
  p.pos_int64 = pos_int64, p.indptr_int64 = indptr_int64, p.batch_size = batch_size;
  p.cos_sin_cache = cache, p.cache_rows = cache_rows, p.cache_stride = cache_stride, p.position_error = record;
  cudaError_t e;
  if (rope_theta == 0) {
    e = bf16 ? launch_rope<__nv_bfloat16>(p, NoRopeTable{}, 0, nullptr)
             : launch_rope<half>(p, NoRopeTable{}, 0, nullptr);
  } else {
    RopeTable table;
    fill_rope_table(table, rotary_dim, 1.0, rope_theta);
    e = bf16 ? launch_rope<__nv_bfloat16>(p, table, 0, nullptr) : launch_rope<half>(p, table, 0, nullptr);
  }
  return static_cast<int>(e);
}
}
