"""LMDB latent cache: encode each training image once, reuse it every epoch.

An entry's key is ``sha256(f"{entry}|{encoder_identity}|{view}|{ENTRY_FORMAT}")``:
``entry`` names the pair (:func:`pair_entry`: the image's and the mask's SHA-256, since
the lesion-centred view crops around the mask, so a corrected mask moves it), then the
autoencoder's identity (kind, weights hash, scaling factor) and ``view``, a name for the
deterministic preprocessing the latent was encoded from (e.g. ``"crop256"``). Changing
the data, the encoder or the crop therefore never reuses stale latents; entries of other
encoders or views stay in the same database untouched.

Values are float16 bytes behind a small JSON header (``dtype``, ``shape``). Each
(identity, view) pair also keeps a counter, so ``len()`` needs no scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from siamdiff.errors import SiamdiffError
from siamdiff.models.autoencoder import LatentAutoencoder

DEFAULT_MAP_SIZE = 1 << 30
# LMDB's reader table is sized by whoever creates the lock file: room for every DataLoader
# worker of every rank of several runs sharing one cache (its default is 126).
MAX_READERS = 4096
ENTRY_FORMAT = "image+mask"  # what an entry names; older caches (image only) are never read


def pair_entry(image_sha256: str, mask_sha256: str) -> str:
    """The cache entry of an image-mask pair: both hashes (the view depends on both)."""
    return f"{image_sha256}+{mask_sha256}"


_HEADER_LENGTH = struct.Struct("<I")


def _pack(array: np.ndarray) -> bytes:
    header = json.dumps({"dtype": "float16", "shape": list(array.shape)}).encode()
    return _HEADER_LENGTH.pack(len(header)) + header + array.tobytes()


def _unpack(data: bytes) -> Tensor:
    (length,) = _HEADER_LENGTH.unpack_from(data)
    header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    array = np.frombuffer(data, dtype=header["dtype"], offset=_HEADER_LENGTH.size + length)
    return torch.from_numpy(array.reshape(header["shape"]).astype(np.float32))


def _close_before_fork() -> None:
    """LMDB handles must not cross fork(): closing the parent's copy in the child would also
    end the parent's read transaction and free its reader slot, which a concurrent writer may
    then reuse. So the parent closes them first; each process reopens on its next read."""
    for cache in list(_OPEN):
        cache.close()


class LatentCache:
    """Latents of one (encoder identity, view) pair in an LMDB database directory.

    Readers register in LMDB's lock file, so another run may build into a shared cache
    while this one reads it (a lock-free reader could see pages the writer recycles);
    where the lock file cannot be written (a read-only copy, another user's cache) they read
    without it and warn. The environment opens lazily in each process, is closed before a
    fork and dropped on pickling, so a read-only cache can sit inside a Dataset handed to
    worker processes, whether forked or spawned. LMDB allows one open handle per path and
    process: close a cache before opening the same path again.
    """

    def __init__(
        self,
        path: str | Path,
        encoder_identity: str,
        view: str,
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
    ) -> None:
        self.path = Path(path)
        self.encoder_identity = encoder_identity
        self.view = view
        self.readonly = readonly
        self.map_size = map_size
        namespace = f"{encoder_identity}|{view}|{ENTRY_FORMAT}".encode()
        # 32-byte entry keys can never collide with this longer counter key.
        self._count_key = b"count|" + hashlib.sha256(namespace).digest()
        self._env: lmdb.Environment | None = None
        self._environment()  # fail now, not in the first worker, if the path is bad

    def _environment(self) -> lmdb.Environment:
        if self._env is None:
            self._env = self._open()
            _OPEN.add(self)
        return self._env

    def _open(self) -> lmdb.Environment:
        env = self._open_environment()
        # LMDB maps the file: a page past the end of a truncated copy (an interrupted rsync)
        # kills the process with SIGBUS at its first read, no error to catch.
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        data = self.path / "data.mdb"
        if data.is_file() and data.stat().st_size < needed:
            env.close()
            raise SiamdiffError(
                f"latent cache is truncated ({data.stat().st_size} of {needed} bytes); "
                "delete it to rebuild",
                self.path,
            )
        return env

    def _open_environment(self) -> lmdb.Environment:
        path = str(self.path)
        try:
            if not self.readonly:
                self.path.mkdir(parents=True, exist_ok=True)
                return lmdb.open(
                    path, map_size=self.map_size, readahead=False, max_readers=MAX_READERS
                )
            try:
                return lmdb.open(path, readonly=True, readahead=False, max_readers=MAX_READERS)
            except lmdb.Error as exc:
                if not self.path.is_dir():
                    raise
                warnings.warn(
                    f"{self.path}: latent cache read without LMDB's lock file ({exc}): no run "
                    "may build into it meanwhile",
                    stacklevel=2,
                )
                return lmdb.open(path, readonly=True, lock=False, readahead=False)
        except (lmdb.Error, OSError) as exc:
            raise SiamdiffError(f"cannot open latent cache ({exc})", self.path) from exc

    def _key(self, entry: str) -> bytes:
        return hashlib.sha256(
            f"{entry}|{self.encoder_identity}|{self.view}|{ENTRY_FORMAT}".encode()
        ).digest()

    def _read(self, key: bytes) -> bytes | None:
        env = self._environment()
        try:
            try:
                with env.begin() as txn:
                    return txn.get(key)
            except lmdb.MapResizedError:
                # Another process (a second run sharing the cache) grew the map: adopt its size.
                env.set_mapsize(0)
                with env.begin() as txn:
                    return txn.get(key)
        except lmdb.Error as exc:
            raise SiamdiffError(f"cannot read the latent cache ({exc})", self.path) from exc

    def get(self, entry: str) -> Tensor | None:
        """The float32 latent of this entry, or None when it is not cached."""
        data = self._read(self._key(entry))
        return None if data is None else _unpack(data)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, str) and self._read(self._key(entry)) is not None

    def __len__(self) -> int:
        count = self._read(self._count_key)
        return 0 if count is None else int(count)

    def put_many(self, items: Iterable[tuple[str, Tensor]]) -> int:
        """Store ``(entry, latent)`` pairs in one transaction; returns how many were new.

        Entries already present are kept: an equal key means the same pair, encoder
        and view, hence the same latent. The map doubles until the batch fits.
        """
        if self.readonly:
            raise SiamdiffError("latent cache is open read-only", self.path)
        packed = []
        for sha, latent in items:
            array = latent.detach().to("cpu", torch.float16).contiguous().numpy()
            if not np.isfinite(array).all():
                raise SiamdiffError(f"latent of {sha} is not finite in float16", self.path)
            packed.append((self._key(sha), _pack(array)))
        env = self._environment()
        while True:
            try:
                with env.begin(write=True) as txn:
                    added = sum(txn.put(key, value, overwrite=False) for key, value in packed)
                    count = txn.get(self._count_key)
                    total = added + (0 if count is None else int(count))
                    txn.put(self._count_key, str(total).encode())
                return added
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                env.set_mapsize(0)
            except lmdb.Error as exc:  # a full disk, a file-size limit
                raise SiamdiffError(f"cannot write the latent cache ({exc})", self.path) from exc

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = None
        _OPEN.discard(self)

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_env": None}


_OPEN: weakref.WeakSet[LatentCache] = weakref.WeakSet()
os.register_at_fork(before=_close_before_fork)


def build_latent_cache(
    dataset: Dataset,
    autoencoder: LatentAutoencoder,
    path: str | Path,
    view: str,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LatentCache:
    """Encode the images of ``dataset`` that ``path`` lacks; returns the open (writable) cache.

    ``dataset`` yields ``{"image": 3xHxW in [-1, 1], "mask", "meta": {"image_sha256",
    "mask_sha256", ...}}`` through a deterministic (eval) transform that ``view`` names.
    """
    cache = LatentCache(path, autoencoder.identity, view)
    indices = list(range(len(dataset)))
    records = getattr(dataset, "records", None)
    if records is not None:
        # PairedDataset knows every pair's hashes without decoding it: load only the misses.
        indices = [
            i
            for i in indices
            if pair_entry(records[i].image_sha256, records[i].mask_sha256) not in cache
        ]
    if not indices:
        return cache
    # Its own generator: iterating a loader draws a seed from the global RNG otherwise, and a
    # run would train on other noise depending on whether its cache was already built.
    loader = DataLoader(Subset(dataset, indices), batch_size, generator=torch.Generator())
    autoencoder.to(device)
    with tqdm(total=len(indices), desc="encoding latents", unit="img", disable=not progress) as bar:
        for batch in loader:
            meta = batch["meta"]
            entries = list(map(pair_entry, meta["image_sha256"], meta["mask_sha256"]))
            todo = [i for i, entry in enumerate(entries) if entry not in cache]
            if todo:
                with torch.inference_mode():
                    latents = autoencoder.encode(batch["image"][todo].to(device)).cpu()
                cache.put_many(zip([entries[i] for i in todo], latents, strict=True))
            bar.update(len(entries))
    return cache


class WithCachedLatents(Dataset):
    """Adds ``"latent"`` (from a read-only cache) to each item of a dataset of the cached view."""

    def __init__(self, dataset: Dataset, cache: LatentCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        meta = item["meta"]
        latent = self.cache.get(pair_entry(meta["image_sha256"], meta["mask_sha256"]))
        if latent is None:
            raise SiamdiffError(
                f"no cached latent for {item['meta']['id']} (rebuild the cache)", self.cache.path
            )
        return {**item, "latent": latent.float()}
