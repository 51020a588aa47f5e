"""Ahead-of-time compilation of the kernels for a CUDA target, without a GPU (audits and tests).

Triton compiles for any target it knows (``GPUTarget("cuda", 90, 32)`` is an H100 / H200) and its
wheel ships ``ptxas`` and ``cuobjdump``: :func:`compile_kernel` builds the real ``CompiledKernel``
a launch would load, :func:`audit` reads what the compiler made of it (registers, spills, shared
memory, instruction mix). Needs a process with ``TRITON_INTERPRET`` unset (the interpreter
replaces ``triton.jit``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# SASS opcodes worth counting: tensor-core MMAs (HGMMA = wgmma on sm_90, HMMA = mma.sync), FMA,
# global loads (128-bit ones named), TMA / async copies, shared-memory traffic, branches.
_OPCODES = ("HGMMA", "HMMA", "FFMA", "LDG", "LDGSTS", "UTMALDG", "LDS", "STS", "STG", "BAR", "BRA")


def _bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its wheel ships two; the choice moved between versions)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return str(get_ptxas(arch).path)


def compile_kernel(
    kernel: Any,
    args: Mapping[str, Any],
    constexprs: Mapping[str, Any],
    options: Mapping[str, int],
    pointer_types: Mapping[str, str],
    arch: int = 90,
) -> Any:
    """Compile ``kernel`` for ``sm_<arch>`` as a launch with these arguments would specialize it.

    ``args`` maps each runtime argument name to a value: an int (``i32``, 16-divisible ones marked
    so, as Triton's launcher does) or ``None`` for a pointer, typed by ``pointer_types[name]``
    (``"*bf16"``, ``"*fp32"``...). Pointers are taken as 16-byte aligned.
    """
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if value is None:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
            if isinstance(value, int) and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, dict(constexprs), attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))


def audit(compiled: Any, arch: int = 90) -> dict[str, Any]:
    """Registers, spills (ptxas -v), shared memory and SASS instruction counts of a compiled kernel."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "k.ptx"
        ptx_path.write_text(ptx)
        proc = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name={gpu}", str(ptx_path), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
        cubin_path = Path(tmp) / "k.cubin"
        cubin_path.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [_bin("cuobjdump"), "-sass", str(cubin_path)], capture_output=True, text=True, check=True
        ).stdout
    log = proc.stdout + proc.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spill_stores = re.search(r"(\d+) bytes spill stores", log)
    spill_loads = re.search(r"(\d+) bytes spill loads", log)
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", sass)
    counts = dict.fromkeys(_OPCODES, 0)
    ldg128 = 0
    for op, suffix in opcodes:
        if op in counts:
            counts[op] += 1
        if op == "LDG" and ".128" in suffix:
            ldg128 += 1
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": (int(spill_stores.group(1)) if spill_stores else 0)
        + (int(spill_loads.group(1)) if spill_loads else 0),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma_in_ptx": "wgmma.mma_async" in ptx,
        "mma_sync_in_ptx": "mma.sync" in ptx,
        "griddepcontrol_in_ptx": sorted(set(re.findall(r"griddepcontrol\.(\w+)", ptx))),
        "ldg128": ldg128,
        "sass": counts,
    }
