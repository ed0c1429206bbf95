"""Synthetic sets in the DDH layout, for when no real faces are available.

``write_synthetic_ddh``: tiny and fast, for tests. Each identity is a random smooth 3x32x32
prototype; its images are the prototype with a random shift, brightness change and pixel noise.

``write_synthetic_faces``: drawn faces, for the demo. Each identity is a set of face parameters
(``face_identities``: shape, colouring, hair, eyes, brows, nose, mouth, beard, glasses); each
image draws that face with its own pose, expression, lighting, background and noise
(``draw_faces``), so identities are learnable the way real ones are: from the face, across
changes of everything else. Both store uint8 images.
"""
import os
import pickle

import numpy as np


def write_synthetic_ddh(root, identities=20, train_per_id=30, test_per_id=5, seed=0, files=2):
    """Write ``root/train/data_batch_{1..files}.pkl`` and ``root/test/data_batch_1.pkl``.

    Each file is a protocol-2 pickle of ``(data uint8 (n, 3072) channel-first, label int64 (n,))``.
    Returns: ``root``. Raises OSError if ``root`` cannot be written.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(identities, 3, 8, 8))
    prototypes = coarse.repeat(4, axis=2).repeat(4, axis=3)  # (C, 3, 32, 32)

    def images(per_id):
        labels = np.repeat(np.arange(identities), per_id)
        dx, dy = rng.integers(-2, 3, size=(2, labels.size))
        out = np.empty((labels.size, 3, 32, 32))
        for i, c in enumerate(labels):
            out[i] = np.roll(prototypes[c], (dy[i], dx[i]), axis=(1, 2))
        out = out * rng.uniform(0.8, 1.2, size=(labels.size, 1, 1, 1)) + rng.normal(0, 12, out.shape)
        order = rng.permutation(labels.size)
        return np.clip(out, 0, 255).astype(np.uint8).reshape(labels.size, -1)[order], labels[order].astype(np.int64)

    for split, per_id, nfiles in (("train", train_per_id, files), ("test", test_per_id, 1)):
        data, labels = images(per_id)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for k, part in enumerate(np.array_split(np.arange(len(labels)), nfiles)):
            with open(os.path.join(root, split, f"data_batch_{k + 1}.pkl"), "wb") as f:
                pickle.dump((data[part], labels[part]), f, protocol=2)
    return root


# --------------------------------------------------------------------------------------------
# drawn faces: identity parameters, per-image pose, expression, lighting and noise

SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 96],
                 [160, 102, 70], [120, 76, 50], [92, 58, 40]], dtype=np.float64)
HAIR = np.array([[20, 16, 14], [60, 40, 26], [110, 70, 38], [170, 120, 60], [220, 190, 120],
                 [150, 60, 30], [140, 140, 140], [230, 230, 225]], dtype=np.float64)
IRIS = np.array([[60, 40, 25], [100, 70, 40], [70, 110, 150], [80, 120, 80], [40, 40, 40]], dtype=np.float64)


def face_identities(identities, seed=0):
    """Random identity parameters of ``identities`` drawn faces: a dict of arrays, one row per identity.

    Each face has its own skin and hair colour, face shape, hair style (hairline, long hair,
    bangs), eye spacing, height, size and colour, eyebrow thickness and tilt, nose length,
    mouth width and lip colour, and may have a beard or glasses. Identities are independent
    draws, so two of them can share some traits, as real people do.
    """
    rng = np.random.default_rng(seed)
    n = identities

    def pick(palette):
        return palette[rng.integers(0, len(palette), n)] * rng.uniform(0.9, 1.1, (n, 3))

    return {
        "skin": pick(SKIN), "hair": pick(HAIR), "iris": pick(IRIS),
        "lip": pick(SKIN) * np.array([1.0, 0.62, 0.62]),
        "face_w": rng.uniform(0.48, 0.66, n), "face_h": rng.uniform(0.66, 0.84, n),
        "hairline": rng.uniform(-0.62, -0.30, n), "long_hair": rng.random(n) < 0.4,
        "hair_len": rng.uniform(0.2, 0.75, n), "bangs": rng.uniform(-0.2, 0.2, n),
        "eye_sep": rng.uniform(0.17, 0.29, n), "eye_y": rng.uniform(-0.22, -0.06, n),
        "eye_r": rng.uniform(0.06, 0.10, n), "brow_t": rng.uniform(0.025, 0.07, n),
        "brow_tilt": rng.uniform(-0.25, 0.25, n), "nose_len": rng.uniform(0.12, 0.28, n),
        "mouth_y": rng.uniform(0.30, 0.46, n), "mouth_w": rng.uniform(0.12, 0.26, n),
        "beard": rng.random(n) < 0.25, "glasses": rng.random(n) < 0.25,
    }


def _soft(d, px):
    """Anti-aliased coverage of a shape from its signed distance ``d`` (negative inside)."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _ellipse(u, v, cx, cy, a, b):
    """Approximate signed distance to an axis-aligned ellipse (negative inside)."""
    return (np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0) * np.minimum(a, b)


def draw_faces(params, labels, rng, size=32):
    """Render one face image per entry of ``labels`` (identity indices into ``params``).

    Per image, at random: position, scale, in-plane rotation and a left/right turn of the head,
    expression (smile, open mouth, blink), glasses taken off, background, clothing, lighting
    direction and strength, colour cast, exposure, blur and sensor noise.

    Returns: uint8 array (n, 3, size, size), channel-first RGB.
    """
    n = len(labels)
    p = {k: v[labels] for k, v in params.items()}
    col = lambda a: a[:, None, None]  # noqa: E731  (n,) -> (n, 1, 1)
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")
    # pose: shift, scale, rotation, yaw
    tx, ty = rng.uniform(-0.14, 0.14, n), rng.uniform(-0.10, 0.14, n)
    scale, rot = rng.uniform(0.85, 1.12, n), np.deg2rad(rng.uniform(-14, 14, n))
    yaw = rng.uniform(-0.16, 0.16, n)
    xs, ys = (x - col(tx)) / col(scale), (y - col(ty)) / col(scale)
    c, s = col(np.cos(rot)), col(np.sin(rot))
    u, v = c * xs + s * ys, -s * xs + c * ys
    px = 2.0 / size / col(scale)  # one pixel in face coordinates
    fu = u - col(yaw) * (1 - (u / 0.7) ** 2).clip(0, 1)  # inner features shift with the turn

    # background: a random colour with a gradient and blotches
    bg = rng.uniform(20, 235, (n, 3))
    g = rng.normal(0, 40, (n, 2))
    ramp = (col(g[:, 0]) * x + col(g[:, 1]) * y)[:, None]  # (n, 1, size, size)
    img = bg[:, :, None, None] + ramp * rng.uniform(0.2, 1.0, (n, 3, 1, 1))
    blot = rng.normal(0, 1, (n, 3, 4, 4)).repeat(size // 4, 2).repeat(size // 4, 3)
    img += blot * rng.uniform(0, 18, (n, 1, 1, 1))

    def paint(alpha, color):
        nonlocal img
        a = alpha[:, None]
        img = img * (1 - a) + color[:, :, None, None] * a

    shadow = lambda colr, f: colr * f  # noqa: E731
    fw, fh = p["face_w"], p["face_h"]
    # clothing and neck
    cloth = rng.uniform(15, 240, (n, 3))
    paint(_soft(np.maximum(0.62 - v, np.abs(u) - 0.95), px), cloth)
    paint(_soft(np.maximum(np.abs(u) - col(fw) * 0.5, 0.3 - v), px), shadow(p["skin"], 0.85))
    # long hair behind the head
    hair_back = _soft(np.maximum(_ellipse(u, v, 0, -0.08, col(fw) + 0.13, col(fh) + 0.12),
                                 v - col(p["hair_len"])), px) * col(p["long_hair"].astype(float))
    paint(hair_back, shadow(p["hair"], 0.85))
    # face
    face_d = _ellipse(u, v, 0, 0, col(fw), col(fh))
    paint(_soft(face_d, px), p["skin"])
    # hair on top: the head outline above the hairline (with a fringe slant)
    head = _ellipse(u, v, 0, -0.04, col(fw) + 0.06, col(fh) + 0.08)
    line = v - (col(p["hairline"]) + col(p["bangs"]) * u)
    paint(_soft(np.maximum(head, line), px), p["hair"])
    # beard
    beard = _soft(np.maximum(face_d, col(p["mouth_y"]) - 0.12 - v), px) * col(p["beard"].astype(float))
    paint(beard * 0.9, shadow(p["hair"], 0.9))
    # eyes: white, iris, blink
    blink = rng.uniform(0.35, 1.0, n) ** 0.5
    er = p["eye_r"]
    for side in (-1, 1):
        cx = side * col(p["eye_sep"])
        white = _ellipse(fu, v, cx, col(p["eye_y"]), col(er) * 1.5, col(er * blink))
        paint(_soft(white, px), np.full((n, 3), 235.0))
        iris = _ellipse(fu, v, cx + col(yaw) * 0.15, col(p["eye_y"]), col(er) * 0.8, col(er * blink) * 0.95)
        paint(_soft(np.maximum(iris, white), px), p["iris"])
        # eyebrow: a tilted bar above the eye
        bu, bv = fu - cx, v - (col(p["eye_y"]) - col(er) - 0.07)
        bv = bv - side * col(p["brow_tilt"]) * bu
        brow = np.maximum(np.abs(bu) - col(er) * 1.8, np.abs(bv) - col(p["brow_t"]) / 2)
        paint(_soft(brow, px), shadow(p["hair"], 0.8))
        # glasses: a dark ring, taken off in some photos
        on = (p["glasses"] & (rng.random(n) < 0.8)).astype(float)
        ring = np.abs(_ellipse(fu, v, cx, col(p["eye_y"]), col(er) * 2.1, col(er) * 1.7)) - 0.02
        paint(_soft(ring, px) * col(on), np.full((n, 3), 25.0))
    # nose: a shaded wedge
    nose_top = col(p["eye_y"]) + 0.05
    nose = np.maximum(np.abs(fu - col(yaw) * 0.3) - 0.03 - 0.12 * (v - nose_top).clip(0) / col(p["nose_len"]),
                      np.maximum(nose_top - v, v - nose_top - col(p["nose_len"])))
    paint(_soft(nose, px) * 0.55, shadow(p["skin"], 0.7))
    # mouth: width is the identity's, smile and opening are the photo's
    smile, opening = rng.uniform(-0.08, 0.12, n), rng.uniform(0.015, 0.07, n)
    mu = (fu - col(yaw) * 0.2) / col(p["mouth_w"])
    mv = v - col(p["mouth_y"]) + col(smile) * (1 - mu ** 2)
    mouth = _ellipse(mu * col(p["mouth_w"]), mv, 0, 0, col(p["mouth_w"]), col(opening))
    paint(_soft(mouth, px), p["lip"])
    # light: direction and strength, colour cast, exposure; then blur and noise
    ang = rng.uniform(0, 2 * np.pi, n)
    light = 1 + col(rng.uniform(0, 0.45, n)) * (col(np.cos(ang)) * x + col(np.sin(ang)) * y)
    img = img * light[:, None] * rng.uniform(0.88, 1.12, (n, 3, 1, 1)) * rng.uniform(0.6, 1.25, (n, 1, 1, 1))
    k = rng.uniform(0, 0.6, n)[:, None, None, None]
    blurred = (img + np.roll(img, 1, 2) + np.roll(img, -1, 2) + np.roll(img, 1, 3) + np.roll(img, -1, 3)) / 5
    img = img * (1 - k) + blurred * k
    img += rng.normal(0, 1, img.shape) * rng.uniform(3, 14, (n, 1, 1, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_faces(root, identities=30, train_per_id=40, test_per_id=5, seed=0, files=2):
    """Write a DDH-layout set of drawn faces: ``root/train/data_batch_{1..files}.pkl``,
    ``root/test/data_batch_1.pkl`` and ``root/classes.txt`` (lines ``label face_NN``).

    Each identity is a set of face parameters (``face_identities``); each image draws that face
    with its own pose, expression, lighting, background and noise (``draw_faces``), so telling
    identities apart means learning the face, not memorising a picture. Same file format as
    ``write_synthetic_ddh``. Returns: ``root``. Raises OSError if ``root`` cannot be written.
    """
    params = face_identities(identities, seed=seed)
    rng = np.random.default_rng([seed, 1])  # the photos' stream, independent of the identities' stream
    for split, per_id, nfiles in (("train", train_per_id, files), ("test", test_per_id, 1)):
        labels = rng.permutation(np.repeat(np.arange(identities), per_id)).astype(np.int64)
        data = draw_faces(params, labels, rng).reshape(len(labels), -1)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for k, part in enumerate(np.array_split(np.arange(len(labels)), nfiles)):
            with open(os.path.join(root, split, f"data_batch_{k + 1}.pkl"), "wb") as f:
                pickle.dump((data[part], labels[part]), f, protocol=2)
    with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{i} face_{i:02d}\n" for i in range(identities))
    return root
