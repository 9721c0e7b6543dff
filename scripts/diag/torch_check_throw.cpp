#include <torch/all.h>
#include <torch/library.h>
#include <Python.h>
at::Tensor boom(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "x: expected 99 dims, got ", x.dim()); return x; }
TORCH_LIBRARY_FRAGMENT(thr_C, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(thr_C, CPU, m) { m.impl("boom", &boom); }
TORCH_LIBRARY_IMPL(thr_C, CUDA, m) { m.impl("boom", &boom); }
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "torch_check_throw", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_torch_check_throw(void) { return PyModule_Create(&mod); }
