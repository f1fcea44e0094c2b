"""A per-process LRU cache of loaded models, bounded by count and by bytes."""
from __future__ import annotations

import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


def estimate_bytes(model: Any) -> int:
    """Size of a model's state; pickling our own trusted, already-loaded object is a fair proxy."""
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass
class CacheLookup:
    model: Any
    hit: bool
    load_seconds: float


class ModelCache:
    def __init__(self, max_models: int = 5, max_bytes: int = 1 << 30,
                 sizer: Callable[[Any], int] = estimate_bytes):
        self.max_models, self.max_bytes, self._sizer = max_models, max_bytes, sizer
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.bytes_held = 0

    def get(self, key: Hashable, load: Callable[[], Any]) -> CacheLookup:
        """The cached model for `key`, or `load()`'s result, which is then cached."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return CacheLookup(self._entries[key][0], True, 0.0)
            self.misses += 1
        started = time.perf_counter()
        model = load()
        load_seconds = time.perf_counter() - started
        self._put(key, model, self._sizer(model))
        return CacheLookup(model, False, load_seconds)

    def _put(self, key: Hashable, model: Any, size: int) -> None:
        with self._lock:
            if key in self._entries:
                self.bytes_held -= self._entries.pop(key)[1]
            self._entries[key] = (model, size)
            self.bytes_held += size
            # the newest entry stays even if it alone exceeds the byte budget: it is in use
            while len(self._entries) > 1 and (len(self._entries) > self.max_models or self.bytes_held > self.max_bytes):
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self.bytes_held -= evicted_size
                self.evictions += 1

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
