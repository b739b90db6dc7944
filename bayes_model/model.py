"""RACE-style E(3)-equivariant potential with mean-variance heads (e3nn).

Per layer t a message m_i = (1/n̄) Σ_j R(r_ij) ⊙ (h_j ⊗ Y(r̂_ij)) (radial MLP on 8 Bessel
functions times a polynomial envelope; spherical harmonics up to l_max). The first layer's
features give A_i = Linear(h_i^(1)); later layers update
h^(t) = h^(t-1) + Gate[Linear(m) + Linear(A ⊗ m) + SI(h^(t-1), Z)], so the channel-wise
product with A raises the body order by one per layer. Every layer's invariant features feed
the readout (concatenated = summed per-layer linear readouts):

* energy ε_i = w · φ_i (× force-scale), E = Σ_i ε_i + shift(Z_i);
* energy log-variance s_i, σ²_E = Σ_i exp(s_i) (eV², extensive);
* force covariance Σ_i = expm(S_i) + εI from a 0e ⊕ 2e irrep per atom (a symmetric 3x3 matrix,
  so Σ_i rotates as R Σ_i Rᵀ and is SPD by construction);
* forces F = -∂E/∂r by autograd.
"""

from __future__ import annotations

import math

import torch
from ase.data import covalent_radii
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.io import CartesianTensor
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bayesal.bayes_model import _keys as K

__all__ = ["MVEPotential", "ModelConfig", "virial_to_stress"]


class ModelConfig(BaseModel):
    """Hyperparameters of the potential (units: Å, eV)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cutoff: float = Field(5.0, gt=0, description="Neighbour cutoff radius, Å.")
    n_radial: int = Field(8, ge=1, description="Bessel radial basis functions.")
    envelope_p: int = Field(6, ge=2, description="Polynomial cutoff envelope exponent.")
    l_max: int = Field(2, ge=1, le=3, description="Highest spherical-harmonic degree.")
    channels: int = Field(32, ge=1, description="Channels per irrep in hidden features.")
    n_layers: int = Field(2, ge=1, le=6, description="Interaction layers.")
    radial_hidden: int = Field(64, ge=4, description="Width of the radial MLP.")
    sigma_energy0: float = Field(0.02, gt=0, description="Initial per-atom energy std, eV.")
    sigma_force0: float = Field(0.1, gt=0, description="Initial force std, eV/Å.")
    cov_eps: float = Field(1e-6, gt=0, description="Jitter added to force covariances, "
                           "(eV/Å)².")
    zbl: bool = Field(False, description="Add the ZBL screened nuclear repulsion between "
                      "atoms closer than the sum of their covalent radii (ASE's), switched "
                      "off smoothly there by the radial envelope: a repulsive wall the "
                      "network does not have to learn from compressed structures.")


def _hidden_irreps(channels: int, l_max: int) -> o3.Irreps:
    """Natural-parity irreps 0e, 1o, 2e, 3o: true (polar) tensors."""
    return o3.Irreps([(channels, (deg, (-1) ** deg)) for deg in range(l_max + 1)])


# Ziegler-Biersack-Littmark universal screening function: Σ c_k exp(-d_k r/a) with the
# screening length a = 0.8854 a0 / (Z_i^0.23 + Z_j^0.23); e²/(4πε0) in eV Å.
ZBL_A = 0.8854 * 0.529177210903  # Å
ZBL_C = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_D = (3.19980, 0.94229, 0.40290, 0.20162)
COULOMB_EV_A = 14.399645


def polynomial_envelope(d: torch.Tensor, p: int) -> torch.Tensor:
    """u(d) = 1 − (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) − p(p+1)/2 d^(p+2) for d < 1, else 0:
    1 at 0, and zero with its first two derivatives at 1."""
    env = (1 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1)
           - p * (p + 1) / 2 * d ** (p + 2))
    return env * (d < 1)


def zbl_pair_energy(r: torch.Tensor, z_i: torch.Tensor, z_j: torch.Tensor,
                    r_max: torch.Tensor, p: int) -> torch.Tensor:
    """ZBL repulsion (eV) of pairs at distances ``r`` (Å) with nuclear charges ``z_i``,
    ``z_j``, times :func:`polynomial_envelope` (r / ``r_max``)."""
    a = ZBL_A / (z_i**0.23 + z_j**0.23)
    x = r / a
    phi = sum(c * torch.exp(-d * x) for c, d in zip(ZBL_C, ZBL_D, strict=True))
    return COULOMB_EV_A * z_i * z_j / r * phi * polynomial_envelope(r / r_max, p)


class BesselEnvelope(nn.Module):
    """sqrt(2/rc) sin(nπ r/rc) / r times the polynomial envelope u(r/rc) (zero at rc)."""

    def __init__(self, cutoff: float, n: int, p: int) -> None:
        super().__init__()
        self.cutoff, self.p = cutoff, p
        self.register_buffer("freqs", torch.arange(1, n + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        env = polynomial_envelope(r / self.cutoff, self.p)
        bessel = math.sqrt(2 / self.cutoff) * torch.sin(self.freqs * r[:, None]) / r[:, None]
        return bessel * env[:, None]


class Interaction(nn.Module):
    """One message-passing layer (see module docstring). Contract: takes ``irreps_in`` node
    features, gives ``irreps_hidden`` features; raises if the irreps do not fit."""

    def __init__(self, irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_hidden: o3.Irreps,
                 n_species: int, n_radial: int, radial_hidden: int, avg_neighbors: float,
                 with_product: bool) -> None:
        super().__init__()
        self.irreps_in, self.irreps_hidden = o3.Irreps(irreps_in), o3.Irreps(irreps_hidden)
        self.avg_neighbors = avg_neighbors
        allowed = [ir for _, ir in self.irreps_hidden]
        # Paths grouped by output irrep: the linear maps after the tensor product then see
        # one block per irrep (e.g. 96x1o, not three 32x1o blocks): the same function with
        # the same weights, but a few slices instead of one per path (each slice costs a
        # zero-filled gradient of the whole message tensor in backward).
        mid, instructions = [], []
        for ir_out in allowed:
            for i1, (mul, ir1) in enumerate(self.irreps_in):
                for i2, (_, ir2) in enumerate(irreps_sh):
                    if ir_out in ir1 * ir2:
                        instructions.append((i1, i2, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        if not mid:
            raise ValueError(f"no tensor-product path from {self.irreps_in} x {irreps_sh} to "
                             f"{self.irreps_hidden}")
        self.pre = o3.Linear(self.irreps_in, self.irreps_in)
        self.tp = o3.TensorProduct(self.irreps_in, irreps_sh, o3.Irreps(mid), instructions,
                                   shared_weights=False, internal_weights=False)
        irreps_mid = o3.Irreps(mid).simplify()
        self.radial = e3nn_nn.FullyConnectedNet(
            [n_radial, radial_hidden, radial_hidden, self.tp.weight_numel],
            torch.nn.functional.silu)

        scalars = o3.Irreps([(m, ir) for m, ir in self.irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in self.irreps_hidden if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        self.gate = e3nn_nn.Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid],
                                 gated)
        irreps_pre = self.gate.irreps_in
        self.lin_msg = o3.Linear(irreps_mid, irreps_pre)
        self.si = o3.FullyConnectedTensorProduct(self.irreps_in, f"{n_species}x0e", irreps_pre)
        self.with_product = with_product
        if with_product:
            self.lin_m = o3.Linear(irreps_mid, self.irreps_hidden)
            self.prod = o3.ElementwiseTensorProduct(
                self.irreps_hidden, self.irreps_hidden, filter_ir_out=allowed)
            self.lin_prod = o3.Linear(self.prod.irreps_out, irreps_pre)
        self.residual = self.irreps_in == self.irreps_hidden

    def forward(self, h, onehot, sh, radial, edge_index, a=None):
        i, j = edge_index
        x = self.pre(h)
        weights = self.radial(radial)
        messages = self.tp(x[j], sh, weights)
        m = torch.zeros(h.shape[0], messages.shape[1], dtype=h.dtype, device=h.device)
        m = m.index_add(0, i, messages) / self.avg_neighbors
        pre = self.lin_msg(m) + self.si(h, onehot)
        if self.with_product:
            pre = pre + self.lin_prod(self.prod(a, self.lin_m(m)))
        out = self.gate(pre)
        return h + out if self.residual else out


# Buffers that stay float64 whatever dtype the network runs in.
FLOAT64_BUFFERS = ("shifts", "scale", "zbl_z", "zbl_rcov")

# Log-variances are kept within ±LOG_BOUND (σ² from 3e-7 to 3e6 in eV² or (eV/Å)²): far
# outside anything physical, it keeps sampled weights (SWAG, IVON) from overflowing exp.
LOG_BOUND = 15.0


def _bounded(cov6: torch.Tensor) -> torch.Tensor:
    """Clamp the 0e part and shrink the 2e part to norm <= LOG_BOUND (a rotation-invariant
    bound, so equivariance is kept)."""
    s0 = cov6[:, :1].clamp(-LOG_BOUND, LOG_BOUND)
    s2 = cov6[:, 1:]
    norm = s2.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([s0, s2 * torch.clamp(LOG_BOUND / norm, max=1.0)], dim=1)


def virial_to_stress(d_energy_d_strain: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """(1/V) dE/dε per structure (S, 3, 3) in float64, NaN where the volume is 0 (not
    periodic in all three directions)."""
    v = volume.to(torch.float64)
    safe = torch.where(v > 0, v, torch.ones_like(v))
    out = d_energy_d_strain.to(torch.float64) / safe[:, None, None]
    return torch.where((v > 0)[:, None, None], out, torch.full_like(out, float("nan")))


class MVEPotential(nn.Module):
    """The potential. Construct from a :class:`ModelConfig`, the species (atomic numbers),
    per-species energy shifts (eV), a force scale (eV/Å) and the mean neighbour count."""

    def __init__(self, config: ModelConfig, species: list[int], shifts: list[float],
                 scale: float = 1.0, avg_neighbors: float = 10.0) -> None:
        super().__init__()
        if len(shifts) != len(species):
            raise ValueError(f"{len(species)} species but {len(shifts)} energy shifts")
        self.config, self.species = config, list(species)
        n_species = len(species)
        self.register_buffer("shifts", torch.tensor(shifts, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        # per species: nuclear charge and covalent radius (Å) for the ZBL term; derived from
        # the species, so not saved (checkpoints without them load)
        self.register_buffer("zbl_z", torch.tensor(species, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("zbl_rcov", torch.tensor(
            [float(covalent_radii[z]) for z in species], dtype=torch.float64),
            persistent=False)
        self.avg_neighbors = float(avg_neighbors)

        c = config.channels
        self.irreps_sh = o3.Irreps.spherical_harmonics(config.l_max)
        hidden = _hidden_irreps(c, config.l_max)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.radial = BesselEnvelope(config.cutoff, config.n_radial, config.envelope_p)
        self.embed = o3.Linear(f"{n_species}x0e", f"{c}x0e")
        layers, irreps_in = [], o3.Irreps(f"{c}x0e")
        for t in range(config.n_layers):
            layers.append(Interaction(irreps_in, self.irreps_sh, hidden, n_species,
                                      config.n_radial, config.radial_hidden, avg_neighbors,
                                      with_product=t > 0))
            irreps_in = hidden
        self.layers = nn.ModuleList(layers)
        self.lin_a = o3.Linear(hidden, hidden)
        n_features = c * config.n_layers  # invariant features φ_i of all layers
        self.energy_head = nn.Linear(n_features, 1, bias=False)  # last layer (Laplace)
        self.logvar_head = nn.Linear(n_features, 1)
        self.cov_heads = nn.ModuleList(o3.Linear(hidden, "1x0e+1x2e") for _ in layers)
        q = CartesianTensor("ij=ji").reduced_tensor_products().change_of_basis  # (6, 3, 3)
        self.register_buffer("q", q)
        # Start from E = Σ shifts (no learned offset to unlearn) with unit variances heads.
        nn.init.zeros_(self.energy_head.weight)
        nn.init.zeros_(self.logvar_head.weight)
        nn.init.constant_(self.logvar_head.bias, 2 * math.log(config.sigma_energy0))
        self.log_force_var0 = 2 * math.log(config.sigma_force0)

    @property
    def n_features(self) -> int:
        return self.energy_head.in_features

    def features(self, data: dict[str, torch.Tensor], *, detach_variance: bool = False,
                 strain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Invariant per-atom features φ (N, n_features) and the covariance log-matrix
        components (N, 6) in the 0e ⊕ 2e basis (``detach_variance``: computed from detached
        features, so that only the covariance heads learn from it). ``strain`` (S, 3, 3),
        zero-valued: every edge vector of structure s becomes r (1 + ε_s) with ε_s its
        symmetric part, so that dE/dε is the virial (stress)."""
        pos, species = data[K.POSITIONS], data[K.SPECIES]
        vec = self._edge_vectors(data, strain)
        r = vec.norm(dim=-1)
        sh = self.sh(vec)
        radial = self.radial(r)
        onehot = torch.nn.functional.one_hot(species, len(self.species)).to(pos.dtype)
        h = self.embed(onehot)
        scalars, cov = [], 0.0
        a = None
        for t, layer in enumerate(self.layers):
            h = layer(h, onehot, sh, radial, data[K.EDGE_INDEX], a)
            if t == 0:
                a = self.lin_a(h)
            scalars.append(h[:, : self.config.channels])  # the 0e block comes first
            cov = cov + self.cov_heads[t](h.detach() if detach_variance else h)
        return torch.cat(scalars, dim=1), cov

    @staticmethod
    def _edge_vectors(data: dict[str, torch.Tensor],
                      strain: torch.Tensor | None) -> torch.Tensor:
        """r_j − r_i (+ the cell shift) per edge, deformed by ``strain`` when given."""
        i, j = data[K.EDGE_INDEX]
        vec = data[K.POSITIONS][j] - data[K.POSITIONS][i] + data[K.EDGE_SHIFT]
        if strain is not None:
            sym = 0.5 * (strain + strain.transpose(1, 2))
            vec = vec + torch.einsum("ea,eab->eb", vec, sym[data[K.BATCH][i]])
        return vec

    def zbl_energies(self, data: dict[str, torch.Tensor],
                     strain: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom ZBL repulsion (N,) eV in float64: half of each of the atom's pairs
        closer than their covalent radii's sum (every pair is an edge both ways)."""
        i, j = data[K.EDGE_INDEX]
        species = data[K.SPECIES]
        r = self._edge_vectors(data, strain).to(torch.float64).norm(dim=-1)
        si, sj = species[i], species[j]
        pair = zbl_pair_energy(r, self.zbl_z[si], self.zbl_z[sj],
                               self.zbl_rcov[si] + self.zbl_rcov[sj], self.config.envelope_p)
        return torch.zeros(species.shape[0], dtype=torch.float64,
                           device=r.device).index_add(0, i, 0.5 * pair)

    def forward(self, data: dict[str, torch.Tensor], *, forces: bool = True,
                training: bool = False, retain_graph: bool = False,
                detach_variance: bool = False, stress: bool = False,
                strain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Energies (S,) eV in float64, energy variances (S,) eV², forces (N, 3) eV/Å, force
        covariances (N, 3, 3) (eV/Å)², per-atom features φ and per-atom energies (N,) eV in
        float64. ``training`` keeps the graph for double backward; ``retain_graph`` keeps it
        for more gradients of φ (Laplace); ``detach_variance`` lets the variance heads see
        detached features (the network's features are then fitted by the means alone).

        The network runs in its dtype; the scale, the per-species shifts and the sum over
        atoms are float64 (a −9000 eV total summed in float32 is rounded to ~1 meV).

        ``stress`` (with ``forces``): also the stress (S, 3, 3) eV/Å³, (1/V) dE/dε under a
        homogeneous strain ε (ASE's sign convention), for structures periodic in all three
        directions (``K.VOLUME`` > 0); NaN for the others. ``strain``: a zero (S, 3, 3)
        tensor of the caller's, for its own derivatives (Laplace)."""
        pos = data[K.POSITIONS]
        if forces and not pos.requires_grad:
            pos.requires_grad_(True)
        if stress and forces and strain is None:
            n = int(data[K.N_ATOMS].shape[0])
            strain = torch.zeros(n, 3, 3, dtype=pos.dtype, device=pos.device,
                                 requires_grad=True)
        phi, cov6 = self.features(data, detach_variance=detach_variance, strain=strain)
        species, batch = data[K.SPECIES], data[K.BATCH]
        n_struct = int(data[K.N_ATOMS].shape[0])
        eps_i = (self.energy_head(phi).squeeze(-1).to(torch.float64) * self.scale
                 + self.shifts[species])
        if self.config.zbl:
            eps_i = eps_i + self.zbl_energies(data, strain)
        energy = torch.zeros(n_struct, dtype=torch.float64, device=phi.device).index_add(
            0, batch, eps_i)
        phi_var = phi.detach() if detach_variance else phi
        var_i = torch.exp(self.logvar_head(phi_var).squeeze(-1).clamp(-LOG_BOUND, LOG_BOUND))
        energy_var = torch.zeros(n_struct, dtype=phi.dtype, device=phi.device).index_add(
            0, batch, var_i)
        log_cov = torch.einsum("nk,kij->nij", _bounded(cov6), self.q.to(phi.dtype))
        eye = torch.eye(3, dtype=phi.dtype, device=phi.device)
        cov = torch.linalg.matrix_exp(log_cov + self.log_force_var0 * eye)
        cov = 0.5 * (cov + cov.transpose(1, 2)) + self.config.cov_eps * eye
        out = {"energy": energy, "energy_var": energy_var, "forces_cov": cov,
               "features": phi, "atomic_energies": eps_i}
        if forces:
            with_stress = stress and strain is not None
            inputs = [pos, strain] if with_stress else [pos]
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=training,
                                        retain_graph=training or retain_graph)
            out["forces"] = -grads[0]
            if with_stress:
                out["stress"] = virial_to_stress(grads[1], data[K.VOLUME])
        return out

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``/``.float()`` move the float64 buffers (shifts, scale) between
        devices but keep them float64."""
        kept = {name: getattr(self, name) for name in FLOAT64_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            setattr(self, name, old.to(device=getattr(self, name).device, dtype=torch.float64))
        return self
