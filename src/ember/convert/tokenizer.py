"""Tokenizer -> GGUF vocabulary.

Two kinds: SentencePiece (``tokenizer.model``: pieces, scores, token types) and
byte-level BPE (``tokenizer.json``: vocab, merges). For BPE, llama.cpp needs the
name of its pre-tokenizer (``tokenizer.ggml.pre``); llama.cpp's own converter
finds it by hashing the token ids of a test string, which fails for every
fine-tune that changed the vocabulary. Here it is recognised from the
pre-tokenizer definition itself (the split regexes in tokenizer.json), which a
fine-tune keeps. Special tokens, add_bos/add_eos and the chat template come
from gguf-py's ``SpecialVocab`` (tokenizer_config.json, chat_template.jinja,
chat_template.json, config.json), completed with end-of-generation tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as pb

from ember.errors import ConversionError, InvalidFileError

T = gguf.TokenType

# Pre-tokenizer split regexes (as written in tokenizer.json) -> llama.cpp name.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT = r"\p{N}"

KNOWN_PRE: dict[tuple[str, ...], str] = {
    (_LLAMA3,): "llama-bpe",
    (_QWEN2,): "qwen2",
    (_QWEN35,): "qwen35",
    (_GPT2,): "gpt-2",
    (_DIGIT, _GPT2): "starcoder",
    (_GPT4O,): "gpt-4o",
    (_TEKKEN,): "tekken",
}

#: Tokens that end a turn in common chat formats (llama.cpp also treats them as EOG).
EOT_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|eom_id|>")


def _norm_regex(p: str) -> str:
    return p.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])", "(?i:'s|'t|'re|'ve|'m|'ll|'d)")


def _pre_patterns(pre: Any, where: Path) -> list[str]:
    """The split regexes a tokenizer.json pre_tokenizer applies, in order."""
    if pre is None:
        return []
    if not isinstance(pre, dict):
        raise InvalidFileError(f"{where}: 'pre_tokenizer' is not an object; the tokenizer file is malformed")
    kind = pre.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for sub in pre.get("pretokenizers") or []:
            out += _pre_patterns(sub, where)
        return out
    if kind == "Split":
        pat = pre.get("pattern") or {}
        if "Regex" in pat:
            return [_norm_regex(str(pat["Regex"]))]
        if "String" in pat:
            return ["STRING:" + str(pat["String"])]
        return []
    if kind == "ByteLevel":
        return [_GPT2] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [_DIGIT] if pre.get("individual_digits") else [r"\p{N}+"]
    return [f"UNKNOWN:{kind}"]


def detect_pre(tokenizer_json: dict[str, Any], where: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pats = tuple(_pre_patterns(tokenizer_json.get("pre_tokenizer"), where))
    if pats in KNOWN_PRE:
        return KNOWN_PRE[pats]
    if not pats:
        return "default"
    shown = " then ".join(repr(p if len(p) < 90 else p[:87] + "...") for p in pats)
    raise ConversionError(
        f"{where}: the BPE pre-tokenizer {shown} matches none llama.cpp implements "
        f"({', '.join(sorted(set(KNOWN_PRE.values())))}); this tokenizer cannot be converted faithfully"
    )


def _looks_special(text: str) -> bool:
    return (
        (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
        or text in ("<pad>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "<unk>")
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidFileError(f"{path}: not valid JSON ({e}); download it again") from None


def tokenizer_kind(model_dir: Path) -> str:
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    if (model_dir / "tokenizer.json").is_file():
        tj = _read_json(model_dir / "tokenizer.json")
        model = tj.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback") and not _is_byte_level(tj):
            return "hf-spm"
        if model.get("type") == "BPE":
            return "bpe"
        raise ConversionError(f"{model_dir / 'tokenizer.json'}: tokenizer model type {model.get('type')!r} is not supported (BPE or a SentencePiece tokenizer.model)")
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return "bpe"  # GPT-2 style files (e.g. InternVL2.5's Qwen2 tokenizer)
    raise ConversionError(f"{model_dir}: no tokenizer found (tokenizer.json or tokenizer.model); copy the tokenizer files of the base model into this folder")


def _is_byte_level(tj: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(tj.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tj.get("decoder"))


#: Pre-tokenizers of slow tokenizer classes that ship as vocab.json + merges.txt.
CLASS_PRE = {"Qwen2Tokenizer": "qwen2", "Qwen2TokenizerFast": "qwen2", "GPT2Tokenizer": "gpt-2", "GPT2TokenizerFast": "gpt-2"}


def _files_tokenizer(model_dir: Path) -> tuple[dict[str, Any], str]:
    """vocab.json + merges.txt (+ added_tokens.json, tokenizer_config.json) as a
    tokenizer.json-like dict; the pre-tokenizer follows the tokenizer class."""
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    cls = str(cfg.get("tokenizer_class") or "")
    pre = CLASS_PRE.get(cls)
    if pre is None:
        raise ConversionError(
            f"{cfg_file}: tokenizer_class {cls or '(none)'!r} with vocab.json + merges.txt: its pre-tokenizer is unknown "
            f"(known: {', '.join(sorted(CLASS_PRE))}); add the model's tokenizer.json"
        )
    added: dict[int, dict[str, Any]] = {}
    if (f := model_dir / "added_tokens.json").is_file():
        for text, i in (_read_json(f) or {}).items():
            added[int(i)] = {"id": int(i), "content": text, "special": _looks_special(text)}
    for i, d in (cfg.get("added_tokens_decoder") or {}).items():
        added[int(i)] = {"id": int(i), "content": d["content"], "special": bool(d.get("special"))}
    return {"model": {"type": "BPE", "vocab": _read_json(model_dir / "vocab.json")}, "added_tokens": list(added.values())}, pre


def bpe_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[str], list[int], str, dict[str, Any]]:
    path = model_dir / "tokenizer.json"
    if path.is_file():
        tj = _read_json(path)
        pre = None
    else:
        path = model_dir / "vocab.json"
        tj, pre = _files_tokenizer(model_dir)
    vocab: dict[str, int] = (tj.get("model") or {}).get("vocab") or {}
    if not isinstance(vocab, dict) or not vocab:
        raise InvalidFileError(f"{path}: no vocabulary table; the tokenizer file is malformed")
    if pre is None:
        pre = detect_pre(tj, path)
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    rev: dict[int, str] = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        rev[i] = a["content"]
    n = max(rev) + 1
    if vocab_size is not None:
        if n > vocab_size:
            raise ConversionError(f"{path}: token id {n - 1} does not fit the model's vocab_size {vocab_size} (config.json); the tokenizer does not belong to this model")
        n = vocab_size
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        text = rev[i]
        if i in added:
            if added[i].get("special") or _looks_special(text):
                types.append(T.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        tokens.append(text)
    return tokens, types, pre, tj


def hf_spm_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[str], list[float], list[int], bool]:
    """A SentencePiece-style BPE (byte fallback, "▁" for spaces) that ships only
    as tokenizer.json, for llama.cpp's SentencePiece tokenizer. llama.cpp merges
    the pair whose result has the highest score, HF the pair of lowest merge
    rank: so each token's score is minus the rank of the merge that makes it.
    (gguf-py's LlamaHfVocab gives every token -1000, which tokenizes some
    words differently from the original.)"""
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = model.get("merges") or []
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    rev = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        rev[i] = a["content"]
    n = max(rev) + 1 if vocab_size is None else int(vocab_size)
    if max(rev) >= n:
        raise ConversionError(f"{path}: token id {max(rev)} does not fit the model's vocab_size {n} (config.json); the tokenizer does not belong to this model")
    score: dict[str, float] = {}
    for rank, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        score.setdefault(a + b, -float(rank))
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(T.UNUSED))
            continue
        tokens.append(t)
        scores.append(score.get(t, 0.0) if i not in added else -1000.0)
        if i in added:
            types.append(int(T.CONTROL if (added[i].get("special") or _looks_special(t)) else T.USER_DEFINED))
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(int(T.BYTE))
        elif t == unk:
            types.append(int(T.UNKNOWN))
        else:
            types.append(int(T.NORMAL))
    spec = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)
    add_prefix = any(k in spec for k in ('"prepend": "\u2581"', '"prepend_scheme": "always"', '"prepend_scheme": "first"', '"add_prefix_space": true'))
    return tokens, scores, types, add_prefix


def spm_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int], bool]:
    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise InvalidFileError(f"{path}: not a SentencePiece model ({e}); download it again") from None
    add_prefix = True
    user_defined: set[int] = set()  # pieces always matched whole (sentencepiece has no IsUserDefined)
    try:
        proto = pb.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(path.read_bytes())
        add_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
        user_defined = {i for i, p in enumerate(proto.pieces) if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}  # type: ignore[attr-defined]
    except Exception:  # protobuf missing or an unusual proto: keep the default
        pass
    n_sp = sp.vocab_size()
    n = vocab_size if vocab_size is not None else n_sp
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-1000.0] * n
    types = [int(T.UNUSED)] * n
    for i in range(min(n, n_sp)):
        piece = sp.IdToPiece(i)
        tokens[i] = piece.encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = T.UNKNOWN
        elif sp.IsControl(i):
            types[i] = T.CONTROL
        elif sp.IsUnused(i):
            types[i] = T.UNUSED
        elif sp.IsByte(i):
            types[i] = T.BYTE
        elif i in user_defined:
            types[i] = T.USER_DEFINED
        else:
            types[i] = T.NORMAL
    # tokens added on top of the SentencePiece model
    added: list[tuple[int, str, bool]] = []
    if (f := model_dir / "added_tokens.json").is_file():
        for text, i in (_read_json(f) or {}).items():
            added.append((int(i), text, _looks_special(text)))
    if (f := model_dir / "tokenizer_config.json").is_file():
        for i, d in ((_read_json(f) or {}).get("added_tokens_decoder") or {}).items():
            added.append((int(i), d["content"], bool(d.get("special"))))
    if (f := model_dir / "tokenizer.json").is_file():
        for d in _read_json(f).get("added_tokens") or []:
            added.append((int(d["id"]), d["content"], bool(d.get("special"))))
    for i, text, special in added:
        if i >= n:
            raise ConversionError(f"{model_dir}: added token {text!r} has id {i}, outside the model's vocab_size {n}; the tokenizer does not belong to this model")
        if i < n_sp and tokens[i] == text.encode("utf-8") and types[i] in (T.CONTROL, T.UNKNOWN):
            continue  # already a control piece of the model
        tokens[i] = text.encode("utf-8") if special else text.replace("\u2581", " ").encode("utf-8")
        scores[i] = -1000.0
        types[i] = T.CONTROL if (special or _looks_special(text)) else T.USER_DEFINED
    return tokens, scores, types, add_prefix


def special_vocab(model_dir: Path, tokens: list[str] | list[bytes], *, merges: bool, spm: Any = None) -> gguf.SpecialVocab:
    sv = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=len(tokens))
    index = {(t.decode("utf-8", "replace") if isinstance(t, bytes) else t): i for i, t in enumerate(tokens)}
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    for typ in ("bos", "eos", "unk", "pad"):
        if typ in sv.special_token_ids:
            continue
        entry = cfg.get(f"{typ}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in index:
            sv._set_special_token(typ, index[text])
        elif spm is not None:
            tid = {"bos": spm.bos_id, "eos": spm.eos_id, "unk": spm.unk_id, "pad": spm.pad_id}[typ]()
            if tid >= 0:
                sv._set_special_token(typ, tid)
    for text in EOT_TOKENS:
        if text in index and text != "<|endoftext|>":
            sv.special_token_ids.setdefault("eot", index[text])
            break
    return sv


def write_vocab(
    w: gguf.GGUFWriter,
    model_dir: Path,
    hparams: dict[str, Any],
    *,
    eos_override: str | None = None,
    add_space_prefix: bool | None = None,
    null_piece: str | None = None,
) -> None:
    """Write the model's tokenizer into ``w``: tokens, types, scores or merges,
    special ids, add_bos/add_eos and the chat template."""
    vocab_size = hparams.get("vocab_size")
    kind = tokenizer_kind(model_dir)
    all_tokens: list[str] | list[bytes]
    if kind == "spm":
        tokens, scores, types, add_prefix = spm_vocab(model_dir, vocab_size)
        if add_space_prefix is not None:
            add_prefix = add_space_prefix
        if null_piece is not None:
            tokens = [null_piece.encode() if t == b"\x00" else t for t in tokens]
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(add_prefix)
        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(model_dir / "tokenizer.model"))
        sv = special_vocab(model_dir, tokens, merges=False, spm=sp)
        all_tokens = tokens
    elif kind == "hf-spm":
        htoks, hscores, htypes, hprefix = hf_spm_vocab(model_dir, vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(htoks)
        w.add_token_scores(hscores)
        w.add_token_types(htypes)
        w.add_add_space_prefix(hprefix if add_space_prefix is None else add_space_prefix)
        sv = special_vocab(model_dir, htoks, merges=False)
        all_tokens = htoks
    else:
        stoks, stypes, pre, _ = bpe_vocab(model_dir, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(stoks)
        w.add_token_types(stypes)
        sv = special_vocab(model_dir, stoks, merges=True)
        if not sv.merges:
            raise InvalidFileError(f"{model_dir}: a BPE tokenizer without merges (tokenizer.json or merges.txt); download the tokenizer again")
        all_tokens = stoks
    if eos_override is not None:
        texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in all_tokens]
        if eos_override in texts:
            sv.special_token_ids["eos"] = texts.index(eos_override)
    sv.add_to_gguf(w, quiet=True)
