"""Benchmark: active learning as a real campaign runs it, on structures it explores itself.

Per molecule (ethanol, acetylacetone), strategy and seed, a campaign starts from
``--initial`` (8) structures of the 300 K reference data and runs ``--rounds`` rounds of:

1. train the default 4-member ensemble: round 0 ``--epochs`` epochs from scratch, later
   rounds ``--finetune-epochs`` epochs warm-started from the previous round (a compute
   budget that does not depend on how busy the machine is);
2. evaluate it on the test sets (below);
3. explore: Langevin MD with the model from ``--md-seeds`` labelled structures at the
   round's temperature (``--temperatures``, rising: 300, 600, 900 K, then the last), every
   10th frame a candidate, a trajectory stopped where max-force-std passes ``--stop-above``
   (1.0 eV/Å: far enough to leave frames above DP-GEN's trust window too), or, as the
   product explores by default (``stop_on_break``), at the first frame with a bond of its
   start broken, that frame left out (``--keep-broken``: as the first grid ran, before
   that rule; its results are kept in ``results/exploration``, the others in
   ``results/exploration-stop-on-break``);
4. select ``--n-select`` of this round's explored frames by the strategy;
5. label them with a real labeler (PySCF, ``--method``/``--basis``, default HF/STO-3G: a
   real method cheap enough for hours on 2 cores) and add them to the training set.

Strategies: bald-ef (top-k), bald-ef-diverse, bald-f, trust-window (DP-GEN: random within
max-force-std in [0.05, 0.15) eV/Å) and random over the explored frames; bald-ef-ale is
bald-ef with the aleatoric variances rescaled on the training residuals
(``posterior.recal_aleatoric``); trust-window-adaptive is DP-GEN2's window with an adaptive
lower level (:func:`adaptive_lower`), the fair version of the fixed window from a small
start; bald-ef-capped is bald-ef among the frames below that window's upper level (0.5
eV/Å), the frames DP-GEN counts as failed left out; bald-ef-power draws frames with
probability ∝ BALD-EF (``selection: power``), bald-ef-power-capped among the frames at or
below 0.5 eV/Å (``selection: power`` with ``max_force_std_cap: 0.5``),
bald-ef-diverse-capped the same with ``diverse``; bald-ef-diverse-guarded and random-guarded
train on the labels within a Boltzmann ceiling only; bald-ef-diverse-zbl and random-zbl use
a model with the ZBL repulsion (``model.zbl``); bald-ef-epig chooses by expected
predictive information gain about the explored pool (:func:`epig_select`).

Test sets, labelled once with the same method and never seen by a campaign:
``hot``: 60 frames of high-temperature reference MD (ethanol rMD17; acac 600 K);
``torsion``: a methyl rotation in 15° steps (energies and forces); ``stretch``: an O-H
stretch (ethanol) or the enol proton moved to the other oxygen (acac), energies alone (as
codes write such paths). After the last round, MD stability: the time until a 1000 K MD
with the final model breaks (bonds, distances, energy; bayes_model.stability), over
``--stability-seeds`` seeds.

Everything is written under ``--out`` as it goes (labelled sets, per-round metrics), by
default into ``benchmarks/results/exploration-stop-on-break`` in the repository, so that
sessions add up: commit it (the final round's model stays beside it, not committed). A
rerun resumes at the first unfinished round of each campaign; a campaign whose newest model
is gone (models are not committed) starts again. ``--until HH:MM`` starts no campaign that
would not end by then; ``--defer-stability`` runs the rounds of every campaign first and a
later run without it adds the stability runs. ``--report-only`` prints the comparison: labels each
strategy needs to reach random's final hot-MD force MAE, errors at equal labels (mean ± sd
over seeds), bald-ef against trust-window per (seed, round), MD stability, and writes
exploration.png.

    nice python benchmarks/exploration.py --until 17:30                         # hours
    python benchmarks/exploration.py --out /tmp/x --molecules ethanol --seeds 1 \\
        --rounds 2 --epochs 20 --finetune-epochs 5 --strategies random        # minutes
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO, shared_data

RESULTS = REPO / "benchmarks" / "results" / "exploration-stop-on-break"
RESULTS_KEEP_BROKEN = REPO / "benchmarks" / "results" / "exploration"  # the first grid

STRATEGIES = {  # name -> (acquisition function, selection)
    "bald-ef": ("bald-ef", "top-k"),
    "bald-ef-diverse": ("bald-ef", "diverse"),
    "bald-f": ("bald-f", "top-k"),
    "trust-window": ("trust-window", "top-k"),
    "random": ("random", "top-k"),
    "bald-ef-ale": ("bald-ef", "top-k"),  # with posterior.recal_aleatoric (below)
    "trust-window-adaptive": ("max-force-std", "top-k"),  # selected by adaptive_lower()
    "bald-ef-capped": ("bald-ef", "top-k"),  # among frames with σ_F <= ADAPTIVE_HI only
    "bald-ef-power": ("bald-ef", "power"),  # drawn with probability ∝ BALD (Kirsch 2023)
    "bald-ef-epig": ("bald-ef", "top-k"),  # selected by epig_select()
    "bald-ef-power-capped": ("bald-ef", "power"),  # power among σ_F <= ADAPTIVE_HI only
    "bald-ef-diverse-capped": ("bald-ef", "diverse"),  # diverse among σ_F <= ADAPTIVE_HI
    "bald-ef-diverse-guarded": ("bald-ef", "diverse"),  # extreme labels not trained on
    "random-guarded": ("random", "top-k"),  # the same guard
    "bald-ef-diverse-zbl": ("bald-ef", "diverse"),  # model.zbl: a repulsive wall
    "random-zbl": ("random", "top-k"),
}
# strategies whose labels far above the Boltzmann range of the hottest exploration are left
# out of training and of the MD starts (:func:`guard_ceiling`); they are paid for all the same
GUARDED = ("bald-ef-diverse-guarded", "random-guarded")
GUARD_SDS = 6.0  # standard deviations above the mean


def guard_ceiling(n_atoms: int, temperature_K: float, sds: float = GUARD_SDS) -> float:
    """Energy above the lowest labelled one (eV) beyond which a label is left out: the
    potential energy of a classical harmonic molecule at ``temperature_K`` is Gamma
    distributed, f/2 kT on average with standard deviation sqrt(f/2) kT (f = 3N - 6
    vibrations), and this is the mean plus ``sds`` standard deviations (acac at 900 K:
    3.6 eV; ethanol: 2.3 eV). The lowest label sits above the minimum itself, so the
    ceiling is a little looser than that."""
    half_f = max(3 * n_atoms - 6, 1) / 2
    kt = 8.617333262e-5 * temperature_K
    return half_f * kt + sds * np.sqrt(half_f) * kt
POSTERIOR = {"bald-ef-ale": {"recal_aleatoric": True}}  # strategy -> posterior settings
MODEL = {"bald-ef-diverse-zbl": {"zbl": True}, "random-zbl": {"zbl": True}}  # -> ModelConfig
SOURCES = {  # molecule -> (300 K start frames, high-temperature test frames)
    "ethanol": ("ethanol/train.xyz", "ethanol/test_MD.xyz"),
    "acac": ("acac/train_300K.xyz", "acac/train_600K.xyz"),
}


ADAPTIVE_HI, ADAPTIVE_CANDIDATES = 0.5, 2  # eV/Å; candidates per label to select
# strategies that select among the frames with σ_F <= ADAPTIVE_HI only (the product's
# acquisition.max_force_std_cap, lifted when no frame is within it; campaigns run before it
# was used here filtered the pool first: the same selections for top-k and diverse, other
# draws for power, whose keys are per pool index)
CAPPED = ("bald-ef-capped", "bald-ef-power-capped", "bald-ef-diverse-capped")


def adaptive_lower(pool, n_select: int, rng) -> list:
    """DP-GEN2's trust window with an adaptive lower level (ExplorationReportAdaptiveLower):
    frames whose max-force-std (the explored frames' ``info``) is above level_f_hi
    (ADAPTIVE_HI, its default 0.5 eV/Å) are failed; of the rest, the max(numb_candi_f,
    rate_candi_f x n) with the highest deviation are candidates (rate 1 %; numb_candi_f, 200
    there for pools of 10⁴-10⁵ frames, is ADAPTIVE_CANDIDATES x n_select for pools of ~160)
    and n_select of them are drawn at random."""
    sigma = np.array([float(a.info.get("max_force_std", np.nan)) for a in pool])
    ok = np.flatnonzero(sigma <= ADAPTIVE_HI)
    n_candidates = min(len(ok), max(ADAPTIVE_CANDIDATES * n_select, int(0.01 * len(sigma))))
    candidates = ok[np.argsort(-sigma[ok], kind="stable")[:n_candidates]]
    picks = rng.choice(candidates, size=min(n_select, len(candidates)), replace=False)
    return [pool[i] for i in sorted(picks)]


def epig_select(posterior, pool, n_select: int) -> list:
    """Greedy batch EPIG (expected predictive information gain, Bickford-Smith et al.,
    AISTATS 2023) with the explored pool as the target distribution: the frame whose label
    tells most, on average, about the labels of the pool's frames, given the batch so far.

    The Gaussian model is the one ``diverse`` selection uses: noise-whitened covariance
    K(s,t) = a_s a_t C(s,t), a_s² = e^{2·BALD_s} − 1 (so ½ log(1 + K_ss) is the frame's
    BALD-EF) and C the cosine of standardised last-layer features. The information of y_s
    about y_t (unit noise on both) is −½ log(1 − K_st² / ((1 + K_ss)(1 + K_tt))); after a
    pick j, K ← K − K_:j K_j: / (1 + K_jj). BALD favours the pool's outliers (the frames
    where MD stopped); EPIG weighs a frame by how much of the pool it informs."""
    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.bayes_model.scoring import iter_scores

    if len(pool) <= n_select:
        return list(pool)
    (_, pred, scores), = list(iter_scores(posterior, pool, AcquisitionConfig(
        function="bald-ef", chunk_size=len(pool))))
    x = pred.features - pred.features.mean(0)
    x = x / (x.std(0) + 1e-12)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    a = np.sqrt(np.expm1(2 * np.clip(scores.score, 0, 50)))
    k = np.outer(a, a) * (u @ u.T)
    chosen: list[int] = []
    for _ in range(n_select):
        d = 1 + np.clip(np.diag(k), 0, None)
        rho2 = np.clip(k**2 / np.outer(d, d), 0, 1 - 1e-12)
        gain = -0.5 * np.log1p(-rho2).mean(1)
        gain[chosen] = -np.inf
        j = int(np.argmax(gain))
        chosen.append(j)
        k = k - np.outer(k[:, j], k[j, :]) / d[j]
    return [pool[i] for i in sorted(chosen)]


def _labeler(args):
    from bayesal.labelers import PySCFLabeler

    return PySCFLabeler(args.method, args.basis, threads=args.threads, timeout_s=600)


def _label(images, args, *, forces: bool = True):
    """Labelled copies of ``images`` (failed labels dropped, their count returned)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    results = _labeler(args).label_many(images, workers=1)
    out, failed = [], 0
    for atoms, res in zip(images, results, strict=True):
        if not res.ok:
            failed += 1
            continue
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, energy=res.energy,
                                       **({"forces": res.forces} if forces else {}))
        out.append(a)
    return out, failed


def _bonded(atoms):
    from bayesal.bayes_model.stability import bonds_of

    nbrs: dict[int, set[int]] = {i: set() for i in range(len(atoms))}
    for i, j in bonds_of(atoms):
        nbrs[int(i)].add(int(j))
        nbrs[int(j)].add(int(i))
    return nbrs


def torsion_scan(atoms, steps: int = 24):
    """A methyl group rotated about its bond in ``360/steps``° steps."""
    nbrs = _bonded(atoms)
    z = atoms.numbers
    cm = next(i for i in nbrs if z[i] == 6 and sum(z[j] == 1 for j in nbrs[i]) == 3)
    hs = sorted(j for j in nbrs[cm] if z[j] == 1)
    x = next(j for j in nbrs[cm] if z[j] != 1)
    y = next(j for j in nbrs[x] if j != cm and z[j] != 1)
    start = atoms.get_dihedral(y, x, cm, hs[0])
    out = []
    for k in range(steps):
        a = atoms.copy()
        a.set_dihedral(y, x, cm, hs[0], start + 360.0 * k / steps,
                       mask=[i in hs for i in range(len(a))])
        out.append(a)
    return out


def stretch_path(atoms, points: int = 14):
    """The hydroxyl H moved to the nearest other oxygen within 3.5 Å (a proton transfer),
    else pulled along its O-H bond to 2.2 Å (a dissociation)."""
    nbrs = _bonded(atoms)
    z = atoms.numbers
    o = next(i for i in nbrs if z[i] == 8 and any(z[j] == 1 for j in nbrs[i]))
    h = next(j for j in nbrs[o] if z[j] == 1)
    others = [i for i in range(len(atoms)) if z[i] == 8 and i != o
              and atoms.get_distance(o, i) < 3.5]
    p_o, p_h = atoms.positions[o], atoms.positions[h]
    if others:
        p_o2 = atoms.positions[others[0]]
        d0 = np.linalg.norm(p_h - p_o)
        u = (p_o2 - p_o) / np.linalg.norm(p_o2 - p_o)
        end = p_o2 - d0 * u
        targets = [p_h + t * (end - p_h) for t in np.linspace(0, 1, points)]
    else:
        u = (p_h - p_o) / np.linalg.norm(p_h - p_o)
        targets = [p_o + r * u for r in np.linspace(0.85, 2.2, points)]
    out = []
    for t in targets:
        a = atoms.copy()
        a.positions[h] = t
        out.append(a)
    return out


def prepare(molecule: str, folder: Path, args) -> dict[str, Path]:
    """Start frames and test sets, labelled once with the benchmark's method (cached)."""
    import ase.io

    folder.mkdir(parents=True, exist_ok=True)
    files = {k: folder / f"{k}.xyz" for k in ("start", "hot", "torsion", "stretch")}
    if all(p.is_file() for p in files.values()):
        return files
    start_file, hot_file = SOURCES[molecule]
    frames = ase.io.read(shared_data() / start_file, ":")
    rng = np.random.default_rng(7)
    pick = sorted(rng.choice(len(frames), size=40, replace=False))
    start = [frames[i] for i in pick]
    hot = ase.io.read(shared_data() / hot_file, ":")
    hot = [hot[i] for i in sorted(np.random.default_rng(8).choice(len(hot), 60,
                                                                   replace=False))]
    sets = {"start": (start, True), "hot": (hot, True),
            "torsion": (torsion_scan(start[0]), True),
            "stretch": (stretch_path(start[0]), False)}
    for name, (images, forces) in sets.items():
        if files[name].is_file():
            continue
        t0 = time.perf_counter()
        labelled, failed = _label([_bare(a) for a in images], args, forces=forces)
        ase.io.write(files[name], labelled, format="extxyz")
        print(f"{molecule} {name}: {len(labelled)} labels ({failed} failed) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return files


def _bare(atoms):
    from ase import Atoms

    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                 pbc=atoms.pbc)


def run_campaign(molecule: str, strategy: str, seed: int, files: dict[str, Path],
                 folder: Path, args) -> None:
    import ase.io

    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.bayes_model.calibration import evaluate_prediction
    from bayesal.bayes_model.config import TrainingFile
    from bayesal.bayes_model.ensemble import split_validation_stable
    from bayesal.bayes_model.explore import explore
    from bayesal.bayes_model.posterior import load_posterior, train_posterior
    from bayesal.bayes_model.predict import calibrate
    from bayesal.bayes_model.scoring import score_pool
    from bayesal.bayes_model.stability import times_to_break
    from bayesal.bayes_model.train import TrainConfig

    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"rounds": []}
    if "stability" in state:
        return
    done = _rounds_done(state, args)
    if done and args.defer_stability:
        return
    last = len(state["rounds"]) - 1
    if last >= 0 and not (folder / f"round-{last}").is_dir():
        if done:  # a finished campaign's labels and figures stand; only the model is gone
            print(f"{folder}: every round ran but its final model is not here (models are "
                  "not kept in the repository): no stability run for it", flush=True)
            return
        # a campaign cut off mid-way in an earlier session (its newest model, which the next
        # round warm-starts from, is not kept in the repository): it starts again
        print(f"{folder}: restarting (round-{last} model missing)", flush=True)
        import shutil

        shutil.rmtree(folder)
        state = {"rounds": []}
    folder.mkdir(parents=True, exist_ok=True)
    state.setdefault("code", _revision())
    train_file = folder / "train.xyz"
    if not train_file.is_file():
        start = ase.io.read(files["start"], ":")
        picks = np.random.default_rng(seed).choice(len(start), size=args.initial,
                                                   replace=False)
        ase.io.write(train_file, [start[i] for i in sorted(picks)], format="extxyz")
    tests = {k: ase.io.read(files[k], ":") for k in ("hot", "torsion", "stretch")}
    function, selection = STRATEGIES[strategy]
    temps = args.temperatures
    while len(state["rounds"]) < args.rounds:
        r = len(state["rounds"])
        t0 = time.perf_counter()
        labelled = ase.io.read(train_file, ":")
        keep = list(range(len(labelled)))
        if strategy in GUARDED:
            energy = np.array([a.get_potential_energy() for a in labelled])
            ceiling = guard_ceiling(len(labelled[0]), max(temps))
            keep = [i for i in keep if energy[i] - energy.min() <= ceiling]
        # ids of the full list: a label left out does not move the others' split
        train, valid = split_validation_stable([labelled[i] for i in keep],
                                               [str(i) for i in keep], 0.1, seed=seed)
        previous = folder / f"round-{r - 1}" if r > 0 else None
        epochs = args.epochs if previous is None else args.finetune_epochs
        settings = TrainingFile(device="cpu", train=TrainConfig(
            max_epochs=epochs, seed=seed + 1000 * r, patience=10**6,
            allow_undertrained=True, keep_train_state="none"),
            posterior=POSTERIOR.get(strategy, {}), model=MODEL.get(strategy, {}))
        model_dir = folder / f"round-{r}"
        train_posterior("ensemble", train, valid, model_dir, settings=settings,
                        members=args.members, init_from=previous)
        posterior = load_posterior(model_dir)
        record = {"round": r, "n_labels": len(labelled), "n_trained_on": len(keep),
                  "train_s": time.perf_counter() - t0}
        for name, images in tests.items():
            pred = posterior.predict(images)
            metrics = evaluate_prediction(pred, images, profile=True)
            record.update({f"{name}_{k}": v for k, v in metrics.items()
                           if isinstance(v, float)})
            if name == "hot":  # what the energy σ is made of, raw and as scoring sees it
                cal = calibrate(posterior, pred)
                for tag, p in (("", pred), ("_calibrated", cal)):
                    record[f"hot_energy_sigma_epi_median{tag}"] = float(
                        np.median(np.sqrt(p.energy_var_epi)))
                    record[f"hot_energy_sigma_ale_median{tag}"] = float(
                        np.median(np.sqrt(p.energy_var_ale)))
        temperature = temps[min(r, len(temps) - 1)]
        rng = np.random.default_rng(seed + 7 * r)
        md_seeds = [labelled[i] for i in rng.choice(keep, size=min(args.md_seeds, len(keep)),
                                                     replace=False)]
        trajectories = explore(posterior, md_seeds, temperatures_K=[temperature],
                               steps=args.md_steps, record_every=10,
                               max_force_std_threshold=args.stop_above, seed=seed + r,
                               stop_on_break=not args.keep_broken)
        pool = [f for t in trajectories for f in t.frames]
        # the product's cap for the capped strategies (lifted when no frame is within it),
        # none for the others whatever the product's default
        config = AcquisitionConfig(function=function, selection=selection,
                                   n_select=args.n_select,
                                   max_force_std_cap=ADAPTIVE_HI if strategy in CAPPED
                                   else None)
        if strategy == "trust-window-adaptive":
            chosen = adaptive_lower(pool, args.n_select, np.random.default_rng(seed + r))
        elif strategy == "bald-ef-epig":
            chosen = epig_select(posterior, pool, args.n_select)
        else:
            chosen = [c.atoms for c in score_pool(posterior, pool, config,
                                                  seed=seed + r).selected]
        # the model's energies of its picks, to set beside their labels: would a rule on the
        # predicted energy have kept the labels far above the Boltzmann range out?
        picked_pred = posterior.predict(chosen).energy.tolist() if chosen else []
        new, failed = _label([_bare(a) for a in chosen], args)
        ase.io.write(train_file, labelled + new, format="extxyz")
        sigma = np.array([float(a.info.get("max_force_std", np.nan)) for a in pool])
        lo, hi = config.trust_lo, config.trust_hi
        record.update(temperature_K=temperature, n_explored=len(pool),
                      n_trajectories_broken=sum(t.stopped == "broken" for t in trajectories),
                      explored_max_force_std_quantiles=(
                          np.nanquantile(sigma, [0, 0.25, 0.5, 0.75, 1]).tolist()
                          if len(pool) else []),
                      n_explored_in_trust_window=int(((sigma >= lo) & (sigma < hi)).sum()),
                      n_selected=len(chosen), n_failed=failed,
                      picked_max_force_std=[float(a.info.get("max_force_std", np.nan))
                                            for a in chosen],
                      picked_energy_pred=picked_pred,  # eV, in the order of chosen
                      labelled_energy=[float(a.get_potential_energy()) for a in new],
                      round_s=time.perf_counter() - t0)
        if previous is not None and previous.is_dir():
            import shutil

            shutil.rmtree(previous)  # only the newest model is needed (warm start)
        state["rounds"].append(record)
        state_file.write_text(json.dumps(state, indent=1))
        print(f"{molecule} {strategy} s{seed} round {r}: {len(labelled)} labels, hot force "
              f"MAE {record.get('hot_force_mae', float('nan')):.4f} eV/Å, {len(pool)} "
              f"explored at {temperature:g} K, {record['round_s']:.0f} s", flush=True)
    if "stability" not in state and not args.defer_stability:
        t_stab = time.perf_counter()
        last = folder / f"round-{args.rounds - 1}"
        posterior = load_posterior(last)
        start = ase.io.read(files["start"], "0")
        breaks = times_to_break(posterior, start, seeds=range(args.stability_seeds),
                                temperature_K=1000.0, steps=args.stability_steps)
        state["stability"] = [{"time_fs": b.time_fs, "broken": b.broken, "reason": b.reason}
                              for b in breaks]
        state["wall_s"] = sum(r["round_s"] for r in state["rounds"]) + (
            time.perf_counter() - t_stab)
        state_file.write_text(json.dumps(state, indent=1))
        # The final model stays (about 1 MB, ignored by git) for later looks at it, e.g.
        # longer stability runs; a checkout without it reports from state.json alone.


def _revision() -> str:
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    return proc.stdout.strip() or "unknown"


def _rounds_done(state: dict, args) -> bool:
    """Every round of the campaign ran (its stability runs may be left for later)."""
    return len(state.get("rounds", [])) >= args.rounds


def _campaign_minutes(out: Path) -> float:
    """What a campaign has taken here (median of the finished ones; 15 before any)."""
    walls = [json.loads(f.read_text()).get("wall_s") for f in out.glob("*/*/state.json")]
    walls = [w for w in walls if w]
    return float(np.median(walls)) / 60 if walls else 15.0


def _labels_to_reach(curve, target: float) -> float | None:
    """Labels at which a (labels, error) curve first reaches ``target`` (interpolated)."""
    for (n0, e0), (n1, e1) in itertools.pairwise(curve):
        if e0 <= target:
            return n0
        if e1 <= target:
            return n0 + (n1 - n0) * (e0 - target) / (e0 - e1)
    if curve and curve[-1][1] <= target:
        return curve[-1][0]
    return None


def report(out: Path, args) -> None:
    results = {}
    for molecule in args.molecules:
        for strategy in args.strategies:
            for seed in range(args.seeds):
                f = out / molecule / f"{strategy}-s{seed}" / "state.json"
                state = json.loads(f.read_text()) if f.is_file() else {}
                if _rounds_done(state, args):  # finished campaigns only
                    results[(molecule, strategy, seed)] = state
    if not results:
        print("no finished campaign yet")
        return
    for molecule in args.molecules:
        print(f"\n{molecule}: hot-MD force MAE (meV/Å) by round, mean ± sd over seeds")
        curves = {}
        for strategy in args.strategies:
            if (curve := _curve(results, args, molecule, strategy)) is None:
                continue
            labels, errs = curves[strategy] = curve
            cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(errs.mean(0), errs.std(0),
                                                          strict=True)]
            runs = [b for s in range(args.seeds)
                    for b in results.get((molecule, strategy, s), {}).get("stability", [])]
            stab = [b["time_fs"] for b in runs]
            print(f"  {strategy:21s} " + " | ".join(cells)
                  + (f"  | 1000 K MD: {sum(b['broken'] for b in runs)} of {len(runs)} "
                     f"broke; mean time to break {np.mean(stab):.0f} fs (unbroken runs "
                     "count their whole length)" if stab else ""))
        for strategy in curves if "random" in curves else ():
            # over the seeds both finished: seeds differ more than strategies do on acac
            seeds = [s for s in range(args.seeds) if (molecule, strategy, s) in results
                     and (molecule, "random", s) in results]
            if not seeds:
                continue
            labels, errs = _curve(results, args, molecule, "random", seeds)
            target, base = errs.mean(0)[-1], labels[-1]
            lab, e = _curve(results, args, molecule, strategy, seeds)
            need = _labels_to_reach(list(zip(lab, e.mean(0), strict=True)), target)
            share = "not reached" if need is None else f"{100 * need / base:.0f} %"
            print(f"  {strategy:21s} labels to reach random's final {target:.1f} meV/Å "
                  f"(seeds {','.join(map(str, seeds))}): {share} of random's {base}")
        for a, b in (("bald-ef", "trust-window"), ("bald-ef", "trust-window-adaptive"),
                     ("bald-ef", "random"), ("bald-ef-ale", "bald-ef"),
                     ("bald-ef-capped", "bald-ef"), ("bald-ef-capped", "random"),
                     ("bald-ef-capped", "trust-window-adaptive"),
                     ("bald-ef-power", "bald-ef"), ("bald-ef-power", "random"),
                     ("bald-ef-power", "trust-window-adaptive"),
                     ("bald-ef-diverse", "random"), ("bald-ef-diverse", "trust-window-adaptive"),
                     ("bald-ef-power-capped", "bald-ef-power"),
                     ("bald-ef-power-capped", "random"),
                     ("bald-ef-power-capped", "trust-window-adaptive"),
                     ("bald-ef-diverse-capped", "bald-ef-diverse"),
                     ("bald-ef-diverse-capped", "random"),
                     ("bald-ef-diverse-capped", "trust-window-adaptive"),
                     ("bald-ef-epig", "bald-ef"), ("bald-ef-epig", "random"),
                     ("bald-ef-diverse-zbl", "random-zbl"), ("bald-ef-diverse-zbl", "random"),
                     ("bald-ef-diverse-zbl", "bald-ef-diverse")):
            _versus(results, args, molecule, a, b)
        _diagnostics(results, args, molecule)
    _plot(results, args, out)


def _label_heights(args, molecule: str, strategy: str) -> tuple[float, float] | None:
    """Median energy of the frames a strategy labelled (all seeds, the starting structures
    left out) and of the hot test frames, both above the hot set's lowest energy (eV):
    whether a strategy labels the test distribution or far above it."""
    import ase.io

    hot_file = args.out / molecule / "tests" / "hot.xyz"
    files = [args.out / molecule / f"{strategy}-s{s}" / "train.xyz" for s in range(args.seeds)]
    picked = [a.get_potential_energy() for f in files if f.is_file()
              for a in ase.io.read(f, f"{args.initial}:")]
    if not picked or not hot_file.is_file():
        return None
    hot = np.array([a.get_potential_energy() for a in ase.io.read(hot_file, ":")])
    return float(np.median(picked) - hot.min()), float(np.median(hot) - hot.min())


def _diagnostics(results, args, molecule: str) -> None:
    """What each strategy picked and how well the final models know their errors (means
    over seeds): the picked frames' max-force-std (rounds after the first), the hot-MD
    energy σ's 68 % coverage (0.68 when calibrated) and Spearman ρ(|error|, σ) for energies
    and forces, and the final errors on the torsion scan and the stretch path."""
    rows = []
    for strategy in args.strategies:
        runs = [results[(molecule, strategy, s)]["rounds"] for s in range(args.seeds)
                if (molecule, strategy, s) in results]
        if not runs:
            continue
        picks = [x for run in runs for r in run[1:] for x in r["picked_max_force_std"]]
        last = [run[-1] for run in runs]

        def mean(key: str, scale: float = 1.0, last=last) -> float:
            return scale * float(np.mean([r.get(key, np.nan) for r in last]))

        window = [r["n_explored_in_trust_window"] for run in runs for r in run[1:]
                  if "n_explored_in_trust_window" in r]
        explored = [r["n_explored"] for run in runs for r in run[1:]
                    if "n_explored_in_trust_window" in r]
        in_window = (f" ({np.mean(window):.0f} of {np.mean(explored):.0f} explored in "
                     "the trust window)" if window else "")
        if "hot_energy_sigma_ale_median" in last[0]:
            in_window += (f" | hot σ_E epi/ale {mean('hot_energy_sigma_epi_median', 1000):.0f}/"
                          f"{mean('hot_energy_sigma_ale_median', 1000):.0f} meV (calibrated "
                          f"{mean('hot_energy_sigma_epi_median_calibrated', 1000):.0f}/"
                          f"{mean('hot_energy_sigma_ale_median_calibrated', 1000):.0f}), E MAE "
                          f"{mean('hot_energy_mae', 1000):.0f} meV")
        picked = f"picked σ_F {np.mean(picks):.3f} eV/Å" if picks else "picked nothing"
        if (height := _label_heights(args, molecule, strategy)) is not None:
            picked += (f", labelled {height[0]:.2f} eV above the hot set's lowest (hot set: "
                       f"{height[1]:.2f}; medians)")
        rows.append(f"  {strategy:21s} {picked}{in_window} | hot E cov68 "
                    f"{mean('hot_energy_coverage68'):.2f}, ρE {mean('hot_energy_spearman'):+.2f}"
                    f", ρF {mean('hot_force_spearman'):+.2f} | torsion F MAE "
                    f"{mean('torsion_force_mae', 1000):.0f} meV/Å, stretch E profile MAE "
                    f"{mean('stretch_energy_profile_mae', 1000):.0f} meV  (n={len(runs)})")
    if rows:
        print("  diagnostics (final round unless said):")
        print("\n".join(rows))


def _curve(results, args, molecule: str, strategy: str, seeds=None):
    """(labels, hot-MD force MAE in meV/Å per seed x round) over the rounds every seed of
    ``strategy`` (of ``seeds``, default all) has finished; None before any."""
    runs = [results[(molecule, strategy, s)]["rounds"] for s in (seeds or range(args.seeds))
            if (molecule, strategy, s) in results]
    if not runs:
        return None
    n = min(len(r) for r in runs)
    labels = [runs[0][k]["n_labels"] for k in range(n)]
    return labels, np.array([[1000 * r[k]["hot_force_mae"] for k in range(n)] for r in runs])


def _versus(results, args, molecule: str, a: str, b: str) -> None:
    """Per seed and round after the first (round 0 is the same for every strategy): is
    ``a``'s hot-MD force MAE below ``b``'s at ``a``'s label count (``b``'s curve
    interpolated; ``b`` may have labelled fewer: DP-GEN labels only what its window holds)?"""
    if not any((molecule, a, s) in results for s in range(args.seeds)):
        return  # nothing of ``a`` finished yet
    wins = pairs = 0
    for seed in range(args.seeds):
        ra = results.get((molecule, a, seed), {}).get("rounds", [])
        rb = results.get((molecule, b, seed), {}).get("rounds", [])
        if len(ra) < 2 or len(rb) < 2:
            continue
        lb = [r["n_labels"] for r in rb]
        eb = [r["hot_force_mae"] for r in rb]
        for r in ra[1:]:
            n = r["n_labels"]
            if not lb[0] <= n <= lb[-1]:
                continue
            pairs += 1
            wins += r["hot_force_mae"] < float(np.interp(n, lb, eb))
    if pairs:
        print(f"  {a} below {b} at equal labels in {wins} of {pairs} (seed, round) pairs "
              f"({100 * wins / pairs:.0f} %)")
    elif seen := [results[(molecule, b, s)]["rounds"][-1]["n_labels"]
                  for s in range(args.seeds) if (molecule, b, s) in results]:
        print(f"  {a} vs {b}: no equal-label pairs ({b} ended with {min(seen)}-{max(seen)} "
              "labels: its selection stayed empty)")


def _plot(results, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.molecules), figsize=(6 * len(args.molecules), 4),
                             squeeze=False)
    for ax, molecule in zip(axes[0], args.molecules, strict=True):
        for strategy in args.strategies:
            if (curve := _curve(results, args, molecule, strategy)) is None:
                continue
            labels, errs = curve
            ax.plot(labels, errs.mean(0), marker="o", label=strategy)
            ax.fill_between(labels, errs.min(0), errs.max(0), alpha=0.15)
        ax.set(xlabel="labels", ylabel="hot-MD force MAE (meV/Å)", title=molecule)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no campaign finished yet", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "exploration.png", dpi=120)


SETTINGS = ("rounds", "initial", "n_select", "members", "epochs", "finetune_epochs",
            "temperatures", "md_seeds", "md_steps", "stop_above", "stability_seeds",
            "stability_steps", "method", "basis", "keep_broken")


def _same_settings(args) -> None:
    """A results folder holds one experiment: its settings are written on the first run
    and a resume with others is refused (campaigns must be comparable)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "settings.json"
    mine = {k: getattr(args, k) for k in SETTINGS}
    if path.is_file():
        theirs = json.loads(path.read_text())
        if diff := {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}:
            sys.exit(f"{args.out} was run with other settings {diff} (saved, given); use "
                     "those or another --out")
    else:
        path.write_text(json.dumps(mine, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: the one kept in the repository for "
                             "the exploration chosen, results/exploration-stop-on-break or, "
                             "with --keep-broken, results/exploration)")
    parser.add_argument("--until", default=None,
                        help="HH:MM (today, local time): start no campaign that would not "
                             "end by then (a cut-off one starts again on the next run)")
    parser.add_argument("--campaign-minutes", type=float, default=None,
                        help="what --until expects a campaign to take (default: the median "
                             "of the finished ones, which a busy machine inflates)")
    parser.add_argument("--molecules", nargs="+", default=list(SOURCES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--initial", type=int, default=8)
    parser.add_argument("--n-select", type=int, default=8)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--finetune-epochs", type=int, default=40)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300, 600, 900])
    parser.add_argument("--md-seeds", type=int, default=8)
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--stop-above", type=float, default=1.0,
                        help="stop a trajectory where max-force-std passes this, eV/Å")
    parser.add_argument("--keep-broken", action="store_true",
                        help="explore as before stop_on_break: trajectories go on past a "
                             "broken bond and such frames are candidates (the first grid)")
    parser.add_argument("--stability-seeds", type=int, default=6)
    parser.add_argument("--stability-steps", type=int, default=2000)
    parser.add_argument("--defer-stability", action="store_true",
                        help="run every campaign's rounds and leave the final models' "
                             "stability runs to a later run without this flag (they do not "
                             "change the campaign; a grid gets its error curves ~25 %% "
                             "sooner)")
    parser.add_argument("--method", default="hf")
    parser.add_argument("--basis", default="sto-3g")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS_KEEP_BROKEN if args.keep_broken else RESULTS
    if not args.report_only:
        import torch

        # Everything a campaign uses, imported now: a long run is not changed by edits to
        # the checkout while it goes.
        import bayesal.bayes_model.calibration
        import bayesal.bayes_model.explore
        import bayesal.bayes_model.posterior
        import bayesal.bayes_model.scoring
        import bayesal.bayes_model.stability
        import bayesal.labelers  # noqa: F401

        torch.set_num_threads(args.threads)
        _same_settings(args)
        files = {m: prepare(m, args.out / m / "tests", args) for m in args.molecules}
        deadline = None
        if args.until:
            import datetime as dt

            deadline = dt.datetime.combine(dt.date.today(),
                                           dt.time.fromisoformat(args.until)).timestamp()
        for seed in range(args.seeds):  # seeds outermost: every molecule and strategy gets
            for molecule in args.molecules:  # seed 0 before any gets seed 1
                for strategy in args.strategies:
                    folder = args.out / molecule / f"{strategy}-s{seed}"
                    state = (json.loads((folder / "state.json").read_text())
                             if (folder / "state.json").is_file() else {})
                    done = _rounds_done(state, args) and (args.defer_stability
                                                          or "stability" in state)
                    if (not done and deadline is not None
                            and time.time() + 60 * (args.campaign_minutes
                                                    or _campaign_minutes(args.out)) > deadline):
                        print(f"stopping before {folder.name} of {molecule}: it would not "
                              f"end by {args.until}", flush=True)
                        report(args.out, args)
                        return
                    run_campaign(molecule, strategy, seed, files[molecule], folder, args)
    report(args.out, args)


if __name__ == "__main__":
    sys.exit(main())
