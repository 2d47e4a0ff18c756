/* Multi-scale deformable attention kernels: what ops/cuda/unfused.py must know to launch them.
 *
 * Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
 * L levels, P sampling points per (head, level).
 *
 * The kernels are compiled at first use by NVRTC (ops/cuda/build.py) for the GPU's architecture, or by
 * g++ against csrc/emu/cuda_emu.h for the CPU emulation (ops/cuda/emulation.py); ops/cuda/unfused.py computes
 * the grid, fills Dims and picks the instantiation. There is no host code in the .cu.
 *
 * Kernels (name expressions, T in float, __half, __nv_bfloat16, double; kVec in true, false):
 *   msda::forward_kernel<T, kVec>(value, spatial_shapes, level_start_index, sampling_locations,
 *                                 attention_weights, output, Dims)
 *   msda::backward_kernel<T, kVec>(grad_output, value, spatial_shapes, level_start_index,
 *                                  sampling_locations, attention_weights, grad_value,
 *                                  grad_sampling_locations, grad_attention_weights, Dims)
 * launched with MSDA_THREADS threads per block, ceil((n_groups << log2_group) / MSDA_THREADS)
 * blocks and 3 * L * sizeof(int) bytes of dynamic shared memory (L <= MSDA_MAX_LEVELS).
 *
 * Layouts (all contiguous, all pointers on the device the kernel runs on):
 *   value                    (N, S, M, D)          dtype T
 *   spatial_shapes           (L, 2) int64 (H, W)
 *   level_start_index        (L,)   int64
 *   sampling_locations       (N, Lq, M, L, P, 2)   normalized (x, y), coord type C
 *   attention_weights        (N, Lq, M, L, P)      coord type C
 *   output / grad_output     (N, Lq, M, D)         dtype T
 *   grad_value               (N, S, M, D)          accumulation type A, zero-filled by the caller;
 *                                                  NULL when value needs no gradient (then skipped)
 *   grad_sampling_locations  (N, Lq, M, L, P, 2)   coord type C; stored by lane 0 of each group,
 *   grad_attention_weights   (N, Lq, M, L, P)      coord type C  once per chunk iteration (heads wider
 *                                                  than 32 chunks add to their own earlier store), so
 *                                                  neither needs a zero fill
 *
 *   T                C = A
 *   float            float
 *   __half           float
 *   __nv_bfloat16    float
 *   double           double
 *
 * kVec = true needs D % (16 / sizeof(T)) == 0 and 16-byte aligned value, output, grad_output and
 * grad_value: every neighbour is then one 16-byte load. kVec = false is correct for any D and any
 * element alignment.
 *
 * Sampling is the paper's (= grid_sample with align_corners=False, zero padding): location (x, y)
 * on level l reads pixel (y*H_l - 0.5, x*W_l - 0.5) bilinearly; neighbours outside the map read 0.
 * The kernels trust the level table: spatial_shapes and level_start_index must describe S (sum of
 * H*W, starts the running sums), or reads go out of bounds.
 */
#ifndef MSDA_MS_DEFORM_ATTN_H_
#define MSDA_MS_DEFORM_ATTN_H_

#define MSDA_THREADS 256
/* Level shapes and starts are staged in shared memory as 3 ints per level: 4096 levels fill the
 * 48 KiB of dynamic shared memory a launch gets without opting in to more. */
#define MSDA_MAX_LEVELS 4096

namespace msda {

/* Sizes shared by both kernels, passed by value; ops/cuda/unfused.py mirrors it as a ctypes.Structure. */
struct Dims {
  long long n_groups;  // N * Lq * M: one thread group each
  long long S;
  long long Lq;
  int M;
  int D;
  int L;
  int P;
  int row_stride;   // M * D: elements between value rows of consecutive positions
  int log2_group;   // G = 1 << log2_group threads per (n, q, m)
  int n_chunks;     // ceil(D / CPT), CPT = 16 / sizeof(T) channels per thread and chunk
  int chunk_iters;  // ceil(n_chunks / G), at least 1 so backward writes its outputs even if D == 0
};

}  // namespace msda

#endif /* MSDA_MS_DEFORM_ATTN_H_ */
