"""MPII (HRNet-style ``annot/{train,valid}.json``) -> WebDataset shards, one sample per person.

    python data_prep/shard_mpii.py --images mpii/images --annotations mpii/annot/valid.json \
        --out data/mpii [--verify]

Joint coordinates in that json are 1-based (MATLAB); the shards hold 0-based coordinates in
our joint order (``pnfs/data/annotations/mpii.py``). See ``pnfs/data/shards/writer.py`` for the layout.
"""

from __future__ import annotations

import sys

from pnfs.data import load_json, read_mpii_persons
from pnfs.data.shards.cli import common_parser, run
from pnfs.errors import run_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)

    def read(skipped, filtered):
        entries = load_json(args.annotations)
        recs = read_mpii_persons(entries, skipped)
        return recs, len(entries) if isinstance(entries, list) else 0

    # MPII boxes (200·scale squares) often reach past the image: keep them as HRNet does.
    return run(args, "mpii", read, clip_box=False, argv=["data_prep/shard_mpii.py", *argv])


if __name__ == "__main__":
    sys.exit(run_main(main, extra=(OSError,)))  # an --out that cannot be written
