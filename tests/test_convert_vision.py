"""`ember convert` on vision-language checkpoints: the language model GGUF and
the vision projector GGUF (llama.cpp's clip format, the model's companion
output) side by side from one plan, the layouts users download, clear errors
for checkpoints that do not fit, and `ember create` registering both. (That
the files reproduce transformers is tests/test_vision.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from cli_fixtures import run_ember
from vision_fixtures import build_gemma3, build_internvl, build_qwen25vl  # noqa: E402

from ember.convert import convert_model, plan, write  # noqa: E402
from ember.errors import ConversionError  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_qwen25vl(tmp_path_factory.mktemp("q") / "Qwen2.5-VL-tiny")


def fields(path: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def convert(d: Path, out: Path | None = None, outtype: str = "auto") -> tuple[Path, Path]:
    """(language model, projector) written by one plan."""
    model, proj = write(plan(d, outtype=outtype), out)
    return model, proj


def test_cli_writes_the_model_and_its_projector(qwen: Any, tmp_path: Path) -> None:
    d = copy_checkpoint(qwen.path, tmp_path / "Qwen2.5-VL-tiny")
    r = run_ember("convert", str(d))
    assert r.returncode == 0, r.stderr
    model, proj = sorted(tmp_path.glob("*.gguf"), key=lambda p: p.name.startswith("mmproj"))
    assert model.name.startswith("Qwen2.5-VL-Tiny-") and model.name.endswith("-F16.gguf"), model.name
    assert proj.name == "mmproj-" + model.name
    assert str(model) in r.stdout.replace("\n", "") and str(proj) in r.stdout.replace("\n", "")
    meta = fields(proj)
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.projector_type"] == "qwen2.5vl_merger" and meta["clip.has_vision_encoder"] is True
    assert meta["clip.vision.projection_dim"] == 64 and meta["clip.vision.n_wa_pattern"] == 2
    assert meta["clip.vision.image_min_pixels"] == 4 * 28 * 28  # the processor's limits, for the engine
    t = tensors(proj)
    assert t["v.blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["v.blk.0.ln1.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert fields(model)["general.architecture"] == "qwen2vl"
    assert list(fields(model)["qwen2vl.rope.dimension_sections"]) == [2, 3, 3, 0]
    assert not any(n.startswith(("v.", "mm.")) for n in tensors(model))


def test_cli_text_only_and_outtypes(qwen: Any, tmp_path: Path) -> None:
    d = copy_checkpoint(qwen.path, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    r = run_ember("convert", str(d), "--text-only", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert [p.name.startswith("mmproj") for p in out.iterdir()] == [False]
    r = run_ember("convert", str(d), "--outtype", "f32", "-o", str(out / "model.gguf"))
    assert r.returncode == 0, r.stderr
    proj = out / "mmproj-model.gguf"
    assert fields(proj)["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors(proj).values())
    # every other outtype gives an F16 projector (quantized ones too), never split
    for ot in ("bf16", "q8_0", "q4_k_m"):
        p = plan(d, outtype=ot, split_max_size=None if ot == "q4_k_m" else 100_000)
        companion = p.outputs[1]
        assert (companion.outtype, companion.type_label, companion.model.gguf_type) == ("f16", "F16", "mmproj")
        assert companion.writer.value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
        model_files, proj_files = p.destinations(out)
        assert len(proj_files) == 1 and (ot == "q4_k_m" or len(model_files) > 1), (ot, model_files)
        assert proj_files[0].name.startswith("mmproj-Ckpt-") and proj_files[0].name.endswith("-F16.gguf"), proj_files[0].name


def test_text_model_has_no_projector(qwen: Any, tmp_path: Path) -> None:
    import transformers
    from convert_fixtures import pad_vocab

    d = tmp_path / "text"
    cfg = transformers.Qwen2Config(vocab_size=pad_vocab(qwen.n_vocab_real), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg.architectures = ["Qwen2ForCausalLM"]
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    for f in qwen.path.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    assert len(plan(d).outputs) == 1
    r = run_ember("convert", str(d))
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob("mmproj-*"))


def test_gemma3_as_transformers_saves_it(tmp_path: Path) -> None:
    """transformers 5 writes the SigLIP tower as ``vision_tower.*`` with a pooling
    head Gemma 3 never uses; the hub has ``vision_tower.vision_model.*`` and no
    head. Both give the same projector."""
    fx = build_gemma3(tmp_path / "hub")
    saved = tmp_path / "saved"
    fx.model.save_pretrained(saved)
    for f in fx.path.iterdir():
        if not (saved / f.name).exists():
            shutil.copy(f, saved / f.name)
    _, a = convert(fx.path, tmp_path / "a.gguf", "f32")
    _, b = convert(saved, tmp_path / "b.gguf", "f32")
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb) and not any("head" in n for n in ta)
    for n in ta:
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n
    assert fields(a)["clip.vision.projector.scale_factor"] == 2  # 4x4 patches pooled to mm_tokens_per_image=4


def test_internvl_original_layout_keys(tmp_path: Path) -> None:
    fx = build_internvl(tmp_path / "InternVL2_5-tiny", layout="original")
    lm, proj = convert(fx.path)  # the default names, beside the checkpoint folder
    assert lm.parent == proj.parent == tmp_path and lm.name.startswith("InternVL2_5-Tiny-") and proj.name == "mmproj-" + lm.name
    assert fields(proj)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    meta = fields(proj)
    assert meta["clip.projector_type"] == "internvl"
    assert (meta["clip.vision.preproc_min_tiles"], meta["clip.vision.preproc_max_tiles"]) == (1, 6)
    assert list(meta["clip.vision.image_mean"]) == pytest.approx([0.485, 0.456, 0.406])  # no preprocessor config: ImageNet's
    assert fields(lm)["general.architecture"] == "qwen2"


def _rewrite(path: Path, edit: Any) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def test_checkpoints_that_do_not_fit_are_clear_errors(qwen: Any, tmp_path: Path) -> None:
    import torch

    def case(name: str, edit_weights: Any = None, edit_config: Any = None) -> Path:
        d = copy_checkpoint(qwen.path, tmp_path / name)
        if edit_weights:
            _rewrite(d, edit_weights)
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    out = tmp_path / "x.gguf"
    d = case("missing", lambda sd: sd.pop("visual.blocks.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match="no 'v.blk.1.ffn_up.weight'"):
        convert_model(d, out)
    r = run_ember("convert", str(d), "-o", str(out))
    assert r.returncode == 1 and "no 'v.blk.1.ffn_up.weight'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "text").mkdir()
    assert convert_model(d, tmp_path / "text", text_only=True).is_file()  # the language model alone still converts
    d = case("extra", lambda sd: sd.__setitem__("visual.blocks.0.attn.rope_scale", torch.ones(3)))
    with pytest.raises(ConversionError, match="'v.blocks.0.attn.rope_scale' is not known"):
        convert_model(d, out)
    d = case("layers", edit_config=lambda c: c["vision_config"].__setitem__("depth", 2))
    with pytest.raises(ConversionError, match="vision_config has 2 layers but the checkpoint has vision layer"):
        convert_model(d, out)
    d = case("window", edit_config=lambda c: c["vision_config"].__setitem__("window_size", 64))
    with pytest.raises(ConversionError, match="window_size 64 is not supported"):
        convert_model(d, out)
    d = case("shape", lambda sd: sd.__setitem__("visual.merger.mlp.2.weight", torch.ones(64, 100)))
    with pytest.raises(ConversionError, match=r"do not fit their config: tensor 'mm.2.weight' has shape \[100, 64\], expected \[128, 64\]"):
        convert_model(d, out, dry_run=True)  # found while planning: a dry run tells
    d = case("novision", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("visual.")])
    with pytest.raises(ConversionError, match="has no vision weights; convert with --text-only"):
        convert_model(d, out)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))  # nothing half-written


def test_create_registers_model_and_projector(qwen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ember create` FROM a vision checkpoint folder: the projector the
    converter writes beside the model becomes the model's projector layer."""
    from ember.registry.create import create_model
    from ember.registry.show import show_model

    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    r = create_model("tiny-vl", f"FROM {qwen.path}\n")
    assert len(r.projector_paths) == 1 and fields(r.projector_paths[0])["clip.projector_type"] == "qwen2.5vl_merger"
    assert fields(r.model_paths[0])["general.architecture"] == "qwen2vl"
    assert "vision" in show_model("tiny-vl").capabilities
