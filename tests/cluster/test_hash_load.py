"""Hash-routed layers planned from token frequencies alone (cluster/hash_load.py), and the
`moe-cluster record-profile --from-text` surface on DeepSeek-V4-Flash's released config (sizes shrunk)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cluster.eplb import rebalance_experts
from cluster.hash_load import hash_layer_load, profile_loads, token_frequencies
from cluster.profile import load_profile
from deployments.cli import main
from tests.deepseek_v4_checkpoints import tiny_flash

TABLE = np.array([[0, 1], [1, 2], [2, 3], [3, 0]])  # [V=4, K=2]


@pytest.mark.parametrize("frequencies, expected", [
    ([1, 0, 0, 0], [1, 1, 0, 0]),            # one token: its two experts, one row each
    ([0, 2, 0, 0], [0, 2, 2, 0]),            # counts scale
    ([1, 1, 1, 1], [2, 2, 2, 2]),            # every id once: each expert is in two rows of the table
    ([5, 0, 0, 1], [6, 5, 0, 1]),            # expert 0 from tokens 0 and 3
    ([0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_hash_layer_load_counts_the_table_rows_of_each_token(frequencies, expected):
    assert hash_layer_load(TABLE, np.array(frequencies, float), 4).tolist() == expected


def test_hash_layer_load_keeps_experts_no_token_names():
    assert hash_layer_load(TABLE, np.ones(4), 6).tolist() == [2, 2, 2, 2, 0, 0]


@pytest.mark.parametrize("table, frequencies, experts, message", [
    (TABLE, np.ones(3), 4, "do not match"),
    (TABLE, np.array([1, -1, 0, 0.]), 4, "≥ 0"),
    (TABLE, np.array([1, np.nan, 0, 0]), 4, "finite"),
    (TABLE, np.ones(4), 3, "expert 3"),
])
def test_hash_layer_load_refuses_what_does_not_fit(table, frequencies, experts, message):
    with pytest.raises(ValueError, match=message):
        hash_layer_load(table, frequencies, experts)


def test_token_frequencies_count_and_refuse_a_foreign_vocabulary():
    assert token_frequencies([3, 1, 3, 0], 5).tolist() == [1, 1, 0, 2, 0]
    assert token_frequencies([], 2).tolist() == [0, 0]
    with pytest.raises(ValueError, match="token id 5 is outside the model's vocabulary of 5"):
        token_frequencies([1, 5], 5)


def test_profile_loads_hash_layers_exact_the_others_even():
    freq = np.array([1.0, 1.0, 0.0, 2.0])  # 4 tokens, top-2: 8 rows per layer
    loads = profile_loads({0: TABLE, 2: (TABLE + 1) % 4}, freq, [0, 1, 2], num_experts=4, top_k=2)
    assert loads.tolist() == [[3, 2, 1, 2], [2, 2, 2, 2], [2, 3, 2, 1]]
    assert loads.sum(axis=1).tolist() == [8, 8, 8]  # the same rows whichever way they are routed
    with pytest.raises(ValueError, match="no hash-routed layer"):
        profile_loads({}, freq, [0, 1], 4, 2)
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        profile_loads({5: TABLE}, freq, [0, 1], 4, 2)


def _byte_tokenizer(path):
    """A byte-level tokenizer whose id of byte b is b (GPT-2's byte → character map): 256 ids, V4's shrunk vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture
def v4_tables(tmp_path):
    """V4-Flash's config.json (sizes shrunk: 4 MoE layers, the first 3 hash-routed, 16 experts, top-6) and its
    tid2eid tables under the release's names: all `--from-text` reads."""
    cfg = tiny_flash()
    gen = torch.Generator().manual_seed(0)
    tables = {layer: torch.stack([torch.randperm(cfg["n_routed_experts"], generator=gen)[:cfg["num_experts_per_tok"]]
                                  for _ in range(cfg["vocab_size"])]) for layer in range(cfg["num_hash_layers"])}
    save_file({f"layers.{layer}.ffn.gate.tid2eid": t for layer, t in tables.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _byte_tokenizer(tmp_path)
    return tmp_path, cfg, tables


def test_record_profile_from_text_plans_the_hash_layers(v4_tables, tmp_path_factory):
    model, cfg, tables = v4_tables
    out = tmp_path_factory.mktemp("profile")
    text = "def main():\n    return 0\n\nThe license: MIT. café\n" * 3
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    assert main(["record-profile", "--from-text", str(out / "corpus.txt"), "--model", str(model),
                 "--out", str(out / "p.json")]) == 0
    profile = load_profile(out / "p.json")
    ids = list(text.encode("utf-8"))  # the byte tokenizer: token id = byte
    assert profile.layers == (0, 1, 2, 3) and profile.meta["tokens"] == len(ids)
    for layer, table in tables.items():  # each token's fixed experts, one row each
        expected = torch.bincount(table[ids].reshape(-1), minlength=cfg["n_routed_experts"])
        assert profile.loads[layer].tolist() == expected.tolist()
    assert profile.loads[3].tolist() == [len(ids) * 6 / 16] * 16  # the learned gate: no information, even
    assert profile.meta["hash_layers"] == [0, 1, 2] and profile.meta["even_layers"] == [3]
    # mode static plans from it as from a recorded profile: the hash layers' extra copy to their hottest expert
    maps = rebalance_experts(loads=profile.loads, extra_per_layer=1, num_workers=2)
    assert [int(maps.logical_count[layer].argmax()) for layer in range(3)] == \
        [int(profile.loads[layer].argmax()) for layer in range(3)]


@pytest.mark.parametrize("change, args, message", [
    ("none", ["--from-text", "{corpus}"], "needs --model"),
    ("no_tokenizer", ["--from-text", "{corpus}", "--model", "{model}"], "tokenizer"),
    ("no_hash", ["--from-text", "{corpus}", "--model", "{model}"], "no hash-routed layer"),
])
def test_record_profile_from_text_refusals_are_one_clear_line(v4_tables, capsys, change, args, message):
    model, cfg, _ = v4_tables
    corpus = model / "corpus.txt"
    corpus.write_text("hello")
    if change == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    if change == "no_hash":
        (model / "config.json").write_text(json.dumps({**cfg, "num_hash_layers": 0}))
    filled = [a.format(corpus=corpus, model=model) for a in args]
    assert main(["record-profile", *filled, "--out", str(model / "p.json")]) == 2
    assert message in capsys.readouterr().err
