"""Helpers the tests share (import them with ``from helpers import ...``; fixtures stay in
conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rattled_waters(n: int, seed: int = 0):
    """``n`` distinct water molecules (positions rattled by 0.05 Å)."""
    import numpy as np
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        images.append(a)
    return images


TINY = {"channels": 4, "n_layers": 1, "radial_hidden": 8, "l_max": 1}  # fast test models


def ethanol_campaign(folder, shared_data, *, name="eth", n_pool=40, n_test=6, **overrides):
    """Pool/test files from the shared ethanol data and a campaign YAML (replay labels)."""
    import ase.io
    import yaml

    pool = ase.io.read(shared_data / "ethanol" / "train.xyz", f":{n_pool}")
    test = ase.io.read(shared_data / "ethanol" / "test_MD.xyz", f":{n_test}")
    ase.io.write(folder / "pool.xyz", pool)
    ase.io.write(folder / "test.xyz", test)
    cfg = {"name": name, "seed": 0,
           "data": {"pool_files": ["pool.xyz"], "initial_random": 6,
                    "test_files": ["test.xyz"]},
           "members": 2, "model": TINY, "train": {"max_epochs": 3, "batch_size": 4},
           "acquisition": {"batch_size": 4, "selection": "diverse"},
           "labeler": {"kind": "replay", "method": "pbe", "basis": "def2-svp",
                       "replay_files": ["pool.xyz", "test.xyz"], "workers": 2},
           "stop": {"max_rounds": 3}}
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shared_data_dir() -> Path | None:
    """``$BAYESAL_SHARED_DATA`` or ``../shared/data`` beside the checkout, if present."""
    env = os.environ.get("BAYESAL_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None
