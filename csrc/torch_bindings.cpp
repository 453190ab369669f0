// The one op-registration file: every schema of the peft_kernels namespace is defined here. Implementations are
// registered per dispatch key next to their code: csrc/cpu (CPU) and csrc/cuda (CUDA). Python fakes for
// torch.compile live in peft_kernels/ops/compiled.py.
//
// The module object is empty: importing peft_kernels._C only runs the static registrations below. It uses no
// CPython API beyond PyModule_Create, so it is built with Py_LIMITED_API (one abi3 wheel for CPython >= 3.10).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // per-interpreter state: none
      NULL,  // methods: none, the ops live in torch.ops.peft_kernels
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(peft_kernels, m) {
  m.def(
      "adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor lora_scale, "
      "Tensor lora_rank, Tensor lora_ids, Tensor lokr_w1, Tensor lokr_w2, Tensor lokr_scale, Tensor lokr_ids) "
      "-> Tensor");
}
