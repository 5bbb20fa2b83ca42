"""Few-shot classification data: N-way K-shot episodes from data already on disk.

Nothing here downloads. Three sources:

* Omniglot in the layout of the original release (and of torchvision's download)::

      ROOT/omniglot-py/images_background/<alphabet>/<character>/*.png
      ROOT/omniglot-py/images_evaluation/<alphabet>/<character>/*.png

  The 1623 characters of both folders, sorted by path and shuffled with a fixed seed, are
  split 1100 / 100 / 423 into train / validation / test characters (learn2learn's split
  sizes); each character gives four classes, rotated by 0°, 90°, 180° and 270° (Santoro
  et al., 2016; Finn et al., 2017). Images are resized to 28×28 and inverted (strokes 1).
* miniImageNet as the pickles of Ravi & Larochelle's split used by learn2learn::

      ROOT/mini-imagenet-cache-{train,validation,test}.pkl

  each a dict ``{"image_data": uint8 [n, 84, 84, 3], "class_dict": {name: [indices]}}``
  (64 / 16 / 20 classes of 600 images). A pickle can run any code it names, so these
  are read by a restricted unpickler that admits only numpy arrays and dtypes, dicts,
  lists, strings and numbers, and refuses anything else, naming the file, before it runs.
* scikit-learn's handwritten digits (8×8, 16 grey levels, shipped inside scikit-learn):
  classes 0–4 for meta-training, 5–9 for meta-testing.

A split is a list of per-class uint8 image tensors; :func:`sample_episodes` draws a
meta-batch of episodes from it as float tensors in [0, 1].
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FewShotSplit",
    "load_digits",
    "load_mini_imagenet",
    "load_omniglot",
    "sample_episodes",
]

OMNIGLOT_FOLDERS = ("images_background", "images_evaluation")
MINI_IMAGENET_SPLITS = ("train", "validation", "test")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class FewShotSplit:
    """The classes of one split.

    Attributes:
        name: e.g. ``"omniglot/train"``, for messages.
        images: one uint8 tensor ``[n_c, C, H, W]`` per base class.
        rotations: 4 for Omniglot: base class ``c`` gives classes ``4c + k``, rotated by
            ``k``·90°; 1 otherwise.
        max_value: the value of white (255, or 16 for the digits).
    """

    name: str
    images: list[Tensor]
    rotations: int = 1
    max_value: float = 255.0

    @property
    def num_classes(self) -> int:
        return len(self.images) * self.rotations

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images[0].shape[1:]
        return int(c), int(h), int(w)

    def class_images(self, label: int, index: Tensor) -> Tensor:
        """Images ``index`` of class ``label`` as floats in [0, 1]."""
        base, quarter_turns = divmod(label, self.rotations)
        chosen = self.images[base][index].float() / self.max_value
        return torch.rot90(chosen, quarter_turns, dims=(-2, -1)) if quarter_turns else chosen

    def class_size(self, label: int) -> int:
        return int(self.images[label // self.rotations].shape[0])


def sample_episodes(
    split: FewShotSplit, tasks: int, ways: int, shots: int, queries: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tasks`` N-way K-shot episodes: support and query images and labels.

    Each episode draws ``ways`` distinct classes, labelled 0 … ways−1 in a random order,
    and ``shots + queries`` distinct images of each. Returns ``xs [tasks, ways·shots, C,
    H, W]``, ``ys [tasks, ways·shots]``, ``xq [tasks, ways·queries, C, H, W]``, ``yq``.
    """
    if ways > split.num_classes:
        raise ValueError(f"`ways` is {ways} but {split.name} has only {split.num_classes} classes.")
    xs, ys, xq, yq = [], [], [], []
    for _ in range(tasks):
        classes = torch.randperm(split.num_classes, generator=gen)[:ways].tolist()
        support, query = [], []
        for label in classes:
            size = split.class_size(label)
            if size < shots + queries:
                raise ValueError(
                    f"{split.name}: class {label} has {size} images; an episode needs "
                    f"shots + queries = {shots + queries}."
                )
            index = torch.randperm(size, generator=gen)[: shots + queries]
            images = split.class_images(label, index)
            support.append(images[:shots])
            query.append(images[shots:])
        xs.append(torch.cat(support))
        xq.append(torch.cat(query))
        ys.append(torch.arange(ways).repeat_interleave(shots))
        yq.append(torch.arange(ways).repeat_interleave(queries))
    return torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq)


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"`split` should be one of {allowed}. Found {split!r}.")


# -- Omniglot ------------------------------------------------------------------------------


def load_omniglot(
    root: str | Path,
    split: str,
    *,
    image_size: int = 28,
    train_characters: int = 1100,
    validation_characters: int = 100,
    seed: int = 0,
) -> FewShotSplit:
    """The Omniglot characters of ``split`` (see the module docstring), ×4 rotations.

    ``root`` may be the folder that holds ``omniglot-py`` or ``omniglot-py`` itself.
    Raises FileNotFoundError when the layout is missing, ValueError when it is malformed.
    """
    _check_split(split, SPLITS)
    base = Path(root)
    if not (base / OMNIGLOT_FOLDERS[0]).is_dir() and (base / "omniglot-py").is_dir():
        base = base / "omniglot-py"
    missing = [str(base / f) for f in OMNIGLOT_FOLDERS if not (base / f).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Omniglot: expected the folders {missing} (layout "
            "omniglot-py/images_background|images_evaluation/<alphabet>/<character>/*.png, "
            f"as in the original release) under {Path(root)}. Nothing is downloaded: "
            "unpack images_background.zip and images_evaluation.zip there first."
        )
    characters = sorted(
        character
        for folder in OMNIGLOT_FOLDERS
        for alphabet in sorted((base / folder).iterdir())
        if alphabet.is_dir()
        for character in alphabet.iterdir()
        if character.is_dir()
    )
    needed = train_characters + validation_characters + 1
    if len(characters) < needed:
        raise ValueError(
            f"Omniglot: found {len(characters)} character folders under {base}; the split "
            f"{train_characters} / {validation_characters} / rest needs at least {needed}."
        )
    random.Random(seed).shuffle(characters)
    bounds = {
        "train": (0, train_characters),
        "validation": (train_characters, train_characters + validation_characters),
        "test": (train_characters + validation_characters, len(characters)),
    }[split]
    chosen = characters[bounds[0] : bounds[1]]
    images = [_read_character(folder, image_size) for folder in chosen]
    return FewShotSplit(f"omniglot/{split}", images, rotations=4)


def _read_character(folder: Path, image_size: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"Omniglot: the character folder {folder} holds no .png images.")
    pixels = []
    for file in files:
        try:
            with Image.open(file) as image:
                grey = image.convert("L").resize((image_size, image_size), Image.LANCZOS)
                data = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Omniglot: cannot read the image {file}: {error}") from error
        pixels.append(255 - data.view(1, image_size, image_size))  # strokes bright
    return torch.stack(pixels)


# -- miniImageNet --------------------------------------------------------------------------

#: What a miniImageNet pickle may name: numpy's array and dtype reconstructors (numpy 1 and
#: 2 spell the module differently). Dicts, lists, strings and numbers need no name.
_PICKLE_ALLOWED = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{prefix}.multiarray", "_reconstruct"),
        (f"{prefix}.multiarray", "scalar"),
        (f"{prefix}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _SplitUnpickler(pickle.Unpickler):
    """Unpickles only what the split format holds (numpy arrays and dtypes, dicts, lists,
    strings, numbers): any other global in the file (a function to call, a class to
    build) is refused before it runs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a miniImageNet split never holds; "
                "refusing to load it (a pickle can run any code it names)"
            )
        return super().find_class(module, name)


def load_mini_imagenet(root: str | Path, split: str) -> FewShotSplit:
    """The classes of ``ROOT/mini-imagenet-cache-{split}.pkl`` (see the module docstring).

    Raises FileNotFoundError when the file is missing, ValueError when it is malformed.
    """
    _check_split(split, MINI_IMAGENET_SPLITS)
    path = Path(root) / f"mini-imagenet-cache-{split}.pkl"
    if not path.is_file():
        raise FileNotFoundError(
            f"miniImageNet: expected {path} (one of mini-imagenet-cache-"
            "{train,validation,test}.pkl, the pickles learn2learn uses). Nothing is "
            "downloaded: put the files there first."
        )
    try:
        with path.open("rb") as handle:
            data = _SplitUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
        raise ValueError(f"miniImageNet: {path} is not a readable pickle: {error}") from error
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"miniImageNet: {path} should hold a dict with keys 'image_data' and "
            f"'class_dict'. Found {found}."
        )
    pixels = torch.as_tensor(data["image_data"])
    if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(
            f"miniImageNet: {path}['image_data'] should be uint8 [n, H, W, 3]. Found "
            f"{pixels.dtype} {list(pixels.shape)}."
        )
    classes = data["class_dict"]
    if not isinstance(classes, dict) or not classes:
        raise ValueError(
            f"miniImageNet: {path}['class_dict'] should be a non-empty dict "
            f"{{class name: [image indices]}}. Found {type(classes).__name__}."
        )
    images = []
    for name in sorted(classes):
        index = torch.as_tensor(list(classes[name]), dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= pixels.shape[0]:
            raise ValueError(
                f"miniImageNet: {path}['class_dict'][{name!r}] should list indices into "
                f"the {pixels.shape[0]} images. Found {index.tolist()[:5]}…"
            )
        images.append(pixels[index].permute(0, 3, 1, 2).contiguous())
    return FewShotSplit(f"miniimagenet/{split}", images)


# -- scikit-learn's digits -----------------------------------------------------------------


def load_digits(split: str) -> FewShotSplit:
    """Digits 0–4 (``"train"``) or 5–9 (``"test"``), 8×8 with values 0–16."""
    _check_split(split, ("train", "test"))
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "The digits data ships inside scikit-learn: pip install scikit-learn"
        ) from error
    digits = sklearn_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(digits.target)
    classes = range(5) if split == "train" else range(5, 10)
    return FewShotSplit(f"digits/{split}", [pixels[labels == c] for c in classes], max_value=16.0)
