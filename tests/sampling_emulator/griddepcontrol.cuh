// Emulated ptx/griddepcontrol.cuh for tests/sampling_emulator (see emu.h): launches are never overlapped.
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

FI_DEVICE void grid_dependency_wait() {}
FI_DEVICE void grid_dependency_launch_dependents() {}
FI_DEVICE void grid_dependency_chain() {}

}  // namespace flashinfer
