// Fused multi-scale deformable attention: softmax over L*P and the sampling locations computed inside
// the kernel from the raw offsets and attention logits. Device code only: NVRTC compiles the kernels
// by their name expressions (msda_fused::forward_kernel<float, true>, ...), g++ compiles the file
// against csrc/emu/cuda_emu.h for the CPU emulation; ops/cuda/fused.py holds the host side (launch
// shapes, FusedDims, the choice of instantiation).
//
// Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
// L levels, P sampling points per (head, level), R = 2 (points) or 4 (boxes).
//
// Layouts (contiguous):
//   value              (N, S, M, D)          T
//   spatial_shapes     (L, 2) int64 (H, W);  level_start_index (L,) int64
//   reference_points   (N, Lq, L, R)         A: (x, y) points or (cx, cy, w, h) boxes, normalized
//   offsets            (N, Lq, M, L, P, 2)   A: pixels of level l (points); half box / P (boxes)
//   attention_logits   (N, Lq, M, L, P)      A: before the softmax over each head's L*P points
//   output             (N, Lq, M, D)         T
//   grad_value         (N, S, M, D)          A, zeroed by the caller; null: value needs no gradient
//   grad_offsets       (N, Lq, M, L, P, 2)   A, written once per element
//   grad_logits        (N, Lq, M, L, P)      A, written (twice: d/dweight, then d/dlogit)
//   grad_locations     (N, Lq, M, L, P, 2)   A, d loss / d normalized location; null unless the
//                                            reference points need a gradient (the host sums it)
//   T: float, __half, __nv_bfloat16, double; A: float (double for double).
//
// Sampling is the paper's (grid_sample, align_corners=False, zero padding): location (x, y) on level
// l reads pixel (y*H - 0.5, x*W - 0.5). For points, x*W - 0.5 = ref_x*W + offset_x - 0.5.
//
// Work layout. As in ms_deform_attn.cu, a group of G lanes (a power of two <= 32, consecutive lanes of
// one warp) handles one (n, q, m), each lane CPT = 16/sizeof(T) channels, so one neighbour is one
// 16-byte load per lane. What differs is the per-point arithmetic (softmax weight, location,
// bilinear weights, neighbour rows): the lanes of a group split a tile of points, each lane computes
// its points once and writes a record to shared memory, and after a __syncwarp every lane reads each
// record with two 16-byte shared loads. Neighbours outside the map get weight 0 and a row clamped
// into the map, so every point issues its four loads without a branch and the loads of several
// points are in flight at once.
//
// Backward. Each lane writes its four partial dot products <grad_out, neighbour> per point to shared
// memory; the point's owner lane sums the G partials and derives d/dweight and d/dlocation, so there
// is no shuffle tree per point. grad_value takes atomics (16-byte float atomics on sm_90+); where two
// groups of a warp add to the same address, the contributions are summed by shuffles first and one
// lane issues the atomic. The softmax backward runs once per group at the end.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// 1: the backward can aggregate atomics (FusedDims::aggregate picks it per launch): lanes of
// different groups that add to the same grad_value address sum by shuffles first and one atomic
// goes out, at the cost of a MATCH and a VOTE per neighbour when nothing collides. 0: compiled out
// (ops.bench.sass reads the point loop without it).
#ifndef MSDA_FUSED_AGGREGATE
#define MSDA_FUSED_AGGREGATE 1
#endif

namespace msda_fused {

typedef long long i64;

// -inf of the accumulation type (ops/csrc/emu/cuda_emu.h defines these built-ins for the CPU too).
__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) { return __longlong_as_double(0xfff0000000000000ULL); }

// Accumulation (and coordinate) type for a storage type.
template <typename T>
struct AccOf {
  typedef float type;
};
template <>
struct AccOf<double> {
  typedef double type;
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
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct is_half {
  static constexpr bool value = false;
};
template <>
struct is_half<__half> {
  static constexpr bool value = true;
};

__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return floor(x); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// Largest block the host launches (the register cap: 256 threads x 2 blocks per SM = 128 registers).
// The host picks smaller blocks for small problems and sizes shared memory by `tile`.
constexpr int kThreads = 256;
constexpr int kMinBlocks = 2;

// Sizes of one launch, derived on the host and passed by value (field order is the host's).
struct FusedDims {
  i64 n_groups;     // N * Lq * M: one lane group each
  i64 S;
  i64 Lq;
  double half_over_p;  // 0.5 / P: box offsets are in units of half the box size over P
  int M;
  int D;
  int L;
  int P;
  int row_bytes;    // M * D * sizeof(T): bytes between value rows of consecutive positions
  int log2_group;   // G = 1 << log2_group lanes per (n, q, m)
  int n_chunks;     // ceil(D / CPT)
  int chunk_iters;  // ceil(n_chunks / G), at least 1
  int tile;         // points per shared-memory tile, 1 <= tile; the host sizes shared memory by it
  int box;          // 1: reference boxes (R = 4), 0: reference points (R = 2)
  unsigned p_magic;  // floor(2^32 / P) + 1 (P > 1): l = i / P is __umulhi(i, p_magic) for i * P < 2^32
  int aggregate;     // backward: 1 to sum colliding grad_value adds within the warp before the atomic
};

// One point as every lane of the group needs it: attention * bilinear weight of each neighbour
// (0 outside the map) and the neighbour's position in S (clamped into the map).
template <typename A>
struct alignas(16) PointRec {
  A w[4];
  int row[4];
};

// What only the point's owner needs in the backward epilogue.
template <typename A>
struct alignas(16) OwnerRec {
  A a, lh, lw;
  int valid;  // bit k: neighbour k inside the map
};

// Bilinear geometry of one sampling point at pixel (h_im, w_im) of an H x W level starting at start.
template <typename A>
struct Geometry {
  A lh, lw;  // fractional distance below / right of the top-left neighbour
  unsigned valid;
  int row[4];  // (h0, w0), (h0, w0+1), (h0+1, w0), (h0+1, w0+1), clamped into the map
};

template <typename A>
__device__ __forceinline__ Geometry<A> geometry_of(A h_im, A w_im, int H, int W, int start) {
  // Outside (-1, H) x (-1, W) no neighbour is inside; NaN fails the test too and never reaches the
  // float -> int conversion.
  const bool inside = h_im > A(-1) && w_im > A(-1) && h_im < A(H) && w_im < A(W);
  const A hs = inside ? h_im : A(0), ws = inside ? w_im : A(0);
  const A hf = floor_acc(hs), wf = floor_acc(ws);
  const int h0 = static_cast<int>(hf), w0 = static_cast<int>(wf);
  Geometry<A> g;
  g.lh = hs - hf;
  g.lw = ws - wf;
  const bool top = inside && h0 >= 0, bottom = inside && h0 + 1 < H;
  const bool left = w0 >= 0, right = w0 + 1 < W;
  g.valid = unsigned(top && left) | unsigned(top && right) << 1 | unsigned(bottom && left) << 2 |
            unsigned(bottom && right) << 3;
  const int r0 = start + max(h0, 0) * W, r1 = start + min(h0 + 1, H - 1) * W;
  const int c0 = max(w0, 0), c1 = min(w0 + 1, W - 1);
  g.row[0] = r0 + c0;
  g.row[1] = r0 + c1;
  g.row[2] = r1 + c0;
  g.row[3] = r1 + c1;
  return g;
}

// The (n, q, m) of a group, head-major ((n, m, q), q fastest) so a block's groups are neighbouring
// queries of one head whose sampling windows overlap (L1 reuse).
struct QueryHead {
  i64 value_offset;  // elements to value[n, 0, m, 0]
  i64 nqm;           // flat (n, q, m)
  i64 nq;            // flat (n, q)
};

__device__ __forceinline__ QueryHead query_head_of(i64 group, const FusedDims& d) {
  const i64 nm = group / d.Lq;
  const i64 q = group - nm * d.Lq;
  const i64 n = nm / d.M;
  const i64 m = nm - n * d.M;
  QueryHead qh;
  qh.value_offset = (n * d.S * d.M + m) * d.D;
  qh.nq = n * d.Lq + q;
  qh.nqm = qh.nq * d.M + m;
  return qh;
}

// Lanes [first, first + G) of the calling warp.
__device__ __forceinline__ unsigned group_mask_of(int group_size) {
  return group_size == 32 ? 0xffffffffu : ((1u << group_size) - 1u) << ((threadIdx.x & 31u) & ~unsigned(group_size - 1));
}

template <typename A>
__device__ __forceinline__ A group_sum(A x, unsigned mask, int group_size) {
  for (int o = group_size >> 1; o > 0; o >>= 1) x += __shfl_xor_sync(mask, x, o);
  return x;
}

template <typename A>
__device__ __forceinline__ A group_max(A x, unsigned mask, int group_size) {
  for (int o = group_size >> 1; o > 0; o >>= 1) x = max_acc(x, __shfl_xor_sync(mask, x, o));
  return x;
}

// Copies (H, W, start) of every level to shared memory. Must run before any thread exits.
__device__ __forceinline__ void stage_levels(const i64* __restrict__ spatial_shapes,
                                             const i64* __restrict__ level_start_index, int L, int* s_levels) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    s_levels[3 * l] = static_cast<int>(spatial_shapes[2 * l]);
    s_levels[3 * l + 1] = static_cast<int>(spatial_shapes[2 * l + 1]);
    s_levels[3 * l + 2] = static_cast<int>(level_start_index[l]);
  }
  __syncthreads();
}

// Softmax statistics of one group's L*P logits: max and 1 / sum(exp(logit - max)).
template <typename A>
struct Softmax {
  A max, inv_sum;
  __device__ __forceinline__ A weight(A logit) const { return exp_acc(logit - max) * inv_sum; }
};

template <typename A>
__device__ __forceinline__ Softmax<A> softmax_of(const A* __restrict__ logits, int LP, int lane, int group_size,
                                                 unsigned mask) {
  A mx = neg_inf(A(0));
  for (int i = lane; i < LP; i += group_size) mx = max_acc(mx, __ldg(logits + i));
  mx = group_max(mx, mask, group_size);
  A sum = A(0);
  for (int i = lane; i < LP; i += group_size) sum += exp_acc(__ldg(logits + i) - mx);
  sum = group_sum(sum, mask, group_size);
  Softmax<A> s;
  s.max = mx;
  s.inv_sum = A(1) / sum;
  return s;
}

// Pixel coordinates of point i (= l*P + p) of the group, and d(pixel)/d(offset) per axis.
template <typename A>
struct Placed {
  A h_im, w_im;
  A dw_doff, dh_doff;
  int H, W, start;
};

template <typename A>
__device__ __forceinline__ Placed<A> place_point(int i, const A* __restrict__ ref_q, const A* __restrict__ off_g,
                                                 const int* s_levels, const FusedDims& d) {
  // i / P without a division (2^32 + 1 does not fit for P = 1).
  const int l = d.P == 1 ? i : static_cast<int>(__umulhi(static_cast<unsigned>(i), d.p_magic));
  Placed<A> pl;
  pl.H = s_levels[3 * l];
  pl.W = s_levels[3 * l + 1];
  pl.start = s_levels[3 * l + 2];
  const A ox = __ldg(off_g + 2 * i), oy = __ldg(off_g + 2 * i + 1);
  const A Wf = A(pl.W), Hf = A(pl.H);
  if (d.box) {
    const A* r = ref_q + 4 * l;
    const A sx = __ldg(r + 2) * A(d.half_over_p), sy = __ldg(r + 3) * A(d.half_over_p);
    pl.w_im = fma(ox, sx, __ldg(r)) * Wf - A(0.5);
    pl.h_im = fma(oy, sy, __ldg(r + 1)) * Hf - A(0.5);
    pl.dw_doff = sx * Wf;
    pl.dh_doff = sy * Hf;
  } else {
    const A* r = ref_q + 2 * l;
    pl.w_im = fma(__ldg(r), Wf, ox) - A(0.5);
    pl.h_im = fma(__ldg(r + 1), Hf, oy) - A(0.5);
    pl.dw_doff = A(1);
    pl.dh_doff = A(1);
  }
  return pl;
}

// Reads the CPT channels at p. kVec: one 16-byte load. Otherwise n (< CPT possible) scalar loads.

template <typename T, int CPT, bool kVec>
__device__ __forceinline__ void load_chunk(const T* p, int n, typename AccOf<T>::type (&dst)[CPT]) {
  if constexpr (kVec && sizeof(T) == 2 && !is_half<T>::value) {
    // bfloat16 is the top half of a float: one shift or one mask per channel, where the generic
    // conversion extracts each half-word first (two instructions per channel).
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      dst[2 * i] = __uint_as_float(words[i] << 16);
      dst[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  } else if constexpr (kVec) {
    alignas(16) T tmp[CPT];
    *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int i = 0; i < CPT; ++i) dst[i] = to_acc(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) dst[i] = i < n ? to_acc(__ldg(p + i)) : typename AccOf<T>::type(0);
  }
}

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

template <typename T>
__device__ __forceinline__ const T* row_ptr(const T* base, int row, int row_bytes) {
  // Rows are >= 0: an unsigned 32 x 32 -> 64-bit product is one IMAD.WIDE.U32 onto the 64-bit base
  // (a signed one costs a sign extension and a second multiply).
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(base) +
                                    static_cast<unsigned long long>(static_cast<unsigned>(row)) *
                                        static_cast<unsigned>(row_bytes));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ value, const i64* __restrict__ spatial_shapes,
                   const i64* __restrict__ level_start_index,
                   const typename AccOf<T>::type* __restrict__ reference_points,
                   const typename AccOf<T>::type* __restrict__ offsets,
                   const typename AccOf<T>::type* __restrict__ attention_logits, T* __restrict__ output,
                   const FusedDims d) {
  typedef typename AccOf<T>::type A;
  constexpr int CPT = 16 / sizeof(T);
  // Four points per iteration put 16 independent 16-byte loads in flight per lane; the scalar path
  // already issues CPT loads per neighbour and would only spill.
  constexpr int kPointUnroll = kVec ? 4 : 1;
  // Shared memory: 3 ints per level, then `tile` point records per group of the block.
  extern __shared__ uint4 smem_words[];  // uint4: 16-byte aligned
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_words);
  int* s_levels = reinterpret_cast<int*>(smem);
  stage_levels(spatial_shapes, level_start_index, d.L, s_levels);

  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 group = tid >> d.log2_group;
  if (group >= d.n_groups) return;  // whole groups leave: G divides the block size
  const int G = 1 << d.log2_group;
  const int lane = static_cast<int>(tid & (G - 1));
  const unsigned mask = group_mask_of(G);
  PointRec<A>* recs = reinterpret_cast<PointRec<A>*>(smem + ((3 * d.L * sizeof(int) + 15) & ~size_t(15))) +
                      (threadIdx.x >> d.log2_group) * d.tile;

  const QueryHead qh = query_head_of(group, d);
  const int LP = d.L * d.P;
  const A* logits_g = attention_logits + qh.nqm * LP;
  const A* off_g = offsets + qh.nqm * LP * 2;
  const A* ref_q = reference_points + qh.nq * d.L * (d.box ? 4 : 2);
  const Softmax<A> sm = softmax_of(logits_g, LP, lane, G, mask);

  for (int it = 0; it < d.chunk_iters; ++it) {
    const int c0 = (lane + it * G) * CPT;
    const int n_valid = max(0, min(CPT, d.D - c0));
    const T* v = value + qh.value_offset + c0;
    A acc[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[c] = A(0);

    for (int t0 = 0; t0 < LP; t0 += d.tile) {
      const int tn = min(d.tile, LP - t0);
      __syncwarp(mask);  // the previous tile's records are read by every lane
      for (int j = lane; j < tn; j += G) {
        const int i = t0 + j;
        const Placed<A> pl = place_point(i, ref_q, off_g, s_levels, d);
        const Geometry<A> g = geometry_of(pl.h_im, pl.w_im, pl.H, pl.W, pl.start);
        const A a = sm.weight(__ldg(logits_g + i));
        const A hh = A(1) - g.lh, hw = A(1) - g.lw;
        PointRec<A> r;
        r.w[0] = (g.valid & 1u) ? a * hh * hw : A(0);
        r.w[1] = (g.valid & 2u) ? a * hh * g.lw : A(0);
        r.w[2] = (g.valid & 4u) ? a * g.lh * hw : A(0);
        r.w[3] = (g.valid & 8u) ? a * g.lh * g.lw : A(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) r.row[k] = g.row[k];
        recs[j] = r;
      }
      __syncwarp(mask);
      if (n_valid > 0) {
#pragma unroll(kPointUnroll)
        for (int j = 0; j < tn; ++j) {
          const PointRec<A> r = recs[j];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            A s[CPT];
            load_chunk<T, CPT, kVec>(row_ptr(v, r.row[k], d.row_bytes), n_valid, s);
            // A neighbour outside the map reads a row clamped into it with weight 0: select rather than
            // multiply, since 0 * inf is NaN where the reference reads 0.
            const bool keep = r.w[k] != A(0);
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[c] = keep ? fma(r.w[k], s[c], acc[c]) : acc[c];
          }
        }
      }
    }
    if (n_valid > 0) store_chunk<T, CPT, kVec>(output + qh.nqm * d.D + c0, n_valid, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// p[i] += add[i] for the first n of CPT channels, atomically; 16-byte float atomics on sm_90+.
template <typename A, int CPT, bool kVec>
__device__ __forceinline__ void atomic_add_chunk(A* p, int n, const A (&add)[CPT]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // float4 atomicAdd: sm_90+, CUDA 12.4+
  constexpr bool kWide = kVec && sizeof(A) == 4 && CPT % 4 == 0;
#else
  constexpr bool kWide = false;
#endif
  if constexpr (kWide) {
#pragma unroll
    for (int i = 0; i < CPT; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(add[i], add[i + 1], add[i + 2], add[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      if (kVec || i < n) atomicAdd(p + i, add[i]);
    }
  }
}

// Adds w * g to grad_value at p for every lane with w != 0. Lanes of different groups in one warp
// that hit the same address (neighbouring queries sampling the same pixel) first sum their
// contributions by shuffles and only the lowest of them issues the atomic. `live`: the warp's
// lanes still running; all of them call this together.
template <typename A, int CPT, bool kVec>
__device__ __forceinline__ void add_to_grad_value(A* p, int n, A w, const A (&g)[CPT], int group_size,
                                                  unsigned live, bool aggregate) {
  const int lane_w = threadIdx.x & 31;
  const bool has = n > 0 && w != A(0);
  A add[CPT];
#pragma unroll
  for (int c = 0; c < CPT; ++c) add[c] = w * g[c];
  if (MSDA_FUSED_AGGREGATE && aggregate && group_size < 32) {
    // A key no pointer can equal for lanes with nothing to add.
    const unsigned long long key = has ? reinterpret_cast<unsigned long long>(p) : ~0ull - lane_w;
    const unsigned peers = __match_any_sync(live, key);
    if (__any_sync(live, __popc(peers) > 1)) {
      A sum[CPT];  // own contribution plus the peers' (add[] stays as the peers read it)
#pragma unroll
      for (int c = 0; c < CPT; ++c) sum[c] = add[c];
      for (int j = group_size; j < 32; j += group_size) {  // every other group's lane at this position
        // Read the lane j groups over, or this lane itself where that one has exited: reading a
        // lane outside the mask is undefined.
        const int src = (live >> (lane_w ^ j)) & 1u ? lane_w ^ j : lane_w;
        const bool same = src != lane_w && ((peers >> src) & 1u) != 0;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          const A other = __shfl_sync(live, add[c], src);
          if (same) sum[c] += other;
        }
      }
      if (has && lane_w == __ffs(peers) - 1) atomic_add_chunk<A, CPT, kVec>(p, n, sum);
      return;
    }
  }
  if (has) atomic_add_chunk<A, CPT, kVec>(p, n, add);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_kernel(
    const T* __restrict__ grad_output, const T* __restrict__ value, const i64* __restrict__ spatial_shapes,
    const i64* __restrict__ level_start_index, const typename AccOf<T>::type* __restrict__ reference_points,
    const typename AccOf<T>::type* __restrict__ offsets, const typename AccOf<T>::type* __restrict__ attention_logits,
    typename AccOf<T>::type* __restrict__ grad_value, typename AccOf<T>::type* __restrict__ grad_offsets,
    typename AccOf<T>::type* grad_logits, typename AccOf<T>::type* __restrict__ grad_locations, const FusedDims d) {
  typedef typename AccOf<T>::type A;
  constexpr int CPT = 16 / sizeof(T);
  constexpr int kPointUnroll = kVec ? 2 : 1;  // 8 loads in flight; the atomics need registers too
  // Shared memory: levels, then per group `tile` PointRec, `tile` OwnerRec and tile * G partial dots.
  extern __shared__ uint4 smem_words[];  // uint4: 16-byte aligned
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_words);
  int* s_levels = reinterpret_cast<int*>(smem);
  stage_levels(spatial_shapes, level_start_index, d.L, s_levels);

  const i64 tid = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 group = tid >> d.log2_group;
  // Before anyone leaves: which lanes of this warp keep running (atomics aggregate among them).
  const unsigned live = __ballot_sync(0xffffffffu, group < d.n_groups);
  if (group >= d.n_groups) return;
  const int G = 1 << d.log2_group;
  const int lane = static_cast<int>(tid & (G - 1));
  const unsigned mask = group_mask_of(G);
  const size_t per_group = d.tile * (sizeof(PointRec<A>) + sizeof(OwnerRec<A>) + G * 4 * sizeof(A));
  unsigned char* mine =
      smem + ((3 * d.L * sizeof(int) + 15) & ~size_t(15)) + (threadIdx.x >> d.log2_group) * per_group;
  PointRec<A>* recs = reinterpret_cast<PointRec<A>*>(mine);
  OwnerRec<A>* owners = reinterpret_cast<OwnerRec<A>*>(mine + d.tile * sizeof(PointRec<A>));
  A* dots = reinterpret_cast<A*>(mine + d.tile * (sizeof(PointRec<A>) + sizeof(OwnerRec<A>)));  // [tile][G][4]

  const QueryHead qh = query_head_of(group, d);
  const int LP = d.L * d.P;
  const A* logits_g = attention_logits + qh.nqm * LP;
  const A* off_g = offsets + qh.nqm * LP * 2;
  const A* ref_q = reference_points + qh.nq * d.L * (d.box ? 4 : 2);
  A* grad_off_g = grad_offsets + qh.nqm * LP * 2;
  A* grad_logit_g = grad_logits + qh.nqm * LP;
  A* grad_loc_g = grad_locations == nullptr ? nullptr : grad_locations + qh.nqm * LP * 2;
  const Softmax<A> sm = softmax_of(logits_g, LP, lane, G, mask);

  for (int it = 0; it < d.chunk_iters; ++it) {
    const int c0 = (lane + it * G) * CPT;
    // A lane past the last chunk still computes records and writes zero partial dots.
    const int n_valid = max(0, min(CPT, d.D - c0));
    const T* v = value + qh.value_offset + c0;
    A* gv = grad_value == nullptr ? nullptr : grad_value + qh.value_offset + c0;
    const int grad_row_bytes = d.row_bytes / static_cast<int>(sizeof(T)) * static_cast<int>(sizeof(A));
    A g[CPT];
    if (n_valid > 0) {
      load_chunk<T, CPT, kVec>(grad_output + qh.nqm * d.D + c0, n_valid, g);
    } else {
#pragma unroll
      for (int c = 0; c < CPT; ++c) g[c] = A(0);
    }

    for (int t0 = 0; t0 < LP; t0 += d.tile) {
      const int tn = min(d.tile, LP - t0);
      // No barrier here: the previous tile's records were last read before its third barrier, and a
      // lane writes the same owners[j] it read (j = lane mod G) and its dots only after the next one.
      for (int j = lane; j < tn; j += G) {
        const Placed<A> pl = place_point(t0 + j, ref_q, off_g, s_levels, d);
        const Geometry<A> geo = geometry_of(pl.h_im, pl.w_im, pl.H, pl.W, pl.start);
        const A a = sm.weight(__ldg(logits_g + t0 + j));
        const A hh = A(1) - geo.lh, hw = A(1) - geo.lw;
        PointRec<A> r;
        r.w[0] = (geo.valid & 1u) ? a * hh * hw : A(0);
        r.w[1] = (geo.valid & 2u) ? a * hh * geo.lw : A(0);
        r.w[2] = (geo.valid & 4u) ? a * geo.lh * hw : A(0);
        r.w[3] = (geo.valid & 8u) ? a * geo.lh * geo.lw : A(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) r.row[k] = geo.row[k];
        recs[j] = r;
        OwnerRec<A> o;
        o.a = a;
        o.lh = geo.lh;
        o.lw = geo.lw;
        o.valid = static_cast<int>(geo.valid);
        owners[j] = o;
      }
      __syncwarp(mask);
#pragma unroll(kPointUnroll)
      for (int j = 0; j < tn; ++j) {
        const PointRec<A> r = recs[j];
        A dot[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dot[k] = A(0);
          if (n_valid > 0) {
            A s[CPT];
            load_chunk<T, CPT, kVec>(row_ptr(v, r.row[k], d.row_bytes), n_valid, s);
#pragma unroll
            for (int c = 0; c < CPT; ++c) dot[k] = fma(g[c], s[c], dot[k]);
          }
        }
        A* slot = dots + (j * G + lane) * 4;
#pragma unroll
        for (int k = 0; k < 4; ++k) slot[k] = dot[k];
        if (gv != nullptr) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            A* p = const_cast<A*>(row_ptr<A>(gv, r.row[k], grad_row_bytes));
            add_to_grad_value<A, CPT, kVec>(p, n_valid, r.w[k], g, G, live, d.aggregate != 0);
          }
        }
      }
      __syncwarp(mask);
      // Owners: sum the G partial dots of each point, then the point's gradients.
      for (int j = lane; j < tn; j += G) {
        A s[4] = {A(0), A(0), A(0), A(0)};
        for (int src = 0; src < G; ++src) {
#pragma unroll
          for (int k = 0; k < 4; ++k) s[k] += dots[(j * G + src) * 4 + k];
        }
        const OwnerRec<A> o = owners[j];
#pragma unroll
        for (int k = 0; k < 4; ++k) s[k] = (o.valid >> k) & 1 ? s[k] : A(0);
        const A hh = A(1) - o.lh, hw = A(1) - o.lw;
        const A grad_weight = hh * hw * s[0] + hh * o.lw * s[1] + o.lh * hw * s[2] + o.lh * o.lw * s[3];
        const A grad_w_im = o.a * (hh * (s[1] - s[0]) + o.lh * (s[3] - s[2]));  // d loss / d (x*W - 0.5)
        const A grad_h_im = o.a * (hw * (s[2] - s[0]) + o.lw * (s[3] - s[1]));
        const int i = t0 + j;
        const Placed<A> pl = place_point(i, ref_q, off_g, s_levels, d);
        A go_x = grad_w_im * pl.dw_doff, go_y = grad_h_im * pl.dh_doff, gl = grad_weight;
        A gloc_x = grad_w_im * A(pl.W), gloc_y = grad_h_im * A(pl.H);
        if (it > 0) {  // heads wider than G chunks: this lane stored the earlier channels' part
          go_x += grad_off_g[2 * i];
          go_y += grad_off_g[2 * i + 1];
          gl += grad_logit_g[i];
          if (grad_loc_g != nullptr) {
            gloc_x += grad_loc_g[2 * i];
            gloc_y += grad_loc_g[2 * i + 1];
          }
        }
        grad_off_g[2 * i] = go_x;
        grad_off_g[2 * i + 1] = go_y;
        grad_logit_g[i] = gl;
        if (grad_loc_g != nullptr) {
          grad_loc_g[2 * i] = gloc_x;
          grad_loc_g[2 * i + 1] = gloc_y;
        }
      }
    }
  }

  // Softmax backward: d logit_i = a_i * (d a_i - sum_j a_j d a_j). The d a_i were written by their
  // tile owners; __syncwarp orders those writes before the reads of other lanes.
  __syncwarp(mask);
  A dot = A(0);
  for (int i = lane; i < LP; i += G) dot += sm.weight(__ldg(logits_g + i)) * grad_logit_g[i];
  dot = group_sum(dot, mask, G);
  for (int i = lane; i < LP; i += G) {
    const A a = sm.weight(__ldg(logits_g + i));
    grad_logit_g[i] = a * (grad_logit_g[i] - dot);
  }
}

}  // namespace msda_fused
