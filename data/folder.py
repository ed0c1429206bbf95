"""Face image folders (the VGGFace2 subset, or any faces): ``ROOT/{train,test}/<identity>/*``.

Read with torchvision's ``ImageFolder`` (its loader converts greyscale and RGBA to RGB).
Class indices come from the sorted identity names of ``train/`` (``data.assign_labels``).
Transforms are the authors' for VGGFace2 at 112x112 (resize 120, random crop 112, horizontal
flip for training; center crop for test; mean 0.5 / std 0.5), scaled to other sizes.
"""
import os

import torchvision.datasets as tvd
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


class FaceFolder(tvd.ImageFolder):
    """One split of an identity-per-folder face set.

    Args:
        root (str): dataset folder holding ``train/`` and ``test/``.
        split (str): 'train' or 'test'.
        image_size (int): side of the square network input, in pixels.
        train_transform (bool): use the training augmentation (default False: test transform).

    Attributes (besides ImageFolder's): ``raw_labels`` (identity folder name per image),
    ``labels`` int64 tensor of class indices (set by ``data.assign_labels``).

    Raises: UserInputError naming the folder when it is missing or holds no images.
    """

    def __init__(self, root, split, image_size, train_transform=False):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserInputError(f"{folder}: no such folder (an image-folder dataset needs "
                                 f"{split}/<identity>/<images>)")
        try:
            super().__init__(folder, transform=face_transforms(image_size, train_transform),
                             allow_empty=True)
        except FileNotFoundError as e:
            raise UserInputError(f"{folder}: {e}") from None
        if not self.samples:
            raise UserInputError(f"{folder}: no images found (expected {split}/<identity>/*.jpg|png|pgm...)")
        self.split, self.image_size = split, image_size
        self.raw_labels = [self.classes[t] for t in self.targets]

    def set_labels(self, labels):
        """Replace the class index of every sample by ``labels`` (list of int, one per sample)."""
        self.samples = [(path, int(y)) for (path, _), y in zip(self.samples, labels)]
        self.imgs = self.samples
        self.targets = [int(y) for y in labels]
