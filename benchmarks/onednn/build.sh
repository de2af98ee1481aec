#!/usr/bin/env bash
# Downloads oneDNN 3.2 (the GNU OpenMP CPU build and its headers, from the package index) into $OUT and compiles
# bn_relu.cpp against it: `make bench-onednn` runs this, then compare.py. oneDNN is used by this benchmark only.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-build/onednn}
VERSION=2023.2.0
mkdir -p "$OUT"
if [[ ! -f "$OUT/lib/libdnnl.so" ]]; then
    "$PY" -m pip download --no-deps -d "$OUT/wheels" "onednn-cpu-gomp==$VERSION" "onednn-devel-cpu-gomp==$VERSION"
    "$PY" - "$OUT" <<'PYEOF'
import pathlib, shutil, sys, zipfile
out = pathlib.Path(sys.argv[1])
for wheel in sorted((out / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out / "unpacked")
for data in (out / "unpacked").glob("*.data/data"):
    for sub in ("lib", "include"):
        if (data / sub).is_dir():
            shutil.copytree(data / sub, out / sub, dirs_exist_ok=True, symlinks=True)
PYEOF
fi
OUT=$(cd "$OUT" && pwd)
g++ -O2 -std=c++17 -fopenmp -I"$OUT/include" benchmarks/onednn/bn_relu.cpp -L"$OUT/lib" -ldnnl \
    -Wl,-rpath,"$OUT/lib" -o "$OUT/bn_relu"
echo "built $OUT/bn_relu"
