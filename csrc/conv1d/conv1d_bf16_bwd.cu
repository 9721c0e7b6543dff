// Causal conv1d kernels for __nv_bfloat16 activations, the backward half: 3 widths x its tiled, streaming, async
// (deep / fused / wide), channel-major and generic kernels. See conv1d_kernels.cuh (APRIEL_CONV1D_DEFINE_BWD).
#include "conv1d_kernels.cuh"

APRIEL_CONV1D_DEFINE_BWD(bf16, __nv_bfloat16)
