"""The compiled CPU backend: csrc/bucket_ops.cpp, built on first use and cached.

The C++ file exports a plain C ABI on raw pointers and is called through ctypes: it includes no
torch or pybind headers, so the one-time build takes about a second. It is built with torch's
extension machinery (`torch.utils.cpp_extension.load`: ninja, a per-build lock so concurrent
ranks build once, a versioned cache) into `$TRAINLIB_KERNEL_CACHE` or torch's extension cache.
If the build fails (no compiler, no ninja) `load()` logs ONE warning and returns None; the
dispatcher then uses the pure-torch reference.

Threads: OpenMP, at most `torch.get_num_threads()` (so `OMP_NUM_THREADS=1` in a data-parallel
rank keeps it on one core); the extension links no OpenMP runtime of its own, so it shares
torch's libgomp and its thread pool.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger("trainlib")

SOURCE = Path(__file__).resolve().parent / "csrc" / "bucket_ops.cpp"
CFLAGS = ["-O3", "-fopenmp"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None      # why the build failed; the warning is logged once per process


def _cache_root() -> Path:
    """$TRAINLIB_KERNEL_CACHE, else torch's extension cache ($TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions), resolved here without importing torch.utils.cpp_extension."""
    root = os.environ.get("TRAINLIB_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's pip-installed ninja is not on it unless the venv is
    activated, so add the wheel's bin dir (the build runs under _lock)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # the build fails, and load() says so once
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _compile() -> ctypes.CDLL:
    src = SOURCE.read_bytes()
    # The name carries a hash of source, flags, torch version and CPU architecture: an edit, an
    # upgrade or a cache shared by x86 and Arm nodes builds afresh instead of loading a stale library.
    tag = hashlib.sha256(src + repr((CFLAGS, torch.__version__, platform.machine())).encode()).hexdigest()[:12]
    name = f"trainlib_bucket_ops_{tag}"
    build_dir = _cache_root() / name
    path = build_dir / f"{name}.so"
    # Fast path (every process after the first build, e.g. each data-parallel rank): load the cached
    # library directly; importing torch's build machinery alone costs ~0.4 s. A "lock" file means
    # another process is still building it (torch's FileBaton), so go through torch's path and wait.
    if not path.exists() or (build_dir / "lock").exists():
        from torch.utils.cpp_extension import load as load_extension

        _ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        path = Path(load_extension(name, [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(build_dir),
                                   is_python_module=False, verbose=False))
    return bind(ctypes.CDLL(str(path)))


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of csrc/bucket_ops.cpp on a loaded library."""
    args = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_float, ctypes.c_int]
    for fn in (lib.tl_pack, lib.tl_unpack):
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.tl_epilogue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                                ctypes.POINTER(ctypes.c_double)]
    lib.tl_epilogue.restype = ctypes.c_int
    lib.tl_unscale_epilogue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                        ctypes.c_float, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    lib.tl_unscale_epilogue.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first call; None (after one warning) if it cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _compile()
            except Exception as e:  # any build failure means "use the reference", never a crash
                _failed = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
                log.warning("trainlib.kernels: cannot build the CPU kernels (%s); using the pure-torch reference "
                            "(slower). Install a C++ compiler and ninja (pip install ninja), or set "
                            "TRAINLIB_KERNELS=reference to silence this.", _failed)
    return _lib


def available() -> bool:
    return load() is not None


def reset() -> None:
    """Forget the loaded library and any failure (tests use it to exercise the fallback)."""
    global _lib, _failed
    with _lock:
        _lib, _failed = None, None


def supports(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODE


def _call(fn, ptrs: Sequence[int], numels: Sequence[int], dtypes: Sequence[torch.dtype], flat: torch.Tensor,
          scale: float) -> None:
    n = len(ptrs)
    if n and dtypes.count(dtypes[0]) == n:  # one dtype (the usual bucket): no per-tensor lookups
        codes = bytes([DTYPE_CODE[dtypes[0]]]) * n
    else:
        codes = bytes(DTYPE_CODE[d] for d in dtypes)
    p, ne = array.array("Q", ptrs), array.array("q", numels)
    rc = fn(n, p.buffer_info()[0], codes, ne.buffer_info()[0], flat.data_ptr(), DTYPE_CODE[flat.dtype], scale,
            torch.get_num_threads())
    assert rc == 0, f"bucket_ops returned {rc}"  # the dispatcher validated dtypes and sizes


def pack(seg, out: torch.Tensor, scale: float) -> None:
    """seg: the dispatcher's validated Segments (contiguous CPU tensors, their pointers and sizes)."""
    lib = load()
    assert lib is not None
    _call(lib.tl_pack, seg.ptrs, seg.numels, seg.dtypes, out, scale)


def unpack(flat: torch.Tensor, seg, scale: float) -> None:
    lib = load()
    assert lib is not None
    _call(lib.tl_unpack, seg.ptrs, seg.numels, seg.dtypes, flat, scale)


def scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    lib = load()
    assert lib is not None
    _call(lib.tl_pack, [src.data_ptr()], [src.numel()], [src.dtype], dst, scale)


def epilogue(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lib = load()
    assert lib is not None
    sq = ctypes.c_double(0.0)
    rc = lib.tl_epilogue(flat.data_ptr(), DTYPE_CODE[flat.dtype], flat.numel(), torch.get_num_threads(),
                         ctypes.byref(sq))
    assert rc in (0, 1), f"tl_epilogue returned {rc}"
    return torch.tensor(bool(rc)), torch.tensor(sq.value, dtype=torch.float32)


def unscale_epilogue(src: torch.Tensor, dst: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dst = cast(src * scale) and epilogue(dst), in one pass (contiguous CPU tensors)."""
    lib = load()
    assert lib is not None
    sq = ctypes.c_double(0.0)
    rc = lib.tl_unscale_epilogue(src.data_ptr(), DTYPE_CODE[src.dtype], dst.data_ptr(), DTYPE_CODE[dst.dtype],
                                 dst.numel(), scale, torch.get_num_threads(), ctypes.byref(sq))
    assert rc in (0, 1), f"tl_unscale_epilogue returned {rc}"
    return torch.tensor(bool(rc)), torch.tensor(sq.value, dtype=torch.float32)
