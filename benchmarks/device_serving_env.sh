#!/usr/bin/env bash
# The serving sweep on a machine without internet (the device machine: Python 3.12 with
# torch, no FastAPI): pack the missing pieces here, unpack them there.
#
#   bash benchmarks/device_serving_env.sh pack      # here: .carry-serving/ (git-ignored)
#                                                   # (PYVER=3.11 for a 3.11 machine)
#   source benchmarks/device_serving_env.sh unpack  # there: exports PYTHONPATH, KILN_TRITON_ENV
#
# What travels (~45 MB, under the device tool's 64 MiB carry): the serve extra's wheels
# that image lacks (FastAPI, Starlette, pydantic, uvicorn, opentelemetry-api: FastAPI 0.165 imports it), numpy<2 for Triton's model
# environment (its Python-backend stub crashes on BYTES tensors under numpy 2, see
# kiln/serve/triton_server.py), and a slim Triton Inference Server cut from the
# nvidia-pytriton wheel: the tritonserver binary, the Python backend, the Python 3.12
# stub and the 41 libraries those load (26 MB as tar.xz instead of the 55 MB wheel).
# The stub also links libpython3.12.so.1.0, which that image has in /usr/lib.
# Then: `... unpack; bash benchmarks/gpu_suite.sh build8b serving` (name .carry-serving in
# the device call's carry).
D=.carry-serving
PYVER=${PYVER:-3.12}  # the Python of the machine that unpacks (the device image: 3.12)
PY_TAG=(--python-version "$PYVER" --implementation cp --only-binary=:all:
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
SERVE_WHEELS="fastapi starlette pydantic pydantic_core annotated_types annotated_doc typing_inspection
              opentelemetry_api uvicorn"

pack() (  # a subshell: stops at the first error
  set -euo pipefail
  rm -rf "$D" && mkdir -p "$D/wheels" "$D/triton-wheels" "$D/tmp"
  grep -qx "/$D/" .git/info/exclude 2>/dev/null || echo "/$D/" >> .git/info/exclude
  # fastapi + uvicorn with their dependencies resolved for 3.12, then only the packages the
  # image lacks (its own anyio, click, h11, typing_extensions, ... stay in charge)
  python3 -m pip download -q "${PY_TAG[@]}" -d "$D/tmp" fastapi 'uvicorn>=0.29'
  for name in $SERVE_WHEELS; do  # a name no longer pulled in is simply not carried
    for f in "$D"/tmp/"$name"-*.whl; do [ -e "$f" ] && mv "$f" "$D/wheels/"; done
  done
  rm -rf "$D/tmp" && mkdir -p "$D/tmp"
  python3 -m pip download -q --no-deps "${PY_TAG[@]}" -d "$D/triton-wheels" 'numpy<2'
  python3 -m pip download -q --no-deps "${PY_TAG[@]}" --platform manylinux_2_35_x86_64 \
    -d "$D/tmp" nvidia-pytriton==0.7.0
  (cd "$D/tmp" && unzip -q nvidia_pytriton-*.whl 'pytriton/tritonserver/*' \
     'nvidia_pytriton.libs/*')
  local root=$D/tmp ts=pytriton/tritonserver
  local files=("$ts/bin/tritonserver" "$ts/backends/python/libtriton_python.so"
               "$ts/backends/python/triton_python_backend_utils.py"
               "$ts/python_backend_stubs/$PYVER/triton_python_backend_stub")
  # the wheel's own libraries the three binaries load (ldd resolves through the wheel's folder)
  local libs
  libs=$(for f in "${files[@]}"; do
           LD_LIBRARY_PATH="$root/nvidia_pytriton.libs" ldd "$root/$f" 2>/dev/null; done |
         awk '$3 ~ /nvidia_pytriton.libs/ {n = split($3, p, "/"); print "nvidia_pytriton.libs/" p[n]}' |
         sort -u)
  tar -C "$root" -cJf "$D/tritonserver-slim.tar.xz" "${files[@]}" $libs
  rm -rf "$D/tmp"
  echo "packed $(echo "$libs" | wc -l) libraries; $D:"; du -sh "$D"/* | sed 's/^/  /'
)

unpack() {  # in the calling shell (sourced), for its exports
  [ -d "$D" ] || { echo "no $D here: carry it (device run's carry: [\"$D\"])"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/serve-site \
    "$D"/wheels/*.whl || return 1
  export PYTHONPATH=/tmp/serve-site${PYTHONPATH:+:$PYTHONPATH}
  local ver
  ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  python3 -m venv /tmp/triton-env &&
    /tmp/triton-env/bin/python -m pip install -q --no-index --no-deps "$D"/triton-wheels/*.whl &&
    tar -C "/tmp/triton-env/lib/python$ver/site-packages" -xJf "$D/tritonserver-slim.tar.xz" ||
    return 1
  [ -e "/tmp/triton-env/lib/python$ver/site-packages/pytriton/tritonserver/python_backend_stubs/$ver" ] ||
    { echo "the packed stub is not for Python $ver (pack with PYVER=$ver)"; return 1; }
  export KILN_TRITON_ENV=/tmp/triton-env
  echo "PYTHONPATH=$PYTHONPATH KILN_TRITON_ENV=$KILN_TRITON_ENV"
}

case "${1:-}" in
  pack) pack ;;
  unpack) unpack ;;
  *) echo "usage: benchmarks/device_serving_env.sh pack|unpack" >&2; return 2 2>/dev/null || exit 2 ;;
esac
