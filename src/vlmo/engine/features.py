"""A small LRU of encoded images, so that several questions about one image run the vision tower once.

`VLMo` keeps one (`vlm.image_cache`) and every task goes through it: `vlm.ask(photo, "a?")` then
`vlm.detect(photo, "cat")` encode `photo` once. Keys are content hashes of the decoded pixels, so the same picture
passed again as another object, file name or upload matches, and a changed picture never does.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from vlmo.errors import InputError


class FeatureCache:
    """An LRU of image features, keyed by the image's pixels, so asking again about an image skips the vision tower.

    `encode`: images → dt[B, N, D] (the vision tower and projector). `capacity`: images kept (0 turns caching off).
    Entries live on the model's device (one 224 px PaliGemma image: 256 × 2048 values, 2 MiB in float32). Call
    `clear()` after changing the model's weights in place.
    """

    def __init__(self, encode: Callable[[Sequence[Image.Image]], torch.Tensor], capacity: int = 8) -> None:
        if capacity < 0:
            raise InputError(f"the feature cache capacity must be ≥ 0, got {capacity}")
        self.encode, self.capacity = encode, capacity
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(image: Image.Image) -> str:
        """A content hash of the decoded pixels: the same picture uploaded twice (or under two names) matches."""
        digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()

    def get(self, image: Image.Image) -> torch.Tensor:
        """dt[1, N, D]: this image's features, from the cache or freshly encoded (and then cached)."""
        return self.get_many([image])

    def get_many(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """dt[B, N, D] for B images, in order: cached rows reused, the others encoded together in one batch."""
        keys = [self.key(im) for im in images]
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for k in keys:
                if k in self._entries:
                    self.hits += 1
                    self._entries.move_to_end(k)
                    found[k] = self._entries[k]
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # a repeated image is encoded once
        if missing:
            first = {k: im for k, im in zip(keys, images, strict=True) if k in missing}
            encoded = self.encode([first[k] for k in missing])
            self.misses += len(missing)
            for i, k in enumerate(missing):
                found[k] = encoded[i : i + 1]
            if self.capacity:
                with self._lock:
                    for k in missing:
                        self._entries[k] = found[k]
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
        return torch.cat([found[k] for k in keys]) if len(keys) > 1 else found[keys[0]]

    def clear(self) -> None:
        """Forget every entry and reset the hit/miss counts."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)
