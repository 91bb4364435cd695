"""``ember run``: one answer and exit, or an interactive chat like Ollama's."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any

import typer

from ember import options as opts
from ember.api import Model
from ember.cli.app import app
from ember.cli.common import err_console
from ember.cli.sizes import format_size
from ember.errors import EmberError, OptionError
from ember.request import FALLBACK_NOTE, Result

HELP_TEXT = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (e.g. /set parameter temperature 0)
  /set system TEXT            Set the system message
  /set think, /set nothink    Turn a thinking model's reasoning on or off
  /set hidethinking           Think but do not print the reasoning (/set showthinking prints it)
  /show info                  Show details for this model
  /show parameters            Show the parameters in effect
  /show template              Show the chat template
  /show system                Show the system message
  /clear                      Clear the conversation
  /bye                        Exit
  /?, /help                   Help for a command

Use \"\"\" to begin and end a multi-line message.
With a vision model, image paths in a message (./photo.jpg, /tmp/a.png) are sent as images.
Ctrl+C stops a reply; Ctrl+D or /bye exits."""

# How the reasoning of a thinking model is framed on the terminal (as ``ollama run``).
THINKING_OPEN, THINKING_CLOSE = "Thinking...\n", "...done thinking.\n\n"
_GREY, _BOLD, _RESET = "\x1b[90m", "\x1b[1m", "\x1b[0m"

# An image path in a prompt, as Ollama finds them: it starts with ./, ../, ~/
# or /, ends in an image extension, and may be quoted or have escaped spaces.
_IMAGE_PATH = re.compile(r"""(?:'((?:\.{1,2}/|~/|/)[^']+?\.(?i:jpe?g|png|webp|gif|bmp))'|"((?:\.{1,2}/|~/|/)[^"]+?\.(?i:jpe?g|png|webp|gif|bmp))"|((?:\.{1,2}/|~/|/)(?:\\ |\S)+?\.(?i:jpe?g|png|webp|gif|bmp))(?=[\s,;:!?)]|\.?$|\.\s))""")


def extract_images(text: str) -> tuple[str, list[Path]]:
    """(the prompt without them, the image files) for the paths of existing
    files in ``text``; a path to no file stays text."""
    images: list[Path] = []

    def take(m: re.Match[str]) -> str:
        raw = next(g for g in m.groups() if g)
        path = Path(raw.replace("\\ ", " ")).expanduser()
        if not path.is_file():
            return m.group(0)
        images.append(path)
        err_console.print(f"Added image '{path}'")
        return ""

    out = _IMAGE_PATH.sub(take, text)
    return (re.sub(r"[ \t]{2,}", " ", out).strip() if images else text), images


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``--param NAME=VALUE`` pairs, typed by ember.options (``stop`` accumulates)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise OptionError(f"--param {pair!r}: use NAME=VALUE, e.g. --param temperature=0")
        name = name.strip()
        parsed = opts.parse_value(name, value)
        if name == "stop":
            out.setdefault("stop", []).append(parsed)
        else:
            out[name] = parsed
    return out


def parse_lora(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        path, _, scale = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        try:
            out.append((path, float(scale) if scale else 1.0))
        except ValueError:
            raise OptionError(f"--lora {spec!r}: use FILE or FILE:SCALE (e.g. adapter.gguf:0.5)") from None
    return out


@app.command()
def run(
    model: str = typer.Argument(..., help="A registry name (e.g. demo), a GGUF file or any shard of a split model."),
    prompt: list[str] = typer.Argument(None, help="Answer this and exit (stdin is prepended when piped)."),
    param: list[str] = typer.Option([], "--param", "-p", help="NAME=VALUE, any Ollama option (repeatable)."),
    system: str = typer.Option(None, "--system", help="System message."),
    raw: bool = typer.Option(False, "--raw", help="Complete the text without a chat template."),
    reverse_prompt: str = typer.Option(None, "--reverse-prompt", "-r", help="Completion-style chat: hand control back when the model writes this (e.g. '用户：')."),
    lora: list[str] = typer.Option([], "--lora", help="Apply a GGUF LoRA adapter: FILE or FILE:SCALE (repeatable)."),
    format: str = typer.Option(None, "--format", help="Response format: json."),
    verbose: bool = typer.Option(False, "--verbose", help="Print timings and memory after each reply."),
    rpc: str = typer.Option(None, "--rpc", help="Split the model across RPC workers (ember worker): HOST:PORT,HOST:PORT."),
    image: list[Path] = typer.Option([], "--image", help="Send this image with the first message (repeatable); image paths in the prompt are sent too."),
    think: bool = typer.Option(None, "--think/--no-think", help="Turn a thinking model's reasoning on or off (default: the model's)."),
    hidethinking: bool = typer.Option(False, "--hidethinking", help="Think, but print only the answer."),
) -> None:
    """Run a model: answer PROMPT, or chat interactively. With a vision model,
    paths of image files in the prompt (./photo.jpg) are sent as images."""
    params = parse_params(param + ([f"rpc={rpc}"] if rpc is not None else []))
    load_params = {k: v for k, v in params.items() if k in opts.LOAD_OPTIONS}
    request_params = {k: v for k, v in params.items() if k not in opts.LOAD_OPTIONS}
    text = " ".join(prompt or [])
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        text = f"{piped.rstrip()} {text}".strip() if text else piped
    session = _Session(model, load_params, request_params, parse_lora(lora), system, raw, reverse_prompt, format, verbose)
    session.images = list(image)
    session.think, session.hide_thinking = think, hidethinking
    try:
        if text or not sys.stdin.isatty():
            if session.model.template is None and not raw and not reverse_prompt:
                err_console.print(f"[dim]Note: {FALLBACK_NOTE}.[/dim]")
            session.answer(text)
        else:
            session.interactive()
    finally:
        session.close()


class _Session:
    def __init__(
        self,
        name: str,
        load_params: dict[str, Any],
        params: dict[str, Any],
        lora: list[tuple[str, float]],
        system: str | None,
        raw: bool,
        reverse_prompt: str | None,
        format: str | None,
        verbose: bool,
    ) -> None:
        self.name = name
        self.load_params = load_params
        self.params = params
        self.lora = lora
        self.raw = raw
        self.reverse_prompt = reverse_prompt
        self.format = format
        self.verbose = verbose
        self.model = self._load()
        self.system = system if system is not None else self.model.system
        self.messages: list[dict[str, Any]] = []
        self.transcript = ""
        self.images: list[Path] = []  # go with the next message (--image)
        self.think: bool | None = None  # None: the model's default (on for a model that thinks)
        self.hide_thinking = False

    def _load(self) -> Model:
        return Model(self.name, num_parallel=1, lora=self.lora, **self.load_params)

    def close(self) -> None:
        self.model.close()

    # --- one reply -------------------------------------------------------
    def _stream(self, user_text: str) -> Result | None:
        params = dict(self.params)
        images, self.images = self.images, []
        if self.model.vision:
            user_text, found = extract_images(user_text)
            images += found
        if images:
            params["images"] = images
        if self.reverse_prompt:
            params["stop"] = list(params.get("stop", [])) + [self.reverse_prompt]
            if not self.transcript and self.system:
                self.transcript = self.system + "\n"
            self.transcript += f"{self.reverse_prompt}{user_text}\n"
            chunks = self.model.generate(self.transcript, raw=True, stream=True, format=self.format, **params)
        elif self.raw:
            chunks = self.model.generate(user_text, raw=True, stream=True, format=self.format, **params)
        else:
            msgs = list(self.messages)
            if self.system:
                msgs.insert(0, {"role": "system", "content": self.system})
            msgs.append({"role": "user", "content": user_text, **({"images": params.pop("images")} if images else {})})
            chunks = self.model.chat(msgs, stream=True, format=self.format, think=self.think, **params)
        result = None
        shown = _Reasoning(hide=self.hide_thinking)
        try:
            for c in chunks:  # type: ignore[union-attr]
                sys.stdout.write(shown.text(c.thinking, c.text))
                sys.stdout.flush()
                if c.done:
                    result = c.result
        except KeyboardInterrupt:
            chunks.close()  # type: ignore[union-attr]
            sys.stdout.write(shown.text("", "") + "\n")
            return None
        if result is None:
            return None
        if not result.text.endswith("\n"):
            sys.stdout.write("\n")
        if self.reverse_prompt:
            self.transcript += result.text
            if not self.transcript.endswith("\n"):
                self.transcript += "\n"
        elif not self.raw:
            self.messages.append({"role": "user", "content": user_text, **({"images": images} if images else {})})
            self.messages.append(result.message or {"role": "assistant", "content": result.text})
        if self.verbose:
            self._report(result)
        return result

    def answer(self, text: str) -> None:
        self._stream(text)

    def _report(self, r: Result) -> None:
        def dur(ns: int) -> str:
            s = ns / 1e9
            return f"{s * 1000:.2f}ms" if s < 1 else f"{s:.3f}s"

        def rate(n: int, ns: int) -> str:
            return f"{n / (ns / 1e9):.2f} tokens/s" if ns > 0 else "n/a"

        m = self.model.memory
        lines = [
            f"total duration:       {dur(r.total_duration)}",
            f"load duration:        {dur(self.model.load_duration)}",
            f"prompt eval count:    {r.prompt_eval_count} token(s)",
            f"prompt eval duration: {dur(r.prompt_eval_duration)}",
            f"prompt eval rate:     {rate(r.prompt_eval_count, r.prompt_eval_duration)}",
            f"eval count:           {r.eval_count} token(s)",
            f"eval duration:        {dur(r.eval_duration)}",
            f"eval rate:            {rate(r.eval_count, r.eval_duration)}",
            f"draft count:          {r.draft_count} token(s)",
            f"draft accepted:       {r.draft_accepted} token(s)"
            + (f" ({100 * r.draft_accepted / r.draft_count:.1f}%)" if r.draft_count else ""),
            f"memory:               model {format_size(m.model_bytes)}, KV cache {format_size(m.kv_cache_bytes)}, "
            f"compute {format_size(m.compute_bytes)}, RSS {format_size(m.rss_bytes)}"
            + (f", GPU {format_size(m.gpu_bytes)}" if m.gpu_bytes else ""),
        ]
        if len(m.devices) > 1:  # split across GPUs or RPC workers: what went where
            lines += [f"  {name:<20}model {format_size(d['model'])}, KV cache {format_size(d['kv_cache'])}, "
                      f"compute {format_size(d['compute'])}" for name, d in m.devices.items()]
        print("\n".join(lines), file=sys.stderr)

    # --- the interactive loop --------------------------------------------
    def interactive(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - optional (not on every platform): line editing and history for input()
        if self.model.template is None and not self.raw and not self.reverse_prompt:
            err_console.print(f"[dim]Note: {FALLBACK_NOTE}.[/dim]")
        prompt = self.reverse_prompt or ">>> "
        while True:
            try:
                line = input(prompt)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.")
                continue
            if line.lstrip().startswith('"""'):
                block = self._multiline(line.lstrip()[3:])
                if block is None:
                    continue
                line = block
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("/") and not self.reverse_prompt or stripped in ("/bye", "/exit"):
                if self._command(stripped):
                    return
                continue
            self._stream(line)
            print()

    def _multiline(self, first: str) -> str | None:
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        lines = [first]
        while True:
            try:
                line = input("... ")
            except (EOFError, KeyboardInterrupt):
                print()
                return None
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(line)

    def _command(self, line: str) -> bool:
        """Handle a /command; True means exit."""
        words = line.split(None, 3)
        cmd = words[0].lower()
        try:
            if cmd in ("/bye", "/exit"):
                return True
            if cmd in ("/?", "/help"):
                print(HELP_TEXT)
            elif cmd == "/clear":
                self.messages.clear()
                self.transcript = ""
                print("Cleared session context")
            elif cmd == "/set" and len(words) >= 2:
                self._set(words[1:], line)
            elif cmd == "/show" and len(words) >= 2:
                self._show(words[1].lower())
            else:
                print(f"Unknown command '{line}'. Type /? for help")
        except EmberError as e:
            print(f"Error: {e}")
        return False

    def _set(self, args: list[str], line: str) -> None:
        what = args[0].lower()
        if what == "parameter" and len(args) >= 3:
            name, value = args[1], line.split(None, 3)[3]
            parsed = opts.parse_value(name, value)
            if name == "stop":
                self.params.setdefault("stop", []).append(parsed)
            elif name in opts.LOAD_OPTIONS:
                self.load_params[name] = parsed
                self.model.close()
                self.model = self._load()
            else:
                self.params[name] = parsed
            print(f"Set parameter '{name}' to '{value.strip()}'")
        elif what == "system":
            self.system = line.split(None, 2)[2] if len(line.split(None, 2)) > 2 else ""
            print("Set system message.")
        elif what in ("think", "nothink"):
            self.think = what == "think"
            print(f"Set '{what}' mode.")
        elif what in ("hidethinking", "showthinking"):
            self.hide_thinking = what == "hidethinking"
            print(f"Set '{what}' mode.")
        else:
            print("Usage: /set parameter NAME VALUE | /set system TEXT | /set think | /set nothink")

    def _show(self, what: str) -> None:
        if what == "info":
            info = self.model.info
            print(
                f"  Model\n    architecture        {info.architecture}\n    parameters          {info.parameters / 1e9:.2f}B\n"
                f"    context length      {info.context_length}\n    num_ctx             {info.num_ctx}\n"
                f"    quantization        {info.quantization}\n    chat template       {info.template or 'none'}"
            )
        elif what == "parameters":
            shown = {**{k: v for k, v in self.model.defaults.items() if k in self.model.resolved.parameters}, **self.load_params, **self.params}
            if not shown:
                print("No parameters were specified for this model.")
            for k, v in shown.items():
                for item in v if isinstance(v, list) else [v]:
                    print(f"{k:<24}{item}")
        elif what == "template":
            tmpl = self.model.template
            print(tmpl.text if tmpl else "No template was specified for this model.")
        elif what == "system":
            print(self.system or "No system message was specified for this model.")
        elif what == "license":
            print("\n".join(self.model.resolved.license) or "No license was specified for this model.")
        else:
            print("Usage: /show info|parameters|template|system|license")


class _Reasoning:
    """What a reply's chunks print: the reasoning between ``Thinking...`` and
    ``...done thinking.`` (grey on a terminal), then the answer, as ``ollama
    run`` shows them; with ``hide`` the answer only."""

    def __init__(self, hide: bool) -> None:
        self.hide = hide
        self.open = False
        self.ends_line = True
        self.tty = sys.stdout.isatty()

    def _style(self, text: str, *codes: str) -> str:
        return "".join(codes) + text + _RESET if self.tty else text

    def text(self, thinking: str, answer: str) -> str:
        """The text to print for a chunk (``"", ""``: close what is open)."""
        out = ""
        if thinking and not self.hide:
            if not self.open:
                out += self._style(THINKING_OPEN, _GREY, _BOLD)
                self.open = True
            out += self._style(thinking, _GREY)
            self.ends_line = thinking.endswith("\n")
        if self.open and (answer or not thinking):
            out += ("" if self.ends_line else "\n") + self._style(THINKING_CLOSE, _GREY, _BOLD)
            self.open = False
        return out + answer
