"""A real `ember serve` in a subprocess on a loopback ephemeral port, with its
own EMBER_MODELS folder, for the server tests."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``ember serve`` with the given EMBER_* settings; ``url`` is its base."""

    def __init__(self, models_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_dir = models_dir
        self.env = dict(os.environ)
        self.env.update({"EMBER_HOST": f"127.0.0.1:{self.port}", "EMBER_MODELS": str(models_dir)})
        for k in ("EMBER_API_KEY", "EMBER_ORIGINS", "EMBER_NUM_PARALLEL", "EMBER_MAX_QUEUE", "EMBER_KEEP_ALIVE"):
            self.env.pop(k, None)
        self.env.update(env)
        self.log = models_dir / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ember.cli.main", "serve", "--log-level", "warning"],
            env=self.env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/api/version", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.log.read_text()}")
            time.sleep(0.1)

    def ollama_client(self, timeout: float = 120, **kw: Any) -> ollama.Client:
        """The official Ollama client for this server."""
        return ollama.Client(host=self.url, timeout=timeout, **kw)

    def openai_client(self, api_key: str = "x", timeout: float = 120) -> openai.OpenAI:
        """The official OpenAI client for this server's ``/v1`` (no retries: a
        failure shows at once)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, timeout=timeout, max_retries=0)

    def anthropic_client(self, api_key: str = "x", timeout: float = 120) -> anthropic.Anthropic:
        """The official Anthropic client for this server (no retries)."""
        return anthropic.Anthropic(base_url=self.url, api_key=api_key, timeout=timeout, max_retries=0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ps(self) -> list[dict[str, Any]]:
        headers = {"Authorization": "Bearer " + self.env["EMBER_API_KEY"]} if self.env.get("EMBER_API_KEY") else {}
        return list(httpx.get(self.url + "/api/ps", headers=headers, timeout=10).json()["models"])

    def wait_running(self, name: str, want: int, timeout: float = 60.0) -> int:
        """Poll /api/ps until model ``name`` has ``want`` running sequences."""
        deadline = time.monotonic() + timeout
        n = -1
        while time.monotonic() < deadline:
            n = sum(m["running"] for m in self.ps() if m["name"] == name)
            if os.environ.get("EMBER_TEST_DEBUG"):
                print("running", name, n, self.ps())
            if n == want:
                return n
            time.sleep(0.05)
        return n

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def upload(url: str, path: Path, headers: dict[str, str] | None = None) -> str:
    """POST a file to /api/blobs as Ollama's clients do; returns its digest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    if httpx.head(f"{url}/api/blobs/{digest}", headers=headers).status_code != 200:
        with open(path, "rb") as f:
            r = httpx.post(f"{url}/api/blobs/{digest}", content=f, headers=headers, timeout=120)
        assert r.status_code in (200, 201), r.text
    return digest


def remote_modelfile(url: str, modelfile: str, headers: dict[str, str] | None = None) -> str:
    """A Modelfile naming this machine's files, as a client sends it to a server
    that reads no paths: the demo by its name, other files uploaded and named
    ``@sha256:...`` (what Ollama's CLI did)."""
    from ember.demo import demo_model_path

    lines = []
    for line in modelfile.split("\n"):
        cmd, _, value = line.partition(" ")
        if cmd.upper() in ("FROM", "ADAPTER") and Path(value.strip()).is_file():
            path = Path(value.strip())
            value = "demo" if path.resolve() == demo_model_path().resolve() else "@" + upload(url, path, headers)
            line = f"{cmd} {value}"
        lines.append(line)
    return "\n".join(lines)


def create(url: str, name: str, modelfile: str, headers: dict[str, str] | None = None) -> None:
    r = httpx.post(url + "/api/create", json={"model": name, "modelfile": remote_modelfile(url, modelfile, headers), "stream": False},
                   headers=headers, timeout=120)
    assert r.status_code == 200, r.text


# Chat templates over the demo model for the API translator tests. TOOLS_TEMPLATE
# lists tools in the system turn and writes calls as Qwen does; THINK_TEMPLATE
# keeps reasoning in <think> tags and opens one in the prompt when thinking is
# on, as Qwen3's and DeepSeek-R1's templates do. Its first turn is an example
# that the 270M model copies at temperature 0, so asked "Capital of France?"
# it reasons THOUGHT and answers ANSWER (then "<|im_end|>": THINK_STOP).
TOOLS_TEMPLATE = (
    "{{- if .Tools }}<|im_start|>system\nTools:{{ range .Tools }}\n{{ .Function.Name }}{{ end }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}"
    "{{- range .ToolCalls }}<tool_call>{\"name\": \"{{ .Function.Name }}\", \"arguments\": {{ .Function.Arguments }}}</tool_call>{{ end }}"
    "<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
THINK_TEMPLATE = (
    "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n<think>\nFrance's capital</think>\nParis<|im_end|>\n"
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ if .Thinking }}<think>{{ .Thinking }}</think>\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ if .Think }}<think>\n{{ end }}"
)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                 "parameters": WEATHER_SCHEMA}}
# Forces a reply into a call of get_weather (the plumbing is under test, not the 270M model's judgement).
CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["get_weather"]},
        "arguments": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"]},
    },
    "required": ["name", "arguments"],
}
THOUGHT, ANSWER = "France's capital", "Paris"
THINK_STOP = "<|im_end|>"
# A format for the answer: the reasoning stays free, so THOUGHT, then this JSON string.
ANSWER_SCHEMA = {"type": "string", "enum": ["Paris", "Lyon"]}


def create_chat_models(url: str, demo_path: str) -> None:
    """``tooly`` (takes tools) and ``thinker`` (thinks) over the demo model."""
    common = "PARAMETER num_ctx 512\nPARAMETER batch_invariant true\n"
    create(url, "tooly", f'FROM {demo_path}\nTEMPLATE """{TOOLS_TEMPLATE}"""\n{common}')
    create(url, "thinker", f'FROM {demo_path}\nTEMPLATE """{THINK_TEMPLATE}"""\nPARAMETER stop {THINK_STOP}\n{common}')
