"""Start NVIDIA Triton Inference Server (from the `nvidia-pytriton` wheel) on a kiln repo.

The wheel ships `tritonserver`, its Python backend and one backend stub per Python
version, but not wired together. Two facts decide the setup:

- The stub embeds Python in isolated mode: PYTHONPATH is ignored. Its `sys.prefix`
  comes from the first `python3` on PATH, so putting a venv's `bin/` first on PATH makes
  the model run in that venv.
- The stub crashes on BYTES tensors when the model's environment has numpy 2, and
  kiln's own environment may need numpy 2. So the model runs in a venv of its own (the
  "Triton env": `nvidia-pytriton` and `numpy<2`), which sees kiln's environment behind
  its own packages through a `.pth` file.

`prepare_triton_env` does that wiring once (idempotent); `tritonserver_command` gives
the argv and environment to start the server; `kiln triton-serve` runs it.
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

_PTH = "kiln-env.pth"
INSTALL_HINT = ("python -m venv ENV && ENV/bin/pip install nvidia-pytriton==0.7.0 'numpy<2' "
                "(with the Python that runs kiln)")


@dataclass(frozen=True)
class TritonEnv:
    """A venv with nvidia-pytriton, prepared to run kiln models."""

    root: Path
    site_packages: Path

    @property
    def tritonserver_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.tritonserver_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.tritonserver_dir / "backends"


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton_env(root: str | Path) -> TritonEnv:
    root = Path(root).resolve()
    site_packages = root / "lib" / f"python{_python_tag()}" / "site-packages"
    if not (root / "pyvenv.cfg").is_file():
        raise KilnError(f"{root} is not a Python venv; make one: {INSTALL_HINT}")
    if not site_packages.is_dir():
        raise KilnError(f"{root} is not a Python {_python_tag()} venv (kiln runs on "
                        f"{_python_tag()}, and so must Triton's model stub); {INSTALL_HINT}")
    env = TritonEnv(root, site_packages)
    if not env.binary.is_file():
        raise KilnError(f"{root} has no nvidia-pytriton: {INSTALL_HINT}")
    return env


def _kiln_paths() -> list[str]:
    """What the model needs from kiln's environment: its site-packages and, for a source
    checkout, the folder that holds the `kiln` package."""
    paths = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                       sysconfig.get_paths()["platlib"]]) if Path(p).is_dir()]
    source_root = str(Path(__file__).resolve().parents[2])
    if not any(Path(p) in Path(__file__).resolve().parents for p in paths):
        paths.append(source_root)
    return paths


def prepare_triton_env(root: str | Path) -> TritonEnv:
    """Copy the stub for this Python into the backend folder and point the env at
    kiln's packages (behind the env's own, so its numpy<2 wins). Safe to repeat."""
    env = find_triton_env(root)
    stub = env.tritonserver_dir / "python_backend_stubs" / _python_tag() / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise KilnError(f"nvidia-pytriton in {env.root} has no backend stub for Python "
                        f"{_python_tag()}")
    target = env.backends / "python" / "triton_python_backend_stub"
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    lines = [f"import site; site.addsitedir({p!r})" for p in _kiln_paths()]
    pth = env.site_packages / _PTH
    text = "\n".join(lines) + "\n"
    if not pth.is_file() or pth.read_text() != text:
        pth.write_text(text)
    return env


def _libpython_dir() -> str:
    """The folder of the shared libpython the stub links against."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = sysconfig.get_config_var("INSTSONAME") or ""
    if not (Path(libdir) / name).is_file():
        raise KilnError(f"this Python has no shared {name or 'libpython'}; Triton's Python "
                        "backend needs one (Debian: apt install libpython3-dev)")
    return libdir


def tritonserver_command(env: TritonEnv, repository: str | Path, http_port: int = 8000,
                         grpc_port: int = 8001, metrics_port: int = 8002,
                         host: str = "127.0.0.1",
                         extra_args: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """argv and environment for tritonserver serving `repository` with `env`'s stub."""
    argv = [str(env.binary), "--model-repository", str(Path(repository).resolve()),
            "--backend-directory", str(env.backends),
            "--http-address", host, "--http-port", str(http_port),
            "--grpc-address", host, "--grpc-port", str(grpc_port),
            "--metrics-address", host, "--metrics-port", str(metrics_port),
            *extra_args]
    environ = dict(os.environ)
    libs = [str(env.site_packages / "nvidia_pytriton.libs"), _libpython_dir()]
    if environ.get("LD_LIBRARY_PATH"):
        libs.append(environ["LD_LIBRARY_PATH"])
    environ["LD_LIBRARY_PATH"] = ":".join(libs)
    # The stub's Python takes its prefix from the first python3 on PATH: the Triton env.
    environ["PATH"] = f"{env.root / 'bin'}:{environ.get('PATH', '/usr/bin:/bin')}"
    return argv, environ
