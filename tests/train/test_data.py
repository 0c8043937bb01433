"""Reference training loop, data: the embedded set, CSV and WebDataset loaders, bad samples, sources
that fail fast."""
import io
import os
import tarfile
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from aclip_kernels.train.augment import SingleView
from aclip_kernels.train.data import (MAX_BAD_IN_A_ROW, MAX_CAPTION_CHARS, CSVSource, MicroBatchSampler, TrainSet,
                                      WebDatasetStream, check_data, collate, make_eval_set, make_train_loader)
from aclip_kernels.train.embedded import EmbeddedDataset
from aclip_kernels.train.errors import DataError


def fake_tokenizer(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


def test_embedded_deterministic_and_captioned():
    a = EmbeddedDataset("train", image_size=24, num_classes=5, samples_per_class=3, seed=1)
    b = EmbeddedDataset("train", image_size=24, num_classes=5, samples_per_class=3, seed=1)
    assert len(a) == 15 and a.classnames == b.classnames
    for i in (0, 7, 14):
        img, cap, label = a[i]
        assert img.shape == (24, 24, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, b[i][0])
        assert label == i % 5 and cap == a.classnames[label]
        # the caption is the emoji's lower-cased Unicode name
        cp = int(os.path.basename(a.classes[label][1]).split(".")[0], 16)
        assert cap == unicodedata.name(chr(cp)).lower()
        y0, x0, h, w = a.object_box(i)
        assert 0 <= y0 and y0 + h <= 1 and 0 <= x0 and x0 + w <= 1 and 0.3 <= h <= 0.65
    val = EmbeddedDataset("val", image_size=24, num_classes=5, samples_per_class=3, seed=1)
    assert val.classnames == a.classnames
    assert not np.array_equal(val[0][0], a[0][0])            # a different, fixed split
    other = EmbeddedDataset("train", image_size=24, num_classes=5, samples_per_class=3, seed=2)
    assert not np.array_equal(other[0][0], a[0][0])


def test_microbatch_sampler_ranks_partition_the_global_batch():
    single = MicroBatchSampler(20, 8, seed=3)
    r0, r1 = MicroBatchSampler(20, 8, 0, 2, seed=3), MicroBatchSampler(20, 8, 1, 2, seed=3)
    for j in range(5):                                       # crosses epochs (2 batches per epoch)
        assert r0.batch(j) + r1.batch(j) == single.batch(j)
    assert [e for e, _ in single.batch(2)] == [1] * 8
    resumed = iter(MicroBatchSampler(20, 8, seed=3, start=3))
    assert next(resumed) == single.batch(3)


def _png(path, color=(200, 30, 30), size=12):
    Image.new("RGB", (size, size), color).save(path)


def test_csv_loader_skips_and_counts_bad_samples(tmp_path):
    rows = []
    for i in range(6):
        _png(tmp_path / f"img{i}.png", (40 * i, 10, 10))
        rows.append((f"img{i}.png", f"caption {i}"))
    rows[1] = ("missing.png", "caption 1")                  # missing file
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[3] = ("broken.png", "caption 3")                   # unreadable image
    rows[4] = ("img4.png", "  ")                            # empty caption
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    source = CSVSource(str(csv_path))
    assert len(source) == 6
    ds = TrainSet(source, SingleView(8), fake_tokenizer)
    items = [ds[(0, i)] for i in range(6)]
    assert [it["index"] for it in items] == [0, 2, 2, 5, 5, 5]
    assert [it["skipped"] for it in items] == [0, 1, 0, 2, 1, 0]
    loader = make_train_loader(str(csv_path), SingleView(8), fake_tokenizer, micro_batch=6, rank=0, world=1,
                               seed=0, start=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (6, 3, 8, 8) and batch["text"].shape == (6, 2)
    assert batch["skipped"] == 4                            # 1 + 2 + 1 skips, whatever the order
    ev = make_eval_set(str(csv_path), 8)
    assert len(ev) == 3 and ev.skipped == 3


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_loader_skips_and_counts_bad_samples(tmp_path):
    good = lambda i: (f"s{i:03d}", {"png": _png_bytes((10 * i, 0, 0)), "txt": f"red {i}".encode()})
    _write_shard(tmp_path / "a-000.tar", [good(0), ("s001", {"png": b"garbage", "txt": b"bad image"}), good(2)])
    _write_shard(tmp_path / "a-001.tar", [good(3), ("s004", {"png": _png_bytes((0, 0, 0))}), good(5)])
    shards = str(tmp_path / "a-{000..001}.tar")
    stream = WebDatasetStream(shards, SingleView(8), fake_tokenizer, repeat=False)
    raw = list(stream.raw())
    assert sorted(c for _, _, _, c, _ in raw) == ["red 0", "red 2", "red 3", "red 5"]
    assert sum(s for *_, s in raw) == 2
    loader = make_train_loader(shards, SingleView(8), fake_tokenizer, micro_batch=4, rank=0, world=1,
                               seed=0, start=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["skipped"] == 2
    # two ranks, two shards: one shard each; resume skips the consumed samples of the rank's stream
    r1 = list(WebDatasetStream(shards, SingleView(8), fake_tokenizer, rank=1, world=2, repeat=False))
    r1_resumed = list(WebDatasetStream(shards, SingleView(8), fake_tokenizer, rank=1, world=2, skip=1,
                                       repeat=False))
    assert len(r1) == 2 and len(r1_resumed) == 1
    torch.testing.assert_close(r1_resumed[0]["image"], r1[1]["image"])
    ev = make_eval_set(shards, 8)
    assert len(ev) == 4


def test_collate_boxes_view_major():
    items = [{"boxes": torch.full((2, 4), float(i)) + torch.tensor([[0.0], [10.0]]), "skipped": i,
              "index": i, "view1": torch.zeros(3, 2, 2)} for i in range(3)]
    out = collate(items)
    assert out["boxes"][:, 0].tolist() == [0, 1, 2, 10, 11, 12]
    assert out["skipped"] == 3 and out["view1"].shape == (3, 3, 2, 2)


def test_csv_row_errors_of_every_kind_are_skipped_and_counted_as_in_tar(tmp_path):
    """The same five samples (one good, then a caption that is not UTF-8, one over the csv field
    limit, an undecodable image, a missing image) as CSV rows and as WebDataset samples."""
    good, long = _png_bytes((200, 0, 0)), b"x" * (MAX_CAPTION_CHARS + 1)
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.csv").write_bytes(b"filepath\ttitle\ngood.png\tred\ngood.png\tcaf\xe9\n"
                                        b"good.png\t" + long + b"\nbroken.png\tbroken\nmissing.png\tmissing\n")
    _write_shard(tmp_path / "data.tar", [("s0", {"png": good, "txt": b"red"}), ("s1", {"png": good, "txt": b"caf\xe9"}),
                                         ("s2", {"png": good, "txt": long}), ("s3", {"png": b"not a png", "txt": b"b"}),
                                         ("s4", {"txt": b"missing"})])
    csv_set = TrainSet(CSVSource(str(tmp_path / "data.csv")), SingleView(8), fake_tokenizer)
    assert len(csv_set) == 5
    csv_items = [csv_set[(0, i)] for i in range(1, 5)]            # each falls through to row 0
    assert [it["index"] for it in csv_items] == [0] * 4 and [it["skipped"] for it in csv_items] == [4, 3, 2, 1]
    tar = list(WebDatasetStream(str(tmp_path / "data.tar"), SingleView(8), fake_tokenizer, repeat=False).raw())
    assert [caption for *_, caption, _ in tar] == ["red"]
    tar_repeat = WebDatasetStream(str(tmp_path / "data.tar"), SingleView(8), fake_tokenizer)
    items = iter(tar_repeat)
    assert [next(items)["skipped"] for _ in range(2)] == [0, 4]   # the 4 bad samples before the 2nd good one
    csv_eval, tar_eval = make_eval_set(str(tmp_path / "data.csv"), 8), make_eval_set(str(tmp_path / "data.tar"), 8)
    assert len(csv_eval) == len(tar_eval) == 1 and csv_eval.skipped == 4


def test_a_bad_run_of_64_is_skipped_and_65_stop_the_run(tmp_path):
    assert MAX_BAD_IN_A_ROW == 64
    (tmp_path / "good.png").write_bytes(_png_bytes((0, 90, 0)))
    for bad, ok in ((64, True), (65, False)):
        rows = "".join(f"missing{i}.png\tc\n" for i in range(bad)) + "good.png\tgreen\n"
        (tmp_path / "d.csv").write_text("filepath\ttitle\n" + rows)
        _write_shard(tmp_path / "d.tar", [(f"s{i:03d}", {"png": b"bad", "txt": b"c"}) for i in range(bad)]
                     + [("zgood", {"png": _png_bytes((0, 90, 0)), "txt": b"green"})])
        csv_set = TrainSet(CSVSource(str(tmp_path / "d.csv")), SingleView(8), fake_tokenizer)
        stream = iter(WebDatasetStream(str(tmp_path / "d.tar"), SingleView(8), fake_tokenizer))
        if ok:
            assert csv_set[(0, 0)]["skipped"] == 64 and next(stream)["skipped"] == 64
        else:
            with pytest.raises(DataError, match=r"^65 bad samples in a row .*FileNotFoundError"):
                csv_set[(0, 0)]
            with pytest.raises(DataError, match=r"^65 bad samples in a row .*d\.tar"):
                next(stream)


def test_missing_empty_or_unreadable_sources_fail_fast_with_one_line(tmp_path):
    (tmp_path / "no-tars").mkdir()
    (tmp_path / "header.csv").write_text("filepath\ttitle\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "columns.csv").write_text("path\tcaption\nx.png\tx\n")
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    _write_shard(tmp_path / "nosample.tar", [("a", {"txt": b"caption only"}), ("b", {"png": b"bad"})])
    (tmp_path / "bad.csv").write_text("filepath\ttitle\n" + "".join(f"m{i}.png\tc\n" for i in range(10)))
    cases = {str(tmp_path / "shard-{000..002}.tar"): "3 of 3 shards do not exist",
             str(tmp_path / "missing.csv"): "does not exist", str(tmp_path / "no-tars"): "no shards",
             str(tmp_path / "header.csv"): "has no rows", str(tmp_path / "empty.csv"): "is empty",
             str(tmp_path / "columns.csv"): "lack 'filepath'", str(tmp_path / "garbage.tar"): "no readable sample",
             str(tmp_path / "nosample.tar"): "no readable sample",
             str(tmp_path / "bad.csv"): "^10 bad samples in a row from index"}
    for spec, message in cases.items():
        with pytest.raises(DataError, match=message) as e:
            check_data(spec)
            loader = make_train_loader(spec, SingleView(8), fake_tokenizer, micro_batch=2, rank=0, world=1,
                                       seed=0, start=0)
            next(iter(loader))
        assert len(str(e.value).splitlines()) == 1, spec
    # from a DataLoader worker too: the traceback it arrives in is cut to the message
    batches = iter(make_train_loader(str(tmp_path / "bad.csv"), SingleView(8), fake_tokenizer, micro_batch=2,
                                     rank=0, world=1, seed=0, start=0, workers=1))
    with pytest.raises(DataError, match="^10 bad samples in a row") as e:
        next(batches)
    assert len(str(e.value).splitlines()) == 1
    del e, batches                                          # the worker stops now, not at teardown
