"""Glue that depends on vLLM's version (written for 0.32.x and 0.33.x).

Every workaround says why it exists and when it can go. Nothing here runs
unless headinfer is installed as a vLLM plugin; nothing changes for users who
do not select ``--attention-backend headinfer``.
"""

from __future__ import annotations

import logging
import os

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
            from headinfer_vllm.vllm_plugin.runtime import apply_settings

            apply_settings(vllm_config)

    check_and_update_config._headinfer = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        _patch_cpu_backend_choice(platform_cls)


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
        from headinfer_vllm.vllm_plugin.backend import ALTERNATIVE, HeadInferBackend

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
