#!/usr/bin/env bash
# Create .venv-bench at the repository root with the peer U-Nets used by benchmarks/train_step.py:
# torch 2.13.0 (CPU wheel), torchvision 0.28.0, imagen-pytorch 2.1.0, diffusers 0.42.1, then cascade itself
# (editable).
# The peers never enter the project's own dependencies. Safe to re-run.
#
#   bash benchmarks/setup_peers.sh            # then: .venv-bench/bin/python benchmarks/train_step.py
#
# Environment: PYTHON (default python3), VENV (default <repo>/.venv-bench).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$repo/.venv-bench}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

# torch first, alone, so pip picks the CPU wheel; then pin it for everything that follows.
"$py" -m pip install --quiet torch==2.13.0
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"
"$py" -m pip install --quiet -c "$constraints" torchvision==0.28.0 imagen-pytorch==2.1.0 diffusers==0.42.1

# The PyPI torchvision wheel is a CUDA build whose compiled ops do not load against the CPU torch wheel, and its
# fake-kernel registrations for torchvision::nms / qnms then fail at import ("operator torchvision::nms does not
# exist", pytorch/vision#9085), which breaks `import imagen_pytorch` and `import diffusers`. Register those fakes
# only when the compiled ops loaded. No peer U-Net uses torchvision ops.
"$py" - <<'PY'
import importlib.util
import pathlib
import re
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit("setup_peers: torchvision is not installed in this venv")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
guard = "torchvision.extension._has_ops()"
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$', re.M)
hits = pattern.findall(src)
if not hits:
    if src.count(guard) >= 2:
        print(f"setup_peers: {path} already patched")
        sys.exit(0)
    sys.exit(f"setup_peers: no torchvision::nms/qnms register_fake decorator found in {path}; "
          "the workaround no longer applies as written, inspect the file")
if sorted(hits) != ["nms", "qnms"]:
    sys.exit(f"setup_peers: expected the nms and qnms decorators in {path}, found {hits}")
identity = "(lambda fn: fn)"
src = pattern.sub(
    lambda m: f'@(torch.library.register_fake("torchvision::{m.group(1)}") '
              f'if {guard} else {identity})',
    src,
)
if "import torchvision.extension" not in src:
    src = "import torchvision.extension\n" + src
path.write_text(src)
print(f"setup_peers: patched {path} ({', '.join(hits)})")
PY
# `import imagen_pytorch` reaches the Hugging Face hub at import time (a default argument of Unet3D reads a T5
# config); train_step.py imports it with a shim, so check only that torchvision imports and the package is there.
"$py" -c "import importlib.util, torchvision; assert importlib.util.find_spec('imagen_pytorch')" \
    || { echo "setup_peers: torchvision or imagen_pytorch is not importable" >&2; exit 1; }
HF_HUB_OFFLINE=1 "$py" -c "from diffusers import UNet3DConditionModel" \
    || { echo "setup_peers: diffusers' UNet3DConditionModel is not importable" >&2; exit 1; }

# The project itself, editable, without letting pip move torch.
if [[ ! -f "$repo/pyproject.toml" ]]; then
    echo "setup_peers: $repo/pyproject.toml is missing; cannot install cascade" >&2
    exit 1
fi
"$py" -m pip install --quiet -c "$constraints" -e "$repo"
"$py" -c "import torch, torchvision, cascade; print('setup_peers: ok, torch', torch.__version__, \
'torchvision', torchvision.__version__)"
