"""ONNX Runtime backend for the ZO forward pairs: ``zoact-edge tune --backend ort``.

The edge story of ZO-Act is that an inference engine is enough to fine-tune: the frozen model
never changes, so it is exported once as an ONNX *loss graph* and every ZO step only changes the
small coefficient matrices. The graph therefore takes each adapter's B as a graph **input**,
keeps the bases P (and the frozen weights) as constants, and returns the task loss (plus the
candidate-label logits for classification, which evaluation needs; a token task's vocabulary-wide
logits are not worth returning), with dynamic batch and sequence axes.

The torch side keeps doing everything that is not a forward: the optimizer, the seeds and the
directions. The perturbed coefficients fed to ORT are computed with exactly the expression the
torch layer uses, ``B + scale * layer.direction(seed)``, from the layer's own noise state, so the
ORT backend sees bit-identical B +/- eps Z and follows the torch backend's trajectory.

Exporting takes seconds to minutes, so graphs are cached (``$ZOACT_CACHE/onnx``) under a key of
the model, the task's loss, the target layers, the rank and a hash of the bases.

``--bits 4`` quantizes the cached fp32 graph's frozen MatMuls to ORT's int4 ``MatMulNBits``
(cached beside it, under the same key plus the bits); the ``x @ P`` and coefficient MatMuls stay
float, so the adapter path is exactly the fp32 one. On CUDA the session runs on the
``CUDAExecutionProvider`` with IO binding (:class:`BoundOrtLoss`).

Evaluation on this backend also runs the graph (:meth:`OrtLoss.evaluate`): with ``--bits 4`` the
model that is tuned is the int4 graph, and that is the model whose accuracy a run reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..adapters.layer import ZOActLinear
from ..paths import atomic_dir, cache_dir
from ..data.tasks import Batch, ClassificationTask, hidden_states, output_rows

log = logging.getLogger(__name__)

GRAPH_VERSION = 1  # bump when the graph's inputs, outputs or loss change
OPSET = 18
BATCH_INPUTS = ("input_ids", "attention_mask", "position_ids", "target")
INT4_BLOCK = 32  # MatMulNBits block size along the input dimension (symmetric int4 per block)
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--backend ort needs ONNX Runtime: pip install 'zoact-edge[onnx]' "
                        "(or 'zoact-edge[gpu]' for CUDA)") from None
    return onnxruntime


# --------------------------------------------------------------------------- the loss graph


def token_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over target tokens as a mask-weighted sum (no data-dependent shapes).

    ``tasks._TokenLossTask.loss`` selects target positions by boolean indexing, whose output size
    depends on the data and does not export; weighting every position by the mask computes the
    same loss with static shapes.
    """
    hidden = hidden_states(model, batch)[:, :-1]
    logits = model.get_output_embeddings()(hidden).float()
    targets = batch.input_ids[:, 1:]
    weight = batch.target_mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * weight).sum() / weight.sum().clamp(min=1.0)


class _Loss(nn.Module):
    """The task loss as a module of the model (so ``functional_call`` can swap the B's in)."""

    def __init__(self, model, task):
        super().__init__()
        self.model = model
        self.classification = isinstance(task, ClassificationTask)
        if self.classification:  # on the model's device, so a CUDA model traces without a device mix
            device = next(model.parameters()).device
            self.register_buffer("candidates", task.candidate_ids.clone().to(device), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, target):
        if self.classification:
            batch = Batch(input_ids, attention_mask, position_ids, labels=target)
            last = hidden_states(self.model, batch)[:, -1].float()  # left padding: the prompt ends at -1
            weight, bias = output_rows(self.model, self.candidates)
            logits = last @ weight.float().T
            if bias is not None:
                logits = logits + bias.float()
            return F.cross_entropy(logits, target), logits
        batch = Batch(input_ids, attention_mask, position_ids, target_mask=target)
        return (token_loss(self.model, batch),)


class LossGraph(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, target, *Bs)``: the B's are inputs."""

    def __init__(self, model, task, layers: list[ZOActLinear]):
        super().__init__()
        self.inner = _Loss(model, task)
        by_id = {id(p): n for n, p in self.inner.named_parameters(remove_duplicate=False)}
        self.b_names = [by_id[id(l.B)] for l in layers]
        # Every name a basis P is reachable under: the exporter names a shared P's initializer
        # after one of its aliases (q/k/v and gate/up share one P).
        bases = {id(l.P) for l in layers}
        self.p_names = {n for n, b in self.named_buffers(remove_duplicate=False) if id(b) in bases}

    def forward(self, input_ids, attention_mask, position_ids, target, *Bs):
        return torch.func.functional_call(self.inner, dict(zip(self.b_names, Bs)),
                                          (input_ids, attention_mask, position_ids, target), strict=False)


def output_names(task) -> list[str]:
    return ["loss", "logits"] if isinstance(task, ClassificationTask) else ["loss"]


def batch_arrays(batch: Batch) -> dict[str, np.ndarray]:
    target = batch.labels if batch.labels is not None else batch.target_mask
    tensors = (batch.input_ids, batch.attention_mask, batch.position_ids, target)
    return {n: t.detach().cpu().numpy() for n, t in zip(BATCH_INPUTS, tensors)}


def export_loss_graph(model, task, layers: list[ZOActLinear], example: Batch, path: Path) -> None:
    """Export the loss graph to ``path`` (with its weights in ``path.data`` beside it)."""
    graph = LossGraph(model, task, layers).eval()
    target = example.labels if example.labels is not None else example.target_mask
    args = (example.input_ids, example.attention_mask, example.position_ids, target,
            *[l.B.detach() for l in layers])
    bs = {0: "batch", 1: "seq"}
    dynamic = {"input_ids": bs, "attention_mask": bs, "position_ids": bs,
               "target": {0: "batch"} if example.labels is not None else bs,
               "Bs": tuple({} for _ in layers)}
    # Each layer's noise must be off while tracing: the perturbation is applied to the inputs.
    saved = [(l.noise_seed, l.noise_scale) for l in layers]
    for l in layers:
        l.set_noise(None, 0.0)
    try:
        with torch.no_grad():
            torch.onnx.export(graph, args, str(path), dynamo=True, external_data=True, opset_version=OPSET, verbose=False,
                              input_names=[*BATCH_INPUTS, *[f"B{i}" for i in range(len(layers))]],
                              output_names=output_names(task), dynamic_shapes=dynamic)
    finally:
        for l, (seed, scale) in zip(layers, saved):
            l.set_noise(seed, scale)


def _model_identity(model_id: str) -> list:
    cfg = Path(model_id) / "config.json"
    if cfg.is_file():
        st = cfg.stat()
        return [str(cfg.resolve()), st.st_size, st.st_mtime_ns]
    return [model_id]


def graph_key(model_id: str, task, layer_names: list[str], layers: list[ZOActLinear]) -> str:
    """Cache key: model, loss, targets, rank and the bases' bytes (P is baked into the graph)."""
    h = hashlib.sha256()
    loss_id = (["classification", task.candidate_ids.tolist()] if isinstance(task, ClassificationTask)
               else ["token"])
    meta = [GRAPH_VERSION, torch.__version__, _model_identity(model_id), loss_id, layer_names,
            [list(l.B.shape) for l in layers], str(layers[0].P.dtype)]
    h.update(json.dumps(meta).encode())
    seen = set()
    for l in layers:
        if l.P.data_ptr() in seen:
            continue
        seen.add(l.P.data_ptr())
        h.update(l.P.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cached_loss_graph(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str,
                      bits: int = 32) -> Path:
    """Path of the loss graph for these adapters, exporting (and quantizing) it once if not cached.

    The int4 graph is derived from the fp32 one, so both are cached side by side under one key:
    ``loss-<key>/`` (fp32) and ``loss-<key>-int4-b<block>/``.
    """
    order = list(layers.values())
    key = graph_key(model_id, task, list(layers), order)
    folder = cache_dir() / "onnx" / f"loss-{key}"
    path = folder / "loss.onnx"
    if not path.is_file():
        log.info("exporting the loss graph to ONNX (once; cached in %s)", folder)
        with atomic_dir(folder) as tmp:
            export_loss_graph(model, task, order, example, tmp / "loss.onnx")
    if bits == 32:
        return path
    q_folder = folder.with_name(f"{folder.name}-int{bits}-b{INT4_BLOCK}")
    q_path = q_folder / "loss.onnx"
    if not q_path.is_file():
        log.info("quantizing the loss graph's frozen MatMuls to int%d (once; cached in %s)", bits, q_folder)
        p_names = LossGraph(model, task, order).p_names
        with atomic_dir(q_folder) as tmp:
            quantize_loss_graph(path, tmp / "loss.onnx", p_names, len({id(l.P) for l in order}))
    return q_path


# --------------------------------------------------------------------------- int4


def basis_matmuls(graph, p_names: set[str]) -> list:
    """The ``x @ P`` MatMul nodes: those whose weight is a basis initializer."""
    return [n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in p_names]


def quantize_loss_graph(src: Path, dst: Path, p_names: set[str], n_bases: int, block_size: int = INT4_BLOCK) -> None:
    """Write ``src`` with every frozen-weight MatMul as an int4 ``MatMulNBits`` to ``dst``.

    The MatMuls whose weight is a graph input (the coefficients) are not constant, so the
    quantizer leaves them alone; the ``x @ P`` MatMuls are excluded by name. If the bases cannot
    all be found (the exporter named them differently), quantizing would silently round P too, so
    that is an error rather than a guess.
    """
    import onnx

    from .forms import matmul_nbits_quantizer

    MatMulNBitsQuantizer = matmul_nbits_quantizer()
    model = onnx.load(str(src))
    found = {i.name for i in model.graph.initializer} & p_names
    keep = basis_matmuls(model.graph, p_names)
    if len(found) != n_bases or {n.input[1] for n in keep} != found or not all(n.name for n in keep):
        raise RuntimeError(f"{src}: found {len(found)} of the {n_bases} bases P as named MatMul weights; "
                           "refusing to quantize a graph whose x @ P MatMuls cannot be told apart")
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                             nodes_to_exclude=[n.name for n in keep])
    q.process()
    out = q.model.model
    kept = basis_matmuls(out.graph, p_names)
    if len(kept) != len(keep) or not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise RuntimeError(f"int4 quantization of {src} did not keep the x @ P MatMuls float")
    q.model.save_model_to_file(str(dst), use_external_data_format=True)


# --------------------------------------------------------------------------- the session


def cpu_threads() -> int:
    """Threads for ORT: the ones torch uses (which already respect OMP_NUM_THREADS / cores)."""
    return max(1, torch.get_num_threads())


def _provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def make_session(path: Path, providers=(CPU_EP,), threads: int | None = None):
    """An InferenceSession on ``providers[0]``; an error if ORT silently fell back to another one."""
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # torch shares this process: spinning ORT threads would steal its cores between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=list(providers))
    wanted, got = _provider_name(providers[0]), sess.get_providers()[0]
    if got != wanted:
        hint = (" (its CUDA or cuDNN libraries did not load: install onnxruntime-gpu for your CUDA major version, "
                "without the CPU onnxruntime package beside it)") if wanted == CUDA_EP else ""
        raise UserError(f"ONNX Runtime fell back to {got} instead of {wanted}{hint}")
    return sess


def cuda_providers(device: torch.device) -> list:
    """The CUDA execution provider on ``device``'s GPU, or a clear error if this ORT has none."""
    ort = require_onnxruntime()
    if CUDA_EP not in ort.get_available_providers():
        raise UserError("--backend ort on CUDA needs onnxruntime-gpu: pip uninstall -y onnxruntime && "
                        "pip install 'zoact-edge[gpu]' (or use --device cpu)")
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from torch's nvidia wheels; no-op if already loaded
        try:
            ort.preload_dlls()
        except OSError as e:  # the session check below reports a fallback clearly
            log.debug("onnxruntime.preload_dlls failed: %s", e)
    # TF32 as torch has it (off by default for fp32 matmuls): the same precision as the torch backend
    options = {"device_id": str(cuda_index(device)), "use_tf32": "1" if torch.backends.cuda.matmul.allow_tf32 else "0"}
    return [(CUDA_EP, options), CPU_EP]


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def perturbed(layer: ZOActLinear) -> torch.Tensor:
    """The coefficients the torch layer would use now: ``B + scale * Z`` with the same Z."""
    _check_ungrouped(layer)
    coeff = layer.B.detach()
    if layer.noise_seed is not None and layer.noise_scale != 0.0:
        coeff = coeff + layer.noise_scale * layer.direction(layer.noise_seed)
    return coeff


def perturb_into(layer: ZOActLinear, out: torch.Tensor) -> None:
    """``out <- B + scale * Z``, in place and bit-identical to :func:`perturbed`."""
    _check_ungrouped(layer)
    if layer.noise_seed is None or layer.noise_scale == 0.0:
        out.copy_(layer.B.detach())
        return
    torch.mul(layer.direction(layer.noise_seed), layer.noise_scale, out=out)
    out.add_(layer.B.detach())  # fl(s*Z) + B == B + fl(s*Z): the torch layer's value exactly


def _check_ungrouped(layer: ZOActLinear) -> None:
    if layer.noise_groups is not None:
        raise RuntimeError("the ORT loss graph takes one set of coefficients per run, not fused +/- groups")


class OrtLoss:
    """Evaluates the task loss of the adapted model in ONNX Runtime (CPU execution provider)."""

    def __init__(self, session, layers: list[ZOActLinear], path: Path | None = None):
        self.session = session
        self.layers = layers
        self.path = path  # the graph file (for reports and tests)
        self.names = [o.name for o in session.get_outputs()]

    def run(self, batch: Batch, coefficients: list[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            coeffs = coefficients if coefficients is not None else [perturbed(l) for l in self.layers]
        feeds = batch_arrays(batch)
        for i, c in enumerate(coeffs):
            feeds[f"B{i}"] = np.ascontiguousarray(c.detach().cpu().float().numpy())
        return dict(zip(self.names, self.session.run(None, feeds)))

    def loss(self, batch: Batch) -> float:
        return float(self.run(batch)["loss"])

    def evaluate(self, task, examples: list, batch_size: int = 32, desc: str = "eval") -> dict:
        """The metrics of :func:`zoact_edge.evaluate.evaluate`, computed by this graph.

        Same length-sorted batches; classification from the graph's candidate logits, token tasks
        from its mean NLL times the batch's target-token count.
        """
        from tqdm.auto import tqdm

        from ..data.evaluate import _length_sorted

        classification = isinstance(task, ClassificationTask)
        correct, loss_sum, n, nll, tokens = 0, 0.0, 0, 0.0, 0
        bar = tqdm(_length_sorted(task, examples, batch_size), total=-(-len(examples) // batch_size),
                   desc=desc, leave=False, unit="batch")
        for chunk in bar:
            batch = task.collate(chunk)
            out = self.run(batch)
            if classification:
                logits = torch.from_numpy(out["logits"]).float()
                loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
                correct += int((logits.argmax(-1) == batch.labels).sum())
                n += len(chunk)
            else:
                count = int(batch.target_mask[:, 1:].sum())
                nll += float(out["loss"]) * count
                tokens += count
        if classification:
            return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": n}
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(examples)}


NUMPY_OF = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
TORCH_OF = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(bool)": torch.bool}


class BoundOrtLoss(OrtLoss):
    """The loss with IO binding: per run nothing is copied but the batch and the scalar loss.

    This is the CUDA path (``build_ort_loss`` uses it for ``--device cuda``); it works the same on
    the CPU provider, which is how its binding logic is tested on machines without a GPU.
    Each coefficient input is a buffer on the device, bound once by pointer; a run writes
    ``B +/- eps Z`` into it in place (torch, on the device) and ORT reads it where it is. Batch
    inputs are bound per run; outputs are allocated by ORT on the device, anew each run because
    their shapes follow the batch. torch and ORT use different CUDA streams, so torch's work is
    synchronized before ORT reads, and ORT's outputs before they are read.
    """

    def __init__(self, session, layers: list[ZOActLinear], device: torch.device, path: Path | None = None):
        super().__init__(session, layers, path)
        self.device = torch.device("cuda", cuda_index(device)) if device.type == "cuda" else torch.device("cpu")
        self.device_id = self.device.index or 0
        self.types = {i.name: i.type for i in session.get_inputs()}
        self.binding = session.io_binding()
        self.coeffs = [torch.zeros(l.B.shape, dtype=torch.float32, device=self.device) for l in layers]
        for i, buf in enumerate(self.coeffs):
            self._bind(f"B{i}", buf)

    def _bind(self, name: str, t: torch.Tensor) -> None:
        self.binding.bind_input(name, self.device.type, self.device_id, NUMPY_OF[self.types[name]],
                                list(t.shape), t.data_ptr())

    def run(self, batch: Batch, coefficients: list[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for i, (layer, buf) in enumerate(zip(self.layers, self.coeffs)):
                if coefficients is None:
                    perturb_into(layer, buf)
                else:
                    buf.copy_(coefficients[i])
        target = batch.labels if batch.labels is not None else batch.target_mask
        held = []  # the bound batch tensors must outlive the run
        for name, t in zip(BATCH_INPUTS, (batch.input_ids, batch.attention_mask, batch.position_ids, target)):
            t = t.to(device=self.device, dtype=TORCH_OF[self.types[name]]).contiguous()
            held.append(t)
            self._bind(name, t)
        self.binding.clear_binding_outputs()
        for name in self.names:
            self.binding.bind_output(name, self.device.type, self.device_id)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # coefficients and batch are written before ORT reads them
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        outs = self.binding.copy_outputs_to_cpu()
        del held
        return dict(zip(self.names, outs))


def build_ort_loss(model, task, layers: dict[str, ZOActLinear], example: Batch, model_id: str,
                   device: torch.device, bits: int) -> OrtLoss:
    """The ORT loss for ``tune --backend ort`` (exported or taken from the cache).

    ``model`` is the fp32 model (the graph is exported from it; ``--bits 4`` quantizes the graph,
    not the torch model). Everything that can be refused is checked before exporting.
    """
    require_onnxruntime()
    if bits not in (32, 4):
        raise UserError("--backend ort runs the frozen model in fp32 or, with --bits 4, as int4 MatMulNBits; "
                        "use --bits 32 or 4 (or --backend torch)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--backend ort runs on the CPU or CUDA execution provider, not {device.type}; "
                        "use --device cpu or cuda")
    if next(iter(layers.values())).P.dtype != torch.float32:  # B is fp32 always; P has the adapter dtype
        raise UserError("--backend ort needs fp32 adapters; use --adapter-dtype fp32")
    providers = cuda_providers(device) if device.type == "cuda" else [CPU_EP]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = cached_loss_graph(model, task, layers, example.to(device), model_id, bits)
    session = make_session(path, providers)
    if device.type == "cuda":
        return BoundOrtLoss(session, list(layers.values()), device, path)
    return OrtLoss(session, list(layers.values()), path)
