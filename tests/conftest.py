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
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

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


# --------------------------------------------------------------------------- tune --backend ort (test_ort_*.py)
# Exporting loss graphs is the slow part: the runs and graphs are made once per session and shared.

ORT_FAST = ["--steps", "5", "--batch-size", "4", "--calib-samples", "8", "--rank", "4", "--eval-samples", "16",
            "--max-length", "24", "--lr", "1e-2", "--eps", "1e-2", "--device", "cpu", "--eval-batch-size", "8"]


@pytest.fixture(scope="session")
def ort_runs(model_dirs, tmp_path_factory):
    """``tune`` with each backend, same options and seed (exports the loss graph once)."""
    from zoact_edge.cli import main

    runs = {}
    with pytest.MonkeyPatch.context() as mp:  # the session's temp cache (conftest's is per test)
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        for name, backend, bits in (("torch", "torch", "32"), ("ort", "ort", "32"), ("ort4", "ort", "4")):
            out = tmp_path_factory.mktemp(f"run-{name}")
            assert main(["tune", "--model", str(model_dirs["llama"]), "--output", str(out), "--backend", backend,
                         "--bits", bits, "--overwrite", *ORT_FAST]) == 0
            runs[name] = out
    return runs


@pytest.fixture(scope="session")
def llama_cls(ort_runs, model_dirs, tokenizer, tmp_path_factory):
    """The ORT run's model and adapters rebuilt from its checkpoint, with its (cached) loss graph."""
    from helpers import rt_examples, rt_task

    from zoact_edge.adapters import targets as tgt
    from zoact_edge.adapters.build import inject_adapters
    from zoact_edge.adapters.files import load_checkpoint
    from zoact_edge.onnx import loss_graph, ort_engine

    task = rt_task(tokenizer, max_length=24)
    model = make_model("llama", len(tokenizer))
    _, P, B, _ = load_checkpoint(ort_runs["ort"])
    found = [t for t in tgt.find_targets(model) if t.name in P]
    layers = inject_adapters(model, found, P, None, torch.float32, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        mp.setattr(loss_graph, "export_loss_graph", _no_export)  # same model, targets, bases: cached
        ort_loss = ort_engine.build_ort_loss(model, task, layers, task.collate(rt_examples(2)),
                                               str(model_dirs["llama"]), torch.device("cpu"), 32)
    return task, model, layers, ort_loss


@pytest.fixture(scope="session")
def llama_int4(llama_cls, model_dirs, tmp_path_factory):
    """The int4 loss graph of the same adapters (quantized and cached by the ``--bits 4`` run)."""
    from helpers import rt_examples

    from zoact_edge.onnx import loss_graph, ort_engine

    task, model, layers, _ = llama_cls
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOACT_CACHE", str(tmp_path_factory.getbasetemp() / "zoact-cache"))
        mp.setattr(loss_graph, "export_loss_graph", _no_export)
        mp.setattr(loss_graph, "quantize_loss_graph", _no_export)
        return ort_engine.build_ort_loss(model, task, layers, task.collate(rt_examples(2)),
                                           str(model_dirs["llama"]), torch.device("cpu"), 4)


def _no_export(*a, **k):
    raise AssertionError("exported (or quantized) again although the graph is cached")
