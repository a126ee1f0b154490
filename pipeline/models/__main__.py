"""``python -m pipeline.models [CLASS ...]``: which diffusers pipeline classes diffusion-lens drives and how.

Without arguments: the family × mode table (first-class families through the adapter, the native path for any
other text-to-image class), then what is refused and why. With class names: one line per class.
``--update-readme FILE``: writes the table between FILE's ``<!-- family-table -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.models.family import family_table, where_class_runs
from pipeline.models.native import CALL_PARAMETERS, refused_kinds


def main(argv: list[str]) -> int:
    if argv[:1] == ["--update-readme"] and len(argv) == 2:
        path = Path(argv[1])
        text, n = re.subn(
            r"(<!-- family-table -->\n).*?(<!-- /family-table -->)",
            lambda m: m.group(1) + family_table() + "\n" + m.group(2),
            path.read_text(),
            flags=re.S,
        )
        if n != 1:
            print(f"{path}: expected one <!-- family-table --> ... <!-- /family-table --> block, found {n}")
            return 2
        path.write_text(text)
        return 0
    if argv:
        print("\n".join(where_class_runs(name) for name in argv))
        return 0
    print(family_table())
    print(
        "\nThe native path takes any other diffusers class whose __call__ takes "
        + ", ".join(CALL_PARAMETERS)
        + " (generator: one per sample) and requires nothing else."
    )
    print("Refused by name (before any work): " + "; ".join(refused_kinds()) + ".")
    print("Attention and latent mode need a family driver: the native path exposes no single denoiser steps.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
