"""From ASE ``Atoms`` to graph batches; per-species energy shifts.

A graph holds species indices, positions and the edges within the cutoff (vesin neighbour
lists, periodic images as Cartesian shifts). Graphs of different sizes batch by
concatenation with offset edge indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from bayesal.bayes_model import _keys as K

__all__ = [
    "Graph",
    "SpeciesError",
    "atoms_to_graph",
    "batch_graphs",
    "energy_shifts_from_isolated",
    "energy_shifts_least_squares",
    "energy_shifts_with_isolated",
    "iter_batches",
    "labels_of",
]


class SpeciesError(ValueError):
    """A structure contains an element the model was not trained on."""


@dataclass
class Graph:
    """One structure as numpy arrays (converted to tensors when batched)."""

    species: np.ndarray  # (n,) int
    positions: np.ndarray  # (n, 3) Å
    edge_index: np.ndarray  # (2, e) int
    edge_shift: np.ndarray  # (e, 3) Å
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n, 3) eV/Å
    volume: float = 0.0  # Å³ when periodic in all three directions (stress), else 0

    @property
    def n_atoms(self) -> int:
        return len(self.species)


def species_index(numbers: np.ndarray, species: Sequence[int]) -> np.ndarray:
    """Map atomic numbers to indices into ``species``; unknown elements raise."""
    table = np.full(119, -1, dtype=np.int64)
    table[np.asarray(species)] = np.arange(len(species))
    idx = table[numbers]
    if (idx < 0).any():
        unknown = sorted({chemical_symbols[z] for z in numbers[idx < 0]})
        known = ", ".join(chemical_symbols[z] for z in species)
        raise SpeciesError(f"element(s) {', '.join(unknown)} not in the model's species "
                           f"({known}); retrain with data that contains them")
    return idx


def labels_of(atoms: Atoms) -> tuple[float | None, np.ndarray | None]:
    """Energy (eV) and forces (eV/Å) stored with ``atoms`` (calculator, info or arrays)."""
    results = getattr(atoms.calc, "results", None) or {}
    energy = results.get("energy", atoms.info.get("energy", atoms.info.get("REF_energy")))
    forces = results.get("forces", atoms.arrays.get("forces", atoms.arrays.get("REF_forces")))
    if forces is None and energy is not None and len(atoms) == 1:
        forces = np.zeros((1, 3))
    return (None if energy is None else float(energy),
            None if forces is None else np.asarray(forces, dtype=float))


def atoms_to_graph(atoms: Atoms, species: Sequence[int], cutoff: float,
                   *, with_labels: bool = True) -> Graph:
    """Graph of ``atoms``: edges i<-j for every neighbour j within ``cutoff`` Å."""
    from vesin import NeighborList

    pbc = np.asarray(atoms.pbc, dtype=bool)
    box = atoms.cell.array if pbc.any() else np.zeros((3, 3))
    if len(atoms) > 1 or pbc.any():
        i, j, s = NeighborList(cutoff=cutoff, full_list=True).compute(
            points=atoms.positions, box=box, periodic=pbc.tolist() if pbc.any() else False,
            quantities="ijS")
        edge_index = np.stack([i.astype(np.int64), j.astype(np.int64)])
        edge_shift = s.astype(np.float64) @ box
    else:
        edge_index = np.zeros((2, 0), dtype=np.int64)
        edge_shift = np.zeros((0, 3))
    energy, forces = labels_of(atoms) if with_labels else (None, None)
    volume = float(abs(np.linalg.det(box))) if pbc.all() else 0.0
    return Graph(species=species_index(atoms.numbers, species), positions=atoms.positions.copy(),
                 edge_index=edge_index, edge_shift=edge_shift, energy=energy, forces=forces,
                 volume=volume)


def batch_graphs(graphs: Sequence[Graph], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Concatenate graphs into one batch dict (keys in :mod:`bayes_model._keys`)."""
    n = np.array([g.n_atoms for g in graphs])
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]])
    edge_index = np.concatenate([g.edge_index + o for g, o in zip(graphs, offsets, strict=True)],
                                axis=1)
    batch = {
        K.SPECIES: torch.as_tensor(np.concatenate([g.species for g in graphs]), device=device),
        K.POSITIONS: torch.as_tensor(np.concatenate([g.positions for g in graphs]), dtype=dtype,
                                     device=device),
        K.EDGE_INDEX: torch.as_tensor(edge_index, device=device),
        K.EDGE_SHIFT: torch.as_tensor(np.concatenate([g.edge_shift for g in graphs]),
                                      dtype=dtype, device=device),
        K.BATCH: torch.as_tensor(np.repeat(np.arange(len(graphs)), n), device=device),
        K.N_ATOMS: torch.as_tensor(n, device=device),
        K.VOLUME: torch.tensor([g.volume for g in graphs], dtype=torch.float64, device=device),
    }
    if all(g.energy is not None for g in graphs):
        batch[K.ENERGY] = torch.tensor([g.energy for g in graphs], dtype=torch.float64,
                                       device=device)  # totals of ~1e4 eV: float64
    if all(g.forces is not None for g in graphs):
        batch[K.FORCES] = torch.as_tensor(np.concatenate([g.forces for g in graphs]),
                                          dtype=dtype, device=device)
    return batch


def iter_batches(graphs: Sequence[Graph], *, batch_size: int, max_atoms: int | None = None,
                 order: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Indices of successive batches: at most ``batch_size`` structures and, if given,
    ``max_atoms`` atoms (bounded memory for big inputs; a larger structure goes alone)."""
    idx = list(range(len(graphs))) if order is None else list(order)
    current: list[int] = []
    atoms = 0
    for i in idx:
        n = graphs[i].n_atoms
        if current and (len(current) >= batch_size or
                        (max_atoms is not None and atoms + n > max_atoms)):
            yield current
            current, atoms = [], 0
        current.append(i)
        atoms += n
    if current:
        yield current


def _counts_and_energies(images: Sequence[Atoms], species: Sequence[int],
                         ) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros((len(images), len(species)))
    energies = np.zeros(len(images))
    for k, atoms in enumerate(images):
        counts[k] = np.bincount(species_index(atoms.numbers, species), minlength=len(species))
        e, _ = labels_of(atoms)
        if e is None:
            raise ValueError(f"structure {k} has no energy; energy shifts need labelled data")
        energies[k] = e
    return counts, energies


def energy_shifts_least_squares(images: Sequence[Atoms], species: Sequence[int]) -> np.ndarray:
    """Per-species energies (eV) fitted to the images' total energies (composition counts).

    Where the compositions do not determine every species' energy (one composition, or
    compositions that are multiples of each other) the fit is the one closest to a uniform
    shift, the mean energy per atom, for all species: the minimum-norm least-squares
    correction to it. With varying compositions of full rank this is plain least squares."""
    counts, energies = _counts_and_energies(images, species)
    uniform = float(np.mean(energies / counts.sum(1)))
    correction, *_ = np.linalg.lstsq(counts, energies - uniform * counts.sum(1), rcond=1e-8)
    return uniform + correction


def energy_shifts_with_isolated(images: Sequence[Atoms], species: Sequence[int],
                                isolated: np.ndarray) -> np.ndarray:
    """Isolated-atom energies E0 plus the mean interaction energy per atom of the images,
    mean_s[(E_s − Σ_i E0(Z_i)) / N_s], the same for every species (as MACE does): the
    network learns only the residual, and E0 keeps the species apart."""
    counts, energies = _counts_and_energies(images, species)
    isolated = np.asarray(isolated, dtype=float)
    return isolated + float(np.mean((energies - counts @ isolated) / counts.sum(1)))


def energy_shifts_from_isolated(path: str | Path, species: Sequence[int]) -> np.ndarray:
    """Per-species energies (eV) from a file of isolated-atom calculations."""
    import ase.io

    found: dict[int, float] = {}
    for atoms in ase.io.read(path, ":"):
        e, _ = labels_of(atoms)
        if len(atoms) == 1 and e is not None:
            found[int(atoms.numbers[0])] = e
    missing = [chemical_symbols[z] for z in species if z not in found]
    if missing:
        raise ValueError(f"{path}: no isolated-atom energy for {', '.join(missing)}")
    return np.array([found[z] for z in species])
