"""Benchmark: cost and quality of last-layer Laplace scoring vs the 4-member ensemble, by
``force_rank`` (the number of posterior eigen-directions used for force covariances).

Reuses the model directories written by ``benchmarks/uncertainty.py --out DIR`` (``plain``
and ``ensemble``); fits Laplace from ``plain`` in this run and times scoring (predict +
BALD-EF, as scoring does it: without recalibration here, and without the mean forces, which
scoring does not need and Laplace then skips) of the OOD pool against the ensemble in the
same run.

    python benchmarks/uncertainty.py --out /tmp/unc && python benchmarks/laplace_cost.py /tmp/unc
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import shared_data
from scipy.stats import spearmanr
from uncertainty import split

from bayesal.bayes_model.acquisition import score
from bayesal.bayes_model.calibration import ood_auroc
from bayesal.bayes_model.checkpoint import load_members
from bayesal.bayes_model.data import atoms_to_graph
from bayesal.bayes_model.laplace import LastLayerLaplace
from bayesal.bayes_model.metrics import accuracy_metrics
from bayesal.bayes_model.posterior import load_posterior
from bayesal.bayes_model.predict import predict_calibrated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, help="--out directory of benchmarks/uncertainty.py")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--ranks", default="1,2,4,8", help="force_rank values besides exact")
    args = ap.parse_args()
    train, _, test, ood = split(shared_data(), args.n_test)
    ensemble = load_posterior(args.models / "ensemble")
    def scoring_seconds(posterior, repeats: int = 3) -> tuple[float, object]:
        """The fastest of ``repeats`` timed scorings after a warm-up call (this machine is
        noisy; the first call pays one-off setup)."""
        predict_calibrated(posterior, ood[:4], recalibrated=False, mean_forces=False)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = score(predict_calibrated(posterior, ood, recalibrated=False,
                                           mean_forces=False), "bald-ef").score
            best = min(best, time.perf_counter() - t0)
        return best, out

    ens_s, _ = scoring_seconds(ensemble)
    ens_auc = ood_auroc(ensemble.predict(test), ensemble.predict(ood))["ood_auroc_force"]
    ens_rho = accuracy_metrics(ensemble.predict(test), test)["force_spearman"]

    (model,), _ = load_members(args.models / "plain")
    graphs = [atoms_to_graph(a, model.species, model.config.cutoff) for a in train]
    t0 = time.perf_counter()
    exact = LastLayerLaplace.fit(model, graphs)
    fit_s = time.perf_counter() - t0
    print(f"Laplace fit on {len(train)} structures: {fit_s:.1f} s "
          f"({model.n_features} last-layer weights, prior precision {exact.prior_precision:.3g})")
    print(f"{'force_rank':<11}{'score s':>8}{'ens/lap':>8}{'trace %':>8}{'ρ_F ID':>7}"
          f"{'AUROC F':>8}{'ρ(score, exact)':>16}")
    print(f"{'ensemble':<11}{ens_s:>8.1f}{1.0:>8.2f}{'':>8}{ens_rho:>7.2f}{ens_auc:>8.3f}")
    reference = None
    for rank in [None, *map(int, args.ranks.split(","))]:
        lap = LastLayerLaplace(model, exact.ggn, exact.prior_precision, force_rank=rank)
        lap_s, scores = scoring_seconds(lap)
        reference = scores if reference is None else reference
        m = accuracy_metrics(lap.predict(test), test)
        auc = ood_auroc(lap.predict(test), lap.predict(ood))["ood_auroc_force"]
        frac = lap.diagnostics.get("force_rank_trace_fraction", 1.0)
        print(f"{'exact' if rank is None else rank:<11}{lap_s:>8.1f}{ens_s / lap_s:>8.2f}"
              f"{100 * frac:>8.1f}{m['force_spearman']:>7.2f}{auc:>8.3f}"
              f"{spearmanr(scores, reference).statistic:>16.2f}")
    print("ens/lap = scoring seconds of the ensemble / of Laplace (> 1: Laplace is cheaper); "
          "trace % = share of tr Σ kept for forces; last column: rank agreement of BALD-EF "
          "scores with exact Laplace")


if __name__ == "__main__":
    main()
