"""wanrt.parallel: the layout config (pure), attention with its log-sum-exp and the merge (in process), and
the collectives on real gloo process groups on 127.0.0.1 (one spawned group per world size, every sub-check
run inside it).

A spawned group reports each rank's outcome through a queue; the first failure (or the deadline) terminates
every rank, so a failing or stuck rank fails the test instead of hanging it. Collectives time out after 30 s.
"""

from __future__ import annotations

import time

import pytest
import torch

from spawn_group import assert_group_ok as _assert_group_ok
from spawn_group import spawn as _spawn
from wanrt.parallel import (
    ParallelConfig,
    attention_with_lse,
    heads_to_seq,
    init,
    merge,
    pad_to_multiple,
    ring_attention,
    seq_to_heads,
    ulysses_attention,
    usp_attention,
    valid_layouts,
)

RTOL = 1e-5
ATOL = 1e-6
GROUP_DEADLINE_S = 90.0


def _close(actual, expected, what=""):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------- (a) config


def test_config_defaults_and_products():
    c = ParallelConfig()
    assert (c.ulysses, c.ring, c.cfg, c.shard_weights, c.world_size, c.sp) == (1, 1, 1, False, 1, 1)
    c = ParallelConfig(ulysses=4, ring=2, cfg=2, shard_weights=True)
    assert (c.world_size, c.sp) == (16, 8)
    with pytest.raises(Exception):
        c.ulysses = 2  # frozen


@pytest.mark.parametrize("kwargs", [
    {"ulysses": 0}, {"ring": -1}, {"ulysses": 2.0}, {"ring": True}, {"cfg": 3}, {"cfg": 0},
    {"shard_weights": 1}, {"shard_weights": "yes"},
])
def test_config_rejects(kwargs):
    with pytest.raises(ValueError, match="ParallelConfig"):
        ParallelConfig(**kwargs)


def test_config_check():
    ParallelConfig(ulysses=4, ring=2).check(8, 12)
    ParallelConfig(ulysses=2, ring=2, cfg=2).check(8, 12)
    with pytest.raises(ValueError) as err:
        ParallelConfig(ulysses=8).check(8, 12)
    text = str(err.value)
    assert "12 heads do not divide by ulysses 8" in text
    assert "ulysses 4 x ring 2" in text and "ulysses 2 x ring 4" in text and "ulysses 1 x ring 8" in text
    assert "ulysses 4 x ring 1 x cfg 2" in text
    assert "ulysses 8 x ring 1" not in text
    with pytest.raises(ValueError, match="world size is 8") as err:
        ParallelConfig(ulysses=2, ring=2).check(8, 12)
    assert "ulysses 4 x ring 2" in str(err.value)
    assert valid_layouts(3, 2) == ["ulysses 1 x ring 3"]


@pytest.mark.parametrize("world, heads, guidance, expected", [
    (1, 12, True, (1, 1, 1)),
    (2, 12, True, (1, 1, 2)),
    (2, 12, False, (2, 1, 1)),
    (8, 12, False, (4, 2, 1)),
    (8, 12, True, (4, 1, 2)),
    (8, 40, False, (8, 1, 1)),
    (8, 40, True, (4, 1, 2)),
    (3, 12, True, (3, 1, 1)),     # odd world size: no CFG split
    (6, 12, True, (3, 1, 2)),
    (5, 12, False, (1, 5, 1)),    # no common divisor: all Ring
    (16, 12, True, (4, 2, 2)),
])
def test_config_auto(world, heads, guidance, expected):
    c = ParallelConfig.auto(world, heads, guidance)
    assert (c.ulysses, c.ring, c.cfg) == expected
    assert c.world_size == world
    c.check(world, heads)


def test_auto_rejects_bad_sizes():
    with pytest.raises(ValueError, match="world_size"):
        ParallelConfig.auto(0, 12, False)
    with pytest.raises(ValueError, match="num_heads"):
        ParallelConfig.auto(2, 0, False)


def test_init_without_torchrun_env(monkeypatch):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init()


def test_pad_to_multiple():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    y, n = pad_to_multiple(x, 1, 4)
    assert n == 5 and y.shape == (2, 8, 3)
    assert torch.equal(y[:, :5], x) and not y[:, 5:].any()
    y, n = pad_to_multiple(x, -1, 3)
    assert n == 3 and y is x
    with pytest.raises(ValueError):
        pad_to_multiple(x, 0, 0)


# ------------------------------------------------------------------------------------- (b) attention + merge


def _qkv(seed, b, s, h, d, dtype=torch.float32, sk=None):
    g = torch.Generator().manual_seed(seed)
    sk = s if sk is None else sk
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64) * 2.0
    v = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v, k_valid=None):
    """Float64 softmax attention written independently of attention_with_lse."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if k_valid is not None:
        scores = scores.masked_fill(~k_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), torch.logsumexp(scores, dim=-1)


def test_attention_with_lse_matches_reference():
    q, k, v = _qkv(0, 2, 6, 3, 8, sk=9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 2] = valid[1, 7:] = False
    out, lse = attention_with_lse(q, k, v, valid)
    assert out.dtype == torch.float32 and out.shape == (2, 6, 3, 8) and lse.shape == (2, 3, 6)
    ref_out, ref_lse = _reference(q, k, v, valid)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    out16, _ = attention_with_lse(q.half(), k.half(), v.half())
    assert out16.dtype == torch.float32


def test_attention_all_keys_masked_is_zero_not_nan():
    q, k, v = _qkv(1, 2, 4, 2, 4)
    valid = torch.zeros(2, 4, dtype=torch.bool)
    valid[1, 0] = True
    out, lse = attention_with_lse(q, k, v, valid)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("case", ["none", "some", "second_half_empty", "first_half_empty_row"])
def test_merge_of_two_halves_equals_full(case):
    q, k, v = _qkv(2, 2, 5, 3, 8, sk=10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    if case == "some":
        valid[0, 1] = valid[0, 8] = valid[1, 4] = False
    elif case == "second_half_empty":
        valid[:, 5:] = False
    elif case == "first_half_empty_row":
        valid[1, :5] = False
        valid[0, 9] = False
    a = attention_with_lse(q, k[:, :5], v[:, :5], valid[:, :5])
    b = attention_with_lse(q, k[:, 5:], v[:, 5:], valid[:, 5:])
    out, lse = merge(*a, *b)
    ref_out, ref_lse = _reference(q, k, v, valid)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    out_r, lse_r = merge(*b, *a)  # symmetric
    _close(out_r, ref_out, "out (b, a)")


def test_merge_is_stable_for_large_logits():
    """Scores in the thousands: exp(lse) overflows float32, so the merge must weigh relative to the larger lse."""
    q, k, v = _qkv(4, 1, 4, 2, 8, sk=6)
    q = q * 300.0
    a = attention_with_lse(q, k[:, :3], v[:, :3])
    b = attention_with_lse(q, k[:, 3:], v[:, 3:])
    assert a[1].abs().max() > 200.0
    out, lse = merge(*a, *b)
    ref_out, ref_lse = _reference(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)


def test_merge_both_empty():
    q, k, v = _qkv(3, 1, 3, 2, 4)
    none = torch.zeros(1, 3, dtype=torch.bool)
    a = attention_with_lse(q, k, v, none)
    out, lse = merge(*a, *a)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ------------------------------------------------------------------------------------ spawned process groups


def _padded_case(seed, b, s, h, d, world, holes=True):
    """Full q/k/v of length ``s`` (float32), a key mask with holes, and their versions padded to ``world``."""
    q, k, v = _qkv(seed, b, s, h, d)
    valid = torch.ones(b, s, dtype=torch.bool)
    if holes:
        valid[0, 1] = valid[b - 1, s // 2] = False
    ref_out, ref_lse = _reference(q, k, v, valid)
    (qp, _), (kp, _), (vp, _) = (pad_to_multiple(t, 1, world) for t in (q, k, v))
    validp, _ = pad_to_multiple(valid, 1, world)  # padding: False, never attended
    return qp, kp, vp, validp, ref_out, ref_lse


def _shard(t, rank, world):
    n = t.shape[1] // world
    return t[:, rank * n:(rank + 1) * n]


def _check_ring_and_ulysses(rank, world, group=None, label=""):
    import torch.distributed as dist

    h = 4
    for seed, s, holes in ((10, 8, False), (11, 8, True), (12, 7, True), (13, 9, False)):
        qp, kp, vp, validp, ref_out, ref_lse = _padded_case(seed, 2, s, h, 8, world, holes)
        n = qp.shape[1] // world
        q, k, v, valid = (_shard(t, rank, world) for t in (qp, kp, vp, validp))
        keep = max(0, min(n, s - rank * n))  # this rank's rows that are real tokens (padding rows dropped)
        rows = slice(rank * n, rank * n + keep)
        out, lse = ring_attention(q, k, v, valid, group)
        assert out.dtype == torch.float32 and not out.isnan().any()
        _close(out[:, :keep], ref_out[:, rows], f"{label} ring out (s={s}, holes={holes})")
        _close(lse[:, :, :keep], ref_lse[:, :, rows], f"{label} ring lse (s={s}, holes={holes})")
        out = ulysses_attention(q, k, v, validp, group)
        assert out.shape == q.shape
        _close(out[:, :keep], ref_out[:, rows], f"{label} ulysses out (s={s}, holes={holes})")
    # A rank whose whole key shard is masked (and queries whose keys are all on one rank).
    qp, kp, vp = _qkv(14, 1, 2 * world, h, 8)
    validp = torch.zeros(1, 2 * world, dtype=torch.bool)
    validp[0, :2] = True
    ref_out, ref_lse = _reference(qp, kp, vp, validp)
    q, k, v, valid = (_shard(t, rank, world) for t in (qp, kp, vp, validp))
    out, lse = ring_attention(q, k, v, valid, group)
    _close(out, _shard(ref_out, rank, world), f"{label} ring, masked shards")
    _close(ulysses_attention(q, k, v, validp, group), _shard(ref_out, rank, world), f"{label} ulysses, masked shards")
    dist.barrier(group)


def _body_two(rank, world):
    import torch.distributed as dist

    notes = {"backend": dist.get_backend()}
    # All-to-all: expected head shard, and the round trip is the identity.
    full = torch.arange(2 * 6 * 4 * 3, dtype=torch.float32).reshape(2, 6, 4, 3)
    x = _shard(full, rank, world)
    heads = seq_to_heads(x)
    assert heads.shape == (2, 6, 2, 3)
    assert torch.equal(heads, full[:, :, rank * 2:(rank + 1) * 2])
    assert torch.equal(heads_to_seq(heads), x)
    x64 = torch.randn(1, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    assert torch.equal(heads_to_seq(seq_to_heads(x64)), x64)
    try:
        seq_to_heads(torch.zeros(1, 2, 3, 4))
        raise AssertionError("3 heads on 2 ranks were accepted")
    except ValueError:
        pass
    _check_ring_and_ulysses(rank, world)
    return notes


def _body_four(rank, world):
    import torch.distributed as dist

    u, r_size = 2, 2
    # rank = ring_index * U + ulysses_index: Ulysses groups are consecutive ranks, Ring groups stride U.
    ulysses_groups = [dist.new_group([ring * u + i for i in range(u)]) for ring in range(r_size)]
    ring_groups = [dist.new_group([ring * u + i for ring in range(r_size)]) for i in range(u)]
    ulysses_group, ring_group = ulysses_groups[rank // u], ring_groups[rank % u]
    h = 4
    for seed, s, holes in ((20, 8, False), (21, 8, True), (22, 10, True), (23, 13, False)):
        qp, kp, vp, validp, ref_out, _ = _padded_case(seed, 2, s, h, 8, world, holes)
        n = qp.shape[1] // world
        q, k, v = (_shard(t, rank, world) for t in (qp, kp, vp))
        block = validp[:, (rank // u) * u * n:(rank // u + 1) * u * n]  # this rank's ring block of keys
        out = usp_attention(q, k, v, block, ulysses_group, ring_group)
        keep = max(0, min(n, s - rank * n))
        _close(out[:, :keep], ref_out[:, rank * n:rank * n + keep], f"usp 2x2 (s={s}, holes={holes})")
    # The whole world as one Ring and one Ulysses group too.
    _check_ring_and_ulysses(rank, world, label="4 ranks")
    return {}


def test_two_ranks_gloo():
    start = time.monotonic()
    outcome = _spawn(2, _body_two)
    _assert_group_ok(outcome, 2)
    assert outcome[0][1]["backend"] == "gloo"
    assert time.monotonic() - start < GROUP_DEADLINE_S


def test_four_ranks_ulysses_x_ring_gloo():
    outcome = _spawn(4, _body_four)
    _assert_group_ok(outcome, 4)


def _body_fails_on_rank_one(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.barrier()  # would wait for rank 1 until the collective timeout: the harness must not
    return {}


def test_failing_rank_fails_fast():
    start = time.monotonic()
    outcome = _spawn(2, _body_fails_on_rank_one, deadline_s=60.0)
    assert "deliberate failure on rank 1" in (outcome[1][0] or "")
    assert time.monotonic() - start < 25.0
    with pytest.raises(AssertionError, match="deliberate failure"):
        _assert_group_ok(outcome, 2)


