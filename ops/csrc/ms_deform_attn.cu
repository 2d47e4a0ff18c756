// Multi-scale deformable attention forward and backward kernels, device code only.
//
// Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
// L levels, P sampling points per (head, level). Layouts, dtypes, kernel names and the launch
// geometry: see ms_deform_attn.h; ops/cuda/unfused.py does the host side.
//
// Work layout. One thread handles one (n, q, m) and a chunk of CPT = 16 / sizeof(T) consecutive
// channels of head m, so each bilinear neighbour costs one 16-byte load per thread (4 floats, 8
// halves or bfloat16s, 2 doubles). The G threads that share an (n, q, m) form a group of consecutive
// lanes, G the power of two >= ceil(D / CPT), capped at 32; heads wider than 32 chunks loop over
// chunks inside the thread. Consecutive groups are consecutive queries of one head (see
// query_head_of), for L1 reuse between neighbouring queries. Every thread of a group walks the
// same L*P sampling points and computes the bilinear weights and neighbour rows itself: repeating
// that arithmetic in G lanes is cheaper than passing it between them, and the location/weight
// loads are warp broadcasts.
//
// D that is not a multiple of CPT takes the same code with scalar, bounds-checked loads (the
// kVec = false instantiations), so any D is correct; these are also correct for pointers that are not
// 16-byte aligned, but ops/cuda/unfused.py copies such a view to an aligned tensor rather than pay 8 loads
// and atomics per neighbour (in half precision) for the rest of the call.
//
// Backward: grad_value takes atomic adds (one per neighbour and channel; one per 4 channels on
// sm_90+) into a float32 (float64 for double) workspace the caller zeroed. The gradients of a
// point's location and attention weight are sums over the head's D channels: each thread sums its
// chunk, the group reduces with __shfl_xor_sync and lane 0 stores once, so those two outputs need
// no atomics and no zero fill.
//
// The file compiles with NVRTC (no host headers: no <cstdint>, no <type_traits>) and with g++
// against csrc/emu/cuda_emu.h, which defines the CUDA built-ins for the CPU emulation.

#include "bilinear.h"  // neighbours_of: the sampling convention, shared with the CPU kernel
#include "ms_deform_attn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace msda {

using i64 = long long;

// Minimum resident blocks per SM promised to ptxas, which caps registers per thread (3: 80, 2: 128).
// Left to itself ptxas aims at 64 registers (4 blocks) and spills: in the forward kernel the 8
// neighbour loads of two sampling points, in the backward kernel the per-channel loads and
// atomics of the half-precision scalar path. The vectorized kernels end up at 64-80 registers.
constexpr int kForwardMinBlocks = 3;
constexpr int kBackwardMinBlocks = 2;

template <typename A>
struct IsFloat {
  static constexpr bool value = false;
};
template <>
struct IsFloat<float> {
  static constexpr bool value = true;
};

// Accumulation (and location / attention weight) type for a storage type.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Reads the CPT channels at p (read-only path). kVec: one 16-byte load, p 16-byte aligned.
// Otherwise: n scalar loads, the rest of the chunk reads as 0 (tail of a D that CPT does not divide).
template <typename T, int CPT, bool kVec>
__device__ __forceinline__ void load_chunk(const T* p, int n, typename AccOf<T>::type (&dst)[CPT]) {
  if constexpr (kVec) {
    alignas(16) T tmp[CPT];
    *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int i = 0; i < CPT; ++i) dst[i] = to_acc(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) dst[i] = i < n ? to_acc(__ldg(p + i)) : typename AccOf<T>::type(0);
  }
}

// Writes the first n of CPT channels to p, converting to T; kVec as in load_chunk (then n == CPT).
template <typename T, int CPT, bool kVec>
__device__ __forceinline__ void store_chunk(T* p, int n, const typename AccOf<T>::type (&src)[CPT]) {
  if constexpr (kVec) {
    alignas(16) T tmp[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) tmp[i] = from_acc<T>(src[i]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(tmp);
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      if (i < n) p[i] = from_acc<T>(src[i]);
    }
  }
}

// p[i] += scale * g[i] for the first n of CPT channels, atomically. Hopper and later have 16-byte
// float atomics, which cut the number of atomic transactions (backward's bottleneck) by 4.
template <typename A, int CPT, bool kVec>
__device__ __forceinline__ void atomic_add_chunk(A* p, int n, A scale, const A (&g)[CPT]) {
// The float4 overload ships in sm_90_rt.h from CUDA 12.4 on; ops/cuda/build.py requires NVRTC >= 12.4.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kWide = kVec && IsFloat<A>::value && CPT % 4 == 0;
#else
  constexpr bool kWide = false;
#endif
  if constexpr (kWide) {
#pragma unroll
    for (int i = 0; i < CPT; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i),
                make_float4(scale * g[i], scale * g[i + 1], scale * g[i + 2], scale * g[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      if (kVec || i < n) atomicAdd(p + i, scale * g[i]);
    }
  }
}

// The (n, q, m) a thread group works on, and its flat index into the (N, Lq, M, ...) tensors.
// Groups run head-major, (n, m, q) with q fastest: the groups of a block are neighbouring queries of
// one head, whose sampling windows overlap (encoder queries are neighbouring pixels), so many of
// their neighbour loads hit in L1. Query-major order would spread a block over all M heads, whose
// value slices are disjoint.
struct QueryHead {
  i64 value_offset;  // of value[n, 0, m, 0]; a neighbour at position s is s rows of M*D further
  i64 nqm;           // flat (n, q, m)
};

__device__ __forceinline__ QueryHead query_head_of(i64 group, const Dims& d) {
  const i64 nm = group / d.Lq;
  const i64 q = group - nm * d.Lq;
  const i64 n = nm / d.M;
  const i64 m = nm - n * d.M;
  return {(n * d.S * d.M + m) * d.D, (n * d.Lq + q) * d.M + m};
}

// Copies (H, W, start) of every level to shared memory: every sampling point reads them, and the
// block reads them once instead of every thread once per point. Must run before any thread exits.
__device__ __forceinline__ void stage_levels(const i64* __restrict__ spatial_shapes,
                                             const i64* __restrict__ level_start_index, int L,
                                             int* s_levels) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    s_levels[3 * l] = static_cast<int>(spatial_shapes[2 * l]);
    s_levels[3 * l + 1] = static_cast<int>(spatial_shapes[2 * l + 1]);
    s_levels[3 * l + 2] = static_cast<int>(level_start_index[l]);
  }
  __syncthreads();
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(MSDA_THREADS, kForwardMinBlocks)
    forward_kernel(const T* __restrict__ value, const i64* __restrict__ spatial_shapes,
                        const i64* __restrict__ level_start_index,
                        const typename AccOf<T>::type* __restrict__ sampling_locations,
                        const typename AccOf<T>::type* __restrict__ attention_weights,
                        T* __restrict__ output, const Dims d) {
  using A = typename AccOf<T>::type;
  constexpr int CPT = 16 / sizeof(T);
  // Two points per iteration put 8 independent 16-byte neighbour loads in flight per thread; the
  // scalar path already issues CPT loads per neighbour and would only spill.
  constexpr int kPointUnroll = kVec ? 2 : 1;
  extern __shared__ int s_levels[];
  stage_levels(spatial_shapes, level_start_index, d.L, s_levels);

  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 group = tid >> d.log2_group;
  if (group >= d.n_groups) return;
  const int group_size = 1 << d.log2_group;
  const int lane = static_cast<int>(tid & (group_size - 1));
  const QueryHead qh = query_head_of(group, d);
  const i64 nqm = qh.nqm;
  const int LP = d.L * d.P;

  const T* value_nm = value + qh.value_offset;
  const A* loc_g = sampling_locations + nqm * LP * 2;
  const A* attn_g = attention_weights + nqm * LP;

  for (int chunk = lane; chunk < d.n_chunks; chunk += group_size) {
    const int c0 = chunk * CPT;
    const int n_valid = min(CPT, d.D - c0);
    const T* v = value_nm + c0;
    A acc[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[c] = A(0);

    for (int l = 0; l < d.L; ++l) {
      const int H = s_levels[3 * l], W = s_levels[3 * l + 1], start = s_levels[3 * l + 2];
#pragma unroll(kPointUnroll)
      for (int p = 0; p < d.P; ++p) {
        const int i = l * d.P + p;
        const A x = __ldg(loc_g + 2 * i);
        const A y = __ldg(loc_g + 2 * i + 1);
        const A w = __ldg(attn_g + i);
        const Neighbours<A> nb = neighbours_of(x, y, H, W, start);
        const A hh = A(1) - nb.lh, hw = A(1) - nb.lw;
        // The attention weight folded into the bilinear weights: 4 multiplies instead of CPT.
        const A coef[4] = {w * hh * hw, w * hh * nb.lw, w * nb.lh * hw, w * nb.lh * nb.lw};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          // A neighbour outside the map is skipped, not read with weight 0: 0 * inf is NaN where the
          // reference reads 0 (the backward below likewise).
          if (nb.valid & (1u << k)) {
            A s[CPT];
            load_chunk<T, CPT, kVec>(v + static_cast<i64>(nb.row[k]) * d.row_stride, n_valid, s);
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[c] = fma(coef[k], s[c], acc[c]);
          }
        }
      }
    }
    store_chunk<T, CPT, kVec>(output + nqm * d.D + c0, n_valid, acc);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(MSDA_THREADS, kBackwardMinBlocks)
    backward_kernel(const T* __restrict__ grad_output, const T* __restrict__ value,
                         const i64* __restrict__ spatial_shapes,
                         const i64* __restrict__ level_start_index,
                         const typename AccOf<T>::type* __restrict__ sampling_locations,
                         const typename AccOf<T>::type* __restrict__ attention_weights,
                         typename AccOf<T>::type* __restrict__ grad_value,
                         typename AccOf<T>::type* __restrict__ grad_sampling_locations,
                         typename AccOf<T>::type* __restrict__ grad_attention_weights,
                         const Dims d) {
  using A = typename AccOf<T>::type;
  constexpr int CPT = 16 / sizeof(T);
  constexpr int kPointUnroll = kVec ? 2 : 1;  // as in the forward kernel
  extern __shared__ int s_levels[];
  stage_levels(spatial_shapes, level_start_index, d.L, s_levels);

  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 group = tid >> d.log2_group;
  // G divides MSDA_THREADS, so a group is wholly in or out of range and leaves as a whole; the
  // shuffles below name only the lanes of their own group, so exited groups do not matter.
  if (group >= d.n_groups) return;
  const int group_size = 1 << d.log2_group;
  const int lane = static_cast<int>(tid & (group_size - 1));
  const unsigned group_mask =
      group_size == 32 ? 0xffffffffu
                       : ((1u << group_size) - 1u) << (threadIdx.x & 31u & ~unsigned(group_size - 1));
  const QueryHead qh = query_head_of(group, d);
  const i64 nqm = qh.nqm, value_offset = qh.value_offset;
  const int LP = d.L * d.P;

  const A* loc_g = sampling_locations + nqm * LP * 2;
  const A* attn_g = attention_weights + nqm * LP;
  A* grad_loc_g = grad_sampling_locations + nqm * LP * 2;
  A* grad_attn_g = grad_attention_weights + nqm * LP;

  for (int it = 0; it < d.chunk_iters; ++it) {
    const int c0 = (lane + it * group_size) * CPT;
    // A lane past the last chunk (D < G*CPT, or the last iteration) idles but still takes part in
    // the group's shuffles with zero partial sums.
    const int n_valid = max(0, min(CPT, d.D - c0));
    const T* v = value + value_offset + c0;
    A* gv = grad_value + value_offset + c0;
    A g[CPT];
    if (n_valid > 0) {
      load_chunk<T, CPT, kVec>(grad_output + nqm * d.D + c0, n_valid, g);
    } else {
#pragma unroll
      for (int c = 0; c < CPT; ++c) g[c] = A(0);
    }

    for (int l = 0; l < d.L; ++l) {
      const int H = s_levels[3 * l], W = s_levels[3 * l + 1], start = s_levels[3 * l + 2];
#pragma unroll(kPointUnroll)
      for (int p = 0; p < d.P; ++p) {
        const int i = l * d.P + p;
        const A x = __ldg(loc_g + 2 * i);
        const A y = __ldg(loc_g + 2 * i + 1);
        const A w = __ldg(attn_g + i);
        const Neighbours<A> nb = neighbours_of(x, y, H, W, start);
        const unsigned valid = n_valid > 0 ? nb.valid : 0u;
        const A lh = nb.lh, lw = nb.lw, hh = A(1) - lh, hw = A(1) - lw;
        const A bw[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
        // d bw[k] / d w_im and d bw[k] / d h_im.
        const A dbw_dx[4] = {-hh, hh, -lh, lh};
        const A dbw_dy[4] = {-hw, -lw, hw, lw};
        A sum_attn = A(0), sum_x = A(0), sum_y = A(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (valid & (1u << k)) {
            const i64 row = static_cast<i64>(nb.row[k]) * d.row_stride;
            A s[CPT];
            load_chunk<T, CPT, kVec>(v + row, n_valid, s);
            A dot = A(0);  // <grad_output, neighbour value> over this thread's channels
#pragma unroll
            for (int c = 0; c < CPT; ++c) dot = fma(g[c], s[c], dot);
            sum_attn = fma(bw[k], dot, sum_attn);
            sum_x = fma(dbw_dx[k], dot, sum_x);
            sum_y = fma(dbw_dy[k], dot, sum_y);
            if (grad_value != nullptr) atomic_add_chunk<A, CPT, kVec>(gv + row, n_valid, w * bw[k], g);
          }
        }
        // Butterfly: afterwards every lane of the group holds the sums over all D channels.
        for (int offset = group_size >> 1; offset > 0; offset >>= 1) {
          sum_attn += __shfl_xor_sync(group_mask, sum_attn, offset);
          sum_x += __shfl_xor_sync(group_mask, sum_x, offset);
          sum_y += __shfl_xor_sync(group_mask, sum_y, offset);
        }
        if (lane == 0) {
          A grad_attn = sum_attn;
          A grad_x = w * A(W) * sum_x;  // d w_im / d x = W
          A grad_y = w * A(H) * sum_y;  // d h_im / d y = H
          if (it > 0) {  // heads wider than G chunks: this same thread stored the earlier part
            grad_attn += grad_attn_g[i];
            grad_x += grad_loc_g[2 * i];
            grad_y += grad_loc_g[2 * i + 1];
          }
          grad_attn_g[i] = grad_attn;
          grad_loc_g[2 * i] = grad_x;
          grad_loc_g[2 * i + 1] = grad_y;
        }
      }
    }
  }
}

}  // namespace msda
