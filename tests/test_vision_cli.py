"""Images from the terminal: ``ember run MODEL "what is in ./image.png?"``
(paths of image files in the prompt are sent as images, as Ollama's CLI does),
``--image FILE``, and paths typed in the interactive chat, on a tiny random
InternVL checkpoint (vision_fixtures) created in the registry with its
projector. The answers equal the library's for the same message and image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cli_fixtures import EMBER, run_ember
from vision_fixtures import BUILDERS, sample_image

import ember
from ember.convert import plan, write

PARAMS = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "num_ctx": 512}
ARGS = [f"--param={k}={v}" for k, v in PARAMS.items()]


@pytest.fixture(scope="module")
def tinyvl(tmp_path_factory: Any) -> Any:
    d = tmp_path_factory.mktemp("vision-cli")
    fx = BUILDERS["internvl"](d / "hf")
    lm, proj = write(plan(fx.path, outtype="f32"), d / "model.gguf")
    sample_image(112, 56, seed=3).save(d / "image.png")
    env = {"EMBER_MODELS": str(d / "models")}
    (d / "Modelfile").write_text(f"FROM {lm}\nFROM {proj}\n")
    run_ember("create", "tinyvl", "-f", d / "Modelfile", env=env, check=True)
    with ember.load(lm, projector=proj, **PARAMS) as model:
        def answer(text: str, image: bool) -> str:
            msg = {"role": "user", "content": text, **({"images": [d / "image.png"]} if image else {})}
            return model.chat([msg]).text.strip()

        refs = {k: answer(*k) for k in (("What is in ?", True), ("What is in the picture?", True), ("What is in ./nothing.png?", False))}
    yield d, env, refs


def test_image_paths_in_the_prompt_and_image_option(tinyvl: Any) -> None:
    d, env, refs = tinyvl
    r = run_ember("run", "tinyvl", "What is in ./image.png?", *ARGS, env=env, cwd=d, check=True)
    assert "Added image 'image.png'" in r.stderr
    assert r.stdout.strip() == refs[("What is in ?", True)]
    r = run_ember("run", "tinyvl", "--image", "image.png", "What is in the picture?", *ARGS, env=env, cwd=d, check=True)
    assert r.stdout.strip() == refs[("What is in the picture?", True)]
    # a path to no file is text, as Ollama leaves it
    r = run_ember("run", "tinyvl", "What is in ./nothing.png?", *ARGS, env=env, cwd=d, check=True)
    assert "Added image" not in r.stderr and r.stdout.strip() == refs[("What is in ./nothing.png?", False)]


def test_bad_images_from_the_terminal_are_one_line_errors(tinyvl: Any, demo_model: Path) -> None:
    d, env, _ = tinyvl
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = run_ember("run", "tinyvl", "--image", "broken.png", "hi", *ARGS, env=env, cwd=d)
    assert r.returncode == 1 and "image 1 (broken.png): corrupt PNG" in r.stderr and "Traceback" not in r.stderr
    r = run_ember("run", "tinyvl", "what is in ./broken.png", *ARGS, env=env, cwd=d)
    assert r.returncode == 1 and "corrupt PNG" in r.stderr and "Traceback" not in r.stderr
    r = run_ember("run", demo_model, "--image", "image.png", "hi", *ARGS, env=env, cwd=d)
    assert r.returncode == 1 and "cannot see images" in r.stderr and "Traceback" not in r.stderr


def test_interactive_chat_takes_image_paths(tinyvl: Any) -> None:
    pexpect = pytest.importorskip("pexpect")
    d, env, refs = tinyvl
    child = pexpect.spawn(EMBER, ["run", "tinyvl", *ARGS], encoding="utf-8", timeout=120, cwd=str(d),
                          env={**os.environ, **env, "TERM": "dumb"})
    child.expect_exact(">>> ")
    child.sendline("What is in ./image.png?")
    child.expect_exact("Added image 'image.png'")
    child.expect_exact(">>> ")
    assert child.before.replace("\r\n", "\n").strip() == refs[("What is in ?", True)]
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
