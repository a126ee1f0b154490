"""``python -m pipeline.data.shapes.export DIR --n 64 [--split test] [--seed 0] [--size 32]``: the shapes dataset
as an image folder (images, ``captions.jsonl``, ``masks/`` + ``objects.jsonl``; :func:`pipeline.data.shapes.export`),
to use as ``dataset=folder dataset.root=DIR`` or to look at."""

from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.data.shapes.dataset import SPLITS, ShapesDataset
from pipeline.data.shapes.write import export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.shapes.export", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write (created if absent)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--split", choices=list(SPLITS), default="test", help="split (default test)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dataset = ShapesDataset(split=args.split, n=args.n, seed=args.seed, size=args.size)
    except ValueError as e:
        _parser().error(str(e))
    folder = export(dataset, args.folder)
    print(
        f"wrote {len(dataset)} {args.size}x{args.size} shapes images ({args.split} split, seed {args.seed}) to "
        f"{folder}: captions.jsonl, objects.jsonl and {len(list((folder / 'masks').glob('*.png')))} masks in masks/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
