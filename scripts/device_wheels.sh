#!/usr/bin/env bash
# Here, before a GPU lease: pack into .whl/device-site-cp312.tar.xz (git-ignored; name .whl in the device tool's
# carry) the packages the GPU machine lacks for the engine, the phantoms and training, installed for its
# CPython 3.12 on x86-64; scripts/device_env.sh unpacks it there. An archive rather than the wheels: the
# SimpleITK wheel alone is 53 MB of the 64 MiB a call may carry, xz makes all three 32 MB (2-3 min on 2
# cores). nnU-Net (the benchmarks' peer) is not among them: it needs a dozen more packages.
#
#     bash scripts/device_wheels.sh
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python3 -m pip install -q --no-deps --no-compile --target "$staging/site" --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  "SimpleITK==2.5.*" "connected-components-3d==4.1.*" "dynamic-network-architectures==0.4.*"
tar -C "$staging/site" -cf - . | xz -9 -T0 > "$staging/device-site-cp312.tar.xz"
mv "$staging/device-site-cp312.tar.xz" .whl/
du -h .whl/device-site-cp312.tar.xz
