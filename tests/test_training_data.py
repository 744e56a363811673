"""Training data: cropping, decoding, the dataset sources and their errors, the PPS draw, the sample order."""
import collections
import io
import itertools
import json
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slideredit.training.data import (DataError, DataOrder, ImageFolderDataset, UnreadableImage, center_crop,
                                      decode_image, derived_seed, draw_instructions, open_edit_dataset, to_pixels)
from test_train_script import write_images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_center_crop_resizes_the_shorter_side_then_takes_the_middle():
    # 64 x 32: red columns 0..7, green 8..55, blue 56..63
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :8, 0] = pixels[:, 8:56, 1] = pixels[:, 56:, 2] = 255
    # -> 32 x 16 (red 0..3, green 4..27, blue 28..31), then columns 8..23: green, 4 px clear of the
    # colour edges (beyond LANCZOS's reach); a crop off the centre would take red or blue
    crop = center_crop(Image.fromarray(pixels), 16)
    assert crop.size == (16, 16)
    assert np.array_equal(np.asarray(crop), np.broadcast_to([0, 255, 0], (16, 16, 3)))
    assert center_crop(Image.new("RGB", (10, 14)), 32).size == (32, 32)  # small images are enlarged
    x = to_pixels(Image.fromarray(np.full((2, 3, 3), 255, dtype=np.uint8)))
    assert x.shape == (3, 2, 3) and x.min() == 1.0


def test_decode_image_rejects_garbage_and_truncated_files_and_converts_modes():
    good = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 4), dtype=np.uint8)))
    assert decode_image(good).mode == "RGB"  # RGBA composited to RGB
    with pytest.raises(UnreadableImage, match="not an image file"):
        decode_image(b"hello")
    with pytest.raises(UnreadableImage):
        decode_image(good[: len(good) // 2])


def test_imagefolder_with_metadata_jsonl(tmp_path):
    paths = write_images(tmp_path / "d", 3)
    rows = [{"file_name": paths[0].name, "edit": "add a hat"}, {"file_name": paths[1].name, "edit": "  "},
            {"file_name": paths[2].name, "edit": "make it snow"}]
    (tmp_path / "d" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = open_edit_dataset(str(tmp_path / "d"), "input_image", "edit")  # falls back to file_name
    assert len(dataset) == 2  # the row without an instruction is left out
    assert dataset.instructions(1, random.Random(0)) == ("make it snow",)
    assert dataset.raw_image(1) == paths[2].read_bytes()


def test_csv_table_with_configured_columns(tmp_path):
    paths = write_images(tmp_path / "imgs", 2)
    table = tmp_path / "edits.csv"
    table.write_text("source,instruction\n" + "".join(f"imgs/{p.name},edit {i}\n" for i, p in enumerate(paths)))
    dataset = open_edit_dataset(str(table), "source", "instruction")
    assert len(dataset) == 2 and dataset.instructions(0, random.Random()) == ("edit 0",)
    assert dataset.raw_image(0) == paths[0].read_bytes()  # paths relative to the table's folder
    with pytest.raises(DataError, match=r"no column\(s\) \['input_image'\]; the columns are \['instruction', 'source'\]"):
        open_edit_dataset(str(table), "input_image", "instruction")


def test_missing_image_file_is_unreadable_not_fatal(tmp_path):
    table = tmp_path / "edits.jsonl"
    table.write_text(json.dumps({"input_image": "nowhere.png", "edit": "x"}) + "\n")
    dataset = open_edit_dataset(str(table), "input_image", "edit")
    with pytest.raises(UnreadableImage, match="cannot read .*nowhere.png"):
        dataset.raw_image(0)


@pytest.mark.parametrize("content", ["", '{"input_image": "a.png", "edit": ""}\n'])
def test_empty_table_is_a_clear_error(tmp_path, content):
    table = tmp_path / "edits.jsonl"
    table.write_text(content)
    with pytest.raises(DataError, match="the dataset is empty"):
        open_edit_dataset(str(table), "input_image", "edit")


def test_parquet_without_pyarrow_or_pandas_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    (tmp_path / "edits.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        open_edit_dataset(str(tmp_path / "edits.parquet"), "input_image", "edit")


@pytest.mark.parametrize("name", ["UCSC-VLAA/HQ-Edit", "data/toy-sliders"])
def test_hub_name_without_datasets_says_what_to_install(tmp_path, monkeypatch, name):
    """owner/name with no such local folder: it is either a path not written yet or a hub id, and the
    message says both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=f"^dataset_name not found: {name} is no local file or folder "
                                        f"\\(looked in {re.escape(str(tmp_path))}\\), and reading it as a Hugging "
                                        "Face hub dataset needs the `datasets` package: pip install datasets$"):
        open_edit_dataset(name, "input_image", "edit")


@pytest.mark.parametrize("name", ["outputs/toy-sliders-work/data", "data/edits", "./edits", "../edits", "edits.jsonl",
                                  "~/no-such-slideredit-folder", "/no/such/folder", "data/edits.csv"])
def test_a_missing_local_path_is_not_found_not_a_hub_name(tmp_path, monkeypatch, name):
    """A name that can only be a path (deeper than owner/name, relative or absolute, a table file, or
    under a folder that exists here) is reported as not found; `datasets` and the hub are not involved."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=f"^dataset_name not found: {re.escape(name)}") as err:
        open_edit_dataset(name, "input_image", "edit")
    assert "hub" not in str(err.value) and "datasets" not in str(err.value)
    if not Path(name).expanduser().is_absolute():  # where a relative path was looked for
        assert str(err.value).endswith(f"(relative to the current directory {tmp_path})")


class FakeHubDataset:
    """The few `datasets.Dataset` members the loader uses, over a list of rows (HQ-Edit's columns)."""

    def __init__(self, rows, image_feature):
        self.rows, self.features = rows, {"input_image": image_feature, "edit": None, "output_image": None}
        self.column_names = list(self.features)

    def select_columns(self, names):
        return FakeHubDataset([{k: r[k] for k in names} for r in self.rows], self.features["input_image"])

    def cast_column(self, name, feature):
        assert feature.decode is False  # the loader asks for undecoded bytes
        return FakeHubDataset([{**r, name: {"bytes": png_bytes(r[name]), "path": None}} for r in self.rows], feature)

    def __getitem__(self, key):
        return [r[key] for r in self.rows] if isinstance(key, str) else self.rows[key]


def test_hub_dataset_reads_hq_edit_columns_as_undecoded_bytes(monkeypatch):
    image = Image.new("RGB", (8, 8), "red")
    rows = [{"input_image": image, "edit": "make it blue", "output_image": None},
            {"input_image": image, "edit": None, "output_image": None}]
    fake = types.ModuleType("datasets")
    fake.Image = type("Image", (), {"__init__": lambda self, decode=True: setattr(self, "decode", decode)})
    fake.load_dataset = lambda name, split: FakeHubDataset(rows, fake.Image())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dataset = open_edit_dataset("UCSC-VLAA/HQ-Edit", "input_image", "edit")
    assert len(dataset) == 1
    assert dataset.instructions(0, random.Random()) == ("make it blue",)
    assert np.array_equal(np.asarray(decode_image(dataset.raw_image(0))), np.asarray(image))
    with pytest.raises(DataError, match="no column"):
        open_edit_dataset("UCSC-VLAA/HQ-Edit", "source_img", "edit")


def test_image_folder_lists_images_only(tmp_path):
    write_images(tmp_path / "faces", 2)
    (tmp_path / "faces" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "faces" / "notes.txt").write_text("x")
    dataset = ImageFolderDataset(tmp_path / "faces", ["a"], 3)
    assert [p.name for p in dataset.files] == ["face_0.png", "face_1.png"]
    with pytest.raises(DataError, match=f"^images_dataset_path not found: {re.escape(str(tmp_path / 'missing'))}$"):
        ImageFolderDataset(tmp_path / "missing", ["a"], 3)
    with pytest.raises(DataError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "faces" / "face_0.png", ["a"], 3)


def test_image_folder_given_as_a_relative_path(tmp_path, monkeypatch):
    """A relative images_dataset_path (as in a YAML config run from the repository) reads every image."""
    write_images(tmp_path / "data" / "faces", 2)
    monkeypatch.chdir(tmp_path)
    dataset = ImageFolderDataset(Path("data/faces"), ["a"], 3)
    assert decode_image(dataset.raw_image(1)).size == decode_image((tmp_path / "data/faces/face_1.png").read_bytes()).size
    assert dataset.describe(0) == str(Path("data/faces/face_0.png"))


def test_pps_draw_is_uniform_over_all_ordered_permutations():
    """The release samples a prompt from the list of every ordered permutation of 1..3 of its edits."""
    edits = ["a", "b", "c", "d"]
    rng = random.Random(0)
    counts = collections.Counter(draw_instructions(edits, 3, rng) for _ in range(40_000))
    everything = {p for n in (1, 2, 3) for p in itertools.permutations(edits, n)}  # 4 + 12 + 24 = 40
    assert set(counts) == everything
    assert min(counts.values()) > 800 and max(counts.values()) < 1200  # expected 1000 each (+-6.3 sd)
    assert all(len(draw_instructions(edits, 1, rng)) == 1 for _ in range(20))
    assert len(draw_instructions(["a", "b"], 5, rng)) <= 2  # never more than there are edits


def test_data_order_is_a_fresh_permutation_each_pass_and_reproducible():
    order = DataOrder(7, seed=1)
    passes = [[order.index(s) for s in range(e * 7, (e + 1) * 7)] for e in range(3)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert passes[0] != passes[1]
    again = DataOrder(7, seed=1)
    assert [again.index(s) for s in (15, 3, 20)] == [passes[2][1], passes[0][3], passes[2][6]]  # any order of access
    assert [DataOrder(7, seed=2).index(s) for s in range(7)] != passes[0]
    assert derived_seed(0, "noise", 1) != derived_seed(0, "noise", 2) != derived_seed(1, "noise", 1)
