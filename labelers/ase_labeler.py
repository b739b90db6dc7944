"""Labels from any ASE calculator (``kind: ase``) and GFN-xTB through tblite (``kind: xtb``).

Both run each calculation like the PySCF labeler does: in a forked child of a worker process
that has the calculator's module imported once, under a wall-time limit, so that an
exception, a hang or a segfault costs one label (``error``/``timeout``) and the next label
runs. A calculator that reports a non-converged SCF (ASE's ``SCFError``, or a failure whose
message says the SCF did not converge, as tblite's does) gives ``scf_failed``.

    AseLabeler("ase.calculators.emt.EMT").label(atoms)
    AseLabeler("ase.calculators.orca.ORCA", {"orcasimpleinput": "B3LYP def2-SVP EnGrad"},
               command="/opt/orca/orca", method="b3lyp", basis="def2-svp")
    XTBLabeler("gfn2-xtb", charge=0, multiplicity=1).label(atoms)

The settings hash holds what defines the level of theory: the calculator's import path and
its parameters less those that only say where or how fast to run (:data:`NOT_THEORY`, plus a
labeler's ``settings_exclude``). Programs the calculator runs (ORCA, VASP, CP2K, ...) are
looked up before any work is queued (:func:`command_problem`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterable
from typing import Any

from ase import Atoms

from bayesal.labelers._identity import spin_problem
from bayesal.labelers.base import Labeler, LabelResult, LabelStatus, isolated_result
from bayesal.labelers.isolation import run_isolated

__all__ = ["NOT_THEORY", "XTB_METHODS", "AseLabeler", "XTBLabeler", "ase_settings",
           "command_problem", "configured_command", "load_calculator", "xtb_settings"]

# Calculator keywords that say where, how fast or how verbosely to run, not what is
# computed: left out of the settings hash (a labeler's settings_exclude adds more).
NOT_THEORY = frozenset({
    "directory", "label", "command", "profile", "txt", "verbosity", "verbose", "debug",
    "restart", "ignore_bad_restart_file", "cache_api", "nprocs", "ncores", "threads",
    "parallel", "scratch", "max_iterations", "mixer", "mixer_memory", "mixer_damping",
})
XTB_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB", "ipea1-xtb": "IPEA1-xTB"}
XTB_CALCULATOR = "tblite.ase.TBLite"
# tblite's defaults of the level-of-theory keywords, written out (hash and calculation alike)
XTB_DEFAULTS = {"accuracy": 1.0, "electronic_temperature": 300.0}
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_SCF_TROUBLE = re.compile(r"\bscf\b|self[- ]consistent|not converged|did not converge|"
                          r"convergence", re.IGNORECASE)


def load_calculator(path: str):
    """The ASE calculator class at ``path`` (``package.module.Class``).

    The module is imported (it is Python code of an installed package: name only
    calculators you trust); the object must be a class derived from ASE's
    ``BaseCalculator``, so a configuration cannot name an arbitrary function.
    """
    from ase.calculators.calculator import BaseCalculator

    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise ValueError(f"calculator {path!r} is not an import path; write "
                         "package.module.Class, e.g. ase.calculators.orca.ORCA")
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ValueError(f"calculator {path!r}: cannot import {module} ({exc}); install the "
                         "package that provides it") from None
    except AttributeError:
        raise ValueError(f"calculator {path!r}: module {module} has no {name}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseCalculator)):
        raise ValueError(f"calculator {path!r} is not an ASE calculator class (a subclass "
                         "of ase.calculators.calculator.BaseCalculator)")
    return obj


def _template_section(cls) -> str:
    """The section of ASE's configuration file that holds a GenericFileIOCalculator's
    program (its template's name; the class name in lower case where that cannot be
    told)."""
    import inspect

    from ase.calculators.genericfileio import CalculatorTemplate

    module = inspect.getmodule(cls)
    for obj in vars(module).values():
        if (isinstance(obj, type) and issubclass(obj, CalculatorTemplate)
                and obj is not CalculatorTemplate and obj.__module__ == module.__name__):
            try:
                return obj().name
            except Exception:
                break
    return cls.__name__.lower()


def configured_command(cls) -> tuple[str | None, str]:
    """The program command ``cls`` would run when bayesal gives it none, and where that
    comes from; ``(None, "")`` for a calculator that runs in Python (EMT, tblite, GPAW),
    ``(None, what to set)`` for one that runs a program and has none configured.

    Follows ASE's own lookup, without constructing the calculator (some start their
    program when constructed): GenericFileIOCalculator (ORCA, Espresso, ...) reads the
    ``[section] command`` of ASE's configuration file; VASP its environment variables;
    CP2K ``ASE_CP2K_COMMAND`` or ``cp2k.psmp -s``; FileIOCalculator (Gaussian, ...)
    ``ASE_<NAME>_COMMAND``, its section, or its built-in default.
    """
    from ase.calculators.calculator import FileIOCalculator
    from ase.calculators.genericfileio import GenericFileIOCalculator
    from ase.config import cfg

    if issubclass(cls, GenericFileIOCalculator):
        section = _template_section(cls)
        if section in cfg.parser and "command" in cfg.parser[section]:
            return cfg.parser[section]["command"], f"from [{section}] in ASE's configuration"
        return None, (f"labeler.command, or command in a [{section}] section of ASE's "
                      "configuration file (ASE_CONFIG_PATH, default ~/.config/ase/config.ini)")
    env_commands = getattr(cls, "env_commands", None)
    if isinstance(env_commands, tuple | list):  # VASP
        for var in env_commands:
            if cfg.get(var):
                return cfg.get(var), f"from environment variable {var}"
        return None, "labeler.command, or one of the environment variables " + ", ".join(
            env_commands)
    if cls.__name__ == "CP2K":
        if getattr(cls, "command", None):
            return cls.command, "from CP2K.command"
        if cfg.get("ASE_CP2K_COMMAND"):
            return cfg.get("ASE_CP2K_COMMAND"), "from environment variable ASE_CP2K_COMMAND"
        return "cp2k.psmp -s", "CP2K's default"
    if issubclass(cls, FileIOCalculator):
        name = cls.name if isinstance(getattr(cls, "name", None), str) else cls.__name__
        var = f"ASE_{name.upper()}_COMMAND"
        if cfg.get(var):
            return cfg.get(var), f"from environment variable {var}"
        if name.lower() in cfg.parser and "command" in cfg.parser[name.lower()]:
            return cfg.parser[name.lower()]["command"], f"from [{name.lower()}] in ASE's " \
                "configuration"
        default = getattr(cls, "_legacy_default_command", None)
        if isinstance(default, str):
            return default, f"{cls.__name__}'s default"
        return None, f"labeler.command, or the environment variable {var}"
    return None, ""


def _program(command: str) -> str | None:
    """The program a command line starts (skipping ``env`` and VAR=value words)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for word in words:
        if word == "env" or re.match(r"^[A-Za-z_]\w*=", word):
            continue
        return word
    return None


def command_problem(cls, command: str | None) -> str | None:
    """Why the program ``cls`` needs cannot be run here, or ``None`` (also for calculators
    that need none). ``command``: labeler.command, which overrides ASE's lookup."""
    if command:
        source = "given as labeler.command"
    else:
        command, source = configured_command(cls)
        if command is None:
            return None if not source else (
                f"{cls.__name__} runs an external program and none is configured: set "
                f"{source}")
    program = _program(command)
    if program is None:
        return f"cannot parse the command {command!r} ({source})"
    if shutil.which(program) is None:
        return (f"program {program!r} (command {command!r}, {source}) is not found on PATH "
                "or not executable on this machine; install it, or give its full path")
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"calculator parameter value {value!r} is not a number, string, list "
                     "or mapping (it must be written in YAML and stored as JSON)")


def ase_settings(calculator: str, parameters: dict[str, Any], *,
                 exclude: Iterable[str] = (), method: str | None = None,
                 basis: str | None = None) -> dict[str, Any]:
    """The level of theory of ``kind: ase`` labels: the calculator and its parameters that
    change the numbers (not :data:`NOT_THEORY`, not ``exclude``); ``method``/``basis`` are
    optional names for SQL queries."""
    skip = NOT_THEORY | set(exclude)
    out: dict[str, Any] = {
        "labeler": "ase", "calculator": calculator,
        "parameters": {k: _json_safe(v) for k, v in sorted(parameters.items())
                       if k not in skip},
    }
    if method:
        out["method"] = method.lower()
    if basis:
        out["basis"] = basis.lower()
    return out


def xtb_method(method: str) -> str:
    try:
        return XTB_METHODS[method.lower()]
    except KeyError:
        raise ValueError(f"unknown xTB method {method!r}; use one of "
                         f"{', '.join(XTB_METHODS)}") from None


def xtb_settings(method: str, *, charge: int, multiplicity: int,
                 parameters: dict[str, Any]) -> dict[str, Any]:
    """The level of theory of an xTB label: method, charge, multiplicity, accuracy and
    electronic temperature (written out, so that a change of tblite's defaults changes the
    hash) and any further parameter that is not a run setting (e.g. solvation)."""
    xtb_method(method)
    theory = XTB_DEFAULTS | {
        k: _json_safe(v) for k, v in parameters.items() if k not in NOT_THEORY}
    for key in ("accuracy", "electronic_temperature"):  # 300 and 300.0: one level of theory
        theory[key] = float(theory[key])
    return {"labeler": "xtb", "method": method.lower(), "charge": int(charge),
            "multiplicity": int(multiplicity), "parameters": dict(sorted(theory.items()))}


def _distribution_version(module: str) -> str | None:
    top = module.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class AseLabeler(Labeler):
    """Energies and forces from an ASE calculator, isolated per calculation.

    Parameters
    ----------
    calculator
        Import path of the calculator class, e.g. ``"ase.calculators.orca.ORCA"``.
    parameters
        Keyword arguments of the calculator (JSON-able values).
    command
        The program command line for calculators that run one (ORCA, VASP, CP2K, ...);
        ``None``: ASE's own configuration. Checked on PATH when the labeler is built.
    method, basis
        Optional names of the level of theory (stored with every label, for SQL).
    settings_exclude
        Parameters that do not change the numbers, beyond :data:`NOT_THEORY`.
    threads
        OpenMP/BLAS threads of each calculation (``OMP_NUM_THREADS`` of its process).
    timeout_s
        Wall-time limit per calculation; ``None`` for none.
    memory_limit_mb
        Address-space limit of the calculation process, MB (``None``: none; programs the
        calculator starts inherit it, so leave it off for MPI codes).
    """

    name = "ase"

    def __init__(self, calculator: str, parameters: dict[str, Any] | None = None, *,
                 command: str | None = None, method: str | None = None,
                 basis: str | None = None, settings_exclude: Iterable[str] = (),
                 threads: int = 1, timeout_s: float | None = 3600.0,
                 memory_limit_mb: int | None = None) -> None:
        self.calculator = calculator
        self.calculator_class = load_calculator(calculator)
        self.parameters = dict(parameters or {})
        self.settings_exclude = tuple(sorted(set(settings_exclude)))
        self._settings = self._make_settings(method, basis)  # checks the values too
        if "command" in self.parameters or "profile" in self.parameters:
            raise ValueError("give the program's command as labeler.command, not as a "
                             "calculator parameter")
        problem = command_problem(self.calculator_class, command)
        if problem:
            raise ValueError(problem)
        self.command = command
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (or None), got {timeout_s}")
        self.threads, self.timeout_s, self.memory_limit_mb = threads, timeout_s, memory_limit_mb
        self.version = _distribution_version(self.calculator_class.__module__)

    def _make_settings(self, method: str | None, basis: str | None) -> dict[str, Any]:
        return ase_settings(self.calculator, self.parameters, exclude=self.settings_exclude,
                            method=method, basis=basis)

    @property
    def settings(self) -> dict[str, Any]:
        return self._settings

    def _calculator_parameters(self, atoms: Atoms) -> dict[str, Any]:
        return dict(self.parameters)

    def _label_one(self, atoms: Atoms) -> LabelResult:
        t0 = time.perf_counter()
        payload = {
            "calculator": self.calculator, "parameters": self._calculator_parameters(atoms),
            "command": self.command, "numbers": atoms.numbers.tolist(),
            "positions": atoms.positions.tolist(), "cell": atoms.cell.array.tolist(),
            "pbc": [bool(p) for p in atoms.pbc],
        }
        base_prov = {"settings": self.settings, "host": os.uname().nodename,
                     "calculator": self.calculator, "parameters": payload["parameters"],
                     "code_version": self.version}
        try:
            outcome = run_isolated(
                "bayesal.labelers._ase_run:calculate", payload, timeout=self.timeout_s,
                threads=self.threads, memory_mb=self.memory_limit_mb,
                preload=("bayesal.labelers._ase_run", self.calculator_class.__module__))
        except RuntimeError as exc:  # the worker itself could not start
            return LabelResult(status=LabelStatus.ERROR.value, error=str(exc),
                               wall_s=time.perf_counter() - t0, provenance=base_prov)
        return isolated_result(outcome, base_prov, time.perf_counter() - t0)


class XTBLabeler(AseLabeler):
    """GFN2-xTB / GFN1-xTB energies and forces through tblite (its ASE calculator).

    Molecules and periodic cells (tblite computes both). ``charge`` and ``multiplicity``
    (2S+1) are checked against each structure's electron count before any work: tblite
    itself would compute an odd electron count as a singlet without complaint.
    ``parameters``: further tblite keywords, e.g. ``accuracy`` (1.0),
    ``electronic_temperature`` (300 K), ``max_iterations`` (250), ``solvation``.
    """

    name = "xtb"

    def __init__(self, method: str = "gfn2-xtb", *, charge: int = 0, multiplicity: int = 1,
                 parameters: dict[str, Any] | None = None, threads: int = 1,
                 timeout_s: float | None = 3600.0, max_memory_mb: int | None = 4000) -> None:
        self.xtb_method = xtb_method(method)
        if multiplicity < 1:
            raise ValueError(f"multiplicity must be >= 1 (2S+1), got {multiplicity}")
        self.charge, self.multiplicity = int(charge), int(multiplicity)
        params = dict(parameters or {})
        for key in ("method", "charge", "multiplicity"):
            if key in params:
                raise ValueError(f"give {key} as labeler.{key}, not as a parameter")
        super().__init__(XTB_CALCULATOR, params, threads=threads, timeout_s=timeout_s,
                         memory_limit_mb=None if max_memory_mb is None
                         else 2 * max_memory_mb + 1024 + 128 * threads)

    def _make_settings(self, method: str | None, basis: str | None) -> dict[str, Any]:
        return xtb_settings(self.xtb_method, charge=self.charge,
                            multiplicity=self.multiplicity, parameters=self.parameters)

    def problem(self, atoms: Atoms) -> str | None:
        return super().problem(atoms) or spin_problem(atoms, self.charge, self.multiplicity)

    def _calculator_parameters(self, atoms: Atoms) -> dict[str, Any]:
        return XTB_DEFAULTS | self.parameters | {
            "method": self.xtb_method, "charge": self.charge,
            "multiplicity": self.multiplicity, "verbosity": 0}
