"""Reference DFT data shipped with bayesal: rMD17 ethanol and acetylacetone at 300/600 K
(see ``bayesal/data/reference/README.md`` for levels of theory, licence and citation).

    from bayesal.datasets import reference_dir
    folder = reference_dir()                  # plain extxyz files
    ase.io.read(folder / "ethanol" / "train.xyz", ":")

``write_quickstart_data(folder)`` writes the quickstart's structure files (geometries only).

The files ship gzip-compressed inside the package and are decompressed once into a cache
folder (``$XDG_CACHE_HOME/bayesal`` or ``~/.cache/bayesal``). ``BAYESAL_SHARED_DATA`` names
another folder of the same layout to use instead (bigger or other data sets).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["PACKAGED", "reference_dir", "write_quickstart_data"]

PACKAGED = Path(__file__).resolve().parent / "data" / "reference"


def _packaged_files() -> list[Path]:
    return sorted(PACKAGED.glob("*/*.xyz.gz"))


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bayesal"


def reference_dir(cache: str | Path | None = None) -> Path:
    """A folder ``<molecule>/<name>.xyz`` of the reference data: ``$BAYESAL_SHARED_DATA``
    when set, else the packaged copy decompressed into ``cache`` (default: the user's cache
    folder), each file once and atomically, so concurrent callers never see a partial file.
    """
    env = os.environ.get("BAYESAL_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"BAYESAL_SHARED_DATA={env} is not a folder; unset it to "
                                    "use the reference data shipped with bayesal")
        return path
    files = _packaged_files()
    if not files:
        raise FileNotFoundError(f"no reference data in {PACKAGED}: reinstall bayesal")
    digest = hashlib.sha256("".join(f"{p.parent.name}/{p.name}:{p.stat().st_size}"
                                    for p in files).encode()).hexdigest()[:12]
    root = Path(cache) if cache is not None else _cache_root() / f"reference-{digest}"
    for src in files:
        dest = root / src.parent.name / src.name.removesuffix(".gz")
        if dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return root


def write_quickstart_data(folder: str | Path, *, n_pool: int = 150, n_test: int = 20,
                          data: str | Path | None = None) -> dict[str, Path]:
    """Write ``pool.xyz`` (``n_pool`` ethanol geometries spread over the first 900 rMD17
    training frames) and ``test.xyz`` (``n_test`` spread over the rMD17 test frames) into
    ``folder``, geometries only: a campaign labels them itself. ``data``: a folder of the
    reference layout (default: :func:`reference_dir`)."""
    import ase.io
    from ase import Atoms

    source = Path(data) if data is not None else reference_dir()
    source = source / "ethanol"
    if not (source / "train.xyz").is_file():
        raise FileNotFoundError(f"ethanol data not found in {source}")
    if not (1 <= n_pool <= 900 and 1 <= n_test <= 1000):
        raise ValueError("n_pool must be in 1..900 and n_test in 1..1000")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, path, frames in (("pool", "train.xyz", slice(0, 900, 900 // n_pool)),
                               ("test", "test_MD.xyz", slice(0, 1000, 1000 // n_test))):
        images = [Atoms(a.numbers, a.positions)
                  for a in ase.io.read(source / path, ":")[frames]]
        images = images[:n_pool if name == "pool" else n_test]
        written[name] = out / f"{name}.xyz"
        ase.io.write(written[name], images, format="extxyz")
    return written
