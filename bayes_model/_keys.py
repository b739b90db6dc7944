"""Keys of graph batches: the one place where their names and shapes are written down.

N = atoms in the batch, E = edges, S = structures. Units: Å, eV, eV/Å.
"""

POSITIONS = "positions"  # (N, 3) float, Å
SPECIES = "species"  # (N,) long, index into the model's species list
EDGE_INDEX = "edge_index"  # (2, E) long: row 0 receiving atom i, row 1 neighbour j
EDGE_SHIFT = "edge_shift"  # (E, 3) float, Å: r_ij = pos[j] - pos[i] + edge_shift
BATCH = "batch"  # (N,) long, structure index of each atom
N_ATOMS = "n_atoms"  # (S,) long
VOLUME = "volume"  # (S,) float64, Å³: the cell's volume when periodic in all three
#                    directions, else 0 (no stress)
ENERGY = "energy"  # (S,) float64, eV (reference labels, when known)
FORCES = "forces"  # (N, 3) float, eV/Å (reference labels, when known)
