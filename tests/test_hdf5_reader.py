"""The HDF5 reader: loads what the pipeline writes and what generative_data_prep writes, validates
the dir, and shards sequences over data-parallel ranks in a seeded, resumable order."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from helpers.data_prep_fixtures import prep_args, read_split, write_jsonl

from modelzoo.data.dataset_layout import sha256_of
from modelzoo.data.hdf5_reader import DatasetError, HDF5DatasetDir, PackedSequenceDataset, ShardedSampler
from modelzoo.data_prep.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, llama_like_tok):
    tmp = tmp_path_factory.mktemp("reader")
    rows = [{"prompt": f"q{i} alpha", "completion": f"a{i} beta"} for i in range(120)]
    inp = write_jsonl(tmp / "in.jsonl", rows)
    out = tmp / "ds"
    args = prep_args(
        inp,
        out,
        llama_like_tok,
        "--input-packing-config",
        "greedy::drop",
        "--dev-ratio",
        "0.2",
        "--num-training-splits",
        "3",
        L=24,
    )
    assert main(args) == 0
    return out


def test_reads_what_the_pipeline_writes(dataset):
    ds = HDF5DatasetDir(dataset, max_seq_length=24)
    ids, types = read_split(dataset, "train")
    train = ds.load("train")
    assert train.input_ids.dtype == np.int32 and train.input_ids.shape == ids.shape
    assert (train.input_ids == ids).all() and (train.token_type_ids == types).all()
    assert len(ds.files("train")) == 3 and ds.tokenizer_dir is not None
    torch_ds = ds.dataset("dev")
    item = torch_ds[0]
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (24,)
    dev_ids, dev_types = read_split(dataset, "dev")
    assert (
        item["input_ids"].tolist() == dev_ids[0].tolist()
        and item["token_type_ids"].tolist() == dev_types[0].tolist()
    )


def test_lazy_reader_equals_whole_split_and_shares_its_checks(dataset, tmp_path):
    """``reader`` (training) and ``load`` (tools) give the same rows and refuse the same bad file."""
    import shutil

    ds = HDF5DatasetDir(dataset, max_seq_length=24)
    whole = ds.load("train")
    with ds.reader("train") as reader:
        assert len(reader) == len(whole) and reader.seq_len == 24
        picks = np.array([len(whole) - 1, 0, 5, len(whole) // 2, 5])  # across files, any order, repeats
        rows = reader.rows(picks)
    assert rows["input_ids"].dtype == torch.int64
    assert (rows["input_ids"].numpy() == whole.input_ids[picks]).all()
    assert (rows["token_type_ids"].numpy() == whole.token_type_ids[picks]).all()

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    with h5py.File(copy / "train_2_of_3.hdf5", "a") as f:
        narrow = f["token_type_ids"][:, :20]
        del f["token_type_ids"]
        f["token_type_ids"] = narrow
    bad = HDF5DatasetDir(copy, check_manifest_sizes=False)
    for read in (lambda: bad.load("train"), lambda: bad.reader("train")):
        with pytest.raises(DatasetError, match=r"train_2_of_3.hdf5: 'token_type_ids' is int32 \(\d+, 20\)"):
            read()


def test_max_seq_length_mismatch_is_explained(dataset):
    with pytest.raises(
        DatasetError, match=r"max_seq_length is 24 but 256 was asked for; set training.max_seq_length=24"
    ):
        HDF5DatasetDir(dataset, max_seq_length=256)


def test_missing_file_and_changed_file_are_caught(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    with open(copy / "train_2_of_3.hdf5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetError, match="train_2_of_3.hdf5: size"):
        HDF5DatasetDir(copy)
    (copy / "train_2_of_3.hdf5").unlink()
    with pytest.raises(DatasetError, match="number_of_training_files=3 but the train files are"):
        HDF5DatasetDir(copy)


def write_gdp_style_dataset(root, n_files=2, rows=10, L=16, vocab=300):
    """A dir as generative_data_prep writes it: gzip i4 datasets with maxshape (None, L), metadata
    via yaml.dump with its own key order and types, tokenizer/config.json, a log file, and the
    manifest with flattened names."""
    rng = np.random.default_rng(0)
    root.mkdir()
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "config.json").write_text('{"model_type": "llama"}')
    (root / "logs.log").write_text("gdp log\n")
    data = {}
    for i in range(1, n_files + 1):
        ids = rng.integers(0, vocab, size=(rows, L)).astype("i4")
        types = np.ones((rows, L), dtype="i4")
        types[:, -1] = 3
        with h5py.File(root / f"train_{i}_of_{n_files}.hdf5", "w") as f:
            f.create_dataset("input_ids", data=ids, dtype="i4", compression="gzip", maxshape=(None, L))
            f.create_dataset("token_type_ids", data=types, dtype="i4", compression="gzip", maxshape=(None, L))
        data[i] = ids
    meta = {
        "max_seq_length": L,
        "token_type_ids": True,
        "vocab_size": vocab,
        "tokenizer_model_type": "<class 'transformers.models.llama.configuration_llama.LlamaConfig'>",
        "number_of_training_files": n_files,
        "number_of_dev_files": 0,
        "number_of_test_files": 0,
        "max_batch_size_train": rows,
        "max_batch_size_dev": None,
        "train_sequences": rows * n_files,
    }
    with open(root / "metadata.yaml", "w") as f:
        yaml.dump(meta, f, default_flow_style=False)
    manifest = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root)).replace("/", "_")
        manifest[name] = {
            "sha256": sha256_of(path),
            "size": path.stat().st_size,
            "modified_time": path.stat().st_mtime,
        }
    (root / "sha256").mkdir()
    (root / "sha256" / "files_metadata.json").write_text(json.dumps(manifest))
    return data


def test_generative_data_prep_layout_loads(tmp_path):
    data = write_gdp_style_dataset(tmp_path / "gdp")
    ds = HDF5DatasetDir(tmp_path / "gdp", max_seq_length=16, checksums=True)
    train = ds.load("train")
    assert (train.input_ids == np.concatenate([data[1], data[2]])).all()
    assert ds.load("dev").input_ids.shape == (0, 16)
    assert len(ds.dataset("train")) == 20
    from modelzoo.data_prep.verify import verify_dataset

    report = verify_dataset(tmp_path / "gdp")
    assert report.ok, report.text()


def test_missing_metadata_key(tmp_path):
    write_gdp_style_dataset(tmp_path / "gdp")
    meta = yaml.safe_load((tmp_path / "gdp" / "metadata.yaml").read_text())
    del meta["max_batch_size_train"]
    (tmp_path / "gdp" / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DatasetError, match="missing key\\(s\\) max_batch_size_train"):
        HDF5DatasetDir(tmp_path / "gdp", check_manifest_sizes=False)


def test_sampler_shards_are_disjoint_seeded_per_epoch():
    n, w = 103, 4
    samplers = [ShardedSampler(n, rank=r, world_size=w, seed=5) for r in range(w)]
    epoch0 = [list(s) for s in samplers]
    epoch1 = [list(s) for s in samplers]
    assert all(len(x) == n // w for x in epoch0)
    flat0 = sorted(i for x in epoch0 for i in x)
    assert len(set(flat0)) == len(flat0) == (n // w) * w and set(flat0) <= set(range(n))
    assert epoch0 != epoch1  # a new order each epoch
    again = [list(ShardedSampler(n, rank=r, world_size=w, seed=5)) for r in range(w)]
    assert again == epoch0  # same seed, same order
    assert [list(ShardedSampler(n, rank=r, world_size=w, seed=6)) for r in range(w)] != epoch0
    padded = ShardedSampler(n, rank=3, world_size=w, seed=5, drop_last=False)
    assert len(list(padded)) == 26


def test_sampler_resumes_mid_epoch():
    full = ShardedSampler(50, rank=1, world_size=2, seed=3)
    epoch0, epoch1 = list(full), list(full)
    s = ShardedSampler(50, rank=1, world_size=2, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(10)]
    state = s.state_dict()
    resumed = ShardedSampler(50, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert first + list(resumed) == epoch0
    assert list(resumed) == epoch1
    with pytest.raises(ValueError, match="world_size"):
        ShardedSampler(50, rank=0, world_size=5, seed=3).load_state_dict(state)


def test_dataloader_batches(dataset):
    ds = HDF5DatasetDir(dataset).dataset("train")
    sampler = ShardedSampler(len(ds), rank=0, world_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 24) and batch["token_type_ids"].dtype == torch.int64
    assert sampler.state_dict()["position"] == 2
    assert isinstance(ds, PackedSequenceDataset)


def _flip_first_chunk(path, name="input_ids", n=400):
    """Same size, up to ``n`` bytes of the first stored chunk of dataset ``name`` flipped."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        block = f.read(min(n, info.size))
        f.seek(info.byte_offset)
        f.write(bytes(b ^ 0xFF for b in block))


def test_damaged_file_is_a_one_line_dataset_error(dataset, tmp_path):
    """A same-size corruption: the manifest's sha256 finds it on open (checksums=True); without it, the
    read that hits it mid-training is a DatasetError naming the file, never an h5py traceback."""
    import re
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    bad = copy / "train_2_of_3.hdf5"
    _flip_first_chunk(bad)
    with pytest.raises(DatasetError, match=f"{re.escape(str(bad))}: sha256 differs from the manifest"):
        HDF5DatasetDir(copy, checksums=True)
    ds = HDF5DatasetDir(copy)  # sizes agree: only the hashes or a read can tell
    damaged = rf"^{re.escape(str(bad))}: not a readable dataset file \(cannot read it: .+\); .* restore it or re-run"
    with ds.reader("train") as reader:
        with pytest.raises(DatasetError, match=damaged) as info:
            reader.rows(np.arange(len(reader)))
        assert "\n" not in str(info.value)
        reader.rows(np.array([0]))  # the other files still read
    with pytest.raises(DatasetError, match=damaged):
        ds.load("train")
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(bad))}: not a readable dataset file \(cannot open it: .*truncated"):
        HDF5DatasetDir(copy, check_manifest_sizes=False).reader("train")
