"""Compile every varlen flash-attention kernel for a GPU target, without a GPU.

    python -m speedasr.kernels.compile_check --arch 80 [--arch 90]

Triton compiles ahead of time for a given target, and its wheel bundles NVIDIA's ``ptxas`` and
``cuobjdump``; so this machine can check what the interpreter cannot: that each kernel
configuration the launcher would pick lowers to PTX and assembles into a cubin, its shared memory,
registers and stack bytes per thread (register spills). It runs nothing. Needs triton with the
NVIDIA backend; takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch

from speedasr.extras import missing_extra

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # the core install has no triton: say which extra adds it
    raise missing_extra("triton", "the kernel compile check") from e

from . import flash_varlen_kernels as K
from .flash_varlen import _block_d, _block_w, _blocks, _dot_precision, _max_head_dim

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT32_POINTERS = {"CuQ", "CuK", "Sched"}
_FP32_POINTERS = {"Lse", "Delta", "dTab"}
_DATA_POINTERS = {"Q", "K", "V", "Out", "dOut", "dK", "dV", "dQ", "QP", "Tab", "dQP"}
_FLOATS = {"qk_scale_log2", "softmax_scale"}


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT32_POINTERS:
            sig[name] = "*i32"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _DATA_POINTERS:
            sig[name] = "*" + _TRITON_TYPE[dtype]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # strides, totals, program counts
    return sig


def _resource_usage(cubin: bytes) -> tuple[str, str]:
    """Registers and spill stack bytes per thread of a cubin, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)  # register spills land in the per-thread stack frame
    return (regs.group(1) if regs else "?"), (stack.group(1) if stack else "?")


def _tiles(block_m: int, block_n: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=_block_w(block_m, block_n))


def configurations(rel_pos_only: bool = False):
    """(label, kernel, dtype, constexprs, num_warps, num_stages) exactly as the launcher picks.

    Each attention kernel comes plain and with the relative-position term (``+relpos``);
    ``rel_pos_only`` lists only the latter (and no preprocess kernel).
    """
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128, 40, 256):
            if head_dim > _max_head_dim(dtype):
                continue
            block_d = _block_d(head_dim)
            for causal, rel_pos in ((False, False), (True, False), (False, True), (True, True)):
                if rel_pos_only and not rel_pos:
                    continue
                blocks = _blocks(head_dim, dtype, rel_pos)
                common = dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d,
                              DOT_PRECISION=_dot_precision(dtype), REL_POS=rel_pos)  # fmt: skip
                kernels = [
                    ("fwd", K.fwd_kernel, _tiles(blocks.fwd_m, blocks.fwd_n)),
                    ("dkdv", K.bwd_dkdv_kernel, _tiles(blocks.bwd_q_step, blocks.bwd_kv)),
                    ("dq", K.bwd_dq_kernel, _tiles(blocks.bwd_q, blocks.bwd_kv_step)),
                ]
                mask = ("causal" if causal else "full") + ("+relpos" if rel_pos else "")
                for name, fn, tiles in kernels:
                    label = f"{_TRITON_TYPE[dtype]} D{head_dim} {mask} {name}"
                    yield label, fn, dtype, {**common, **tiles}, blocks.num_warps, blocks.num_stages
            if rel_pos_only:
                continue
            blocks = _blocks(head_dim, dtype)
            pre = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.bwd_q)
            label = f"{_TRITON_TYPE[dtype]} D{head_dim} preprocess"
            yield label, K.bwd_preprocess_kernel, dtype, pre, blocks.num_warps, blocks.num_stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, e.g. 80, 90")
    parser.add_argument("--only", default="", help="compile only labels containing this text")
    parser.add_argument("--rel-pos-only", action="store_true",
                        help="only the kernels with the relative-position term")  # fmt: skip
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch or [80]:
        target = GPUTarget("cuda", arch, 32)
        for label, fn, dtype, constexprs, num_warps, num_stages in configurations(
            args.rel_pos_only
        ):
            if args.only not in label:
                continue
            src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs)
            options = dict(num_warps=num_warps, num_stages=num_stages)
            try:
                compiled = triton.compile(src, target=target, options=options)
                regs, stack = _resource_usage(compiled.asm["cubin"])
            except Exception as e:  # report every configuration, then fail
                failures += 1
                print(f"sm_{arch} {label}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            smem = compiled.metadata.shared
            print(f"sm_{arch} {label:<28} smem {smem:>6} B  regs {regs:>3}  stack {stack:>5} B")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
