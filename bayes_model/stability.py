"""MD stability: how long a model keeps a molecule physical in hot MD.

A frame is broken when, against the starting structure's covalent bonds (pairs closer than
``bond_scale`` x the sum of their covalent radii):

* a bond is stretched beyond ``stretch_factor`` x its starting length ("bond broken"). A
  hydrogen that moved to another heavy atom (a proton transfer, e.g. acetylacetone's enol
  proton hopping to the other oxygen: chemistry, not a breakdown) is still bonded: its bond
  counts as broken only when the hydrogen is also beyond ``stretch_factor`` x the sum of
  covalent radii from every other heavy atom;
* two atoms come closer than ``close_factor`` x the sum of their covalent radii ("atoms too
  close"), or a position is not finite;
* the potential energy per atom moved more than ``max_energy_per_atom`` eV from the first
  frame's, or is not finite ("energy blew up").

:func:`first_break` finds the first broken frame of a trajectory; :func:`time_to_break`
runs Langevin MD with a posterior's mean forces until the first broken frame (or the end)
and says when. A model that stays physical for longer at 1000 K has learnt the repulsive
walls and the bond stretches, not just the frames near equilibrium.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import covalent_radii

__all__ = ["BondReference", "Break", "StabilityRule", "first_break", "time_to_break",
           "times_to_break"]


@dataclass(frozen=True)
class StabilityRule:
    stretch_factor: float = 1.5  # a bond longer than this x its starting length is broken
    close_factor: float = 0.5  # closer than this x the sum of covalent radii: too close
    bond_scale: float = 1.2  # bonded: closer than this x the sum of covalent radii
    max_energy_per_atom: float = 1.0  # eV per atom away from the first frame


@dataclass(frozen=True)
class Break:
    frame: int  # the first broken frame's index (time_to_break: its MD step); -1: none
    reason: str  # "" when none
    time_fs: float | None = None  # with time_to_break: MD time of that frame (or run length)

    @property
    def broken(self) -> bool:
        return self.frame >= 0


def _radii_sum(numbers: np.ndarray) -> np.ndarray:
    r = covalent_radii[numbers]
    return r[:, None] + r[None, :]


def _distances(positions: np.ndarray) -> np.ndarray:
    return np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)


def bonds_of(atoms: Atoms, rule: StabilityRule = StabilityRule()) -> np.ndarray:
    """(i, j) pairs (i < j) bonded in ``atoms``: closer than bond_scale x radii sum."""
    d = _distances(atoms.positions)
    i, j = np.nonzero(np.triu(d < rule.bond_scale * _radii_sum(atoms.numbers), k=1))
    return np.stack([i, j], axis=1)


@dataclass(frozen=True)
class BondReference:
    """A starting structure's covalent bonds (``pairs``, from :func:`bonds_of`) and their
    lengths there, computed once and checked against every later frame.

    Periodic structures (``pbc`` in any direction) bond across the cell's faces: a bond is
    then atom ``i`` to the image of ``j`` ``shifts`` cells away, found with a neighbour list
    (linear in the atoms), and ``vectors`` holds its vector in the starting structure. A
    later frame's bond vector is the start's plus its change reduced to the minimum image,
    so atoms wrapped back into the cell (by MD codes or by a user) do not read as broken
    bonds."""
    pairs: np.ndarray  # (n_bonds, 2) atom indices, i < j (periodic: i <= j)
    lengths: np.ndarray  # (n_bonds,) Å in the starting structure
    shifts: np.ndarray | None = None  # periodic: (n_bonds, 3) cell shifts of j's image
    vectors: np.ndarray | None = None  # periodic: (n_bonds, 3) bond vectors at the start

    @classmethod
    def of(cls, atoms: Atoms, rule: StabilityRule = StabilityRule()) -> BondReference:
        if atoms.pbc.any():
            return cls._periodic(atoms, rule)
        pairs = bonds_of(atoms, rule)
        lengths = np.linalg.norm(atoms.positions[pairs[:, 1]] - atoms.positions[pairs[:, 0]],
                                 axis=-1)
        return cls(pairs, lengths)

    @classmethod
    def _periodic(cls, atoms: Atoms, rule: StabilityRule) -> BondReference:
        from ase.neighborlist import neighbor_list

        i, j, shift, vec = neighbor_list("ijSD", atoms, _cutoffs(atoms, rule.bond_scale),
                                         self_interaction=False)
        # each bond once: i < j, or an atom bonded to its own image (one of the two signs)
        keep = (i < j) | ((i == j) & _positive(shift))
        pairs = np.stack([i[keep], j[keep]], axis=1)
        vectors = vec[keep]
        return cls(pairs, np.linalg.norm(vectors, axis=-1), shift[keep], vectors)

    def now(self, frame: Atoms) -> np.ndarray:
        """The bonds' lengths in ``frame`` (Å)."""
        pos = frame.positions
        vec = pos[self.pairs[:, 1]] - pos[self.pairs[:, 0]]
        if self.shifts is None:
            return np.linalg.norm(vec, axis=-1)
        from ase.geometry import find_mic

        vec = vec + self.shifts @ frame.cell.array
        change, _ = find_mic(vec - self.vectors, frame.cell, frame.pbc)
        return np.linalg.norm(self.vectors + change, axis=-1)


def _positive(shift: np.ndarray) -> np.ndarray:
    """Per row: the first non-zero component is positive (one of +S and -S)."""
    first = np.argmax(shift != 0, axis=1)
    return shift[np.arange(len(shift)), first] > 0


def _cutoffs(atoms: Atoms, scale: float) -> np.ndarray:
    """Per-atom radii for ase's neighbour list: a pair is found when closer than the sum of
    its two radii, here ``scale`` x the sum of their covalent radii."""
    return scale * covalent_radii[atoms.numbers]


def _rebonded_hydrogens(numbers: np.ndarray, bonds: np.ndarray, d: np.ndarray,
                        rule: StabilityRule) -> np.ndarray:
    """Per bond: one end is a hydrogen now within stretch_factor x the covalent radii sum of
    a heavy atom other than its partner (it moved there: a proton transfer)."""
    heavy = numbers > 1
    near = (d < rule.stretch_factor * _radii_sum(numbers)) & heavy[None, :]
    out = np.zeros(len(bonds), dtype=bool)
    for k, (i, j) in enumerate(bonds):
        for h, partner in ((i, j), (j, i)):
            if numbers[h] == 1:
                others = near[h].copy()
                others[partner] = False
                out[k] |= bool(others.any())
    return out


def check_frame(reference: BondReference, frame: Atoms, energy0: float | None,
                energy: float | None, rule: StabilityRule = StabilityRule()) -> str:
    """Why ``frame`` is broken against the starting structure's bonds ("" when it is not).
    Periodic frames (``reference`` built from a periodic start) are judged with their
    images: neighbour lists instead of all pairwise distances."""
    pos = frame.positions
    if not np.isfinite(pos).all():
        return "positions not finite"
    n = len(frame)
    periodic = reference.shifts is not None
    if periodic:
        near = _Near(frame, rule)
        found = near.pair(rule.close_factor)
    else:
        d = _distances(pos)
        close = d < rule.close_factor * _radii_sum(frame.numbers)
        close[np.arange(n), np.arange(n)] = False
        found = (*np.argwhere(close)[0], None) if close.any() else None
    if found is not None:
        i, j, dist = found
        dist = d[i, j] if dist is None else dist
        return f"atoms {i} and {j} too close ({dist:.2f} Å)"
    bonds, ref = reference.pairs, reference.lengths
    if len(bonds):
        now = reference.now(frame)
        over = now > rule.stretch_factor * ref
        if over.any():
            over &= ~(near.rebonded_hydrogens(bonds) if periodic else
                      _rebonded_hydrogens(frame.numbers, bonds, d, rule))
        if over.any():
            k = int(np.argmax(np.where(over, now / ref, 0.0)))
            i, j = bonds[k]
            return (f"bond {i}-{j} broken ({now[k]:.2f} Å, {now[k] / ref[k]:.2f}x its "
                    f"{ref[k]:.2f} Å)")
    if energy is not None:
        if not np.isfinite(energy):
            return "energy not finite"
        if energy0 is not None and abs(energy - energy0) / n > rule.max_energy_per_atom:
            return (f"energy blew up ({(energy - energy0) / n:+.2f} eV/atom from the first "
                    "frame)")
    return ""


class _Near:
    """A periodic frame's close pairs, from ase's neighbour list (images included)."""

    def __init__(self, frame: Atoms, rule: StabilityRule):
        self.frame, self.rule = frame, rule

    def pair(self, factor: float) -> tuple[int, int, float] | None:
        """The first pair closer than ``factor`` x its covalent radii sum, or None."""
        from ase.neighborlist import neighbor_list

        i, j, d = neighbor_list("ijd", self.frame, _cutoffs(self.frame, factor),
                                self_interaction=False)
        if not len(i):
            return None
        k = int(np.lexsort((j, i))[0])
        return int(min(i[k], j[k])), int(max(i[k], j[k])), float(d[k])

    def rebonded_hydrogens(self, bonds: np.ndarray) -> np.ndarray:
        """:func:`_rebonded_hydrogens` with images: per bond, a hydrogen end within
        stretch_factor x the radii sum of a heavy atom other than its partner."""
        from ase.neighborlist import neighbor_list

        numbers = self.frame.numbers
        i, j = neighbor_list("ij", self.frame, _cutoffs(self.frame, self.rule.stretch_factor),
                             self_interaction=False)
        heavy_near = {}  # hydrogen -> the heavy atoms near it
        for a, b in zip(i, j, strict=True):
            if numbers[a] == 1 and numbers[b] > 1:
                heavy_near.setdefault(int(a), set()).add(int(b))
        out = np.zeros(len(bonds), dtype=bool)
        for k, (a, b) in enumerate(bonds):
            for h, partner in ((a, b), (b, a)):
                if numbers[h] == 1:
                    out[k] |= bool(heavy_near.get(int(h), set()) - {int(partner)})
        return out


def first_break(frames: Sequence[Atoms], energies: Sequence[float] | None = None, *,
                rule: StabilityRule = StabilityRule()) -> Break:
    """The first broken frame of a trajectory (bonds and distances judged against frame 0;
    energies, when given, against the first one)."""
    if not frames:
        return Break(-1, "")
    reference = BondReference.of(frames[0], rule)
    e0 = None if energies is None else float(energies[0])
    for k, frame in enumerate(frames):
        reason = check_frame(reference, frame, e0,
                             None if energies is None else float(energies[k]), rule)
        if reason:
            return Break(k, reason)
    return Break(-1, "")


def time_to_break(posterior, start: Atoms, *, temperature_K: float = 1000.0,
                  steps: int = 2000, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
                  check_every: int = 10, seed: int = 0,
                  rule: StabilityRule = StabilityRule()) -> Break:
    """Langevin MD from ``start`` with the posterior's mean forces, checked every
    ``check_every`` steps; the first broken frame's MD time (``time_fs``), or the whole
    run's when none broke (``frame`` -1)."""
    (out,) = times_to_break(posterior, start, seeds=[seed], temperature_K=temperature_K,
                            steps=steps, timestep_fs=timestep_fs,
                            friction_per_fs=friction_per_fs, check_every=check_every,
                            rule=rule)
    return out


def times_to_break(posterior, start: Atoms, *, seeds: Sequence[int],
                   temperature_K: float = 1000.0, steps: int = 2000, timestep_fs: float = 0.5,
                   friction_per_fs: float = 0.01, check_every: int = 10,
                   rule: StabilityRule = StabilityRule()) -> list[Break]:
    """:func:`time_to_break` for each of ``seeds`` (the Langevin generator's seed), the
    trajectories run together (one model call per step for all of them); each is the one
    ``time_to_break`` runs alone with that seed."""
    from bayesal.bayes_model.explore import Replicas

    reference = Atoms(numbers=start.numbers, positions=start.positions, cell=start.cell,
                      pbc=start.pbc)
    bonds = BondReference.of(reference, rule)
    md = Replicas(posterior, [reference] * len(seeds), [temperature_K] * len(seeds),
                  [np.random.default_rng(s) for s in seeds], timestep_fs=timestep_fs,
                  friction_per_fs=friction_per_fs)
    e0 = [r.get("energy") for r in md.results]
    out: dict[int, Break] = {}
    for step in range(check_every, steps + 1, check_every):
        active = [k for k in range(len(seeds)) if k not in out]
        if not active:
            break
        for _ in range(check_every):
            md.step(active)
        for k in active:
            if md.failed[k]:
                out[k] = Break(step, md.failed[k], step * timestep_fs)
            elif reason := check_frame(bonds, md.atoms[k], e0[k],
                                       float(md.results[k]["energy"]), rule):
                out[k] = Break(step, reason, step * timestep_fs)
    return [out.get(k, Break(-1, "", steps * timestep_fs)) for k in range(len(seeds))]
