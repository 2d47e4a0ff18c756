// Small kernels that each keep or break one CUDA rule: the emulation's own tests (test_emulation.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rules {

// Sum over each group of `width` lanes with a butterfly: every lane ends with its group's total.
__global__ void butterfly(const float* in, float* out, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const unsigned mask = width == 32 ? 0xffffffffu : ((1u << width) - 1u) << (lane & ~(width - 1));
  float v = in[i];
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  out[i] = v;
}

// out_* = the value another lane holds: lane + delta, lane - delta, lane `delta` of the warp.
__global__ void shuffles(const double* in, double* down, double* up, double* idx, int delta) {
  const int i = threadIdx.x;
  down[i] = __shfl_down_sync(0xffffffffu, in[i], delta);
  up[i] = __shfl_up_sync(0xffffffffu, in[i], delta);
  idx[i] = __shfl_sync(0xffffffffu, in[i], delta);
}

// Reverses a block's values through shared memory: needs the barrier.
__global__ void reverse(const int* in, int* out) {
  extern __shared__ int tile[];
  tile[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void caller_outside_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x1u, 1.0f, 1); }

__global__ void named_lane_exited(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void different_shuffles(float* out) {
  float v;
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, 2.0f, 1);
  }
  out[threadIdx.x] = v;
}

// Lane i reads lane (i ^ flip) & ~clear's slot of shared memory; `sync` 0 leaves out the __syncwarp.
__global__ void swap_pairs(const int* in, int* out, int sync, int flip, int clear) {
  extern __shared__ int slots[];
  slots[threadIdx.x] = in[threadIdx.x];
  if (sync) __syncwarp(0xffffffffu);
  out[threadIdx.x] = slots[(threadIdx.x ^ flip) & ~clear];
}

__global__ void syncwarp_outside_mask(float* out) {
  __syncwarp(0x1u);
  out[threadIdx.x] = 1.0f;
}

__global__ void syncwarp_lane_exited(float* out) {
  if (threadIdx.x == 7) return;
  __syncwarp(0xffffffffu);
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// One 16-byte copy per thread, `offset` floats into both arrays.
__global__ void vector_copy(const float* in, float* out, int offset) {
  const int i = 4 * threadIdx.x + offset;
  *reinterpret_cast<uint4*>(out + i) = __ldg(reinterpret_cast<const uint4*>(in + i));
}

__global__ void scalar_atomics(float* p, int offset) { atomicAdd(p + offset, 1.0f); }

#if __CUDA_ARCH__ >= 900
__global__ void vector_atomics(float* p, int offset) {
  atomicAdd(reinterpret_cast<float4*>(p + offset), make_float4(1.0f, 2.0f, 3.0f, 4.0f));
}
#endif

// Round-trips floats through both half types.
__global__ void convert(const float* in, __nv_bfloat16* bf16, __half* f16, float* bf16_back, float* f16_back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  bf16[i] = __float2bfloat16_rn(in[i]);
  f16[i] = __float2half_rn(in[i]);
  bf16_back[i] = __bfloat162float(bf16[i]);
  f16_back[i] = __half2float(f16[i]);
}

}  // namespace rules
