"""A token's own bytes (TextTokenizer.token_bytes), for OpenAI's logprobs `bytes`: a token that holds
part of a UTF-8 character decodes to U+FFFD, but its bytes must join with its neighbours' into the text."""
from tokenizers import Tokenizer, decoders, pre_tokenizers
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


def test_a_sentencepiece_words_space_is_its_own(tmp_path):
    """Mixtral's decoder strips the text's first space: alone, '▁yo' decoded to 'yo', so its logprob
    `bytes` (and `token`) lost the space, and a client joining them wrote "hiyo" for "hi yo"."""
    vocab = {"<unk>": 0, "▁h": 1, "i": 2, "▁yo": 3, "▁": 4, "a": 5, "▁a": 6}
    raw = Tokenizer(BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # as Mixtral-8x7B's tokenizer.json has it
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_checkpoint(tmp_path)
    assert tok._anchor == (6, "a")  # '▁a', as a real vocabulary writes "a"
    ids = [1, 2, 3]
    assert tok.decode(ids) == "hi yo"
    assert [tok.token_bytes(i) for i in ids] == [b" h", b"i", b" yo"]
    assert [tok.token_text(i) for i in ids] == [" h", "i", " yo"]


def test_a_vocabulary_that_cannot_write_the_anchor_reads_tokens_alone(tmp_path):
    """No "a" (no unk token, no byte fallback): finding the anchor raised IndexError on every logprob."""
    raw = Tokenizer(BPE(vocab={"▁h": 0, "i": 1}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_checkpoint(tmp_path)
    assert tok._anchor is None and [tok.token_text(i) for i in (0, 1)] == ["h", "i"]
