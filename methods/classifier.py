"""The classifier-code baseline (Sablayrolles, Douze, Usunier, Jegou, "How should we evaluate
supervised hashing?", ICASSP 2017): a classifier whose predicted class is written as that class's
codeword. Under the paper's protocol (queries and database of the trained identities) retrieval
has become classification, and this trivial code beats published supervised hashing methods; on
identities held out of training (``dcdh_train.py --unseen-identities K``) it can only return the
codeword of some trained identity, which is what that protocol exposes. It is a reference point,
not a hashing method to deploy.

Each class ``c`` owns one fixed codeword ``w_c`` in {-1, +1}^K, far apart from the others: the
CSQ hash-center construction (``methods.csq.make_centers``: Hadamard rows when K is a power of 2
and C <= 2K, else seeded greedy far-apart random words with a checked minimum Hamming distance).
The network's K real-valued outputs ``u`` (B, K) are class scores against the codewords::

    score_ic = scale * <u_i, w_c> / sqrt(K)          (B, C)
    ce       = mean_i CE(score_i, y_i)               total = ce

The 1/sqrt(K) keeps the scores of the unit-variance outputs of our networks' final BatchNorm
near unit variance for random codewords at any code length (the network's BN weight can still
grow the margin); ``scale`` (1) multiplies them. The code of an image (``encode``) is the codeword
of its top-scoring class, ``w_argmax_c <u, w_c>`` (ties: the lowest class index), so the code
set holds exactly one code per class and two images share a code iff they are given the same
class. ``scale`` does not change the code. The evaluated ranking is by Hamming distance between
codewords as for every method; ``evaluation.py --real`` ranks by the cosine of ``u`` itself.

Differences from the paper (stated): Sablayrolles et al. train a classifier with free weights and
then assign each class a codeword; here the classifier's weights are the fixed codewords, so the
network's K outputs are its features and a cross-entropy trains them directly (one network and
one loss like every other method of the registry, on the shared recipe of the backbone).

Shapes/dtypes: ``forward(codes, labels, index=None)``: codes float (B, K), labels int64 (B,) in
[0, C), index ignored -> dict of 0-d tensors ``ce``, ``total``. ``encode(outputs)``: float (B, K)
-> float (B, K) of +-1 (rows of ``codewords``). Errors: ValueError for C < 2, K < 1, bad
hyperparameters, bad shapes, (CPU) labels out of range. Warning when C > 2^K (codewords repeat).
"""
import math

import torch.nn.functional as F

from .base import HashingMethod, Hyper, check_batch
from .csq import make_centers, min_hamming_distance


class Classifier(HashingMethod):
    """Softmax classifier over fixed far-apart codewords; code = the predicted class's codeword.

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        scale (float): multiplies the scores ``<u, w_c> / sqrt(K)`` (1).
        centers (str): codeword construction of ``methods.csq.make_centers`` (auto).
        seed (int): seed of a random construction (0).

    Attributes: ``codewords`` buffer (C, K) float32 of +-1 (persistent); ``min_distance`` (int).
    """
    name = "classifier"
    hyperparameters = {
        "scale": Hyper(1.0, "multiplier of the class scores <u, w_c> / sqrt(K)", positive=True),
        "centers": Hyper("auto", "codewords as CSQ's hash centers: auto (Hadamard when K is a power of 2 "
                                 "and C <= 2K, else maxmin), maxmin (seeded greedy far-apart random), "
                                 "bernoulli (seeded plain random)",
                         choices=("auto", "maxmin", "bernoulli")),
        "seed": Hyper(0, "seed of the random codeword construction", minimum=0),
    }

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        words = make_centers(self.hparams["centers"], self.num_classes, self.bits, self.hparams["seed"])
        self.register_buffer("codewords", words)
        self.min_distance = min_hamming_distance(words)
        self.register_load_state_dict_post_hook(_refresh_min_distance)
        self.factor = self.hparams["scale"] / math.sqrt(self.bits)

    def scores(self, outputs):
        """Class scores ``scale * u W^T / sqrt(K)``: float (B, K) -> float (B, C)."""
        return self.factor * (outputs @ self.codewords.to(outputs.dtype).t())

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index, bits=self.bits)
        ce = F.cross_entropy(self.scores(codes), labels)
        return {"ce": ce, "total": ce}

    def encode(self, outputs):
        """The codeword of each row's top-scoring class: float (B, K) -> float (B, K) of +-1
        (same dtype and device as ``outputs``); ties go to the lowest class index."""
        best = (outputs @ self.codewords.to(outputs.dtype).t()).argmax(1)
        return self.codewords.to(outputs.dtype)[best]

    def extra_repr(self):
        return super().extra_repr() + f", min_distance={self.min_distance}"


def _refresh_min_distance(module, incompatible_keys):
    module.min_distance = min_hamming_distance(module.codewords.cpu())
