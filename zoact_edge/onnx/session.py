"""ONNX Runtime sessions: the one place that opens one, for the loss graph and for an exported model.

No training code here: an exported model runs with this, numpy and a tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--backend ort needs ONNX Runtime: pip install 'zoact-edge[onnx]' "
                        "(or 'zoact-edge[gpu]' for CUDA)") from None
    return onnxruntime



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
