"""The ``edgeatp`` command line: discover, verify, render and export circuits.

``edgeatp discover`` with no arguments runs end to end on the shipped ``zoo:ioi`` model and
its task, offline, and writes the circuit (JSON), its drawing (DOT, SVG) and a report.
User errors exit with status 2 and one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import EdgeatpError

FORMATS = ("json", "mib", "dot", "svg", "png", "pdf", "md", "html", "networkx")
DEFAULT_FORMATS = "json,dot,svg,md"


class UserError(click.ClickException):
    """A one-line error for the user (exit status 2)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _guard(fn: Callable) -> Callable:
    """Turn user errors into one line; ``--debug`` (or EDGEATP_DEBUG=1) re-raises with the traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("EDGEATP_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except (EdgeatpError, ValueError, KeyError, FileNotFoundError) as exc:
            if debug:
                raise
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise UserError(str(msg).splitlines()[0] if str(msg) else type(exc).__name__) from None
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line plus where to look
            if debug:
                raise
            raise click.ClickException(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug "
                                       "for the traceback and please report it") from None
    return wrapper


def _say(quiet: bool, text: str = "") -> None:
    if not quiet:
        click.echo(text)


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


def _formats(spec: str) -> list[str]:
    out = [f.strip().lower() for f in spec.split(",") if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise EdgeatpError(f"--format: unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeatp")
def main() -> None:
    """edgeatp: find the circuits inside transformer language models (AtP*, edge attribution, exact verification)."""


# ------------------------------------------------------------------------------------ discover
@main.command()
@click.option("--model", "model_spec", default="zoo:ioi", show_default=True,
              help="zoo:NAME, a TransformerLens name (gpt2, pythia-70m; must be cached) or a local HF checkpoint dir.")
@click.option("--task", default=None, help="Built-in task (see `edgeatp tasks`); default: the zoo model's task, else ioi.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="JSONL/CSV prompt pairs with columns clean, corrupt, answer, wrong.")
@click.option("--n-pairs", type=click.IntRange(1), default=64, show_default=True, help="Pairs generated for a built-in task.")
@click.option("--metric", type=click.Choice(["logit_diff", "logprob", "prob", "kl"]), default="logit_diff", show_default=True)
@click.option("--method", type=click.Choice(["atp", "atp-qk", "atp-gd", "atp*", "ig", "exact"]), default="atp-qk",
              show_default=True, help="Attribution method (atp* = QK fix + GradDrop).")
@click.option("--level", type=click.Choice(["edge", "node", "neuron"]), default="edge", show_default=True)
@click.option("--positions/--no-positions", default=False, help="Position-resolved edges/nodes.")
@click.option("--group", default=None, help="Also score coarse node groups: layer, head, span:0-3,4-9 or a JSON file.")
@click.option("--top-k", type=click.IntRange(0), default=None,
              help="Keep the k best edges/nodes. Default: the smallest circuit reaching --target faithfulness.")
@click.option("--threshold", type=float, default=None, help="Keep edges whose score is at least this.")
@click.option("--cumulative", type=float, default=None, help="Keep the top edges holding this share of the total score.")
@click.option("--greedy", type=click.IntRange(1), default=None, help="Grow k edges from the logits backwards.")
@click.option("--target", type=click.FloatRange(0, 1.5), default=0.8, show_default=True,
              help="Faithfulness the automatic circuit size aims for.")
@click.option("--verify", "n_verify", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many top edges/nodes.")
@click.option("--sample-below", type=click.IntRange(0), default=20, show_default=True,
              help="Exactly patch this many random edges outside the circuit.")
@click.option("--bound", is_flag=True, help="Add the AtP* diagnostic bound on missed edges (subsampling + Welch).")
@click.option("--bound-samples", type=click.IntRange(2), default=256, show_default=True,
              help="Random edge subsets patched for --bound.")
@click.option("--bound-p", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Inclusion probability of each unverified edge in a --bound subset (small = weak interactions).")
@click.option("--direction", type=click.Choice(["noising", "denoising"]), default="noising", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads (default: 1 for small models, where more only add overhead; else torch's default).")
@click.option("--out", type=click.Path(file_okay=False), default="edgeatp-out", show_default=True)
@click.option("--format", "fmt", default=DEFAULT_FORMATS, show_default=True, help=f"Comma list of {', '.join(FORMATS)}.")
@click.option("--allow-download", is_flag=True, help="Let TransformerLens download a model that is not cached.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_guard
def discover(model_spec: str, task: str | None, data: str | None, n_pairs: int, metric: str, method: str, level: str,
             positions: bool, group: str | None, top_k: int | None, threshold: float | None, cumulative: float | None,
             greedy: int | None, target: float, n_verify: int, sample_below: int, bound: bool, bound_samples: int,
             bound_p: float, direction: str,
             device: str, dtype: str | None, batch_size: int, seed: int, threads: int | None, out: str, fmt: str,
             allow_download: bool,
             quiet: bool, as_json: bool, debug: bool) -> None:
    """Find, verify and export a circuit (defaults: zoo:ioi, its task, edge level, atp-qk)."""
    from .pipeline import DiscoverConfig, run_discover

    formats = _formats(fmt)
    quiet_text = quiet or as_json
    cfg = DiscoverConfig(model=model_spec, task=task, data=data, n_pairs=n_pairs, metric=metric, method=method,
                         level=level, positions=positions, group=group, top_k=top_k, threshold=threshold,
                         cumulative=cumulative, greedy=greedy, target=target, n_verify=n_verify,
                         sample_below=sample_below, bound=bound, bound_samples=bound_samples, bound_p=bound_p,
                         direction=direction, device=device, dtype=dtype,
                         batch_size=batch_size, seed=seed, allow_download=allow_download, threads=threads)
    t0 = time.time()
    result = run_discover(cfg, progress=not quiet_text, log=lambda s: _say(quiet_text, s))
    paths = result.write(Path(out), formats)
    summary = {**result.summary(), "seconds": round(time.time() - t0, 1), "outputs": {k: str(v) for k, v in paths.items()}}
    if as_json:
        click.echo(_json(summary))
    else:
        _say(quiet, result.describe())
        _say(quiet, "wrote " + ", ".join(str(p) for p in paths.values()))


# ------------------------------------------------------------------------------------ verify
@main.command()
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_spec", default=None, help="Override the model recorded in the circuit.")
@click.option("--task", default=None, help="Override the task recorded in the circuit.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="Prompt pairs to verify on instead.")
@click.option("--n-pairs", type=click.IntRange(1), default=None)
@click.option("--verify", "n_verify", type=click.IntRange(0), default=20, show_default=True)
@click.option("--sample-below", type=click.IntRange(0), default=20, show_default=True)
@click.option("--bound", is_flag=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Where to write the verified circuit (default: in place).")
@click.option("--allow-download", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--debug", is_flag=True)
@_guard
def verify(circuit_file: str, model_spec: str | None, task: str | None, data: str | None, n_pairs: int | None,
           n_verify: int, sample_below: int, bound: bool, batch_size: int, seed: int | None, out: str | None,
           allow_download: bool, quiet: bool, as_json: bool, debug: bool) -> None:
    """Re-verify a saved circuit with exact patches and whole-circuit runs."""
    from .pipeline import reverify

    result = reverify(Path(circuit_file), model=model_spec, task=task, data=data, n_pairs=n_pairs, n_verify=n_verify,
                      sample_below=sample_below, bound=bound, batch_size=batch_size, seed=seed,
                      allow_download=allow_download, progress=not (quiet or as_json))
    target = Path(out) if out else Path(circuit_file)
    paths = result.write(target.parent, ["json"], stem=target.stem)
    if as_json:
        click.echo(_json({**result.summary(), "outputs": {k: str(v) for k, v in paths.items()}}))
    else:
        _say(quiet, result.describe())
        _say(quiet, f"wrote {paths['json']}")


# ------------------------------------------------------------------------------------ render / export
@main.command()
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", default="svg", show_default=True, help="Comma list of dot, svg, png, pdf.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: next to the circuit).")
@click.option("--quiet", is_flag=True)
@click.option("--debug", is_flag=True)
@_guard
def render(circuit_file: str, fmt: str, out: str | None, quiet: bool, debug: bool) -> None:
    """Draw a saved circuit with graphviz (DOT is always written)."""
    formats = _formats(fmt)
    bad = [f for f in formats if f not in ("dot", "svg", "png", "pdf")]
    if bad:
        raise EdgeatpError(f"render: {', '.join(bad)} is not a drawing format; use dot, svg, png or pdf")
    _export_file(Path(circuit_file), formats if "dot" in formats else ["dot", *formats], out, quiet)


@main.command("export")
@click.argument("circuit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", default="mib", show_default=True, help=f"Comma list of {', '.join(FORMATS)}.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: next to the circuit).")
@click.option("--quiet", is_flag=True)
@click.option("--debug", is_flag=True)
@_guard
def export_cmd(circuit_file: str, fmt: str, out: str | None, quiet: bool, debug: bool) -> None:
    """Convert a saved circuit: MIB/EAP-IG JSON, networkx node-link JSON, DOT, SVG/PNG/PDF, report."""
    _export_file(Path(circuit_file), _formats(fmt), out, quiet)


def _export_file(path: Path, formats: list[str], out: str | None, quiet: bool) -> None:
    from .circuit import Circuit
    from .pipeline import write_circuit

    circuit = Circuit.from_json(str(path))
    folder = Path(out) if out else path.parent
    stem = path.stem
    paths = write_circuit(circuit, folder, formats, stem=stem, skip_existing_json=folder.resolve() == path.parent.resolve())
    _say(quiet, "wrote " + ", ".join(str(p) for p in paths.values()))


# ------------------------------------------------------------------------------------ listings
@main.command()
@click.option("--json", "as_json", is_flag=True)
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
        click.echo(f"{r['name']:<21} task={r['task']:<10} acc={r['accuracy']:.3f} params={r['params']:>7}  {r['description']}")
    click.echo("\nAlso: any TransformerLens pretrained name in your Hugging Face cache (gpt2, pythia-70m, ...),\n"
               "a local GPT-2 or GPT-NeoX checkpoint directory, or a HookedTransformer through the library API.")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@_guard
def tasks(as_json: bool) -> None:
    """List the built-in tasks (or use --data FILE with your own prompt pairs)."""
    from .tasks import TASKS

    rows = [{"name": t.name, "description": t.description, "metric": t.default_metric} for t in TASKS.values()]
    if as_json:
        click.echo(_json(rows))
        return
    for r in rows:
        click.echo(f"{r['name']:<10} {r['description']}")
    click.echo("\nYour own pairs: --data FILE.jsonl|.csv with columns clean, corrupt, answer, wrong.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
