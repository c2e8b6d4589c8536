"""Tiny random-weight Llama / GPT-2 / OPT models with a word-level tokenizer, built offline.

Nothing here touches a hub. The tokenizer's vocabulary comes from the embedded Rotten Tomatoes
data so the default task's template and label words ("great", "terrible") are real tokens.
"""

from __future__ import annotations

import collections
import os
import re

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
# Larger than the usual 0.02 so that a random tiny model's outputs react visibly to adapters.
INIT = 0.1


def _vocab(n_words: int = 600) -> list[str]:
    from zoact_edge.data.datasets import load_rotten_tomatoes

    counts = collections.Counter()
    for ex in load_rotten_tomatoes().train[:3000]:
        counts.update(re.findall(r"\w+|[^\w\s]", ex.text.lower()))
    words = [w for w, _ in counts.most_common(n_words)]
    for w in ("review", "sentiment", "it", "was", "great", "terrible", "answer", "good", "bad", "text", ":"):
        if w not in words:
            words.append(w)
    return SPECIALS + words


def make_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM)

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
                          initializer_range=INIT)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=INIT)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3, init_std=INIT)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of saved tiny models, each with the tokenizer."""
    out = {}
    for arch in ("llama", "gpt2", "opt"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        make_model(arch, len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Quantized copies of tiny models go to a per-session temp cache, never the user's cache.
    monkeypatch.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation, and on a busy machine a lot of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
