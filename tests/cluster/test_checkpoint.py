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


def test_reads_loop_over_short_preads(checkpoint_factory, monkeypatch):
    """One pread returns at most 2 GiB on Linux: a tensor larger than that takes several. Short reads
    are simulated (7 bytes at most per call) instead of writing a 2 GiB file."""
    path = checkpoint_factory("mixtral")
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    expected = Checkpoint(path).read(name, (48, 64))
    real, calls = os.preadv, []

    def short_preadv(fd, buffers, offset):
        calls.append(offset)
        return real(fd, [buffers[0][:7]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    torch.testing.assert_close(Checkpoint(path).read(name, (48, 64)), expected, rtol=0, atol=0)
    assert len(calls) == -(-48 * 64 * 4 // 7)  # fp32 here: the tiny checkpoints are stored fp32


def test_truncated_file_is_a_short_read_not_a_hang(checkpoint_factory, tmp_path, monkeypatch):
    path = _copy(checkpoint_factory("mixtral"), tmp_path / "m")
    ckpt = Checkpoint(path)
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)  # end of file
    with pytest.raises(CheckpointError, match="short read of tensor 'model.embed_tokens.weight'"):
        ckpt.read("model.embed_tokens.weight", (128, 64))


def test_fp8_blocks_dequantise_with_partial_last_blocks():
    """DeepSeek's 128x128 blocks do not have to divide the matrix (kv_a_proj_with_mqa is 576 rows)."""
    from cluster.quant import dequantize_fp8
    from tests.published_checkpoints import dequantize_fp8_blockwise, quantize_fp8

    w = torch.randn(200, 300) * torch.linspace(0.01, 3, 300)
    q, scale = quantize_fp8(w)
    assert scale.shape == (2, 3)
    ours = dequantize_fp8(q, scale, (128, 128), torch.float32)
    torch.testing.assert_close(ours, dequantize_fp8_blockwise(q, scale), rtol=0, atol=0)
    assert (ours - w).abs().max() <= w.abs().max() / 8  # e4m3 keeps 3 mantissa bits
    with pytest.raises(CheckpointError, match=r"does not cover a \[200, 300\] weight"):
        dequantize_fp8(q, scale[:1], (128, 128), torch.float32)


def test_mxfp4_matches_transformers_dequantiser():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from cluster.quant import dequantize_mxfp4
    from tests.published_checkpoints import quantize_mxfp4

    w = torch.randn(3, 40, 64)  # [E, out, in]
    blocks, scales = quantize_mxfp4(w)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    for e in range(3):
        torch.testing.assert_close(dequantize_mxfp4(blocks[e], scales[e], torch.float32), expected[e], rtol=0, atol=0)
