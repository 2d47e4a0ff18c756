"""``python -m ops build ARCH ...`` compiles the kernels into the cache ahead of time (e.g. in an image
build, for sm_80 and sm_90; no GPU needed); ``python -m ops info`` says which path the op takes here
(exit status 1 where MSDA_BACKEND=cuda or cpu asks for kernels it cannot have)."""

import sys
import time


def main(argv: list[str]) -> int:
    try:
        return _run(argv)
    except ValueError as e:  # a bad MSDA_BACKEND, an arch that is none
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    from ops import _cache, cpu_kernel_available, cuda_kernel_available, get_backend
    from ops.cpu import build as cpu_build
    from ops.cuda import fused as cuda_fused
    from ops.cuda import unfused as cuda_unfused

    command, args = (argv[0], argv[1:]) if argv else ("info", [])
    if command == "build":
        if not args:
            import torch

            if not torch.cuda.is_available():
                print(
                    "usage: python -m ops build ARCH [ARCH ...] (e.g. sm_80 sm_90); no GPU here to default to",
                    file=sys.stderr,
                )
                return 2
            args = [cuda_unfused.arch_for_capability(torch.cuda.get_device_capability())]
        for arch in args:
            start = time.perf_counter()
            paths = [cuda_unfused.build(arch), cuda_fused.build(arch)]
            print(
                f"{cuda_unfused.normalize_arch(arch)}: {', '.join(map(str, paths))} ({time.perf_counter() - start:.1f} s)"
            )
        return 0
    if command == "info":
        try:
            from ops.cuda import build as nvrtc

            driver = nvrtc.driver_status()[1]
            nvrtc = "NVRTC {}.{}, headers in {}".format(*nvrtc.version(), nvrtc.include_dirs()[0])
        except Exception as exc:  # not installed, or no headers: say so and carry on
            nvrtc = f"unavailable ({exc}); pip install 'msda-ops[cuda]'"
            driver = "unknown (no NVRTC)"
        ok, reason = cuda_kernel_available()
        backend = get_backend()
        print(f"backend setting: {backend}")
        print(f"compiler: {nvrtc}")
        print(f"driver: {driver}")
        print(f"cache: {_cache.cache_root()}")
        print(
            "CUDA kernel: available" if ok else f"CUDA kernel: unavailable ({reason}); CUDA tensors run the reference"
        )
        fused_ok, reason = cuda_fused.is_available()
        print(
            "fused kernel: available"
            if fused_ok
            else f"fused kernel: unavailable ({reason}); softmax and locations run in PyTorch"
        )
        cpu_ok, cpu_reason = cpu_kernel_available()
        print(
            f"CPU kernel: available ({cpu_build.find_compiler()[0]})"
            if cpu_ok
            else f"CPU kernel: unavailable ({cpu_reason}); CPU tensors run the PyTorch reference"
        )
        if backend == "cuda" and not (ok and fused_ok):  # what the op would refuse at its first call
            print("MSDA_BACKEND=cuda asks for the CUDA kernels and they are unavailable here", file=sys.stderr)
            return 1
        if backend == "cpu" and not cpu_ok:
            print(
                f"MSDA_BACKEND=cpu asks for the CPU kernel and it is unavailable here ({cpu_reason})", file=sys.stderr
            )
            return 1
        return 0
    print("usage: python -m ops {info|build [ARCH ...]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
