"""DP-GEN's trust-window selection: exactly the candidates whose committee force deviation
lies between the bounds, at random among them."""

from __future__ import annotations

import numpy as np
import pytest

from bayesal.bayes_model.acquisition import (
    OUTSIDE_WINDOW,
    Acquisition,
    AcquisitionConfig,
    score,
)
from bayesal.bayes_model.predict import Prediction
from bayesal.bayes_model.scoring import score_pool

# max-force-std of each structure (eV/Å): two atoms each, the second atom the larger
DEVIATION = np.array([0.01, 0.05, 0.08, 0.149, 0.15, 0.30, 0.12, 0.049])
INSIDE = [1, 2, 3, 6]  # [0.05, 0.15)


def _prediction(idx=None):
    dev = DEVIATION if idx is None else DEVIATION[idx]
    s = len(dev)
    per_atom = np.stack([dev / 2, dev], axis=1).ravel()  # max over the two atoms: dev
    cov_epi = np.zeros((2 * s, 3, 3))
    cov_epi[:, 0, 0] = per_atom**2  # sqrt(tr Σ_epi) = per-atom deviation
    eye = np.broadcast_to(np.eye(3) * 0.01, (2 * s, 3, 3)).copy()
    return Prediction(energy=np.zeros(s), energy_var_epi=np.full(s, 1e-4),
                      energy_var_ale=np.full(s, 1e-4), forces=np.zeros((2 * s, 3)),
                      forces_cov_epi=cov_epi, forces_cov_ale=eye, n_atoms=np.full(s, 2),
                      features=np.eye(s, 4))


def test_scores_inside_the_window_and_nowhere_else():
    s = score(_prediction(), Acquisition.TRUST_WINDOW, trust=(0.05, 0.15), seed=3)
    np.testing.assert_allclose(s.max_force_std, DEVIATION)
    assert sorted(np.flatnonzero(s.score != OUTSIDE_WINDOW)) == INSIDE
    assert ((s.score[INSIDE] >= 0) & (s.score[INSIDE] < 1)).all()


class _Fixed:
    """A posterior that predicts the hand-made deviations of the frames it is given."""

    def predict(self, images, batch_size=32):
        return _prediction([a.info["k"] for a in images])


def _frames():
    from ase import Atoms

    out = []
    for k in range(len(DEVIATION)):
        a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
        a.info["k"] = k
        out.append(a)
    return out


@pytest.mark.parametrize("n_select", [2, 4, 8])
def test_the_pool_selection_takes_only_frames_in_the_window(n_select):
    config = AcquisitionConfig(function="trust-window", n_select=n_select, chunk_size=3,
                               selection="diverse", trust_lo=0.05, trust_hi=0.15)
    picked = [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(), config,
                                                     seed=1).selected]
    assert len(picked) == min(n_select, len(INSIDE))
    assert set(picked) <= set(INSIDE)
    again = [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(), config,
                                                    seed=1).selected]
    assert picked == again  # seeded


def test_a_window_upside_down_is_refused():
    with pytest.raises(ValueError, match=r"trust_lo \(0.2\) must be below trust_hi \(0.1\)"):
        AcquisitionConfig(function="trust-window", trust_lo=0.2, trust_hi=0.1)


@pytest.mark.parametrize("function", ["bald-ef", "max-force-std", "random"])
def test_a_max_force_std_cap_leaves_out_the_frames_above_it(function):
    """DP-GEN's upper trust level for any acquisition: the frames above the cap are never
    picked, whatever they score; without the cap max-force-std picks the largest first."""
    capped = AcquisitionConfig(function=function, n_select=8, chunk_size=3,
                               selection="top-k", max_force_std_cap=0.149)
    picked = [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(), capped,
                                                     seed=2).selected]
    assert sorted(picked) == [k for k, d in enumerate(DEVIATION) if d <= 0.149]
    top = AcquisitionConfig(function=function, n_select=2, selection="top-k",
                            max_force_std_cap=0.149)
    first = [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(), top).selected]
    assert not {4, 5} & set(first)
    if function == "max-force-std":
        assert first == [3, 6]  # 0.149, 0.12: the largest below the cap
        uncapped = AcquisitionConfig(function=function, n_select=2, selection="top-k")
        assert [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(),
                                                      uncapped).selected] == [5, 4]
    with pytest.raises(ValueError, match="greater than 0"):
        AcquisitionConfig(max_force_std_cap=0)


@pytest.mark.parametrize("selection", ["top-k", "diverse", "power"])
def test_a_cap_no_candidate_is_within_is_lifted_and_one_within_keeps_the_rest_out(
        selection, caplog):
    """Every frame above the cap: the selection is the uncapped one (a campaign's early
    model, uncertain everywhere, still gets its batch) and says so; one frame within the
    cap: it alone is selected, even when the others fill the kept candidates first."""
    def picked(cap, chunk_size=3, keep=None):
        config = AcquisitionConfig(function="bald-ef", n_select=4, chunk_size=chunk_size,
                                   selection=selection, max_force_std_cap=cap, keep=keep)
        return [c.atoms.info["k"] for c in score_pool(_Fixed(), _frames(), config,
                                                       seed=5).selected]

    with caplog.at_level("WARNING", logger="bayesal.bayes_model.scoring"):
        assert picked(0.009) == picked(None)
    assert "cap is lifted" in caplog.text
    assert len(picked(None)) == 4
    caplog.clear()
    # only frame 0 (0.01) is within 0.011; chunks of one and a keep of 4 make the frames
    # above the cap fill the heap before it arrives and after
    for chunk_size in (1, 3, 8):
        assert picked(0.011, chunk_size=chunk_size, keep=4) == [0]
    assert "cap is lifted" not in caplog.text
