"""Static report on the kernels' machine code, no GPU needed: ``python -m ops.bench.sass [ARCH ...]``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level), G lanes per (n, q, m).

Compiles every instantiation of the unfused (``csrc/ms_deform_attn.cu``) and the fused
(``csrc/ms_deform_attn_fused.cu``) kernels to cubins (default sm_90) with NVRTC when ``ops.cuda.build``
imports (the ``ops[cuda]`` wheels), else with ``nvcc -cubin``; disassembles them with ``nvdisasm``
(the ``nvidia-cuda-nvdisasm`` wheel, or the CUDA toolkit's) and prints per kernel: registers (from
the cubin), local-memory (spill) instructions, 128-bit global loads, atomics, and the instructions
per sampled point per lane read off the loops of the SASS (static counts: every instruction of a
loop body, both sides of its branches). The fused backward is also compiled without warp-aggregated
atomics (``MSDA_FUSED_AGGREGATE=0``): its point loop is close to the path taken when no two groups
of a warp add to the same address. Then the bytes one encoder layer moves at COCO size, analytically
from the shapes: unfused, fused, and the floor.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = {"unfused": CSRC / "ms_deform_attn.cu", "fused": CSRC / "ms_deform_attn_fused.cu"}
# Lanes per (n, q, m) at D = 32: G = ceil(D / CPT) with CPT = 16 / sizeof(dtype).
GROUP_AT_D32 = {"f32": 8, "f16": 4, "bf16": 4, "f64": 16}
# (label, source, extra defines): the define changes only the fused backward.
VARIANTS = (
    ("unfused", "unfused", ()),
    ("fused", "fused", ()),
    ("fused, no aggregation", "fused", ("MSDA_FUSED_AGGREGATE=0",)),
)

# Encoder layer of Deformable DETR at 800x1200 (strides 8..64).
ENCODER = dict(N=2, shapes=((100, 150), (50, 75), (25, 38), (13, 19)), M=8, D=32, P=4)

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_SECTION = re.compile(r"^\.text\.(\S+):")
_BRANCH_TARGET = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")
# Kernels are C++ templates: msda::forward_kernel<float, true>, msda_fused::backward_kernel<__half, false>...
_MANGLED = re.compile(r"(forward|backward)_kernelI(f|d|6__half|13__nv_bfloat16)Lb([01])E")
_MANGLED_DTYPES = {"f": "f32", "d": "f64", "6__half": "f16", "13__nv_bfloat16": "bf16"}


def find_tool(name: str) -> str | None:
    """``name`` from the nvidia-cuda-* wheels of this environment, else from PATH / the CUDA toolkit."""
    for base in sys.path:
        candidate = Path(base) / "nvidia" / "cu13" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: also look beside the real toolkit
        for root in sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True):
            if (root / name).is_file():
                return str(root / name)
    return None


@dataclass
class Kernel:
    """One compiled entry point and what the report reads off it."""

    source: str  # a VARIANTS label
    direction: str  # "forward" or "backward"
    dtype: str  # "f32", "f16", "bf16", "f64"
    vec: bool
    registers: int = 0
    local_memory: int = 0  # LDL/STL instructions: spills
    instructions: int = 0
    ldg128: int = 0
    atomics: int = 0
    point_loop: float | None = None  # instructions per point per lane in the steady-state point loop
    per_point_shared: float | None = None  # per-point work done once per group and split over its lanes

    @property
    def name(self) -> str:
        return f"{self.source} {self.direction} {self.dtype} {'vec' if self.vec else 'scalar'}"


def kernel_names(source_name: str) -> tuple[str, ...]:
    """The name expressions of every instantiation of a source."""
    namespace = "msda_fused" if source_name == "fused" else "msda"
    return tuple(
        f"{namespace}::{direction}_kernel<{t}, {vec}>"
        for direction in ("forward", "backward")
        for t in ("float", "__half", "__nv_bfloat16", "double")
        for vec in ("true", "false")
    )


def compile_cubin(source: Path, names: tuple[str, ...], arch: str, out: Path, defines: tuple[str, ...] = ()) -> str:
    """A cubin of ``names`` from ``source`` at ``out``; returns the compiler used. NVRTC when ops.cuda.build
    imports, else nvcc, for which a wrapper file takes every kernel's address (instantiating the templates)."""
    try:
        from ops.cuda import build as nvrtc
    except ImportError:
        nvrtc = None
    if nvrtc is not None and not defines:
        kind, code, _, _ = nvrtc.compile_source(source, names, arch)
        if kind == "cubin":
            out.write_bytes(code)
            return "NVRTC"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("neither NVRTC (pip install 'msda-ops[cuda]') nor nvcc found: nothing compiles the kernels")
    wrapper = out.with_suffix(".cu")
    keep = ", ".join(f"(void*)&{name}" for name in names)
    wrapper.write_text(f'#include "{source}"\nvoid* msda_report_keep[] = {{{keep}}};\n')
    defs = [f"-D{d}" for d in defines]
    cmd = [nvcc, "-cubin", "-O3", "-std=c++17", f"-arch={arch}", *defs, "-o", str(out), str(wrapper)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for {arch}:\n{proc.stderr.strip()}")
    return "nvcc"


def registers_of(cubin: Path) -> dict[str, int]:
    """{function: registers per thread}, read from the cubin (an ELF file): the .nv.info section holds
    an EIATTR_REGCOUNT record (symbol index, registers) per kernel, and a kernel's .text section
    names its symbol in the low 24 bits of sh_info (sm_80 cubins keep the count in the top 8 too)."""
    data = cubin.read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]

    def name_of(header) -> str:
        start = strtab + header[0]
        return data[start : data.index(b"\0", start)].decode()

    regcount: dict[int, int] = {}
    for header in headers:
        if name_of(header) != ".nv.info":
            continue
        i, end = header[4], header[4] + header[5]
        while i < end:  # records: format byte, attribute byte, value by format
            fmt, attr = data[i], data[i + 1]
            i += 2
            if fmt == 0x04:  # EIFMT_SVAL: u16 size, then the value
                size = struct.unpack_from("<H", data, i)[0]
                if attr == 0x2F and size == 8:  # EIATTR_REGCOUNT
                    symbol, registers = struct.unpack_from("<II", data, i + 2)
                    regcount[symbol] = registers
                i += 2 + size
            elif fmt == 0x03:  # EIFMT_HVAL
                i += 2
            elif fmt == 0x02:  # EIFMT_BVAL
                i += 1
    return {
        name_of(h)[len(".text.") :]: regcount.get(h[7] & 0xFFFFFF, 0)
        for h in headers
        if name_of(h).startswith(".text.")
    }


def disassemble(cubin: Path) -> dict[str, list[tuple[int, str, str | None]]]:
    """{function: [(address, instruction, label defined just before or None)]} from nvdisasm."""
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put the CUDA toolkit's on PATH)")
    text = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[tuple[int, str, str | None]]] = {}
    current: list | None = None
    pending: str | None = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            pending = None
            continue
        m = _LABEL.match(line)
        if m:
            pending = m.group(1)
            if current is not None:
                current.append((-1, "", pending))  # labels keep their place in the stream
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2), None))
    return functions


def loops_of(stream: list[tuple[int, str, str | None]]) -> list[tuple[int, int]]:
    """(first index, last index) into the instruction list of every backward branch's loop."""
    instructions = [(addr, ins) for addr, ins, _ in stream if addr >= 0]
    label_addr: dict[str, int] = {}
    next_real = None
    for addr, _, label in reversed(stream):
        if addr >= 0:
            next_real = addr
        elif label is not None and next_real is not None:
            label_addr[label] = next_real
    index_of = {addr: i for i, (addr, _) in enumerate(instructions)}
    # Code after the last EXIT was moved out of line (the divergent path of a shuffle, slow paths of
    # division); its branches back into the kernel close no loop.
    last_exit = max((addr for addr, ins in instructions if re.search(r"\bEXIT\b", ins)), default=None)
    loops = []
    for i, (addr, ins) in enumerate(instructions):
        m = _BRANCH_TARGET.search(ins)
        if m is None or ".DIV" in ins or m.group(1) not in label_addr or label_addr[m.group(1)] > addr:
            continue
        if last_exit is not None and addr > last_exit:
            continue
        loops.append((index_of[label_addr[m.group(1)]], i))
    return loops


def _innermost(loops: list[tuple[int, int]], keep) -> list[tuple[int, int]]:
    chosen = [lp for lp in loops if keep(lp)]
    return [a for a in chosen if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in chosen)]


def analyse(kernel: Kernel, stream: list[tuple[int, str, str | None]]) -> None:
    instructions = [ins for addr, ins, _ in stream if addr >= 0 and not ins.startswith("NOP")]
    all_ins = [ins for addr, ins, _ in stream if addr >= 0]
    kernel.instructions = len(instructions)
    kernel.ldg128 = sum("LDG.E.128" in ins for ins in instructions)
    kernel.atomics = sum(bool(re.search(r"\b(RED|REDG|ATOM|ATOMG)\b", ins)) for ins in instructions)
    kernel.local_memory = sum(bool(re.search(r"\b(LDL|STL)\b", ins)) for ins in instructions)
    loops = loops_of(stream)

    def count(lp, pattern):
        return sum(bool(re.search(pattern, ins)) for ins in all_ins[lp[0] : lp[1] + 1])

    if kernel.vec:
        # The point loop: the innermost loops holding the value loads; the unrolled one is the steady state.
        value_loops = _innermost(loops, lambda lp: count(lp, r"LDG\.E\.128") >= 4)
        if value_loops:
            best = max(value_loops, key=lambda lp: count(lp, r"LDG\.E\.128"))
            points = count(best, r"LDG\.E\.128") // 4  # one 16-byte load per neighbour and lane
            body = best[1] - best[0] + 1
            kernel.point_loop = body / max(points, 1)
    if kernel.source.startswith("fused"):
        # Per-point arithmetic done once per group and split over its G lanes: the loops that compute
        # records (exp of the softmax, shared stores) and, in the backward, the owners' epilogue.
        shared = _innermost(loops, lambda lp: count(lp, r"MUFU\.EX2") > 0 and count(lp, r"\bSTS") > 0)
        epilogue = [lp for lp in loops if count(lp, r"\bSTG") > 0 and count(lp, r"LDG\.E\.128") == 0]
        epilogue = [lp for lp in epilogue if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in epilogue)]
        total = sum(lp[1] - lp[0] + 1 for lp in shared[:1])
        if kernel.direction == "backward" and epilogue:
            total += max(lp[1] - lp[0] + 1 for lp in epilogue)
        kernel.per_point_shared = float(total) if total else None


def report_arch(arch: str, workdir: Path) -> tuple[list[Kernel], set[str]]:
    """Every kernel of every variant compiled for ``arch``; and the compilers used."""
    kernels: list[Kernel] = []
    compilers = set()
    for label, source_name, defines in VARIANTS:
        cubin = workdir / f"{re.sub(r'[^a-z]+', '_', label)}_{arch}.cubin"
        compilers.add(compile_cubin(SOURCES[source_name], kernel_names(source_name), arch, cubin, defines))
        registers = registers_of(cubin)
        for function, stream in disassemble(cubin).items():
            m = _MANGLED.search(function)
            if not m or (defines and m.group(1) == "forward"):
                continue
            kernel = Kernel(label, m.group(1), _MANGLED_DTYPES[m.group(2)], m.group(3) == "1")
            kernel.registers = registers.get(function, 0)
            analyse(kernel, stream)
            kernels.append(kernel)
    order = {"f32": 0, "bf16": 1, "f16": 2, "f64": 3}
    labels = [v[0] for v in VARIANTS]
    kernels.sort(key=lambda k: (k.direction != "forward", order[k.dtype], not k.vec, labels.index(k.source)))
    return kernels, compilers


def per_point_per_lane(kernel: Kernel) -> float | None:
    """Point-loop instructions plus the shared per-point work divided over the G lanes (D = 32)."""
    if kernel.point_loop is None:
        return None
    shared = (kernel.per_point_shared or 0.0) / GROUP_AT_D32[kernel.dtype]
    return kernel.point_loop + shared


def print_table(arch: str, kernels: list[Kernel], compilers: set[str]) -> None:
    print(f"\n## SASS, {arch}, compiled by {' and '.join(sorted(compilers))} (static counts, D = 32 for per lane)\n")
    columns = "registers | LDL/STL | instructions | LDG.128 | atomics | point loop / point | shared / point"
    print(f"| kernel | {columns} | per point per lane |")
    print("|---|" + "---:|" * 8)
    for k in kernels:
        fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        print(
            f"| {k.name} | {k.registers} | {k.local_memory} | {k.instructions} | {k.ldg128} | {k.atomics} | "
            f"{fmt(k.point_loop)} | {fmt(k.per_point_shared)} | {fmt(per_point_per_lane(k))} |"
        )


# ---------------------------------------------------------------------------------------------
# Bytes per encoder layer, from the shapes
# ---------------------------------------------------------------------------------------------


def encoder_bytes(value_bytes: int) -> dict[str, dict[str, float]]:
    """Bytes (MB) one encoder layer's attention moves in DRAM, per step, for values of ``value_bytes``.

    Counts each tensor read or written once per kernel that touches it (no cache reuse); coordinates
    and weights are float32. The forward floor is the sampling kernel's own traffic; the unfused path
    adds PyTorch's location arithmetic (a divide and an add over the offsets) and the softmax.
    """
    e = ENCODER
    N, M, D, P = e["N"], e["M"], e["D"], e["P"]
    L = len(e["shapes"])
    S = sum(h * w for h, w in e["shapes"])
    Lq = S
    mb = 1e-6
    value = N * S * M * D * value_bytes * mb
    out = N * Lq * M * D * value_bytes * mb
    loc = N * Lq * M * L * P * 2 * 4 * mb  # offsets, locations and their gradients alike
    weights = N * Lq * M * L * P * 4 * mb  # logits, weights and their gradients alike
    ref = N * Lq * L * 2 * 4 * mb
    grad_value_acc = N * S * M * D * 4 * mb  # float32 accumulation buffer
    forward = {
        "floor (sampling kernel)": value + out + loc + weights,
        "unfused: offsets / (W, H)": 2 * loc,
        "unfused: ref + that": 2 * loc + ref,
        "unfused: softmax": 2 * weights,
        "fused (one kernel)": value + out + loc + weights + ref,
    }
    forward["unfused total"] = sum(v for k, v in forward.items() if k.startswith(("floor", "unfused:")))
    # Backward: read grad_out, value, coordinates; zero, accumulate and convert grad_value; write the
    # coordinate gradients. The unfused path also runs the softmax and location backward in PyTorch.
    kernel_bwd = out + value + loc + weights + 2 * grad_value_acc + grad_value_acc + value + loc + weights
    backward = {
        "floor (sampling kernel)": kernel_bwd,
        "unfused: softmax backward": 3 * weights,
        "unfused: grad offsets = grad loc / (W, H)": 2 * loc,
        "fused (one kernel)": kernel_bwd + ref + 2 * weights,  # grad logits written twice, read once
    }
    backward["unfused total"] = sum(v for k, v in backward.items() if k.startswith(("floor", "unfused:")))
    return {"forward": forward, "backward": backward}


def print_bytes() -> None:
    e = ENCODER
    print(
        f"\n## Bytes per encoder layer (MB; N={e['N']}, levels {'/'.join(f'{h}x{w}' for h, w in e['shapes'])}, "
        f"M={e['M']}, D={e['D']}, P={e['P']})\n"
    )
    print("| step | item | float32 | bfloat16 |")
    print("|---|---|---:|---:|")
    f32, bf16 = encoder_bytes(4), encoder_bytes(2)
    for step in ("forward", "backward"):
        for item in f32[step]:
            print(f"| {step} | {item} | {f32[step][item]:.1f} | {bf16[step][item]:.1f} |")
    for step in ("forward", "backward"):
        floor32, floor16 = f32[step]["floor (sampling kernel)"], bf16[step]["floor (sampling kernel)"]
        print(
            f"| {step} | unfused / floor, fused / floor | "
            f"{f32[step]['unfused total'] / floor32:.2f}, {f32[step]['fused (one kernel)'] / floor32:.2f} | "
            f"{bf16[step]['unfused total'] / floor16:.2f}, {bf16[step]['fused (one kernel)'] / floor16:.2f} |"
        )


# ---------------------------------------------------------------------------------------------
# Compiled-code checks: what CI asserts about every instantiation (NVRTC only, no GPU)
# ---------------------------------------------------------------------------------------------

_BARRIER_CALL = re.compile(r"\b(__syncwarp|__syncthreads)\s*\(")
_PTX_BARRIER = re.compile(r"^\s*(?:@\S+\s+)?(bar\.warp\.sync|bar\.sync|barrier\.sync|barrier\.cta\.sync)\b", re.M)
_REGISTERS_PER_SM = 65536


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)


def _functions(text: str) -> dict[str, str]:
    """{name: body} of the functions defined one brace level deep (inside the kernels' namespace)."""
    found, depth, i = {}, 0, 0
    while i < len(text):
        c = text[i]
        if c == "{" and depth == 1:
            head = text[max(0, text.rfind(";", 0, i), text.rfind("}", 0, i)) + 1 : i].rstrip()
            end, inner = i + 1, 1
            while inner:
                inner += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if head.endswith(")"):  # a function: its name precedes the parameter list
                j, level = len(head) - 1, 0
                while j >= 0:
                    level += {")": 1, "(": -1}.get(head[j], 0)
                    if level == 0:
                        break
                    j -= 1
                name = re.search(r"(\w+)\s*$", head[:j])
                if name:
                    found[name.group(1)] = text[i:end]
            i = end
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        i += 1
    return found


def barrier_sites(source: Path) -> dict[str, int]:
    """Barrier call sites each kernel executes: {"forward": n, "backward": n}. A site is a call of
    __syncwarp or __syncthreads, or of a function of the file named like one (``group_sync``: a barrier
    wrapper, one site whatever its body compiles to); other callees count with their own sites."""
    functions = _functions(_strip_comments(source.read_text()))
    wrappers = [f for f in functions if "sync" in f]

    def calls(f: str, body: str) -> int:
        return len(re.findall(rf"\b{f}\s*(?:<[^;(]*?>)?\s*\(", body))

    memo: dict[str, int] = {}

    def sites(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # overloads share a name: a name met again inside itself adds nothing
            body = functions[name]
            count = len(_BARRIER_CALL.findall(body)) + sum(calls(f, body) for f in wrappers)
            called = {f: calls(f, body) for f in functions if f != name and f not in wrappers}
            memo[name] = count + sum(n * sites(f) for f, n in called.items() if n)
        return memo[name]

    return {direction: sites(f"{direction}_kernel") for direction in ("forward", "backward")}


def register_budget(source: Path) -> dict[str, int]:
    """Registers per thread that each kernel's ``__launch_bounds__(threads, min_blocks)`` leaves: 64K per
    SM over threads * min_blocks, in the allocation unit of 8. {"forward": n, "backward": n}."""
    text = _strip_comments(source.read_text() + "".join(h.read_text() for h in source.parent.glob("*.h")))
    constants = dict(re.findall(r"(?:constexpr int|#define)\s+(\w+)\s*=?\s*(\d+)", text))
    budgets = {}
    for threads, blocks, direction in re.findall(
        r"__launch_bounds__\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*(forward|backward)_kernel", text
    ):
        t, b = (int(constants.get(x, x)) for x in (threads, blocks))
        budgets[direction] = _REGISTERS_PER_SM // (t * b) // 8 * 8
    if sorted(budgets) != ["backward", "forward"]:
        raise ValueError(f"{source.name}: each kernel needs __launch_bounds__(threads, min_blocks), found {budgets}")
    return budgets


@dataclass
class Compiled:
    """One instantiation as the compiled-code checks see it."""

    source: str
    arch: str
    name: str  # the name expression
    ptx_barriers: int
    source_barriers: int
    registers: int
    budget: int
    spill_bytes: int

    def problems(self) -> list[str]:
        where = f"{self.source} {self.name} on {self.arch}"
        found = []
        if self.ptx_barriers != self.source_barriers:
            found.append(
                f"{where}: the PTX holds {self.ptx_barriers} barriers (bar.sync, bar.warp.sync), the source "
                f"has {self.source_barriers} call sites: a barrier was compiled away or duplicated"
            )
        if self.spill_bytes:
            found.append(f"{where}: {self.spill_bytes} bytes of local-memory spills")
        if self.registers > self.budget:
            found.append(f"{where}: {self.registers} registers, the launch bounds allow {self.budget}")
        return found


def compiled_kernels(arch: str) -> list[Compiled]:
    """Every instantiation of both kernels compiled by NVRTC for ``arch`` (a real sm_XY)."""
    from ops.cuda import build as nvrtc

    rows = []
    for label in ("unfused", "fused"):
        source = SOURCES[label]
        ptx, log, symbols = nvrtc.compile_with_report(source, kernel_names(label), arch)
        entries = dict(re.findall(r"\.entry\s+(\w+)\((.*?)(?=\.entry\s|\Z)", ptx, flags=re.S))
        usage = {}
        for symbol, block in re.findall(r"Function properties for (\w+)\n(.*?)(?=Compile time|\Z)", log, re.S):
            spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
            registers = re.search(r"Used (\d+) registers", block)
            usage[symbol] = (int(registers.group(1)) if registers else 0, spills)
        sites, budget = barrier_sites(source), register_budget(source)
        for name, symbol in symbols.items():
            registers, spills = usage.get(symbol, (0, 0))
            direction = "forward" if "forward_kernel" in name else "backward"
            ptx_barriers = len(_PTX_BARRIER.findall(entries.get(symbol, "")))
            rows.append(
                Compiled(label, arch, name, ptx_barriers, sites[direction], registers, budget[direction], spills)
            )
    return rows


def print_checks(rows: list[Compiled]) -> None:
    print("\n## Compiled-code checks (NVRTC PTX and ptxas)\n")
    print("| kernel | arch | barriers PTX / source | registers / budget | spill bytes |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.source} {r.name} | {r.arch} | {r.ptx_barriers} / {r.source_barriers} | "
            f"{r.registers} / {r.budget} | {r.spill_bytes} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=["sm_90"], help="targets, e.g. sm_80 sm_90 (default sm_90)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="msda-sass-") as tmp:
        for arch in args.archs:
            kernels, compilers = report_arch(arch, Path(tmp))
            print_table(arch, kernels, compilers)
            if "NVRTC" in " ".join(compilers):
                print_checks(compiled_kernels(arch))
    print_bytes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
