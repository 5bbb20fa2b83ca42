"""The few-shot loaders read tiny datasets built here in each on-disk layout; episodes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ._examples import load_example
from ._optional import require

data = load_example("fewshot_data")
Image = require("PIL.Image", "pip install pillow")


def make_omniglot(root: Path, characters: dict[str, dict[str, int]], size: int = 105) -> None:
    """``{folder/alphabet: {character: images}}``; image ``j`` of a character is white with
    a black square in its top-left quadrant (strokes are black in Omniglot)."""
    for alphabet, chars in characters.items():
        for character, count in chars.items():
            folder = root / "omniglot-py" / alphabet / character
            folder.mkdir(parents=True)
            for j in range(count):
                pixels = np.full((size, size), 255, dtype=np.uint8)
                pixels[: size // 2, : size // 2] = 0
                Image.fromarray(pixels).convert("1").save(folder / f"{character}_{j:02d}.png")


TINY = {
    "images_background/Alpha": {"a1": 3, "a2": 3, "a3": 3},
    "images_evaluation/Beta": {"b1": 3, "b2": 3},
}


def test_omniglot_splits_characters_and_rotates_them(tmp_path: Path) -> None:
    make_omniglot(tmp_path, TINY)
    splits = {
        name: data.load_omniglot(
            tmp_path, name, image_size=8, train_characters=2, validation_characters=1
        )
        for name in ("train", "validation", "test")
    }
    sizes = {name: len(split.images) for name, split in splits.items()}
    assert sizes == {"train": 2, "validation": 1, "test": 2}
    for split in splits.values():
        assert split.num_classes == 4 * len(split.images)  # ×4 rotations
        assert split.image_shape == (1, 8, 8)
        assert all(images.shape == (3, 1, 8, 8) for images in split.images)
        assert all(images.dtype == torch.uint8 for images in split.images)
    # The same folder given as omniglot-py itself, and the same seed: the same split.
    again = data.load_omniglot(
        tmp_path / "omniglot-py", "train", image_size=8, train_characters=2,
        validation_characters=1,
    )  # fmt: skip
    for a, b in zip(again.images, splits["train"].images):
        assert torch.equal(a, b)

    # Strokes are bright after loading: the square is in the top-left quadrant; class
    # 4c + k is base class c turned k quarter turns (counter-clockwise).
    train = splits["train"]
    upright = train.class_images(0, torch.arange(3))
    assert upright.shape == (3, 1, 8, 8) and upright.dtype == torch.float32
    assert float(upright[:, :, :4, :4].mean()) > 0.9
    assert float(upright[:, :, 4:, :].mean()) < 0.1 and float(upright[:, :, :, 4:].mean()) < 0.1
    turned = train.class_images(1, torch.arange(3))  # 90°: top-left → bottom-left
    assert float(turned[:, :, 4:, :4].mean()) > 0.9
    assert float(turned[:, :, :4, :].mean()) < 0.1
    half = train.class_images(2, torch.arange(3))  # 180°: → bottom-right
    assert float(half[:, :, 4:, 4:].mean()) > 0.9


def test_omniglot_splits_are_disjoint_and_cover_every_character(tmp_path: Path) -> None:
    # Give each character its own number of images, so each split's classes are known.
    characters = {
        "images_background/Alpha": {"a1": 1, "a2": 2, "a3": 3},
        "images_evaluation/Beta": {"b1": 4, "b2": 5},
    }
    make_omniglot(tmp_path, characters)
    seen = []
    for name in ("train", "validation", "test"):
        split = data.load_omniglot(
            tmp_path, name, image_size=4, train_characters=2, validation_characters=1
        )
        seen += [int(images.shape[0]) for images in split.images]
    assert sorted(seen) == [1, 2, 3, 4, 5]


def test_omniglot_missing_or_malformed_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images_background.*Nothing is downloaded"):
        data.load_omniglot(tmp_path, "train")
    make_omniglot(tmp_path, TINY)
    with pytest.raises(ValueError, match=r"found 5 character folders.*needs at least 1201"):
        data.load_omniglot(tmp_path, "train")
    with pytest.raises(ValueError, match="`split` should be one of"):
        data.load_omniglot(tmp_path, "training", train_characters=2, validation_characters=1)
    empty = tmp_path / "omniglot-py" / "images_evaluation" / "Beta" / "b3"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"b3 holds no \.png images"):
        for name in ("train", "validation", "test"):
            data.load_omniglot(tmp_path, name, train_characters=2, validation_characters=1)
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read the image .*broken\.png"):
        for name in ("train", "validation", "test"):
            data.load_omniglot(tmp_path, name, train_characters=2, validation_characters=1)


def make_mini_imagenet(root: Path, classes: int = 5, per_class: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = {}
    for split in ("train", "validation", "test"):
        pixels = rng.integers(0, 256, size=(classes * per_class, 84, 84, 3), dtype=np.uint8)
        names = [f"n0{split[0]}{c}" for c in range(classes)]
        index = {n: list(range(c * per_class, (c + 1) * per_class)) for c, n in enumerate(names)}
        raw[split] = {"image_data": pixels, "class_dict": index}
        with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as handle:
            pickle.dump(raw[split], handle)
    return raw


def test_mini_imagenet_reads_the_pickles(tmp_path: Path) -> None:
    raw = make_mini_imagenet(tmp_path)
    for name in ("train", "validation", "test"):
        split = data.load_mini_imagenet(tmp_path, name)
        assert split.num_classes == 5 and split.image_shape == (3, 84, 84)
        for c, class_name in enumerate(sorted(raw[name]["class_dict"])):
            want = raw[name]["image_data"][raw[name]["class_dict"][class_name]]
            got = split.images[c].permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(got, want)
        one = split.class_images(2, torch.tensor([1]))
        want = raw[name]["image_data"][2 * 4 + 1].transpose(2, 0, 1) / 255.0
        np.testing.assert_allclose(one[0].numpy(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "is not a readable pickle"),
        (pickle.dumps([1, 2]), "should hold a dict with keys 'image_data' and 'class_dict'"),
        (pickle.dumps({"image_data": 1}), r"Found \['image_data'\]"),
        (
            pickle.dumps({"image_data": np.zeros((2, 84, 84, 3)), "class_dict": {"a": [0]}}),
            r"should be uint8 \[n, H, W, 3\]. Found torch.float64",
        ),
        (
            pickle.dumps(
                {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 2]}}
            ),
            r"\['class_dict'\]\['a'\] should list indices into the 2 images",
        ),
        (
            pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {}}),
            "should be a non-empty dict",
        ),
    ],
)
def test_mini_imagenet_malformed_gives_clear_errors(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.load_mini_imagenet(tmp_path, "test")


def test_mini_imagenet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-train\.pkl.*Nothing is"):
        data.load_mini_imagenet(tmp_path, "train")
    with pytest.raises(ValueError, match="`split` should be one of"):
        data.load_mini_imagenet(tmp_path, "val")


def test_digits_split_classes_0_to_4_and_5_to_9() -> None:
    datasets = require("sklearn.datasets", "pip install scikit-learn")
    digits = datasets.load_digits()
    counts = np.bincount(digits.target)
    for name, classes in (("train", range(5)), ("test", range(5, 10))):
        split = data.load_digits(name)
        assert split.num_classes == 5 and split.image_shape == (1, 8, 8)
        assert [int(images.shape[0]) for images in split.images] == [counts[c] for c in classes]
        first = split.class_images(0, torch.tensor([0]))[0, 0].numpy()
        want = digits.images[digits.target == classes[0]][0] / 16.0
        np.testing.assert_allclose(first, want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="`split` should be one of"):
        data.load_digits("validation")


def _labelled_split(sizes: list[int]) -> object:
    """Image j of class c is constant 1000·c + j (as uint8 can't: int16 → float)."""
    images = [
        (1000 * c + torch.arange(n, dtype=torch.int32)).view(n, 1, 1, 1).expand(n, 1, 2, 2)
        for c, n in enumerate(sizes)
    ]
    return data.FewShotSplit("labelled", images, max_value=1.0)


def test_episodes_label_classes_consistently_and_never_reuse_an_image() -> None:
    split = _labelled_split([30] * 7)
    gen = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = data.sample_episodes(split, 4, ways=5, shots=2, queries=3, gen=gen)
    assert xs.shape == (4, 10, 1, 2, 2) and xq.shape == (4, 15, 1, 2, 2)
    assert ys.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 4
    assert yq.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]] * 4
    drawn_classes = []
    for t in range(4):
        support, query = xs[t, :, 0, 0, 0].long(), xq[t, :, 0, 0, 0].long()
        # A label stands for one class within an episode, in support and query alike.
        for label in range(5):
            classes = set((support[ys[t] == label] // 1000).tolist())
            classes |= set((query[yq[t] == label] // 1000).tolist())
            assert len(classes) == 1
        episode_classes = set((support // 1000).tolist())
        assert len(episode_classes) == 5  # distinct classes
        images = support.tolist() + query.tolist()
        assert len(set(images)) == len(images)  # no image twice
        drawn_classes.append(tuple((support[::2] // 1000).tolist()))
    assert len(set(drawn_classes)) > 1  # episodes differ in classes or label order


def test_episode_errors_name_the_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="`ways` is 4 but labelled has only 3 classes"):
        data.sample_episodes(_labelled_split([5, 5, 5]), 1, 4, 1, 1, gen)
    with pytest.raises(ValueError, match=r"class 1 has 3 images; .* shots \+ queries = 4"):
        data.sample_episodes(_labelled_split([5, 3]), 1, 2, 1, 3, gen)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_hostile_pickle_is_refused_without_running(tmp_path: Path) -> None:
    make_mini_imagenet(tmp_path)
    marker = tmp_path / "ran.txt"
    hostile = {
        "image_data": np.zeros((2, 84, 84, 3), np.uint8),
        "class_dict": {"a": [0, 1]},
        "extra": _Payload(marker),
    }
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    path.write_bytes(pickle.dumps(hostile))
    with pytest.raises(
        ValueError,
        match=r"mini-imagenet-cache-test\.pkl is not a readable pickle: it names (builtins|io)\.open",
    ):
        data.load_mini_imagenet(tmp_path, "test")
    assert not marker.exists(), "the payload ran"
    # The same file without the payload loads (the refusal is about the payload alone).
    del hostile["extra"]
    path.write_bytes(pickle.dumps(hostile))
    assert data.load_mini_imagenet(tmp_path, "test").num_classes == 1
