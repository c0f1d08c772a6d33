"""The GPU session's first step: build every kernel before anything times them.

Builds the C++ CPU-attention kernel (cached under ``~/.cache/headinfer_vllm``)
and, on CUDA, chooses the page-load path, which compiles and self-checks the
Triton kernel. Killed mid-build, a later step would rebuild inside its own
allotment and lose its measurement, so this runs alone, first.

    python benchmarks/build_kernels.py
"""

from __future__ import annotations

import sys
import time

import torch

from headinfer_vllm.core import cpu_attention


def main() -> int:
    failed = 0
    started = time.perf_counter()
    try:
        print(f"cpu attention kernel: {cpu_attention.build()} ({time.perf_counter() - started:.1f} s)", flush=True)
    except Exception as error:  # the session goes on without the CPU kernel
        print(f"cpu attention kernel: not built: {type(error).__name__}: {error}", flush=True)
        failed += 1
    if torch.cuda.is_available():
        from headinfer_vllm.core import page_loader

        started = time.perf_counter()
        loader = page_loader.PageLoader(torch.device("cuda"))
        print(f"page loads: {loader.path} ({time.perf_counter() - started:.1f} s)", flush=True)
    else:
        print("page loads: no CUDA device, nothing to compile", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
