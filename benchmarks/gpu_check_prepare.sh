#!/usr/bin/env bash
# Preparation of benchmarks/gpu_check.sh, run beforehand on a machine with network: builds the wheelhouse of
# what a stock CUDA PyTorch image lacks (monai, nibabel, pynrrd, albumentations and their needs, jsonargparse,
# a recent timm), for the device's Python and platform, so that the check installs offline, in seconds.
#
#   bash benchmarks/gpu_check_prepare.sh                 # -> .whl/ for CPython 3.12, manylinux x86_64
#   PYVER=3.11 WHEELS=/tmp/wheels bash benchmarks/gpu_check_prepare.sh
#
# then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420).
# Already on such an image: torch, lightning, torchmetrics, tensorboard, opencv-python-headless, scipy,
# scikit-image, pillow, numpy, pyyaml, huggingface-hub, safetensors, torchvision.
# Environment: PY (python with pip, default python3), WHEELS (default .whl), PYVER (the device's Python,
# default 3.12). Exit status 0 only when every package has exactly one wheel in WHEELS.
set -euo pipefail
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
PYVER=${PYVER:-3.12}
PACKAGES=(
    monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    simsimd==6.5.16 stringzilla==5.3.2 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
    importlib-resources==7.1.0 timm==1.0.31
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux1_x86_64)
mkdir -p "$WHEELS"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$WHEELS" "${PACKAGES[@]}"
missing=()
for spec in "${PACKAGES[@]}"; do
    name=${spec%%==*}
    wheel=${name//-/_}-${spec##*==}-
    compgen -G "$WHEELS/${wheel}*.whl" >/dev/null || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check_prepare: no wheel in $WHEELS for: ${missing[*]}" >&2
    exit 1
fi
echo "gpu_check_prepare: $(ls "$WHEELS"/*.whl | wc -l) wheels for CPython $PYVER in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
