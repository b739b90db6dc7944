"""Write the quickstart's structure files (geometries only) from the ethanol reference data
shipped with bayesal (bayesal.datasets; BAYESAL_SHARED_DATA or a folder argument overrides).

    python examples/make_quickstart_data.py [DATA_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import ase.io
from ase import Atoms

from bayesal.datasets import reference_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else reference_dir()
    source = data / "ethanol"
    if not (source / "train.xyz").is_file():
        sys.exit(f"ethanol data not found in {source}")
    out = HERE / "quickstart-data"
    out.mkdir(exist_ok=True)
    for name, path, frames in (("pool", "train.xyz", slice(0, 900, 3)),
                               ("test", "test_MD.xyz", slice(0, 1000, 50))):
        images = [Atoms(a.numbers, a.positions) for a in ase.io.read(source / path, ":")[frames]]
        ase.io.write(out / f"{name}.xyz", images, format="extxyz")
        print(f"wrote {len(images)} structures to {out / f'{name}.xyz'}")


if __name__ == "__main__":
    main()
