// Device math shared by the scan families (csrc/scan: the fused mixer scan; csrc/sscan: the generic scan):
// dtype conversion, the MUFU forms of exp2 / log2 / reciprocal and the functions built on them, and the
// K-lane reduce-scatter of per-token partial sums. CUDA headers only.
//
// .ftz is spelled out in the MUFU forms: the build does not use --use_fast_math, and without it __expf adds a
// range check and two predicated multiplies around every ex2 (5 instructions instead of 2).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace apriel {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 2^v on the MUFU unit (A is pre-scaled by log2 e so exp(delta A) = ex2(delta A2)).
__device__ __forceinline__ float ex2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
// 2^v on the FMA pipe (the FlashAttention-4 trick: a share of a MUFU-bound kernel's exponentials moved to the
// FP32 units). v <= 0 (decays); clamped at -125 (2^-125 stands for ex2's flushed 0). v = j + f, j = rint(v) read
// from the magic sum's low mantissa bits, f in [-0.5, 0.5]; 2^f by 1 + f p(f), p of degree 4 fitted for relative
// error (1.9e-7 max in fp32 Horner, ex2.approx.ftz: 2^-22 ~ 2.4e-7; exactly 1 at f = 0 and below 1 for f < 0, so a
// decay never exceeds 1); 2^j added to the result's exponent field.
__device__ __forceinline__ float ex2_fma(float v) {
  v = fmaxf(v, -125.f);
  const float t = v + 12582912.f;  // 1.5 x 2^23
  const float f = v - (t - 12582912.f);
  float p = fmaf(1.326472731307149e-3f, f, 9.671512991189957e-3f);
  p = fmaf(p, f, 5.550733581185341e-2f);
  p = fmaf(p, f, 2.4022242426872253e-1f);
  p = fmaf(p, f, 6.931470036506653e-1f);
  p = fmaf(p, f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}
__device__ __forceinline__ float lg2_ftz(float v) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float rcp_ftz(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
// These run once per (channel, token), next to 16 recurrence steps.
__device__ __forceinline__ float sigmoid_fast(float v) { return rcp_ftz(1.f + ex2(-kLog2e * v)); }
// sigmoid(a) and sigmoid(b) with one MUFU.RCP instead of two: r = 1 / (ea eb) with ea = 1 + e^-a, eb = 1 + e^-b,
// then 1 / ea = eb r and 1 / eb = ea r (~4 instructions more for one MUFU op: ex2_fma spends ~9 per MUFU op it
// saves). e^-v is clamped at 2^63 so ea eb <= 2^126 stays finite and normal (without the clamp, eb = inf would give
// 1 / ea = inf x 0 = NaN): below v = -43.7 the sigmoid reads 2^-63 instead of e^v, an absolute error under 1.1e-19.
// Within 1.6e-7 relative of two sigmoid_fast calls (numpy float32 emulation). The v7 forward's prep (session 16).
__device__ __forceinline__ void sigmoid_pair(float a, float b, float& sa, float& sb) {
  const float ea = 1.f + ex2(fminf(-kLog2e * a, 63.f));
  const float eb = 1.f + ex2(fminf(-kLog2e * b, 63.f));
  const float r = rcp_ftz(ea * eb);
  sa = eb * r;
  sb = ea * r;
}
// softplus with the peers' threshold (v > 20: v); log1p(e) by its series below e = 1e-2, where 1 + e would
// round away the digits a small delta is made of, by lg2(1 + e) ln 2 above.
__device__ __forceinline__ float softplus_fast(float v) {
  const float e = ex2(kLog2e * v);
  const float small = e * (1.f - e * (0.5f - e * (1.f / 3.f - e * 0.25f)));  // error < e^5 / 5
  return v > 20.f ? v : (e < 1e-2f ? small : lg2_ftz(1.f + e) * kLn2);
}

// softplus with one MUFU op (softplus_fast / softplus_select take two: ex2 and lg2): max(v, 0) + log1p(x) with
// x = e^-|v| in (0, 1], log1p(x) = x q(x), q of degree 7 fitted for relative error on [0, 1] (3.3e-7 in fp32 Horner
// with FMA; lg2.approx's absolute error of 2^-21.4 near 1 makes softplus_fast's relative error up to ~2e-5 for
// 0.01 <= e^v <= 1). Past v = 17 the sum rounds to v, as the peers' threshold at 20 returns; +-inf and NaN pass as
// there. The v7 forward's prep (session 16).
__device__ __forceinline__ float softplus_poly(float v) {
  const float x = ex2(-kLog2e * fabsf(v));
  float q = fmaf(-8.539008907973766e-3f, x, 4.4088706374168396e-2f);
  q = fmaf(q, x, -0.1076800525188446f);
  q = fmaf(q, x, 0.17745094001293182f);
  q = fmaf(q, x, -0.2449539452791214f);
  q = fmaf(q, x, 0.33275464177131653f);
  q = fmaf(q, x, -0.4999740421772003f);
  q = fmaf(q, x, 0.9999998211860657f);
  return fmaxf(v, 0.f) + x * q;
}

// Sum of acc[t] over the K lanes of a channel (K consecutive lanes), scattered: lane j ends with the totals of
// tokens base .. base + kLen / K - 1 in acc[0 ..]. Each halving step exchanges half of the remaining values
// (kLen - kLen / K shuffles in all, vs log2(K) * kLen for a butterfly per token); fixed order: deterministic.
template <int K, int kLen>
__device__ __forceinline__ void reduce_scatter(float (&acc)[kLen], int j, int& base) {
  base = 0;
  int len = kLen;
#pragma unroll
  for (int off = K / 2; off >= 1; off >>= 1) {
    const bool upper = (j & off) != 0;
    const int half = len / 2;
#pragma unroll
    for (int i = 0; i < kLen / 2; ++i) {
      if (i < half) {
        const float send = upper ? acc[i] : acc[i + half];
        const float keep = upper ? acc[i + half] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
    }
    if (upper) base += half;
    len = half;
  }
}

}  // namespace apriel
