"""``python -m ops build [ARCH ...]`` compiles the kernel into the cache ahead of time (e.g. in an image
build, for sm_80 and sm_90); ``python -m ops info`` says which path the op will take here."""

import sys


def main(argv: list[str]) -> int:
    from ops import _cuda, cuda_kernel_available, get_backend

    command, args = (argv[0], argv[1:]) if argv else ("info", [])
    if command == "build":
        archs = args or [None]  # None: the current device's architecture
        for arch in archs:
            print(f"built {_cuda.build(arch)}")
        return 0
    if command == "info":
        ok, reason = cuda_kernel_available()
        print(f"backend setting: {get_backend()}")
        print(f"nvcc: {_cuda.find_nvcc() or 'not found'}")
        print(f"cache: {_cuda.cache_root()}")
        print("CUDA kernel: available" if ok else f"CUDA kernel: unavailable ({reason}); the PyTorch reference runs")
        return 0
    print("usage: python -m ops {info|build [ARCH ...]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
