"""CSQ: Central Similarity Quantization (Yuan, Wang, Zhang, Tay, Jie, Liu, Feng, "Central Similarity
Quantization for Efficient Image and Video Retrieval", CVPR 2020, pp. 3083-3092; arXiv 1908.00347).
Reference code read (not copied): yuanli2333/Hadamard-Matrix-for-hashing (``train.py``,
``network.py``, ``Tutorial_ hash_center_generation.ipynb``) and swuxyj/DeepHash-pytorch ``CSQ.py``.

Every class ``y`` owns one fixed hash center ``c_y`` in {-1, +1}^K. With ``h = tanh(u)`` and the
network output ``u`` (B, K)::

    center = mean_{i,k} BCE((h_ik + 1) / 2, (c_{y_i,k} + 1) / 2)       (central similarity, Sec. 3.3)
    quant  = mean_{i,k} (|h_ik| - 1)^2                                  (quantization)
    total  = center + lambda_q * quant

Implemented exactly as that (both means over all B*K entries, as ``nn.BCELoss`` and ``.mean()``
in both reference codes), but the BCE is evaluated as ``BCE-with-logits(2u, (c+1)/2)``: since
``(tanh(u) + 1) / 2 == sigmoid(2u)`` the value and gradient are the same wherever the reference
is finite, and it stays exact where the reference saturates (see the differences below).

Hash centers (``centers`` hyperparameter, built once in ``__init__`` on the CPU, a persistent
buffer ``centers`` (C, K) float32 of +-1, saved in and restored from the checkpoint):

* ``auto`` (default): the Hadamard construction of the paper (Sec. 3.2) when K is a power of 2
  and C <= 2K — the rows of the Sylvester matrix ``H_K`` then of ``-H_K``, the first C of them
  (the reference's ``ha_2d[:C]``); every pair is at Hamming distance exactly K/2 (or K for a row
  and its negation). Otherwise ``maxmin``. Our code lengths 12/24/36/48 are no powers of 2 and the
  face sets have C = 299..8,631 > 2K, so the face runs all use ``maxmin``.
* ``maxmin``: Bernoulli(0.5) candidates from a ``torch.Generator`` seeded with ``seed``, kept
  greedily when at Hamming distance >= d from every center kept so far (``far_apart_codes``).
  The level d starts one above the largest value whose expected number of draws (estimate with
  independent balls) fits half the draw budget, and drops by one whenever a level spends its
  budget (2^19 draws). For K <= 16 a level is one pass over all 2^K words in a seeded random
  order instead, so a level fails only when no word is left, and the result meets the
  Gilbert-Varshamov bound ``d_GV`` (the largest d with ``C * V(K, d-1) <= 2^K``, ``V(K, r)``
  the size of a Hamming ball of radius r): every maximal code of minimum distance d has at
  least ``2^K / V(K, d-1)`` words. Deterministic for a seed (same torch version; the products
  are exact small integers, so BLAS and thread count do not matter). Measured, one thread of the
  2-core CPU (``python -m methods.csq``), as "min distance (seconds), d_GV, minimum distance of C
  plain Bernoulli draws with the same seed (the reference's unspaced random centers)"::

      K    C = 299                C = 530                C = 8,631
      12   2 (0.01 s), 2, 0       2 (0.02 s), 1, 0       0 (C > 2^12: centers repeat)
      24   7 (0.25 s), 6, 1       7 (0.43 s), 5, 1       4 (1.0 s), 3, 0
      36   12 (0.31 s), 10, 6     11 (0.78 s), 9, 6      9 (1.3 s), 7, 3
      48   17 (0.39 s), 15, 11    16 (0.93 s), 14, 9     13 (1.4 s), 12, 5

  Seeds 0..4 give the same values except 18 (48/299, seeds 2, 4) and 17 (48/530, seed 4).
  2 is optimal at K = 12 (no 299 words of 12 bits have pairwise distance 3: A(12, 3) = 256), and
  the optimum for large C is at most about K/2 (Plotkin bound); good algebraic codes do better
  than random packing (the extended Golay code gives 4,096 words of 24 bits at distance 8).
* ``bernoulli``: C plain Bernoulli(0.5) draws from the seeded generator (duplicates possible),
  the reference's distribution without any spacing, for ablations.

``min_distance`` (attribute) is the minimum pairwise Hamming distance of the centers, recomputed
when a checkpoint is loaded. When C > 2^K the centers cannot all differ: every word is used once
(seeded order) and then reused cyclically, ``min_distance`` is 0 and a warning is issued.

Shapes/dtypes: ``forward(codes, labels, index=None)``: codes float (B, K) (any float dtype; the
centers are cast to it), labels int64 (B,) in [0, C), index ignored -> dict of 0-d tensors
``center``, ``quant``, ``total``. No operation reads a device value back to the host.

Errors: ValueError for C < 2, K < 1, bad hyperparameters, bad shapes and (CPU) labels out of
range. Warning (not an error) when C > 2^K.

Differences from the paper and the reference code (all stated):

* tanh placement: the reference network ends in ``tanh`` and the loss sees ``h = tanh(u)``; our
  networks end in Linear + BatchNorm1d (DFHNet, SphereNet, torchvision hash layers), so the loss
  applies ``tanh`` itself. The evaluated code is ``sign(u) == sign(tanh(u))``: consistent.
  (The reference network has no BatchNorm before the tanh; ours has — a backbone difference
  shared by every method here.)
* BCE through logits: in float32 ``tanh(u)`` is exactly +-1 for |u| > ~9, where the reference's
  ``nn.BCELoss`` clamps ``log 0`` to -100 and passes no gradient (a wrongly signed saturated
  bit is never corrected); ``BCE-with-logits(2u, t)`` keeps the exact value and gradient there.
  Equal to the reference elsewhere (tested to 1e-10 in float64).
* Quantization term: both reference codes use ``(|h| - 1)^2`` (as the DESIGN table); the paper,
  as we recall it, writes a smooth (log cosh) form of ``| |h| - 1 |`` — we follow the code. The
  paper's text was not reachable from here, so section numbers are from memory and no equation
  numbers are given.
* lambda_q default 1e-4: DeepHash-pytorch ``CSQ.py`` (``lambda`` 0.0001) and the authors'
  README for AlexNet at 64 bits (``--lambda2 0.0001``; 0.001 at 16/32 bits, 0.05 for ResNet-50).
  The authors' optional pairwise term (``--lambda1``, 0 in every README command) is not
  implemented.
* Random centers: the authors' notebook draws balanced words (exactly K/2 of each sign) and
  redraws the whole set until min >= 20 and mean >= 32 (100 classes, 64 bits). DeepHash-pytorch's
  ``CSQ.py`` has the same fallback for C > 2K since 2020 (its ``get_hash_targets``): the first 2K
  rows from ``[H_K; -H_K]``, the rows beyond filled with balanced words, the whole fill redrawn at
  most 20 times, stopping once min > K/4 and mean >= K/2 (its Hadamard part needs K a power of 2;
  only its earliest ``CSQ.py`` lacked the fallback). We draw unrestricted Bernoulli(0.5) words and maximise
  the minimum distance greedily as above (``bernoulli`` keeps unspaced random centers available).
* Single-label only: the reference's multi-label centroid targets (NUS-WIDE, COCO) do not apply.
* Optimisation recipe: the paper trains ImageNet-pretrained ResNet-50/AlexNet (Adam; lr 1e-4
  with 0.01x on the backbone in the README commands, decay 0.7 every 10 epochs, 90 epochs,
  batch 64); DeepHash-pytorch uses Adam lr 1e-3, batch 128, 150 epochs. None fits the
  from-scratch DFHNet, so ``recipe = {}``: the shared backbone recipe (a stated change).
"""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .base import HashingMethod, Hyper, check_batch

EXHAUSTIVE_BITS = 16
"""Up to this code length ``far_apart_codes`` scans all 2^K words instead of sampling."""
DRAWS = 1 << 19
"""Candidate draws one level of ``far_apart_codes`` may spend (K > EXHAUSTIVE_BITS)."""
BATCH = 1024
"""Candidates drawn (and tested) at once."""
CHUNK = 512
"""Centers a candidate batch is compared with at once; failed candidates leave after each chunk."""


def hadamard(k):
    """Sylvester's Hadamard matrix ``H_k`` (equal to ``scipy.linalg.hadamard(k)``).

    Args: k (int): a power of 2, >= 1. Returns: float32 (k, k) of +-1 with ``H H^T = k I``.
    Raises: ValueError if k is not a positive power of 2.
    """
    if k < 1 or k & (k - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of 2, got {k}")
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_applies(num, bits):
    """Whether the paper's Hadamard centers exist for C = ``num`` classes and K = ``bits``."""
    return bits >= 1 and bits & (bits - 1) == 0 and num <= 2 * bits


def hadamard_centers(num, bits):
    """The first ``num`` rows of ``[H_K; -H_K]`` (float32 (num, bits)); pairwise distance >= K/2.

    Raises: ValueError if K is not a power of 2 or num > 2K.
    """
    if not hadamard_applies(num, bits):
        raise ValueError(f"Hadamard centers need K a power of 2 and C <= 2K, got K={bits}, C={num}")
    h = hadamard(bits)
    return torch.cat([h, -h], 0)[:num].contiguous()


def min_hamming_distance(codes, chunk=1024):
    """Minimum Hamming distance over all pairs of distinct rows of a +-1 matrix.

    Args: codes float (N, K) of +-1, N >= 2; chunk: rows compared at once (memory N * chunk).
    Returns: int in [0, K]. Raises: ValueError if N < 2.
    """
    n, k = codes.shape
    if n < 2:
        raise ValueError(f"a minimum pairwise distance needs at least 2 codes, got {n}")
    codes = codes.float()
    best = -k - 1  # largest inner product between different rows; distance = (K - ip) / 2
    for start in range(0, n, chunk):
        block = codes[start:start + chunk]
        ip = block @ codes.t()
        rows = torch.arange(block.shape[0])
        ip[rows, rows + start] = -k - 1  # not a row against itself
        best = max(best, int(ip.max()))
    return (k - best) // 2


def _ball_fraction(bits, radius):
    """Fraction of {-1, +1}^K within Hamming distance ``radius`` of a point (0 for radius < 0)."""
    return sum(math.comb(bits, i) for i in range(0, radius + 1)) / (1 << bits)


def gilbert_varshamov(num, bits):
    """Largest d with ``num * V(K, d-1) <= 2^K``: any maximal code of min distance d has at least
    ``2^K / V(K, d-1)`` words, so a greedy scan over all words reaches ``num`` centers at that d
    (0 when ``num > 2^K``)."""
    best = 0
    for d in range(1, bits + 1):
        if num * _ball_fraction(bits, d - 1) <= 1.0:
            best = d
    return best


def _expected_draws(num, bits, d):
    """Expected Bernoulli candidates greedy sampling at level d needs for ``num`` centers, were
    the balls of radius d-1 around the kept centers independent: ``sum_m q^-m``, q the fraction
    of words at distance >= d from one center. Returns a float (inf when out of reach)."""
    q = 1.0 - _ball_fraction(bits, d - 1)
    if q <= 0.0:
        return math.inf
    if q >= 1.0:
        return float(num)
    exponent = -num * math.log(q)
    if exponent > 700:
        return math.inf
    return (math.exp(exponent) - 1.0) / (1.0 / q - 1.0)


def _start_level(num, bits, budget):
    """Largest d in [1, K] whose ``_expected_draws`` fits ``budget`` (at least 1)."""
    for d in range(bits, 0, -1):
        if _expected_draws(num, bits, d) <= budget:
            return d
    return 1


def _all_words(bits, generator):
    """All 2^K words of +-1 (float32 (2^K, K)) in a seeded random order."""
    order = torch.randperm(1 << bits, generator=generator)
    return (((order[:, None] >> torch.arange(bits)) & 1) * 2 - 1).float()


def _survivors(cand, kept, bits, d):
    """Indices of the rows of ``cand`` at Hamming distance >= d from every row of ``kept``."""
    alive = torch.arange(cand.shape[0])
    limit = bits - 2 * d  # distance >= d  <=>  inner product <= K - 2d
    for start in range(0, kept.shape[0], CHUNK):
        if alive.numel() == 0:
            break
        ip = cand[alive] @ kept[start:start + CHUNK].t()
        alive = alive[ip.amax(1) <= limit]
    return alive


def _greedy_pick(cand, bits, d, limit):
    """Greedy scan of ``cand`` in order: keep a row when at distance >= d from the rows kept
    before it; at most ``limit`` rows. Returns the kept rows (float32 (n, K))."""
    ok = ((cand @ cand.t()) <= bits - 2 * d).numpy()
    avail = np.ones(cand.shape[0], dtype=bool)
    picked = []
    for i in range(cand.shape[0]):
        if len(picked) >= limit:
            break
        if avail[i]:
            picked.append(i)
            avail &= ok[i]
    return cand[picked]


def far_apart_codes(num, bits, generator=None, draws=DRAWS):
    """``num`` words of {-1, +1}^bits with a large minimum pairwise Hamming distance.

    Greedy random packing: candidates (Bernoulli(0.5) draws from ``generator``; for
    K <= ``EXHAUSTIVE_BITS`` all 2^K words in a seeded random order) are kept when at distance
    >= d from every word kept so far. d starts one above ``_start_level`` (the largest level whose
    expected cost fits ``draws / 2``) and drops by one whenever a level spends ``draws`` candidates
    (exhaustive mode: one full pass). Kept words stay, so the result's minimum distance is the
    last level (or more). With the exhaustive scan the result meets ``gilbert_varshamov``.

    Args: num (int) >= 1; bits (int) >= 1; generator: torch.Generator (CPU) or None (the global
    one); draws: candidate budget of one level (sampling mode).
    Returns: float32 (num, bits) of +-1 on the CPU.
    Warns: when num > 2^bits (words are then reused cyclically; min distance 0).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
    if bits <= 62 and num > (1 << bits):
        warnings.warn(f"{num} classes need more than the 2^{bits} distinct {bits}-bit words: "
                      f"centers repeat (minimum distance 0)", stacklevel=2)
        words = _all_words(bits, generator)
        return words[torch.arange(num) % words.shape[0]].contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small exact products: threads only add contention (5x slower on 2 busy cores)
    try:
        return _pack(num, bits, generator, draws)
    finally:
        torch.set_num_threads(threads)


def _pack(num, bits, generator, draws):
    exhaustive = bits <= EXHAUSTIVE_BITS
    pool = _all_words(bits, generator) if exhaustive else None
    budget = pool.shape[0] if exhaustive else draws
    # one level above the estimate: the estimate is conservative for greedy packings (their balls
    # overlap less than independent ones) and a failed level costs one budget at most
    d = min(bits, _start_level(num, bits, budget / 2) + 1)
    kept = torch.empty(num, bits)
    m = spent = 0
    while m < num:
        if spent >= budget:  # this level is out of reach (or of budget): accept closer words
            d, spent = d - 1, 0
        if exhaustive:
            cand = pool[spent:spent + BATCH]
        else:
            cand = torch.randint(0, 2, (BATCH, bits), generator=generator).float() * 2 - 1
        spent += cand.shape[0]
        alive = _survivors(cand, kept[:m], bits, d)
        if alive.numel():
            new = _greedy_pick(cand[alive], bits, d, num - m)
            kept[m:m + new.shape[0]] = new
            m += new.shape[0]
    return kept


def bernoulli_codes(num, bits, generator=None):
    """``num`` independent Bernoulli(0.5) words of +-1 (float32 (num, bits)); duplicates possible."""
    return torch.randint(0, 2, (num, bits), generator=generator).float() * 2 - 1


def make_centers(kind, num, bits, seed):
    """Hash centers of ``kind`` (``auto``/``maxmin``/``bernoulli``, see the module docstring).

    Returns float32 (num, bits) of +-1 on the CPU. Raises: ValueError for an unknown kind.
    """
    if kind == "auto" and hadamard_applies(num, bits):
        return hadamard_centers(num, bits)
    generator = torch.Generator().manual_seed(seed)
    if kind in ("auto", "maxmin"):
        return far_apart_codes(num, bits, generator)
    if kind == "bernoulli":
        return bernoulli_codes(num, bits, generator)
    raise ValueError(f"unknown center construction {kind!r}; expected auto, maxmin or bernoulli")


def center_loss(codes, labels, centers):
    """Central similarity term: ``mean_{i,k} BCE((tanh(u_ik) + 1) / 2, (c_{y_i,k} + 1) / 2)``,
    computed as BCE-with-logits on ``2u`` (``(tanh(u)+1)/2 == sigmoid(2u)``).

    Args: codes float (B, K); labels int64 (B,) in [0, C); centers (C, K) of +-1.
    Returns: 0-d tensor. Differentiable w.r.t. codes.
    """
    target = (centers.to(codes.dtype)[labels] + 1.0) * 0.5
    return F.binary_cross_entropy_with_logits(2.0 * codes, target)


def quantization_loss(codes):
    """Quantization term ``mean_{i,k} (|tanh(u_ik)| - 1)^2``. Args: codes float (B, K). Returns 0-d."""
    return (codes.tanh().abs() - 1.0).pow(2).mean()


class CSQ(HashingMethod):
    """CSQ loss with fixed hash centers (see the module docstring).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        lambda_q (float): quantization weight (1e-4).
        centers (str): ``auto`` | ``maxmin`` | ``bernoulli`` center construction.
        seed (int): seed of the random center construction (0).

    Attributes: ``centers`` buffer (C, K) float32 of +-1 (persistent); ``min_distance`` (int).

    ``forward(codes, labels, index=None)`` -> ``{"center", "quant", "total"}`` (0-d tensors),
    ``total = center + lambda_q * quant``.
    """
    name = "csq"
    hyperparameters = {
        "lambda_q": Hyper(1e-4, "quantization weight (paper lambda_1; authors' --lambda2; "
                                "DeepHash-pytorch 'lambda')", minimum=0.0),
        "centers": Hyper("auto", "hash centers: auto (Hadamard when K is a power of 2 and C <= 2K, "
                                 "else maxmin), maxmin (seeded greedy far-apart random), "
                                 "bernoulli (seeded plain random)",
                         choices=("auto", "maxmin", "bernoulli")),
        "seed": Hyper(0, "seed of the random center construction", minimum=0),
    }

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.lambda_q = self.hparams["lambda_q"]
        centers = make_centers(self.hparams["centers"], self.num_classes, self.bits, self.hparams["seed"])
        self.register_buffer("centers", centers)
        self.min_distance = min_hamming_distance(centers)
        self.register_load_state_dict_post_hook(_refresh_min_distance)

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index, bits=self.bits)
        center = center_loss(codes, labels, self.centers)
        quant = quantization_loss(codes)
        total = center + self.lambda_q * quant
        return {"center": center, "quant": quant, "total": total}

    def extra_repr(self):
        return super().extra_repr() + f", min_distance={self.min_distance}"


def _refresh_min_distance(module, incompatible_keys):
    module.min_distance = min_hamming_distance(module.centers.cpu())


if __name__ == "__main__":  # timing of the center construction: python -m methods.csq
    import time
    for k in (12, 24, 36, 48):
        for c in (299, 530, 8631):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cen = make_centers("auto", c, k, 0)
            t1 = time.perf_counter()
            rand = min_hamming_distance(bernoulli_codes(c, k, torch.Generator().manual_seed(0)))
            print(f"K={k:2d} C={c:5d}: min distance {min_hamming_distance(cen):2d} in {t1 - t0:5.2f} s; "
                  f"GV {gilbert_varshamov(c, k):2d}; "
                  f"plain Bernoulli {rand}", flush=True)
