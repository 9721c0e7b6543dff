// The Python module object of apriel_kernels._C. Ops are registered with TORCH_LIBRARY_FRAGMENT in each
// kernel family's host file (csrc/<family>/*_api.cpp) when this shared object is loaded; importing the
// module is only the way to load it, so no pybind11 is needed here.
#include <Python.h>

static struct PyModuleDef apriel_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&apriel_kernels_module); }
