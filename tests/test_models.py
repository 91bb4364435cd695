"""ember.models.resolve_model, the one resolver of a model reference (used by
ember.load, ember run, the server and the file commands): registry names, GGUF
files, the demo; the seam a server uses to refuse paths on its machine; and
the identity loaded models are keyed by."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.demo import demo_model_path
from ember.errors import EmberError
from ember.models import model_key, resolve_model
from ember.registry.create import create_model


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    create_model("mine", f'FROM {demo_model_path()}\nSYSTEM "Be brief."\n')
    return tmp_path


def test_a_name_a_file_and_the_demo_resolve(registry: Path) -> None:
    mine = resolve_model("mine")
    assert mine.name == "mine:latest" and mine.system == "Be brief."
    assert resolve_model(str(demo_model_path())).model_paths == [demo_model_path().resolve()]
    demo = resolve_model("demo")
    with open(demo.model_paths[0], "rb") as f:
        assert f.read(4) == b"GGUF"


def test_without_paths_a_file_on_this_machine_is_refused_alike_whether_it_exists_or_not(registry: Path) -> None:
    """A remote client must neither load a server file nor learn which exist."""
    (registry / "there.gguf").symlink_to(demo_model_path())
    answers = []
    for ref in (registry / "there.gguf", registry / "nopes.gguf"):  # a file, and none of a name as long
        with pytest.raises(EmberError) as e:
            resolve_model(ref, allow_paths=False)
        answers.append((type(e.value), e.value.status, e.value.message.replace(ref.stem, "NAME")))
    assert answers[0] == answers[1]
    assert answers[0][1] in (400, 404)
    # names still resolve
    assert resolve_model("mine", allow_paths=False).name == "mine:latest"
    demo = resolve_model("demo", allow_paths=False)
    assert demo.name == "demo:latest" and demo.model_paths[0].stat().st_size == demo_model_path().stat().st_size


def test_same_file_name_in_two_folders_is_two_models(tmp_path: Path) -> None:
    """ga/model.gguf and gb/model.gguf shared one loaded model (the second
    rendered the first one's template): the key is the files, not the name."""
    keys = []
    for folder, content in (("ga", b"GGUF-a"), ("gb", b"GGUF-b")):
        path = tmp_path / folder / "model.gguf"
        path.parent.mkdir()
        path.write_bytes(content)
        r = resolve_model(str(path))
        assert r.name == "model.gguf"
        keys.append(model_key(r))
    assert keys[0] != keys[1]
    assert model_key(resolve_model(str(tmp_path / "ga" / "model.gguf"))) == keys[0]
