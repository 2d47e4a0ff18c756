/* A sampling point's bilinear neighbours and weights, shared by the CPU and the CUDA kernels.
 *
 * Both kernels include this header, so the sampling convention cannot drift apart between them:
 * location (x, y) in [0, 1] on an H x W level reads pixel (y*H - 0.5, x*W - 0.5) bilinearly
 * (grid_sample with align_corners=False), and a neighbour outside the map reads 0. NaN and infinite
 * locations have no neighbour inside, so such a point contributes nothing (and gets zero gradients).
 *
 * Compiled by nvcc, the functions are __host__ __device__; by a plain C++ compiler, ordinary inline
 * functions. A is the accumulation type: float or double.
 */
#ifndef MSDA_BILINEAR_H_
#define MSDA_BILINEAR_H_

#if !defined(__CUDACC_RTC__)  // NVRTC has floorf and floor built in, and no host headers
#include <math.h>
#endif

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace msda {

MSDA_HOST_DEVICE float floor_of(float x) { return floorf(x); }
MSDA_HOST_DEVICE double floor_of(double x) { return floor(x); }

// The four neighbours of one sampling point: k = 0 (h0, w0), 1 (h0, w0+1), 2 (h0+1, w0),
// 3 (h0+1, w0+1), with h0 = floor(y*H - 0.5), w0 = floor(x*W - 0.5).
template <typename A>
struct Neighbours {
  A lh, lw;        // distance of the point below / right of (h0, w0), in [0, 1)
  int row[4];      // position of each neighbour in S; meaningful only where valid
  unsigned valid;  // bit k: neighbour k lies inside the H x W map (else it reads 0)
};

// Neighbours of location (x, y) on the level of shape H x W that starts at position `start` of S.
template <typename A>
MSDA_HOST_DEVICE Neighbours<A> neighbours_of(A x, A y, int H, int W, int start) {
  Neighbours<A> nb;
  nb.lh = A(0);
  nb.lw = A(0);
  nb.valid = 0u;
  const A h_im = y * A(H) - A(0.5);
  const A w_im = x * A(W) - A(0.5);
  // Outside (-1, H) x (-1, W) no neighbour is inside; the comparisons are false for NaN, which
  // also keeps NaN and huge locations away from the float -> int conversion below.
  if (h_im > A(-1) && w_im > A(-1) && h_im < A(H) && w_im < A(W)) {
    const A hf = floor_of(h_im);
    const A wf = floor_of(w_im);
    const int h0 = static_cast<int>(hf);
    const int w0 = static_cast<int>(wf);
    nb.lh = h_im - hf;
    nb.lw = w_im - wf;
    const int base = start + h0 * W + w0;
    nb.row[0] = base;
    nb.row[1] = base + 1;
    nb.row[2] = base + W;
    nb.row[3] = base + W + 1;
    const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
    nb.valid = unsigned(top && left) | unsigned(top && right) << 1 | unsigned(bottom && left) << 2 |
               unsigned(bottom && right) << 3;
  }
  return nb;
}

// Bilinear weight of each neighbour, in the order of Neighbours::row.
template <typename A>
MSDA_HOST_DEVICE void bilinear_weights(const Neighbours<A>& nb, A (&bw)[4]) {
  const A hh = A(1) - nb.lh, hw = A(1) - nb.lw;
  bw[0] = hh * hw;
  bw[1] = hh * nb.lw;
  bw[2] = nb.lh * hw;
  bw[3] = nb.lh * nb.lw;
}

// Derivatives of each bilinear weight with respect to the pixel coordinates w_im = x*W - 0.5
// (dx) and h_im = y*H - 0.5 (dy); multiply by W and H for the derivatives in x and y.
template <typename A>
MSDA_HOST_DEVICE void bilinear_weight_grads(const Neighbours<A>& nb, A (&dx)[4], A (&dy)[4]) {
  const A hh = A(1) - nb.lh, hw = A(1) - nb.lw;
  dx[0] = -hh;
  dx[1] = hh;
  dx[2] = -nb.lh;
  dx[3] = nb.lh;
  dy[0] = -hw;
  dy[1] = -nb.lw;
  dy[2] = hw;
  dy[3] = nb.lw;
}

}  // namespace msda

#endif /* MSDA_BILINEAR_H_ */
