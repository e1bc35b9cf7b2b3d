"""Train the bundled demo MoE (models/demo/): a tiny Mixtral on code and prose.

    .venv/bin/python tools/train_demo.py --out models/demo [--minutes 12]

Writes a standard Hugging Face checkpoint (config.json, model.safetensors in
bf16, tokenizer.json built with the tokenizers library) that transformers
loads too, plus train_log.json with the losses. Needs the test extra
(transformers) installed; runs on CPU in fp32, stops by the time budget.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import DOMAINS, documents  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_domain(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def make_model(vocab_size: int, args):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.expert_intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=args.num_experts, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_loss, output_router_logits=True, initializer_range=0.02)
    return MixtralForCausalLM(cfg)


def batch_from(streams: dict[str, torch.Tensor], batch: int, seq: int, rng: random.Random) -> torch.Tensor:
    """Each row is one contiguous window of one domain; domains alternate across rows."""
    rows = []
    for i in range(batch):
        data = streams[DOMAINS[i % len(DOMAINS)]]
        start = rng.randrange(0, len(data) - seq - 1)
        rows.append(data[start:start + seq])
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model, streams: dict[str, torch.Tensor], seq: int) -> dict[str, float]:
    model.eval()
    out = {}
    for domain, data in streams.items():
        n = min(len(data) // seq, 16)
        x = data[: n * seq].view(n, seq)
        out[domain] = round(float(model(input_ids=x, labels=x).loss), 4)
    model.train()
    return out


def train(args) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    train_docs = {d: documents(d, "train") for d in DOMAINS}
    tok = train_tokenizer([t for d in DOMAINS for t in train_docs[d]], args.vocab)
    streams = {d: encode_domain(tok, train_docs[d]) for d in DOMAINS}
    heldout = {d: encode_domain(tok, documents(d, "heldout")) for d in DOMAINS}
    print({d: len(s) for d, s in streams.items()}, "training tokens", file=sys.stderr)
    model = make_model(tok.get_vocab_size(), args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    t0, step, log = time.time(), 0, []
    budget = args.minutes * 60
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_from(streams, args.batch, args.seq, rng)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            log.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": round(float(loss), 4)})
            print(f"step {step} {time.time() - t0:.0f}s loss {float(loss):.3f} lr {lr:.2e}", file=sys.stderr)
    save(model, tok, args, {"steps": step, "train_seconds": round(time.time() - t0, 1), "log": log,
                            "heldout_loss_fp32": evaluate(model, heldout, args.seq)}, heldout)


def save(model, tok: Tokenizer, args, report: dict, heldout) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    report["heldout_loss_bf16_weights"] = evaluate(model.float(), heldout, args.seq)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
        "pad_token": EOS, "model_max_length": 1024}, indent=2))
    report["args"] = vars(args)
    (out / "train_log.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "log"}), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/demo")
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--expert-intermediate", type=int, default=320)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=0.005)
    train(p.parse_args())


if __name__ == "__main__":
    main()
