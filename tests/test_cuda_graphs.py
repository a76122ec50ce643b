"""StepGraphs: per-key capture, static buffers, LRU, eager fallback (CPU, fake capturer); real graphs under `gpu`."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from wanrt.graph.cuda_graphs import CudaGraphCapturer, StepGraphs, graphs_supported


class FakeCapturer:
    """Models the GraphCapturer contract on the CPU.

    ``capture`` runs ``fn`` ``warmup`` times, then once more as the "recorded" call, whose outputs become the
    static outputs; like a real capture it leaves them unexecuted (filled with NaN). ``replay`` runs ``fn`` again
    (on the same static input buffers, which ``fn`` closes over) and copies the results into the recorded
    outputs, so outputs change only through what was copied into the static inputs.
    """

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.captures = 0
        self.replays = 0
        self.recorded = []

    def capture(self, fn):
        for _ in range(self.warmup):
            fn()
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        with torch.inference_mode():  # models raw memory writes: no autograd or inference-mode checks
            for o in outs:
                o.fill_(float("nan"))  # recorded, not executed
        self.captures += 1
        self.recorded.append(out)

        def replay():
            self.replays += 1
            fresh = fn()
            with torch.inference_mode():
                for o, f in zip(outs, fresh if isinstance(fresh, (tuple, list)) else (fresh,), strict=True):
                    o.copy_(f)

        return replay


class FailingCapturer:
    def __init__(self, message="operation not permitted when stream is capturing"):
        self.message = message
        self.calls = 0

    def capture(self, fn):
        self.calls += 1
        raise RuntimeError(self.message)


def step(x, t):
    """A stand-in for a DiT step: a function of its tensor inputs only."""
    return torch.tanh(x * 2.0 + t.view(-1, 1)) - x


def _inputs(seed, batch=2, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=g), torch.rand(batch, generator=g)


def test_first_call_captures_second_replays():
    cap = FakeCapturer()
    sg = StepGraphs(step, capturer=cap)
    x, t = _inputs(0)
    out = sg("k", x, t)
    torch.testing.assert_close(out, step(x, t))  # the capture itself runs nothing: the result is a replay
    assert (cap.captures, sg.stats["captures"], sg.stats["replays"]) == (1, 1, 0)
    sg("k", *_inputs(1))
    assert (cap.captures, sg.stats["captures"], sg.stats["replays"]) == (1, 1, 1)
    assert sg.stats["eager_calls"] == sg.stats["fallbacks"] == sg.stats["evictions"] == 0
    assert sg.keys == ["k"]


@pytest.mark.parametrize("warmup", [0, 2])
def test_replay_sees_new_inputs_and_matches_eager(warmup):
    sg = StepGraphs(step, capturer=FakeCapturer(warmup=warmup))
    previous = None
    for seed in range(4):
        x, t = _inputs(seed)
        out = sg("k", x, t)
        torch.testing.assert_close(out, step(x, t))
        if previous is not None:
            assert not torch.equal(out, previous)
        previous = out.clone()


def test_outputs_are_the_recorded_static_tensors():
    cap = FakeCapturer(warmup=2)
    sg = StepGraphs(step, capturer=cap)
    a = sg("k", *_inputs(0))
    b = sg("k", *_inputs(1))
    assert a is b is cap.recorded[0]  # the last (recorded) call's outputs, not a warm-up's
    torch.testing.assert_close(b, step(*_inputs(1)))


def test_inputs_are_copied_not_aliased():
    sg = StepGraphs(step, capturer=FakeCapturer())
    x, t = _inputs(0)
    ref = step(x, t)
    out = sg("k", x, t)
    x.add_(100.0)  # the caller's tensor changes; the static buffer holds a copy
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(sg("k", x, t), step(x, t))


def test_different_keys_capture_separately():
    cap = FakeCapturer()
    sg = StepGraphs(step, capturer=cap)
    small, big = _inputs(0, batch=2), _inputs(1, batch=3)
    out_small = sg(("s", 2), *small)
    torch.testing.assert_close(out_small.clone(), step(*small))
    out_big = sg(("s", 3), *big)
    assert out_big is not out_small and out_big.shape == (3, 5)
    torch.testing.assert_close(out_big, step(*big))
    assert cap.captures == 2 and sg.stats["captures"] == 2
    assert sg(("s", 2), *small) is out_small
    assert sg.keys == [("s", 3), ("s", 2)]


def test_lru_eviction_order_and_max_graphs():
    cap = FakeCapturer()
    sg = StepGraphs(step, max_graphs=2, capturer=cap)
    x, t = _inputs(0)
    sg("a", x, t)
    sg("b", x, t)
    assert sg.keys == ["a", "b"]
    sg("a", x, t)  # a replay refreshes recency
    assert sg.keys == ["b", "a"]
    sg("c", x, t)  # evicts b, the least recently used
    assert sg.keys == ["a", "c"]
    assert sg.stats["evictions"] == 1 and cap.captures == 3
    out = sg("b", *_inputs(5))  # an evicted key is captured again
    torch.testing.assert_close(out, step(*_inputs(5)))
    assert sg.keys == ["c", "b"]
    assert sg.stats == {"captures": 4, "replays": 1, "evictions": 2, "fallbacks": 0, "eager_calls": 0}


def test_max_graphs_one():
    sg = StepGraphs(step, max_graphs=1, capturer=FakeCapturer())
    for key in "abab":
        x, t = _inputs(ord(key))
        torch.testing.assert_close(sg(key, x, t), step(x, t))
        assert sg.keys == [key]
    assert sg.stats["evictions"] == 3


def test_failed_capture_falls_back_to_eager_and_is_never_retried(caplog):
    cap = FailingCapturer("operation not permitted when stream is capturing")
    sg = StepGraphs(step, capturer=cap, name="dit")
    x, t = _inputs(0)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        out = sg("k", x, t)
    torch.testing.assert_close(out, step(x, t))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "dit" in message and "'k'" in message and "operation not permitted when stream is capturing" in message
    assert "operation not permitted" in sg.fallback_reasons["k"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        for seed in range(1, 4):
            x, t = _inputs(seed)
            torch.testing.assert_close(sg("k", x, t), step(x, t))
    assert not caplog.records  # warned once
    assert cap.calls == 1  # never retried
    assert sg.keys == []
    assert sg.stats == {"captures": 0, "replays": 0, "evictions": 0, "fallbacks": 1, "eager_calls": 4}


def test_eager_only_keys_do_not_block_other_keys():
    class FailsForBatch3(FakeCapturer):
        def capture(self, fn):
            if fn().shape[0] == 3:
                raise RuntimeError("needs a host sync")
            return super().capture(fn)

    sg = StepGraphs(step, capturer=FailsForBatch3())
    sg("b2", *_inputs(0, batch=2))
    sg("b3", *_inputs(0, batch=3))
    sg("b2", *_inputs(1, batch=2))
    assert sg.keys == ["b2"] and list(sg.fallback_reasons) == ["b3"]
    assert sg.stats == {"captures": 1, "replays": 1, "evictions": 0, "fallbacks": 1, "eager_calls": 1}


def test_eager_only_set_is_bounded():
    cap = FailingCapturer()
    sg = StepGraphs(step, capturer=cap)
    sg.max_eager_keys = 2
    x, t = _inputs(0)
    for key in "abc":
        sg(key, x, t)
    assert list(sg.fallback_reasons) == ["b", "c"]
    sg("b", x, t)  # remembered: no new capture attempt, refreshed
    assert cap.calls == 3 and list(sg.fallback_reasons) == ["c", "b"]
    sg("a", x, t)  # forgotten: tried again
    assert cap.calls == 4 and list(sg.fallback_reasons) == ["b", "a"]


def test_default_capturer_does_not_capture_cpu_inputs(caplog):
    sg = StepGraphs(step)  # a real CudaGraphCapturer: a CUDA graph records no CPU work
    assert isinstance(sg.capturer, CudaGraphCapturer)
    x, t = _inputs(0)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        torch.testing.assert_close(sg("k", x, t), step(x, t))
    assert "input 0 is on cpu" in sg.fallback_reasons["k"]
    assert "input 0 is on cpu" in caplog.text
    assert sg.capturer.pool is None  # nothing touched CUDA


@pytest.mark.parametrize(
    "bad, what",
    [
        ((torch.zeros(3, 5), torch.zeros(3)), "input 0"),
        ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.float64)), "input 1"),
        ((torch.zeros(2, 5, dtype=torch.float16), torch.zeros(2)), "input 0"),
        ((torch.zeros(2, 5),), "2 inputs, got 1"),
    ],
)
def test_mismatched_inputs_for_a_captured_key_raise(bad, what):
    sg = StepGraphs(step, capturer=FakeCapturer())
    sg("k", *_inputs(0))
    with pytest.raises(ValueError, match=what):
        sg("k", *bad)
    assert sg.stats["captures"] == 1 and sg.stats["replays"] == 0


def test_non_tensor_inputs_raise():
    sg = StepGraphs(step, capturer=FakeCapturer())
    with pytest.raises(TypeError, match="input 1 is a float"):
        sg("k", torch.zeros(2, 5), 0.5)
    assert sg.keys == [] and sg.stats["captures"] == 0


def test_fn_must_return_tensors():
    sg = StepGraphs(lambda x: {"out": x * 2}, capturer=FakeCapturer())
    with pytest.raises(TypeError, match="tuple of tensors"):
        sg("k", torch.zeros(2))
    assert sg.keys == []


def test_clear():
    cap = FakeCapturer()
    sg = StepGraphs(step, capturer=cap)
    failing = StepGraphs(step, capturer=FailingCapturer())
    x, t = _inputs(0)
    sg("a", x, t)
    sg("b", x, t)
    failing("a", x, t)
    sg.clear()
    failing.clear()
    assert sg.keys == [] and failing.fallback_reasons == {}
    torch.testing.assert_close(sg("a", x, t), step(x, t))
    assert cap.captures == 3 and sg.stats["captures"] == 3  # captured again; stats are kept


@pytest.mark.parametrize("as_list", [False, True])
def test_tuple_outputs(as_list):
    def two(x, t):
        out = (step(x, t), x.sum(dim=1) * t)
        return list(out) if as_list else out

    sg = StepGraphs(two, capturer=FakeCapturer())
    first = sg("k", *_inputs(0))
    assert isinstance(first, tuple) and len(first) == 2
    second = sg("k", *_inputs(1))
    assert all(a is b for a, b in zip(first, second, strict=True))
    for got, ref in zip(second, two(*_inputs(1)), strict=True):
        torch.testing.assert_close(got, ref)


def test_runs_without_autograd_and_across_inference_mode():
    lin = nn.Linear(5, 5)  # parameters require grad
    sg = StepGraphs(lambda x: lin(x), capturer=FakeCapturer())
    x = torch.randn(2, 5)
    with torch.inference_mode():
        out = sg("k", x)
    assert not out.requires_grad
    out = sg("k", x + 1)  # outside inference mode: the static buffers are normal tensors
    with torch.no_grad():
        torch.testing.assert_close(out, lin(x + 1))
    failing = StepGraphs(lambda x: lin(x), capturer=FailingCapturer())
    assert not failing("k", x).requires_grad  # the eager path runs under no_grad too


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_graphs"):
        StepGraphs(step, max_graphs=0)
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphCapturer(warmup=0)
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphCapturer(device="cpu")
    with pytest.raises(TypeError):
        StepGraphs(step, capturer=FakeCapturer())(["unhashable"], torch.zeros(1))


def test_graphs_supported_on_cpu():
    ok, reason = graphs_supported("cpu")
    assert not ok and "cpu" in reason
    ok, reason = graphs_supported(torch.device("cpu"))
    assert not ok and reason
    if not torch.cuda.is_available():
        ok, reason = graphs_supported("cuda")
        assert not ok and "is_available" in reason


def test_lazy_package_exports():
    import wanrt.graph

    assert wanrt.graph.StepGraphs is StepGraphs
    with pytest.raises(AttributeError):
        wanrt.graph.nothing_here  # noqa: B018


def test_cuda_capturer_follows_the_recipe(monkeypatch):
    """The real capturer's call sequence, with torch.cuda stubbed out: warm-up on a side stream that waits on
    the current stream and is waited on, then one capture with the shared pool, returning graph.replay."""
    events = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    class Context:
        def __init__(self, enter, leave):
            self.enter, self.leave = enter, leave

        def __enter__(self):
            events.append(self.enter)

        def __exit__(self, *exc):
            events.append(self.leave)

    class Graph:
        def replay(self):
            events.append("replay")

    current = Stream("current")
    pools = iter(["pool-0", "pool-1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: Context(f"device {d}", "device done"))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(pools))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda st: Context(f"on {st.name}", f"off {st.name}"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool: Context(f"capture pool={pool}", "capture end"))

    cap = CudaGraphCapturer(warmup=2)
    replay = cap.capture(lambda: events.append("fn"))
    assert events == [
        "device None", "side waits current", "on side", "fn", "fn", "off side", "current waits side",
        "capture pool=pool-0", "fn", "capture end", "device done",
    ]  # fmt: skip
    replay()
    assert events[-1] == "replay" and isinstance(replay.__self__, Graph)
    events.clear()
    cap.capture(lambda: events.append("fn"))
    assert "capture pool=pool-0" in events and cap.pool == "pool-0"  # one pool for all graphs


# ----------------------------------------------------------------------------- real CUDA graphs


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda().eval()


@pytest.mark.gpu
def test_real_graph_replay_equals_eager():
    assert graphs_supported("cuda")[0]
    mlp = _mlp()
    sg = StepGraphs(mlp, capturer=CudaGraphCapturer())
    x = torch.randn(8, 64, device="cuda")
    out = sg(("mlp", 8), x)
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x))
    assert sg.stats["captures"] == 1


@pytest.mark.gpu
def test_real_graph_copies_new_inputs_in():
    mlp = _mlp()
    sg = StepGraphs(mlp, capturer=CudaGraphCapturer())
    key = ("mlp", 8)
    first = sg(key, torch.randn(8, 64, device="cuda")).clone()
    for _ in range(3):
        x = torch.randn(8, 64, device="cuda")
        out = sg(key, x)
        with torch.no_grad():
            torch.testing.assert_close(out, mlp(x))
        assert not torch.equal(out, first)
    assert sg.stats["captures"] == 1 and sg.stats["replays"] == 3


@pytest.mark.gpu
def test_real_graphs_of_two_keys_share_the_pool():
    mlp = _mlp()
    cap = CudaGraphCapturer()
    sg = StepGraphs(mlp, capturer=cap)
    xs = {8: torch.randn(8, 64, device="cuda"), 16: torch.randn(16, 64, device="cuda")}
    for _ in range(2):
        for n, x in xs.items():  # alternate keys; consume each result before the next call
            out = sg(("mlp", n), x)
            with torch.no_grad():
                torch.testing.assert_close(out, mlp(x))
    assert sg.stats == {"captures": 2, "replays": 2, "evictions": 0, "fallbacks": 0, "eager_calls": 0}
    assert cap.pool is not None
    replays = [cap.capture(lambda x=x: mlp(x)) for x in xs.values()]
    assert [r.__self__.pool() for r in replays] == [cap.pool, cap.pool]


@pytest.mark.gpu
def test_real_capture_of_a_host_sync_falls_back(caplog):
    mlp = _mlp()

    def syncs(x):
        y = mlp(x)
        return y * float(y.abs().max().item() > 0)  # a host sync: not capturable

    sg = StepGraphs(syncs, capturer=CudaGraphCapturer())
    x = torch.randn(8, 64, device="cuda")
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        out = sg("k", x)
    with torch.no_grad():
        torch.testing.assert_close(out, syncs(x))
    assert "k" in sg.fallback_reasons and sg.keys == [] and caplog.records
