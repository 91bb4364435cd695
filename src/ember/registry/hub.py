"""Pulls from Hugging Face (or ModelScope): hub repositories into the registry.

References (the host is what makes them hub references; a bare ``user/repo``
is an Ollama name, see :mod:`ember.registry.pull`):

* ``hf.co/{user}/{repo}[:{quant}]`` (also ``huggingface.co/...``): the GGUF
  file(s) of that quantization (matched case-insensitively in file names,
  e.g. ``Q4_K_M``; default ``Q4_K_M`` or the repository's only GGUF model),
  with every shard of a split quant, plus a multimodal projector
  (``mmproj*.gguf``) if the repository has one. Stored as ``hf.co/user/repo:quant``
  like Ollama does. A repository without GGUF files (safetensors or
  pytorch_model*.bin) is downloaded and converted, ``quant`` then being the
  output type (default: the checkpoint's own 16-bit type).
* ``modelscope.cn/{user}/{repo}[:{quant}]``: the same from ModelScope.

Sources and mirrors (for users who cannot reach Hugging Face):
``HF_ENDPOINT`` (e.g. ``https://hf-mirror.com``) and ``HF_TOKEN`` are honoured
as ``huggingface_hub`` does; ``EMBER_PULL_SOURCE=modelscope`` sends ``hf.co/...``
references to ModelScope, whose address is ``MODELSCOPE_ENDPOINT`` (default
``https://modelscope.cn``; token ``MODELSCOPE_API_TOKEN``).

Downloads go to ``$EMBER_MODELS/downloads/`` and resume after an interruption;
files with a published sha256 are verified before anything is registered; the
finished files are moved (not copied) into ``blobs/``.

``huggingface_hub`` and ``httpx`` are imported where they are used: together
they take about half a second to import, which every ``ember`` command would
pay otherwise (see also :mod:`ember.registry.pull`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from ember import settings
from ember.errors import DigestMismatchError, DownloadError, EmberError, InvalidFileError
from ember.progress import ProgressCallback
from ember.quantize import parse_quant_type
from ember.registry import assemble, derive, ggufmeta, store
from ember.registry.names import parse_hub_ref, parse_name

DEFAULT_QUANT = "Q4_K_M"
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_HF_WEIGHT_PATTERNS = (re.compile(r"(^|/)[^/]*\.safetensors$"), re.compile(r"(^|/)pytorch_model[^/]*\.bin$"))
_HF_AUX = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\.json|vocab\.txt|merges\.txt|tokenizer\.model|[^/]*\.tiktoken|chat_template\.jinja|"
    r"chat_template\.json|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json|preprocessor_config\.json)$"
)


@dataclass
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None  # hex, when the hub publishes it (LFS files)


# ---------------------------------------------------------------- file selection


def _quant_re(quant: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(quant) + r"(?![A-Za-z0-9_])", re.IGNORECASE)


def _group_key(path: str) -> str:
    return _SHARD.sub(".gguf", path)


def select_gguf(files: list[RemoteFile], quant: str | None, repo: str) -> tuple[list[RemoteFile], list[RemoteFile]]:
    """(model shards in order, projector files) for ``quant``."""
    ggufs = [f for f in files if f.path.lower().endswith(".gguf")]
    projectors = [f for f in ggufs if "mmproj" in f.path.lower().rsplit("/", 1)[-1]]
    models = [f for f in ggufs if f not in projectors]
    groups: dict[str, list[RemoteFile]] = {}
    for f in models:
        groups.setdefault(_group_key(f.path), []).append(f)
    if quant:
        chosen = {k: v for k, v in groups.items() if _quant_re(quant).search(k)}
        wanted = quant
    else:
        chosen = {k: v for k, v in groups.items() if _quant_re(DEFAULT_QUANT).search(k)}
        wanted = DEFAULT_QUANT
        if not chosen and len(groups) == 1:
            chosen = groups
    available = ", ".join(sorted(k.rsplit("/", 1)[-1] for k in groups)) or "none"
    if not chosen:
        raise DownloadError(f"{repo} has no GGUF file for {wanted}; available: {available}; pick one with {repo}:QUANT")
    if len(chosen) > 1:
        raise DownloadError(f"{repo}: several GGUF files match {wanted}: {', '.join(sorted(chosen))}; give a more precise :QUANT")
    shards = sorted(next(iter(chosen.values())), key=lambda f: f.path)
    m = _SHARD.search(shards[0].path)
    if m and len(shards) != int(m.group(2)):
        raise DownloadError(f"{repo}: {shards[0].path} is split in {int(m.group(2))} files but the repository has {len(shards)}")
    proj: list[RemoteFile] = []
    if projectors:
        proj = [sorted(projectors, key=lambda f: (0 if "f16" in f.path.lower() else 1, f.path))[0]]
    return shards, proj


def select_checkpoint(files: list[RemoteFile], repo: str) -> list[RemoteFile]:
    paths = [f.path for f in files]
    weights = [f for f in files if _HF_WEIGHT_PATTERNS[0].search(f.path) and "/" not in f.path]
    if not weights:
        weights = [f for f in files if _HF_WEIGHT_PATTERNS[1].search(f.path) and "/" not in f.path]
    if not weights or "config.json" not in paths:
        raise DownloadError(f"{repo} has neither GGUF files nor a Hugging Face checkpoint (config.json + safetensors); nothing to pull")
    return weights + [f for f in files if _HF_AUX.match(f.path)]


# ---------------------------------------------------------------- sources


class _Source:
    def list_files(self, repo: str) -> list[RemoteFile]:
        raise NotImplementedError

    def download(self, repo: str, f: RemoteFile, dest_dir: Path, progress: ProgressCallback | None) -> Path:
        raise NotImplementedError


class _HuggingFace(_Source):
    def __init__(self) -> None:
        self.endpoint = settings.hf_endpoint()
        self.token = settings.hf_token()

    def list_files(self, repo: str) -> list[RemoteFile]:
        api = HfApi(endpoint=self.endpoint, token=self.token)
        with _hub_errors(repo, self.endpoint):
            out = []
            for f in api.list_repo_tree(repo, recursive=True):
                if isinstance(f, RepoFile):
                    lfs = f.lfs
                    sha = None
                    if lfs is not None:
                        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
                    out.append(RemoteFile(f.path, f.size, sha))
            return out

    def download(self, repo: str, f: RemoteFile, dest_dir: Path, progress: ProgressCallback | None) -> Path:
        with _hub_errors(repo, self.endpoint):
            path = hf_hub_download(
                repo,
                f.path,
                local_dir=dest_dir,
                endpoint=self.endpoint,
                token=self.token,
                tqdm_class=_tqdm_class(progress, f"pulling {f.path.rsplit('/', 1)[-1]}") if progress else None,
            )
        return Path(path)


@contextlib.contextmanager
def _hub_errors(repo: str, endpoint: str) -> Iterator[None]:
    try:
        yield
    except EmberError:
        raise
    except Exception as e:  # huggingface_hub / httpx errors -> one line
        name = type(e).__name__
        if "RepositoryNotFound" in name:
            msg = f"repository {repo} not found at {endpoint} (private? set HF_TOKEN)"
        elif "EntryNotFound" in name:
            msg = f"file not found in {repo} at {endpoint}"
        elif "GatedRepo" in name:
            msg = f"{repo} is gated: accept its license on the hub and set HF_TOKEN"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else name
            msg = f"cannot download {repo} from {endpoint}: {first} (set HF_ENDPOINT for a mirror, or EMBER_PULL_SOURCE=modelscope)"
        raise DownloadError(msg) from None


def _tqdm_class(progress: ProgressCallback, label: str) -> type:
    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self._done = int(kwargs.get("initial") or 0)
            self._total = int(kwargs.get("total") or 0)
            progress(label, self._done, self._total)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            progress(label, self._done, self._total)
            return None

    return _Bar


class _ModelScope(_Source):
    """ModelScope's public file API (list + download, resumed with Range)."""

    def __init__(self) -> None:
        self.endpoint = settings.modelscope_endpoint()
        token = settings.modelscope_token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def list_files(self, repo: str) -> list[RemoteFile]:
        url = f"{self.endpoint}/api/v1/models/{repo}/repo/files"
        try:
            r = httpx.get(url, params={"Revision": "master", "Recursive": "true"}, headers=self.headers,
                          follow_redirects=True, timeout=30)
        except httpx.HTTPError as e:
            raise DownloadError(f"cannot reach ModelScope at {self.endpoint}: {e}") from None
        if r.status_code == 404:
            raise DownloadError(f"repository {repo} not found at {self.endpoint}")
        if r.status_code != 200:
            raise DownloadError(f"ModelScope answered {r.status_code} listing {repo}")
        try:
            items = r.json()["Data"]["Files"]
        except (ValueError, KeyError, TypeError):
            raise DownloadError(f"ModelScope returned an unexpected file list for {repo}") from None
        return [
            RemoteFile(it["Path"], it.get("Size"), (it.get("Sha256") or None))
            for it in items
            if it.get("Type", "blob") == "blob"
        ]

    def download(self, repo: str, f: RemoteFile, dest_dir: Path, progress: ProgressCallback | None) -> Path:
        dest = dest_dir / f.path
        if dest.is_file() and f.size is not None and dest.stat().st_size == f.size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".incomplete")
        have = part.stat().st_size if part.exists() else 0
        headers = dict(self.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        url = f"{self.endpoint}/api/v1/models/{repo}/repo"
        label = f"pulling {f.path.rsplit('/', 1)[-1]}"
        try:
            with httpx.stream("GET", url, params={"Revision": "master", "FilePath": f.path}, headers=headers,
                              follow_redirects=True, timeout=60) as r:
                if r.status_code == 416 and f.size == have:
                    pass
                elif r.status_code not in (200, 206):
                    raise DownloadError(f"ModelScope answered {r.status_code} for {repo}/{f.path}")
                else:
                    mode = "ab" if r.status_code == 206 else "wb"
                    done = have if r.status_code == 206 else 0
                    with open(part, mode) as out:
                        for chunk in r.iter_bytes():  # as received, so a cut keeps what arrived
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(label, done, f.size or 0)
        except httpx.HTTPError as e:
            raise DownloadError(f"download of {repo}/{f.path} from {self.endpoint} failed: {e}; run the pull again to resume") from None
        if f.size is not None and part.stat().st_size != f.size:
            raise DownloadError(f"{repo}/{f.path}: got {part.stat().st_size} bytes, expected {f.size}; run the pull again to resume")
        os.replace(part, dest)
        return dest


def _source(name: str) -> _Source:
    return _ModelScope() if name == "modelscope" else _HuggingFace()


# ---------------------------------------------------------------- pull


def _safe_path(path: str) -> bool:
    """A hub's file list is untrusted: only plain relative paths are downloaded."""
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not path.startswith(("/", "\\")) and ":" not in path and all(p not in ("", ".", "..") for p in parts)


def _safe_dirname(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _verify(path: Path, f: RemoteFile) -> str | None:
    """Expected digest for :func:`store.add_file` (None when the hub gives none)."""
    if f.size is not None and path.stat().st_size != f.size:
        raise DownloadError(f"{f.path}: downloaded {path.stat().st_size} bytes, expected {f.size}; run the pull again")
    if f.sha256 and re.fullmatch(r"[0-9a-f]{64}", f.sha256):
        return "sha256:" + f.sha256
    return None


def pull(ref: str, progress: ProgressCallback | None = None) -> store.Manifest:
    """Download ``ref`` (see the module doc) and register it; return its manifest."""
    pr = parse_hub_ref(ref)
    src = _source(pr.source)
    files = [f for f in src.list_files(pr.repo) if _safe_path(f.path)]
    staging = store.downloads_dir() / pr.source / _safe_dirname(pr.repo.replace("/", "--"))
    staging.mkdir(parents=True, exist_ok=True)
    name = parse_name(pr.name)
    if any(f.path.lower().endswith(".gguf") for f in files):
        shards, projectors = select_gguf(files, pr.quant, pr.repo)
        expected: dict[Path, str] = {}
        got: dict[str, list[Path]] = {"model": [], "projector": []}
        for kind, remote_files in (("model", shards), ("projector", projectors)):
            for f in remote_files:
                p = src.download(pr.repo, f, staging, progress)
                digest = _verify(p, f)
                if digest:
                    expected[p] = digest
                got[kind].append(p)
        infos = _check_ggufs(pr.repo, got["model"], got["projector"])
        with store.writing():
            try:
                layers = assemble.file_layers(store.MEDIA_MODEL, got["model"], progress, move=True, expected=expected)
                layers += assemble.file_layers(store.MEDIA_PROJECTOR, got["projector"], progress, move=True, expected=expected)
            except DigestMismatchError:
                shutil.rmtree(staging, ignore_errors=True)
                raise DownloadError(f"{pr.repo}: a downloaded file does not match the hub's sha256 and was removed; run the pull again") from None
            old = assemble.write_model(name, layers, assemble.model_config(infos))
    else:
        for f in select_checkpoint(files, pr.repo):
            _verify(src.download(pr.repo, f, staging, progress), f)
        outtype = parse_quant_type(pr.quant) if pr.quant else "auto"
        with store.writing(), derive.work_dir() as work:
            model_files, projector_files = derive.convert_checkpoint(staging, work, outtype, progress)
            layers = assemble.file_layers(store.MEDIA_MODEL, model_files, progress, move=True)
            layers += assemble.file_layers(store.MEDIA_PROJECTOR, projector_files, progress, move=True)
            infos = [ggufmeta.read_info(store.blob_path(layer.digest)) for layer in layers[: len(model_files)]]
            old = assemble.write_model(name, layers, assemble.model_config(infos))
    shutil.rmtree(staging, ignore_errors=True)
    store.prune(assemble.replaced_digests(old))
    found = store.find_manifest_path(name)
    if found is None:  # pragma: no cover - removed by a concurrent rm
        raise DownloadError(f"{pr.name} was removed while it was being pulled")
    return store.read_manifest(found)


def _check_ggufs(repo: str, shards: list[Path], projectors: list[Path]) -> list[ggufmeta.GGUFInfo]:
    """Read and check the downloaded files (untrusted) before they are stored."""
    try:
        infos = [ggufmeta.read_info(p) for p in shards]
        ggufmeta.check_model(shards)
        bad = [p.name for p in projectors if not ggufmeta.read_info(p).is_projector]
    except InvalidFileError as e:
        raise DownloadError(f"{repo}: {e}") from None
    if bad or any(i.is_projector or i.is_adapter for i in infos):
        raise DownloadError(f"{repo}: {', '.join(bad) or shards[0].name} is not the kind of GGUF its name says")
    return infos
