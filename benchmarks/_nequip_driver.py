"""Train and evaluate NequIP (its own virtualenv) for benchmarks/model_accuracy.py.

Run with the NequIP environment's python:
    python _nequip_driver.py WORKDIR MINUTES THREADS [cpu|gpu]
WORKDIR holds train.xyz, val.xyz, test.xyz; prints one JSON line with the results.
The NequIP settings follow its tutorial config (4 layers, l_max 1, 32 features, EMA, Adam
lr 0.01 with plateau schedule), on the CPU (or the first GPU), without torch.compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """
run: [train]
cutoff_radius: 5.0
chemical_symbols: [H, C, O]
model_type_names: ${{chemical_symbols}}
monitored_metric: val0_epoch/weighted_sum
data:
  _target_: nequip.data.datamodule.ASEDataModule
  seed: 456
  train_file_path: {work}/train.xyz
  val_file_path: {work}/val.xyz
  transforms:
    - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
      model_type_names: ${{model_type_names}}
      chemical_species_to_atom_type_map: {{H: H, C: C, O: O}}
    - _target_: nequip.data.transforms.NeighborListTransform
      r_max: ${{cutoff_radius}}
  train_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
    shuffle: true
  val_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 10
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    dataloader_kwargs:
      batch_size: 10
    type_names: ${{model_type_names}}
trainer:
  _target_: lightning.Trainer
  accelerator: {accelerator}
  devices: 1
  enable_checkpointing: true
  max_epochs: 100000
  max_time: "{max_time}"
  check_val_every_n_epoch: 1
  log_every_n_steps: 50
  enable_progress_bar: false
  logger:
    _target_: lightning.pytorch.loggers.CSVLogger
    save_dir: {work}/csv
    name: run
  callbacks:
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      monitor: ${{monitored_metric}}
      dirpath: {work}/ckpt
      filename: best
      save_last: true
training_module:
  _target_: nequip.train.EMALightningModule
  ema_decay: 0.999
  loss:
    _target_: nequip.train.EnergyForceLoss
    per_atom_energy: true
    coeffs:
      total_energy: 1.0
      forces: 1.0
  val_metrics:
    _target_: nequip.train.EnergyForceMetrics
    coeffs:
      total_energy_mae: 1.0
      forces_mae: 1.0
  train_metrics: ${{training_module.val_metrics}}
  test_metrics: ${{training_module.val_metrics}}
  optimizer:
    _target_: torch.optim.Adam
    lr: 0.01
  lr_scheduler:
    scheduler:
      _target_: torch.optim.lr_scheduler.ReduceLROnPlateau
      factor: 0.6
      patience: 5
      threshold: 0.2
      min_lr: 1e-6
    monitor: ${{monitored_metric}}
    interval: epoch
    frequency: 1
  model:
    _target_: nequip.model.NequIPGNNModel
    seed: 456
    model_dtype: float32
    type_names: ${{model_type_names}}
    r_max: ${{cutoff_radius}}
    num_bessels: 8
    bessel_trainable: false
    polynomial_cutoff_p: 6
    num_layers: 4
    l_max: 1
    parity: true
    num_features: 32
    radial_mlp_depth: 2
    radial_mlp_width: 64
    avg_num_neighbors: ${{training_data_stats:num_neighbors_mean}}
    per_type_energy_scales: ${{training_data_stats:per_type_forces_rms}}
    per_type_energy_shifts: ${{training_data_stats:per_atom_energy_mean}}
    per_type_energy_scales_trainable: false
    per_type_energy_shifts_trainable: false
global_options:
  allow_tf32: false
"""


def main() -> None:
    work, minutes, threads = Path(sys.argv[1]).resolve(), float(sys.argv[2]), sys.argv[3]
    accelerator = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    seconds = int(minutes * 60)
    max_time = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    (work / "nequip.yaml").write_text(CONFIG.format(work=work, max_time=max_time,
                                                    accelerator=accelerator))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    t0 = time.perf_counter()
    train = subprocess.run(
        [str(Path(sys.executable).with_name("nequip-train")), "-cp", str(work), "-cn",
         "nequip.yaml", f"hydra.run.dir={work}/hydra"],
        env=env, capture_output=True, text=True)
    train_s = time.perf_counter() - t0
    if train.returncode != 0:
        print(json.dumps({"error": train.stderr[-3000:]}))
        sys.exit(1)
    print(json.dumps(evaluate(work, train_s, "cuda" if accelerator == "gpu" else "cpu")))


def evaluate(work: Path, train_s: float, device: str = "cpu") -> dict:
    import ase.io
    import numpy as np
    import torch
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms
    from nequip.model.saved_models.checkpoint import ModelFromCheckpoint
    from nequip.nn import graph_model
    from nequip.utils.global_state import set_global_state

    set_global_state()
    models = ModelFromCheckpoint(str(work / "ckpt" / "best.ckpt"))
    model = models[next(iter(models))] if isinstance(models, dict | torch.nn.ModuleDict) \
        else models
    model = model.eval()
    meta = model.metadata if hasattr(model, "metadata") else {}
    transforms = basic_transforms(meta, model.metadata[graph_model.R_MAX_KEY] if meta else 5.0,
                                  ["H", "C", "O"], {s: s for s in ("H", "C", "O")})
    calc = NequIPCalculator(model.to(device), device=device, transforms=transforms)
    test = ase.io.read(work / "test.xyz", ":")
    de, df = [], []
    t0 = time.perf_counter()
    for atoms in test:
        ref_e, ref_f = atoms.get_potential_energy(), atoms.get_forces()
        a = atoms.copy()
        a.calc = calc
        de.append(a.get_potential_energy() - ref_e)
        df.append(a.get_forces() - ref_f)
    infer_s = time.perf_counter() - t0
    de, df = np.array(de), np.concatenate(df)
    return {"energy_mae": float(np.abs(de).mean()), "force_mae": float(np.abs(df).mean()),
            "force_rmse": float(np.sqrt((df**2).mean())), "train_s": train_s,
            "structures_per_s": len(test) / infer_s, "curve": validation_curve(work)}


def validation_curve(work: Path) -> list[dict]:
    """Per-epoch validation force/energy MAE from the CSV log (eV/Å, eV)."""
    import csv

    logs = sorted((work / "csv").rglob("metrics.csv"))
    if not logs:
        return []
    curve = []
    with logs[-1].open() as fh:
        for row in csv.DictReader(fh):
            f, e = row.get("val0_epoch/forces_mae"), row.get("val0_epoch/total_energy_mae")
            if f:
                curve.append({"epoch": int(row["epoch"]), "valid_force_mae": float(f),
                              "valid_energy_mae": float(e) if e else None})
    return curve


if __name__ == "__main__":
    main()
