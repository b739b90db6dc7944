"""Benchmark: one training step of K ensemble members batched with torch.func.vmap vs one
member after the other, in the same process with the same threads.

Each step: energy, forces = −∂E/∂r and the gradient of a force loss with respect to every
member's weights (double backward), on one batch of shared-data frames. Prints seconds per
step for both and their ratio (the saving batched members could bring to training).

    python benchmarks/ensemble_batching.py --members 4 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time

import ase.io
import torch
from _common import shared_data
from torch.func import functional_call, grad, stack_module_state, vmap

from bayesal.bayes_model.data import batch_graphs
from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.train import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--molecule", default="ethanol/train.xyz")
    ap.add_argument("--batch", type=int, default=5, help="structures per batch")
    ap.add_argument("--channels", type=int, default=ModelConfig().channels)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = ase.io.read(shared_data() / args.molecule, f":{args.batch + 5}")
    cfg = ModelConfig(channels=args.channels)
    data = prepare_data(frames[: args.batch], frames[args.batch:], cfg)
    models = [build_model(cfg, data.species, data.shifts, data.train, seed=k)
              for k in range(args.members)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    batch = batch_graphs(data.train)

    def energy(p, b, pos):
        out = functional_call(skeleton, (p, b), ({**batch, "positions": pos},),
                              {"forces": False})
        return out["energy"].sum()

    def loss(p, b):
        forces = -grad(energy, argnums=2)(p, b, batch["positions"])
        return ((forces - batch["forces"]) ** 2).mean()

    batched = vmap(grad(loss), in_dims=(0, 0))

    def one_by_one():
        for model in models:
            model.zero_grad()
            b = batch_graphs(data.train)
            out = model(b, training=True)
            ((out["forces"] - b["forces"]) ** 2).mean().backward()

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - t0) / args.steps

    loop_s, vmap_s = timed(one_by_one), timed(lambda: batched(params, buffers))
    print(f"{args.members} members, {args.batch} x {len(frames[0])} atoms per batch, "
          f"{args.channels} channels, {args.threads} thread(s): one by one {loop_s:.3f} s, "
          f"vmap {vmap_s:.3f} s per step; vmap / one by one = {vmap_s / loop_s:.2f}")


if __name__ == "__main__":
    main()
