"""The typer application every command module registers on, and the one
place where the CLI defers imports: :data:`COMMANDS` names each command's
module and help line, so ``ember --help`` lists every command without importing
any, and a command's module (with llama.cpp, numpy, the server, ...) is
imported only when that command runs."""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

# name -> (the module that registers it on ``app``, the first sentence of its help).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ember.cli.run", "Run a model: answer PROMPT, or chat interactively."),
    "serve": ("ember.cli.serve", "Run the Ollama- and OpenAI-compatible HTTP server."),
    "ps": ("ember.cli.client", "List the models the running server has loaded."),
    "stop": ("ember.cli.client", "Unload a model from the running server (after its current requests)."),
    "worker": ("ember.cli.worker", "Lend this machine's CPU or GPUs to Ember on another machine (ember run/serve --rpc)."),
    "create": ("ember.cli.models", "Create a model from a Modelfile (FROM a GGUF file or shard, a Hugging Face folder "
                                   "or another model; a second FROM may name a vision projector GGUF)."),
    "list": ("ember.cli.listing", "List the models in the registry (the demo model is there until 'ember rm demo')."),
    "show": ("ember.cli.models", "Show a model's details, or one part of it."),
    "cp": ("ember.cli.models", "Copy a model to a new name (no data is duplicated)."),
    "rm": ("ember.cli.models", "Remove models (and the files no other model uses)."),
    "pull": ("ember.cli.models", "Download a model: from Ollama's registry (EMBER_REGISTRY for a mirror), Hugging Face "
                                 "or ModelScope."),
    "inspect": ("ember.cli.files", "Show what a GGUF model is: architecture, size, quantization, tokenizer, template, "
                                   "shards."),
    "validate": ("ember.cli.files", "Check a GGUF model's structure (header, keys, tensor table, data bounds, shards)."),
    "split": ("ember.cli.files", "Split a GGUF model into llama.cpp-compatible shards (PREFIX-00001-of-00003.gguf)."),
    "merge": ("ember.cli.files", "Merge the shards of a split GGUF model into one file."),
    "convert": ("ember.cli.convert", "Convert a Hugging Face model to GGUF (llama.cpp's format)."),
    "convert-lora": ("ember.cli.convert", "Convert a PEFT LoRA adapter to a GGUF adapter for llama.cpp."),
    "quantize": ("ember.cli.quantize", "Quantize a GGUF model with llama.cpp (every type llama-quantize knows)."),
    "imatrix": ("ember.cli.quantize", "Compute an importance matrix from sample text (for --imatrix; needed by "
                                      "IQ1/IQ2/IQ3_XXS types)."),
    "merge-lora": ("ember.cli.quantize", "Write a new GGUF with a LoRA adapter merged into the weights."),
    "eval": ("ember.cli.quantize", "Measure model quality: perplexity and KL divergence (as llama-perplexity does)."),
}


class _Deferred(TyperCommand):
    """A command as ``--help`` lists it; parsing its arguments (running it, or
    its own ``--help``) hands over to the real command."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return load_command(self.name or "").make_context(info_name, args, parent=parent, **extra)


class _Commands(TyperGroup):
    """The ``ember`` group: every command of :data:`COMMANDS`, deferred unless
    its module is already imported."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        loaded = dict(self.commands)
        deferred = {name: _Deferred(name, help=line) for name, (_, line) in COMMANDS.items()}
        self.commands = {**deferred, **loaded}  # a command missing from the table still runs (tests catch it)


app = typer.Typer(
    name="ember",
    cls=_Commands,
    help="Run large language models locally: convert, quantize, register, chat and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def load_command(name: str) -> Any:
    """The real click command ``name`` (a group for ``eval``), its module imported."""
    importlib.import_module(COMMANDS[name][0])
    return typer.main.get_group(app).commands[name]
