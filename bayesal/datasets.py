"""Reference DFT data shipped with bayesal: rMD17 ethanol and acetylacetone at 300/600 K
(see ``bayesal/data/reference/README.md`` for levels of theory, licence and citation).

    from bayesal.datasets import reference_dir
    folder = reference_dir()                  # plain extxyz files
    ase.io.read(folder / "ethanol" / "train.xyz", ":")

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

__all__ = ["PACKAGED", "reference_dir"]

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
