// Reading framework tensors in a launcher, through the DLPack C exchange API (DLPack 1.x, `DLPackExchangeAPI`).
//
// Why: the per-token ops spend more host time asking a torch.Tensor for its pointer, sizes, strides, dtype and
// device from Python (a few hundred nanoseconds each) than the launch itself costs. A framework that implements
// the exchange API (torch.Tensor.__dlpack_c_exchange_api__, torch 2.11 and newer) hands a C function table that
// fills a DLTensor from the Python object without allocating, and reports its current stream of a device. An
// entry point of the "_dlpack" kind (flashinfer/jit/abi.py, keeps_gil) takes the table and the tensors' PyObject
// pointers, checks here what the Python wrapper would have checked, and calls the plain launcher. Anything it does
// not recognise as the plain case (another dtype or device, a shape or stride to refuse or to copy first, an
// empty tensor) it declines with kDlpackDeclined, and the Python wrapper takes its full path, which raises the
// clear exception or handles the case. Nothing is launched on a declined call.
//
// Only the ABI is described here (the layout of the DLPack 1.x structs the table uses), no Python or torch
// header: the calls run with the GIL held (the table's functions may set a Python error, which the caller sees
// as an exception).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace flashinfer {
namespace dlpack {

// DLPack 1.x ABI (dlpack.h: DLDevice, DLDataType, DLTensor, DLPackExchangeAPI). Field order and types are the
// ABI; the names are ours.
struct Device {
  int32_t type;  // DLDeviceType
  int32_t id;
};
struct DataType {
  uint8_t code;  // DLDataTypeCode
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // never null from DLPack 1.2 on (elements, not bytes)
  uint64_t byte_offset;
};
struct ExchangeApi {
  uint32_t major, minor;  // header.version
  const void* prev_api;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // 0, or -1 with a Python error set
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

constexpr int32_t kDeviceCuda = 2;  // kDLCUDA
constexpr uint8_t kCodeFloat = 2;   // kDLFloat
constexpr uint8_t kCodeBfloat = 4;  // kDLBfloat
// Returned by a _dlpack entry point that launched nothing and leaves the call to the Python path.
constexpr int kDlpackDeclined = 2000;

template <typename T>
struct DtypeOf;
template <>
struct DtypeOf<__half> {
  static constexpr uint8_t code = kCodeFloat;
};
template <>
struct DtypeOf<__nv_bfloat16> {
  static constexpr uint8_t code = kCodeBfloat;
};

// A usable table: DLPack major version 1 with the two functions these entry points call.
static inline bool api_usable(const void* api) {
  const auto* a = static_cast<const ExchangeApi*>(api);
  return a != nullptr && a->major == 1 && a->dltensor_from_py_object_no_sync != nullptr &&
         a->current_work_stream != nullptr;
}

// The view of the tensor `obj` when it is a non-empty tensor of 16-bit element type T on a CUDA device, else
// false (also when the object is no tensor: the table then leaves a Python error set, which the caller raises).
template <typename T>
static bool cuda_view(const void* api, const void* obj, Tensor& t) {
  const auto* a = static_cast<const ExchangeApi*>(api);
  if (a->dltensor_from_py_object_no_sync(const_cast<void*>(obj), &t) != 0) return false;
  if (t.device.type != kDeviceCuda || t.dtype.code != DtypeOf<T>::code || t.dtype.bits != 16 || t.dtype.lanes != 1 ||
      t.data == nullptr)
    return false;
  t.data = static_cast<char*>(t.data) + t.byte_offset;
  t.byte_offset = 0;
  return true;
}

// The framework's current stream of CUDA device `device` (what torch.cuda.current_stream(device) gives).
static inline bool current_stream(const void* api, int32_t device, void** stream) {
  return static_cast<const ExchangeApi*>(api)->current_work_stream(kDeviceCuda, device, stream) == 0;
}

// enable_pdl as the Python wrappers pass it (0: False; 1: True; 2: None): launch as a programmatic dependent
// launch where the device supports it (sm_90+), unless disabled. The capability is asked once per device.
static inline bool resolve_pdl(int enable_pdl, int device) {
  static int major[64] = {0};
  if (enable_pdl == 0 || device < 0 || device >= 64) return false;
  if (major[device] == 0) {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || m <= 0) m = 1;
    major[device] = m;
  }
  return major[device] >= 9;
}

}  // namespace dlpack
}  // namespace flashinfer
