"""bayesal: Bayesian active learning for machine-learning interatomic potentials.

One import name, several packages (each a top-level folder of the repository, mapped here by
setuptools ``package-dir``):

* ``bayesal.bayes_model``: the e3nn potential, its training and posteriors (no Prefect);
* ``bayesal.labelers``: DFT labelers in isolated processes (no Prefect);
* ``bayesal.db``: the SQL store, all SQL (no Prefect);
* ``bayesal.tasks``: Prefect tasks around the libraries;
* ``bayesal.flows``: the campaign flow, deployments and the ``bayesal`` command line;
* ``bayesal.dashboard``: the read-only Streamlit dashboard.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bayesal")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
