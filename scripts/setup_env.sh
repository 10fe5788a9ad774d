#!/usr/bin/env bash
# Create (or update) .venv with everything VoxelSplat needs. Idempotent: when
# the environment already matches scripts/*.txt and this script, it returns in
# about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VOXELSPLAT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.voxelsplat-env-stamp"
D2_VERSION="0.6"

# The stamp is the hash of the recipe; any change to it re-runs the install.
recipe_hash() {
  cat "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/constraints.txt" \
      "$ROOT/scripts/requirements.txt" "$ROOT/scripts/patch_detectron2_sdist.py" \
      "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}
WANT="$(recipe_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import detectron2, torch, nuscenes, voxelsplat" 2>/dev/null; then
  echo "[setup_env] $VENV is up to date"
  exit 0
fi

echo "[setup_env] preparing $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first: detectron2's setup.py imports it.
$PIP install -q -c "$ROOT/scripts/constraints.txt" torch torchvision
$PIP install -q -c "$ROOT/scripts/constraints.txt" -r "$ROOT/scripts/requirements.txt"

D2_STAMP="$VENV/.detectron2-patch-stamp"
D2_WANT="$(sha256sum "$ROOT/scripts/patch_detectron2_sdist.py" | cut -d' ' -f1)"
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null || [[ "$(cat "$D2_STAMP" 2>/dev/null)" != "$D2_WANT" ]]; then
  echo "[setup_env] installing detectron2 $D2_VERSION as pure Python"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  $PIP download -q --no-deps --no-build-isolation --no-binary :all: \
      -d "$WORK" "pb1-detectron2==$D2_VERSION"
  tar -xzf "$WORK"/pb1-detectron2-"$D2_VERSION".tar.gz -C "$WORK"
  "$VENV/bin/python" "$ROOT/scripts/patch_detectron2_sdist.py" "$WORK/pb1-detectron2-$D2_VERSION"
  # --no-deps: its install_requires pins black==21.4b2 and pulls caffe2-era tools;
  # the dependencies it really needs are in requirements.txt.
  $PIP install -q --no-deps --no-build-isolation --force-reinstall "$WORK/pb1-detectron2-$D2_VERSION"
  echo "$D2_WANT" > "$D2_STAMP"
fi

$PIP install -q --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import detectron2.config, detectron2.engine, detectron2.data, detectron2.evaluation  # noqa: F401
import nuscenes, timm, torch, torchvision, gsplat, voxelsplat  # noqa: F401
print(f"[setup_env] torch {torch.__version__}, detectron2 {detectron2.__version__}, voxelsplat ok")
# build the C kernels once (ray walk of the evaluation, CPU rasterizer of the splatting losses)
from voxelsplat.evaluation.native import ray_walk_library
from voxelsplat.splatting import resolve_backend
print("[setup_env] RayIoU ray walk: " + ("compiled C" if ray_walk_library() else "PyTorch (no C compiler found)"))
print(f"[setup_env] CPU rasterization backend: {resolve_backend('auto', torch.device('cpu'))}")
PY
echo "$WANT" > "$STAMP"
