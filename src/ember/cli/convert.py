"""`ember convert` (Hugging Face folder -> GGUF) and `ember convert-lora`
(PEFT adapter -> GGUF adapter): thin wrappers over ember.convert. `convert`
plans once (which checks the whole checkpoint), prints the plan, then writes."""

from __future__ import annotations

from pathlib import Path

import typer

from ember.cli.app import app
from ember.cli.common import console, progress_bar
from ember.cli.sizes import format_size, parse_size
from ember.convert import ConversionPlan, convert_lora, plan, write


@app.command("convert")
def convert_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json, safetensors or pytorch_model*.bin, tokenizer).", show_default=False),
    outfile: Path = typer.Option(None, "--outfile", "-o", help="Output file or folder (default: beside MODEL_DIR, named Name-Size-TYPE.gguf). {ftype} in the name is replaced by the type."),
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0, auto (the checkpoint's 16-bit type) or any quantization type (q4_k_m, q6_k, ...)."),
    split_max_size: str = typer.Option(None, "--split-max-size", help="Split the output into shards of at most this size, e.g. 2G."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the checkpoint, tokenizer and output names and print the plan without writing."),
    vocab_only: bool = typer.Option(False, "--vocab-only", help="Write only the tokenizer and metadata."),
    text_only: bool = typer.Option(False, "--text-only", help="For a vision-language model: write only the language model, not its vision projector."),
) -> None:
    """Convert a Hugging Face model to GGUF (llama.cpp's format).

    A vision-language checkpoint (InternVL, Gemma 3, Qwen2.5-VL) also gives its
    vision projector, mmproj-NAME.gguf beside the model: F32 with --outtype f32,
    F16 otherwise.
    """
    split = parse_size(split_max_size) if split_max_size else None
    # everything is checked (config, tensors, tokenizer) before the first byte is written
    p = plan(model_dir, outtype=outtype, split_max_size=split, vocab_only=vocab_only, text_only=text_only)
    _print_plan(p, outfile)
    if dry_run:
        for dests in p.destinations(outfile):
            console.print(f"would write {dests[0]}")
        return
    with progress_bar() as bar:
        paths = write(p, outfile, progress=bar)
    for path in paths:
        console.print(f"wrote {path}")


def _print_plan(p: ConversionPlan, outfile: Path | None) -> None:
    main = p.main
    w = main.writer
    line = f"{main.model.hf_arch} -> {w.arch}"
    if not p.vocab_only:
        line += f", {p.metadata.size_label} parameters in {len(main.tensors)} tensors"
    tokens = w.value("tokenizer.ggml.tokens")
    if tokens:
        line += f"; tokenizer {w.value('tokenizer.ggml.model')} ({w.value('tokenizer.ggml.pre')}), {len(tokens)} tokens"
    console.print(line, markup=False, soft_wrap=True)
    for out, dests in zip(p.outputs, p.destinations(outfile), strict=True):
        shards = f" and {len(dests) - 1} more shards" if len(dests) > 1 else ""
        if p.vocab_only:
            what = "vocabulary only"
        elif out.quantize_to:
            what = f"{out.quantize_to}, quantized by llama.cpp from {format_size(out.nbytes)} of F16"
        else:
            what = f"{out.type_label}, {format_size(out.nbytes)} of tensor data"
        console.print(f"  {dests[0]}{shards}: {what}", markup=False, soft_wrap=True)


@app.command("convert-lora")
def convert_lora_cmd(
    adapter_dir: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors).", show_default=False),
    base: Path = typer.Option(..., "--base", help="The base model: its Hugging Face folder or its GGUF file.", show_default=False),
    outfile: Path = typer.Option(None, "--outfile", "-o", help="Output file (default: beside ADAPTER_DIR, Name-F16-LoRA.gguf)."),
    outtype: str = typer.Option("f16", "--outtype", help="f16 or f32."),
) -> None:
    """Convert a PEFT LoRA adapter to a GGUF adapter for llama.cpp."""
    path = convert_lora(adapter_dir, base, outfile, outtype=outtype)  # adapters are small: no progress bar
    console.print(f"wrote {path}")
