"""The CUDA backend: NVRTC build and cache, kernel launches, the host side of the unfused and fused kernels,
and the g++ emulation that runs the same sources on the CPU for tests."""
