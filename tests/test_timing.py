"""Stage timings add up per key."""

from diffedit import timing


def test_timed_adds_each_blocks_wall_time_to_its_key(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 20.25])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    times = {}
    with timing.timed(times, "mask"):
        pass
    with timing.timed(times, "mask", device=None):
        pass
    assert times == {"mask": 0.75}
