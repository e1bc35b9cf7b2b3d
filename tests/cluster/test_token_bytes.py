"""A token's own bytes (TextTokenizer.token_bytes), for OpenAI's logprobs `bytes`: a token that holds
part of a UTF-8 character decodes to U+FFFD, but its bytes must join with its neighbours' into the text."""
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE

from cluster.tokenizer import TextTokenizer
from tests.helpers import DEMO

TEXT = "héllo wörld 😀 — 日本語 ok"


def test_byte_level_tokens_join_into_the_text():
    tok = TextTokenizer.from_checkpoint(DEMO)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are parts of a character
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()
    assert tok.token_bytes(0) == b"<|endoftext|>"  # a special token: its text
    for i in range(tok.tok.get_vocab_size()):  # every whole-character token: its decoded text's bytes
        text = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:
            assert tok.token_bytes(i) == text.encode(), i


def test_sentencepiece_byte_fallback_tokens_are_their_byte(tmp_path):
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "▁h": 3, "i": 4}
    raw = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_checkpoint(tmp_path)
    assert [tok.token_bytes(i) for i in (1, 2, 4)] == [b"\xc3", b"\xa9", b"i"]
    assert (tok.token_bytes(1) + tok.token_bytes(2)).decode() == "é"
