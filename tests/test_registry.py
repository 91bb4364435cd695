"""Registry: names, create/list/show/cp/rm through the real CLI and the library,
layer sharing, pruning, inheritance, bad input leaving the registry unchanged,
and concurrent creates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_fixtures import EMBER, run_ember
from registry_fixtures import snapshot, without_demo, write_tiny_gguf

from ember.errors import InvalidFileError, InvalidNameError, ModelfileError, ModelNotFoundError
from ember.registry import store
from ember.registry.core import copy_model, delete_model, resolve
from ember.registry.create import create_model
from ember.registry.listing import list_models
from ember.registry.modelfile import parse_modelfile
from ember.registry.names import parse_name
from ember.registry.show import show_model


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = without_demo(tmp_path / "models")  # the demo model's listing is tested in test_registry_demo.py
    monkeypatch.setenv("EMBER_MODELS", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def ember(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, cwd=cwd, check=check, timeout=120)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("text", "parts", "display"),
    [
        ("qwen2.5", ("registry.ollama.ai", "library", "qwen2.5", "latest"), "qwen2.5:latest"),
        ("qwen2.5:7b", ("registry.ollama.ai", "library", "qwen2.5", "7b"), "qwen2.5:7b"),
        ("Me/My_Model:v1.0", ("registry.ollama.ai", "Me", "My_Model", "v1.0"), "Me/My_Model:v1.0"),
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", ("hf.co", "bartowski", "Llama-3.2-1B-GGUF", "Q4_K_M"), "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"),
        ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
        ("https://registry.ollama.ai/library/x:1", ("registry.ollama.ai", "library", "x", "1"), "x:1"),
    ],
)
def test_parse_name(text: str, parts: tuple[str, ...], display: str) -> None:
    n = parse_name(text)
    assert n.parts() == parts
    assert n.display == display


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("../x", "'..' is not allowed"),
        ("a/../x", "'..' is not allowed"),
        ("x:", "empty tag"),
        ("", "invalid model name ''"),
        ("x" * 400, "too long"),
        ("m" * 81, "model too long (81 characters; at most 80)"),
        ("a/b/c/d", "at most host/namespace/model:tag"),
        ("bad name", "may contain only"),
        ("-x", "may contain only"),
        ("ns.with.dot/m", "namespace 'ns.with.dot'"),
        ("m:t/x", "may contain only"),
        ("/abs", "empty namespace"),
        (".hidden", "may contain only"),
    ],
)
def test_bad_names(text: str, why: str) -> None:
    with pytest.raises(InvalidNameError) as e:
        parse_name(text)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- create / list / show / cp / rm


def test_create_list_show_cp_rm_cli(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    (tmp_path / "Modelfile").write_text('FROM ./m.gguf\nPARAMETER stop "<|end|>"\nPARAMETER stop User:\nSYSTEM "Be brief."\nLICENSE MIT\n')
    r = ember("create", "My-Model:v1")
    assert "created 'My-Model:v1'" in r.stdout
    out = ember("list").stdout.splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert out[1].startswith("My-Model:v1 ")
    digest = resolve("my-model:V1").digest
    assert digest and out[1].split()[1] == digest[7:19]
    manifest = models / "manifests/registry.ollama.ai/library/My-Model/v1"
    doc = json.loads(manifest.read_bytes())
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [x["mediaType"].rsplit(".", 1)[-1] for x in doc["layers"]] == ["model", "system", "params", "license"]
    for x in [doc["config"], *doc["layers"]]:
        assert store.verify_blob(x["digest"]) and store.blob_path(x["digest"]).stat().st_size == x["size"]
    cfg = json.loads(store.blob_path(doc["config"]["digest"]).read_bytes())
    assert cfg["model_format"] == "gguf" and cfg["model_family"] == "llama" and cfg["file_type"] == "F32"
    assert json.loads(store.blob_path(doc["layers"][2]["digest"]).read_bytes()) == {"stop": ["<|end|>", "User:"]}

    assert ember("show", "my-model:v1", "--system").stdout == "Be brief.\n"
    assert ember("show", "my-model:v1", "--license").stdout == "MIT\n"
    assert ember("show", "my-model:v1", "--parameters").stdout.splitlines() == [  # Ollama's %-30s %#v
        "stop                           \"<|end|>\"", "stop                           \"User:\""]
    shown = ember("show", "my-model:v1").stdout
    assert "architecture" in shown and "llama" in shown and "F32" in shown
    assert "llama.context_length" in ember("show", "my-model:v1", "-v").stdout

    assert ember("cp", "my-model:v1", "other/copy").returncode == 0
    assert {m.name for m in list_models()} == {"My-Model:v1", "other/copy:latest"}
    n_blobs = len(list((models / "blobs").iterdir()))
    assert "deleted 'My-Model:v1'" in ember("rm", "My-Model:v1").stdout
    assert len(list((models / "blobs").iterdir())) == n_blobs  # still used by the copy
    ember("rm", "other/copy")
    assert list((models / "blobs").iterdir()) == []
    assert list_models() == []
    r = ember("rm", "other/copy", check=False)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: model 'other/copy' not found")


def test_identical_layers_stored_once_and_prune_keeps_shared(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=2)
    a = create_model("a", "FROM m.gguf\nSYSTEM one\n")
    b = create_model("b", "FROM m.gguf\nSYSTEM two\n")
    assert a.model_paths == b.model_paths
    model_blobs = [p for p in (models / "blobs").iterdir() if p.stat().st_size > 1000]
    assert len(model_blobs) == 1
    delete_model("a")
    assert resolve("b").model_paths[0].is_file()
    assert resolve("b").system == "two"
    # re-creating a name replaces it and prunes what only the old version used
    create_model("b", "FROM m.gguf\nSYSTEM three\n")
    texts = sorted(p.read_bytes() for p in (models / "blobs").iterdir() if p.stat().st_size < 100)
    assert b"two" not in texts and b"three" in texts


def test_rm_never_prunes_a_fresh_upload(models: Path, tmp_path: Path) -> None:
    """A blob stored for a create still to come (an API upload) survives another
    model's rm; stale leftovers go once they are old."""
    write_tiny_gguf(tmp_path / "m.gguf", seed=16)
    create_model("gone", "FROM m.gguf\n")
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"uploaded layer")
    digest, _ = store.add_file(upload)
    leftover = models / "blobs" / (store.TMP_PREFIX + "killed.tmp")
    leftover.write_bytes(b"partial")
    delete_model("gone")
    assert store.has_blob(digest) and leftover.exists()
    assert [p.name for p in (models / "blobs").iterdir() if p.stat().st_size > 1000] == []  # the model's own layers went
    store.prune(min_age=0)
    assert not store.has_blob(digest) and not leftover.exists()


def test_from_existing_model_inherits_and_overrides(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=3)
    create_model("base", 'FROM m.gguf\nTEMPLATE "{{ .Prompt }}"\nSYSTEM sys\nPARAMETER temperature 0.3\nPARAMETER top_k 5\nMESSAGE user hi\nLICENSE L\n')
    child = create_model("child", "FROM Base\nPARAMETER temperature 0.9\nSYSTEM other\n")
    base = resolve("base")
    assert child.model_paths == base.model_paths
    assert child.template == "{{ .Prompt }}" and child.system == "other"
    assert child.parameters == {"temperature": 0.9, "top_k": 5}
    assert child.messages == [{"role": "user", "content": "hi"}] and child.license == ["L"]
    # deleting the base keeps the child whole
    delete_model("base")
    assert resolve("child").model_paths[0].is_file()


def test_case_insensitive_names_one_manifest(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=4)
    create_model("Mixed/Case:Tag", "FROM m.gguf\n")
    assert resolve("mixed/case:tag").name == "Mixed/Case:Tag"
    create_model("MIXED/case:TAG", "FROM m.gguf\nSYSTEM new\n")
    assert [m.name for m in list_models()] == ["MIXED/case:TAG"]
    assert resolve("mixed/CASE:tag").system == "new"


def test_show_modelfile_round_trips_split_model(models: Path, tmp_path: Path) -> None:
    shards = write_tiny_gguf(tmp_path / "s.gguf", n_tensors=6, split_max_tensors=3, seed=5)
    assert len(shards) == 2
    mf = 'FROM ./s-00002-of-00002.gguf\nTEMPLATE """{{ .System }}\n"x" {{ .Prompt }}"""\nPARAMETER stop a\nPARAMETER stop " b"\nMESSAGE assistant "q\\"uote"\n'
    r = create_model("split", mf)
    assert [p.stat().st_size for p in r.model_paths] == [s.stat().st_size for s in shards]
    assert [store.hash_file(p)[0] for p in r.model_paths] == [store.hash_file(s)[0] for s in shards]
    text = show_model("split").modelfile
    again = create_model("split2", text)
    assert again.digest == r.digest  # byte-identical manifest
    assert (again.template, again.parameters, again.messages) == (r.template, r.parameters, r.messages)


def test_resolve_paths_and_errors(models: Path, tmp_path: Path) -> None:
    shards = write_tiny_gguf(tmp_path / "d.gguf", n_tensors=4, split_max_tensors=2, seed=6)
    r = resolve(str(shards[1]))
    assert r.model_paths == [s.resolve() for s in shards] and r.digest is None and r.template is None
    with pytest.raises(ModelNotFoundError, match="ember list.*ember pull"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFoundError, match="ember list.*ember pull"):
        show_model("no-such-model")
    d = show_model(str(shards[0]))  # a file: shown from its own metadata
    assert d.details["family"] == "llama" and d.model_info["general.parameter_count"] == 4 * 8 * 16
    assert parse_modelfile(d.modelfile).from_ == [str(s.resolve()) for s in shards]
    with pytest.raises(ModelNotFoundError):
        resolve("../../etc/passwd-not-here")


def test_projector_and_adapter_layers(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=7)
    write_tiny_gguf(tmp_path / "mmproj.gguf", seed=8, arch="clip")
    write_tiny_gguf(tmp_path / "lora.gguf", seed=9, general_type="adapter")
    r = create_model("vl", "FROM m.gguf\nFROM mmproj.gguf\nADAPTER lora.gguf\n")
    assert len(r.model_paths) == 1 and len(r.projector_paths) == 1 and len(r.adapter_paths) == 1
    assert store.hash_file(r.projector_paths[0])[0] == store.hash_file(tmp_path / "mmproj.gguf")[0]
    with pytest.raises(ModelfileError, match="line 2: .*not a LoRA adapter"):
        create_model("bad", "FROM m.gguf\nADAPTER mmproj.gguf\n")
    with pytest.raises(ModelfileError, match="line 2: a second model file"):
        create_model("bad", "FROM m.gguf\nFROM lora.gguf\n".replace("lora", "m2"), ) if write_tiny_gguf(tmp_path / "m2.gguf", seed=10) else None


# ---------------------------------------------------------------- bad input


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str, str]]:
    write_tiny_gguf(tmp_path / "ok.gguf", seed=11)
    shards = write_tiny_gguf(tmp_path / "sp.gguf", n_tensors=4, split_max_tensors=2, seed=12)
    (tmp_path / "lonely-00001-of-00002.gguf").write_bytes(shards[0].read_bytes())
    (tmp_path / "trunc.gguf").write_bytes((tmp_path / "ok.gguf").read_bytes()[:-100])
    (tmp_path / "notgguf.gguf").write_text("hello")
    files = {
        "Modelfile.unknown": "FROM ok.gguf\n# comment\nPARAMETER temprature 0.5\n",
        "Modelfile.syntax": 'FROM ok.gguf\nSYSTEM """never closed\n',
        "Modelfile.missing": "FROM ./missing.gguf\n",
        "Modelfile.nomodel": "FROM no-such-model:7b\n",
        "Modelfile.role": "FROM ok.gguf\nMESSAGE tool hi\n",
        "Modelfile.trunc": "# truncated\nFROM trunc.gguf\n",
        "Modelfile.notgguf": "FROM notgguf.gguf\n",
        "Modelfile.shard": "FROM lonely-00001-of-00002.gguf\n",
        "Modelfile.oneshard": f"FROM {shards[0]}\nFROM {tmp_path / 'ok.gguf'}\n",
        "Modelfile.adapter": "FROM ok.gguf\nADAPTER nothere.gguf\n",
        "Modelfile.instr": "FROM ok.gguf\nSYSTM hi\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [
        (["create", "m", "-f", "Modelfile.unknown"], "Modelfile.unknown line 3: unknown parameter 'temprature'", ""),
        (["create", "m", "-f", "Modelfile.syntax"], 'Modelfile.syntax line 2: unterminated """', ""),
        (["create", "m", "-f", "Modelfile.missing"], "Modelfile.missing line 1: FROM file not found:", "missing.gguf"),
        (["create", "m", "-f", "Modelfile.nomodel"], "Modelfile.nomodel line 1: FROM 'no-such-model:7b' is neither a file nor a model", ""),
        (["create", "m", "-f", "Modelfile.role"], "Modelfile.role line 2: MESSAGE role must be", ""),
        (["create", "m", "-f", "Modelfile.trunc"], "Modelfile.trunc line 2: ", "trunc.gguf"),
        (["create", "m", "-f", "Modelfile.notgguf"], "Modelfile.notgguf line 1: ", "not a GGUF file"),
        (["create", "m", "-f", "Modelfile.shard"], "Modelfile.shard line 1: ", "shard 2 of 2 is missing"),
        (["create", "m", "-f", "Modelfile.oneshard"], "Modelfile.oneshard line 2: a second model file", "ok.gguf"),
        (["create", "m", "-f", "Modelfile.adapter"], "Modelfile.adapter line 2: ADAPTER file not found", ""),
        (["create", "m", "-f", "Modelfile.instr"], "Modelfile.instr line 2: unknown instruction 'SYSTM'", ""),
        (["create", "m", "-f", "NoSuchModelfile"], "Modelfile not found: NoSuchModelfile", ""),
        (["create", "../x", "--from", "ok.gguf"], "invalid model name '../x'", ""),
        (["create", "x:", "--from", "ok.gguf"], "invalid model name 'x:': empty tag", ""),
        (["create", "n" * 400, "--from", "ok.gguf"], "invalid model name", "too long (400 characters"),
        (["create", "m", "--from", "missing.gguf"], "--from line 1: FROM file not found", ""),
        (["cp", "keep", "../evil"], "invalid model name '../evil'", ""),
        (["cp", "nothere", "x"], "model 'nothere' not found", ""),
        (["show", "nothere"], "model 'nothere' not found", ""),
        (["rm", "../../x"], "invalid model name", ""),
    ]


def test_bad_input_one_line_errors_and_registry_unchanged(models: Path, tmp_path: Path) -> None:
    cases = _bad_cases(tmp_path)
    create_model("keep", "FROM ok.gguf\nSYSTEM s\n")
    before = snapshot(models)
    with ThreadPoolExecutor(4) as pool:  # independent failing commands: run a few at a time
        results = list(pool.map(lambda c: ember(*c[0], check=False), cases))
    for (args, start, contains), r in zip(cases, results, strict=True):
        err = r.stderr.strip()
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert len(err.splitlines()) == 1, (args, err)
        assert err.startswith("Error: " + start), (args, err)
        assert contains in err, (args, err)
    assert snapshot(models) == before
    assert resolve("keep").system == "s"


def test_template_that_does_not_parse_is_rejected(models: Path, tmp_path: Path) -> None:
    pytest.importorskip("ember.templates")
    from ember import templates

    if not hasattr(templates, "ChatTemplate"):
        pytest.skip("ember.templates.ChatTemplate not there yet")
    write_tiny_gguf(tmp_path / "ok.gguf", seed=13)
    create_model("keep", "FROM ok.gguf\n")
    before = snapshot(models)
    (tmp_path / "Modelfile").write_text('FROM ok.gguf\nSYSTEM hi\nTEMPLATE """{{ if .System }}\n{{ .System }}\n"""\n')
    r = ember("create", "m", check=False)
    assert r.returncode == 1
    # the template opens on line 3 and is cut off on line 5
    assert r.stderr.strip().startswith("Error: Modelfile line 5: TEMPLATE does not parse"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ModelfileError, match=r"^Modelfile line 5: TEMPLATE does not parse: .*endfor"):
        create_model("j", 'FROM ok.gguf\n\nTEMPLATE """\n{% for m in messages %}\n{{ m.content }}"""\n')
    assert snapshot(models) == before
    ok = create_model("j", 'FROM ok.gguf\nTEMPLATE """{% for m in messages %}{{ m.content }}{% endfor %}"""\n')
    assert ok.template == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_blob_verified_against_expected_digest(models: Path, tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"payload")
    with pytest.raises(InvalidFileError, match="does not match the expected"):
        store.add_file(f, expected="sha256:" + "0" * 64)
    assert not (models / "blobs").exists() or [p for p in (models / "blobs").iterdir()] == []
    with pytest.raises(InvalidFileError):
        store.blob_path("sha256:../../etc")


def test_damaged_registry_gives_clear_errors(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=14)
    r = create_model("m", "FROM m.gguf\n")
    r.model_paths[0].unlink()
    with pytest.raises(InvalidFileError, match="is damaged: blob .* is missing"):
        resolve("m")


# ---------------------------------------------------------------- concurrency


def test_concurrent_creates(models: Path, tmp_path: Path) -> None:
    """Different names never corrupt each other; the same name ends as one of
    the versions, whole; rm pruning while creates run never breaks them."""
    for i in range(4):
        write_tiny_gguf(tmp_path / f"c{i}.gguf", seed=20 + i, n_tensors=8, rows=256)
    create_model("victim", "FROM c0.gguf\n")
    script = (
        "import sys; from ember.registry.core import delete_model; from ember.registry.create import create_model\n"
        "name, src, system = sys.argv[1:4]\n"
        "for k in range(3):\n"
        "    create_model(name, f'FROM {src}\\nSYSTEM {system}-{k}\\n')\n"
    )
    jobs = [("same", "c1.gguf", "A"), ("same", "c2.gguf", "B"), ("other", "c3.gguf", "C"), ("third", "c0.gguf", "D")]
    procs = [subprocess.Popen([sys.executable, "-c", script, *j], cwd=tmp_path, env=os.environ.copy()) for j in jobs]
    rm = subprocess.Popen([sys.executable, "-c", "from ember.registry.core import delete_model; delete_model('victim')"],
                          cwd=tmp_path, env=os.environ.copy())
    assert all(p.wait(timeout=120) == 0 for p in procs) and rm.wait(timeout=120) == 0
    assert {m.name for m in list_models()} == {"same:latest", "other:latest", "third:latest"}
    same = resolve("same")
    assert same.system in ("A-2", "B-2")
    expected_src = tmp_path / ("c1.gguf" if same.system == "A-2" else "c2.gguf")
    assert store.hash_file(same.model_paths[0])[0] == store.hash_file(expected_src)[0]
    assert resolve("other").system == "C-2" and resolve("third").system == "D-2"
    for p in store.iter_manifests():
        m = store.read_manifest(p)
        for layer in [m.config, *m.layers]:
            assert store.verify_blob(layer.digest)
    store.prune(min_age=0)
    assert not [p for p in (models / "blobs").iterdir() if p.name.startswith(store.TMP_PREFIX)]
    referenced = store.referenced_digests()
    assert {p.name.replace("-", ":", 1) for p in (models / "blobs").iterdir()} == referenced


def test_modelfile_object_and_text_inputs(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=15)
    mf = parse_modelfile("FROM m.gguf\nSYSTEM obj\n", base_dir=tmp_path)
    assert create_model("obj", mf).system == "obj"
    (tmp_path / "Modelfile").write_text("FROM m.gguf\nSYSTEM default\n")
    assert create_model("dflt").system == "default"
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "Modelfile.x").write_text("FROM ../m.gguf\nSYSTEM path\n")
    assert create_model("bypath", sub / "Modelfile.x").system == "path"
    copy_model("bypath", "copied:1")
    assert resolve("copied:1").system == "path"


# ---------------------------------------------------------------- show data in Ollama's shapes


def test_show_json_arrays_tensors_parameters_and_capabilities(models: Path, tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "arrays.gguf"
    w = GGUFWriter(path, "llama")
    w.add_name("arrays")
    w.add_array("llama.short", [1, 2, 3])
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_float32("llama.nan_value", float("nan"))
    import numpy as np

    w.add_tensor("blk.0.w.weight", np.zeros((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tools = '{{ if .Tools }}{{ range .Tools }}{{ . }}{{ end }}{{ end }}{{ .Prompt }}{{ .Suffix }}'
    create_model("arr", f'FROM {path}\nTEMPLATE """{tools}"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "a b"\nPARAMETER temperature 1\nPARAMETER top_k 40\n')
    d = show_model("arr").to_json()
    info = d["model_info"]
    assert info["llama.short"] == [1, 2, 3] and info["tokenizer.ggml.tokens"] == []  # Ollama: more than 5 items -> []
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["llama.nan_value"] is None and info["general.parameter_count"] == 12
    assert "tensors" not in d and d["capabilities"] == ["completion", "tools", "insert"]
    assert d["parameters"].splitlines() == [
        'stop                           "<|im_end|>"', 'stop                           "a b"',
        "temperature                    1", "top_k                          40"]
    v = show_model("arr", verbose=True).to_json()
    assert v["model_info"]["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(100)]
    assert v["tensors"] == [{"name": "blk.0.w.weight", "type": "F32", "shape": [4, 3]}]
    json.dumps(v, allow_nan=False)
    # without a TEMPLATE the GGUF's chat template decides (Jinja, no tools)
    create_model("plain", f"FROM {path}\n")
    assert show_model("plain").capabilities == ["completion"]


def test_second_from_is_a_projector_and_gives_vision(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=21)
    write_tiny_gguf(tmp_path / "mmproj.gguf", seed=22, arch="clip", general_type="mmproj")
    r = create_model("vis", "FROM m.gguf\nFROM mmproj.gguf\n")
    doc = json.loads(store.find_manifest_path(parse_name("vis")).read_bytes())  # type: ignore[union-attr]
    assert [x["mediaType"] for x in doc["layers"]] == ["application/vnd.ollama.image.model", "application/vnd.ollama.image.projector"]
    assert r.projector_paths == [store.blob_path(doc["layers"][1]["digest"])]
    d = show_model("vis")
    assert "vision" in d.capabilities and d.to_json()["projector_info"]["general.architecture"] == "clip"
    assert "vision" not in show_model(str(tmp_path / "m.gguf")).capabilities
    child = create_model("vis2", "FROM vis\nSYSTEM s\n")  # built FROM it: keeps the projector
    assert child.projector_paths == r.projector_paths
    assert "vision" in ember("show", "vis2").stdout


# ---------------------------------------------------------------- hostile FROM values and leftovers


@pytest.mark.parametrize("source", ["fifo", "/dev/stdin", "/proc/self/fd/0"])
def test_from_a_fifo_or_stdin_does_not_hang(models: Path, tmp_path: Path, source: str) -> None:
    """Opening a FIFO for reading blocks until a writer comes; FROM must refuse it at once."""
    if source == "fifo":
        os.mkfifo(tmp_path / "fifo")
        source = str(tmp_path / "fifo")
    r = os.pipe()  # stdin of the create: a pipe nobody writes to
    try:
        p = subprocess.run([EMBER, "create", "x", "--from", source], stdin=r[0], capture_output=True, text=True,
                           env=os.environ.copy(), timeout=60)
    finally:
        os.close(r[0])
        os.close(r[1])
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not a regular file" in p.stderr
    with pytest.raises(ModelfileError, match="not a regular file"):
        create_model("x", f"FROM {source}\n")
    assert not list(store.iter_manifests())


def test_adapter_fifo_and_overlong_from_are_one_line_errors(models: Path, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=23)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ModelfileError, match="line 2: .*pipe' is not a regular file"):
        create_model("x", f"FROM {tmp_path / 'm.gguf'}\nADAPTER {tmp_path / 'pipe'}\n")
    long = "a" * 5000
    for text in (long, "./" + long, "x/" * 2500):
        with pytest.raises(ModelfileError) as ei:
            create_model("x", f"FROM {text}\n")
        assert len(str(ei.value)) < 400 and "\n" not in str(ei.value)
    with pytest.raises(ModelNotFoundError) as nf:
        resolve(long)
    assert len(str(nf.value)) < 400
    with pytest.raises(ModelNotFoundError):
        show_model("/" + long)


def test_leftovers_of_killed_writers_go_with_the_next_create(models: Path, tmp_path: Path) -> None:
    """Temporary blobs and work folders of a process that is gone are removed by the
    next successful create, at once; a live process's are kept (its create runs)."""
    write_tiny_gguf(tmp_path / "m.gguf", seed=24)
    create_model("m", "FROM m.gguf\n")
    code = ("from ember.registry import store; import pathlib, tempfile; t = store.temp_blob(); t.write_bytes(b'half');"
            "d = pathlib.Path(tempfile.mkdtemp(prefix=store.temp_prefix(), dir=store.root() / 'tmp')); (d / 'x.gguf').write_bytes(b'x')")
    (models / "tmp").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())  # exits: like a killed create
    mine = store.temp_blob()  # this process is alive
    dead = [p for p in (models / "blobs").iterdir() if p.name.startswith(store.TMP_PREFIX) and p != mine]
    assert len(dead) == 1 and len(list((models / "tmp").iterdir())) == 1
    create_model("m", "FROM m.gguf\nSYSTEM again\n")  # a successful re-create
    assert not dead[0].exists() and not list((models / "tmp").iterdir())
    assert mine.exists()
    mine.unlink()
