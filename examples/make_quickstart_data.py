"""Write the quickstart's structure files (geometries only) from the shared ethanol data.

    python examples/make_quickstart_data.py [SHARED_DATA_DIR]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ase.io
from ase import Atoms

HERE = Path(__file__).resolve().parent


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else
                  os.environ.get("BAYESAL_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
    source = shared / "ethanol"
    if not (source / "train.xyz").is_file():
        sys.exit(f"shared ethanol data not found in {source}; set BAYESAL_SHARED_DATA")
    out = HERE / "quickstart-data"
    out.mkdir(exist_ok=True)
    for name, path, frames in (("pool", "train.xyz", slice(0, 900, 3)),
                               ("test", "test_MD.xyz", slice(0, 1000, 50))):
        images = [Atoms(a.numbers, a.positions) for a in ase.io.read(source / path, ":")[frames]]
        ase.io.write(out / f"{name}.xyz", images, format="extxyz")
        print(f"wrote {len(images)} structures to {out / f'{name}.xyz'}")


if __name__ == "__main__":
    main()
