"""Training and evaluation data: the embedded set, CSV (open_clip convention), WebDataset shards.

Every sample becomes a dict of image views (see augment.py), "text" [L] int64 tokens, "index" and
"skipped". Batches are these stacked; "boxes" is stacked view-major ([2b, 4], view 1 of every image
first) as ``attentive_mask`` expects.

Determinism and data position. ``--batch-size`` is the global batch of one optimiser step; each
optimiser step takes ``accum`` micro-batches of ``batch_size / accum`` samples, of which rank r
takes the r-th slice. Map-style sources (embedded, CSV) are read in a per-epoch permutation seeded
by (seed, epoch) and micro-batch j is a pure function of j, so the data position is one integer and
a resumed or a differently sized run sees the same global batches. A sample's augmentation draws
from a generator seeded by (seed, epoch, sample index), independent of rank and worker.

Bad samples are skipped and counted, the same in every source: a missing or undecodable image, an
empty caption, one over 131072 characters (``MAX_CAPTION_CHARS``, csv's field limit) or not UTF-8,
and a CSV row the csv module cannot parse. A map-style source falls through to the next index, a
stream to its next sample, so batches keep their size (the distributed all-gather needs equal
sizes) and the count reaches the logs as "skipped". More than ``MAX_BAD_IN_A_ROW`` (64) bad samples
in a row, a pass over the shards without one good sample, a missing shard or an unreadable CSV
raise ``DataError``: the run stops at once with one line saying why.

WebDataset: shards (a list, a brace pattern "data-{000..099}.tar", or a directory) with an image
(jpg/jpeg/png/webp) and a caption (txt) per sample. With at least as many shards as ranks, rank r
reads shards r, r + world, ... (shard order reshuffled per epoch); with fewer, every rank reads all
shards and takes every world-th sample. The data position is the number of micro-batches consumed;
resume skips that many of the rank's samples. Shards are read in the main process (no DataLoader
workers), one decoder per rank.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .augment import EvalTransform, to_tensor
from .embedded import EmbeddedDataset
from .errors import DataError

__all__ = ["CSVSource", "EmbeddedSource", "TrainSet", "MicroBatchSampler", "WebDatasetStream",
           "collate", "sample_seed", "make_train_loader", "make_eval_set", "is_webdataset",
           "expand_shards", "check_data", "MAX_BAD_IN_A_ROW", "MAX_CAPTION_CHARS"]

MAX_BAD_IN_A_ROW = 64
MAX_CAPTION_CHARS = 131072


@contextlib.contextmanager
def single_thread():
    """Run per-sample work (decode, augment: many tiny tensor ops) on one intra-op thread; with
    several threads each tiny op pays a parallel-region barrier, ruinous on a loaded machine."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EmbeddedSource:
    """The embedded dataset as a source: ``load(i) -> (uint8 [S, S, 3], caption)``."""

    def __init__(self, dataset: EmbeddedDataset):
        self.dataset = dataset
        self.classnames = dataset.classnames

    def __len__(self):
        return len(self.dataset)

    def load(self, i: int):
        return self.dataset.image(i), self.dataset.caption(i)

    def label(self, i: int) -> int:
        return self.dataset.label(i)


class CSVSource:
    """A CSV / TSV of (image path, caption), open_clip's convention (keys "filepath" and "title",
    tab-separated; a comma is detected from the header). Relative paths are resolved against the
    CSV's directory when they do not exist as given. A row that is not UTF-8 or that the csv
    module rejects (a field over ``csv.field_size_limit()``) fails alone, in ``load``."""

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "title",
                 separator: Optional[str] = None):
        self.path = path
        try:
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        if separator is None:
            separator = "\t" if "\t" in text.split("\n", 1)[0] else ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty")
        if img_key not in header or caption_key not in header:
            raise DataError(f"{path}: columns {header} lack {img_key!r} / {caption_key!r} "
                            f"(set --csv-img-key / --csv-caption-key)")
        img_col, caption_col = header.index(img_key), header.index(caption_key)
        self.paths, self.captions, self.errors = [], [], {}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:                        # this row only: the reader goes on
                self.errors[len(self.paths)] = f"line {reader.line_num}: {e}"
                row = [""] * len(header)
            if not row:
                continue                                  # a blank line
            self.paths.append(row[img_col] if img_col < len(row) else "")
            self.captions.append(row[caption_col] if caption_col < len(row) else "")
        if not self.paths:
            raise DataError(f"{path} has no rows")
        self.root = os.path.dirname(os.path.abspath(path))

    def __len__(self):
        return len(self.paths)

    def load(self, i: int):
        if i in self.errors:
            raise ValueError(self.errors[i])
        self.captions[i].encode("utf-8")                  # undecodable bytes are surrogates here
        path = self.paths[i]
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(self.root, path)
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        return image, self.captions[i]


def _check_caption(caption) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("empty caption")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"caption of {len(caption)} characters (at most {MAX_CAPTION_CHARS})")
    return caption.strip()


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class TrainSet(Dataset):
    """Map-style training set over a source. Item key: (epoch, index). A bad sample falls through
    to index+1, +2, ... (at most ``max_skip``, then ``DataError``), and the number skipped is
    returned with the item."""

    def __init__(self, source, transform: Callable, tokenizer: Callable, seed: int = 0,
                 max_skip: int = MAX_BAD_IN_A_ROW):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.seed, self.max_skip = seed, max_skip

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        with single_thread():
            return self._item(*key)

    def _item(self, epoch: int, index: int):
        n = len(self.source)
        tries = min(self.max_skip + 1, n)
        for skipped in range(tries):
            i = (index + skipped) % n
            try:
                image, caption = self.source.load(i)
                caption = _check_caption(caption)
                image = to_tensor(image)
            except Exception as e:
                error = e
                continue
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            item = dict(self.transform(image, g))
            item.update(text=self.tokenizer([caption])[0], index=i, skipped=skipped)
            return item
        raise DataError(f"{tries} bad samples in a row from index {index} of {n} (the last: "
                        f"{_describe(error)}): is the data readable?")


class MicroBatchSampler:
    """Yields rank ``rank``'s slice of global micro-batch j = start, start+1, ... forever, as
    lists of (epoch, index). A global micro-batch is ``global_batch`` consecutive entries of the
    epoch's permutation (seeded by (seed, epoch)); an epoch's last partial micro-batch is dropped."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0, start: int = 0):
        if global_batch % world:
            raise ValueError(f"micro-batch {global_batch} is not divisible by world size {world}")
        if num_samples < global_batch:
            raise DataError(f"{num_samples} samples are fewer than one micro-batch ({global_batch})")
        self.n, self.B, self.rank, self.world = num_samples, global_batch, rank, world
        self.seed, self.start = seed, start
        self.per_epoch = num_samples // global_batch
        self._perm = (None, None)

    def global_batch(self, j: int) -> List[tuple]:
        epoch, k = divmod(j, self.per_epoch)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 11, epoch]).permutation(self.n))
        return [(epoch, int(i)) for i in self._perm[1][k * self.B:(k + 1) * self.B]]

    def batch(self, j: int) -> List[tuple]:
        b = self.B // self.world
        return self.global_batch(j)[self.rank * b:(self.rank + 1) * b]

    def __iter__(self) -> Iterator[List[tuple]]:
        j = self.start
        while True:
            yield self.batch(j)
            j += 1


def is_webdataset(spec) -> bool:
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return all(str(s).endswith(".tar") or "{" in str(s) or os.path.isdir(str(s)) for s in specs)


def expand_shards(spec) -> List[str]:
    """A list, comma-separated string, brace pattern or directory of .tar shards -> sorted paths.
    Raises ``DataError`` when there are none or a local one does not exist (URLs and ``pipe:``
    specs are not checked)."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for s in specs:
        if os.path.isdir(s):
            out += sorted(glob.glob(os.path.join(s, "*.tar")))
        else:
            out += list(braceexpand.braceexpand(s))
    if not out:
        raise DataError(f"no shards in {spec!r}")
    missing = [s for s in out if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if missing:
        raise DataError(f"{len(missing)} of {len(out)} shards do not exist, e.g. {missing[0]}")
    return out


def check_data(spec) -> None:
    """Raise ``DataError`` unless ``spec`` names a data source that exists: "embedded", a CSV / TSV
    file, or WebDataset shards."""
    if spec == "embedded":
        return
    if is_webdataset(spec):
        expand_shards(spec)
    elif str(spec).endswith((".csv", ".tsv")):
        if not os.path.exists(spec):
            raise DataError(f"{spec} does not exist")
        if os.path.isdir(spec):
            raise DataError(f"{spec} is a directory, not a CSV file")
    else:
        raise DataError(f"{spec!r}: expected 'embedded', a .csv/.tsv file or .tar shards")


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def decode_wds_sample(sample: Dict) -> tuple:
    """A raw WebDataset sample -> (uint8 [H, W, 3], caption); raises on a bad sample."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} lacks an image or a txt caption")
    with Image.open(io.BytesIO(sample[key])) as im:
        image = np.asarray(im.convert("RGB"))
    caption = sample["txt"]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else caption
    return image, _check_caption(caption)


class WebDatasetStream(IterableDataset):
    """Rank ``rank``'s endless stream of decoded, augmented samples from WebDataset shards (see
    the module doc for the rank split); the first ``skip`` good samples are skipped (resume)."""

    def __init__(self, shards, transform: Callable, tokenizer: Callable, seed: int = 0,
                 rank: int = 0, world: int = 1, skip: int = 0, repeat: bool = True):
        self.shards = expand_shards(shards)
        self.transform, self.tokenizer, self.seed = transform, tokenizer, seed
        self.rank, self.world, self.skip, self.repeat = rank, world, skip, repeat

    def raw(self) -> Iterator[tuple]:
        """(epoch, sample key, image, caption, skipped) of this rank, bad samples counted. Raises
        ``DataError`` after more than ``MAX_BAD_IN_A_ROW`` bad samples in a row, or a pass over the
        shards without a good one."""
        split_shards = len(self.shards) >= self.world
        mine = self.shards[self.rank::self.world] if split_shards else self.shards
        bad, last = 0, None

        def count_bad(exn):
            nonlocal bad, last
            if isinstance(exn, DataError):                # raised below, seen by an outer stage
                raise exn
            bad, last = bad + 1, exn
            if bad > MAX_BAD_IN_A_ROW:
                raise DataError(f"{bad} bad samples in a row in {len(mine)} shard(s) such as {mine[0]} "
                                f"(the last: {_describe(last)}): is the data readable?")
            return True

        epoch, seen = 0, 0
        while True:
            order = [mine[i] for i in np.random.default_rng([self.seed, 13, epoch]).permutation(len(mine))]
            ds = wds.WebDataset(order, shardshuffle=False, handler=count_bad, empty_check=False,
                                nodesplitter=lambda x: x, workersplitter=lambda x: x)
            good = 0
            for sample in ds:
                if not split_shards:
                    seen += 1
                    if (seen - 1) % self.world != self.rank:
                        continue
                try:
                    image, caption = decode_wds_sample(sample)
                except Exception as e:
                    count_bad(e)
                    continue
                good += 1
                skipped, bad = bad, 0
                yield epoch, sample.get("__key__", ""), image, caption, skipped
            if not good:
                raise DataError(f"no readable sample in {len(mine)} shard(s) such as {mine[0]}"
                                + (f" (the last error: {_describe(last)})" if last is not None else ""))
            if not self.repeat:
                return
            epoch += 1

    def __iter__(self):
        skipped = 0
        for n, (epoch, key, image, caption, bad) in enumerate(self.raw()):
            skipped += bad
            if n < self.skip:
                continue
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, hash_key(key)))
            with single_thread():
                item = dict(self.transform(to_tensor(image), g))
            item.update(text=self.tokenizer([caption])[0], index=n, skipped=skipped)
            skipped = 0
            yield item


def hash_key(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def collate(items: Sequence[Dict]) -> Dict[str, torch.Tensor]:
    """Stack items; "boxes" [b, 2, 4] becomes view-major [2b, 4]; "skipped" is summed."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key == "skipped":
            out[key] = int(sum(vals))
        elif key == "index":
            out[key] = torch.tensor(vals, dtype=torch.int64)
        elif key == "boxes":
            out[key] = torch.stack(vals).transpose(0, 1).reshape(-1, 4).contiguous()
        else:
            out[key] = torch.stack(vals)
    return out


def make_source(data: str, split: str = "train", image_size: int = 32, num_classes: int = 10,
                samples_per_class: Optional[int] = None, seed: int = 0, csv_img_key="filepath",
                csv_caption_key="title", csv_separator=None):
    if data == "embedded":
        try:
            return EmbeddedSource(EmbeddedDataset(split, image_size, num_classes, samples_per_class, seed=seed))
        except ValueError as e:                           # e.g. more classes than there are emoji
            raise DataError(f"the embedded data set: {e}") from None
    if str(data).endswith((".csv", ".tsv")):
        return CSVSource(data, csv_img_key, csv_caption_key, csv_separator)
    raise DataError(f"{data!r}: expected 'embedded', a .csv/.tsv file or .tar shards")


def make_train_loader(data, transform, tokenizer, *, micro_batch: int, rank: int, world: int,
                      seed: int, start: int, workers: int = 0, source_kwargs=None,
                      pin_memory: bool = False) -> DataLoader:
    """A DataLoader of this rank's micro-batches ([micro_batch / world] rows each), starting at
    global micro-batch ``start``. ``data``: "embedded", a CSV path or WebDataset shards."""
    if is_webdataset(data):
        stream = WebDatasetStream(data, transform, tokenizer, seed, rank, world,
                                  skip=start * (micro_batch // world))
        return DataLoader(stream, batch_size=micro_batch // world, collate_fn=collate, num_workers=0,
                          pin_memory=pin_memory)
    source = make_source(data, "train", seed=seed, **(source_kwargs or {}))
    sampler = MicroBatchSampler(len(source), micro_batch, rank, world, seed, start)
    return DataLoader(TrainSet(source, transform, tokenizer, seed), batch_sampler=sampler,
                      collate_fn=collate, num_workers=workers, generator=torch.Generator(),
                      pin_memory=pin_memory)


class EvalSet(Dataset):
    """Evaluation items: {"image" [3, S, S], "caption" str, "label" int (-1 if none)}; bad samples
    are dropped when the set is made (``skipped`` counts them)."""

    def __init__(self, source, image_size: int, limit: Optional[int] = None):
        self.transform = EvalTransform(image_size)
        self.items, self.skipped = [], 0
        n = len(source) if limit is None else min(limit, len(source))
        for i in range(n):
            try:
                image, caption = source.load(i)
                caption = _check_caption(caption)
            except Exception:
                self.skipped += 1
                continue
            label = source.label(i) if hasattr(source, "label") else -1
            self.items.append((image, caption, label))
        if not self.items:
            raise DataError(f"no readable evaluation sample among {n}")
        self.classnames = getattr(source, "classnames", None)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, caption, label = self.items[i]
        return {"image": self.transform(to_tensor(image), None)["image"], "caption": caption,
                "label": label}


class _StreamSource:
    """A finite WebDataset read as a source (evaluation)."""

    def __init__(self, shards, limit):
        stream = WebDatasetStream(shards, None, None, repeat=False)
        self.samples = []
        for _, _, image, caption, _ in stream.raw():
            self.samples.append((image, caption))
            if limit and len(self.samples) >= limit:
                break

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        return self.samples[i]


def make_eval_set(data, image_size: int, limit: Optional[int] = None, source_kwargs=None) -> EvalSet:
    """The val split of the embedded set, or a user CSV / WebDataset val set."""
    if data == "embedded":
        source = make_source("embedded", "val", **(source_kwargs or {}))
    elif is_webdataset(data):
        source = _StreamSource(data, limit)
    else:
        source = make_source(data, "val", csv_img_key=(source_kwargs or {}).get("csv_img_key", "filepath"),
                             csv_caption_key=(source_kwargs or {}).get("csv_caption_key", "title"))
    return EvalSet(source, image_size, limit)
