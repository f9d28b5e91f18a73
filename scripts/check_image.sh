#!/usr/bin/env bash
# One command: build the submission image (podman; no Docker engine needed) and check it as the FLARE
# organisers run it: tests/test_image.py (the literal official command on a phantom case, hardened runs,
# nothing written inside the image, byte code used, the saved image loaded into an empty store and run).
#   bash scripts/check_image.sh [NAME]        # after bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-flare-lesion}
bash scripts/build_image.sh "$NAME" > /dev/null
FLARE_IMAGE=$NAME FLARE_REQUIRE_IMAGE=1 .venv/bin/python -m pytest -q -rA tests/test_image.py
