"""The one-shot basis against numpy's SVD of the same (masked) activations."""

import numpy as np
import pytest
import torch
from conftest import make_model
from helpers import forward, rt_examples, rt_task

from zoact_edge.adapters import targets as tgt
from zoact_edge.adapters.basis import BasisConfig, compute_bases, detect_groups


def _collect(model, names, batches):
    """Independent reference: store every layer's real-token inputs and stack them."""
    store = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            store[n].append(args[0])
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    masks = []
    for b in batches:
        forward(model, b)
        masks.append(b.attention_mask.bool())
    for h in handles:
        h.remove()
    out = {}
    for n in names:
        # OPT flattens (batch, seq) before its MLP; row-major flattening keeps the mask aligned
        rows = [x.reshape(-1, x.shape[-1])[m.reshape(-1)] for x, m in zip(store[n], masks)]
        out[n] = torch.cat(rows).double().numpy()
    return out


def _projector(P):
    P = np.asarray(P, dtype=np.float64)
    return P @ P.T


def _bases(model, batches, rank, method, passes=3):
    found = tgt.find_targets(model)
    mods = {t.name: model.get_submodule(t.name) for t in found}
    return compute_bases(mods, {t.name: t.d_in for t in found}, batches, lambda b: forward(model, b),
                         BasisConfig(rank=rank, method=method, passes=passes, oversample=16))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_gram_basis_matches_numpy_svd(tokenizer, arch):
    model = make_model(arch, len(tokenizer))
    task = rt_task(tokenizer)
    batches = [task.collate(rt_examples(12)), task.collate(rt_examples(12, offset=12))]
    P = _bases(model, batches, rank=6, method="gram")
    X = _collect(model, list(P), batches)
    for name, Pn in P.items():
        assert Pn.shape == (X[name].shape[1], 6)
        np.testing.assert_allclose(Pn.T @ Pn, np.eye(6), atol=1e-5)
        _, _, Vt = np.linalg.svd(X[name], full_matrices=False)  # uncentred: no mean removed
        ref = Vt[:6].T
        assert np.abs(_projector(Pn.numpy()) - _projector(ref)).max() < 1e-4, name


def test_sketch_basis_converges_to_numpy_svd(tokenizer):
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    batches = [task.collate(rt_examples(16))]
    P = _bases(model, batches, rank=4, method="sketch", passes=8)
    X = _collect(model, list(P), batches)
    for name, Pn in P.items():
        _, _, Vt = np.linalg.svd(X[name], full_matrices=False)
        err = np.abs(_projector(Pn.numpy()) - _projector(Vt[:4].T)).max()
        assert err < 1e-3, (name, err)


def test_sketch_on_a_decaying_spectrum_matches_exact_with_few_passes():
    """The sketch's own math on a synthetic layer whose inputs have an LLM-like decaying spectrum."""
    d, n, r = 300, 2000, 8
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scales = 10 * 0.85 ** torch.arange(d, dtype=torch.float32) + 1e-2  # geometric decay, then a floor
    X = (torch.randn(n, d, generator=gen) * scales) @ U.T
    lin = torch.nn.Linear(d, 4)
    mask = torch.ones(4, n // 4, dtype=torch.long)

    class B:
        attention_mask = mask

    P = compute_bases({"l": lin}, {"l": d}, [B()], lambda b: lin(X.reshape(4, n // 4, d)),
                      BasisConfig(rank=r, method="sketch", passes=3))["l"]
    _, _, Vt = np.linalg.svd(X.double().numpy(), full_matrices=False)
    assert np.abs(_projector(P.numpy()) - _projector(Vt[:r].T)).max() < 1e-3


def test_sketch_streams_batches_like_one_big_batch():
    """Accumulating the sketch over four batches (some padded) equals one pass over all real tokens."""
    d, r = 96, 4
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(4, 10, d, generator=gen) * (0.8 ** torch.arange(d, dtype=torch.float32))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second and fourth batches
    mask[3, :7] = 0
    lin = torch.nn.Linear(d, 3)

    class Batch:
        def __init__(self, x, m):
            self.x, self.attention_mask = x, m

    cfg = BasisConfig(rank=r, method="sketch", passes=3, oversample=8)
    streamed = compute_bases({"l": lin}, {"l": d}, [Batch(X[i:i + 1], mask[i:i + 1]) for i in range(4)],
                             lambda b: lin(b.x), cfg)["l"]
    real = X[mask.bool()]  # only the real tokens, as one unpadded batch
    whole = compute_bases({"l": lin}, {"l": d}, [Batch(real[None], torch.ones(1, len(real)))],
                          lambda b: lin(b.x), cfg)["l"]
    assert np.abs(_projector(streamed.numpy()) - _projector(whole.numpy())).max() < 1e-4


def test_padding_is_masked_out(tokenizer):
    """One left-padded batch gives the same basis as the same examples unpadded, one by one."""
    model = make_model("llama", len(tokenizer))
    task = rt_task(tokenizer)
    exs = rt_examples(6)
    padded = _bases(model, [task.collate(exs)], rank=4, method="gram")
    single = _bases(model, [task.collate([e]) for e in exs], rank=4, method="gram")
    assert task.collate(exs).attention_mask.min() == 0  # the batch really has padding
    for name in padded:
        diff = np.abs(_projector(padded[name].numpy()) - _projector(single[name].numpy())).max()
        assert diff < 1e-4, (name, diff)


@pytest.mark.parametrize("arch,expected", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("gpt2", [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]]),
    ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
])
def test_layers_reading_the_same_input_share_one_basis(tokenizer, arch, expected):
    model = make_model(arch, len(tokenizer))
    task = rt_task(tokenizer)
    found = tgt.find_targets(model)
    mods = {t.name: model.get_submodule(t.name) for t in found}
    batch = task.collate(rt_examples(4))
    groups = detect_groups(mods, lambda: forward(model, batch))
    leaves = [sorted(n.rsplit(".", 1)[-1] for n in g) for g in groups]
    assert leaves == [sorted(e) for e in expected] * 2  # two blocks
    P = _bases(model, [batch], rank=4, method="gram")
    for g in groups:
        assert all(P[n] is P[g[0]] for n in g)
