import gzip
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from normlab import data

BUNDLED = Path(data.__file__).parent / "mnist"


def test_bundled_mnist_loads_normalized():
    ds = data.load("mnist", progress=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-2


def test_explicit_root_and_env_var(tmp_path, monkeypatch):
    root = tmp_path / "d"
    shutil.copytree(BUNDLED, root / "mnist")
    ds = data.load("mnist", root=root, normalize=False)
    assert ds.source.startswith("root") and ds.train_x.max().item() == 1.0
    monkeypatch.setenv("NORMLAB_DATA", str(root))
    monkeypatch.setattr(data, "_MEMO", {})
    assert data.load("mnist", progress=False).source.startswith("NORMLAB_DATA")


def test_raw_uncompressed_files_are_accepted(tmp_path):
    for f in BUNDLED.glob("*.gz"):
        (tmp_path / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    assert data.load("mnist", root=tmp_path).train_y.shape == (60000,)


def test_corrupted_local_copy_fails_with_the_file_named(tmp_path):
    shutil.copytree(BUNDLED, tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] = (raw[100] + 1) % 256
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.ChecksumError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", root=tmp_path)
    target.write_bytes(b"not gzip at all")
    with pytest.raises(data.ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", root=tmp_path)


def test_missing_files_and_unknown_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        data.load("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="fashion-mnist"):
        data.load("cifar")


def test_no_local_copy_and_download_disabled_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.load("fashion-mnist", download=False)


def _fake_network(monkeypatch, calls, raw=False):
    # A stand-in for the network: "downloading" serves the bundled files (decompressed with raw=True);
    # a bad:// mirror serves garbage.
    import io
    import urllib.request

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if url.startswith("bad://"):
            return io.BytesIO(gzip.compress(b"garbage"))
        payload = (BUNDLED / url.removeprefix("file://")).read_bytes()
        return io.BytesIO(gzip.decompress(payload) if raw else payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(data, "_BUNDLED", Path("/nonexistent-normlab-bundle"))
    monkeypatch.setattr(data, "_MEMO", {})


def test_download_goes_to_cache_and_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(data.MIRRORS, "mnist", ("bad://", "file://"))
    calls = []
    _fake_network(monkeypatch, calls)
    ds = data.load("mnist", progress=False)
    assert ds.source.startswith("downloaded")
    assert len(list((tmp_path / "normlab" / "mnist").glob("*.gz"))) == 4
    assert not list((tmp_path / "normlab" / "mnist").glob("*.part"))
    assert any(u.startswith("bad://") for u in calls)
    data._MEMO.clear()
    assert data.load("mnist", progress=False).source.startswith("cache")


def test_a_mirror_serving_uncompressed_files_is_cached_under_the_right_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(data.MIRRORS, "mnist", ("file://",))
    _fake_network(monkeypatch, [], raw=True)
    assert data.fetch("mnist", progress=False).startswith("downloaded")
    assert sorted(p.name for p in (tmp_path / "normlab" / "mnist").iterdir()) == sorted(data.FILES)
    data._MEMO.clear()
    assert data.load("mnist", progress=False).source.startswith("cache")


def test_all_mirrors_failing_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(data.MIRRORS, "mnist", ("bad://",))
    _fake_network(monkeypatch, [])
    with pytest.raises(data.DataError, match="could not download train-images-idx3-ubyte for mnist") as info:
        data.fetch("mnist", progress=False)
    # ... and says where it looked and where to put the files
    assert f"put its four IDX files (.gz or raw) in {tmp_path / 'normlab' / 'mnist'}" in str(info.value)
    assert "(cache)" in str(info.value)
    assert not list((tmp_path / "normlab" / "mnist").iterdir())


def test_file_by_content_not_by_name(tmp_path):
    # Raw IDX bytes under a .gz name are read as what they are, and still verified.
    for f in BUNDLED.glob("*.gz"):
        (tmp_path / f.name).write_bytes(gzip.decompress(f.read_bytes()))
    assert data.load("mnist", root=tmp_path).test_y.shape == (10000,)


def test_another_datasets_file_is_named_as_such(tmp_path):
    # A flat folder holding MNIST, asked for Fashion-MNIST: say whose files they are, not "corrupt".
    shutil.copytree(BUNDLED, tmp_path, dirs_exist_ok=True)
    with pytest.raises(data.ChecksumError, match="this is mnist's train-images-idx3-ubyte, not the file expected"):
        data.load("fashion-mnist", root=tmp_path)


def test_a_normlab_data_folder_without_the_dataset_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.warns(UserWarning, match="NORMLAB_DATA=.* holds no complete copy of mnist"):
        assert data.load("mnist").source.startswith("bundled")
    data._MEMO.clear()
    with warnings.catch_warnings():  # progress=False (sweep workers): the parent has said it already
        warnings.simplefilter("error")
        assert data.load("mnist", progress=False).source.startswith("bundled")
