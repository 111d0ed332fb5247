"""LMDB latent cache: keys, persistence, growth, incremental builds, multi-process reads."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from siamdiff.data.cache import LatentCache, build_latent_cache, pair_entry
from siamdiff.errors import SiamdiffError
from siamdiff.models.autoencoder import LatentAutoencoder, load_autoencoder

IDENTITY = "test:sha256=abc:scale=1.0:shift=0.0"


def _sha(index: int) -> str:
    return hashlib.sha256(f"image {index}".encode()).hexdigest()


def _latents(count: int, shape: tuple[int, ...] = (4, 8, 8)) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count)
    return [(_sha(i), torch.randn(shape, generator=generator)) for i in range(count)]


def _mask_sha(index: int, version: int = 0) -> str:
    return _sha(1000 * (version + 1) + index)


class _Pairs(Dataset):
    """Stand-in for PairedDataset: fixed random images, each with its own image and mask
    hashes; ``corrected`` masks have other hashes (as after a corrected mask)."""

    def __init__(self, count: int, with_records: bool = False, corrected: int = -1) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 32, 32, generator=generator) * 2 - 1 for _ in range(count)]
        self.masks = [_mask_sha(i, version=int(i == corrected)) for i in range(count)]
        self.loaded: list[int] = []
        if with_records:
            self.records = [
                SimpleNamespace(image_sha256=_sha(i), mask_sha256=self.masks[i])
                for i in range(count)
            ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.loaded.append(index)
        meta = {"id": f"p{index}", "image_sha256": _sha(index), "mask_sha256": self.masks[index]}
        return {"image": self.images[index], "mask": torch.zeros(1, 32, 32), "meta": meta}


class _CachedLatents(Dataset):
    """What a training dataset does with the cache: look latents up by image hash."""

    def __init__(self, cache: LatentCache, shas: list[str]) -> None:
        self.cache, self.shas = cache, shas

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, index: int) -> torch.Tensor:
        latent = self.cache.get(self.shas[index])
        assert latent is not None
        return latent


@pytest.fixture(scope="module")
def autoencoder() -> LatentAutoencoder:
    return load_autoencoder({"kind": "random", "seed": 0})


@pytest.fixture
def counted(autoencoder: LatentAutoencoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes the autoencoder was asked to encode."""
    calls: list[int] = []
    encode = autoencoder.encode

    def counting(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(autoencoder, "encode", counting)
    return calls


def test_round_trip_in_float16(tmp_path: Path):
    items = _latents(3)
    with LatentCache(tmp_path / "cache", IDENTITY, "crop32") as cache:
        assert cache.put_many(items) == 3
        assert len(cache) == 3
        for sha, latent in items:
            assert sha in cache
            stored = cache.get(sha)
            assert stored is not None and stored.dtype == torch.float32
            torch.testing.assert_close(stored, latent, atol=2e-3, rtol=1e-3)
        assert cache.get(_sha(99)) is None and _sha(99) not in cache
        # The same image again is not a new entry.
        assert cache.put_many(items[:1]) == 0
        assert len(cache) == 3


def test_latent_beyond_float16_is_refused(tmp_path: Path):
    with LatentCache(tmp_path / "cache", IDENTITY, "crop32") as cache:
        huge = torch.full((4, 8, 8), 1e6)
        with pytest.raises(SiamdiffError, match="not finite in float16"):
            cache.put_many([*_latents(1), (_sha(7), huge)])
        assert len(cache) == 0


def test_other_encoder_or_view_misses(tmp_path: Path):
    path = tmp_path / "cache"
    items = _latents(2)
    with LatentCache(path, IDENTITY, "crop32") as cache:
        cache.put_many(items)
    for identity, view in ((IDENTITY + "x", "crop32"), (IDENTITY, "crop64")):
        with LatentCache(path, identity, view) as other:
            assert len(other) == 0
            assert all(other.get(sha) is None for sha, _ in items)
            other.put_many(items[:1])
            assert len(other) == 1
    with LatentCache(path, IDENTITY, "crop32", readonly=True) as cache:
        assert len(cache) == 2


def test_reopen_read_only_persists(tmp_path: Path):
    path = tmp_path / "cache"
    items = _latents(4)
    LatentCache(path, IDENTITY, "crop32").put_many(items)
    with LatentCache(path, IDENTITY, "crop32", readonly=True) as cache:
        assert len(cache) == 4
        stored = cache.get(items[2][0])
        assert stored is not None
        torch.testing.assert_close(stored, items[2][1], atol=2e-3, rtol=1e-3)
        with pytest.raises(SiamdiffError, match="read-only"):
            cache.put_many(items)


def test_missing_read_only_cache_is_a_user_error(tmp_path: Path):
    with pytest.raises(SiamdiffError, match="cannot open latent cache"):
        LatentCache(tmp_path / "absent", IDENTITY, "crop32", readonly=True)


def test_map_grows_when_full(tmp_path: Path):
    items = _latents(24, shape=(4, 32, 32))  # 8 KiB each, 192 KiB in all
    with LatentCache(tmp_path / "cache", IDENTITY, "crop32", map_size=64 * 1024) as cache:
        cache.put_many(items[:12])
        cache.put_many(items[12:])
        assert len(cache) == 24
        assert all(cache.get(sha) is not None for sha, _ in items)
        assert cache._environment().info()["map_size"] > 64 * 1024


def test_build_encodes_only_missing(tmp_path: Path, autoencoder, counted: list[int]):
    path = tmp_path / "cache"
    dataset = _Pairs(5)
    cache = build_latent_cache(dataset, autoencoder, path, "crop32", batch_size=2, progress=False)
    assert sum(counted) == 5 and len(cache) == 5
    expected = autoencoder.encode(dataset[3]["image"][None])[0]
    stored = cache.get(pair_entry(_sha(3), _mask_sha(3)))
    assert stored is not None and stored.shape == (4, 4, 4)
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=1e-3)
    cache.close()

    counted.clear()
    build_latent_cache(dataset, autoencoder, path, "crop32", progress=False).close()
    assert counted == []
    cache = build_latent_cache(_Pairs(7), autoencoder, path, "crop32", progress=False)
    assert sum(counted) == 2 and len(cache) == 7
    cache.close()


def test_build_skips_loading_cached_records(tmp_path: Path, autoencoder, counted: list[int]):
    path = tmp_path / "cache"
    build_latent_cache(_Pairs(3), autoencoder, path, "crop32", progress=False).close()
    dataset = _Pairs(5, with_records=True)
    build_latent_cache(dataset, autoencoder, path, "crop32", progress=False).close()
    assert sorted(dataset.loaded) == [3, 4]
    assert counted == [3, 2]


def test_a_corrected_mask_is_encoded_again(tmp_path: Path, autoencoder, counted: list[int]):
    """The view crops around the lesion: same image, other mask, other latent."""
    path = tmp_path / "cache"
    build_latent_cache(
        _Pairs(4, with_records=True), autoencoder, path, "crop32", progress=False
    ).close()
    counted.clear()
    corrected = _Pairs(4, with_records=True, corrected=2)
    cache = build_latent_cache(corrected, autoencoder, path, "crop32", progress=False)
    assert counted == [1] and corrected.loaded == [2] and len(cache) == 5
    assert cache.get(pair_entry(_sha(2), _mask_sha(2, version=1))) is not None
    cache.close()


def test_parallel_read_only_workers(tmp_path: Path):
    path = tmp_path / "cache"
    items = _latents(8)
    with LatentCache(path, IDENTITY, "crop32") as cache:
        cache.put_many(items)
    reader = LatentCache(path, IDENTITY, "crop32", readonly=True)
    assert reader.get(items[0][0]) is not None  # the parent holds an open handle
    dataset = _CachedLatents(reader, [sha for sha, _ in items])
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    loaded = torch.cat(list(loader))
    # Closed before the fork: a child closing its inherited copy would end the parent's reads.
    assert reader._env is None and reader.get(items[0][0]) is not None
    torch.testing.assert_close(loaded, torch.stack([t for _, t in items]), atol=2e-3, rtol=1e-3)
    reader.close()
    # Spawned workers receive a pickled cache: it travels without its handle and reopens.
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._env is None
    assert clone.get(items[0][0]) is not None
    clone.close()


def test_a_reader_follows_a_map_another_process_grew(tmp_path: Path):
    """Two runs may share one cache (another view or encoder): a writer growing the data past
    the map of a reader opened before must not break it (LMDB: MDB_MAP_RESIZED)."""
    path = tmp_path / "cache"
    items = _latents(2)
    with LatentCache(path, IDENTITY, "crop32", map_size=64 * 1024) as cache:
        cache.put_many(items)
    reader = LatentCache(path, IDENTITY, "crop32", readonly=True)
    assert reader.get(items[0][0]) is not None
    grow = (
        "import torch; from siamdiff.data.cache import LatentCache\n"
        f"c = LatentCache({str(path)!r}, 'other', 'crop32', map_size=64 << 20)\n"
        "c.put_many((str(i), torch.randn(4, 128, 128)) for i in range(100))\n"
    )
    subprocess.run([sys.executable, "-c", grow], check=True, timeout=120)
    torch.testing.assert_close(reader.get(items[1][0]), items[1][1], atol=2e-3, rtol=1e-3)
    assert len(reader) == 2
    reader.close()


def test_a_writer_follows_a_map_another_process_grew(tmp_path: Path):
    """The writer's next put failed for good with MDB_MAP_RESIZED."""
    path = tmp_path / "cache"
    writer = LatentCache(path, IDENTITY, "crop32", map_size=64 * 1024)
    writer.put_many(_latents(1))
    grow = (
        "import torch; from siamdiff.data.cache import LatentCache\n"
        f"c = LatentCache({str(path)!r}, 'other', 'crop32', map_size=64 << 10)\n"
        "c.put_many((str(i), torch.randn(4, 64, 64)) for i in range(40))\n"
    )
    subprocess.run([sys.executable, "-c", grow], check=True, timeout=120)
    items = _latents(3)
    assert writer.put_many(items[1:]) == 2 and len(writer) == 3
    writer.close()


def test_lmdb_failures_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class BrokenEnvironment:
        def begin(self, write: bool = False):
            raise lmdb.Error("mdb_txn_commit: Input/output error")

    cache = LatentCache(tmp_path / "cache", IDENTITY, "crop32")
    monkeypatch.setattr(cache, "_environment", BrokenEnvironment)
    with pytest.raises(SiamdiffError, match=r"cache: cannot write the latent cache \(mdb_txn"):
        cache.put_many(_latents(1))
    with pytest.raises(SiamdiffError, match="cannot read the latent cache"):
        cache.get(_sha(0))


def test_building_the_cache_leaves_the_training_rng_alone(tmp_path: Path, autoencoder):
    """A cold cache (built now) and a warm one must give a run the same noise and timesteps."""
    pairs = _Pairs(3, with_records=True)  # a warm cache then loads nothing
    for _ in range(2):
        torch.manual_seed(0)
        build_latent_cache(pairs, autoencoder, tmp_path / "cache", "crop32", progress=False).close()
        drawn = torch.rand(4)
        torch.manual_seed(0)
        torch.testing.assert_close(drawn, torch.rand(4), rtol=0, atol=0)
    assert pairs.loaded == [0, 1, 2]  # cold once, then warm


def test_readers_register_so_a_concurrent_writer_keeps_their_pages(tmp_path: Path):
    """A lock-free reader is invisible to a writer, which may then recycle the pages it reads."""
    path = tmp_path / "cache"
    items = _latents(2)
    with LatentCache(path, IDENTITY, "crop32") as cache:
        cache.put_many(items)
    with LatentCache(path, IDENTITY, "crop32", readonly=True) as reader:
        env = reader._environment()
        with env.begin():  # a read in progress, as in a DataLoader worker
            assert str(os.getpid()) in env.readers()


def test_a_cache_whose_lock_file_cannot_be_written_is_read_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "cache"
    items = _latents(1)
    with LatentCache(path, IDENTITY, "crop32") as cache:
        cache.put_many(items)
    real_open = lmdb.open

    def read_only_mount(*args, **kwargs):
        if kwargs.get("lock", True):
            raise lmdb.ReadonlyError(f"{args[0]}: Read-only file system")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(lmdb, "open", read_only_mount)
    with (
        pytest.warns(UserWarning, match="without LMDB's lock file"),
        LatentCache(path, IDENTITY, "crop32", readonly=True) as reader,
    ):
        assert not reader._environment().flags()["lock"]
        torch.testing.assert_close(reader.get(items[0][0]), items[0][1], atol=2e-3, rtol=1e-3)


def test_a_truncated_cache_is_a_user_error_not_a_bus_error(tmp_path: Path):
    path = tmp_path / "cache"
    with LatentCache(path, IDENTITY, "crop32") as cache:
        cache.put_many(_latents(20))
    os.truncate(path / "data.mdb", 8192)  # an interrupted copy
    for readonly in (True, False):
        with pytest.raises(SiamdiffError, match=r"truncated \(8192 of \d+ bytes\)"):
            LatentCache(path, IDENTITY, "crop32", readonly=readonly)
