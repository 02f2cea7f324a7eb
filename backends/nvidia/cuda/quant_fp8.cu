// Per-token-group FP8 quantization (DeepSeek-V3's 1x128 activation scaling), e4m3fn.
//
// The CUDA C twin of the Triton kernel hal_kernels.quant.quantize_fp8, and bit-exact with the
// reference hal_cpu.reference.gemm.quantize_fp8: for each row of x [M, K] and each group of 128
// values (the last group of a row may be shorter; its missing values count as zeros):
//
//     scale = max(amax, 1e-4) / 448            (fp32, IEEE division)
//     xq    = fp8_e4m3fn(clamp(x / scale, -448, 448))   (IEEE division, round to nearest even)
//
// NaN propagates as in torch: a group holding a NaN gets a NaN scale and NaN values.
//
// Self-contained on purpose: no #include, so that NVRTC (CuPy's RawModule, at run time) compiles it
// without a CUDA toolkit's headers, and `nvcc -arch=sm_90a -cubin` compiles it as it stands. The fp8
// conversion is PTX's cvt.rn.satfinite.e4m3x2.f32 on sm_89 and newer (what cuda_fp8.h's
// __nv_cvt_float2_to_fp8x2 emits there) and a software round-to-nearest-even below.
//
// Launch contract (hal_nvidia.cuda_kernels is the launcher):
//   block  = HAL_QUANT_THREADS threads (8 warps); each warp quantizes one group, one lane 4 values;
//   grid   = ceil(M * groups / 8) blocks, groups = ceil(K / 128);
//   x      row-major with unit column stride and row stride x_row_stride (elements);
//   xq     uint8 [M, K] contiguous (the bits of float8_e4m3fn); scales float32 [M, groups] contiguous;
//   vec    1 when x's base is 4-element aligned, x_row_stride and K are multiples of 4: 4-wide loads
//          and stores for whole groups; 0 for element-wise access everywhere.

#define HAL_QUANT_GROUP 128
#define HAL_QUANT_WARPS 8
#define HAL_QUANT_THREADS (32 * HAL_QUANT_WARPS)
#define HAL_FP8_E4M3_MAX 448.0f
#define HAL_AMAX_FLOOR 1e-4f

typedef unsigned char hal_u8;
typedef unsigned short hal_u16;
typedef unsigned int hal_u32;

// ---------------------------------------------------------------------------------------------------
// fp32 -> e4m3fn, round to nearest even, saturating to +-448 (NaN stays NaN: 0x7f | sign)
// ---------------------------------------------------------------------------------------------------

// Software conversion; __host__ too, so that a host program can check it against torch's cast.
__host__ __device__ inline hal_u8 hal_e4m3_from_f32_sw(float v) {
    union { float f; hal_u32 u; } bits;
    bits.f = v;
    const hal_u8 sign = (hal_u8)((bits.u >> 24) & 0x80u);
    const hal_u32 mag = bits.u & 0x7fffffffu;
    if (mag > 0x7f800000u) {
        return (hal_u8)(sign | 0x7fu);  // NaN
    }
    bits.u = mag;
    const float a = bits.f;
    if (a >= HAL_FP8_E4M3_MAX) {
        return (hal_u8)(sign | 0x7eu);  // saturate (infinity included) to 448
    }
    if (a < 0.015625f) {
        // Below the smallest normal (2^-6): multiples of 2^-9. a * 512 is exact; rintf rounds to
        // nearest even. 8 (= 2^-6) is the smallest normal's encoding, so a carry needs no care.
        return (hal_u8)(sign | (hal_u8)rintf(a * 512.0f));
    }
    // Normal: keep 3 of fp32's 23 mantissa bits, rounding to nearest even on the 20 dropped ones; a
    // carry out of the mantissa bumps the exponent, as it should. Rebias the exponent 127 -> 7.
    hal_u32 u = mag;
    u += 0x7ffffu + ((u >> 20) & 1u);
    u -= (hal_u32)(127 - 7) << 23;
    return (hal_u8)(sign | (hal_u8)(u >> 20));
}

// Two values at once, packed as cvt.*.e4m3x2 packs them: hi in bits 15..8, lo in bits 7..0.
__device__ inline hal_u16 hal_e4m3x2_from_f32(float hi, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    hal_u16 packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
#else
    return (hal_u16)(((hal_u16)hal_e4m3_from_f32_sw(hi) << 8) | hal_e4m3_from_f32_sw(lo));
#endif
}

// ---------------------------------------------------------------------------------------------------
// Input element types: 0 float32, 1 bfloat16, 2 float16 (16-bit types arrive as their raw bits)
// ---------------------------------------------------------------------------------------------------

__device__ inline float hal_to_f32(float v) { return v; }

template <int KIND>
__device__ inline float hal_half_to_f32(hal_u16 raw);

template <>
__device__ inline float hal_half_to_f32<1>(hal_u16 raw) {
    return __uint_as_float((hal_u32)raw << 16);  // bfloat16 is fp32's top half
}

template <>
__device__ inline float hal_half_to_f32<2>(hal_u16 raw) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(raw));
    return f;
}

template <int KIND>
struct HalLoad;

template <>
struct HalLoad<0> {
    typedef float T;
    __device__ static float one(const float* p) { return *p; }
    __device__ static void four(const float* p, float* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    }
};

template <int KIND>
struct HalLoad16 {
    typedef hal_u16 T;
    __device__ static float one(const hal_u16* p) { return hal_half_to_f32<KIND>(*p); }
    __device__ static void four(const hal_u16* p, float* v) {
        const uint2 q = *reinterpret_cast<const uint2*>(p);
        v[0] = hal_half_to_f32<KIND>((hal_u16)(q.x & 0xffffu));
        v[1] = hal_half_to_f32<KIND>((hal_u16)(q.x >> 16));
        v[2] = hal_half_to_f32<KIND>((hal_u16)(q.y & 0xffffu));
        v[3] = hal_half_to_f32<KIND>((hal_u16)(q.y >> 16));
    }
};

template <>
struct HalLoad<1> : HalLoad16<1> {};

template <>
struct HalLoad<2> : HalLoad16<2> {};

// NaN-propagating max, as torch's amax: once a NaN is in, it stays.
__device__ inline float hal_nanmax(float a, float b) { return (a != a || a > b) ? a : b; }

// ---------------------------------------------------------------------------------------------------
// The kernel body, one warp per group
// ---------------------------------------------------------------------------------------------------

template <int KIND>
__device__ inline void hal_quantize_group(const typename HalLoad<KIND>::T* __restrict__ x,
                                          hal_u8* __restrict__ xq, float* __restrict__ scales, int M,
                                          int K, long long x_row_stride, int vec) {
    const int groups = (K + HAL_QUANT_GROUP - 1) / HAL_QUANT_GROUP;
    const int lane = threadIdx.x & 31;
    const long long g = (long long)blockIdx.x * HAL_QUANT_WARPS + (threadIdx.x >> 5);
    // Uniform per warp: a warp that leaves, leaves whole, so the shuffles below see all 32 lanes.
    if (g >= (long long)M * groups) {
        return;
    }
    const long long row = g / groups;
    const int group = (int)(g - row * groups);
    const int col = group * HAL_QUANT_GROUP + lane * 4;
    const typename HalLoad<KIND>::T* xr = x + row * x_row_stride;
    const bool whole = vec && col + 3 < K;

    float v[4];
    if (whole) {
        HalLoad<KIND>::four(xr + col, v);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[j] = col + j < K ? HalLoad<KIND>::one(xr + col + j) : 0.0f;
        }
    }
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        amax = hal_nanmax(amax, fabsf(v[j]));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        amax = hal_nanmax(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    // torch's clamp(min=1e-4) keeps a NaN; fmaxf would drop it.
    const float floored = amax != amax ? amax : fmaxf(amax, HAL_AMAX_FLOOR);
    // Explicitly IEEE divisions (immune to -use_fast_math), as torch divides.
    const float scale = __fdiv_rn(floored, HAL_FP8_E4M3_MAX);
    if (lane == 0) {
        scales[row * groups + group] = scale;
    }

    float q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // Clamping first is what the reference does; satfinite would saturate the same way, and
        // fminf/fmaxf must not be used here: they would turn a NaN into +-448.
        const float t = __fdiv_rn(v[j], scale);
        q[j] = t > HAL_FP8_E4M3_MAX ? HAL_FP8_E4M3_MAX : (t < -HAL_FP8_E4M3_MAX ? -HAL_FP8_E4M3_MAX : t);
    }
    const hal_u32 lo = hal_e4m3x2_from_f32(q[1], q[0]);
    const hal_u32 hi = hal_e4m3x2_from_f32(q[3], q[2]);
    hal_u8* out = xq + row * (long long)K + col;
    if (whole) {
        *reinterpret_cast<hal_u32*>(out) = lo | (hi << 16);  // little-endian: q[0] at the lowest address
    } else {
        const hal_u32 packed = lo | (hi << 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (col + j < K) {
                out[j] = (hal_u8)(packed >> (8 * j));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points, one per input dtype (C names: what the launcher looks up)
// ---------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(HAL_QUANT_THREADS)
hal_quantize_fp8_e4m3_f32(const float* __restrict__ x, hal_u8* __restrict__ xq, float* __restrict__ scales,
                          int M, int K, long long x_row_stride, int vec) {
    hal_quantize_group<0>(x, xq, scales, M, K, x_row_stride, vec);
}

extern "C" __global__ void __launch_bounds__(HAL_QUANT_THREADS)
hal_quantize_fp8_e4m3_bf16(const hal_u16* __restrict__ x, hal_u8* __restrict__ xq, float* __restrict__ scales,
                           int M, int K, long long x_row_stride, int vec) {
    hal_quantize_group<1>(x, xq, scales, M, K, x_row_stride, vec);
}

extern "C" __global__ void __launch_bounds__(HAL_QUANT_THREADS)
hal_quantize_fp8_e4m3_f16(const hal_u16* __restrict__ x, hal_u8* __restrict__ xq, float* __restrict__ scales,
                          int M, int K, long long x_row_stride, int vec) {
    hal_quantize_group<2>(x, xq, scales, M, K, x_row_stride, vec);
}
