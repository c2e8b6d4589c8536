#!/usr/bin/env bash
# Wheels that tools/gpu_check.sh installs on the lent GPU machine (Python 3.12, torch 2.11 + CUDA 13,
# no package access): bitsandbytes and platformdirs, which that machine lacks, and the transformers
# and peft versions CI tests with (that machine has transformers 5.17; gpu_check.sh falls back to it
# if the carried one does not import there). The bitsandbytes wheel
# is repacked with only its CPU and CUDA 13.x libraries (7 MiB instead of 41 MiB), because the
# working tree that travels to that machine, these wheels included, must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl bitsandbytes==0.50.2 platformdirs==4.14.9 transformers==5.24.0 peft==0.21.2
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD"/.whl/bitsandbytes-*.whl \
  && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so bitsandbytes/libbitsandbytes_rocm*.so bitsandbytes/libbitsandbytes_xpu*.so \
  && grep -v -E 'libbitsandbytes_(cuda1[12]|rocm|xpu)' bitsandbytes-*.dist-info/RECORD > R \
  && mv R bitsandbytes-*.dist-info/RECORD && ls bitsandbytes/*.so)
whl=$(ls .whl/bitsandbytes-*.whl) && rm "$whl" && (cd "$tmp" && zip -q -r "$OLDPWD/$whl" .) && rm -rf "$tmp"
du -sh .whl
