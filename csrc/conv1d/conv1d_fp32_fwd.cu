// Causal conv1d kernels for float activations, the forward half: forward (3 widths x its tiled, streaming,
// async, channel-major and generic kernels) and update (1 kernel). See conv1d_kernels.cuh (APRIEL_CONV1D_DEFINE_FWD).
#include "conv1d_kernels.cuh"

APRIEL_CONV1D_DEFINE_FWD(fp32, float)
