"""python -m ops.bench.sass reads the machine code right: every instantiation compiles, no kernel
spills, and the fused forward spends well under half the unfused one's instructions per sampled point."""

import pytest

from ops.bench import sass

pytestmark = pytest.mark.skipif(
    sass.find_tool("nvdisasm") is None, reason="nvdisasm not installed (pip install nvidia-cuda-nvdisasm)"
)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sass")
    found = {}
    for label in ("unfused", "fused"):
        cubin = tmp / f"{label}.cubin"
        sass.compile_cubin(sass.SOURCES[label], sass.kernel_names(label), "sm_90", cubin)
        registers = sass.registers_of(cubin)
        for function, stream in sass.disassemble(cubin).items():
            m = sass._MANGLED.search(function)
            kernel = sass.Kernel(label, m.group(1), sass._MANGLED_DTYPES[m.group(2)], m.group(3) == "1")
            kernel.registers = registers[function]
            sass.analyse(kernel, stream)
            found[kernel.name] = kernel
    return found


@pytest.mark.slow
def test_report_reads_every_kernel(kernels):
    assert len(kernels) == 32, sorted(kernels)
    for k in kernels.values():
        assert 0 < k.registers <= 255 and k.local_memory == 0, (k.name, k.registers, k.local_memory)
    for source in ("unfused", "fused"):
        for dtype in ("f32", "bf16", "f16", "f64"):
            forward = kernels[f"{source} forward {dtype} vec"]
            assert forward.point_loop is not None and forward.ldg128 >= 4, forward
    for dtype in ("f32", "bf16"):
        unfused = sass.per_point_per_lane(kernels[f"unfused forward {dtype} vec"])
        fused = sass.per_point_per_lane(kernels[f"fused forward {dtype} vec"])
        assert fused < 0.6 * unfused, (dtype, fused, unfused)
