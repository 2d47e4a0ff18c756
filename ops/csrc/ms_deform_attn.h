/* Multi-scale deformable attention in plain CUDA: the C interface loaded by ops/_cuda.py with ctypes.
 *
 * Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
 * L levels, P sampling points per (head, level).
 *
 * Layouts (all contiguous, all pointers on the current CUDA device):
 *   value                    (N, S, M, D)          dtype T
 *   spatial_shapes           (L, 2) int64 (H, W)
 *   level_start_index        (L,)   int64
 *   sampling_locations       (N, Lq, M, L, P, 2)   normalized (x, y), coord type C
 *   attention_weights        (N, Lq, M, L, P)      coord type C
 *   output / grad_output     (N, Lq, M, D)         dtype T
 *   grad_value               (N, S, M, D)          accumulation type A, zero-filled by the caller
 *   grad_sampling_locations  (N, Lq, M, L, P, 2)   coord type C, written once per element
 *   grad_attention_weights   (N, Lq, M, L, P)      coord type C, written once per element
 *
 *   dtype            T               C = A
 *   MSDA_FLOAT32     float           float
 *   MSDA_FLOAT16     __half          float
 *   MSDA_BFLOAT16    __nv_bfloat16   float
 *   MSDA_FLOAT64     double          double
 *
 * Sampling is the paper's (= grid_sample with align_corners=False, zero padding): location (x, y)
 * on level l reads pixel (y*H_l - 0.5, x*W_l - 0.5) bilinearly; neighbours outside the map read 0.
 *
 * msda_forward, msda_backward and msda_check_device return a cudaError_t as int: 0 on success,
 * cudaErrorInvalidValue (1) for bad arguments, else the launch error. Kernels are queued on `stream`
 * (a cudaStream_t; NULL is the legacy default stream) on the device current for the calling
 * thread. Nothing synchronizes. The kernels trust the level table: spatial_shapes and
 * level_start_index must describe S (sum of H*W, starts the running sums), or reads go out of bounds.
 */
#ifndef MSDA_MS_DEFORM_ATTN_H_
#define MSDA_MS_DEFORM_ATTN_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum MsdaDtype {
  MSDA_FLOAT32 = 0,
  MSDA_FLOAT16 = 1,
  MSDA_BFLOAT16 = 2,
  MSDA_FLOAT64 = 3,
};

/* output = sum over (l, p) of attention_weights * bilinear(value, sampling_locations). */
int msda_forward(int dtype, const void* value, const int64_t* spatial_shapes,
                 const int64_t* level_start_index, const void* sampling_locations,
                 const void* attention_weights, void* output, int64_t N, int64_t S, int64_t M,
                 int64_t D, int64_t Lq, int64_t L, int64_t P, void* stream);

/* Gradients of msda_forward; grad_value is accumulated with atomics into a zeroed workspace. */
int msda_backward(int dtype, const void* grad_output, const void* value,
                  const int64_t* spatial_shapes, const int64_t* level_start_index,
                  const void* sampling_locations, const void* attention_weights, void* grad_value,
                  void* grad_sampling_locations, void* grad_attention_weights, int64_t N,
                  int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P, void* stream);

/* 0 when the kernels can run on the current device, else why not (e.g. no kernel image for this
 * architecture, a driver older than the toolkit the library was built with). */
int msda_check_device(void);

/* cudaGetErrorString for a code returned above. */
const char* msda_error_string(int code);

/* MSDA_ABI_VERSION, bumped whenever a signature above changes; _cuda.py checks it on load. */
int msda_abi_version(void);

#ifdef __cplusplus
}
#endif

#define MSDA_ABI_VERSION 1

#endif /* MSDA_MS_DEFORM_ATTN_H_ */
