"""The ``bayesal`` Typer application and what its commands share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperCommand

from bayesal.contracts import strip_control
from bayesal.flows.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="bayesal",
    help="Bayesian active learning for machine-learning interatomic potentials.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management (Alembic migrations).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")

def _reflow(text: str) -> str:
    """Docstring paragraphs as single lines (the help renderer wraps them to the terminal;
    it keeps every newline of a docstring, breaking sentences where the source did). Lines
    starting with ``*``, ``-`` or spaces after dedent stay lines of their own."""
    import inspect

    paragraphs = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and not line.startswith(("* ", "- ", " ")):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of ``typer_app`` (and of its sub-apps) its docstring reflowed
    (:func:`_reflow`) as help text, unless it has an explicit one."""
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        reflow_help(group.typer_instance)


class _PlainConsole(Console):
    """Prints text as it is: no Rich markup (campaign names, methods, errors and file names
    are data: ``a[/b]`` or ``[bold red]FAKE[/]`` must print as such, not crash or render) and
    no control characters (no escape sequence from a database reaches the terminal)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)

    def render_str(self, text: str, **kwargs):
        return super().render_str(strip_control(text), **kwargs)


console = _PlainConsole()
err_console = _PlainConsole(stderr=True)


class _State:
    database_url: str | None = None
    debug: bool = False


state = _State()


def settings() -> Settings:
    overrides = {"database_url": state.database_url} if state.database_url else {}
    return load_settings(**overrides)


@contextlib.contextmanager
def user_errors(options: dict[str, str] | None = None) -> Iterator[None]:
    """Turn expected failures into a one-paragraph message and exit code 1.

    A config object built from options that fails validation names the options:
    ``options`` maps config field names to option names where they differ."""
    from pydantic import ValidationError
    from sqlalchemy.exc import DBAPIError

    from bayesal.bayes_model.errors import DeviceError, UndertrainedError
    from bayesal.db import DatabaseError
    from bayesal.db.readers import InputError
    from bayesal.flows.run_lock import CampaignBusyError
    from bayesal.labelers import LabelerInputError
    from bayesal.tasks.policy import CampaignError

    try:
        yield
    except typer.Exit:
        raise
    except ValidationError as exc:  # an option out of range: name the option, not pydantic
        names = options or {}
        _fail("; ".join(
            f"--{names.get(str(e['loc'][-1]), str(e['loc'][-1])).replace('_', '-')} "
            f"{e.get('input')!r}: {e['msg'].removeprefix('Value error, ')}" if e["loc"] else
            e["msg"].removeprefix("Value error, ") for e in exc.errors()))
    except (InputError, LabelerInputError, DatabaseError, SettingsError, ValueError,
            OSError, CampaignError, CampaignBusyError, UndertrainedError, DeviceError) as exc:
        _fail(str(exc))  # OSError: missing files, permissions, disk full
    except DBAPIError as exc:  # cannot connect, not a database file, ...
        msg = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        _fail(f"cannot use the database: {msg}")
    except Exception as exc:  # a bug: still one paragraph, the traceback with --debug
        first = (str(exc).splitlines() or [""])[0][:300]
        _fail(f"unexpected {type(exc).__name__}: {first} (run with --debug for the "
              "traceback, and please report it)")


def _fail(message: str) -> None:
    if state.debug:  # --debug or BAYESAL_LOG_LEVEL=DEBUG: the traceback too, for bug reports
        err_console.print_exception()
    err_console.print("error: ", style="bold red", end="")
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def read_frames(paths: list[Path], *, labelled: bool = False,
                forces_optional: bool = False) -> list:
    """Every frame of ``paths`` through the import checks (file, frame and field named in
    the error; every problem listed); labelled frames carry their energy and forces (with
    ``forces_optional`` their energy alone where the file has no forces)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from bayesal.db.readers import InputError, InputIssue, iter_frames

    frames, issues = [], []
    for path in paths:
        for item in iter_frames(path, labelled=labelled, forces_optional=forces_optional):
            (issues if isinstance(item, InputIssue) else frames).append(item)
    if issues:
        raise InputError(issues)
    images = []
    for f in frames:
        atoms = f.atoms
        if labelled:  # the labels travel with the atoms, whatever key they were read from
            atoms = atoms.copy()
            atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        images.append(atoms)
    return images


def iter_checked_frames(paths: list[Path]) -> Iterator:
    """Frames of ``paths`` one at a time through the import checks (for pools of any size):
    the first bad frame raises :class:`InputError` naming file, frame and field."""
    from bayesal.db.readers import InputError, InputIssue, iter_frames

    for path in paths:
        for item in iter_frames(path):
            if isinstance(item, InputIssue):
                raise InputError([item])
            item.atoms.info.update(source_file=str(path), source_frame=item.index)
            yield item.atoms


class SeveralAfterOneFlag(TyperCommand):
    """A command whose repeatable options also take several values after one flag:
    ``--test a.xyz b.xyz`` reads as ``--test a.xyz --test b.xyz`` (every value up to the next
    option)."""

    def parse_args(self, ctx, args):
        several = {name for p in self.params
                   if p.param_type_name == "option" and getattr(p, "multiple", False)
                   for name in p.opts}
        out, flag, seen = [], None, 0
        for token in args:
            if token.startswith("-"):
                flag, seen = (token if token in several else None), 0
                out.append(token)
                continue
            if flag is not None and seen:
                out.append(flag)  # a second, third ... value after the same flag
            seen += 1
            out.append(token)
        return super().parse_args(ctx, out)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that becomes ``path`` only when the block succeeds:
    an error (or a kill) never leaves a half-written output."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Reporter:
    """Progress of a long command. On a terminal: a bar with the count, the total when it
    is known, the elapsed time and the time left. Elsewhere (a log file, a batch job,
    ``| tee``): a line every ``every_s`` seconds (``$BAYESAL_PROGRESS_SECONDS``, default
    10) with the count, the total, the rate and the time left, and one at the end."""

    def __init__(self, description: str, unit: str = "frames", total: int | None = None,
                 every_s: float | None = None) -> None:
        import os

        if every_s is None:  # BAYESAL_PROGRESS_SECONDS: the interval of progress lines
            every_s = float(os.environ.get("BAYESAL_PROGRESS_SECONDS", "10"))
        self.description, self.unit, self.total, self.every_s = description, unit, total, every_s
        self.completed = 0
        self.live = err_console.is_terminal
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:,.0f}{task.fields[of]} " + unit),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
            transient=False, disable=not self.live)
        self._task = None
        self._t0 = self._last = 0.0

    def __enter__(self) -> Reporter:
        import time

        self._progress.__enter__()
        self._task = self._progress.add_task(self.description, total=self.total,
                                             of=self._of())
        self._t0 = self._last = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        if not self.live and exc[0] is None and self.completed:
            self._line(final=True)

    def _of(self) -> str:
        return "" if self.total is None else f" of {self.total:,}"

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._progress.update(self._task, total=total, of=self._of())

    def describe(self, text: str) -> None:
        self.description = text
        self._progress.update(self._task, description=text)

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: int) -> None:
        import time

        self.completed = completed
        self._progress.update(self._task, completed=completed)
        if not self.live and time.monotonic() - self._last >= self.every_s:
            self._line()

    def _line(self, final: bool = False) -> None:
        import time

        now = time.monotonic()
        self._last = now
        rate = self.completed / max(now - self._t0, 1e-9)
        text = f"{self.description}: {self.completed:,}{self._of()} {self.unit}"
        if self.total:
            text += f" ({100 * self.completed / self.total:.0f} %)"
        text += f", {rate:,.1f}/s"
        if self.total and not final and rate > 0:
            left = (self.total - self.completed) / rate
            text += f", about {left / 60:.1f} min left" if left >= 60 else \
                f", about {left:.0f} s left"
        err_console.print(text + (", done" if final else ""), markup=False, highlight=False)


@app.callback()
def _root(
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="SQLAlchemy URL; overrides BAYESAL_DATABASE_URL.",
        show_default=False)] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of an error too (for bug reports).")] = False,
) -> None:
    """bayesal: train Bayesian e3nn potentials, pick structures by BALD, label them with
    PySCF, keep everything in SQL. Settings come from BAYESAL_* environment variables."""
    state.database_url = database_url
    state.debug = debug
    if database_url:  # for every step of the command: flows, tasks, workers, subprocesses
        import os

        os.environ["BAYESAL_DATABASE_URL"] = database_url
    with contextlib.suppress(SettingsError):  # reported by the command that needs settings
        level = settings().log_level
        state.debug = debug or level == "DEBUG"
        _configure_logging(level)


def _configure_logging(level: str) -> None:
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
    logger = logging.getLogger("bayesal")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def writer_engine(cfg: Settings):
    """A read-write engine on the configured database."""
    from bayesal.db import make_engine

    return make_engine(cfg.database_url)


DEVICE_OPTION_HELP = ("Where the model runs: auto (the first visible CUDA GPU, else the CPU), "
                      "cpu, cuda or cuda:K (the K-th visible GPU; CUDA_VISIBLE_DEVICES pins "
                      "which).")
DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_OPTION_HELP)]
KERNELS_OPTION_HELP = ("Code of the message tensor products: e3nn, or cueq (NVIDIA "
                       "cuEquivariance; fused CUDA kernels on a GPU; the same numbers).")
KernelsOption = Annotated[str, typer.Option("--kernels", help=KERNELS_OPTION_HELP)]


def load_model_on(model_dir: Path, device: str, method: str | None = None,
                  kernels: str = "e3nn"):
    """``--method`` checked against the model, ``--device`` resolved (one line when this
    machine cannot honour it), and the model directory's posterior loaded there."""
    from bayesal.bayes_model.device import describe_devices, resolve_device
    from bayesal.bayes_model.kernels import check_kernels
    from bayesal.bayes_model.posterior import load_posterior

    check_method(method, model_dir)
    where = resolve_device(device, what="--device")
    posterior = load_posterior(model_dir, device=where, kernels=check_kernels(kernels))
    if where.type != "cpu":
        err_console.print(f"model {describe_devices([where])}")
    return posterior


def check_method(value: str | None, model_dir: Path | None = None):
    """Validate ``--method``; with ``model_dir`` it must match the trained model."""
    from bayesal.bayes_model.posterior import Method

    if value is None:
        return None
    try:
        method = Method(value)
    except ValueError:
        raise ValueError(f"--method {value!r} is not known; choose one of "
                         f"{', '.join(Method)}") from None
    if model_dir is not None:
        from bayesal.bayes_model.checkpoint import read_manifest

        trained = read_manifest(model_dir).method
        if trained != method:
            raise ValueError(f"--method {method}: {model_dir} holds a {trained} model; drop "
                             f"--method or retrain with --method {method}")
    return method
