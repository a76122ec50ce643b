"""StepGraphs: per-key capture, static buffers, LRU, eager fallback (CPU, fake capturer); real graphs under `gpu`."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wanrt.graph.cuda_graphs import CudaGraphCapturer, StepGraphs, graphs_supported


class FakeCapturer:
    """A CPU model of a CUDA graph, faithful where the GraphCapturer contract matters.

    ``capture(fn)`` runs ``fn`` ``warmup`` times eagerly (host reads allowed, like the real side-stream warm-up),
    then *records* one more call: every aten op it dispatches is logged with its arguments (a
    ``TorchDispatchMode``). Reading device memory on the host during that call raises ``RuntimeError`` ("operation
    not permitted when stream is capturing"), as a real capture does: ``.item()``/``bool()``/``int()``/``float()``
    of a tensor, ``.tolist()``, ``.cpu()``, ``.numpy()``, printing a tensor, ``torch.equal``, ``nonzero`` and the
    other ops whose output shape depends on the data (boolean-mask indexing, ``masked_select``, ``unique``). A
    capture executes nothing: afterwards the tensors the recorded ops created hold garbage (NaN), and tensors that
    existed before and were written in place get their contents back.

    ``replay()`` re-executes the logged ops on the same tensors (the static inputs StepGraphs copies into, the
    weights, the recorded intermediates), writing each op's result into the tensor it produced during the capture
    and mutating in place what the op mutated. No Python of ``fn`` runs: a Python value read at capture time (a
    flag, a counter, a float) is frozen into the graph, and only tensor memory is read anew, as in a real CUDA
    graph.

    Limits: work outside the dispatcher (a Triton kernel run by the interpreter, numpy) is not recorded, and every
    tensor is a CPU tensor here, so host-to-device copies inside the step cannot be told apart.
    """

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.captures = 0
        self.replays = 0
        self.recorded = []  # each capture's outputs
        self.op_counts = []  # each capture's number of recorded ops

    def capture(self, fn):
        for _ in range(self.warmup):
            fn()
        recorder = _Recorder()
        try:
            with _refuse_host_reads(), recorder:
                out = fn()
        finally:
            with torch.inference_mode():  # raw memory writes: no autograd or inference-mode checks
                for t, before in reversed(recorder.overwritten):
                    t.copy_(before)  # recorded, not executed: memory that existed keeps its contents
        ops = recorder.ops
        with torch.inference_mode():
            for _, _, _, targets in ops:
                for _, t in targets:
                    _garbage_(t)  # recorded, not executed: what the capture allocated holds garbage
        self.captures += 1
        self.recorded.append(out)
        self.op_counts.append(len(ops))

        def replay():
            self.replays += 1
            with torch.inference_mode():
                for func, args, kwargs, targets in ops:
                    fresh = func(*args, **kwargs)
                    if targets:
                        leaves = pytree.tree_leaves(fresh)
                        for i, t in targets:
                            t.copy_(leaves[i])

        return replay


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


_aten = torch.ops.aten
#: Ops that make the host wait for device memory (a real capture refuses them).
_HOST_SYNC_OPS = {
    _aten._local_scalar_dense: ".item() / bool() / int() / float() of a tensor",
    _aten.equal: "torch.equal",
    _aten.nonzero: "nonzero (an output shape that depends on the data)",
    _aten.masked_select: "masked_select (an output shape that depends on the data)",
    _aten._unique2: "unique (an output shape that depends on the data)",
    _aten.unique_dim: "unique (an output shape that depends on the data)",
    _aten.unique_consecutive: "unique_consecutive (an output shape that depends on the data)",
}
_INDEX_OPS = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}


def _host_read(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    if packet in _HOST_SYNC_OPS:
        return _HOST_SYNC_OPS[packet]
    if packet in _INDEX_OPS and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    ):
        return "boolean-mask indexing (nonzero: an output shape that depends on the data)"
    if packet is _aten.repeat_interleave and kwargs.get("output_size") is None and func._overloadname != "self_int":
        return "repeat_interleave without output_size"
    return None


def _not_capturable(what: str):
    return RuntimeError(f"operation not permitted when stream is capturing: {what} reads device memory on the host")


class _Recorder(TorchDispatchMode):
    """Logs ``(op, args, kwargs, targets)``: ``targets`` are the ``(leaf index, tensor)`` outputs the op created
    (neither an argument's memory nor a tensor that existed before the capture), which replay rewrites."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.overwritten = []  # (tensor that existed before the capture, its contents before the op wrote it)
        self._created: set[int] = set()
        self._existing: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _host_read(func, args, kwargs)
        if what is not None:
            raise _not_capturable(f"{what} (aten.{func.overloadpacket.__name__})")
        read = {_storage(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self._existing |= read - self._created
        for arg, value in zip(func._schema.arguments, (*args, *(kwargs.get(a.name) for a in
                                                             func._schema.arguments[len(args):])), strict=True):
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and _storage(value) in self._existing:
                self.overwritten.append((value, value.clone()))
        out = func(*args, **kwargs)
        targets = []
        for i, leaf in enumerate(pytree.tree_leaves(out)):
            if isinstance(leaf, torch.Tensor) and leaf.numel():
                ptr = _storage(leaf)
                if ptr not in read and ptr not in self._existing:
                    targets.append((i, leaf))
                    self._created.add(ptr)
        self.ops.append((func, args, kwargs, targets))
        return out


@contextlib.contextmanager
def _refuse_host_reads():
    """Tensor methods that copy device memory to the host without an aten op the recorder could see."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise _not_capturable(f"Tensor.{name}()")

        return method

    names = ("tolist", "cpu", "numpy", "__repr__")
    saved = {n: torch.Tensor.__dict__.get(n) for n in names}
    for n in names:
        setattr(torch.Tensor, n, refuse(n.strip("_")))
    try:
        yield
    finally:
        for n, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, orig)


def _garbage_(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)


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


def test_replay_runs_no_python_so_python_state_is_frozen_at_capture():
    """Like a real CUDA graph, a replay re-executes the recorded ops only: Python values the step read while it was
    captured (a float, a branch flag, a counter) stay baked in, while the memory of its tensors is read anew."""
    calls = []
    state = {"gain": 2.0, "negate": False}
    offset = torch.zeros(1)  # tensor state: the graph reads this memory on every replay

    def stateful(x):
        calls.append(len(calls))
        y = x * state["gain"] + offset + len(calls)  # len(calls) is 2 at the recorded call (1 warm-up before it)
        return -y if state["negate"] else y

    cap = FakeCapturer(warmup=1)
    sg = StepGraphs(stateful, capturer=cap)
    x = torch.arange(4.0)
    torch.testing.assert_close(sg("k", x), x * 2 + 2)
    assert len(calls) == 2 and cap.op_counts[0] > 0
    state.update(gain=3.0, negate=True)
    offset.fill_(10.0)
    out = sg("k", x + 1)
    assert len(calls) == 2  # the replay ran no Python of the step
    torch.testing.assert_close(out, (x + 1) * 2 + 10 + 2)  # stale gain, branch and count; fresh input and offset
    torch.testing.assert_close(stateful(x + 1), -((x + 1) * 3 + 10 + 3))  # what the Python says now
    assert sg.stats["replays"] == 1 and sg.stats["fallbacks"] == 0


def test_in_place_updates_are_replayed_on_the_same_memory():
    acc = torch.zeros(3)

    def accumulate(x):
        acc.add_(x)  # mutates memory the graph does not own: every replay adds again
        return acc * 2

    cap = FakeCapturer(warmup=1)
    sg = StepGraphs(accumulate, capturer=cap)
    ones = torch.ones(3)
    out = sg("k", ones)  # warm-up (adds), capture (executes nothing), first replay (adds)
    torch.testing.assert_close(out, torch.full((3,), 4.0))
    sg("k", ones)
    torch.testing.assert_close(out, torch.full((3,), 6.0))  # the same static output, rewritten
    torch.testing.assert_close(acc, torch.full((3,), 3.0))
    cap.capture(lambda: accumulate(ones))  # a warm-up adds; the recorded call's add is undone
    torch.testing.assert_close(acc, torch.full((3,), 4.0))


HOST_READS = {
    ".item()": lambda x: x * x.abs().max().item(),
    "bool()": lambda x: x * 2 if bool((x > 0).any()) else x,
    "float()": lambda x: x + float(x.sum()),
    ".tolist()": lambda x: x * len([v for v in x.flatten().tolist() if v > 0]),
    ".cpu()": lambda x: x + x.sum().cpu(),
    ".numpy()": lambda x: x + torch.from_numpy(x.numpy() * 2),
    "print": lambda x: print(x) or x * 2,
    "mask indexing": lambda x: x + x[x > 0].sum(),
    "nonzero": lambda x: x + torch.nonzero(x).shape[0],
    "torch.equal": lambda x: x * 2 if torch.equal(x, x) else x,
}


@pytest.mark.parametrize("what", list(HOST_READS))
def test_a_host_read_in_the_step_cannot_be_captured(what, caplog):
    """A step that reads device memory on the host fails its capture (a real capture raises "operation not permitted
    when stream is capturing"), so StepGraphs runs that key eagerly; warm-up runs may read the host."""
    fn = HOST_READS[what]
    cap = FakeCapturer(warmup=1)
    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        cap.capture(lambda: fn(torch.ones(2, 3)))
    assert cap.captures == 0
    assert torch.ones(2).tolist() == [1.0, 1.0] and repr(torch.ones(1)) == "tensor([1.])"  # the guards are gone
    sg = StepGraphs(fn, capturer=FakeCapturer(warmup=1))
    x, _ = _inputs(0)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        torch.testing.assert_close(sg("k", x), fn(x))
    assert "operation not permitted when stream is capturing" in sg.fallback_reasons["k"]
    assert sg.stats["fallbacks"] == 1 and sg.keys == []


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
