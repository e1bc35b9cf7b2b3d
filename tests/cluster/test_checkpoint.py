"""Checkpoint loading: clear errors, sharded indexes, and partial (per-expert) loading."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cluster.checkpoint import Checkpoint, CheckpointError
from cluster.families import UnsupportedModelError
from cluster.loader import load_backbone, load_experts, open_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_model_type(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("mixtral"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'llama'.*mixtral"):
        open_model(str(path))


def test_missing_tensor_names_file_and_tensor(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("mixtral"), tmp_path / "m")
    ckpt = Checkpoint(path)
    tensors = {n: ckpt.read(n, i.shape) for n, i in ckpt.tensors.items() if "layers.1.self_attn.q_proj" not in n}
    save_file(tensors, path / "model.safetensors")
    ckpt, family, cfg = open_model(str(path))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.q_proj\.weight' not found"):
        load_backbone(ckpt, family, cfg)


def test_shape_mismatch_names_file_and_tensor(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("mixtral"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 47
    (path / "config.json").write_text(json.dumps(cfg))
    ckpt, family, mc = open_model(str(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\."
                                              r"experts\.0\.w1\.weight' has shape \[48, 64\], config\.json implies"):
        load_experts(ckpt, family, mc, [(0, 0)])


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_without_unpickling(checkpoint_factory, tmp_path, name):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(checkpoint_factory("mixtral") / "config.json", path)
    # A pickle that would run code if anything unpickled it.
    (path / name).write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    with pytest.raises(CheckpointError, match=f"only pickled weights found \\({name}\\).*safetensors only"):
        open_model(str(path))
    assert not (tmp_path / "pwned").exists()


def test_missing_config_and_garbage_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        Checkpoint(tmp_path)


def test_sharded_checkpoint_with_index(checkpoint_factory, tmp_path):
    src = checkpoint_factory("qwen2_moe")
    path = _copy(src, tmp_path / "sharded")
    ckpt = Checkpoint(path)
    names = sorted(ckpt.tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: ckpt.read(n, ckpt.tensors[n].shape) for n in part}, path / file)
    (path / "model.safetensors").unlink()
    weight_map = {n: f for f, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = open_model(str(src)), open_model(str(path))
    wa, wb = load_backbone(*a), load_backbone(*b)
    torch.testing.assert_close(wa.layers[2].attn.q, wb.layers[2].attn.q, rtol=0, atol=0)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00002-of-00002"):
        Checkpoint(path)


def _disk_bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_partial_loading_reads_only_the_requested_experts(checkpoint_factory):
    """Loading 1 of 8 experts reads about 1/8 of the expert bytes, measured by the kernel."""
    path = checkpoint_factory("mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                              vocab_size=64)
    ckpt, family, cfg = open_model(str(path))
    all_expert_bytes = sum(i.nbytes for n, i in ckpt.tensors.items() if ".experts." in n)
    _drop_page_cache(path / "model.safetensors")
    before = _disk_bytes_read()
    experts = load_experts(ckpt, family, cfg, [(0, 5), (1, 5)])  # expert 5 of 8, in every layer
    disk = _disk_bytes_read() - before
    assert list(experts) == [(0, 5), (1, 5)]
    assert ckpt.bytes_read == all_expert_bytes / 8
    if before == 0 and disk == 0:
        pytest.skip("this kernel does not account block I/O per process")
    assert all_expert_bytes / 8 <= disk <= all_expert_bytes / 8 * 1.25, f"{disk} bytes read from disk"


def test_partial_loading_rejects_unknown_expert(checkpoint_factory):
    ckpt, family, cfg = open_model(str(checkpoint_factory("qwen2_moe")))
    with pytest.raises(CheckpointError, match="no expert 0 in layer 1"):  # layer 1 is dense (mlp_only_layers)
        load_experts(ckpt, family, cfg, [(1, 0)])
    with pytest.raises(CheckpointError, match="no expert 8 in layer 0"):
        load_experts(ckpt, family, cfg, [(0, 8)])
