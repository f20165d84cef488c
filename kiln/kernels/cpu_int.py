"""The CPU GEMM for integer weights (cpu_int.c): float32 x times kiln's groupwise INT4 /
INT8 weights, read as stored, for decode-sized steps.

A float32 engine streams 4 bytes a weight each decode step; the CPU is bound by that
(SmolLM2 at 8 rows: 540 MB a step). This kernel reads the integers (0.5-1 byte a weight
plus the group scales) and dequantizes in registers, with the values a dequantized engine
holds (q * scale + offset in float32); only the order of the float32 sums differs.

The C source is compiled at first use with the machine's compiler (`$CC`, else `gcc`;
FLAGS, under $KILN_CACHE/cpu_kernels, a second or so) and loaded with ctypes; the call
releases the GIL. It takes AVX-512F where the CPU has it, else AVX2 + FMA (most x86-64
CPUs since 2013; the same bits, fewer rows at once); KILN_CPU_INT_ISA=avx2 picks AVX2 on
an AVX-512 CPU. Where that fails (no compiler, neither instruction set, not x86-64) or
KILN_CPU_INT_KERNEL=0, `available()` is False and the caller multiplies the dequantized
float32 weight instead, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
TILE = 16  # outputs per tile (one 16-lane register)

_library: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def isa() -> str | None:
    """The instruction set the kernel is compiled for here: avx512, avx2 or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = set(_cpu_flags().split())
    asked = os.environ.get("KILN_CPU_INT_ISA", "auto")
    if "avx512f" in flags and asked != "avx2":
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else None


def _compile(target_isa: str | None) -> ctypes.CDLL | None:
    if target_isa is None:
        log.info("kiln's CPU integer GEMM needs x86-64 with AVX-512F or AVX2 + FMA; integer "
                 "layers multiply dequantized float32 weights on this CPU")
        return None
    flags = FLAGS + (("-mno-avx512f",) if target_isa == "avx2" else ())
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        log.info("no C compiler found ($CC, gcc): integer layers multiply dequantized "
                 "float32 weights on the CPU")
        return None
    from kiln.resolve import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / "cpu_kernels" / f"cpu_int-{target_isa}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode != 0:
                log.info("compiling kiln's CPU integer GEMM failed (%s); integer layers "
                         "multiply dequantized float32 weights: %s", cc,
                         done.stderr.strip()[-500:])
                return None
            os.replace(tmp, target)  # atomic: a process compiling beside this one is fine
        except (OSError, subprocess.SubprocessError) as e:
            log.info("could not compile kiln's CPU integer GEMM: %s", e)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    fn = lib.kiln_int_gemm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                   *[ctypes.c_void_p] * 6, ctypes.c_int]
    lib.kiln_int_dequantize.restype = None
    lib.kiln_int_dequantize.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                                        *[ctypes.c_void_p] * 4, ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run here (compiled once a process)."""
    global _library, _tried
    if not _tried:
        _tried = True
        if os.environ.get("KILN_CPU_INT_KERNEL", "1") != "0":
            _library = _compile(isa())
    return _library


# Steps of up to this many rows take the kernel; more (prompts) multiply the dequantized
# float32 weight with oneDNN, faster there (cpu_int_bench.py, SmolLM2, ms a step, kernel /
# oneDNN: 8 rows 11.0 / 31.7, 32 rows 40.3 / 50.3, 64 rows 82.0 / 78.7, 128 161 / 126).
# The AVX2 build is slower than oneDNN from ~24 rows (32: 58.7 / 53.4), but the float32
# copy costs its making and 4 bytes a weight: 8 prompts x 64 tokens 1.9-2.1x transformers
# with 64 here, 1.2-1.4x with 16.
MAX_ROWS = int(os.environ.get("KILN_CPU_INT_MAX_ROWS", "64"))


def available() -> bool:
    return library() is not None


def takes(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether x [M, K] (float32, on the CPU, M <= MAX_ROWS) goes through the kernel."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS and (bits == 8 or group_size % 2 == 0)
            and available())


def dequantize(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
               ) -> torch.Tensor:
    """reference.dequantize_int_weight bit for bit, in C (SmolLM2's 120 layers: 1.5 s in
    torch); the float32 weight that prompt-sized steps multiply. Needs available()."""
    lib = library()
    assert lib is not None
    bits, n, k, group = storage_shape(weight, scale)
    weight, scale = weight.contiguous(), scale.float().contiguous()
    offset = None if offset is None else offset.float().contiguous()
    w = torch.empty(n, k, dtype=torch.float32)
    lib.kiln_int_dequantize(bits, n, k, group, weight.data_ptr(), scale.data_ptr(),
                            _pointer(offset), w.data_ptr(), torch.get_num_threads())
    return w


def storage_shape(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int, int]:
    """(bits, out features, in features, group size) of kiln's integer storage."""
    bits = 4 if weight.dtype == torch.uint8 else 8
    k = weight.shape[1] * (2 if bits == 4 else 1)
    return bits, weight.shape[0], k, k // scale.shape[1]


def to_tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N / 16), C, 16] (rows padded with zeros to whole tiles)."""
    n, c = t.shape
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, c)])
    return t.reshape(-1, TILE, c).transpose(1, 2).contiguous()


class TiledWeight:
    """A layer's integer weight in the kernel's tile layout (made once, at first use)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None) -> None:
        self.bits, self.out_features, self.in_features, self.group_size = \
            storage_shape(weight, scale)
        self.weight = to_tiles(weight)  # 4-bit: byte pairs of k stay as stored
        self.scale = to_tiles(scale.float())
        self.offset = None if offset is None else to_tiles(offset.float())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lib = library()
        assert lib is not None
        x = x.contiguous()
        bias = None if bias is None else bias.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        status = lib.kiln_int_gemm(self.bits, x.shape[0], self.out_features, self.in_features,
                                   self.group_size, x.data_ptr(), self.weight.data_ptr(),
                                   self.scale.data_ptr(), _pointer(self.offset), _pointer(bias),
                                   y.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError("kiln's CPU integer GEMM could not allocate its group sums")
        return y


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
