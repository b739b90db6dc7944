"""Write the quickstart's structure files (geometries only) into examples/quickstart-data/
from the ethanol reference data shipped with bayesal (bayesal.datasets; BAYESAL_SHARED_DATA
or a folder argument overrides).

    python examples/make_quickstart_data.py [DATA_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import ase.io

from bayesal.datasets import write_quickstart_data

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        written = write_quickstart_data(HERE / "quickstart-data", data=data)
    except FileNotFoundError as err:
        sys.exit(str(err))
    for path in written.values():
        print(f"wrote {len(ase.io.read(path, ':'))} structures to {path}")


if __name__ == "__main__":
    main()
