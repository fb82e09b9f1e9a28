"""A stage's weights file that cannot be used ends `cascade sample` in one line naming the file and the stage (and,
for weights trained with other settings, the recipe fields that differ), never a traceback; `--device cuda` on a
machine without CUDA likewise; exported weights files are byte-reproducible."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade.cli import main
from cascade.inference import load_stage
from cascade.recipe import load_recipe
from cascade.recipe.build import build_unet
from cascade.weights import WeightsInfo, read_info, save_weights, save_weights_streaming

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def base_weights():
    """The tiny recipe's base network's state dict (random initialisation)."""
    recipe = load_recipe(TINY)
    return build_unet(recipe.stage("base"), recipe).state_dict()


def _sample(tmp_path, weights: Path, capsys, *overrides) -> tuple[int, str]:
    code = main(["sample", str(TINY), "stages.base.sampler.steps=2", *overrides, "--up-to", "base", "--prompt", "x",
                 "--out", str(tmp_path / "v.mp4"), "--checkpoints", str(weights)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _one_line_error(text: str) -> str:
    assert "Traceback" not in text and "weights_only" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _truncated(weights: dict, path: Path) -> None:
    save_file(weights, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_header(weights: dict, path: Path) -> None:
    text = b'{"__metadata__": {"cascade.weights": "ema"}, "conv.weight": {"dtype": "F32", "shape": [2'
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 64)


def _unknown_dtype(weights: dict, path: Path) -> None:
    text = json.dumps({"x": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)


def _size_disagrees_with_dtype(weights: dict, path: Path) -> None:
    text = json.dumps({"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)


def _integer_tensor(weights: dict, path: Path) -> None:
    first = next(iter(weights))
    save_file({**weights, first: weights[first].to(torch.int32)}, str(path))


def _missing(weights: dict, path: Path) -> None:
    save_file({k: v for i, (k, v) in enumerate(weights.items()) if i != 3}, str(path))


def _unexpected(weights: dict, path: Path) -> None:
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(path))


@pytest.mark.parametrize("write, cause", [
    (lambda w, p: p.write_bytes(b""), "empty"),
    (lambda w, p: p.write_bytes(b"\x07garbage, not weights" * 50), "not a readable safetensors"),
    (lambda w, p: torch.save(w, p), "a PyTorch checkpoint or pickle, not a safetensors weights file of stage base"),
    (lambda w, p: p.write_bytes(pickle.dumps(_RunsCode(str(p.parent / "ran")), protocol=2)),
     "a PyTorch checkpoint or pickle"),
    (_truncated, "not a readable safetensors weights file of stage base"),
    (_bad_header, "not a readable safetensors weights file of stage base"),
    (_unknown_dtype, "not a readable safetensors weights file of stage base"),
    (_size_disagrees_with_dtype, "not a readable safetensors weights file of stage base"),
    (_integer_tensor, "is torch.int32, the recipe's network holds torch.float32"),
    (_missing, "tensors is missing ("),
    (_unexpected, "1 tensor is not in the network (extra.weight)"),
], ids=["empty", "garbage", "torch-checkpoint", "code-running-pickle", "truncated", "bad-header", "unknown-dtype",
        "size-disagrees-with-dtype", "integer-tensor", "missing-tensor", "unexpected-tensor"])
def test_an_unusable_weights_file_is_one_line_naming_it(tmp_path, capsys, base_weights, write, cause):
    weights = tmp_path / "weights"
    weights.mkdir()
    path = weights / "base.safetensors"
    write(base_weights, path)
    code, text = _sample(tmp_path, weights, capsys)
    line = _one_line_error(text)
    assert code == 2 and str(path) in line and cause in line, line
    assert not (weights / "ran").exists()  # nothing was unpickled


def _exported(recipe, stage_name: str, path: Path) -> None:
    """Weights of the stage as `cascade export` writes them: the resolved stage recipe in the metadata."""
    stage = recipe.stage(stage_name)
    save_weights(path, build_unet(stage, recipe).state_dict(), WeightsInfo(kind="ema"), {
        "cascade.stage": json.dumps(stage.model_dump(mode="json")), "cascade.recipe": recipe.name,
        "cascade.text_encoder": json.dumps(recipe.text_encoder.model_dump(mode="json")), "cascade.global_step": "3"})


def test_weights_trained_with_other_settings_name_the_differing_fields(tmp_path, capsys):
    weights = tmp_path / "weights"
    path = weights / "base.safetensors"
    _exported(load_recipe(TINY, ["stages.base.unet.channels=16"]), "base", path)
    code, text = _sample(tmp_path, weights, capsys)
    line = _one_line_error(text)
    assert code == 2
    assert f"{path}: trained with stages.base.unet.channels 16, the recipe says 32;" in line, line
    assert "do not fit stage base" in line and "has shape" in line
    # several fields: every one listed (training settings that do not shape the network left out)
    _exported(load_recipe(TINY, ["stages.base.unet.channels=16", "stages.base.unet.head_dim=8",
                                 "stages.base.train.lr=0.5"]), "base", path)
    line = _one_line_error(_sample(tmp_path, weights, capsys)[1])
    assert "stages.base.unet.channels 16 (the recipe says 32)" in line
    assert "stages.base.unet.head_dim 8 (the recipe says 16)" in line and "train.lr" not in line, line
    # with the fields it was trained with, the file loads
    fitting = load_recipe(TINY, ["stages.base.unet.channels=16", "stages.base.unet.head_dim=8"])
    assert load_stage(fitting, "base", weights).info.kind == "ema"
    # a file that does not fit for another reason: the tensor problem, not the training settings that differ
    recipe = load_recipe(TINY, ["stages.base.train.lr=0.5"])
    stage = recipe.stage("base")
    tensors = build_unet(stage, recipe).state_dict()
    dropped = next(iter(tensors))
    save_weights(path, {k: v for k, v in tensors.items() if k != dropped}, WeightsInfo(kind="ema"),
                 {"cascade.stage": json.dumps(stage.model_dump(mode="json"))})
    line = _one_line_error(_sample(tmp_path, weights, capsys)[1])
    assert line.startswith(f"error: {path}: does not fit stage base: 1 of the network's") and dropped in line, line
    assert "lr" not in line
    # the text encoder's width shapes the cross-attention
    _exported(load_recipe(TINY, ["text_encoder.dim=24"]), "base", path)
    line = _one_line_error(_sample(tmp_path, weights, capsys)[1])
    assert f"{path}: trained with text_encoder.dim 24, the recipe says {load_recipe(TINY).text_encoder.dim};" in line


def test_checkpoints_naming_a_file_or_a_folder_without_the_stage(tmp_path, capsys, base_weights):
    file = tmp_path / "base.safetensors"
    save_file(base_weights, str(file))
    code, text = _sample(tmp_path, file, capsys)
    assert code == 2 and f"error: {file}: a file; the weights are a folder" in _one_line_error(text)
    code, text = _sample(tmp_path, tmp_path / "none", capsys)
    line = _one_line_error(text)
    assert code == 2 and f"{tmp_path / 'none' / 'base.safetensors'}: no weights for stage base" in line


def test_weights_without_metadata_name_the_first_mismatching_tensor(tmp_path, capsys, base_weights):
    recipe = load_recipe(TINY, ["stages.base.unet.channels=16"])
    weights = tmp_path / "weights"
    weights.mkdir()
    path = weights / "base.safetensors"
    small = build_unet(recipe.stage("base"), recipe).state_dict()
    save_file(small, str(path))
    code, text = _sample(tmp_path, weights, capsys)
    line = _one_line_error(text)
    name = next(k for k in small if small[k].shape != base_weights[k].shape)
    assert code == 2 and line.startswith(f"error: {path}: does not fit stage base: tensor {name} has shape "
                                         f"{list(small[name].shape)}, the recipe's network has "
                                         f"{list(base_weights[name].shape)}"), line


@pytest.mark.parametrize("command", [
    ["demo", "--out", "OUT"],
    ["sample", str(TINY), "--prompt", "x", "--out", "OUT/v.mp4"],
    ["sample", str(TINY), "--prompt", "x", "--out", "OUT/v.mp4", "--checkpoints", "OUT"],
], ids=["demo", "sample", "sample-checkpoints"])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch, command, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on every CI machine; a GPU box too
    code = main([a.replace("OUT", str(tmp_path)) for a in command] + ["--device", device])
    captured = capsys.readouterr()
    line = _one_line_error(captured.out + captured.err)
    assert code == 2 and line.startswith(f"error: --device {device}: no CUDA device is visible here"), line
    assert not list(tmp_path.iterdir())  # refused before any work


# --- byte-reproducible exports ---------------------------------------------------------------------------------------

def _tensors(order: list[str]) -> dict:
    generator = torch.Generator().manual_seed(0)
    made = {"b.weight": torch.randn(3, 5, generator=generator), "a.bias": torch.arange(3, dtype=torch.float16),
            "c": torch.tensor(2.5, dtype=torch.bfloat16), "d.count": torch.tensor([1, 2]), "e": torch.zeros(0)}
    return {k: made[k] for k in order}


def test_the_same_weights_and_description_give_the_same_bytes(tmp_path):
    names = ["b.weight", "a.bias", "c", "d.count", "e"]
    described = {"cascade.stage": json.dumps({"name": "base", "unet": {"channels": 32, "head_dim": 16}}),
                 "cascade.recipe": "tiny", "cascade.global_step": "3"}
    reordered = {"cascade.global_step": "3", "cascade.recipe": "tiny",
                 "cascade.stage": json.dumps({"unet": {"head_dim": 16, "channels": 32}, "name": "base"})}
    info = WeightsInfo(kind="distilled", method="guidance", steps=4, sampler="ddim", guidance_input=True,
                       w_range=(0.0, 2.0))
    one = save_weights(tmp_path / "one.safetensors", _tensors(names), info, described)
    two = save_weights(tmp_path / "two.safetensors", _tensors(names[::-1]), info, reordered)
    assert one.read_bytes() == two.read_bytes()
    back = load_file(str(one))
    assert all(torch.equal(back[k], v) for k, v in _tensors(names).items()) and back.keys() == set(names)
    assert read_info(one) == info
    # the streaming writer gives the same file, whatever order its groups and their names come in
    tensors = _tensors(names)
    index = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    for groups in ([names], [["d.count", "c"], ["e", "b.weight", "a.bias"]], [["a.bias", "b.weight", "c", "d.count",
                                                                              "e"]]):
        three = save_weights_streaming(tmp_path / "three.safetensors", index,
                                       [(g, lambda g=g: {k: tensors[k] for k in g}) for g in groups[::-1]], info,
                                       reordered)
        assert load_file(str(three)).keys() == set(names)
        if len(groups) == 1:
            assert three.read_bytes() == one.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def _checkpoint(path: Path, weights: dict, reverse: bool) -> None:
    """A training checkpoint as the trainer writes one (tensors and plain containers), its dicts built in the
    given order."""
    recipe = load_recipe(TINY)
    stage = recipe.stage("base")
    order = list(weights)[::-1] if reverse else list(weights)
    info = dict(recipe=recipe.name, text_encoder=recipe.text_encoder.model_dump(mode="json"),
                stage=stage.model_dump(mode="json"))
    if reverse:
        info = {k: info[k] for k in reversed(info)}
        info["stage"] = {k: info["stage"][k] for k in reversed(info["stage"])}
    state = {"state_dict": {f"ema.module.{k}": weights[k] for k in order} | {"net.x": torch.zeros(1)},
             "cascade": {"recipe": json.dumps(info)}, "global_step": 7}
    torch.save(state if not reverse else {k: state[k] for k in reversed(state)}, path)


def test_two_exports_of_equal_checkpoints_are_byte_equal(tmp_path, capsys, base_weights):
    for name, reverse in (("one", False), ("two", True)):
        _checkpoint(tmp_path / f"{name}.ckpt", {k: v.clone() for k, v in base_weights.items()}, reverse)
        assert main(["export", str(tmp_path / f"{name}.ckpt"), "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    one, two = (tmp_path / f"{n}.safetensors" for n in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
    data = one.read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])  # as stored: keys in file order
    meta = header["__metadata__"]
    assert list(header) == sorted(header) and list(meta) == sorted(meta)
    assert meta["cascade.global_step"] == "7" and meta["cascade.weights"] == "ema"
    recipe = load_recipe(TINY)
    assert json.loads(meta["cascade.stage"]) == recipe.stage("base").model_dump(mode="json")


def test_a_safetensors_file_whose_header_length_starts_with_the_pickle_byte_loads(tmp_path):
    """A safetensors file starts with its header's length (u64, little-endian): a length of 0x..80 bytes put 0x80,
    pickle's first byte, at byte 0, and the file was refused as a pickle (a teacher in the SLURM graph test)."""
    from safetensors.torch import save_file

    from cascade.loading import read_safetensors

    path = tmp_path / "w.safetensors"
    for pad in range(300):  # grow the metadata until the header's length ends in 0x80
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and metadata["pad"] == "x" * pad


def test_weights_whose_tensors_fit_but_mean_something_else_are_refused(tmp_path):
    """diffusion.residual and diffusion.parameterization leave the tensors' shapes alone: a file trained with
    another value loads without a size mismatch, so the recorded stage is what tells."""
    from cascade.errors import UserError

    weights = tmp_path / "weights"
    path = weights / "ssr1.safetensors"
    plain, residual = (load_recipe(TINY, [f"stages.ssr1.diffusion.residual={v}"]) for v in ("false", "true"))
    _exported(residual, "ssr1", path)
    with pytest.raises(UserError, match=r"trained with stages\.ssr1\.diffusion\.residual True, the recipe says "
                                        r"False.*override stages\.ssr1\.diffusion\.residual=true"):
        load_stage(plain, "ssr1", weights)
    assert load_stage(residual, "ssr1", weights).path == path
    # a file from before the field existed was trained without it
    stage = plain.stage("ssr1").model_dump(mode="json")
    del stage["diffusion"]["residual"]
    save_weights(path, build_unet(plain.stage("ssr1"), plain).state_dict(), WeightsInfo(kind="ema"),
                 {"cascade.stage": json.dumps(stage)})
    assert load_stage(plain, "ssr1", weights).path == path
    with pytest.raises(UserError, match="residual False, the recipe says True"):
        load_stage(residual, "ssr1", weights)
