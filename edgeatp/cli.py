"""The ``edgeatp`` command line: discover, verify, render and export circuits.

``edgeatp discover`` with no arguments runs end to end on the shipped ``zoo:ioi`` model and
its task, offline, and writes the circuit (JSON), its drawing (DOT, SVG) and a report.
User errors exit with status 2 and one line that names the flag, the file or the row; ``--debug``
shows the traceback. Options and files are checked before torch is imported, so mistakes and
``--help`` answer at once.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click

from . import __version__
from .config import (BACKEND_CHOICES, DEVICE_PATTERN, DTYPE_CHOICES, LEVEL_CHOICES, METRIC_CHOICES, DiscoverConfig,
                     check_config)
from .errors import EdgeatpError
from .methods import METHODS
from .timings import mark, recording

FORMATS = ("json", "mib", "dot", "svg", "png", "pdf", "md", "html", "networkx")
DEFAULT_FORMATS = "json,dot,svg,md"
FLAG_NAMES = {"n_verify": "--verify", "memory_budget_mb": "--memory-budget", "top": "--verify",
              "m": "--bound-samples", "samples": "--bound-samples", "p": "--bound-p", "out_dir": "--out",
              "overwrite": "--force", "budget": "--refine-budget"}
BACKEND_HELP = ("TransformerLens model class: hooked (HookedTransformer, TL 3.x), bridge (TransformerBridge, TL 4.x or "
                "3.9), auto (hooked where TransformerLens has it).")
RECORDED_BACKEND_HELP = BACKEND_HELP[:-1] + "; default: the one the circuit was found with."


def flag(option: str) -> str:
    """The command-line flag of a library parameter name (``top_k`` → ``--top-k``)."""
    return FLAG_NAMES.get(option, "--" + option.replace("_", "-"))


#: The option every data-parallel command takes (discover, verify, refine); the default is torch's
#: own, distributed.DEFAULT_TIMEOUT_S (not imported here: the command line starts without torch).
COLLECTIVE_TIMEOUT = click.option(
    "--collective-timeout", type=click.FloatRange(0, min_open=True), default=1800.0, show_default=True,
    help="Under torchrun: seconds a process waits for the others at a collective before giving up.")


class UserError(click.ClickException):
    """A one-line error for the user (exit status 2)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, EdgeatpError):
        text = exc.render({k: flag(v) for k, v in exc.options.items()})
    else:
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _guard(fn: Callable) -> Callable:
    """Turn user errors into one line (interruptions too); ``--debug`` or ``EDGEATP_DEBUG=1``
    re-raises with the traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("EDGEATP_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except (EdgeatpError, ValueError, KeyError, FileNotFoundError) as exc:
            if debug:
                raise
            raise UserError(_rank_label() + _one_line(exc)) from None
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line plus where to look
            if debug:
                raise
            raise click.ClickException(f"{_rank_label()}internal error ({type(exc).__name__}: {exc}); rerun with "
                                       "--debug for the traceback and please report it") from None
    return wrapper


def _under_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank_label() -> str:
    """``rank N: `` before the errors of the other processes of a torchrun run (rank 0 speaks plainly)."""
    rank = os.environ.get("RANK", "0")
    return f"rank {rank}: " if _under_torchrun() and rank != "0" else ""


@contextmanager
def _data_parallel(device: str | None, timeout: float, n_devices: int = 1) -> Iterator[Any]:
    """This process's place in a torchrun run (a run of its own otherwise): joins the process group
    (``timeout``: seconds a collective may wait), silences every rank but 0 and makes a
    failure on any rank stop them all with one message."""
    from .distributed import guard, local_device, process_group

    with process_group(local_device(device, n_devices), timeout) as ranks, guard(ranks):
        if not ranks.is_main:
            _quiet_libraries()
            warnings.simplefilter("ignore")
        yield ranks


def _say(quiet: bool, text: str = "") -> None:
    if not quiet:
        click.echo(text)


def _warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def _json(data: Any) -> str:
    """Strict JSON for scripts: non-finite numbers become null."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(data), indent=1, allow_nan=False)


def _formats(spec: str, allowed: Sequence[str] = FORMATS) -> list[str]:
    out = list(dict.fromkeys(f.strip().lower() for f in spec.split(",") if f.strip()))
    bad = [f for f in out if f not in allowed]
    if bad:
        raise EdgeatpError(f"--format: unknown format(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not out:
        raise EdgeatpError(f"--format is empty; choose one or more of {', '.join(allowed)}")
    return out


def _quiet_libraries() -> None:
    """Silence the loading bars and advisories of Hugging Face libraries (set before they import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _check_model_spec(spec: str, config_file: bool = False) -> None:
    """Reject model specs that cannot name anything, before any heavy import (``config_file``: a
    checkpoint's config.json names its model too, for commands that read only the config)."""
    if not spec.strip():
        raise EdgeatpError("--model is empty; pass zoo:NAME, a checkpoint folder or a model name")
    if spec.startswith("zoo:"):
        from .zoo import ZOO

        if spec[4:] not in ZOO:
            raise EdgeatpError(f"--model {spec}: the zoo has {', '.join('zoo:' + n for n in ZOO)}")
        return
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir() and not (config_file and path.name == "config.json"):
        raise EdgeatpError(f"--model {spec}: this is a file; pass the checkpoint folder that holds config.json")
    if not path.exists() and spec.startswith(("/", "./", "../", "~")):
        raise EdgeatpError(f"--model {spec}: no such folder; pass a checkpoint folder, zoo:NAME or a model name")
    if not path.exists() and re.search(r"[\s]", spec):
        raise EdgeatpError(f"--model {spec!r} is neither a folder nor a model name (names have no spaces)")


def _check_data(path: str | None) -> None:
    """Read and check a prompt-pair file's structure before any heavy import."""
    if path:
        from .tasks.rows import check_records, read_rows

        check_records(Path(path), read_rows(Path(path)))


def _check_group(spec: str | None) -> None:
    """A ``--group`` spec must name groups: valid spans, or a JSON file of named node lists."""
    if spec:
        from .groupspec import check_group_spec

        check_group_spec(spec)


def _saved_devices(circuit_file: str, device: str | None, n_devices: int | None) -> tuple[str | None, int]:
    """The device and device count a re-run of a saved circuit uses: the given ones, else the recorded
    ones (under torchrun only the recorded device's type, as each process takes its own device)."""
    from .export.schema import load_json_data

    config = (load_json_data(Path(circuit_file)).get("meta") or {}).get("config") or {}
    if device is None and config.get("device") and _under_torchrun():
        device = str(config["device"]).split(":")[0]
    return device, n_devices or int(config.get("n_devices") or 1)


def _check_circuit_file(path: str) -> None:
    """A circuit file must hold a circuit (JSON of a known format and version, following the schema)."""
    from .export.schema import check_circuit_data, load_json_data

    check_circuit_data(load_json_data(Path(path)))


def _skip_final_collection() -> None:
    """Freeze the heap at exit, so the interpreter's last garbage collection does not walk the
    millions of objects torch and TransformerLens made (seconds of a run's wall time)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeatp")
def main() -> None:
    """edgeatp: find the circuits inside transformer language models (AtP*, edge attribution, exact verification)."""
    _skip_final_collection()


# ------------------------------------------------------------------------------------ discover
@main.command()
@click.option("--model", "model_spec", default="zoo:ioi", show_default=True,
              help="zoo:NAME, a TransformerLens name (gpt2, pythia-70m; must be cached) or a local HF checkpoint dir.")
@click.option("--task", default=None, help="Built-in task (see `edgeatp tasks`); default: the zoo model's task, else ioi.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="JSONL/CSV prompt pairs with columns clean, corrupt, answer, wrong.")
@click.option("--n-pairs", type=click.IntRange(1), default=64, show_default=True, help="Pairs generated for a built-in task.")
@click.option("--metric", type=click.Choice(METRIC_CHOICES), default="logit_diff", show_default=True,
              help="What is measured at the answer position: logit difference (answer minus mean wrong), "
                   "log-probability or probability of the answer, or KL divergence from the clean run.")
@click.option("--method", type=click.Choice(list(METHODS)), default="atp-qk", show_default=True,
              help="Attribution method: " + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + ".")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="edge", show_default=True,
              help="Circuit of edges, of components (heads and MLPs) or of MLP neurons.")
@click.option("--positions/--no-positions", default=False, help="Position-resolved edges/nodes.")
@click.option("--group", default=None,
              help="Coarse groups: at edge level 'layer' (edges between whole layers); at node level layer, head, "
                   "span:0-3,4-9 (components over position spans) or a JSON file of named node lists.")
@click.option("--top-k", type=click.IntRange(0), default=None,
              help="Keep the k best edges/nodes. Default: the smallest circuit reaching --target faithfulness.")
@click.option("--threshold", type=float, default=None, help="Keep edges whose score is at least this.")
@click.option("--cumulative", type=float, default=None, help="Keep the top edges holding this share of the total score.")
@click.option("--greedy", type=click.IntRange(1), default=None, help="Grow k edges from the logits backwards.")
@click.option("--target", type=click.FloatRange(0, 1.5), default=0.8, show_default=True,
              help="Faithfulness the automatic circuit size aims for (and that chosen circuits are checked against).")
@click.option("--verify", "n_verify", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many top edges/nodes.")
@click.option("--sample-below", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many random edges outside the circuit.")
@click.option("--bound", is_flag=True, help="Add the AtP* diagnostic bound on missed edges (subsampling + Welch).")
@click.option("--bound-samples", type=click.IntRange(2), default=256, show_default=True,
              help="Random edge subsets patched for --bound.")
@click.option("--bound-p", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Inclusion probability of each unverified edge in a --bound subset (small = weak interactions).")
@click.option("--direction", type=click.Choice(["noising", "denoising"]), default="noising", show_default=True,
              help="noising: patch corrupt values into the clean run (what is necessary); denoising: patch clean "
                   "values into the corrupt run (what is sufficient).")
@click.option("--device", default=None,
              help="cpu (the default), cuda, cuda:N or mps; under torchrun, cuda is each process's own GPU.")
@click.option("--n-devices", type=click.IntRange(1), default=1, show_default=True,
              help="Split the model's layers over this many devices of --device's kind (cuda:0, cuda:1, ...).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Weights and activations in this dtype (default: the checkpoint's own; scores accumulate in "
                   "float32 or wider).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Prompt pairs per forward (patches are stacked along the batch too).")
@click.option("--memory-budget", type=click.FloatRange(0, min_open=True), default=1024.0, show_default=True,
              help="Megabytes of device memory for a batch of attribution (cached activations of both runs, "
                   "gradients, the autograd graph, the large buffers) and of exact patching, verification, "
                   "faithfulness and circuit search (the source run's cache, the stacked rows of a patched "
                   "forward); batches, chunks and stacks shrink to fit, results stay the same.")
@click.option("--offload", is_flag=True,
              help="Keep cached activations and gradients in host memory (when they do not fit beside the model; "
                   "slower).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of task generation and sampling.")
@COLLECTIVE_TIMEOUT
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads (default: 1 for small models, where more only add overhead; else torch's default).")
@click.option("--refine", is_flag=True,
              help="Search for better edge circuits with exact whole-circuit runs, from the method's top edges "
                   "(greedy add/remove/swap passes and a learned edge mask), and keep the best one.")
@click.option("--refine-budget", type=click.IntRange(1), default=2000, show_default=True,
              help="Forwards the --refine search may spend, its final exact check included.")
@click.option("--refine-sizes", default=None,
              help="Circuit sizes (edges) --refine searches: a comma list, or mib for MIB's grid (then CPR/CMD of "
                   "the searched circuits too). Default: the curve's sizes up to the chosen circuit's.")
@click.option("--out", type=click.Path(file_okay=False), default="edgeatp-out", show_default=True,
              help="Output folder (written as a whole at the end; files of an earlier run are replaced).")
@click.option("--format", "fmt", default=DEFAULT_FORMATS, show_default=True, help=f"Comma list of {', '.join(FORMATS)}.")
@click.option("--allow-download", is_flag=True, help="Let TransformerLens download a model that is not cached.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help=BACKEND_HELP)
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--timings", is_flag=True,
              help="Print where the time went (import, load, attribute, select, metrics, refine, verify, write; "
                   "wall and CPU seconds) to stderr, and add it to the --json summary.")
@_guard
def discover(model_spec: str, task: str | None, data: str | None, n_pairs: int, metric: str, method: str, level: str,
             positions: bool, group: str | None, top_k: int | None, threshold: float | None, cumulative: float | None,
             greedy: int | None, target: float, n_verify: int, sample_below: int, bound: bool, bound_samples: int,
             bound_p: float, direction: str, device: str | None, n_devices: int, dtype: str | None, batch_size: int,
             memory_budget: float, offload: bool, seed: int, collective_timeout: float, threads: int | None,
             refine: bool, refine_budget: int, refine_sizes: str | None, out: str, fmt: str, allow_download: bool,
             quiet: bool, as_json: bool, backend: str, debug: bool, timings: bool) -> None:
    """Find, verify and export a circuit (defaults: zoo:ioi, its task, edge level, atp-qk)."""
    formats = _formats(fmt)
    cfg = DiscoverConfig(model=model_spec, task=task, data=data, n_pairs=n_pairs, metric=metric, method=method,
                         level=level, positions=positions, group=group, top_k=top_k, threshold=threshold,
                         cumulative=cumulative, greedy=greedy, target=target, n_verify=n_verify,
                         sample_below=sample_below, bound=bound, bound_samples=bound_samples, bound_p=bound_p,
                         direction=direction, device=device, n_devices=n_devices, dtype=dtype, batch_size=batch_size,
                         memory_budget=memory_budget, offload=offload, seed=seed, allow_download=allow_download,
                         threads=threads, refine=refine, refine_budget=refine_budget, refine_sizes=refine_sizes,
                         backend=backend)
    check_config(cfg)
    _check_model_spec(model_spec)
    _check_data(data)
    _check_group(group)
    from .export.files import check_writable

    check_writable(Path(out))
    t0 = time.time()
    with recording() as clock, _data_parallel(device, collective_timeout, n_devices) as ranks:
        from dataclasses import replace

        from .distributed import local_device
        from .pipeline import run_discover
        from .progress import for_stream, silent

        quiet_text = quiet or as_json or not ranks.is_main
        if quiet_text or not sys.stderr.isatty():  # loading bars would leave carriage returns in logs
            _quiet_libraries()
        mark("import")
        result = run_discover(replace(cfg, device=local_device(device, n_devices)),
                              progress=silent if quiet_text else for_stream(sys.stderr),
                              log=lambda s: _say(quiet_text, s), per_head_view="mib" in formats)
        if ranks.is_main:  # only rank 0 writes and speaks
            written = _write(result.circuit, Path(out), formats, "circuit", result.scores)
            mark("write")
    if not ranks.is_main:
        return
    summary = {**result.summary(), "seconds": round(time.time() - t0, 1),
               "outputs": {k: str(v) for k, v in written.paths.items()}, "skipped": written.skipped}
    if timings:
        click.echo(f"timings: {clock.describe()}", err=True)
        summary["timings"] = {name: {"wall": round(clock.wall[name], 3), "cpu": round(clock.cpu[name], 3)}
                              for name in clock.wall}
    if as_json:
        click.echo(_json(summary))
    else:
        _say(quiet, result.describe())
        _say(quiet, "wrote " + ", ".join(str(p) for p in written.paths.values()))


def _write(circuit: Any, folder: Path, formats: list[str], stem: str, scores: Any = None, **kwargs: Any) -> Any:
    """Write a circuit's files and tell the user about warnings and skipped formats."""
    from .export import write_outputs

    for note in circuit.warnings:
        _warn(note)
    written = write_outputs(circuit, folder, formats, name=stem, task=circuit.meta.get("data"), scores=scores,
                            **kwargs)
    reasons = sorted(set(written.skipped.values()))
    for reason in reasons:
        _warn(f"skipped {', '.join(f for f, r in written.skipped.items() if r == reason)}: {reason}")
    return written


# ------------------------------------------------------------------------------------ verify
@main.command()
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_spec", default=None, help="Override the model recorded in the circuit.")
@click.option("--task", default=None, help="Verify on a built-in task instead of the recorded data.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Verify on these prompt pairs instead.")
@click.option("--n-pairs", type=click.IntRange(1), default=None, help="Pairs generated for a built-in task.")
@click.option("--verify", "n_verify", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many top edges/components.")
@click.option("--sample-below", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many random edges/components outside the circuit.")
@click.option("--bound", is_flag=True, help="Add the AtP* diagnostic bound on missed edges (subsampling + Welch).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Prompt pairs per forward.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: the recorded one).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the recorded one).")
@click.option("--n-devices", type=click.IntRange(1), default=None,
              help="Split the model's layers over this many devices (default: the recorded number).")
@COLLECTIVE_TIMEOUT
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the verified circuit (default: replace the input and its report set).")
@click.option("--allow-download", is_flag=True, help="Let TransformerLens download a model that is not cached.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=None, help=RECORDED_BACKEND_HELP)
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def verify(circuit_file: str, model_spec: str | None, task: str | None, data: str | None, n_pairs: int | None,
           n_verify: int, sample_below: int, bound: bool, batch_size: int, seed: int | None, device: str | None,
           n_devices: int | None, collective_timeout: float, out: str | None, allow_download: bool,
           backend: str | None, quiet: bool, as_json: bool, debug: bool) -> None:
    """Re-verify a saved circuit with exact patches and whole-circuit runs, and rewrite its files."""
    if task and data:
        raise EdgeatpError("give either --task or --data, not both")
    if model_spec is not None:
        _check_model_spec(model_spec)
    if task:
        from .tasks.builtin import task_spec

        task_spec(task)
    _check_data(data)
    _check_circuit_file(circuit_file)
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        raise EdgeatpError(f"--device {device!r} is unknown; use cpu, cuda, cuda:N, mps or xpu")
    target = Path(out) if out else Path(circuit_file)
    from .export.files import check_writable

    check_writable(target.parent)
    device, split = _saved_devices(circuit_file, device, n_devices)
    with _data_parallel(device, collective_timeout, split) as ranks:
        from .distributed import local_device

        quiet_text = quiet or as_json or not ranks.is_main
        if quiet_text or not sys.stderr.isatty():
            _quiet_libraries()
        from .export import set_files
        from .pipeline import reverify
        from .progress import for_stream, silent

        result = reverify(Path(circuit_file), model=model_spec, task=task, data=data, n_pairs=n_pairs,
                          n_verify=n_verify, sample_below=sample_below, bound=bound, batch_size=batch_size, seed=seed,
                          device=local_device(device, split), n_devices=n_devices, backend=backend,
                          allow_download=allow_download, progress=silent if quiet_text else for_stream(sys.stderr))
        if ranks.is_main:  # only rank 0 writes and speaks
            existing = set_files(target.parent, target.stem) if not out else []
            formats = _formats_of(existing, target.stem) or ["json"]
            _report(result, target, formats, quiet, as_json)


def _report(result: Any, target: Path, formats: list[str], quiet: bool, as_json: bool) -> None:
    """Write a re-run's circuit as ``target`` in ``formats`` and print its summary (text or JSON)."""
    written = _write(result.circuit, target.parent, formats, target.stem)
    if as_json:
        click.echo(_json({**result.summary(), "outputs": {k: str(v) for k, v in written.paths.items()}}))
    else:
        _say(quiet, result.describe())
        _say(quiet, "wrote " + ", ".join(str(p) for p in written.paths.values()))


# ------------------------------------------------------------------------------------ refine
@main.command("refine")
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--sizes", default=None,
              help="Circuit sizes (edges) to search: a comma list such as 5,10,20, or mib for MIB's grid (then "
                   "CPR/CMD of the searched circuits too). Default: the curve's sizes up to the circuit's own; its "
                   "own size is always searched.")
@click.option("--refine-budget", "budget", type=click.IntRange(1), default=2000, show_default=True,
              help="Forwards the search may spend, its final exact check included.")
@click.option("--seed", type=int, default=None, help="Search seed (default: the recorded one).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="The prompt pairs the circuit was found on, when they moved.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Prompt pairs per forward (circuits are stacked along the batch too).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the refined circuit (default: NAME-refined.json next to the input, with the "
                   "input's other formats).")
@click.option("--allow-download", is_flag=True, help="Let TransformerLens download a model that is not cached.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=None, help=RECORDED_BACKEND_HELP)
@COLLECTIVE_TIMEOUT
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def refine_cmd(circuit_file: str, sizes: str | None, budget: int, seed: int | None, data: str | None,
               batch_size: int, out: str | None, allow_download: bool, backend: str | None,
               collective_timeout: float, quiet: bool, as_json: bool, debug: bool) -> None:
    """Search a saved edge circuit's sizes for more faithful circuits with exact whole-circuit runs."""
    from .config import parse_sizes

    parse_sizes(sizes)
    _check_data(data)
    _check_circuit_file(circuit_file)
    source = Path(circuit_file)
    target = Path(out) if out else source.with_name(f"{source.stem}-refined.json")
    from .export.files import check_writable

    check_writable(target.parent)
    device, split = _saved_devices(circuit_file, None, None)
    with _data_parallel(device, collective_timeout, split) as ranks:
        from .distributed import local_device

        quiet_text = quiet or as_json or not ranks.is_main
        if quiet_text or not sys.stderr.isatty():
            _quiet_libraries()
        from .export import set_files
        from .pipeline import refine_saved
        from .progress import for_stream, silent

        try:
            result = refine_saved(source, sizes=sizes, budget=budget, seed=seed, data=data, batch_size=batch_size,
                                  backend=backend, allow_download=allow_download,
                                  device=local_device(device, split),
                                  progress=silent if quiet_text else for_stream(sys.stderr),
                                  log=lambda s: _say(quiet_text, s))
        except EdgeatpError as exc:  # this command's flag for the sizes is --sizes
            exc.options = {k: "sizes" if v == "refine_sizes" else v for k, v in exc.options.items()}
            raise
        if ranks.is_main:  # only rank 0 writes and speaks
            formats = (_formats_of(set_files(source.parent, source.stem), source.stem) or ["json"]) if not out \
                else ["json"]
            _report(result, target, formats, quiet, as_json)


def _formats_of(files: list[str], stem: str) -> list[str]:
    """The formats a published set of files holds (so ``verify`` rewrites all of them)."""
    suffix = {f"{stem}.json": "json", f"{stem}.mib.json": "mib", f"{stem}.networkx.json": "networkx",
              f"{stem}.dot": "dot", f"{stem}.svg": "svg", f"{stem}.png": "png", f"{stem}.pdf": "pdf",
              f"{stem}.md": "md", f"{stem}.html": "html"}
    return [suffix[f] for f in files if f in suffix]


# ------------------------------------------------------------------------------------ render / export
@main.command()
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", default="svg", show_default=True, help="Comma list of dot, svg, png, pdf.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: next to the circuit).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def render(circuit_file: str, fmt: str, out: str | None, force: bool, quiet: bool, debug: bool) -> None:
    """Draw a saved circuit with graphviz (DOT is always written)."""
    formats = _formats(fmt, ("dot", "svg", "png", "pdf"))
    _export_file(Path(circuit_file), formats if "dot" in formats else ["dot", *formats], out, force, quiet)


@main.command("export")
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", default="mib", show_default=True, help=f"Comma list of {', '.join(FORMATS)}.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: next to the circuit).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def export_cmd(circuit_file: str, fmt: str, out: str | None, force: bool, quiet: bool, debug: bool) -> None:
    """Convert a saved circuit: MIB/EAP-IG JSON, networkx node-link JSON, DOT, SVG/PNG/PDF, report."""
    _export_file(Path(circuit_file), _formats(fmt), out, force, quiet)


def _export_file(path: Path, formats: list[str], out: str | None, force: bool, quiet: bool) -> None:
    if _under_torchrun():
        raise EdgeatpError("render and export only read and write files, so every torchrun process would write "
                           "the same ones; run them as one process, without torchrun")
    folder = Path(out) if out else path.parent
    same = folder.resolve() == path.parent.resolve()
    wanted = [f for f in formats if not (same and f == "json")]
    if not wanted:
        raise EdgeatpError(f"nothing to write: {path.name} is already the circuit's JSON in {folder}; choose another "
                           "--format or --out")
    from .export.files import check_writable

    check_writable(folder)
    _check_circuit_file(str(path))
    from .export import read_circuit

    circuit = read_circuit(path)
    written = _write(circuit, folder, wanted, path.stem, replace_set=False, overwrite=force)
    if not written.paths:
        raise EdgeatpError("nothing was written: every requested format was skipped")
    _say(quiet, "wrote " + ", ".join(str(p) for p in written.paths.values()))


# ------------------------------------------------------------------------------------ plan
@main.command("plan")
@click.option("--model", "model_spec", default="zoo:ioi", show_default=True,
              help="zoo:NAME, a checkpoint folder or its config.json (the config is enough: no weights are read) or a "
                   "TransformerLens name whose config is known offline.")
@click.option("--n-pairs", type=click.IntRange(1), default=64, show_default=True, help="Prompt pairs.")
@click.option("--seq-len", type=click.IntRange(1), default=None,
              help="Tokens per prompt (default: 32, or the model's context if shorter).")
@click.option("--shared-prefix", type=click.IntRange(0), default=0, show_default=True,
              help="Leading tokens every pair's two prompts share (edge attribution skips them).")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="One method (default: every method of the level).")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="edge", show_default=True)
@click.option("--positions/--no-positions", default=False, help="Position-resolved edges/nodes.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Weights and activations in this dtype (default: the checkpoint's own, else float32).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Prompt pairs per forward.")
@click.option("--memory-budget", type=click.FloatRange(0, min_open=True), default=1024.0, show_default=True,
              help="Megabytes of device memory for a batch, as for discover (batches and stacks fit it).")
@click.option("--offload", is_flag=True, help="Cached activations and gradients in host memory, as for discover.")
@click.option("--n-devices", type=click.IntRange(1), default=1, show_default=True,
              help="The model's layers split over this many devices, as for discover: memory is given per device.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def plan_cmd(model_spec: str, n_pairs: int, seq_len: int | None, shared_prefix: int, method: str | None, level: str,
             positions: bool, dtype: str | None, batch_size: int, memory_budget: float, offload: bool, n_devices: int,
             as_json: bool, debug: bool) -> None:
    """What a run would cost, from the model's config alone: graph size, passes, peak memory, time."""
    from .model_config import describe_model
    from .plan import Workload, plan

    _check_model_spec(model_spec, config_file=True)
    spec = describe_model(model_spec, dtype)
    if seq_len is not None and seq_len > spec.n_ctx:
        raise EdgeatpError(f"--seq-len {seq_len} is longer than {spec.name}'s context of {spec.n_ctx} tokens; "
                           f"use --seq-len {spec.n_ctx} or fewer")
    T = seq_len if seq_len is not None else min(32, spec.n_ctx)
    if shared_prefix >= T:
        raise EdgeatpError(f"--shared-prefix {shared_prefix} leaves no token that differs in prompts of {T} tokens; "
                           "use a smaller --shared-prefix or a larger --seq-len")
    work = Workload(level, n_pairs, T, shared_prefix, positions, batch_size, memory_budget, offload=offload,
                    n_devices=n_devices)
    methods = [method] if method is not None else None
    if method is not None:
        from .methods import get_method

        get_method(method, "node" if level == "neuron" else level)
    result = plan(spec, work, methods)
    click.echo(_json(result.as_dict()) if as_json else _plan_text(result))


def _size(n: float) -> str:
    """Bytes for people: MB below a gigabyte, GB below a terabyte, TB above."""
    for unit, scale in (("MB", 2 ** 20), ("GB", 2 ** 30)):
        if n < 1024 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2 ** 40:,.1f} TB"


def _count(x: float, digits: int = 1) -> str:
    """A count or ratio for a narrow column: grouped digits up to millions, then scientific notation."""
    return f"{x:,.{digits}f}" if x < 1e7 else f"{x:.2e}"


def _plan_text(p: Any) -> str:
    """The plan as a short report: the model, the workload, the graph, one row per method."""
    s, w, g = p.spec, p.work, p.graph
    sh = s.shape
    kv = f" ({sh.kv_heads} key/value heads)" if sh.grouped else ""
    arch = "attention only" if sh.attn_only else f"d_mlp {sh.d_mlp}" + (", gated" if s.gated_mlp else "") + \
        (", parallel attention+MLP" if sh.parallel_attn_mlp else "")
    lines = [f"{s.name} ({s.dtype}, {s.params / 1e6:,.1f} M parameters): {sh.n_layers} layers x {sh.n_heads} heads"
             f"{kv}, d_model {sh.d_model}, {arch}",
             f"workload: {w.n_pairs} pairs x {w.seq_len} tokens (prompts differ from token {w.shared_prefix}), "
             f"{w.level} level, {'per position' if w.positions else 'aggregated over positions'}, "
             f"batch size {w.batch_size}, memory budget {w.memory_budget:g} MB"
             + (", caches offloaded to the host" if w.offload else "")
             + (f", layers split over {w.n_devices} devices" if w.n_devices > 1 else ""),
             f"graph: {g.writers:,} writers, {g.readers:,} readers, {g.edges:,} edges; {g.nodes:,} node-level sites "
             f"in {g.components:,} components", "",
             f"{'method':<8}{'forwards':>12}{'backwards':>11}{'(equiv.)':>10}{'batch':>7}{'device peak':>13}"
             f"{'weights':>10}{'host':>11}{'time':>13}  device"]
    for name, m in p.methods.items():
        mem = m.memory
        lines.append(f"{name:<8}{_count(m.passes.forwards, 0):>12}{_count(m.passes.backwards, 0):>11}"
                     f"{_count(m.passes.backward_equivalents):>10}{mem.batch_size:>7}{_size(mem.device_peak):>13}"
                     f"{_size(mem.fixed['weights']):>10}{_size(mem.host):>11}{_count(m.time) + 'x':>13}  "
                     f"{m.as_dict()['device']}")
    if w.n_devices > 1:
        lines += ["", "device peak per device (the first holds the embedding, the gathered differences and estimates; "
                  "the last the unembedding):"]
        lines += [f"  {name:<8}" + ", ".join(_size(v) for v in m.memory.per_device) for name, m in p.methods.items()]
    lines += ["", "forwards: passes over every pair; backwards: calls per batch (equiv.: in full backwards, GradDrop's "
              "being truncated); time: expected, in units of one plain forward+backward over the same pairs; device "
              "peak: live tensors on the model's (fullest) device at the largest phase of a batch (no allocator caching); host: "
              "per-pair estimates kept for analyses (and offloaded caches); device: the smallest common accelerator memory that holds the "
              "peak with 10% to spare."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ listings
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_guard
def models(as_json: bool) -> None:
    """List the shipped zoo models and the other kinds of model edgeatp loads."""
    from .zoo import ZOO, read_card

    rows = []
    for name, entry in ZOO.items():
        card = read_card(name)
        rows.append({"name": f"zoo:{name}", "task": entry.task, "description": entry.description,
                     "accuracy": card["evaluation"]["accuracy"], "params": card["n_params"],
                     "mechanism": entry.known_mechanism})
    if as_json:
        click.echo(_json(rows))
        return
    for r in rows:
        click.echo(f"{r['name']:<22} task={r['task']:<10} acc={r['accuracy']:<7} params={r['params']:>7}  "
                   f"{r['description']}")
    click.echo("\nAlso: any TransformerLens pretrained name in your Hugging Face cache (gpt2, pythia-70m, ...),\n"
               "a local Hugging Face checkpoint directory, or a model object through the library API.")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_guard
def tasks(as_json: bool) -> None:
    """List the built-in tasks (or use --data FILE with your own prompt pairs)."""
    from .tasks.builtin import TASKS

    rows = [{"name": t.name, "description": t.description, "metric": t.default_metric} for t in TASKS.values()]
    if as_json:
        click.echo(_json(rows))
        return
    for r in rows:
        click.echo(f"{r['name']:<10} {r['description']}")
    click.echo("\nYour own pairs: --data FILE.jsonl|.csv with columns clean, corrupt, answer, wrong.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
