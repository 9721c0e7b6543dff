// Causal conv1d kernels for double activations: forward (3 widths x {vectorised 4/8-token tiles, generic}),
// backward (3 widths x {vectorised, generic}) and update (1 kernel). See conv1d_kernels.cuh.
#include "conv1d_kernels.cuh"

APRIEL_CONV1D_DEFINE(fp64, double)
