// Emulated cooperative_groups::this_cluster() for tests/sampling_emulator (see emu.h).
#pragma once
#include "emu.h"

namespace cooperative_groups {

struct cluster_group {
  unsigned block_rank() const { return ::emu::me().rank; }
  unsigned num_blocks() const { return ::emu::st().cluster_size; }
  void sync() const { ::emu::arrive_wait(::emu::st().cluster, "cluster"); }
  // The split barrier of a kernel's start (arrive, then wait before the first remote access): emulated as one
  // barrier at the wait, which orders at least as much.
  struct arrival_token {};
  arrival_token barrier_arrive() const { return {}; }
  void barrier_wait() const { sync(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    ::emu::State& s = ::emu::st();
    const uint8_t* mine = ::emu::my_cta().smem;
    const ptrdiff_t off = reinterpret_cast<const uint8_t*>(p) - mine;
    if (off < 0 || rank >= s.cluster_size) {
      s.error = "cluster_map of an address outside this CTA's shared memory, or of a rank outside the cluster";
      return p;
    }
    return reinterpret_cast<T*>(s.ctas[rank].smem + off);
  }
};

inline cluster_group this_cluster() { return cluster_group(); }

}  // namespace cooperative_groups
