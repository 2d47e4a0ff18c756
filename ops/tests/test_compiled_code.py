"""What a GPU would run, inspected without one (NVRTC): for every instantiation of both kernels on sm_80
and sm_90, the PTX holds one barrier per barrier call site of the source (a barrier the compiler
deleted, as it deleted the fused kernel's self-recursive __syncwarp wrapper, shows here), nothing
spills to local memory, and the registers fit the kernel's launch bounds."""

import pytest

from ops.bench import sass

pytest.importorskip("ops.cuda.build", reason="the cuda extra is not installed: pip install 'msda-ops[cuda]'")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_instantiation_keeps_its_barriers_and_fits(arch):
    rows = sass.compiled_kernels(arch)
    assert len(rows) == 32, [r.name for r in rows]
    assert all(r.source_barriers > 0 and r.registers > 0 for r in rows), rows
    problems = [p for r in rows for p in r.problems()]
    assert not problems, "\n".join(problems)


def test_barrier_sites_are_counted_through_the_functions_a_kernel_calls():
    assert sass.barrier_sites(sass.SOURCES["unfused"]) == {"forward": 1, "backward": 1}  # stage_levels
    assert sass.barrier_sites(sass.SOURCES["fused"]) == {"forward": 3, "backward": 4}
    assert sass.register_budget(sass.SOURCES["unfused"]) == {"forward": 80, "backward": 128}
