"""Reading structure files frame by frame, with validation that names file, frame and field."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from bayesal.db.identity import MIN_DISTANCE, closest_pair, closest_pairs

__all__ = [
    "Frame",
    "InputError",
    "InputIssue",
    "check_distances",
    "check_files",
    "count_frames",
    "iter_frames",
    "validate_frame",
]

# Keys under which ASE (>= 3.23) and common MLIP files keep labels when no key is given.
ENERGY_KEYS = ("energy", "REF_energy", "free_energy")
FORCES_KEYS = ("forces", "REF_forces")


@dataclass(frozen=True)
class InputIssue:
    """One problem with an input file."""

    file: str
    frame: int | None  # 0-based frame index, None for the file as a whole
    field: str | None  # "positions", "energy", "forces", "numbers", ...
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.frame is not None:
            where += f", frame {self.frame}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class InputError(ValueError):
    """Bad input; nothing was written. ``issues`` lists every problem found."""

    max_listed = 20

    def __init__(self, issues: list[InputIssue]) -> None:
        self.issues = list(issues)
        shown = [f"  - {issue}" for issue in self.issues[: self.max_listed]]
        if len(self.issues) > self.max_listed:
            shown.append(f"  ... and {len(self.issues) - self.max_listed} more")
        n = len(self.issues)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in the input; nothing was written:\n"
            + "\n".join(shown)
        )


@dataclass
class Frame:
    """A frame read from a file, with its label when one was asked for."""

    file: str
    index: int
    atoms: Atoms
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n_atoms, 3) eV/Å


def _lookup(atoms: Atoms, keys: tuple[str, ...], where: str):
    results = getattr(atoms.calc, "results", None) or {}
    store = atoms.info if where == "info" else atoms.arrays
    for key in keys:
        if key in results:
            return results[key]
        if key in store:
            return store[key]
    return None


def validate_frame(
    file: str,
    index: int,
    atoms: Atoms,
    *,
    labelled: bool = False,
    energy_key: str | None = None,
    forces_key: str | None = None,
    check_distances: bool = True,
    forces_optional: bool = False,
) -> tuple[Frame | None, list[InputIssue]]:
    """Check one frame; returns the frame (with its label) or the list of issues.

    ``check_distances=False`` skips the too-close-atoms check, for callers that run it on
    a whole batch at once (:func:`check_distances`). ``forces_optional``: a labelled frame
    may carry its energy alone (test sets of reaction paths and scans); its forces are then
    None.
    """

    def issue(field: str | None, message: str) -> InputIssue:
        return InputIssue(file, index, field, message)

    issues: list[InputIssue] = []
    n = len(atoms)
    if n == 0:
        return None, [issue("numbers", "the structure has no atoms")]
    numbers, positions = atoms.numbers, atoms.positions
    if numbers.min() <= 0 or numbers.max() > 118:
        k = int(np.flatnonzero((numbers <= 0) | (numbers > 118))[0])
        issues.append(issue("numbers", f"unknown element (atomic number {numbers[k]}) at "
                            f"atom {k}; use real chemical symbols"))
    if not np.isfinite(positions).all():
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        issues.append(issue("positions", f"non-finite (NaN/inf) position at atom {bad[0]}"
                            f" ({bad.size} atom{'s' if bad.size > 1 else ''} affected)"))
    if not np.isfinite(atoms.cell.array).all():
        issues.append(issue("cell", "non-finite (NaN/inf) lattice vectors"))
    if check_distances and not issues:
        pair = closest_pair(atoms)
        if pair is not None:
            i, j, d = pair
            issues.append(issue("positions", f"atoms {i} and {j} are {d:.4f} Å apart "
                                f"(< {MIN_DISTANCE} Å); the geometry is broken"))
    energy = forces = None
    if labelled:
        e_keys = (energy_key,) if energy_key else ENERGY_KEYS
        f_keys = (forces_key,) if forces_key else FORCES_KEYS
        raw_e = _lookup(atoms, e_keys, "info")
        raw_f = _lookup(atoms, f_keys, "arrays")
        if raw_e is None:
            issues.append(issue(e_keys[0], f"no energy (looked for {', '.join(e_keys)}); "
                                "import without --labelled or name the key with --energy-key"))
        else:
            try:
                energy = float(raw_e)
            except (TypeError, ValueError):
                issues.append(issue(e_keys[0], f"energy {raw_e!r} is not a number"))
            else:
                if not math.isfinite(energy):
                    issues.append(issue(e_keys[0], f"energy is {energy}"))
        if raw_f is None and n == 1 and not atoms.pbc.any():
            forces = np.zeros((1, 3))  # an isolated atom feels no force
        elif raw_f is None and forces_optional:
            forces = None
        elif raw_f is None:
            issues.append(issue(f_keys[0], f"no forces (looked for {', '.join(f_keys)}); "
                                "import without --labelled or name the key with --forces-key"))
        else:
            forces = np.asarray(raw_f, dtype=float)
            if forces.shape != (n, 3):
                issues.append(issue(f_keys[0], f"forces have shape {forces.shape}, expected "
                                    f"({n}, 3) for {n} atoms"))
            elif not np.isfinite(forces).all():
                issues.append(issue(f_keys[0], "non-finite (NaN/inf) forces"))
    if issues:
        return None, issues
    return Frame(file, index, atoms, energy, forces), []


def _too_close(file: str, index: int, pair: tuple[int, int, float]) -> InputIssue:
    i, j, d = pair
    return InputIssue(file, index, "positions", f"atoms {i} and {j} are {d:.4f} Å apart "
                      f"(< {MIN_DISTANCE} Å); the geometry is broken")


def check_distances(frames: list[Frame]) -> tuple[list[Frame], list[InputIssue]]:
    """Batch too-close-atoms check: the frames that pass and the issues of those that fail."""
    pairs = closest_pairs([f.atoms for f in frames])
    good = [f for f, p in zip(frames, pairs, strict=True) if p is None]
    bad = [_too_close(f.file, f.index, p) for f, p in zip(frames, pairs, strict=True)
           if p is not None]
    return good, bad


def check_files(paths, *, labelled: bool = False) -> int:
    """Validate every frame of ``paths`` without storing anything; raise :class:`InputError`
    listing every problem (file, frame, field). Returns the number of frames."""
    n, issues = 0, []
    for path in paths:
        for item in iter_frames(path, labelled=labelled):
            if isinstance(item, InputIssue):
                issues.append(item)
            else:
                n += 1
    if issues:
        raise InputError(issues)
    return n


def _xyz_frame_at_fault(path: str) -> int:
    """The first frame of an (ext)xyz file whose atom-count line or atom lines are missing
    or malformed (0 when it cannot tell)."""
    k = 0
    with open(path, errors="replace") as fh:
        while line := fh.readline():
            if not line.strip():
                continue  # blank lines between or after frames
            try:
                n = int(line.split()[0])
            except ValueError:
                return k
            fh.readline()  # comment / properties line
            for _ in range(n):
                if len(fh.readline().split()) < 4:
                    return k
            k += 1
    return 0


def count_frames(paths: Sequence[str | Path]) -> int | None:
    """Frames in (ext)xyz files, counted from their atom-count lines without parsing the
    frames (a progress bar's total; ~10x faster than reading them). None when a file is of
    another format or not plain xyz-shaped: the total is then unknown, not wrong."""
    total = 0
    for path in paths:
        path = Path(path)
        if path.suffix.lower() not in (".xyz", ".extxyz") or not path.is_file():
            return None
        try:
            with open(path, errors="replace") as fh:
                while header := fh.readline():
                    if not header.strip():
                        continue
                    n = int(header)
                    for _ in range(n + 1):
                        if not fh.readline():
                            return None
                    total += 1
        except (ValueError, OSError):
            return None
    return total


def iter_frames(
    path: str | Path,
    *,
    labelled: bool = False,
    energy_key: str | None = None,
    forces_key: str | None = None,
    format: str | None = None,
    distances: bool = True,
    forces_optional: bool = False,
) -> Iterator[Frame | InputIssue]:
    """Yield validated frames of a file, or the issues of frames that fail validation.

    A file that cannot be parsed yields one issue naming the frame where parsing stopped
    and ends there. ``distances=False`` leaves the too-close-atoms check to the caller
    (:func:`check_distances` on batches); ``forces_optional``: see :func:`validate_frame`.
    """
    name = str(path)
    if not Path(path).is_file():
        yield InputIssue(name, None, None, "file not found")
        return
    index = 0
    try:
        for atoms in ase.io.iread(name, index=":", format=format):
            frame, issues = validate_frame(name, index, atoms, labelled=labelled,
                                           energy_key=energy_key, forces_key=forces_key,
                                           check_distances=distances,
                                           forces_optional=forces_optional)
            if frame is not None:
                yield frame
            yield from issues
            index += 1
    except KeyError as exc:  # ASE raises KeyError('Xx') for an unknown chemical symbol
        yield InputIssue(name, index, "species", f"unknown element symbol {exc.args[0]!r}")
        return
    except Exception as exc:
        kind = type(exc).__name__
        if index == 0 and (format or Path(name).suffix.lstrip(".")) in ("xyz", "extxyz"):
            index = _xyz_frame_at_fault(name)  # ASE scans the whole file before frame 0
        yield InputIssue(name, index, None, f"cannot parse the file here ({kind}: {exc}); "
                         "is it a valid extxyz (or other ASE-readable) file?")
        return
    if index == 0:
        yield InputIssue(name, None, None, "no frames in the file")
