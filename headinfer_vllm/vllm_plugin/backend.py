"""The vLLM attention backend: a thin adapter over the core engine.

- :class:`HeadInferMetadataBuilder` plans once per step: it turns vLLM's
  ``CommonAttentionMetadata`` into a :class:`StepPlan` (pages to load and
  write back, new-token slots, attention metadata).
- :class:`HeadInferImpl` runs per layer: stream, attend, write back, via the
  worker's :class:`HeadInferRuntime`.

The KV lives in the plugin's page store, not in vLLM's KV tensor, which
:meth:`HeadInferBackend.customize_spec` shrinks to one element per token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from headinfer_vllm.core import LayerAttention, StepPlan, build_step_plan
from headinfer_vllm.vllm_plugin.compat import attention_type_name, frees_pages_out_of_window
from headinfer_vllm.vllm_plugin.refusals import ALTERNATIVE
from headinfer_vllm.vllm_plugin.runtime import HeadInferRuntime


class HeadInferBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]
    forward_includes_kv_cache_update = True
    """``forward`` stores the new tokens itself, into the page store."""

    @staticmethod
    def get_name() -> str:
        # The CUSTOM slot: a new enum member cannot be unpickled by spawned
        # processes (see compat.register_backend).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[HeadInferImpl]:
        return HeadInferImpl

    @staticmethod
    def get_builder_cls() -> type[HeadInferMetadataBuilder]:
        return HeadInferMetadataBuilder

    @classmethod
    def customize_spec(cls, spec):
        """One head slot of one element per token: vLLM's own KV tensor stays tiny.

        vLLM still allocates ``num_blocks * block_size * itemsize`` bytes per
        layer, a ``2 * num_kv_heads * head_dim``-th of the real KV.

        Sliding-window layers keep their spec: vLLM's hybrid KV-cache manager
        then gives them KV-cache groups of their own (the runtime plans each),
        unless it is disabled, when vLLM declares them full attention.
        """
        return dataclasses.replace(spec, num_head_slots=1, state_content_bytes=spec.dtype.itemsize)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_head_size_v(cls, head_size: int, head_size_v: int) -> bool:
        """Only ``head_size_v == head_size``: a page holds K and V rows of one head size.

        vLLM 0.34 asks this of the selected backend for models whose V head
        size differs (MiMo-V2); headinfer refuses such models before that
        (``refusals.refusals``). Older releases never call it.
        """
        return head_size_v == head_size

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        """No: a connector would move vLLM's placeholder KV tensor, not the page store."""
        return False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        """No: the step plan is built from the host query lengths."""
        return False

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        return [f"{reason} by headinfer" for reason in super().validate_configuration(**kwargs)]


@dataclasses.dataclass(frozen=True, slots=True)
class HeadInferMetadata:
    plan: StepPlan
    runtime: HeadInferRuntime


class HeadInferMetadataBuilder(AttentionMetadataBuilder[HeadInferMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.runtime = HeadInferRuntime.get(vllm_config, device)
        self.group = self.runtime.add_group(layer_names, windows_free_pages=frees_pages_out_of_window(kv_cache_spec))
        """This builder's KV-cache group in the runtime."""
        self.exact_host_lengths = vllm_config.speculative_config is None
        """Whether vLLM's host ``seq_lens_cpu_upper_bound`` is exact: it is, except with speculative
        decoding, where it assumes every draft was accepted."""

    def _host_seq_lens(self, m: CommonAttentionMetadata) -> torch.Tensor:
        """``[>= num_reqs]`` sequence lengths on the host, without waiting for the device when possible."""
        if self.exact_host_lengths and m.seq_lens_cpu_upper_bound is not None:
            return m.seq_lens_cpu_upper_bound
        return m.seq_lens.cpu()  # waits for the device: speculative decoding, or a runner without host lengths

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> HeadInferMetadata:
        m = common_attn_metadata
        num_reqs, num_tokens = m.num_reqs, m.num_actual_tokens
        # The block table and slot mapping stay on the device; only lengths come from the host.
        plan = build_step_plan(
            query_start_loc=m.query_start_loc_cpu[: num_reqs + 1],
            seq_lens=self._host_seq_lens(m)[:num_reqs],
            block_table=m.block_table_tensor[:num_reqs],
            slot_mapping=m.slot_mapping[:num_tokens],
            block_size=self.block_size,
            device=self.device,
        )
        self.runtime.set_plan(self.group, plan)
        return HeadInferMetadata(plan=plan, runtime=self.runtime)


class HeadInferImpl(AttentionImpl[HeadInferMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        sinks = extra_impl_args.pop("sinks", None)
        refused = {
            "ALiBi": alibi_slopes is not None,
            f"attention type {attention_type_name(attn_type)}": attn_type != AttentionType.DECODER,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"kv_cache_dtype={kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        refused.update({f"the option {name!r}": True for name in extra_impl_args})
        reasons = [name for name, hit in refused.items() if hit]
        if reasons:
            raise NotImplementedError(f"headinfer does not support {', '.join(reasons)}; {ALTERNATIVE}")
        self.variant = LayerAttention(
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap or None, sinks=sinks
        )
        """This layer's window, soft-cap and sinks (the sinks tensor by reference: weights load into it later)."""
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: HeadInferMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[T, Hq, D]``, key/value ``[T, Hkv, D]``, output ``[T, Hq, D]`` (in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("headinfer does not support fused output quantization")
        if attn_metadata is None:  # profiling and warm-up runs: defined values, as vLLM's own backends give
            return output.fill_(0)
        attn_metadata.runtime.forward(layer.layer_name, attn_metadata.plan, query, key, value, output)
        return output
