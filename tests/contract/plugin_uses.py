"""What the plugin uses of vLLM: read from its source with ``ast`` where that can tell, listed by hand where not.

Read automatically from :data:`PLUGIN_FILES` (tests excluded):

- every ``from vllm... import name``, wherever it stands (function bodies and
  ``TYPE_CHECKING`` blocks included): :func:`imports`;
- every class that subclasses a vLLM class, with the methods and class
  attributes it defines (overrides): :func:`subclasses`;
- every call of an imported vLLM function or class, with its positional count
  and keywords: :func:`calls`.

Listed by hand, because ``ast`` cannot tell the type of ``vllm_config.cache_config``
or of a value passed in by vLLM: the attributes the plugin reads or writes
(:data:`ATTRIBUTES`: config fields, enum members, metadata fields, methods it
calls on vLLM objects), the vLLM methods it replaces (:data:`PATCHED`) and the
calls it makes through a stored reference (:data:`CALLS`). Names that exist
only in some releases, which the plugin reaches through ``getattr`` or a
fallback, say from which release on they exist (:data:`SINCE`).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "headinfer_vllm"
PLUGIN_FILES = (
    *sorted((PACKAGE / "vllm_plugin").glob("*.py")),
    PACKAGE / "offline_check.py",
    PACKAGE / "core" / "kernels.py",  # vLLM's FlashAttention, imported on CUDA only
)


@dataclasses.dataclass(frozen=True)
class Use:
    """``module.name`` of vLLM, used at ``where`` (``file.py:line``)."""

    module: str
    name: str
    where: str

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Subclass:
    """A plugin class ``name`` deriving from vLLM's ``base``, with what it defines itself."""

    name: str
    base: Use
    methods: tuple[ast.FunctionDef, ...]
    attributes: tuple[str, ...]
    """Class attributes it assigns (overriding vLLM's)."""


@dataclasses.dataclass(frozen=True)
class Call:
    """A call of vLLM's ``target`` with ``num_positional`` positional arguments and ``keywords``."""

    target: Use
    num_positional: int
    keywords: tuple[str, ...]
    unpacks: bool
    """It also passes ``*args`` or ``**kwargs``."""


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported_names(path: Path) -> dict[str, Use]:
    """Local name -> the vLLM name it was imported as, for every ``from vllm... import`` in ``path``."""
    names = {}
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
            for alias in node.names:
                names[alias.asname or alias.name] = Use(node.module, alias.name, where(path, node))
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "vllm" for a in node.names):
            raise AssertionError(f"{where(path, node)}: `import vllm...` is not read by the contract test; "
                                 "use `from vllm... import name`")
    return names


def imports(files=PLUGIN_FILES) -> list[Use]:
    return [use for path in files for use in imported_names(path).values()]


def subclasses(files=PLUGIN_FILES) -> list[Subclass]:
    found = []
    for path in files:
        names = imported_names(path)
        for node in ast.walk(parsed(path)):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                base = base.value if isinstance(base, ast.Subscript) else base
                if isinstance(base, ast.Name) and base.id in names:
                    methods = tuple(n for n in node.body if isinstance(n, ast.FunctionDef))
                    attributes = tuple(
                        target.id
                        for statement in node.body if isinstance(statement, ast.Assign | ast.AnnAssign)
                        for target in (statement.targets if isinstance(statement, ast.Assign) else [statement.target])
                        if isinstance(target, ast.Name)
                    )
                    found.append(Subclass(node.name, names[base.id], methods, attributes))
    return found


def calls(files=PLUGIN_FILES) -> list[Call]:
    found = []
    for path in files:
        names = imported_names(path)
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                use = dataclasses.replace(names[node.func.id], where=where(path, node))
                positional = [a for a in node.args if not isinstance(a, ast.Starred)]
                keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
                unpacks = len(positional) < len(node.args) or len(keywords) < len(node.keywords)
                found.append(Call(use, len(positional), keywords, unpacks))
    return found


def nested_function(path: Path, outer: str, inner: str) -> ast.FunctionDef:
    """The function ``inner`` defined inside ``outer`` in ``path`` (a replacement the plugin installs)."""
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.FunctionDef) and node.name == outer:
            for child in ast.walk(node):
                if isinstance(child, ast.FunctionDef) and child.name == inner:
                    return child
    raise AssertionError(f"{path.name}: no function {inner} inside {outer}")


# --- Listed by hand ------------------------------------------------------------------------------------------

ATTRIBUTES: dict[tuple[str, str], tuple[str, ...]] = {
    # (module, class): attributes the plugin reads or sets on instances of that class.
    ("vllm.config", "VllmConfig"): (
        "attention_config", "cache_config", "model_config", "parallel_config", "scheduler_config",
        "compilation_config", "speculative_config", "kv_transfer_config", "additional_config",
    ),
    ("vllm.config", "AttentionConfig"): ("backend",),  # compat.patch_platform: is headinfer selected?
    ("vllm.config", "CacheConfig"): (
        # settings.apply_settings, defaults.set_long_context_defaults, refusals.refusals; runtime._build
        "block_size", "user_specified_block_size", "num_gpu_blocks_override", "kv_cache_memory_bytes",
        "num_gpu_blocks", "cache_dtype", "kv_offloading_size", "gpu_memory_utilization",
        # compat.gpu_memory_utilization / compat.extensible_kv_cache_requested (0.34 on)
        "resolved_gpu_memory_utilization", "enable_extensible_kv_cache",
    ),
    ("vllm.config", "ModelConfig"): (
        # settings: the capacity plan, refusals, describe_parallel
        "get_total_num_hidden_layers", "get_num_kv_heads", "get_total_num_kv_heads", "get_head_size", "dtype",
        "max_model_len", "get_sliding_window", "hf_text_config", "is_encoder_decoder", "use_mla",
        "attention_chunk_size", "is_attention_free", "is_hybrid", "has_inner_state", "model",
    ),
    ("vllm.config", "ParallelConfig"): (
        # settings: ranks, stages, hosts; refusals
        "tensor_parallel_size", "pipeline_parallel_size", "rank", "distributed_executor_backend",
        "data_parallel_backend", "local_world_size", "node_rank_within_dp", "data_parallel_size_local",
        "decode_context_parallel_size", "prefill_context_parallel_size", "enable_dbo", "ubatch_size", "numa_bind",
    ),
    ("vllm.config", "SchedulerConfig"): ("disable_hybrid_kv_cache_manager", "max_num_seqs"),
    ("vllm.config", "SpeculativeConfig"): ("method",),
    ("vllm.config", "KVTransferConfig"): ("kv_connector",),
    ("vllm.config", "CompilationConfig"): (
        "cudagraph_mode", "mode", "splitting_ops_contain_attention", "static_forward_context",
    ),
    # Enum members (defaults.choose_piecewise_graphs; compat.register_backend; backend.supports_attn_type)
    ("vllm.config.compilation", "CUDAGraphMode"): ("FULL", "PIECEWISE", "NONE"),
    ("vllm.config.compilation", "CompilationMode"): ("VLLM_COMPILE",),
    ("vllm.v1.attention.backend", "AttentionType"): ("DECODER",),
    ("vllm.v1.attention.backends.registry", "AttentionBackendEnum"): ("CUSTOM", "get_path"),
    # backend.HeadInferMetadataBuilder.build: the step's metadata
    ("vllm.v1.attention.backend", "CommonAttentionMetadata"): (
        "num_reqs", "num_actual_tokens", "query_start_loc_cpu", "seq_lens_cpu_upper_bound", "seq_lens",
        "block_table_tensor", "slot_mapping",
    ),
    # backend.customize_spec (dataclasses.replace) and the builder
    ("vllm.v1.kv_cache_interface", "AttentionSpec"): ("num_head_slots", "state_content_bytes", "dtype", "block_size"),
    # compat._selected_backend / _patch_prefill_chunk_default
    ("vllm.engine.arg_utils", "EngineArgs"): ("attention_backend", "attention_config", "max_num_batched_tokens"),
    # compat.patch_platform and settings: what the current platform is
    ("vllm.platforms.interface", "Platform"): ("is_cpu", "is_cuda"),
    # runtime: the layers of the forward context (the plugin's own impl, set by vLLM's Attention)
    ("vllm.model_executor.layers.attention.attention", "Attention"): ("impl", "layer_name"),
    # offline_check.run: what a finished request reports
    ("vllm.outputs", "RequestOutput"): (
        "outputs", "metrics", "prompt_token_ids", "prompt_logprobs", "num_cached_tokens",
    ),
    ("vllm.outputs", "CompletionOutput"): ("token_ids", "logprobs"),
    ("vllm.entrypoints.llm", "LLM"): ("generate", "get_metrics"),
}

SINCE: dict[tuple[str, str], str] = {
    # Names the plugin reaches through getattr or a fallback, and the first release that has them.
    ("CacheConfig", "resolved_gpu_memory_utilization"): "0.34.0",  # gpu_memory_utilization may be None
    ("CacheConfig", "enable_extensible_kv_cache"): "0.34.0",
    ("AttentionBackend", "supports_head_size_v"): "0.34.0",  # overridden by HeadInferBackend
}

CALLS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    # (module, function, keywords, site): calls through a stored reference, which ast cannot follow.
    ("vllm.vllm_flash_attn", "flash_attn_varlen_func", (
        "q", "k", "v", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale", "causal",
        "block_table", "out", "fa_version", "window_size", "softcap", "s_aux",
    ), "core/kernels.py FlashKernel.attend"),
)

PATCHED: tuple[tuple[str, str, str, str, str], ...] = (
    # (module, class, method, replacement: "outer.inner" in compat.py, how vLLM defines it). The replacement
    # takes vLLM's calls and forwards them to the original, so the signatures must match both ways.
    ("vllm.platforms.interface", "Platform", "check_and_update_config", "patch_platform.check_and_update_config",
     "classmethod"),
    ("vllm.platforms.cpu", "CpuPlatform", "get_attn_backend_cls", "_patch_cpu_backend_choice.get_attn_backend_cls",
     "classmethod"),
    ("vllm.engine.arg_utils", "EngineArgs", "_set_default_max_num_seqs_and_batched_tokens_args",
     "_patch_prefill_chunk_default.set_defaults", "method"),
)

SELECTOR_INTO_VALIDATION = (("vllm.v1.attention.selector", "AttentionSelectorConfig"),
                            ("vllm.v1.attention.backend", "AttentionBackend", "validate_configuration"))
"""compat._patch_cpu_backend_choice passes every field of vLLM's AttentionSelectorConfig by name into
AttentionBackend.validate_configuration (through HeadInferBackend's): each field must be a parameter."""
