"""`ember quantize`, `ember imatrix`, `ember merge-lora` and `ember eval`:
thin wrappers over ember.quantize, ember.lora_merge and ember.evaluate."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.table import Table

from ember.cli.app import app
from ember.cli.common import console, err_console, progress_bar
from ember.cli.sizes import format_size, parse_size
from ember.errors import OptionError, QuantizationError
from ember.evaluate import kl_divergence, perplexity
from ember.gguf import validate_model
from ember.lora_merge import merge_lora
from ember.models import resolve_model
from ember.progress import ProgressCallback

# The package, not the API function ember.quantize() that shares its name; its
# parts that load llama.cpp are imported when first used.
q = importlib.import_module("ember.quantize")


@contextlib.contextmanager
def _lazy_bar() -> Iterator[ProgressCallback]:
    """A progress bar that appears on the first report, so an error raised
    before any progress prints as one clean line."""
    with contextlib.ExitStack() as stack:
        bar: list[ProgressCallback] = []

        def callback(description: str, completed: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(progress_bar(byte_units=False)))
            bar[0](description, completed, total)

        yield callback


def _model_paths(arg: str | Path) -> list[Path]:
    """A path as given (the command checks it), or the files a model name
    (``demo``, ``llama3:8b``) loads, so every command here takes what
    ``ember run`` takes."""
    path = Path(arg).expanduser()
    return [path] if path.exists() else resolve_model(str(arg)).model_paths


def _parse_tensor_types(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        pattern, sep, qtype = item.partition("=")
        if not sep or not pattern.strip() or not qtype.strip():
            raise OptionError(f"--tensor-type {item!r}: use PATTERN=TYPE, e.g. attn_v=q8_0")
        out[pattern.strip()] = qtype.strip()
    return out


@app.command("quantize")
def quantize_cmd(
    input: str = typer.Argument(None, metavar="INPUT", help="GGUF model (F16/F32/BF16; any shard of a split model) or a registry name.", show_default=False),
    output: Path = typer.Argument(None, metavar="OUTPUT", help="Output GGUF file.", show_default=False),
    qtype: str = typer.Argument(None, metavar="TYPE", help="Quantization type, e.g. Q4_K_M (see --list).", show_default=False),
    imatrix: Path = typer.Option(None, "--imatrix", help="Importance matrix (ember imatrix, or llama-imatrix GGUF/.dat); required for IQ1/IQ2/IQ3_XXS/IQ3_XS/Q2_K_S."),
    output_tensor_type: str = typer.Option(None, "--output-tensor-type", help="ggml type for output.weight, e.g. q8_0."),
    token_embedding_type: str = typer.Option(None, "--token-embedding-type", help="ggml type for the token embeddings."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="PATTERN=TYPE (regex on tensor names), repeatable."),
    pure: bool = typer.Option(False, "--pure", help="No K-quant mix: every tensor gets TYPE."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow re-quantizing quantized tensors (quality suffers)."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Leave output.weight as it is."),
    keep_split: bool = typer.Option(False, "--keep-split", help="Write as many shards as the input has."),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads (0: all cores)."),
    list_types: bool = typer.Option(False, "--list", help="List the types; with a MODEL, the size each would give."),
    recommend: bool = typer.Option(False, "--recommend", help="Recommend a type for MODEL that fits --memory."),
    memory: str = typer.Option(None, "--memory", help="Memory to fit in (with --recommend), e.g. 8G."),
    num_ctx: int = typer.Option(4096, "--num-ctx", help="Context length to leave KV-cache room for (with --recommend)."),
    quality: Path = typer.Option(None, "--quality", help="JSON of measured quality (bench/bench_quant_quality.py --json) for --recommend."),
) -> None:
    """Quantize a GGUF model with llama.cpp (every type llama-quantize knows)."""
    model = _model_paths(input)[0] if input is not None else None
    if list_types:
        _list(model)
        return
    if recommend:
        if model is None or memory is None:
            raise OptionError("use: ember quantize --recommend MODEL --memory 8G")
        _recommend(model, parse_size(memory), num_ctx, quality)
        return
    if model is None or output is None or qtype is None:
        raise OptionError("use: ember quantize INPUT OUTPUT TYPE (or --list [MODEL], --recommend MODEL --memory SIZE)")
    name = q.parse_quant_type(qtype)
    with _lazy_bar() as bar:
        files = q.quantize_model(
            model,
            output,
            name,
            imatrix=imatrix,
            output_tensor_type=output_tensor_type,
            token_embedding_type=token_embedding_type,
            tensor_types=_parse_tensor_types(tensor_type) or None,
            pure=pure,
            allow_requantize=allow_requantize,
            keep_split=keep_split,
            leave_output_tensor=leave_output_tensor,
            nthread=threads,
            progress=bar,
        )

    size_in = sum(Path(p).stat().st_size for p in validate_model(model))
    size_out = sum(f.stat().st_size for f in files)
    for f in files:
        console.print(f"wrote {f}")
    console.print(f"{name}: {format_size(size_in)} -> {format_size(size_out)}")


def _list(model: Path | None) -> None:
    table = Table(title="quantization types" + (f" for {model.name}" if model else ""))
    table.add_column("type")
    table.add_column("ftype", justify="right")
    table.add_column("bits/weight", justify="right")
    if model:
        table.add_column("size", justify="right")
    table.add_column("imatrix")
    table.add_column("description")
    for name, qt in q.QUANT_TYPES.items():
        bits = f"{qt.bits_per_weight:.2f}" if qt.bits_per_weight else "-"
        row = [name, str(qt.ftype) if name != "COPY" else "", bits]
        needs = qt.needs_imatrix
        if model:
            try:
                plan = q.plan_quantization(model, name)
            except QuantizationError as e:
                row += ["-"]
                err_console.print(f"{name}: {e}")
            else:
                row[2] = f"{plan.bits_per_weight:.2f}"
                row += [format_size(q.model_file_size_estimate(model, plan))]
                needs = plan.requires_imatrix  # llama.cpp's verdict for this model
        row += ["required" if needs else "", qt.description]
        table.add_row(*row)
    console.print(table)
    console.print("aliases: Q3_K=Q3_K_M, Q4_K=Q4_K_M, Q5_K=Q5_K_M, FP16=F16, FP32=F32; ftype numbers are accepted too")


def _recommend(model: Path, memory: int, num_ctx: int, quality: Path | None) -> None:
    rec = q.recommend(model, memory, num_ctx=num_ctx, quality_file=quality)
    for line in rec.report_lines():
        console.print(line, soft_wrap=True, highlight=False)
    if rec.choice is None:
        raise typer.Exit(1)


@app.command("imatrix")
def imatrix_cmd(
    model: str = typer.Argument(..., help="GGUF model (F16/F32 for best results) or registry name."),
    file: Path = typer.Option(..., "--file", "-f", help="UTF-8 sample text (a few thousand tokens or more)."),
    output: Path = typer.Option(..., "--output", "-o", help="Importance matrix to write (GGUF, as llama-imatrix)."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk."),
    chunks: int = typer.Option(0, "--chunks", help="At most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads (0: physical cores)."),
) -> None:
    """Compute an importance matrix from sample text (for --imatrix; needed by IQ1/IQ2/IQ3_XXS types)."""
    with _lazy_bar() as bar:
        r = q.compute_imatrix(_model_paths(model)[0], file, output, n_ctx=ctx, max_chunks=chunks or None, threads=threads or None, progress=bar)
    console.print(f"wrote {r.path}: {r.n_entries} tensors, {r.n_chunks} chunks of {ctx} tokens")


@app.command("merge-lora")
def merge_lora_cmd(
    base: str = typer.Argument(..., help="Base model GGUF (or a registry name)."),
    adapter: Path = typer.Argument(..., help="LoRA adapter GGUF (ember convert-lora makes one)."),
    output: Path = typer.Argument(..., help="Output GGUF with the adapter merged in."),
    scale: float = typer.Option(1.0, "--scale", help="Adapter strength (like `ember run --lora FILE:SCALE`)."),
    outtype: str = typer.Option(
        "auto", "--outtype", help="Type of merged tensors: auto (keep each tensor's type where gguf-py can write it, else F16), f32, f16, bf16, q8_0."
    ),
) -> None:
    """Write a new GGUF with a LoRA adapter merged into the weights."""
    with _lazy_bar() as bar:
        result = merge_lora(_model_paths(base)[0], adapter, output, scale=scale, outtype=outtype, progress=bar)
    console.print(f"wrote {output}: {result.n_merged} tensors merged")
    for note in result.notes:
        console.print(note)


eval_app = typer.Typer(help="Measure model quality: perplexity and KL divergence (as llama-perplexity does).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
def perplexity_cmd(
    model: str = typer.Argument(..., help="GGUF model or registry name."),
    file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text file to score."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk (llama-perplexity's -c)."),
    chunks: int = typer.Option(0, "--chunks", help="Score at most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads (0: physical cores)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="Flash attention (on: like llama-perplexity's default on CPUs)."),
) -> None:
    """Perplexity of MODEL on a text, computed exactly as llama-perplexity does."""
    with _lazy_bar() as bar:
        r = perplexity(_model_paths(model), file, n_ctx=ctx, max_chunks=chunks or None, threads=threads or None, flash_attn=flash_attn, progress=bar)
    console.print(f"perplexity: {r.ppl:.4f} +/- {r.ppl_stderr:.4f} ({r.n_chunks} chunks of {r.n_ctx} tokens, {r.n_scored} tokens scored)")


@eval_app.command("kld")
def kld_cmd(
    base: str = typer.Argument(..., help="Reference model (e.g. the F16 GGUF), file or registry name."),
    quant: str = typer.Argument(..., help="Model to compare (e.g. a quantization of BASE), file or registry name."),
    file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text file."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Tokens per chunk."),
    chunks: int = typer.Option(0, "--chunks", help="At most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads (0: physical cores)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="Flash attention (on: like llama-perplexity's default on CPUs)."),
) -> None:
    """KL divergence of QUANT from BASE and how often their top token agrees
    (like llama-perplexity --kl-divergence)."""
    with _lazy_bar() as bar:
        r = kl_divergence(_model_paths(base), _model_paths(quant), file, n_ctx=ctx, max_chunks=chunks or None, threads=threads or None, flash_attn=flash_attn, progress=bar)
    console.print(f"mean KLD:        {r.kld_mean:.6f} +/- {r.kld_stderr:.6f}")
    console.print(f"same top token:  {100 * r.same_top:.2f}% +/- {100 * r.same_top_stderr:.2f}%")
    console.print(f"perplexity base: {r.ppl_base:.4f}   quant: {r.ppl_quant:.4f}   ratio: {r.ppl_quant / r.ppl_base:.4f}")
    console.print(f"({r.n_chunks} chunks of {r.n_ctx} tokens, {r.n_scored} tokens scored)")
