"""Plotly figures of the dashboard, built from the frames of :mod:`dashboard.data`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["labeling_figure", "learning_curve_figure", "reliability_figure", "score_figure",
           "structure_figure"]

_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
           "legend": {"orientation": "h", "y": -0.2}}


def learning_curve_figure(curves: pd.DataFrame, metric: str) -> go.Figure:
    """``metric`` (a display name of data.CURVE_METRICS) against training labels, one line
    per test set."""
    fig = go.Figure()
    sub = curves[curves["metric"] == metric]
    for test_set, g in sub.groupby("test_set", sort=False):
        g = g.sort_values("round")
        fig.add_trace(go.Scatter(x=g["labels"].tolist(), y=g["value"].tolist(),
                                 mode="lines+markers", name=str(test_set),
                                 customdata=g["round"].tolist(),
                                 hovertemplate="round %{customdata}<br>%{x} labels<br>"
                                               "%{y:.4g}<extra>%{fullData.name}</extra>"))
    fig.update_layout(title=metric, xaxis_title="training labels", yaxis_title=metric,
                      **_LAYOUT)
    return fig


def reliability_figure(rel: pd.DataFrame, quantity: str, variant: str) -> go.Figure:
    """Reliability curves of every round (later rounds darker) and the diagonal."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated",
                             line={"dash": "dash", "color": "grey"}))
    sub = rel[(rel["quantity"] == quantity) & (rel["variant"] == variant)]
    rounds = sorted(sub["round"].unique())
    for i, r in enumerate(rounds):
        g = sub[sub["round"] == r].sort_values("expected")
        shade = 0.3 + 0.7 * (i + 1) / len(rounds)
        fig.add_trace(go.Scatter(x=g["expected"].tolist(), y=g["observed"].tolist(),
                                 mode="lines+markers", name=f"round {r}",
                                 line={"color": f"rgba(31, 119, 180, {shade:.2f})"}))
    fig.update_layout(title=f"{quantity} reliability ({variant})",
                      xaxis_title="expected P(u ≤ p)", yaxis_title="observed P(u ≤ p)",
                      **_LAYOUT)
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1])
    return fig


def score_figure(scores: pd.DataFrame, column: str = "score", bins: int = 40,
                 total: int | None = None) -> go.Figure:
    """Histogram of ``column`` over the scored pool and over the selected batch; ``total``
    (the round's candidates) states in the title when ``scores`` is a sample of them."""
    fig = go.Figure()
    values = scores[column].dropna()
    if values.empty:
        return fig
    lo, hi = float(values.min()), float(values.max())
    size = (hi - lo) / bins if hi > lo else 1.0
    for name, part, color in (("pool (not selected)", scores[~scores["selected"]], "#9ecae1"),
                              ("selected", scores[scores["selected"]], "#d62728")):
        fig.add_trace(go.Histogram(x=part[column].dropna().to_numpy(float), name=name,
                                   marker_color=color, opacity=0.8,
                                   xbins={"start": lo, "end": hi + size, "size": size}))
    title = f"{column}: pool vs selected"
    if total is not None and total > len(scores):
        title += f" (a sample of {len(scores):,} of {total:,} candidates)"
    fig.update_layout(barmode="overlay", title=title,
                      xaxis_title=column, yaxis_title="candidates", **_LAYOUT)
    return fig


def _naive_utc(times: pd.Series) -> pd.Series:
    """Times as naive UTC datetime64 (numpy arrays of these serialise ~100x faster than
    lists of Python datetimes; SQLite gives naive UTC, PostgreSQL aware)."""
    times = pd.to_datetime(times, utc=True)
    return times.dt.tz_convert(None)


def labeling_figure(labels: pd.DataFrame, total: int | None = None) -> go.Figure:
    """Seconds per label and SCF cycles in the order labels were made, failures marked;
    ``total`` (the campaign's labels) states in the title when ``labels`` are the newest of
    them."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("seconds per label", "SCF cycles"))
    if total is not None and total > len(labels):
        fig.update_layout(title=f"the newest {len(labels):,} of {total:,} labels")
    df = labels.assign(created=_naive_utc(labels["created"])).sort_values("created")
    for status, g in df.groupby("status", sort=True):
        x = g["created"].to_numpy()
        color = "#2ca02c" if status == "ok" else "#d62728"
        for col, key in ((1, "wall s"), (2, "scf cycles")):
            fig.add_trace(go.Scattergl(x=x, y=g[key].to_numpy(float), mode="markers",
                                     name=str(status), legendgroup=str(status),
                                     showlegend=col == 1, marker={"color": color}),
                          row=1, col=col)
    fig.update_layout(**_LAYOUT)
    return fig


# CPK-like colours and covalent radii (Å) of the common elements; others grey.
_COLORS = {1: "#e8e8e8", 6: "#404040", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050",
           15: "#ff8000", 16: "#ffff30", 17: "#1ff01f"}


def structure_figure(detail: dict[str, Any], forces: np.ndarray | None = None) -> go.Figure:
    """3D ball-and-stick view (bonds: distance < sum of covalent radii + 0.45 Å, as in Jmol);
    atoms coloured by element; hover shows the element, index and |F| when forces are given."""
    from ase.data import chemical_symbols, covalent_radii

    pos = np.asarray(detail["positions"], float)
    numbers = np.asarray(detail["numbers"], int)
    fig = go.Figure()
    bx, by, bz = [], [], []
    for i in range(len(pos)):
        for j in range(i + 1, len(pos)):
            if np.linalg.norm(pos[i] - pos[j]) < (covalent_radii[numbers[i]]
                                                  + covalent_radii[numbers[j]] + 0.45):
                for k, axis in enumerate((bx, by, bz)):
                    axis.extend([pos[i, k], pos[j, k], None])
    fig.add_trace(go.Scatter3d(x=bx, y=by, z=bz, mode="lines", name="bonds",
                               line={"color": "#888888", "width": 6}, hoverinfo="skip"))
    text = [f"{chemical_symbols[z]}{i}" for i, z in enumerate(numbers)]
    if forces is not None:
        text = [f"{t}  |F| = {np.linalg.norm(f):.3f} eV/Å" for t, f in zip(text, forces,
                                                                          strict=True)]
    fig.add_trace(go.Scatter3d(
        x=pos[:, 0].tolist(), y=pos[:, 1].tolist(), z=pos[:, 2].tolist(), mode="markers",
        name="atoms", text=text, hoverinfo="text",
        marker={"size": [14 * covalent_radii[z] + 4 for z in numbers],
                "color": [_COLORS.get(int(z), "#b0b0b0") for z in numbers],
                "line": {"color": "#333333", "width": 1}}))
    # equal scales in a cube around the molecule (aspectmode "data" blows up flat molecules)
    centre = (pos.max(0) + pos.min(0)) / 2
    half = float(np.ptp(pos, axis=0).max()) / 2 + 1.0
    axes = {f"{a}axis": {"visible": False, "range": [centre[k] - half, centre[k] + half]}
            for k, a in enumerate("xyz")}
    fig.update_layout(scene={"aspectmode": "cube", **axes,
                             "camera": {"eye": {"x": 1.2, "y": 1.2, "z": 0.8}}},
                      title=f"structure {detail['id']} ({detail['formula']})", height=520,
                      showlegend=False, margin={"l": 0, "r": 0, "t": 40, "b": 0})
    return fig
