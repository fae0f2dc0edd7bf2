// furnace_int8: FBGEMM's dynamic int8 linear as a plain operator, y = linear(x, key, n).
//
// FBGEMM keeps packed int8 weights in a TorchScript object (quantized::LinearPackedParamsBase), which
// torch.compile cannot pass through a graph. Here the packed weights are held in slots in C++ and the op takes
// the slot number (an int), so a compiled decode step calls FBGEMM straight from its C++ wrapper with no
// Python in between (about 20 us saved per call, 49 calls per token on 112m). Built on first use by
// infer/int8_op.py (torch.utils.cpp_extension.load); infer/int8_op.py has the pure-Python fallback.
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace {

using Packed = c10::intrusive_ptr<LinearPackedParamsBase>;
std::vector<Packed> g_slots;  // slot -> packed weights; a released slot is null and reused
std::mutex g_mutex;

int64_t hold(Packed packed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (size_t i = 0; i < g_slots.size(); ++i) {
    if (!g_slots[i]) {
      g_slots[i] = std::move(packed);
      return static_cast<int64_t>(i);
    }
  }
  g_slots.push_back(std::move(packed));
  return static_cast<int64_t>(g_slots.size()) - 1;
}

void release(int64_t key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (key >= 0 && key < static_cast<int64_t>(g_slots.size())) g_slots[key].reset();
}

// x: (M, K) fp32 -> (M, n) fp32. Activations are quantized per call (uint8, per tensor) by FBGEMM.
at::Tensor linear(const at::Tensor& x, int64_t key, int64_t n) {
  Packed packed;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    TORCH_CHECK(key >= 0 && key < static_cast<int64_t>(g_slots.size()) && g_slots[key],
                "furnace_int8::linear: no packed weights in slot ", key, " (released?)");
    packed = g_slots[key];
  }
  at::Tensor y = packed->apply_dynamic(x, /*reduce_range=*/false);
  TORCH_CHECK(y.size(-1) == n, "furnace_int8::linear: slot ", key, " gives ", y.size(-1), " outputs, not ", n);
  return y;
}

}  // namespace

TORCH_LIBRARY(furnace_int8, m) {
  m.def("hold(__torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> int", hold);
  m.def("release(int key) -> ()", release);
  m.def("linear(Tensor x, int key, int n) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(linear));
}
