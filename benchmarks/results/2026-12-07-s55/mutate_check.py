"""Whether tests/test_int4_gemv_tma.py's engine comparison (agree_to_rounding) catches a
plausible TMA GEMV bug: its outputs rolled by one column (an indexing slip). Prints the
largest logprob difference of the real kernel and of the mutant (55th session)."""
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, "tests")
import test_int4_gemv_tma as t  # noqa: E402

from kiln.kernels import int4_gemv_tma  # noqa: E402

real = int4_gemv_tma.w4_gemv_tma
for name, fn in (("real", real), ("rolled", lambda *a, **k: real(*a, **k).roll(1, -1))):
    mp = pytest.MonkeyPatch()
    mp.setattr(int4_gemv_tma, "w4_gemv_tma", fn)
    mp.setattr(t.int4_gemv_tma, "w4_gemv_tma", fn)
    # the test wraps int4_gemv_tma.w4_gemv_tma itself, so hand it the mutant as "real"
    try:
        t.test_gpu_engine_in_groups_of_32_decodes_as_the_pairs_gemv(
            Path(tempfile.mkdtemp()), mp)
        print(name, "passed", flush=True)
    except Exception as exc:  # (the 55th session's run: the mutant ended in an uncaught
        # exception, likely max() over no common token before agree_to_rounding's default)
        print(name, "FAILED:", type(exc).__name__, str(exc)[:200], flush=True)
    finally:
        mp.undo()
    torch.cuda.empty_cache()
