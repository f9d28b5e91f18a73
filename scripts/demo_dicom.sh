#!/usr/bin/env bash
# The DICOM path on the embedded default model: a phantom written as a DICOM CT series (one file per slice), predicted
# to a DICOM SEG and to a NIfTI mask, the SEG checked with dciodvfy (where dicom3tools is installed), and the NIfTI
# mask scored and drawn beside the truth. SEED (default 7), DATA (default data/demo_dicom), DEVICE (auto|cpu|cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/demo_dicom}
PY=.venv/bin/python
rm -rf "$DATA"
"$PY" -m phantoms --out "$DATA/phantom" --cases 1 --seed "${SEED:-7}" --healthy-fraction 0 --no-progress
image=$(ls "$DATA"/phantom/images/*_0000.nii.gz)
case=$(basename "$image" _0000.nii.gz)
"$PY" -m phantoms.dicom "$image" "$DATA/series" --patient-id "$case"
"$PY" -m inference -i "$DATA/series" -o "$DATA/seg" --output-format dicom-seg --device "${DEVICE:-auto}"
"$PY" -m inference -i "$DATA/series" -o "$DATA/nifti" --device "${DEVICE:-auto}" --quiet
seg=$(ls "$DATA"/seg/*.dcm)
if command -v dciodvfy > /dev/null; then
  dciodvfy "$seg" > "$DATA/dciodvfy.txt" 2>&1 || true
  echo "dciodvfy: $(grep -c '^Error' "$DATA/dciodvfy.txt" || true) error(s), $(grep -c '^Warning' "$DATA/dciodvfy.txt" || true) warning(s) ($DATA/dciodvfy.txt)"
else
  echo "dciodvfy not installed (apt-get install dicom3tools): the SEG is not validated here"
fi
# the series' case id names the mask: the truth and the CT (for the picture) are named alike to be scored and drawn
series_case=$(basename "$(ls "$DATA"/nifti/*.nii.gz)" .nii.gz)
mkdir -p "$DATA/labels" "$DATA/images"
cp "$DATA/phantom/labels/$case.nii.gz" "$DATA/labels/$series_case.nii.gz"
cp "$image" "$DATA/images/${series_case}_0000.nii.gz"
"$PY" -m evaluation.run_metrics --gt "$DATA/labels" --pred "$DATA/nifti" -o "$DATA/metrics.csv" \
  --images "$DATA/images" --overlays "$DATA/overlays" --no-progress
echo "series: $DATA/series/  SEG: $seg  mask: $DATA/nifti/  pictures: $DATA/overlays/"
