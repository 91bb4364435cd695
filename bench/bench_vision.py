"""Image encoding time and time to first token with one image, Ember's engine
(ember.engine.vision) beside llama.cpp's llama-mtmd-cli on the same files, in
the same run, runs interleaved.

    .venv/bin/python bench/bench_vision.py [--threads 2] [--repeat 3] [--size full|small]

The model is a Gemma 3 checkpoint with random weights built here (no hub at
run time): ``full`` has the real SigLIP-So400m tower (1152 wide, 27 layers,
896 x 896 images, 256 image tokens) in front of a 2-layer 640-wide text
model; ``small`` a 6-layer tower on 448 x 448 images for a quick check. Both sides get the f16
files ``ember convert`` writes. llama-mtmd-cli's numbers are its own logs:
"encoding done in N ms" (the vision tower) and, with -v, the log timestamps
from formatting the message to llama_perf's report after the first token.
Ember's are wall-clock times of encode() and of rendering the template,
tokenize, encode, decode and sampling the first token. Medians.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOOLS = HERE / ".tools" / "bin"
PROMPT = "Describe this picture in detail."


def make_model(out: Path, size: str) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    import transformers
    from convert_fixtures import make_spm_tokenizer, pad_vocab
    from vision_fixtures import GEMMA_CHAT, randomize

    symbols = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
    sp = make_spm_tokenizer(out, add_dummy_prefix=False, user_symbols=symbols, bos="<bos>", eos="<eos>", extra_config={"chat_template": GEMMA_CHAT})
    layers, side = (27, 896) if size == "full" else (6, 448)
    vc = transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers, num_attention_heads=16, image_size=side, patch_size=14)
    tc = transformers.Gemma3TextConfig(
        vocab_size=pad_vocab(sp.vocab_size()), hidden_size=640, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=2048, sliding_window=512, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg = transformers.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=256,
                                    image_token_index=sp.piece_to_id("<image_soft_token>"), boi_token_index=sp.piece_to_id("<start_of_image>"), eoi_token_index=sp.piece_to_id("<end_of_image>"))
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    randomize(model, 0, one_plus_norms=True)
    model.to(torch.bfloat16).save_pretrained(out)
    transformers.Gemma3ImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


def _stamp(line: str) -> float:
    """Seconds from a llama.cpp log line's timestamp (minutes.seconds.ms.us)."""
    m, sec, ms, us = (int(x) for x in line.split()[0].split("."))
    return m * 60 + sec + ms / 1e3 + us / 1e6


def cli_run(model: Path, proj: Path, image: Path, threads: int) -> tuple[float, float]:
    """(encode ms, time to first token ms) from llama-mtmd-cli's verbose log:
    from formatting the message to llama_perf's report after the first token."""
    cmd = [str(TOOLS / "llama-mtmd-cli"), "-m", str(model), "--mmproj", str(proj), "--image", str(image), "-p", PROMPT,
           "-n", "1", "--temp", "0", "-t", str(threads), "-c", "1024", "-v"]
    for _ in range(3):  # its logger is not flushed at exit: now and then the last lines are lost
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        lines = r.stderr.splitlines()
        enc = re.search(r"encoding done in (\d+(?:\.\d+)?) ms", r.stderr)
        start = next((ln for ln in lines if "chat_add_and_format" in ln), None)
        end = next((ln for ln in lines if "llama_perf_context_print: prompt eval time" in ln), None)
        if enc and start and end:
            return float(enc.group(1)), (_stamp(end) - _stamp(start)) * 1000
    raise RuntimeError(f"no timings in llama-mtmd-cli's log:\n{r.stderr[-3000:]}")


def ember_run(model: Any, projector: Any, image: bytes) -> tuple[float, float]:
    import numpy as np

    from ember.engine.vision import ImageChunk, decode_image
    from ember.templates.jinja import JinjaChatTemplate

    ctx = model.new_context(1024)
    try:
        t0 = time.perf_counter()
        text = JinjaChatTemplate(model.chat_template).render([{"role": "user", "content": projector.marker + PROMPT}])
        vp = projector.tokenize(text, [image])
        encode = 0.0
        pos, last = 0, None
        for piece in vp.pieces:
            if isinstance(piece, ImageChunk):
                e0 = time.perf_counter()
                embd = projector.encode(piece)
                encode += time.perf_counter() - e0
                pos = decode_image(ctx, projector, piece, embd, 0, pos)
            else:
                ctx.decode([(t, pos + i, 0, i == len(piece) - 1) for i, t in enumerate(piece)])
                pos += len(piece)
                last = ctx.logits_row(len(piece) - 1)
        int(np.argmax(last))
        ttft = time.perf_counter() - t0
        vp.close()
        return encode * 1000, ttft * 1000
    finally:
        ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--workdir", type=Path, default=HERE / ".vision-bench")
    args = ap.parse_args()
    if not (TOOLS / "llama-mtmd-cli").exists():
        sys.exit("llama-mtmd-cli is missing: run bench/build_llama_tools.sh first")

    from ember.convert import plan, write
    from ember.engine.model import LoadedModel
    from ember.engine.vision import VisionProjector

    ckpt = args.workdir / f"gemma3-vision-{args.size}"
    if not (ckpt / "config.json").exists():
        print(f"building {ckpt} ...", flush=True)
        make_model(ckpt, args.size)
    lm, proj = args.workdir / f"{ckpt.name}-f16.gguf", args.workdir / f"mmproj-{ckpt.name}-f16.gguf"
    if not (lm.exists() and proj.exists()):
        write(plan(ckpt, outtype="f16"), lm)  # the projector beside it, named mmproj-<model file>
    sys.path.insert(0, str(HERE.parent / "tests"))
    from vision_fixtures import sample_image

    image = args.workdir / "image.png"
    side = 896 if args.size == "full" else 448
    sample_image(side, side).save(image)  # the model's size: no resize on either side
    data = image.read_bytes()

    model = LoadedModel(lm, {"num_thread": args.threads})
    projector = VisionProjector(model, proj, n_threads=args.threads)
    ember_run(model, projector, data)  # warm-up: libmtmd sizes its buffers on the first image (the CLI warms up at load)
    cli_enc, cli_ttft, our_enc, our_ttft = [], [], [], []
    for _ in range(args.repeat):
        e, t = cli_run(lm, proj, image, args.threads)
        cli_enc.append(e)
        cli_ttft.append(t)
        e, t = ember_run(model, projector, data)
        our_enc.append(e)
        our_ttft.append(t)
    med = statistics.median
    print(f"Gemma 3 vision ({args.size}: {ckpt.name}), one {side}x{side} image, {args.threads} threads, median of {args.repeat}")
    print(f"{'measure':40s} {'ember':>9s} {'llama.cpp':>10s} {'ratio':>6s}")
    for label, ours, theirs in (("image encoding (ms)", our_enc, cli_enc), ("time to first token (ms)", our_ttft, cli_ttft)):
        print(f"{label:40s} {med(ours):9.1f} {med(theirs):10.1f} {med(ours) / med(theirs):6.2f}")


if __name__ == "__main__":
    main()
