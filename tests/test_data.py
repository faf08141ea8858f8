import json

import numpy as np
import pytest
from PIL import Image

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.images import find_images, load_mask, load_rgb, square_resize


def write_dataset(root, names=("a.png", "b.png", "c.png"), splits=("train", "train", "test")):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(root / "images" / name)
        Image.fromarray(np.full((40, 60), i, np.uint8)).save(root / "masks" / name)
    (root / "classes.json").write_text(json.dumps({"0": "void", "1": "uvula", "2": "tonsil"}))
    (root / "split.csv").write_text("file,patient,split\n" + "".join(f"{n},p,{s}\n" for n, s in zip(names, splits)))


def test_dataset_folder_with_masks_classes_and_splits(tmp_path):
    write_dataset(tmp_path)
    dataset = ImageDataset(tmp_path)
    assert len(dataset) == 3 and dataset.has_masks and dataset.num_classes == 3
    assert dataset.classes[2] == "tonsil"
    images, masks = dataset.arrays(32, with_masks=True)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (3, 32, 32) and list(np.unique(masks)) == [0, 1, 2]
    test = ImageDataset(tmp_path, split="test")
    assert [s.name for s in test.samples] == ["c.png"]


def test_unknown_split_and_missing_folder_are_user_errors(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(InputError, match="split 'val' is empty"):
        ImageDataset(tmp_path, split="val")
    with pytest.raises(InputError, match="no such dataset folder"):
        ImageDataset(tmp_path / "nope")


def test_plain_folder_is_an_archive_without_masks(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(tmp_path / "sub" / "deeper" / "y.tif")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "sub" / "z.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageDataset(tmp_path)
    assert [s.name for s in dataset.samples] == ["sub/deeper/y.tif", "sub/z.bmp", "x.jpg"]
    assert not dataset.has_masks
    with pytest.raises(InputError, match="has no mask"):
        dataset.mask(0)


def test_16_bit_and_grayscale_images_become_rgb_uint8(tmp_path):
    ramp = (np.arange(256 * 4, dtype=np.uint16).reshape(4, 256) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = load_rgb(tmp_path / "ramp16.png")
    assert rgb.shape == (4, 256, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == round(ramp.max() / 65535 * 255)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_mask_must_be_single_channel(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="single-channel"):
        load_mask(tmp_path / "rgb.png")


def test_square_resize_crops_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the central square
    assert (square_resize(image, 40) == 255).all()
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 40:] = 7
    resized = square_resize(mask, 20, nearest=True)
    assert set(np.unique(resized)) == {0, 7}


def test_find_images_of_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        find_images(tmp_path / "missing")


def test_vocalfolds_reads_in_the_project_format(vocalfolds):
    dataset = ImageDataset(vocalfolds, split="test")
    assert len(dataset) == 44 and dataset.has_masks
    assert dataset.classes[1] == "vocal folds"
    assert dataset.mask(0).max() <= 6
