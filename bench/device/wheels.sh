#!/usr/bin/env bash
# The wheels bench/device_check.sh needs on the device machine, downloaded here into .whl/ (git-ignored; name
# it in the device call's `carry`). The device image (python 3.12; its packages are listed in the device
# tool's KINDS.md) has torch, transformers, huggingface-hub, xxhash and safetensors but not sparsify: the list
# below is eai-sparsify 1.3.3's dependency closure in bench/.venvs/sae-peers less the image's packages, at the
# versions the peer venv holds. gpu_train_bench.sh installs each wheel whose distribution the image lacks
# into /tmp/site and skips the rest, so a wheel too many costs nothing.
#
#   bash bench/device/wheels.sh            # 4.2 MB; then: run(command="OUT=$OUT bash bench/device_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/../.."
PACKAGES=(
    eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0 schedulefree==1.4.1
    simple-parsing==0.1.9 docstring-parser==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 tzdata==2026.6
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
# into a fresh folder, then renamed: a failed download leaves .whl/ as it was, and no second version of a
# package (two stop the device's install) is left beside the new one
tmp=$(mktemp -d .whl.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$tmp" "${PACKAGES[@]}" || { echo "wheels.sh: pip download failed (is PyPI reachable?); .whl/ unchanged" >&2; exit 1; }
rm -rf .whl && mv "$tmp" .whl
ls .whl
du -sh .whl
