"""`python -m phantoms` / `flare-phantoms`."""
from __future__ import annotations

import sys
from functools import partial

from flare_common.arguments import OneLineParser, non_negative_int, number, positive_int, program_name

from .case import DEFAULT_HEALTHY_FRACTION, PhantomError
from .writing import write_dataset


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    parser = OneLineParser(
        prog=program_name("phantoms", "flare-phantoms"),
        description="Synthetic whole-body CT phantoms with lesion labels (FLARE layout).")
    parser.add_argument("--out", required=True, help="output folder (images/, labels/, manifest.json)")
    parser.add_argument("--cases", type=non_negative_int, default=None,
                        help="number of phantoms (default 10, or 0 with --flare-sizes)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed: the same seed (and case) gives the same phantom, voxel for voxel; "
                             "models/default was trained on seed 1000, validated on 8 and scored on 7 (default 0)")
    parser.add_argument("--flare-sizes", action="store_true",
                        help="also write the 8 FLARE efficiency cases 512x512x{55,...,554}")
    parser.add_argument("--healthy-fraction", type=partial(number, low=0, high=1), default=DEFAULT_HEALTHY_FRACTION,
                        help="share of cases without lesions (default 0.2)")
    parser.add_argument("--shape", type=positive_int, nargs=3, metavar=("Z", "Y", "X"),
                        help="volume shape of every phantom in voxels (default: a realistic 512 x 512 x N scan, "
                             "N and the spacing drawn per case)")
    parser.add_argument("--spacing", type=partial(number, low=0, low_open=True), nargs=3, metavar=("Z", "Y", "X"),
                        help="voxel spacing in mm (default: drawn per case to cover the body); with --shape, "
                             "a coarse spacing makes small, fast test cases")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = ("example: python -m phantoms --out data/demo --cases 4 --seed 7   "
                     "(images/<case>_0000.nii.gz, labels/<case>.nii.gz, manifest.json with every lesion)")
    args = parser.parse_args(argv)
    cases = args.cases if args.cases is not None else (0 if args.flare_sizes else 10)
    try:
        entries = write_dataset(args.out, cases, args.seed, flare_sizes=args.flare_sizes,
                                healthy_fraction=args.healthy_fraction, shape_zyx=args.shape,
                                spacing_zyx=args.spacing, progress=not args.no_progress)
    except PhantomError as err:
        print(f"phantoms: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"phantoms: {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    lesions = sum(entry["lesion_count"] for entry in entries)
    print(f"phantoms: wrote {len(entries)} cases ({lesions} lesions) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
