"""`ember inspect`, `ember validate`, `ember split`, `ember merge`: thin
commands over :mod:`ember.gguf`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from ember.cli.app import app
from ember.cli.common import console, err_console, progress_bar
from ember.cli.sizes import format_size, parse_size
from ember.errors import OptionError
from ember.gguf import ModelInfo, inspect_model, merge_model, plan_split, read_model, split_model
from ember.gguf.inspect import format_params
from ember.options import LOAD_OPTIONS


def _print_info(info: ModelInfo, tensors: bool) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("file", info.path)
    t.add_row("architecture", info.architecture or "-")
    t.add_row("name", info.name or "-")
    t.add_row("parameters", f"{format_params(info.parameter_count)} ({info.parameter_count:,})")
    t.add_row("file type", f"{info.file_type or '-'}" + (f" ({info.file_type_id})" if info.file_type_id is not None else ""))
    t.add_row("context length", str(info.context_length) if info.context_length is not None else "-")
    if info.embedding_length is not None:
        t.add_row("embedding length", str(info.embedding_length))
    if info.block_count is not None:
        t.add_row("layers", str(info.block_count))
    t.add_row("bits per weight", f"{info.bits_per_weight:.2f}")
    tok = info.tokenizer or "-"
    if info.vocab_size is not None:
        tok += f" ({info.vocab_size:,} tokens)"
    t.add_row("tokenizer", tok)
    if info.has_chat_template:
        assert info.chat_template is not None
        t.add_row("chat template", f"yes ({len(info.chat_template):,} chars)")
    else:
        t.add_row("chat template", "no")
    if info.split_count > 1:
        t.add_row("split", f"{info.split_count} shards, {format_size(info.total_size)}")
        for f, s in zip(info.split_files, info.split_sizes):
            t.add_row("", f"{f}  {format_size(s)}")
    else:
        t.add_row("size", format_size(info.total_size))
    t.add_row("gguf", f"v{info.gguf_version}, alignment {info.alignment}, {len(info.metadata)} keys, {len(info.tensors)} tensors")
    console.print(t)

    q = Table(title="Quantization", title_justify="left")
    q.add_column("type")
    q.add_column("tensors", justify="right")
    q.add_column("bytes", justify="right")
    q.add_column("share", justify="right")
    for name, stats in info.quant_types.items():
        share = stats.bytes / info.tensor_bytes * 100 if info.tensor_bytes else 0.0
        q.add_row(name, str(stats.tensors), format_size(stats.bytes), f"{share:.1f}%")
    console.print(q)

    if tensors:
        tt = Table(title="Tensors", title_justify="left")
        for col in ("#", "name", "type", "shape", "bytes"):
            tt.add_column(col, justify="right" if col in ("#", "bytes") else "left")
        if info.split_count > 1:
            tt.add_column("shard", justify="right")
        for i, e in enumerate(info.tensors):
            row = [str(i), e.name, e.type, "x".join(map(str, e.shape)), f"{e.bytes:,}"]
            if info.split_count > 1:
                row.append(str(e.shard + 1))
            tt.add_row(*row)
        console.print(tt)


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A GGUF file, or any shard of a split model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    memory: bool = typer.Option(False, "--memory", help="Load the model and report the memory it needs."),
    param: list[str] = typer.Option([], "--param", "-p", help="With --memory: NAME=VALUE load option (num_ctx, kv_cache_type, num_gpu, ...)."),
) -> None:
    """Show what a GGUF model is: architecture, size, quantization, tokenizer, template, shards."""
    info = inspect_model(file)
    report = _memory_report(file, param) if memory else None
    if as_json:
        data = info.to_dict()
        if not tensors:
            data.pop("tensors")
        if report is not None:
            data["memory"] = report
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return
    _print_info(info, tensors)
    if report is not None:
        t = Table(title="memory", show_header=False, box=None, pad_edge=False)
        t.add_column(style="bold", no_wrap=True)
        t.add_column()
        t.add_row("context (num_ctx)", str(report["num_ctx"]))
        for key, label in (("model_bytes", "weights"), ("kv_cache_bytes", "KV cache"), ("compute_bytes", "compute buffers"),
                           ("output_bytes", "output buffer"), ("gpu_bytes", "on the GPU"), ("rss_bytes", "process RSS")):
            t.add_row(label, format_size(report[key]))
        t.add_row("total", format_size(report["model_bytes"] + report["kv_cache_bytes"] + report["compute_bytes"] + report["output_bytes"]))
        console.print(t)


def _memory_report(file: Path, params: list[str]) -> dict[str, int]:
    """Load the model with the given load options and measure what llama.cpp allocates."""
    # lazy: only --memory loads llama.cpp (ember.api); inspect, validate, split and merge do not.
    from ember.api import Model
    from ember.cli.run import parse_params

    options = parse_params(params)
    unknown = [k for k in options if k not in LOAD_OPTIONS]
    if unknown:
        raise OptionError(f"--param {unknown[0]}: only load options (e.g. num_ctx, kv_cache_type, num_gpu) change memory")
    with Model(str(file), **options) as model:
        report = model.memory.to_dict()
        report["num_ctx"] = model.scheduler.num_ctx
        return report


@app.command()
def validate(
    file: Path = typer.Argument(..., help="A GGUF file, or any shard of a split model."),
) -> None:
    """Check a GGUF model's structure (header, keys, tensor table, data bounds, shards)."""
    headers = read_model(file)
    n_tensors = sum(len(h.tensors) for h in headers)
    size = sum(h.file_size for h in headers)
    shards = f", {len(headers)} shards" if len(headers) > 1 else ""
    console.print(
        f"OK: {file}: GGUF v{headers[0].version}, {len(headers[0].kv)} keys, {n_tensors} tensors{shards}, "
        f"{format_size(size)}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def split(
    src: Path = typer.Argument(..., help="The GGUF model to split."),
    out_prefix: str = typer.Argument(..., help="Output prefix: writes PREFIX-00001-of-0000N.gguf ..."),
    max_size: str | None = typer.Option(None, "--max-size", help="Maximum tensor bytes per shard, e.g. 2G or 500M."),
    max_tensors: int | None = typer.Option(None, "--max-tensors", help="Maximum tensors per shard (default 128)."),
    no_tensor_first_split: bool = typer.Option(
        False, "--no-tensor-first-split", help="Put only metadata in the first shard (as llama.cpp can)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
) -> None:
    """Split a GGUF model into llama.cpp-compatible shards (PREFIX-00001-of-00003.gguf)."""
    if max_size is not None and max_tensors is not None:
        raise OptionError("use either --max-size or --max-tensors, not both")
    size = parse_size(max_size) if max_size is not None else None
    plans = plan_split(
        src, out_prefix, max_size=size, max_tensors=max_tensors, no_tensor_first_split=no_tensor_first_split
    )
    if size is not None:
        for p in plans:
            if p.tensor_bytes > size:
                name, tensor = p.tensors[0][1].name, p.tensors[0][1]
                err_console.print(
                    f"Note: tensor {name} ({format_size(tensor.nbytes)}) is larger than --max-size; "
                    f"it gets {p.path.name} to itself.",
                    highlight=False,
                    soft_wrap=True,
                )
    if dry_run:
        console.print(f"{len(plans)} shards (dry run, nothing written):", highlight=False)
        for p in plans:
            console.print(
                f"{p.path}  {len(p.tensors)} tensors  {format_size(p.tensor_bytes)}", highlight=False, soft_wrap=True
            )
        return
    with progress_bar() as progress:
        paths = split_model(
            src,
            out_prefix,
            max_size=size,
            max_tensors=max_tensors,
            no_tensor_first_split=no_tensor_first_split,
            progress=progress,
        )
    for path in paths:
        console.print(f"{path}  {format_size(path.stat().st_size)}", highlight=False, soft_wrap=True)
    console.print(f"Wrote {len(paths)} shards.", highlight=False)


@app.command()
def merge(
    first_shard: Path = typer.Argument(..., help="Any shard of a split model (PREFIX-0000K-of-0000N.gguf)."),
    out: Path = typer.Argument(..., help="The merged GGUF file to write."),
) -> None:
    """Merge the shards of a split GGUF model into one file."""
    with progress_bar() as progress:
        path = merge_model(first_shard, out, progress=progress)
    console.print(f"Wrote {path} ({format_size(path.stat().st_size)}).", highlight=False, soft_wrap=True)
