"""The parts of sharded training that run in one process (a one-rank gloo group): the EMA on shards against
torch.optim.swa_utils' on whole tensors, bf16 compute with fp32 gradients under bf16-mixed, which checkpoint
folders count as complete, the streamed safetensors writer, and an export that holds one block at a time.
The two-rank runs (losses against DDP, bytes per rank, resume, export) are in test_sharded.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cascade.lit import sharding
from cascade.nn.unet import VideoUNet


@pytest.fixture
def mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _net() -> VideoUNet:
    torch.manual_seed(0)
    net = VideoUNet(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 2), cross_attention=(False, True),
                    head_dim=8, text_dim=8, spatial_attention=(False, True), temporal="attention")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _step(net, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 8, 8, generator=g)
    out = net(x, torch.tensor([-1.0, 2.0]), text=torch.randn(2, 3, 8, generator=g), fps=torch.full((2,), 4.0))
    return out.float().square().mean()


def test_blocks_are_the_units_sharded(mesh):
    net = _net()
    blocks = list(sharding.unet_blocks(net))
    assert len(blocks) == 2 * (1 + 2)  # down and up paths, num_res_blocks (1, 2)
    sharding.shard_network(net, mesh, sharding.mixed_precision("32-true"))
    from torch.distributed.fsdp import FSDPModule

    assert sharding.is_sharded(net) and isinstance(net, FSDPModule)
    assert all(isinstance(b, FSDPModule) for b in blocks)
    assert all(hasattr(p, "to_local") for p in net.parameters()), "every parameter is a DTensor"


def test_ema_on_shards_is_swa_utils_ema(mesh):
    """Three optimizer steps; after each, the EMA of the sharded network (local shards) and torch's AveragedModel
    of an unsharded copy trained the same way agree bit for bit."""
    decay = 0.9
    plain = _net()
    swa = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    net = copy.deepcopy(plain)
    ema = copy.deepcopy(plain)
    policy = sharding.mixed_precision("32-true")
    sharding.shard_network(net, mesh, policy)
    sharding.shard_network(ema, mesh, policy)
    opt_a, opt_b = torch.optim.SGD(plain.parameters(), lr=0.1), torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        for model, opt in ((plain, opt_a), (net, opt_b)):
            opt.zero_grad()
            _step(model, step).backward()
            opt.step()
        swa.update_parameters(plain)
        sharding.ema_update(ema, net, decay, first=step == 0)
        theirs = dict(swa.module.named_parameters())
        for name, p in ema.named_parameters():
            assert torch.equal(sharding.local(p), theirs[name]), (step, name)
    moved = [n for n, p in ema.named_parameters() if not torch.equal(sharding.local(p), dict(net.named_parameters())[n].to_local())]
    assert moved, "the EMA lags the weights after three steps"


def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_gradients(mesh):
    net = _net()
    sharding.shard_network(net, mesh, sharding.mixed_precision("bf16-mixed"))
    seen = []
    block = next(sharding.unet_blocks(net))
    block.register_forward_pre_hook(lambda m, args: seen.append({p.dtype for p in m.parameters()}))
    _step(net, 0).backward()
    assert seen == [{torch.bfloat16}], f"weights during the block's forward: {seen}"
    assert {p.dtype for p in net.parameters()} == {torch.float32}, "the sharded master weights stay fp32"
    assert {p.grad.dtype for p in net.parameters() if p.grad is not None} == {torch.float32}
    policy = sharding.mixed_precision("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert sharding.mixed_precision("32-true").param_dtype is None


def test_checkpoint_folders_count_only_when_complete(tmp_path):
    last = tmp_path / "last.ckpt"
    assert sharding.complete_checkpoint(last) is None
    last.mkdir()
    (last / "__0_0.distcp").write_bytes(b"x")
    (last / sharding.DCP_META).write_bytes(b"x")
    assert sharding.complete_checkpoint(last) is None, "no meta.pt yet: not complete"
    (last / sharding.META).write_bytes(b"x")
    assert sharding.complete_checkpoint(last) == last
    # a kill between `last.ckpt -> last.ckpt.old` and `last.ckpt.tmp -> last.ckpt`
    old = tmp_path / "last.ckpt.old"
    last.rename(old)
    assert sharding.complete_checkpoint(last) == old
    file = tmp_path / "one.ckpt"
    file.write_bytes(b"x")
    assert sharding.checkpoint_complete(file)


def test_streamed_safetensors_file_reads_back_and_is_reproducible(tmp_path):
    from cascade.weights import WeightsInfo, read_info, save_weights_streaming

    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.arange(4, dtype=torch.bfloat16), "c": torch.tensor(2.5),
               "d.count": torch.tensor([1, 2], dtype=torch.int64)}
    index = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    groups = [(["c", "a.bias"], lambda: {k: tensors[k] for k in ("c", "a.bias")}),
              (["d.count", "b.weight"], lambda: {k: tensors[k] for k in ("d.count", "b.weight")})]
    one = save_weights_streaming(tmp_path / "one.safetensors", index, groups, WeightsInfo(kind="ema"),
                                 {"cascade.recipe": "tiny"})
    two = save_weights_streaming(tmp_path / "two.safetensors", index, groups, WeightsInfo(kind="ema"),
                                 {"cascade.recipe": "tiny"})
    back = load_file(str(one))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert one.read_bytes() == two.read_bytes()
    assert read_info(one).kind == "ema"
    bad = [(["c", "a.bias"], lambda: {"c": torch.zeros(2), "a.bias": tensors["a.bias"]}), groups[1]]
    with pytest.raises(ValueError, match="tensor c is"):
        save_weights_streaming(tmp_path / "bad.safetensors", index, bad, WeightsInfo(kind="ema"), {})
    assert not (tmp_path / "bad.safetensors").exists()


def test_export_of_a_sharded_checkpoint_holds_one_block_at_a_time(tmp_path, monkeypatch):
    """A distributed checkpoint written the way Lightning writes one (module state under `state_dict.`, the rest
    in meta.pt): the export equals the EMA, and no read assembles more than one block's tensors."""
    import torch.distributed.checkpoint as dcp

    from cascade.lit.train import export

    ema = _net().state_dict()
    folder = tmp_path / "last.ckpt"
    state = {"state_dict": {**{f"ema.module.{k}": v for k, v in ema.items()},
                            **{f"net.{k}": v + 1 for k, v in ema.items()}}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save(dict(global_step=7, cascade=dict(recipe=json.dumps(dict(recipe="tiny", stage=dict(name="base"))))),
               folder / sharding.META)

    reads = []
    original = sharding.read_tensors

    def counting(path, keys, index=None):
        out = original(path, keys, index)
        reads.append(sum(v.numel() * v.element_size() for v in out.values()))
        return out
    monkeypatch.setattr(sharding, "read_tensors", counting)
    out = export(folder, tmp_path / "base.safetensors")
    back = load_file(str(out))
    assert back.keys() == ema.keys() and all(torch.equal(back[k], ema[k]) for k in ema)
    blocks = [sum(p.numel() * p.element_size() for p in b.state_dict().values()) for b in sharding.unet_blocks(_net())]
    total = sum(v.numel() * v.element_size() for v in ema.values())
    root = total - sum(blocks)
    assert len(reads) == len(blocks) + 1 and max(reads) <= max(max(blocks), root) < total
