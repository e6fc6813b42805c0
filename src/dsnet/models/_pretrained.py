"""Released weights behind ``timm.create_model(name, pretrained=True)``: download, verify, convert, cache, load.

The zoo's releases are foreign files (PaddleClas ``.pdparams``, official PyTorch ``.pth.tar`` training checkpoints in
their authors' names), so timm's own loader cannot use them. Every family's ``_create_*`` function passes its keyword
arguments through :func:`pretrained_kwargs`, which, when ``pretrained=True`` and the user gave no file:

1. takes the release URL from the model's pretrained cfg (``url``; a ``#sha256=<hex>`` fragment, pip's convention,
   gives the file's hash where the publisher lists one);
2. downloads it with plain :mod:`urllib` into ``torch.hub.get_dir()/checkpoints/dsnet/`` (so ``TORCH_HOME`` is
   respected) through ``<file>.partial``: an interrupted download resumes with an HTTP ``Range`` request when the
   server honours it and restarts otherwise (torch.hub's ``download_url_to_file`` cannot resume); the size announced
   by the server and the hash, where known, are checked before the file takes its final name;
3. converts it with the release converter, :func:`dsnet.convert.zoo.convert_checkpoint` (restricted loaders: no
   pickled code runs; every key and shape is checked), into ``<file stem>.<model>.safetensors`` next to it. The
   models sit below the converters, so they do not import it: ``import dsnet`` hands it over once
   (:func:`set_release_converter`);
4. hands that file to timm's ``build_model_with_cfg`` as ``pretrained_cfg_overlay=dict(file=...)``.

A later call finds the converted file and touches no network. Without network the error names the URL, the file to
fetch by hand, where to put it, and the ``dsnet convert`` command that does the same by hand.

Environment: ``DSNET_WEIGHTS_BASE_URL`` replaces everything before the file name of every release URL (a mirror,
or a local server in tests): ``$DSNET_WEIGHTS_BASE_URL/transx-t.pth.tar``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dsnet._io import replace_atomically
from dsnet.errors import DSNetError

__all__ = [
    "BASE_URL_ENV",
    "ReleaseConverter",
    "WeightsDownloadError",
    "fetch_release",
    "pretrained_kwargs",
    "set_release_converter",
    "weights_dir",
]

#: Environment variable: a base URL that replaces the folder of every release URL (mirrors, tests).
BASE_URL_ENV = "DSNET_WEIGHTS_BASE_URL"

_CHUNK = 1 << 20
_ATTEMPTS = 3  # connections per call while the transfer keeps being cut; each one resumes where the last stopped
_TIMEOUT_S = 60.0


class WeightsDownloadError(OSError):
    """A release could not be downloaded (no network, HTTP error, transfer cut); the message says what to do."""


def weights_dir() -> Path:
    """Where releases and their conversions are cached: ``torch.hub.get_dir()/checkpoints/dsnet``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / "dsnet"


def _layout_of(name: str) -> str:
    return "paddle" if name.endswith(".pdparams") else "torch"


def _stem(name: str) -> str:
    for suffix in (".pdparams", ".pth.tar", ".pth", ".tar", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _split_url(url: str) -> tuple[str, str | None]:
    """(download URL, sha256 or None): a ``#sha256=<hex>`` fragment gives the hash; ``BASE_URL_ENV`` the folder."""
    base, _, fragment = url.partition("#")
    sha256 = None
    for part in fragment.split("&"):
        key, _, value = part.partition("=")
        if key == "sha256" and value:
            sha256 = value.lower()
    mirror = os.environ.get(BASE_URL_ENV, "").strip()
    if mirror:
        base = f"{mirror.rstrip('/')}/{_file_name(base)}"
    return base, sha256


def _file_name(url: str) -> str:
    return urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path)) or "weights"


def _manual_route(model: str, url: str, dest: Path) -> str:
    layout = _layout_of(dest.name)
    return (
        f"fetch {url} by hand and put it at {dest} (the next call verifies, converts and caches it), or convert it "
        f"yourself: `dsnet convert {layout} {dest.name} {model}.safetensors --model {model}`, then "
        f"timm.create_model({model!r}, pretrained=True, pretrained_cfg_overlay=dict(file='{model}.safetensors'))"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; released when the process dies), so that several
    processes (e.g. the ranks of a distributed run) do not write the same ``.partial`` file at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows: no lock)
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """``bytes START-END/TOTAL`` → (START, TOTAL); ``bytes */TOTAL`` (a 416's) → (None, TOTAL); an unknown TOTAL
    (``*``) is None; None when the header is absent or unparsable."""
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[len("bytes ") :].strip().partition("/")
    start = span.partition("-")[0].strip()
    total = total.strip()
    if not (start.isdigit() or start == "*") or not (total.isdigit() or total == "*"):
        return None
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _transfer(url: str, partial: Path) -> tuple[bool, int, int | None]:
    """One connection: append to ``partial`` from where it ends (``Range``), or rewrite it when the server sends the
    whole file. Returns (complete, bytes now in ``partial``, total size announced by the server or None).

    Raises:
        urllib.error.URLError, http.client.HTTPException, OSError: the connection could not be made at all.
    """
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dsnet (urllib)", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the partial file is whole, or longer than the file
            span = _content_range(err.headers.get("Content-Range"))
            total = span[1] if span else None
            err.close()
            if total == have:
                return True, have, total
            partial.unlink()
            return False, 0, total
        raise
    with response:
        total: int | None
        if response.status == 206:
            span = _content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != have:  # a range we did not ask for: start over
                partial.unlink()
                return False, 0, None
            mode, total = "ab", span[1]
        else:  # 200: the server ignores Range, the whole file follows
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(partial, mode) as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException):  # cut mid-transfer (reset, timeout, incomplete chunk)
                    return False, have, total
                if not chunk:  # the end, or the server closed early: the size tells which
                    break
                out.write(chunk)  # a full disk is the caller's OSError, not a cut transfer
                have += len(chunk)
    if total is not None and have > total:
        partial.unlink()
        return False, 0, total
    return total is None or have == total, have, total


def _download(model: str, url: str, dest: Path, sha256: str | None) -> None:
    """``url`` → ``dest`` through ``dest.partial`` (resumed across calls); size and hash checked before the rename."""
    partial = dest.with_name(dest.name + ".partial")
    resumed = partial.exists() and partial.stat().st_size > 0
    print(f"{model}: {'resuming' if resumed else 'downloading'} {url} to {dest}", file=sys.stderr)
    complete, have, total = False, 0, None
    for _ in range(_ATTEMPTS):
        try:
            complete, have, total = _transfer(url, partial)
        except urllib.error.HTTPError as err:
            raise WeightsDownloadError(
                f"{model}: could not download {url} (HTTP {err.code} {err.reason}); {_manual_route(model, url, dest)}"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise WeightsDownloadError(
                f"{model}: could not download {url} (no network? {reason}); {_manual_route(model, url, dest)}"
            ) from None
        if complete:
            break
    if not complete:
        of = f" of {total}" if total is not None else ""
        raise WeightsDownloadError(
            f"{model}: the download of {url} was cut {_ATTEMPTS} times ({have}{of} bytes so far, kept in {partial}); "
            f"call again to resume, or {_manual_route(model, url, dest)}"
        )
    if sha256 is not None:
        found = _sha256(partial)
        if found != sha256:
            partial.unlink()
            raise DSNetError(
                f"{model}: the file downloaded from {url} has sha256 {found}, the release's is {sha256}: deleted it "
                f"(not cached); call again to download it anew, or {_manual_route(model, url, dest)}"
            )
    replace_atomically(partial, dest)


def _converted_is_usable(path: Path, model: str) -> bool:
    """True when ``path`` is a readable safetensors file converted for ``model`` (reads only its header)."""
    if not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("dsnet_model") == model
    except (SafetensorError, OSError):  # an unreadable header: convert again
        return False


class ReleaseConverter(Protocol):
    """Converts a downloaded release ``source`` into the safetensors file ``output`` for ``model``."""

    def __call__(
        self, source: Path, output: Path, *, layout: str, model: str, entry: str | None = None
    ) -> object: ...  # pragma: no cover


_release_converter: ReleaseConverter | None = None


def set_release_converter(converter: ReleaseConverter) -> None:
    """Install the converter :func:`fetch_release` uses (``dsnet/__init__.py`` installs
    :func:`dsnet.convert.zoo.convert_checkpoint`)."""
    global _release_converter
    _release_converter = converter


def fetch_release(model: str, url: str, *, entry: str | None = None) -> Path:
    """The release at ``url`` converted for ``model``: a cached ``.safetensors`` file, downloaded and converted the
    first time (see the module docstring), found offline afterwards.

    Args:
        model: the timm name of our model (the conversion target), e.g. ``"transxnet_t"``.
        url: the release URL from the model's pretrained cfg (``.pdparams`` → Paddle layout, else PyTorch);
            an optional ``#sha256=<hex>`` fragment is checked.
        entry: the entry of a training checkpoint to convert (e.g. ``"state_dict_ema"``); None: the converter's
            default (the trained weights, ``state_dict`` for TransXNet, as the official code evaluates them).

    Raises:
        WeightsDownloadError: no network, an HTTP error or a transfer cut too often (the message names the URL,
            the file to fetch by hand, where to put it and the ``dsnet convert`` command).
        DSNetError: the file has the wrong hash or is not a checkpoint of ``model`` (it is deleted, not cached).
    """
    if _release_converter is None:  # only when dsnet's package root was bypassed
        raise RuntimeError("no release converter installed: import dsnet (it installs dsnet.convert.zoo's)")
    url, sha256 = _split_url(url)
    folder = weights_dir()
    dest = folder / _file_name(url)
    converted = folder / f"{_stem(dest.name)}.{model}{f'.{entry}' if entry else ''}.safetensors"
    if _converted_is_usable(converted, model):
        return converted
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f"{dest.name}.lock"):
        if _converted_is_usable(converted, model):  # another process finished while we waited
            return converted
        if dest.is_file() and sha256 is not None and _sha256(dest) != sha256:
            dest.unlink()  # e.g. a file put there by hand that is not the release
        if not dest.is_file():
            _download(model, url, dest, sha256)
        try:
            _release_converter(dest, converted, layout=_layout_of(dest.name), model=model, entry=entry)
        except (ValueError, FileNotFoundError) as err:
            if sha256 is None and entry is None:  # nothing vouches for the file: do not keep it as the release
                dest.unlink(missing_ok=True)
                kept = "deleted it from the cache"
            elif entry is not None:
                kept = f"kept in the cache: the error may be the entry asked for, {entry!r}"
            else:
                kept = "the file has the release's hash, so it stays cached"
            raise DSNetError(
                f"{model}: {dest} (from {url}) could not be converted ({kept}): {err}. "
                f"Manual route: {_manual_route(model, url, dest)}"
            ) from None
    print(f"{model}: converted {dest.name} to {converted}", file=sys.stderr)
    return converted


def _no_release_error(model: str, cfg: Any, reason: str | None, layout: str) -> DSNetError:
    origin = getattr(cfg, "origin_url", None)
    why = reason or f"no weights were released for {model}"
    fetch = f"get the file by hand ({origin})" if origin else "take a checkpoint of your own"
    return DSNetError(
        f"{model}: pretrained=True has nothing to download: {why}. To load weights anyway, {fetch}, convert it with "
        f"`dsnet convert {layout} <file> {model}.safetensors --model {model}` and pass "
        f"pretrained_cfg_overlay=dict(file='{model}.safetensors')"
    )


def pretrained_kwargs(
    variant: str, pretrained: bool, kwargs: dict[str, Any], *, layout: str, no_release: str | None = None
) -> dict[str, Any]:
    """``kwargs`` for timm's ``build_model_with_cfg``, with the release of ``variant`` resolved to a local file.

    Unchanged when ``pretrained`` is False or the user already gave weights (``pretrained_cfg_overlay`` /
    ``pretrained_cfg`` with ``file`` or ``state_dict``, or a Hugging Face id). Otherwise the pretrained cfg's ``url``
    (the tag's, e.g. ``dsnet_tiny.paddle_in1k``) is fetched and converted by :func:`fetch_release` and passed on as
    ``pretrained_cfg_overlay=dict(file=<converted .safetensors>)``; ``pretrained_cfg_overlay=dict(entry=NAME)``
    converts another entry of the release's training checkpoint (e.g. ``"state_dict_ema"``).

    Args:
        variant: the architecture name (without tag).
        pretrained: timm's ``pretrained`` argument.
        kwargs: the builder's keyword arguments (not modified).
        layout: ``"paddle"`` or ``"torch"``: how ``dsnet convert`` reads this family's releases (for messages).
        no_release: why there is nothing to download when the cfg has no ``url`` (e.g. "the release is a Google
            Drive page"); the error adds the manual route.

    Raises:
        DSNetError: ``pretrained=True`` and the cfg has no ``url`` (the message names the manual route); or as
            :func:`fetch_release`.
        WeightsDownloadError: as :func:`fetch_release`.
    """
    if not pretrained:
        return kwargs
    from timm.models import PretrainedCfg, resolve_pretrained_cfg

    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("file") or overlay.get("state_dict"):
        return kwargs  # the user's own weights (other overlay keys, e.g. an entry to read, are not timm's)
    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay={k: v for k, v in overlay.items() if k in known},
    )
    if cfg.file or cfg.state_dict or cfg.hf_hub_id:
        return kwargs
    if not cfg.url:
        raise _no_release_error(variant, cfg, no_release, layout)
    url = cfg.url if isinstance(cfg.url, str) else cfg.url[0]
    entry = overlay.pop("entry", None)  # which entry of the release's training checkpoint to convert
    overlay["file"] = os.fspath(fetch_release(variant, url, entry=entry))
    return {**kwargs, "pretrained_cfg_overlay": overlay}
