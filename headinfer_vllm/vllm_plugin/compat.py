"""Glue that depends on vLLM's version (written for 0.32.x and 0.33.x).

Every workaround says why it exists and when it can go. Nothing here runs
unless headinfer is installed as a vLLM plugin; nothing changes for users who
do not select ``--attention-backend headinfer``.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("headinfer_vllm")

BACKEND_PATH = "headinfer_vllm.vllm_plugin.backend.HeadInferBackend"
ALIAS = "HEADINFER"


class _ForwardToVllm(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def share_vllm_logging() -> None:
    """Print headinfer's log lines through vLLM's logger, in vLLM's format.

    The core logs to ``headinfer_vllm`` without importing vLLM. vLLM may set
    up its handlers after plugins load, so records are forwarded at emit time.
    """
    ours = logging.getLogger("headinfer_vllm")
    if not any(isinstance(handler, _ForwardToVllm) for handler in ours.handlers):
        ours.addHandler(_ForwardToVllm())
        ours.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        ours.propagate = False


def register_backend() -> None:
    """Register the backend in the CUSTOM slot, reachable by the name ``headinfer``.

    Why CUSTOM: ``register_backend("HEADINFER", ...)`` adds an enum member in
    the registering process only; vLLM spawns its engine-core process and
    unpickles the config there *before* plugins load, so the new member fails
    to unpickle ("... is not a valid AttentionBackendEnum"). CUSTOM exists in
    every process. The alias makes ``AttentionBackendEnum["HEADINFER"]`` (what
    ``--attention-backend headinfer`` looks up) return CUSTOM, which pickles
    as CUSTOM. Can go when vLLM loads plugins before unpickling its config.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    custom = AttentionBackendEnum.CUSTOM
    if is_selected(custom):
        return
    vllm_register(custom, BACKEND_PATH)
    AttentionBackendEnum._member_map_.setdefault(ALIAS, custom)


def is_selected(backend) -> bool:
    """Whether ``backend`` (an AttentionBackendEnum or None) is headinfer."""
    if backend is None or backend.name != "CUSTOM":
        return False
    try:
        return backend.get_path() == BACKEND_PATH
    except ValueError:  # CUSTOM not registered yet
        return False


def patch_platform() -> None:
    """Route the selection on the CPU platform, and apply settings on every platform."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls.check_and_update_config, "_headinfer", False):
        return
    original_check = platform_cls.check_and_update_config.__func__

    # Why: the KV capacity must be decided where the config is built (the
    # scheduler's block count is fixed before workers start), and platforms
    # offer no other hook that sees the whole VllmConfig.
    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        if is_selected(vllm_config.attention_config.backend):
            from headinfer_vllm.vllm_plugin.settings import apply_settings

            apply_settings(vllm_config)

    check_and_update_config._headinfer = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        _patch_cpu_backend_choice(platform_cls)
    _patch_prefill_chunk_default()


def _patch_prefill_chunk_default() -> None:
    """Chunked-prefill steps of at least LONG_CONTEXT_PREFILL_TOKENS on CUDA, unless the user chose.

    Why here: ``EngineArgs`` fills ``max_num_batched_tokens`` with its default
    before the ``VllmConfig`` exists, so the platform hook can no longer tell
    a default from the user's choice. Can go when vLLM records that choice
    (as ``CacheConfig.user_specified_block_size`` does for the block size).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs._set_default_max_num_seqs_and_batched_tokens_args
    if getattr(original, "_headinfer", False):
        return

    def set_defaults(self, *args, **kwargs):
        user_chose = self.max_num_batched_tokens is not None
        original(self, *args, **kwargs)
        from headinfer_vllm.vllm_plugin import settings

        if user_chose or not is_selected(_selected_backend(self)) or not settings.long_context_defaults_apply():
            return

        if self.max_num_batched_tokens < settings.LONG_CONTEXT_PREFILL_TOKENS:
            logger.info(
                "headinfer: max_num_batched_tokens %d -> %d (long-context default: each prefill chunk "
                "re-streams the whole past KV; set --max-num-batched-tokens to choose)",
                self.max_num_batched_tokens, settings.LONG_CONTEXT_PREFILL_TOKENS,
            )
            self.max_num_batched_tokens = settings.LONG_CONTEXT_PREFILL_TOKENS

    set_defaults._headinfer = True
    EngineArgs._set_default_max_num_seqs_and_batched_tokens_args = set_defaults


def _selected_backend(engine_args):
    """The attention backend an ``EngineArgs`` selects, as an AttentionBackendEnum or None."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = engine_args.attention_backend
    if backend is None:
        config = engine_args.attention_config
        backend = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    if isinstance(backend, str):
        backend = AttentionBackendEnum.__members__.get(backend.upper())
    return backend


def flash_attn_version(vllm_config, head_size: int) -> int | None:
    """vLLM's own FlashAttention version choice for this head size (None off CUDA).

    It honours ``--attention-config '{"flash_attn_version": N}'`` and prefers
    FA3 on Hopper and FA4 on Blackwell.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    with set_current_vllm_config(vllm_config):
        return get_flash_attn_version(head_size=head_size, head_size_v=head_size)


def _patch_cpu_backend_choice(platform_cls) -> None:
    """Honour ``--attention-backend headinfer`` on vLLM's CPU platform.

    Why: ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN whatever was
    selected (logging "Cannot use X backend on CPU") and, unlike the CUDA
    platform, never calls ``validate_configuration``. Other selections still
    go to the original. Can go when the CPU platform honours out-of-tree
    backends.
    """
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not is_selected(selected_backend):
            return original(cls, selected_backend, attn_selector_config, num_heads)
        from headinfer_vllm.vllm_plugin.backend import HeadInferBackend
        from headinfer_vllm.vllm_plugin.settings import ALTERNATIVE

        reasons = HeadInferBackend.validate_configuration(
            device_capability=None, **attn_selector_config._asdict()
        )
        if reasons:
            raise ValueError(f"headinfer cannot run this model: {'; '.join(reasons)}; {ALTERNATIVE}")
        return BACKEND_PATH

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def attention_layers(vllm_config, layer_names: list[str]) -> dict:
    """The ``Attention`` modules of ``layer_names`` (they hold ``.impl``)."""
    context = vllm_config.compilation_config.static_forward_context
    return {name: context[name] for name in layer_names}


def layer_index(layer_name: str) -> int:
    """The model's layer number in a module name like ``model.layers.3.self_attn.attn``."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def headinfer_layer_names(vllm_config) -> list[str]:
    """This worker's attention layers that headinfer runs, in layer order."""
    from headinfer_vllm.vllm_plugin.backend import HeadInferImpl

    context = vllm_config.compilation_config.static_forward_context
    names = [name for name, module in context.items() if isinstance(getattr(module, "impl", None), HeadInferImpl)]
    return sorted(names, key=layer_index)


def frees_pages_out_of_window(kv_cache_spec) -> bool:
    """Whether vLLM frees the pages of a KV-cache group with this spec as they leave the window."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    return isinstance(kv_cache_spec, SlidingWindowSpec)
