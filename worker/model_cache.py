"""A per-process LRU cache of loaded models, bounded by count and by bytes."""
from __future__ import annotations

import ctypes
import gc
import os
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


def resident_bytes() -> int:
    """This process's resident memory (Linux), 0 where /proc is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after a load's temporary buffers)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class CacheLookup:
    model: Any
    hit: bool
    load_seconds: float


class ModelCache:
    def __init__(self, max_models: int = 5, max_bytes: int = 1 << 30,
                 sizer: Callable[[Any], int] = estimate_bytes, track_resident: bool = True):
        self.max_models, self.max_bytes, self._sizer = max_models, max_bytes, sizer
        # a loaded model costs what the process grew by, which exceeds its pickled size
        # (Python object overhead, allocator slack), so the byte budget bounds real memory
        self._track_resident = track_resident
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
        if self._track_resident:
            release_free_memory()  # else the load may reuse free pages and the growth understates it
        started, resident = time.perf_counter(), resident_bytes()
        model = load()
        load_seconds = time.perf_counter() - started
        size = self._sizer(model)
        if self._track_resident:
            release_free_memory()
            size = max(size, resident_bytes() - resident)
        self._put(key, model, size)
        return CacheLookup(model, False, load_seconds)

    def _put(self, key: Hashable, model: Any, size: int) -> None:
        with self._lock:
            if key in self._entries:
                self.bytes_held -= self._entries.pop(key)[1]
            self._entries[key] = (model, size)
            self.bytes_held += size
            # the newest entry stays even if it alone exceeds the byte budget: it is in use
            evicted = False
            while len(self._entries) > 1 and (len(self._entries) > self.max_models or self.bytes_held > self.max_bytes):
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self.bytes_held -= evicted_size
                self.evictions += 1
                evicted = True
        if evicted and self._track_resident:
            gc.collect()
            release_free_memory()

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
