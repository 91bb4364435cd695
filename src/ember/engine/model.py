"""A GGUF model loaded into llama.cpp: weights, vocabulary, LoRA adapters and
contexts. Thread-safe for reading (tokenize, metadata); each context is used by
one thread at a time (the scheduler's)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import psutil

from ember import options as opts
from ember import settings
from ember.engine import llama, rpc
from ember.errors import EngineError, InvalidFileError, OptionError
from ember.ggml_types import KV_CACHE_TYPES
from ember.gguf import validate_model


@dataclass
class MemoryReport:
    """What a user needs to pick a quant and a context that fit (bytes)."""

    model_bytes: int = 0
    kv_cache_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    rss_bytes: int = 0
    gpu_bytes: int = 0
    details: dict[str, int] = field(default_factory=dict)
    # Bytes per device and kind: {"CPU": {"model": n, "kv_cache": n, "compute": n,
    # "output": n}, "RPC0[10.0.0.2:50052]": {...}}: what went where.
    devices: dict[str, dict[str, int]] = field(default_factory=dict)

    def plus(self, other: MemoryReport) -> MemoryReport:
        """Both reports' memory (two contexts of one process: a model and its draft model)."""
        devices = {d: dict(kinds) for d, kinds in self.devices.items()}
        for d, kinds in other.devices.items():
            totals = devices.setdefault(d, {})
            for kind, n in kinds.items():
                totals[kind] = totals.get(kind, 0) + n
        return MemoryReport(
            model_bytes=self.model_bytes + other.model_bytes,
            kv_cache_bytes=self.kv_cache_bytes + other.kv_cache_bytes,
            compute_bytes=self.compute_bytes + other.compute_bytes,
            output_bytes=self.output_bytes + other.output_bytes,
            rss_bytes=max(self.rss_bytes, other.rss_bytes),
            gpu_bytes=self.gpu_bytes + other.gpu_bytes,
            details={**{f"draft {k}": v for k, v in other.details.items()}, **self.details},
            devices=devices,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_bytes": self.model_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "rss_bytes": self.rss_bytes,
            "gpu_bytes": self.gpu_bytes,
            "devices": self.devices,
        }


def _validated(paths: list[Path]) -> list[Path]:
    for p in paths:
        if not p.exists():
            raise InvalidFileError(f"{p}: no such file")
        if p.is_dir():
            raise InvalidFileError(f"{p}: is a directory, not a GGUF file (convert it first: ember convert {p})")
    return validate_model(paths if len(paths) > 1 else paths[0])


class LoadedModel:
    """Weights and vocabulary of one model, plus the LoRA adapters to apply.

    ``paths`` is one GGUF, any shard of a split model, or an explicit list of
    shards (any naming). Everything is validated before llama.cpp sees it.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        options: dict[str, Any] | None = None,
        *,
        lora: Sequence[tuple[str | os.PathLike[str], float]] | None = None,
    ) -> None:
        llama.ensure_backend()
        path_list = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not path_list:
            raise InvalidFileError("no model file given")
        self.paths = _validated(path_list)
        self.options = opts.merged(opts.coerce_all({k: v for k, v in (options or {}).items() if k in opts.LOAD_OPTIONS}))
        self._lock = threading.Lock()
        params = lc.llama_model_default_params()
        num_gpu = self.options["num_gpu"]
        params.n_gpu_layers = 999 if num_gpu < 0 else num_gpu
        params.main_gpu = self.options["main_gpu"]
        mmap, mlock = self.options["use_mmap"], self.options["use_mlock"]
        params.load_mode = (
            lc.LLAMA_LOAD_MODE_MMAP_MLOCK if mmap and mlock
            else lc.LLAMA_LOAD_MODE_MMAP if mmap
            else lc.LLAMA_LOAD_MODE_MLOCK if mlock
            else lc.LLAMA_LOAD_MODE_NONE
        )
        # use_repack off: plain CPU buffers, the kernels RPC workers run (--no-repack).
        params.use_extra_bufts = self.options["use_repack"]
        self.placement = rpc.placement_for(self.paths, self.options)
        if self.placement is not None:
            self.placement.apply(params)
        with llama.capture_log() as lines:
            if len(self.paths) == 1:
                ptr = lc.llama_model_load_from_file(str(self.paths[0]).encode(), params)
            else:
                arr = (ctypes.c_char_p * len(self.paths))(*[str(p).encode() for p in self.paths])
                ptr = lc.llama_model_load_from_splits(arr, len(self.paths), params)
        if not ptr:
            if self.placement is not None:
                rpc.release(self.placement.endpoints)
            raise EngineError(f"{self.paths[0]}: llama.cpp could not load the model: {llama.last_error(lines)}")
        self.ptr = ptr
        self._load_log = lines
        self.buffers = llama.buffer_sizes(lines)  # the weights' buffers per device
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(ptr)
        self.n_embd = lc.llama_model_n_embd(ptr)
        self.n_layer = lc.llama_model_n_layer(ptr)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = lc.llama_vocab_bos(self.vocab)
        self.eos_id = lc.llama_vocab_eos(self.vocab)
        self.adapters: list[tuple[Any, float, Path]] = []
        for path, scale in lora or []:
            self.add_lora(path, scale)
        self._piece_cache: dict[int, bytes] = {}

    # --- lifecycle -------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for adapter, _, _ in self.adapters:
                lc.llama_adapter_lora_free(adapter)
            self.adapters = []
            if getattr(self, "ptr", None):
                lc.llama_model_free(self.ptr)
                self.ptr = None
                if self.placement is not None:
                    rpc.release(self.placement.endpoints)

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def add_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> None:
        """Load a GGUF LoRA adapter (``ember convert-lora`` makes them)."""
        p = Path(path)
        if not p.is_file():
            raise InvalidFileError(f"{p}: no such adapter file")
        validate_model(p)
        with llama.capture_log() as lines:
            adapter = lc.llama_adapter_lora_init(self.ptr, str(p).encode())
        if not adapter:
            raise InvalidFileError(f"{p}: llama.cpp rejected the LoRA adapter: {llama.last_error(lines)}")
        self.adapters.append((adapter, float(scale), p))

    # --- metadata --------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or "unknown"

    @property
    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    @property
    def n_params(self) -> int:
        return int(lc.llama_model_n_params(self.ptr))

    @property
    def size_bytes(self) -> int:
        return int(lc.llama_model_size(self.ptr))

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def kv_bytes_per_token(self, kv_cache_type: str = "f16") -> float:
        """KV cache bytes one token needs (all layers, keys and values)."""
        arch = self.architecture
        n_head = int(self.meta(f"{arch}.attention.head_count") or 1) or 1
        n_head_kv = int(lc.llama_model_n_head_kv(self.ptr) or n_head)
        head_dim = self.n_embd // n_head
        k_len = int(self.meta(f"{arch}.attention.key_length") or head_dim)
        v_len = int(self.meta(f"{arch}.attention.value_length") or head_dim)
        kv_type = KV_CACHE_TYPES.get(kv_cache_type) or KV_CACHE_TYPES["f16"]
        return self.n_layer * n_head_kv * (k_len + v_len) * kv_type.type_size / kv_type.block_size

    def default_num_ctx(self) -> int:
        return min(4096, self.n_ctx_train) if self.n_ctx_train > 0 else 4096

    # --- tokens ----------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                raise EngineError("tokenization failed")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        key = token if not special else -token - 1
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        piece = buf.raw[:n]
        self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        return [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.vocab, t)]

    def token_text(self, token: int) -> str:
        raw = lc.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    # --- contexts --------------------------------------------------------
    def new_context(
        self,
        n_ctx: int,
        *,
        n_seq_max: int = 1,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        embeddings: bool = False,
        pooled: bool = True,
        options: dict[str, Any] | None = None,
    ) -> Context:
        return Context(self, n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, n_ubatch=n_ubatch, embeddings=embeddings,
                       pooled=pooled, options=options)

    @property
    def causal(self) -> bool:
        """Whether tokens attend only to earlier ones (False for BERT-style encoders)."""
        return (self.meta(f"{self.architecture}.attention.causal") or "true").lower() != "false"

    def logits(self, tokens: list[int], n_ctx: int | None = None) -> np.ndarray:
        """Logits for every position of ``tokens`` (float32, shape (n, n_vocab)),
        evaluated from an empty cache: for evaluation and tests."""
        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        ctx_len = max(n_ctx or 0, n)
        ctx = self.new_context(ctx_len, n_batch=min(ctx_len, 2048))
        try:
            return ctx.eval_all_logits(tokens)
        finally:
            ctx.close()


class Context:
    """One llama.cpp context (KV cache for ``n_seq_max`` sequences) and a batch."""

    def __init__(
        self,
        model: LoadedModel,
        n_ctx: int,
        *,
        n_seq_max: int = 1,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        embeddings: bool = False,
        pooled: bool = True,
        options: dict[str, Any] | None = None,
    ) -> None:
        o = model.options if options is None else opts.merged(model.options, opts.coerce_all(options))
        self.model = model
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        self.n_batch = n_batch or o["num_batch"] or 512
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, n_ubatch or 512)
        params.n_seq_max = n_seq_max
        threads = o["num_thread"] or llama.physical_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.embeddings = embeddings
        params.no_perf = False
        # One KV stream per sequence: a sequence's cells sit where they would if it
        # ran alone, so batched results are the same as single ones. Sliding-window
        # models keep full caches so cached prefixes can be reused.
        params.kv_unified = False
        params.swa_full = True
        if embeddings:
            params.pooling_type = lc.LLAMA_POOLING_TYPE_MEAN if pooled else lc.LLAMA_POOLING_TYPE_NONE
        kv_type = KV_CACHE_TYPES.get(o["kv_cache_type"])
        if kv_type is None:
            raise OptionError(f"kv_cache_type {o['kv_cache_type']!r} is not supported")
        params.type_k = kv_type.id
        params.type_v = kv_type.id
        # None: llama.cpp's own choice (AUTO: on where the backend supports it),
        # which is also what its tools (llama-bench, llama-server) use.
        fa = o["flash_attn"]
        params.flash_attn_type = -1 if fa is None else int(bool(fa))
        _check_memory(model, n_ctx, o["kv_cache_type"], o["num_gpu"])
        with llama.capture_log() as lines:
            ptr = lc.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise EngineError(
                f"could not create a context of {n_ctx} tokens for {model.paths[0].name} "
                f"({llama.last_error(lines)}); try a smaller num_ctx"
            )
        self.ptr = ptr
        self.n_ctx = lc.llama_n_ctx(ptr)
        self.n_seq_max = n_seq_max
        self.memory = lc.llama_get_memory(ptr)
        self.buffers = llama.buffer_sizes(lines)
        if model.adapters:
            n = len(model.adapters)
            arr = (lc.llama_adapter_lora_p_ctypes * n)(*[a for a, _, _ in model.adapters])
            scales = (ctypes.c_float * n)(*[s for _, s, _ in model.adapters])
            if lc.llama_set_adapters_lora(ptr, arr, n, scales) != 0:
                raise EngineError("llama.cpp could not apply the LoRA adapters")
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, pos, seq_id, want_logits) entries in one llama_decode."""
        b = self.batch
        n = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = n
        rc = lc.llama_decode(self.ptr, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc}): " + ("the context is full" if rc == 1 else "see EMBER_DEBUG=1"))

    def logits_row(self, i: int) -> np.ndarray:
        return self.logits_view(i).copy()

    def logits_view(self, i: int) -> np.ndarray:
        """Row ``i`` of the last decode's logits, in llama.cpp's buffer (valid until the next decode)."""
        ptr = lc.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def eval_all_logits(self, tokens: list[int], seq: int = 0) -> np.ndarray:
        out = np.empty((len(tokens), self.model.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self.decode([(t, start + j, seq, True) for j, t in enumerate(chunk)])
            for j in range(len(chunk)):
                out[start + j] = self.logits_row(j)
        return out

    def sequence_embedding(self, seq: int) -> np.ndarray:
        """The pooled embedding of a sequence (contexts made with embeddings=True)."""
        ptr = lc.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise EngineError("this model gives no pooled embeddings")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).astype(np.float32)

    def mean_embedding(self, tokens: list[int], seq: int = 0) -> np.ndarray:
        """The mean of the final hidden states of ``tokens`` (mean pooling,
        contexts made with embeddings=True, pooled=False), decoded ``n_batch``
        at a time: llama.cpp's own pooling sees one micro-batch only, so inputs
        longer than that would be pooled over their last part."""
        total = np.zeros(self.model.n_embd, dtype=np.float64)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self.decode([(t, start + j, seq, True) for j, t in enumerate(chunk)])
            ptr = lc.llama_get_embeddings(self.ptr)
            if not ptr:
                raise EngineError("this model gives no embeddings")
            total += np.ctypeslib.as_array(ptr, shape=(len(chunk), self.model.n_embd)).sum(axis=0, dtype=np.float64)
        return (total / max(len(tokens), 1)).astype(np.float32)

    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> bool:
        return bool(lc.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int = -1) -> None:
        lc.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    def memory_report(self) -> MemoryReport:
        kv = sum(v for k, v in self.buffers.items() if k.endswith(" KV") or k.endswith(" RS"))
        compute = sum(v for k, v in self.buffers.items() if k.endswith(" compute"))
        output = sum(v for k, v in self.buffers.items() if k.endswith(" output"))
        gpu = sum(v for k, v in self.buffers.items() if not k.startswith(("CPU", "RPC")))
        return MemoryReport(
            model_bytes=self.model.size_bytes,
            kv_cache_bytes=kv,
            compute_bytes=compute,
            output_bytes=output,
            rss_bytes=psutil.Process().memory_info().rss,
            gpu_bytes=gpu,
            details=dict(self.buffers),
            devices=llama.device_totals({**self.model.buffers, **self.buffers}),
        )


def _check_memory(model: LoadedModel, n_ctx: int, kv_cache_type: str, num_gpu: int) -> None:
    """Refuse a context whose KV cache does not fit this model's share of free
    memory (EMBER_KV_BUDGET, a fraction of it: other models and requests need
    the rest; llama.cpp would try to allocate it and the process could be killed)."""
    if num_gpu != 0 and llama.supports_gpu_offload():
        return  # the KV cache may live on the GPU; llama.cpp reports failures there
    need = model.kv_bytes_per_token(kv_cache_type) * n_ctx
    available = psutil.virtual_memory().available
    fraction = settings.kv_budget()
    if need > fraction * available:
        raise OptionError(
            f"a context of {n_ctx} tokens needs about {need / 2**30:.1f} GiB for the KV cache, more than the "
            f"{fraction * available / 2**30:.1f} GiB it may take (EMBER_KV_BUDGET={fraction:g} of the "
            f"{available / 2**30:.1f} GiB of free memory); lower num_ctx or use kv_cache_type q8_0"
        )
