"""Face image folders (the VGGFace2 subset, or any faces): ``ROOT/{train,test}/<identity>/*``.

Read with torchvision's ``ImageFolder`` (its loader converts greyscale and RGBA to RGB).
Class indices come from the sorted identity names of ``train/`` (``data.assign_labels``).
Transforms are the authors' for VGGFace2 at 112x112 (resize 120, random crop 112, horizontal
flip for training; center crop for test; mean 0.5 / std 0.5), scaled to other sizes.
"""
import os
import sys

import torchvision.datasets as tvd
from PIL import Image
import torchvision.transforms as T

from utils.errors import UserInputError


def face_transforms(image_size, train):
    """Training or test transform for square ``image_size`` inputs.

    Resize the short side to ``round(image_size * 120 / 112)``, then a random crop and a
    horizontal flip (train) or a center crop (test), then ToTensor and Normalize(0.5, 0.5).
    Output: float32 (3, image_size, image_size) in [-1, 1].
    """
    resize = int(round(image_size * 120 / 112))
    steps = [T.Resize(resize)]
    steps += [T.RandomCrop(image_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return T.Compose(steps)


def _too_large(path, error):
    """The UserInputError for an image PIL refuses to decode (``Image.DecompressionBombError``:
    more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, a possible decompression bomb)."""
    return UserInputError(f"{path}: image too large to decode safely ({error})")


def load_rgb(path):
    """Open an image file as RGB (greyscale, palette and RGBA are converted).

    Raises: UserInputError naming the file when it cannot be decoded or has more pixels than
    PIL decodes (``Image.DecompressionBombError``, e.g. a 20000x20000 PNG).
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserInputError(f"{path}: unreadable image ({e})") from None


def open_image(path, flag="image"):
    """Open ``path`` as an RGB PIL image (``data.folder.load_rgb``).

    Raises: UserInputError naming the file when it is missing, a folder, or not decodable.
    """
    if os.path.isdir(path):
        raise UserInputError(f"{flag} {path}: is a folder, not an image file")
    if not os.path.isfile(path):
        raise UserInputError(f"{flag} {path}: no such file")
    return load_rgb(path)


def decodable(path):
    """Whether PIL decodes ``path`` fully. Raises: UserInputError for an image PIL refuses as
    too large (a decompression bomb is an error, not a file to skip quietly)."""
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: verify() misses truncated JPEG data
        return True
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except Exception:  # PIL raises many types for broken files
        return False


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


class FaceFolder(tvd.ImageFolder):
    """One split of an identity-per-folder face set.

    Args:
        root (str): dataset folder holding ``train/`` and ``test/``.
        split (str): 'train' or 'test'.
        image_size (int): side of the square network input, in pixels.
        train_transform (bool): use the training augmentation (default False: test transform).

    Attributes (besides ImageFolder's): ``raw_labels`` (identity folder name per image),
    ``labels`` int64 tensor of class indices (set by ``data.assign_labels``).

    Unreadable or corrupt image files (PIL cannot open or verify them) are skipped with a
    warning that lists them; identity folders without images are ignored with a warning.

    Raises: UserInputError naming the folder when it is missing or holds no readable images,
    or naming the file for an image too large for PIL to decode (a decompression bomb).
    """

    def __init__(self, root, split, image_size, train_transform=False):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserInputError(f"{folder}: no such folder (an image-folder dataset needs "
                                 f"{split}/<identity>/<images>)")
        try:
            super().__init__(folder, transform=face_transforms(image_size, train_transform),
                             loader=load_rgb, allow_empty=True)
        except FileNotFoundError as e:
            raise UserInputError(f"{folder}: {e}") from None
        bad = [p for p, _ in self.samples if not decodable(p)]
        if bad:
            shown = ", ".join(os.path.relpath(p, folder) for p in bad[:10])
            _warn(f"{folder}: skipped {len(bad)} unreadable image file(s): {shown}"
                  + (" ..." if len(bad) > 10 else ""))
            bad = set(bad)
            self.samples = [s for s in self.samples if s[0] not in bad]
            self.imgs, self.targets = self.samples, [t for _, t in self.samples]
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty and self.samples:
            _warn(f"{folder}: ignored {len(empty)} identity folder(s) without images: "
                  + ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
        if not self.samples:
            raise UserInputError(f"{folder}: no images found (expected {split}/<identity>/*.jpg|png|pgm...)")
        self.split, self.image_size = split, image_size
        self.raw_labels = [self.classes[t] for t in self.targets]

    def set_labels(self, labels):
        """Replace the class index of every sample by ``labels`` (list of int, one per sample)."""
        self.samples = [(path, int(y)) for (path, _), y in zip(self.samples, labels)]
        self.imgs = self.samples
        self.targets = [int(y) for y in labels]
