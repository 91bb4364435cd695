"""Hugging Face checkpoint -> GGUF in two steps.

:func:`plan` reads the config, every tensor header and the tokenizer once and
decides everything: the converter, each tensor's GGML type, the metadata, the
shards and the file names. Nothing is written, so it is also the dry run.
:func:`write` then streams the tensor data into the files.

A plan holds one :class:`Output` per GGUF file (or set of shards): the
language model first, then any companion the architecture makes from the same
checkpoint (a vision projector, written beside the model as
``mmproj-<name>.gguf``). An ``--outtype`` that is a llama.cpp quantization
type (q4_k_m, ...) plans the model at f16; :func:`write` writes that to a
temporary file beside the destination, which llama.cpp then quantizes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import yaml  # type: ignore[import-untyped]

from ember.convert.architectures import make_model
from ember.convert.base import OUTTYPE_QTYPE, Model, Planned
from ember.convert.cast import tensor_nbytes
from ember.convert.source import BF16, Checkpoint
from ember.convert.writer import Writer, add_tensor_infos, write_gguf
from ember.errors import ConversionError, InvalidFileError
from ember.progress import ProgressCallback
from ember.quantize import parse_quant_type

# The package, not the API function ember.quantize(); its parts that load
# llama.cpp are imported on first use (the server process never loads it).
_quantize = importlib.import_module("ember.quantize")

_FTYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass
class Output:
    """One GGUF file (or set of shards) of a plan: its converter, its tensors
    (types chosen) and a writer holding its metadata and tensor table."""

    model: Model
    tensors: list[Planned]
    outtype: str  # the type written: f32, f16, bf16 or q8_0
    writer: Writer
    quantize_to: str | None = None  # llama.cpp type the written f16 file becomes

    @property
    def type_label(self) -> str:
        """The type as file names spell it: F16, BF16, Q8_0, Q4_K_M, ..."""
        return self.quantize_to or _FTYPE[self.outtype].name.partition("_")[2]

    @property
    def nbytes(self) -> int:
        """Tensor data written directly (before any quantization)."""
        return sum(tensor_nbytes(p.shape, p.out_qtype) for p in self.tensors)


@dataclass
class ConversionPlan:
    """Everything a conversion will write, decided before writing; written once."""

    model_dir: Path
    outputs: list[Output]
    metadata: gguf.Metadata
    vocab_only: bool = False
    written: bool = False

    @property
    def main(self) -> Output:
        """The language model's output (companions follow it in ``outputs``)."""
        return self.outputs[0]

    def destinations(self, outfile: str | os.PathLike[str] | None = None) -> list[list[Path]]:
        """The files of each output (its shards in order) for ``outfile``: a
        file name (``{ftype}`` in it becomes the type), a folder, or None
        (beside the model folder); names default to Name-Size-TYPE.gguf."""
        paths = []
        for i, out in enumerate(self.outputs):
            dest = self._destination(outfile, None if self.vocab_only else out.type_label)
            if i:
                dest = dest.with_name(f"{out.model.gguf_type}-{dest.name}")
            paths.append(out.writer.format_shard_names(dest))
        return paths

    def _destination(self, outfile: str | os.PathLike[str] | None, label: str | None) -> Path:
        if outfile is None or Path(outfile).is_dir():
            md = self.metadata
            if label is None:
                name = gguf.naming_convention(md.name, md.basename, md.finetune, md.version, None, None, model_type="vocab")
            else:
                name = gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, label)
            return (self.model_dir.parent if outfile is None else Path(outfile)) / f"{name}.gguf"
        dest = Path(outfile)
        if "{ftype}" in dest.name or "{FTYPE}" in dest.name:
            try:
                return dest.parent / gguf.fill_templated_filename(dest.name, label or "vocab")
            except (KeyError, IndexError, ValueError):
                raise ConversionError(f"{dest}: the only placeholders an output name may hold are {{ftype}} and {{FTYPE}}") from None
        return dest


def plan(
    model_dir: str | os.PathLike[str],
    *,
    outtype: str = "auto",
    split_max_size: int | None = None,
    vocab_only: bool = False,
    text_only: bool = False,
) -> ConversionPlan:
    """Plan the conversion of a Hugging Face model folder, checking the config,
    every tensor header and the tokenizer; raises before anything is written.

    ``outtype`` is f32, f16, bf16, q8_0, auto (the checkpoint's 16-bit type)
    or any llama.cpp quantization type (q4_k_m, ...); a companion may choose
    another (:meth:`Model.output_type`: projectors are f16 or f32).
    ``split_max_size`` (bytes) splits the model into ``-0000N-of-0000M.gguf``
    shards (companions stay whole: libmtmd loads one file). ``text_only``
    leaves companions out (a vision-language model's language model alone)."""
    model_dir = Path(model_dir)
    ot = outtype.lower()
    quantize_to = None
    if ot not in OUTTYPE_QTYPE and ot != "auto":
        if vocab_only:
            raise ConversionError(f"--vocab-only writes no weights, so --outtype {ot} makes no sense; use --outtype f16")
        if split_max_size:
            raise ConversionError(f"--split-max-size with --outtype {ot}: quantize first, then split with `ember split`")
        quantize_to = parse_quant_type(ot)  # unknown names fail here, before any work
        ot = "f16"

    model = make_model(model_dir)
    models = [model]
    tensors: list[list[Planned]] = [[]]
    if not vocab_only:
        checkpoint = Checkpoint(model_dir)
        if not text_only:
            models += model.companions()
        tensors = [m.plan_tensors(checkpoint) for m in models]
    if ot == "auto":
        ot = _auto_outtype(tensors[0])

    outputs = []
    for i, (m, ts) in enumerate(zip(models, tensors, strict=True)):
        m_ot = m.output_type(ot)
        for p in ts:
            p.out_qtype = m.tensor_type(p, m_ot)
        w = Writer(None, gguf.MODEL_ARCH_NAMES[m.gguf_arch], split_max_size=0 if i else split_max_size or 0)
        add_tensor_infos(w, ts)
        outputs.append(Output(m, ts, m_ot, w))
    outputs[0].quantize_to = quantize_to

    md = card_metadata(model_dir, *outputs[0].writer.get_total_parameter_count())
    for out in outputs:
        w = out.writer
        w.add_type(out.model.gguf_type)
        md.set_gguf_meta_model(w)
        out.model.set_parameters(w)
        if not vocab_only:
            w.add_file_type(_FTYPE[out.outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        out.model.set_vocab(w)
    return ConversionPlan(model_dir, outputs, md, vocab_only)


def write(plan: ConversionPlan, outfile: str | os.PathLike[str] | None = None, *, progress: ProgressCallback | None = None) -> list[Path]:
    """Write a plan's files; returns the first file of each output, the model's first.
    Every file appears under its name only when complete."""
    if plan.written:
        raise ValueError("this ConversionPlan was written already; make a new one with plan()")
    plan.written = True
    first = []
    for out, dests in zip(plan.outputs, plan.destinations(outfile), strict=True):
        if out.quantize_to is None:
            write_gguf(out.writer, out.tensors, dests, progress, f"Writing {dests[0].name}")
            first.append(dests[0])
        else:
            first.append(_write_quantized(out, out.quantize_to, dests[0], progress))
    return first


def _write_quantized(out: Output, qtype: str, dest: Path, progress: ProgressCallback | None) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the f16 intermediate lives beside the output (same filesystem) and never survives
    tmp = dest.parent / f".{dest.name}.f16-{os.getpid()}.tmp.gguf"
    try:
        write_gguf(out.writer, out.tensors, [tmp], progress, "Converting to F16")
        files = _quantize.quantize_model(tmp, dest, qtype, progress=progress)
        return Path(files[0]) if files else dest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def convert_model(
    model_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str] | None = None,
    *,
    outtype: str = "auto",
    split_max_size: int | None = None,
    dry_run: bool = False,
    vocab_only: bool = False,
    text_only: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a Hugging Face model folder to GGUF in one call (:func:`plan`
    then :func:`write`) and return the model's (first) file; companions (a
    vision projector) are written beside it. ``dry_run`` plans, which checks
    everything, and writes nothing."""
    p = plan(model_dir, outtype=outtype, split_max_size=split_max_size, vocab_only=vocab_only, text_only=text_only)
    if dry_run:
        return p.destinations(outfile)[0][0]
    return write(p, outfile, progress=progress)[0]


def card_metadata(model_dir: Path, total_params: int = 0, shared: int = 0, expert: int = 0, n_expert: int = 0) -> gguf.Metadata:
    """general.* metadata from the model card (README.md front matter) and the
    folder name, with the size label from the parameter counts."""
    try:
        md = gguf.Metadata.load(None, model_dir, None, total_params)
    except yaml.YAMLError as e:
        raise InvalidFileError(f"{model_dir / 'README.md'}: model card front matter is not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    if md.name is None:
        md.name = model_dir.resolve().name
    if md.size_label is None and total_params > 0:
        md.size_label = gguf.size_label(total_params, shared, expert, n_expert)
    return md


def _auto_outtype(tensors: list[Planned]) -> str:
    """bf16 for a bf16 checkpoint (lossless), f16 otherwise."""
    first_matrix = next((p for p in tensors if len(p.shape) >= 2), None)
    return "bf16" if first_matrix is not None and first_matrix.src_dtype == BF16 else "f16"
