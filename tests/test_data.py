import gzip
import os
import struct

import numpy as np
import pytest

from cvae.data import (
    BatchStream,
    Dataset,
    find_mnist_files,
    parse_digits,
    read_idx_images,
    read_idx_labels,
)
from cvae.errors import CvaeError
from .conftest import image_idx, label_idx, write_split




def write(path, data, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_split(directory, n=23, split="train", gz=False, seed=0):
    """Write a tiny split whose image rows encode their index, so batches can be traced back."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
    images[:, 0] = np.arange(n) % 256
    images[:, 1] = np.arange(n) // 256
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_split(directory, prefix, images, labels, gz)
    return images, labels


def row_ids(pixels):
    return pixels[:, 0].astype(np.int64) + 256 * pixels[:, 1].astype(np.int64)


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, gz):
    images, labels = make_split(tmp_path, n=7, gz=gz)
    suffix = ".gz" if gz else ""
    read_images = read_idx_images(tmp_path / f"train-images-idx3-ubyte{suffix}")
    read_labels = read_idx_labels(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert read_images.dtype == np.uint8 and read_images.shape == (7, 784)
    assert read_labels.dtype == np.uint8 and read_labels.shape == (7,)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    assert not read_images.flags.writeable
    if not gz:
        assert isinstance(read_images, np.memmap) or isinstance(read_images.base, np.memmap)


def test_empty_files_read_as_empty_arrays(tmp_path):
    assert read_idx_images(write(tmp_path / "i", image_idx(np.zeros((0, 784))))).shape == (0, 784)
    assert read_idx_labels(write(tmp_path / "l", label_idx([]))).shape == (0,)


def expect_error(path, reader, *fragments):
    with pytest.raises(CvaeError) as info:
        reader(path)
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


GOOD_IMAGES = image_idx(np.zeros((3, 784)))
GOOD_LABELS = label_idx([1, 2, 3])


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "reader, data, fragments",
    [
        (read_idx_images, b"\x01\x02" + GOOD_IMAGES[2:], ["not an IDX file"]),
        (read_idx_images, GOOD_IMAGES[:2] + b"\x0d" + GOOD_IMAGES[3:], ["type code 0x0d"]),
        (read_idx_images, GOOD_LABELS, ["1 dimensions", "image files have 3"]),
        (read_idx_labels, GOOD_IMAGES, ["3 dimensions", "label files have 1"]),
        (read_idx_images, b"\x00\x00", ["too short"]),
        (read_idx_images, GOOD_IMAGES[:10], ["truncated inside the IDX header"]),
        (read_idx_images, GOOD_IMAGES[:-1], ["truncated", "3x28x28 images (2352 bytes)", "2351 bytes of data"]),
        (read_idx_images, GOOD_IMAGES + b"\x00" * 5, ["5 unexpected extra bytes"]),
        (read_idx_labels, GOOD_LABELS[:-2], ["truncated", "3 labels"]),
        (read_idx_labels, GOOD_LABELS + b"\x07", ["1 unexpected extra bytes"]),
        (read_idx_labels, label_idx([1, 10, 3, 255]), ["2 labels outside 0-9", "10 at index 1"]),
        (
            read_idx_images,
            b"\x00\x00\x08\x03" + struct.pack(">III", 1, 32, 32) + bytes(1024),
            ["32x32", "expected 28x28"],
        ),
    ],
)
def test_validation_errors_name_the_file(tmp_path, gz, reader, data, fragments):
    path = write(tmp_path / ("bad-file.gz" if gz else "bad-file"), data, gz)
    expect_error(path, reader, *fragments)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope-idx3-ubyte", read_idx_images, "no such file")


def test_bad_gzip(tmp_path):
    good = gzip.compress(GOOD_IMAGES)
    expect_error(write(tmp_path / "trunc.gz", good[: len(good) // 2]), read_idx_images, "corrupt gzip")
    corrupt = bytearray(good)
    corrupt[-8] ^= 0xFF  # CRC
    expect_error(write(tmp_path / "crc.gz", bytes(corrupt)), read_idx_images, "corrupt gzip")
    expect_error(write(tmp_path / "plain.gz", GOOD_IMAGES), read_idx_images, "not a gzip file")


def test_gzip_content_without_gz_suffix_is_still_read(tmp_path):
    path = write(tmp_path / "train-images-idx3-ubyte", GOOD_IMAGES, gz=True)
    assert read_idx_images(path).shape == (3, 784)


# ---------------------------------------------------------------- locating files


def test_find_mnist_files_variants(tmp_path):
    write(tmp_path / "t10k-images.idx3-ubyte", GOOD_IMAGES)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", GOOD_LABELS, gz=True)
    images, labels = find_mnist_files(tmp_path, "test")
    assert os.path.basename(images) == "t10k-images.idx3-ubyte"
    assert os.path.basename(labels) == "t10k-labels-idx1-ubyte.gz"
    # Raw is preferred over gz: it is memory-mapped.
    write(tmp_path / "t10k-labels-idx1-ubyte", GOOD_LABELS)
    assert os.path.basename(find_mnist_files(tmp_path, "test")[1]) == "t10k-labels-idx1-ubyte"


def test_find_mnist_files_missing(tmp_path):
    write(tmp_path / "train-images-idx3-ubyte.gz", GOOD_IMAGES, gz=True)
    with pytest.raises(CvaeError) as info:
        find_mnist_files(tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path) in message and "train-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message
    with pytest.raises(CvaeError, match="does not exist"):
        find_mnist_files(tmp_path / "absent", "train")
    with pytest.raises(CvaeError, match="unknown data split"):
        find_mnist_files(tmp_path, "valid")


# ---------------------------------------------------------------- dataset


def test_dataset_load_and_subset(tmp_path):
    images, labels = make_split(tmp_path, n=23, gz=True)
    full = Dataset.load(tmp_path, "train")
    assert len(full) == 23 and full.digits == tuple(range(10))
    assert full.images is not None and full.images.dtype == np.uint8

    subset = Dataset.load(tmp_path, "train", digits="0-1,7")
    wanted = np.isin(labels, [0, 1, 7])
    assert len(subset) == wanted.sum() and subset.digits == (0, 1, 7)
    assert subset.images.dtype == np.uint8 and subset.labels.dtype == np.uint8
    np.testing.assert_array_equal(subset.images, images[wanted])
    np.testing.assert_array_equal(subset.labels, labels[wanted])
    assert Dataset.load(tmp_path, "train", digits={3}).digits == (3,)


def test_dataset_all_digits_selected_keeps_file_arrays(tmp_path):
    make_split(tmp_path, n=12)
    dataset = Dataset.load(tmp_path, "train", digits=range(10))
    assert not dataset.images.flags.owndata  # no gather copy: still the mapped file


def test_dataset_errors(tmp_path):
    make_split(tmp_path, n=5)  # digits 0-4 only
    with pytest.raises(CvaeError, match="no images of digit 7, 8"):
        Dataset.load(tmp_path, "train", digits=[1, 7, 8])
    with pytest.raises(CvaeError, match="not a digit"):
        Dataset.load(tmp_path, "train", digits=[12])
    write(tmp_path / "train-labels-idx1-ubyte", label_idx([0, 1, 2, 3]))
    with pytest.raises(CvaeError) as info:
        Dataset.load(tmp_path, "train")
    assert "5 images" in str(info.value) and "4 labels" in str(info.value)
    assert "train-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [("0,1", (0, 1)), ("0-9", tuple(range(10))), ("3", (3,)), ("0-4,7", (0, 1, 2, 3, 4, 7)),
     (" 7 , 2-3 ,3", (2, 3, 7)), ("5-5", (5,))],
)
def test_parse_digits(text, expected):
    assert parse_digits(text) == expected


@pytest.mark.parametrize("text", ["", " ", "a", "1,,2", "10", "0-10", "5-3", "-1", "1-", "1.5", "0-4;7"])
def test_parse_digits_rejects(text):
    with pytest.raises(CvaeError):
        parse_digits(text)


# ---------------------------------------------------------------- batches


@pytest.fixture
def tiny(tmp_path):
    make_split(tmp_path, n=23)
    return Dataset.load(tmp_path, "train")


def collect(stream, epoch, start_batch=0):
    return [(p.copy(), l.copy()) for p, l in stream.epoch(epoch, start_batch=start_batch)]


def test_epoch_covers_every_row_once_with_partial_last_batch(tiny):
    stream = BatchStream(tiny, batch_size=5, seed=3)
    assert stream.batches_per_epoch == 5
    batches = collect(stream, 0)
    assert [len(p) for p, _ in batches] == [5, 5, 5, 5, 3]
    ids = np.concatenate([row_ids(p) for p, _ in batches])
    assert sorted(ids) == list(range(23))
    for pixels, labels in batches:
        assert pixels.dtype == np.uint8 and labels.dtype == np.uint8
        np.testing.assert_array_equal(tiny.images[row_ids(pixels)], pixels)
        np.testing.assert_array_equal(tiny.labels[row_ids(pixels)], labels)


def test_shuffle_is_reproducible_and_fresh_per_epoch(tiny):
    first = np.concatenate([row_ids(p) for p, _ in collect(BatchStream(tiny, 4, seed=11), 2)])
    again = np.concatenate([row_ids(p) for p, _ in collect(BatchStream(tiny, 4, seed=11), 2)])
    other_epoch = np.concatenate([row_ids(p) for p, _ in collect(BatchStream(tiny, 4, seed=11), 3)])
    other_seed = np.concatenate([row_ids(p) for p, _ in collect(BatchStream(tiny, 4, seed=12), 2)])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, np.random.default_rng([11, 2]).permutation(23))
    assert not np.array_equal(first, other_epoch)
    assert not np.array_equal(first, other_seed)


def test_start_batch_resumes_with_the_tail_of_the_epoch(tiny):
    stream = BatchStream(tiny, batch_size=5, seed=1)
    full = collect(stream, 4)
    for start in range(stream.batches_per_epoch + 1):
        tail = collect(stream, 4, start_batch=start)
        assert len(tail) == len(full) - start
        for (p, l), (fp, fl) in zip(tail, full[start:]):
            np.testing.assert_array_equal(p, fp)
            np.testing.assert_array_equal(l, fl)
    with pytest.raises(CvaeError, match="resume"):
        stream.epoch(0, start_batch=6)


def test_buffers_are_reused(tiny):
    stream = BatchStream(tiny, batch_size=5, seed=0)
    pixel_ids, label_ids, pointers = set(), set(), set()
    for pixels, labels in stream.epoch(0):
        pointers.add((pixels.__array_interface__["data"][0], labels.__array_interface__["data"][0]))
        if len(pixels) == 5:
            pixel_ids.add(id(pixels))
            label_ids.add(id(labels))
    assert len(pixel_ids) == 1 and len(label_ids) == 1 and len(pointers) == 1
    # A second epoch writes into the same memory again.
    assert {p.__array_interface__["data"][0] for p, _ in stream.epoch(1)} == {next(iter(pointers))[0]}


def test_batch_larger_than_dataset(tiny):
    stream = BatchStream(tiny, batch_size=100, seed=0)
    assert stream.batches_per_epoch == 1
    (pixels, _), = list(stream.epoch(0))
    assert sorted(row_ids(pixels)) == list(range(23))


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2.5}, {"seed": -1}])
def test_batch_stream_rejects_bad_arguments(tiny, kwargs):
    with pytest.raises(CvaeError):
        BatchStream(tiny, **{"batch_size": 4, "seed": 0, **kwargs})


# ---------------------------------------------------------------- real MNIST


def test_real_mnist(real_data):
    data_dir = real_data
    train = Dataset.load(data_dir, "train")
    test = Dataset.load(data_dir, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.digits == tuple(range(10))
    zeros_and_ones = Dataset.load(data_dir, "train", digits="0-1")
    assert len(zeros_and_ones) == 12665 and zeros_and_ones.digits == (0, 1)
    stream = BatchStream(zeros_and_ones, batch_size=1000, seed=0)
    assert stream.batches_per_epoch == 13
    assert sum(len(p) for p, _ in stream.epoch(0)) == 12665
