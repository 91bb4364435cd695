"""`ember create` with the converter and the quantizer: FROM a Hugging Face folder,
`-q` on a model name and on a split GGUF (stored as blobs without shard names)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from convert_fixtures import LLAMA3_RE, SPECIALS_LLAMA3, make_bpe_tokenizer, pad_vocab  # noqa: E402
from registry_fixtures import snapshot

from ember.registry import ggufmeta, store
from ember.registry.core import resolve
from ember.registry.create import create_model
from ember.registry.show import show_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_bpe_tokenizer(d, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_create_from_hf_folder_then_quantize(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    monkeypatch.setenv("EMBER_MODELS", str(root))
    (tmp_path / "Modelfile").write_text(f"FROM {hf_dir}\nSYSTEM tiny\nPARAMETER num_ctx 64\n")
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "create", "tiny", "-f", str(tmp_path / "Modelfile")],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert r.returncode == 0, r.stderr
    base = resolve("tiny")
    info = ggufmeta.read_info(base.model_paths[0])
    assert info.architecture == "llama" and info.file_type in ("F16", "BF16", "F32")
    assert not any((root / "tmp").iterdir())  # the conversion's work folder is gone

    q = create_model("tiny:q8", "FROM tiny\n", quantize="q8_0")
    qi = ggufmeta.read_info(q.model_paths[0])
    assert qi.file_type == "Q8_0" and qi.n_params == info.n_params
    assert q.system == "tiny" and q.parameters == {"num_ctx": 64}
    assert show_model("tiny:q8").details["quantization_level"] == "Q8_0"

    # -q straight from the folder (convert + quantize in one go)
    direct = create_model("tiny:direct", f"FROM {hf_dir}\n", quantize="Q8_0")
    assert ggufmeta.read_info(direct.model_paths[0]).file_type == "Q8_0"


def test_quantize_split_model_from_blobs(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.convert import convert_model
    from ember.gguf import split_model

    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    f16 = convert_model(hf_dir, tmp_path / "tiny-f16.gguf", outtype="f16")
    shards = split_model(f16, tmp_path / "tiny-f16", max_tensors=10)
    assert len(shards) >= 2
    split = create_model("split", f"FROM {shards[-1]}\n")
    assert len(split.model_paths) == len(shards)
    q = create_model("split:q8", "FROM split\n", quantize="Q8_0")
    assert len(q.model_paths) == 1
    qi = ggufmeta.read_info(q.model_paths[0])
    assert qi.file_type == "Q8_0" and qi.n_params == sum(ggufmeta.read_info(p).n_params for p in split.model_paths)


def test_bad_quant_type_leaves_registry_unchanged(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    create_model("keep", f"FROM {hf_dir}\n")
    before = snapshot(tmp_path / "models")
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "create", "x", "--from", "keep", "-q", "Q9_Z"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Q9_Z" in r.stderr
    assert snapshot(tmp_path / "models") == before
    assert store.find_manifest_path(store.ModelName("registry.ollama.ai", "library", "x", "latest")) is None


def test_adapter_folder_is_converted_against_the_base(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    (tmp_path / "Modelfile").write_text(f"FROM {hf_dir}\nADAPTER ./lora\n")
    r = create_model("tuned", tmp_path / "Modelfile")
    assert len(r.adapter_paths) == 1
    info = ggufmeta.read_info(r.adapter_paths[0])
    assert info.is_adapter and info.architecture == "llama" and info.n_tensors == 2 * 2 * 2  # 2 layers x q,v x A,B
    # the same adapter over the stored GGUF (FROM a model name) gives the same adapter file
    monkeypatch.chdir(tmp_path)
    again = create_model("tuned2", "FROM tuned\nADAPTER lora\n")
    assert store.hash_file(again.adapter_paths[0])[0] == store.hash_file(r.adapter_paths[0])[0]
