"""Host memory of block offload, one process per measurement (resident memory only grows within a process).

    python benchmarks/host_memory.py write FOLDER     # a t2v-1.3B-size DiT checkpoint (random, bf16 blocks: 2.8 GB)
    python benchmarks/host_memory.py block FOLDER     # loaded into host memory, streamed through 2 slots
    python benchmarks/host_memory.py disk FOLDER      # blocks deferred at load, read from the file at each copy

``block`` and ``disk`` print one JSON line, in MiB: the process's resident memory (``VmRSS``: anonymous and file
pages; bf16 weights stored bf16 stay memory-mapped) and its anonymous part (``RssAnon``) before the load, after it,
and at their peak over two whole forwards; the weights, the non-block weights, the largest block, the copies made
and the bytes read from the file. ``tests/test_offload.py`` (slow) and ``bench_offload.py --host-memory`` run it.
"""

from __future__ import annotations

import json
import sys

import torch


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write(folder: str) -> None:
    from safetensors.torch import save_file

    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.models.dit import WanDiT
    from wanrt.presets import get_preset

    cfg = dit_config_for(get_preset("t2v-1.3b"))
    with torch.device("meta"):
        model = WanDiT(cfg)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, p in model.state_dict().items():
        dtype = torch.float32 if WanDiT.keep_fp32(k) else torch.bfloat16
        state[k] = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
    save_file(state, folder + "/diffusion_pytorch_model.safetensors")
    with open(folder + "/config.json", "w") as f:
        json.dump(cfg.to_official_config(), f)


def measure(mode: str, folder: str) -> dict:
    import wanrt
    from wanrt.offload.disk import DiskBlocks
    from wanrt.offload.mover import BlockMover

    x = torch.randn(1, 16, 1, 8, 8)
    base = {"rss": _status("VmRSS"), "anon": _status("RssAnon")}
    model = wanrt.load_transformer(folder, device="cpu", dtype=torch.bfloat16, backend="eager",
                                   defer_blocks=mode == "disk")
    loaded = {"rss": _status("VmRSS"), "anon": _status("RssAnon")}
    reader = DiskBlocks(folder) if mode == "disk" else None
    mover = model.offload = BlockMover(model.blocks, torch.device("cpu"), 0, 2, reader=reader)
    ctx = torch.randn(1, 64, model.config.text_dim)
    peak = {k: max(v, _status("VmRSS" if k == "rss" else "RssAnon")) for k, v in loaded.items()}
    with torch.no_grad():
        for t in (900, 500):
            model(x, t, ctx)
            peak = {"rss": max(peak["rss"], _status("VmRSS")), "anon": max(peak["anon"], _status("RssAnon"))}
    params = dict(model.named_parameters())
    return {"mode": mode, "base": base, "loaded": loaded, "peak": peak,
            "weights_mib": sum(p.numel() * p.element_size() for p in params.values()) / 2**20,
            "other_mib": sum(p.numel() * p.element_size() for n, p in params.items()
                             if not n.startswith("blocks.")) / 2**20,
            "block_mib": mover.block_bytes / 2**20, "copies": mover.copies,
            "read": reader.bytes_read if reader is not None else 0}


def main() -> None:
    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "write":
        write(folder)
    elif mode in ("block", "disk"):
        print(json.dumps(measure(mode, folder)))
    else:
        raise SystemExit(f"unknown mode {mode!r}: write, block or disk")


if __name__ == "__main__":
    main()
