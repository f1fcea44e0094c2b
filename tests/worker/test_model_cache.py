from worker.model_cache import ModelCache


def loader(value):
    calls = []

    def load():
        calls.append(value)
        return value
    return load, calls


def test_second_lookup_is_a_hit_and_does_not_load():
    cache = ModelCache(max_models=2, sizer=lambda m: 1, track_resident=False)
    load, calls = loader("m1")
    first, second = cache.get("a", load), cache.get("a", load)
    assert (first.hit, second.hit) == (False, True)
    assert second.load_seconds == 0.0 and calls == ["m1"]
    assert (cache.hits, cache.misses) == (1, 1)


def test_count_bound_evicts_least_recently_used():
    cache = ModelCache(max_models=2, sizer=lambda m: 1, track_resident=False)
    for key in "ab":
        cache.get(key, lambda: key)
    cache.get("a", lambda: "a")  # a is now more recent than b
    cache.get("c", lambda: "c")
    assert cache.keys() == ["a", "c"] and cache.evictions == 1


def test_byte_bound_evicts_until_within_budget():
    cache = ModelCache(max_models=10, max_bytes=100, sizer=len, track_resident=False)
    cache.get("a", lambda: "x" * 60)
    cache.get("b", lambda: "y" * 30)
    cache.get("c", lambda: "z" * 50)
    assert cache.keys() == ["b", "c"] and cache.bytes_held == 80 and cache.evictions == 1


def test_a_model_larger_than_the_budget_is_still_served():
    cache = ModelCache(max_models=10, max_bytes=10, sizer=len, track_resident=False)
    cache.get("a", lambda: "x" * 5)
    lookup = cache.get("big", lambda: "y" * 50)
    assert lookup.model == "y" * 50 and cache.keys() == ["big"]


def test_a_model_is_charged_at_least_the_memory_its_load_took():
    cache = ModelCache(max_models=5, max_bytes=1 << 40, sizer=lambda m: 1)
    cache.get("big", lambda: bytearray(b"x") * (64 * 1024 * 1024))  # 64 MiB, every page written
    assert cache.bytes_held >= 60 * 1024 * 1024
