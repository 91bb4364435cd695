"""`ember convert` (Hugging Face folder -> GGUF) and `ember convert-lora`
(PEFT adapter -> GGUF adapter): thin wrappers over ember.convert."""

from __future__ import annotations

from pathlib import Path

import typer

from ember.cli.app import app
from ember.cli.common import console, parse_size, progress_bar


@app.command("convert")
def convert_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face model folder (config.json, safetensors or pytorch_model*.bin, tokenizer).", show_default=False),
    outfile: Path = typer.Option(None, "--outfile", "-o", help="Output file or folder (default: beside MODEL_DIR, named Name-Size-TYPE.gguf). {ftype} in the name is replaced by the type."),
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0, auto (the checkpoint's 16-bit type) or any quantization type (q4_k_m, q6_k, ...)."),
    split_max_size: str = typer.Option(None, "--split-max-size", help="Split the output into shards of at most this size, e.g. 2G."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the checkpoint and print the output path without writing."),
    vocab_only: bool = typer.Option(False, "--vocab-only", help="Write only the tokenizer and metadata."),
    text_only: bool = typer.Option(False, "--text-only", help="For a vision-language model: write only the language model, not its vision projector."),
) -> None:
    """Convert a Hugging Face model to GGUF (llama.cpp's format).

    A vision-language checkpoint (InternVL, Gemma 3, Qwen2.5-VL) also gives its
    vision projector, mmproj-NAME-F16.gguf beside the model (F32 with --outtype f32).
    """
    from ember.convert import convert_model
    from ember.convert.vision import convert_projector, make_projector, projector_outtype

    split = parse_size(split_max_size) if split_max_size else None
    # a dry run first: checkpoint, config and tokenizer errors show before any progress bar
    path = convert_model(model_dir, outfile, outtype=outtype, split_max_size=split, dry_run=True, vocab_only=vocab_only)
    vision = not (text_only or vocab_only) and make_projector(model_dir) is not None
    proj_type = projector_outtype(outtype)
    proj = convert_projector(model_dir, path.parent, outtype=proj_type, dry_run=True) if vision else None
    if dry_run:
        for p in (path, proj):
            if p is not None:
                console.print(f"would write {p}")
        return
    with progress_bar() as bar:
        path = convert_model(model_dir, outfile, outtype=outtype, split_max_size=split, vocab_only=vocab_only, progress=bar)
        if proj is not None:
            proj = convert_projector(model_dir, proj, outtype=proj_type, progress=bar)
    console.print(f"wrote {path}")
    if proj is not None:
        console.print(f"wrote {proj}")


@app.command("convert-lora")
def convert_lora_cmd(
    adapter_dir: Path = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors).", show_default=False),
    base: Path = typer.Option(..., "--base", help="The base model: its Hugging Face folder or its GGUF file.", show_default=False),
    outfile: Path = typer.Option(None, "--outfile", "-o", help="Output file (default: beside ADAPTER_DIR, Name-F16-LoRA.gguf)."),
    outtype: str = typer.Option("f16", "--outtype", help="f16 or f32."),
) -> None:
    """Convert a PEFT LoRA adapter to a GGUF adapter for llama.cpp."""
    from ember.convert import convert_lora

    path = convert_lora(adapter_dir, base, outfile, outtype=outtype)  # adapters are small: no progress bar
    console.print(f"wrote {path}")
