"""Variance recalibration on small validation sets: the prior weight ν₀ against plain
maximum likelihood, on the rounds of an active-learning benchmark run.

Every round of a campaign stores its model; its validation split (10 % of the labels so
far, stable by content hash) is rebuilt from the database exactly as the round's training
step drew it (checked against the count in the stored calibration.json). For each ν₀ the
variance scales are refitted on that split with ``bayes_model.calibration.fit_recalibration``
and judged on the campaign's test set (400 structures): Gaussian NLL and coverage of the
68 % interval, for energies and force components. "oracle" fits the scales on the test set
itself (ν₀ = 0), the best a single scale can do.

    python benchmarks/recalibration_prior.py --out bench-al [--campaigns bald-ef-s0 ...]

``--out`` is the directory of ``benchmarks/active_learning.py`` (al.db, data/campaigns).
Writes recalibration_prior.json there; a rerun judges only rounds not in it yet.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from _common import REPO  # noqa: F401  (puts the repository on sys.path)

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def round_sets(engine, campaign: str):
    """(round index, model dir, validation images, test images) of each stored round."""
    from sqlalchemy import select

    from bayesal.bayes_model.ensemble import split_validation_stable
    from bayesal.db.engine import session_scope
    from bayesal.db.identity import atoms_hash
    from bayesal.db.models import Campaign, Label, Round, Structure
    from bayesal.db.pool import labelled_atoms

    with session_scope(engine) as s:
        c = s.execute(select(Campaign).where(Campaign.name == campaign)).scalar_one()
        cfg, cid = c.config, c.id
        index = dict(s.execute(select(Round.id, Round.round_index)
                               .where(Round.campaign_id == cid)).all())
        labels = s.execute(select(Label.structure_id, Label.round_id, Label.settings_hash)
                           .join(Structure, Structure.id == Label.structure_id)
                           .where(Structure.campaign_id == cid)).all()
    labelled_in = {sid: index.get(rid, -1) if rid is not None else -1 for sid, rid, _ in labels}
    settings_hash = labels[0][2]
    images = labelled_atoms(engine, campaign, settings_hash)
    test = labelled_atoms(engine, campaign, settings_hash, test=True)
    root = Path(engine.url.database).parent / "data" / "campaigns" / campaign
    for directory in sorted(root.glob("round-*")):
        k = int(directory.name.split("-")[1])
        model = directory / "model"
        if not (model / "calibration.json").is_file():
            continue  # an unfinished round
        seen = [a for a in images if labelled_in[a.info["structure_id"]] < k]
        _, valid = split_validation_stable(seen, [atoms_hash(a) for a in seen],
                                           cfg["data"]["valid_fraction"], seed=cfg["seed"])
        stored = json.loads((model / "calibration.json").read_text())["fitted_on"]
        if stored["structures"] != len(valid):
            raise SystemExit(f"{campaign} round {k}: rebuilt {len(valid)} validation "
                             f"structures, the model was calibrated on {stored['structures']}")
        yield k, model, valid, test


def judge(pred, test, recal) -> dict[str, float]:
    from bayesal.bayes_model.calibration import calibration_metrics
    from bayesal.bayes_model.metrics import accuracy_metrics

    scaled = recal.apply(pred)  # no isotonic maps: the scaled Gaussians are the whole story
    acc, cal = accuracy_metrics(scaled, test), calibration_metrics(scaled, test)
    return {"energy_nll": acc["energy_nll"], "force_nll": acc["force_nll"],
            "energy_cov68": cal["energy_coverage68"], "force_cov68": cal["force_coverage68"],
            "energy_scale": recal.energy_scale, "force_scale": recal.force_scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--campaigns", nargs="*", help="default: every campaign in al.db")
    ap.add_argument("--weights", type=float, nargs="*", default=list(WEIGHTS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    import torch
    from sqlalchemy import select

    from bayesal.bayes_model.calibration import fit_recalibration
    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.db import make_engine
    from bayesal.db.engine import session_scope
    from bayesal.db.models import Campaign

    torch.set_num_threads(args.threads)
    if not (args.out / "al.db").is_file():
        raise SystemExit(f"{args.out / 'al.db'} not found: run benchmarks/active_learning.py "
                         f"--out {args.out} first")
    engine = make_engine(f"sqlite:///{args.out / 'al.db'}", readonly=True)
    campaigns = args.campaigns
    if not campaigns:
        with session_scope(engine) as s:
            campaigns = sorted(s.execute(select(Campaign.name)).scalars())
    results = args.out / "recalibration_prior.json"
    weights = [f"{w:g}" for w in args.weights]
    done = {(r["campaign"], r["round"]): r for r in
            (json.loads(results.read_text()) if results.is_file() else [])
            if all(w in r for w in weights)}  # rounds judged before: not again
    rows = []
    for campaign in campaigns:
        for k, model, valid, test in round_sets(engine, campaign):
            if (campaign, k) in done:
                rows.append(done[(campaign, k)])
                continue
            posterior = load_posterior(model)
            pv, pt = posterior.predict(valid), posterior.predict(test)
            row = {"campaign": campaign, "round": k, "n_valid": len(valid),
                   "oracle": judge(pt, test, fit_recalibration(pt, test, prior_weight=0))}
            for w in args.weights:
                row[f"{w:g}"] = judge(pt, test, fit_recalibration(pv, valid, prior_weight=w))
            rows.append(row)
            done[(campaign, k)] = row
            print(f"{campaign} round {k}: {len(valid)} validation structures, energy scale "
                  + " ".join(f"ν₀={w:g}: {row[f'{w:g}']['energy_scale']:.3g}"
                             for w in args.weights)
                  + f", test-optimal {row['oracle']['energy_scale']:.3g}", flush=True)
            results.write_text(json.dumps(list(done.values()), indent=1))
    report(rows, weights)


def report(rows: list[dict], weights: list[str]) -> None:
    n_valid = [r["n_valid"] for r in rows]
    print(f"\n{len(rows)} rounds of {len({r['campaign'] for r in rows})} campaigns, "
          f"{min(n_valid)}-{max(n_valid)} validation structures (median "
          f"{np.median(n_valid):g}); test judged on each campaign's test set")
    print(f"{'ν₀':>7} | {'energy NLL mean':>15} {'median':>7} {'cov68 mean':>10} {'min':>5} "
          f"{'<0.5':>5} | {'force NLL':>9} {'cov68 mean':>10} {'min':>5}")
    for w in [*weights, "oracle"]:
        g = {key: np.array([r[w][key] for r in rows]) for key in rows[0][w]}
        print(f"{w:>7} | {g['energy_nll'].mean():15.3f} {np.median(g['energy_nll']):7.3f} "
              f"{g['energy_cov68'].mean():10.2f} {g['energy_cov68'].min():5.2f} "
              f"{np.mean(g['energy_cov68'] < 0.5):5.0%} | {g['force_nll'].mean():9.3f} "
              f"{g['force_cov68'].mean():10.2f} {g['force_cov68'].min():5.2f}")
    print("NLL per energy (nats) and per atom's force vector; cov68: share of test values in "
          "the central 68 % interval (ideal 0.68); <0.5: share of rounds below 0.5")


if __name__ == "__main__":
    main()
