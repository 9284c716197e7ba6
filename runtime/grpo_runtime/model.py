"""The learner's model: base weights (frozen, bf16/fp32 or 4-bit NF4) plus a trainable LoRA adapter.

`resolve_model_source` turns `spec.model.name` into something `from_pretrained` loads without
surprises: a `.gguf` file is dequantized once into a plain safetensors folder (a GGUF-loaded model
is flagged as quantized, cannot `save_pretrained`, and vLLM on CPU cannot read it).
`load_policy` loads that folder with a LoRA adapter on top. `decoder_hidden_states` and `lm_head`
feed the fused loss, which does the vocabulary projection itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo_runtime.device import job_device
from grpo_runtime.messages import first_line
from grpo_runtime.offload import apply_gradient_checkpointing

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
REMOTE_SCHEMES = ("s3://", "gs://", "az://", "abfs://")  # model folders in a bucket, through storage.open_storage
ALLOW_CPU_4BIT_ENV = "GRPO_ALLOW_CPU_4BIT"
CACHE_DIR_ENV = "GRPO_CACHE_DIR"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


HF_TOKEN_ENV = "HF_TOKEN"  # huggingface_hub reads it; the pod gets it from spec.model.tokenSecret


class ModelError(Exception):
    """The model named by the spec cannot be used (missing, unreadable, not a model): exit 2.
    The message never carries the hub token."""

    def __init__(self, message: str):
        token = os.environ.get(HF_TOKEN_ENV)
        super().__init__(message.replace(token, "***") if token and len(token) >= 4 else message)


def hub_access_error(
    exc: BaseException, name: str, *, field: str = "spec.model.name", secret_field: str = "spec.model.tokenSecret"
) -> ModelError | None:
    """A ModelError saying what to do when `exc` (or its cause) is the hub refusing access:
    a gated or private repository without a token, or a token it rejects. None otherwise.
    `field` names the spec field that named the repository (a model or a dataset)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, HfHubHTTPError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    status = getattr(getattr(seen, "response", None), "status_code", None)
    has_token = bool(os.environ.get(HF_TOKEN_ENV))
    where = f"{field}: {name!r}"
    if not has_token and (isinstance(seen, RepositoryNotFoundError) or status in (401, 403)):
        return ModelError(
            f"{where} is gated or private on the Hugging Face hub (or does not exist) and no hub token was given: "
            f"set {secret_field} to a Secret whose key {HF_TOKEN_ENV} holds a token with access "
            f"(without a cluster: export {HF_TOKEN_ENV})"
        )
    if has_token and status == 401:
        return ModelError(
            f"{where}: the hub refused the token from {secret_field} (HTTP 401: invalid or expired); "
            "put a valid read token in the Secret"
        )
    if has_token and (isinstance(seen, GatedRepoError) or status == 403):
        return ModelError(
            f"{where}: the token from {secret_field} has no access to this gated repository (HTTP 403); "
            "accept the licence on its hub page with the token's account, or use a token that has"
        )
    if has_token and isinstance(seen, RepositoryNotFoundError):
        return ModelError(f"{where}: no such repository on the hub, or the account of the token in {secret_field} cannot see it")
    return None


@dataclass
class Policy:
    model: Any  # peft.PeftModel: base frozen, LoRA trainable
    tokenizer: Any  # padding_side left, pad token set
    device: torch.device
    dtype: torch.dtype  # compute dtype of the base weights
    source: str  # the plain HF folder or hub id actually loaded (vLLM loads this too)


# --- where the weights come from ---------------------------------------------------------


def resolve_model_source(name: str, *, endpoint: str | None = None, region: str | None = None) -> str:
    """A directory or hub id `from_pretrained` can load; raises ModelError naming spec.model.name.

    pkg://PACKAGE/FILE finds FILE inside an installed package without importing it;
    s3://, gs:// or az://bucket/prefix (a model folder, or one .gguf object) is downloaded once into the cache;
    *.gguf is dequantized once into a cached safetensors folder (GRPO_CACHE_DIR, default
    ~/.cache/grpo/models); a local directory or a hub id is returned as it is.
    `endpoint` and `region` are those of spec.output (S3-compatible stores).
    """
    if name.startswith(REMOTE_SCHEMES):
        if name.lower().endswith(".gguf"):
            return str(_dequantized_folder(_remote_file(name, endpoint, region), name))
        return str(_remote_folder(name, endpoint, region))
    path = _package_file(name) if name.startswith(PKG_SCHEME) else Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"spec.model.name: GGUF file {str(path)!r} does not exist")
        return str(_dequantized_folder(path, name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"spec.model.name: {name!r} is not a model directory (no config.json)")
        return str(path.resolve())
    if path.exists() or _looks_like_local_path(name):
        raise ModelError(f"spec.model.name: {name!r} is not a model directory (no such directory)")
    return name  # a hub id; from_pretrained reports whether it exists


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", PKG_SCHEME)) or name.count("/") > 1


def _package_file(name: str) -> Path:
    package, _, relative = name.removeprefix(PKG_SCHEME).partition("/")
    if not package or not relative:
        raise ModelError(f"spec.model.name: expected pkg://PACKAGE/FILE, got {name!r}")
    try:
        # find_spec of a top-level name does not import it (the package may not even be importable).
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise ModelError(f"spec.model.name: cannot locate package {package!r} ({exc})") from None
    if spec is None:
        raise ModelError(f"spec.model.name: package {package!r} is not installed ({name})")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        candidate = Path(root) / relative
        if candidate.exists():
            return candidate
    raise ModelError(f"spec.model.name: package {package!r} has no file {relative!r} ({name})")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "grpo" / "models").expanduser()


def _cache_entry(uri: str, endpoint: str | None) -> Path:
    """The cache folder of a remote model: one per (URI, endpoint). Models in a bucket are
    treated as immutable: new weights belong under a new prefix (as hub revisions are)."""
    key = hashlib.sha256(f"{uri.rstrip('/')}|{endpoint or ''}".encode()).hexdigest()[:16]
    stem = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return cache_root() / "remote" / f"{stem}-{key}"


def _fill_once(target: Path, ready: Callable[[Path], bool], fill: Callable[[Path], None]) -> Path:
    """Make `target` once: `fill` a private temp dir beside it, then rename it into place.

    Jobs sharing the cache (a ReadWriteMany claim) may race: each fills its own temp dir and
    the first rename wins; the others see a complete `target` and drop their copy. A reader
    never sees a half-written `target`; a crash leaves only a hidden temp dir.
    """
    if ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not ready(target):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remote_folder(uri: str, endpoint: str | None, region: str | None) -> Path:
    from grpo_runtime.storage import StorageError, open_storage

    def fill(tmp: Path) -> None:
        log.info("downloading %s into the model cache (once)", uri)
        try:
            open_storage(uri, endpoint=endpoint, region=region).download_dir("", tmp)
        except StorageError as exc:
            raise ModelError(f"spec.model.name: {exc}") from None
        if not (tmp / "config.json").is_file():
            raise ModelError(f"spec.model.name: {uri!r} is not a model folder (no config.json under it)")

    return _fill_once(_cache_entry(uri, endpoint), lambda p: (p / "config.json").is_file(), fill)


def _remote_file(uri: str, endpoint: str | None, region: str | None) -> Path:
    """One object (a .gguf file) downloaded once into the cache; its local path."""
    from grpo_runtime.storage import StorageError, open_storage

    folder, _, filename = uri.rstrip("/").rpartition("/")

    def fill(tmp: Path) -> None:
        try:
            open_storage(folder, endpoint=endpoint, region=region).download_file(filename, tmp / filename)
        except StorageError as exc:
            raise ModelError(f"spec.model.name: {exc}") from None

    return _fill_once(_cache_entry(uri, endpoint), lambda p: (p / filename).is_file(), fill) / filename


def _dequantized_folder(gguf: Path, name: str) -> Path:
    """The cached plain-HF folder of a GGUF file, made once (atomically: tmp dir + rename)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf.stem}-{key}"

    def fill(tmp: Path) -> None:
        log.info("dequantizing %s into %s (once)", gguf, target)
        _dequantize_gguf(gguf, tmp, name)

    return _fill_once(target, lambda p: (p / "config.json").is_file(), fill)


def _dequantize_gguf(gguf: Path, out: Path, name: str) -> None:
    """Load a GGUF with transformers and write its weights, config and tokenizer as a plain folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelError(f"spec.model.name: {name!r} is not a readable GGUF model ({first_line(exc)})") from None
    # save_pretrained refuses a GGUF-loaded model; its weights are plain fp32 tensors by now.
    # Tied weights (lm_head = embed_tokens) are stored once, under the first name.
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds dequantized weights
    config.architectures = config.architectures or [type(model).__name__]  # GGUF configs name none; vLLM reads it
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)



# --- the policy ---------------------------------------------------------------------------


def load_policy(
    model_spec,
    lora_spec,
    *,
    device=None,
    seed: int = 0,
    gradient_checkpointing: str = "off",
    endpoint: str | None = None,
    region: str | None = None,
) -> Policy:
    """Base model (frozen) + LoRA (trainable, initialised deterministically from `seed`).
    `endpoint`/`region`: of the S3-compatible store an s3:// model lives in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = torch.device(device) if device is not None else job_device()
    if model_spec.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[model_spec.dtype]

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_spec.trust_remote_code}
    if model_spec.load_in_4bit:
        if device.type != "cuda" and os.environ.get(ALLOW_CPU_4BIT_ENV) != "1":
            raise ModelError(
                "spec.model.loadIn4bit: needs a CUDA GPU (bitsandbytes NF4) and none was found; "
                f"set loadIn4bit: false to train the base in {str(dtype).removeprefix('torch.')}"
            )
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else device.type}

    source = resolve_model_source(model_spec.name, endpoint=endpoint, region=region)
    if model_spec.revision and not Path(source).is_dir():
        kwargs["revision"] = model_spec.revision
    try:
        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=kwargs.get("revision"), trust_remote_code=model_spec.trust_remote_code
        )
    except Exception as exc:
        refused = hub_access_error(exc, model_spec.name)
        if refused is not None:
            raise refused from None
        if isinstance(exc, OSError | ValueError | KeyError):
            raise ModelError(f"spec.model.name: cannot load {model_spec.name!r} ({first_line(exc)})") from None
        raise

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model_spec.chat_template is not None:
        tokenizer.chat_template = model_spec.chat_template
    if model_spec.response_template is not None:
        tokenizer.response_template = model_spec.response_template
    base.config.use_cache = False  # training; the engine turns the cache on for generation
    # QLoRA preparation without peft's prepare_model_for_kbit_training: that upcasts every
    # non-4-bit weight (embeddings, lm_head, norms) to fp32, which costs more than the 4-bit saves.
    for param in base.parameters():
        param.requires_grad_(False)

    targets = lora_spec.target_modules
    config = LoraConfig(
        r=lora_spec.rank,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, config)
        except ValueError as exc:  # e.g. target modules not found
            raise ModelError(f"spec.lora.targetModules: {first_line(exc)}") from None
    apply_gradient_checkpointing(model, gradient_checkpointing)
    model.train()
    return Policy(model=model, tokenizer=tokenizer, device=device, dtype=dtype, source=source)


def base_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states after the final norm, without the lm_head projection.

    Position ids follow the attention mask (as in generate), so a left-padded row sees the
    same positions it was sampled with. LoRA applies unless inside `model.disable_adapter()`.
    """
    decoder = base_model(model).get_decoder()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection: weight [V, D] and bias (None for most LLMs)."""
    head = base_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def save_adapter(model, directory: str | os.PathLike) -> None:
    """The PEFT adapter (adapter_config.json + adapter_model.safetensors); PeftModel.from_pretrained loads it."""
    model.save_pretrained(str(directory))
