"""JIT build of the C++ (CPU) and CUDA extensions with torch.utils.cpp_extension + ninja.

`load("cpu")` / `load("cuda")` compile on first use and load the shared library into the
process, where it registers its kernels of the torch.ops.rank_dpo ops; they return its path.
Later calls, and later processes, reuse the build cached under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions), which torch re-checks against the sources and flags (ninja rebuilds
only what changed). Concurrent processes (torchrun ranks) wait on torch's file lock, so one
compiles and the others load. A failed build raises BuildError and is remembered for the
life of the process, so it is not retried on every call.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# fused_linear.cpp (the LM-head loop, ATen calls only) and register.cpp (the table of kernels)
# are compiled into both extensions; schema.cpp (the ops' signatures) into the CPU one only,
# which is why loading the CUDA extension loads the CPU one first.
SOURCES = {
    "cpu": [os.path.join(CSRC, name)
            for name in ("schema.cpp", "register.cpp", "fused_cpu.cpp", "fused_linear.cpp")],
    "cuda": [os.path.join(CSRC, name)
             for name in ("register.cpp", "fused_cuda.cu", "fused_linear.cpp")],
}
# Without a GPU torch cannot see which architecture to build for: then Ampere and Hopper.
# (A different list changes the build flags, so the cached build is redone: ~2 minutes here.)
DEFAULT_CUDA_ARCHS = "8.0;9.0"

_lock = threading.RLock()  # reentrant: load("cuda") takes it, then load("cpu") inside
_loaded: dict[str, str | BaseException] = {}


class BuildError(RuntimeError):
    """An extension could not be compiled or loaded on this machine."""


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None.

    CUDA_HOME / CUDA_PATH win; otherwise the first of /usr/local/cuda and the real location
    of `nvcc` that holds bin/nvcc and include/cuda_runtime.h. (torch alone would take the
    parent of `which nvcc`, which is wrong when nvcc is a wrapper script, as on our CI.)
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (os.path.isfile(os.path.join(home, "bin", "nvcc"))
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))):
            return home
    return None


def cuda_build_possible() -> tuple[bool, str]:
    """(True, toolkit path) where the CUDA extension can be compiled, else (False, why not)."""
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    home = find_cuda_home()
    if home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
    return True, home


def _cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME pointing at the real toolkit."""
    home = find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    # Its import warns "No CUDA runtime is found" on every machine without a GPU: not news here.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    if home and cpp_extension.CUDA_HOME != home:
        # Imported earlier (by someone else) with a wrong guess; it reads this global.
        cpp_extension.CUDA_HOME = home
    return cpp_extension


def _build(backend: str, verbose: bool) -> str:
    cpp_extension = _cpp_extension()
    name = f"rank_dpo_kernels_{backend}"
    # is_python_module=False: a plain shared library, loaded for its op registrations only.
    if backend == "cpu":
        # -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it; the runtime
        # is the libgomp torch already loaded.
        return cpp_extension.load(
            name=name, sources=SOURCES["cpu"], extra_include_paths=[CSRC],
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=verbose)
    ok, why = cuda_build_possible()
    if not ok:
        raise BuildError(f"cannot build the CUDA extension: {why}")
    try:
        load("cpu", verbose)  # the ops' schema: the CUDA library only adds kernels to it
    except BuildError as e:
        raise BuildError(f"the CUDA extension needs the CPU one, which failed: {e}") from e
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return cpp_extension.load(
        name=name, sources=SOURCES["cuda"], extra_include_paths=[CSRC],
        extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False, verbose=verbose)


def load(backend: str, verbose: bool = False) -> str:
    """Builds (or finds cached) and loads the library of backend "cpu" or "cuda"; returns its
    path. Raises BuildError if it cannot be had."""
    if backend not in SOURCES:
        raise ValueError(f"no compiled backend {backend!r}; expected one of {tuple(SOURCES)}")
    with _lock:
        if backend not in _loaded:
            try:
                _loaded[backend] = _build(backend, verbose)
            except BuildError as e:
                _loaded[backend] = e
            except Exception as e:  # compiler missing or failing, ninja missing, import error
                _loaded[backend] = BuildError(
                    f"building the {backend} extension failed: {type(e).__name__}: {e}")
        result = _loaded[backend]
    if isinstance(result, BaseException):
        raise result
    return result
