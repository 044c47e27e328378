"""Near-duplicate grouping for datasets without patient ids (BUSI).

BUSI repeats scans: the same lesion appears in several files (frames of one examination, the same
image with or without calipers, a few even filed under two classes). With one group per image such
pairs straddle train and test and make test scores optimistic. Grouping images whose difference
hashes are close keeps every such cluster inside one split.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

HASH_SIZE = 16
# Hamming distance (of 16 x 16 = 256 bits) at or below which two images count as the same scene.
# Measured on BUSI's 662 images: pairs up to ~70 bits show the same lesion (neighbouring file
# numbers, calipers added, slight shifts); unrelated pairs start around 80 (94% of pairs are > 100).
NEAR_DUPLICATE_BITS = 64


def dhash(image: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """Difference hash of a uint8 (H, W, 3) or (H, W) image -> bool (size * size,).

    Greyscale, resized to (size, size + 1) with area averaging; bit = left pixel darker than right.
    """
    import cv2

    g = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    g = cv2.resize(g, (size + 1, size), interpolation=cv2.INTER_AREA).astype(np.int16)
    return (g[:, 1:] > g[:, :-1]).ravel()


def near_duplicate_components(paths: Sequence[str], max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Connected components of images whose hashes differ in at most `max_bits` bits -> int (N,).

    Images that cannot be decoded get a component of their own (training reports them later).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from core.errors import InvalidImageError
    from core.preprocessing import load_image

    n = len(paths)
    hashes = np.zeros((n, HASH_SIZE * HASH_SIZE), bool)
    valid = np.zeros(n, bool)
    for i, p in enumerate(paths):
        try:
            hashes[i], valid[i] = dhash(load_image(p)), True
        except (InvalidImageError, OSError):
            pass
    packed = np.packbits(hashes, axis=1)
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    close = np.zeros((n, n), bool)
    for i in range(n):  # row by row: the XOR temporary stays (N, 32) bytes
        close[i] = popcount[packed[i] ^ packed].sum(1) <= max_bits
    close &= valid[:, None] & valid[None, :]
    np.fill_diagonal(close, True)
    return connected_components(csr_matrix(close), directed=False)[1]
