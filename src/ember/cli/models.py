"""`ember create`, `list`, `show`, `cp`, `rm`, `pull`: the registry, as Ollama's
commands do it (thin layer over :mod:`ember.registry`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from ember.cli.app import app
from ember.cli.common import console, err_console, progress_bar
from ember.cli.sizes import format_size
from ember.errors import ModelfileError
from ember.progress import ProgressCallback
from ember.registry.core import copy_model, delete_model
from ember.registry.create import create_model
from ember.registry.modelfile import Modelfile, parse_modelfile, quote
from ember.registry.pull import pull_model
from ember.registry.show import show_model


@contextlib.contextmanager
def _lazy_progress() -> Iterator[ProgressCallback]:
    """A progress bar that appears on the first report with a total, so an
    error found before any work prints as one line with nothing around it.
    Reports without a total are status lines (Ollama's ``pulling manifest``),
    printed once each."""
    with contextlib.ExitStack() as stack:
        bar: ProgressCallback | None = None
        last_status = ""

        def callback(description: str, completed: int, total: int) -> None:
            nonlocal bar, last_status
            if not total:
                if description != last_status:
                    err_console.print(description, highlight=False)
                    last_status = description
                return
            if bar is None:
                bar = stack.enter_context(progress_bar())
            bar(description, completed, total)

        yield callback


@app.command()
def create(
    name: str = typer.Argument(..., help="Model name, e.g. qwen2.5:7b or me/mymodel:v1."),
    file: Path = typer.Option(None, "-f", "--file", help="Modelfile (default: ./Modelfile)."),
    from_: str = typer.Option(None, "--from", help="Shortcut for a Modelfile with just 'FROM <this>' (a GGUF file, folder or model)."),
    quantize: str = typer.Option(None, "-q", "--quantize", help="Quantize while creating (Q4_K_M, Q8_0, ...)."),
) -> None:
    """Create a model from a Modelfile (FROM a GGUF file or shard, a Hugging Face folder or another model;
    a second FROM may name a vision projector GGUF)."""
    mf: Modelfile | Path
    if from_ is not None:
        if file is not None:
            raise ModelfileError("give either -f MODELFILE or --from SOURCE, not both")
        mf = parse_modelfile(f"FROM {quote(from_)}\n", base_dir=Path.cwd(), filename="--from")
    else:
        mf = file if file is not None else Path("Modelfile")
    with _lazy_progress() as progress:
        result = create_model(name, mf, quantize=quantize, progress=progress)
    console.print(f"created '{result.name}'", highlight=False)


@app.command()
def show(
    name: str = typer.Argument(..., help="Model name."),
    modelfile: bool = typer.Option(False, "--modelfile", help="Print the Modelfile (it creates the same model again)."),
    template: bool = typer.Option(False, "--template", help="Print the template."),
    system: bool = typer.Option(False, "--system", help="Print the system message."),
    parameters: bool = typer.Option(False, "--parameters", help="Print the parameters."),
    license_: bool = typer.Option(False, "--license", help="Print the license(s)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Also print every GGUF metadata key."),
) -> None:
    """Show a model's details, or one part of it."""
    d = show_model(name)
    if modelfile:
        typer.echo(d.modelfile, nl=False)
        return
    if template:
        typer.echo(d.template or "")
        return
    if system:
        typer.echo(d.system or "")
        return
    if parameters:
        if d.parameters:
            typer.echo(d.parameters)
        return
    if license_:
        typer.echo("\n\n".join(d.license))
        return
    info = d.metadata
    arch = info.get("general.architecture") or d.details.get("family") or ""

    def key(suffix: str) -> Any:
        return info.get(f"{arch}.{suffix}")

    model_rows = [
        ("architecture", arch),
        ("parameters", d.details.get("parameter_size")),
        ("context length", key("context_length")),
        ("embedding length", key("embedding_length")),
        ("quantization", d.details.get("quantization_level")),
        ("files", str(len(d.resolved.model_paths)) if len(d.resolved.model_paths) > 1 else None),
    ]
    _section("Model", [(k, str(v)) for k, v in model_rows if v not in (None, "")])
    _section("Capabilities", [(c, "") for c in d.capabilities])
    if d.resolved.projector_paths:
        proj = d.projector_info
        _section("Projector", [(k, str(v)) for k, v in (
            ("architecture", proj.get("general.architecture")),
            ("files", str(len(d.resolved.projector_paths))),
        ) if v])
    if d.resolved.adapter_paths:
        _section("Adapters", [(p.name[:19], format_size(p.stat().st_size)) for p in d.resolved.adapter_paths])
    if d.parameters:
        _section("Parameters", [tuple(line.split(None, 1)) for line in d.parameters.splitlines()])  # type: ignore[misc]
    if d.system:
        _text_section("System", d.system)
    if d.license:
        _text_section("License", d.license[0])
    if verbose:
        _section("Metadata", [(k, json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v) for k, v in sorted(info.items())])


def _section(title: str, rows: list[tuple[str, str]]) -> None:
    typer.echo(f"  {title}")
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        typer.echo(f"    {k.ljust(width)}    {v}".rstrip())
    typer.echo("")


def _text_section(title: str, text: str, max_lines: int = 2) -> None:
    typer.echo(f"  {title}")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in lines[:max_lines]:
        typer.echo(f"    {line.strip()}")
    if len(lines) > max_lines:
        typer.echo("    ...")
    typer.echo("")


@app.command()
def cp(
    source: str = typer.Argument(..., help="Existing model."),
    destination: str = typer.Argument(..., help="New name."),
) -> None:
    """Copy a model to a new name (no data is duplicated)."""
    copy_model(source, destination)
    typer.echo(f"copied '{source}' to '{destination}'")


@app.command()
def rm(names: list[str] = typer.Argument(..., help="Models to remove.")) -> None:
    """Remove models (and the files no other model uses). 'ember pull demo' brings the demo model back."""
    for name in names:
        delete_model(name)
        typer.echo(f"deleted '{name}'")


@app.command()
def pull(
    ref: str = typer.Argument(..., help="An Ollama name (llama3.2, qwen2.5:7b, user/model:tag, host/ns/model:tag), "
                              "hf.co/USER/REPO[:QUANT], modelscope.cn/USER/REPO[:QUANT], or demo."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow http:// registries (as Ollama's --insecure)."),
) -> None:
    """Download a model: from Ollama's registry (EMBER_REGISTRY for a mirror), Hugging Face or ModelScope.

    Hugging Face repositories give their GGUF files, or their safetensors
    checkpoint converted; HF_ENDPOINT (mirrors) and HF_TOKEN are honoured, and
    EMBER_PULL_SOURCE=modelscope sends hf.co references to ModelScope.
    Interrupted downloads resume."""
    with _lazy_progress() as progress:
        result = pull_model(ref, insecure=insecure, progress=progress)
    err_console.print(f"pulled '{result.name}' ({format_size(result.size)})", highlight=False)
    typer.echo("success")
