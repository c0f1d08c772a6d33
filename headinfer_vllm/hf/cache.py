"""HeadInferCache: a transformers ``Cache`` whose KV lives in the core's head page store.

The store is the only copy of the KV. Per layer, the model calls
``past_key_values.update(key, value, layer_idx)`` and then the attention
function. ``update()`` *stages* the new tokens' K/V ``[B, Hkv, L, D]`` and
returns them unchanged; the ``"headinfer"`` attention function
(:mod:`headinfer_vllm.hf.attention`) takes them back with :meth:`HeadInferCache.attend`,
which writes them into their pages through :class:`StreamedAttention` and
attends over the whole sequence (each layer with its own sliding window,
soft-cap and sinks: :class:`LayerAttention`, from the config). Layer 0's
``update()`` begins a step (builds the :class:`StepPlan`); every layer must
then run, in order, through both.

Batch rows are equal-length sequences (no padding). Row ``r`` owns block ids
``[r * P, (r + 1) * P)`` with ``P = num_blocks // batch_size``; its token
``t`` lives in block ``r * P + t // block_size`` at offset ``t % block_size``.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headinfer_vllm.config import ENV_PREFIX, HeadInferConfig
from headinfer_vllm.core import HeadPageStore, LayerAttention, StreamedAttention, build_step_plan, plan_capacity
from headinfer_vllm.core.host_memory import check_host_budget
from headinfer_vllm.hf.support import ATTN_IMPLEMENTATION, attention_geometry

logger = logging.getLogger("headinfer_vllm")

_active = threading.local()
"""``_active.cache``: weak reference to the cache whose ``update()`` ran last in this thread."""


class CapacityError(ValueError):
    """A sequence would outgrow the tokens its batch row can hold."""


def active_cache() -> HeadInferCache | None:
    """The cache that staged K/V last in this thread, if it is still alive."""
    reference = getattr(_active, "cache", None)
    return reference() if reference is not None else None


def _unsupported(operation: str) -> NotImplementedError:
    return NotImplementedError(
        f"headinfer: HeadInferCache does not support {operation} (beam search, assisted decoding and "
        f"batch reshaping need a cache that copies sequences); use greedy or sampling decoding"
    )


class HeadInferLayer(CacheLayerMixin):
    """One model layer's view of a :class:`HeadInferCache`: how many tokens it holds."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: HeadInferCache, layer_idx: int) -> None:
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.seq_len = 0
        """Tokens of each batch row stored in this layer (written or staged)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self._cache.allocate(key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage the new K/V ``[B, Hkv, L, D]``; returns them unchanged (no second copy)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._cache.stage(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Older transformers releases pass the query's cache positions instead of its length.
        length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.seq_len + length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return self._cache.max_tokens_per_row

    def reset(self) -> None:
        self.seq_len = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _unsupported("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise _unsupported("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _unsupported("batch_select_indices")


class HeadInferCache(Cache):
    """A transformers cache that offloads the KV per head group (HeadInfer); attention stays exact.

    Use with a model loaded with ``attn_implementation="headinfer"`` (after
    ``import headinfer_vllm.hf``)::

        cache = HeadInferCache(model.config, cpu_kv_cache_gib=64)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

    ``generate`` prefills a prompt in one forward pass; to bound activations
    for long prompts use :func:`headinfer_vllm.hf.generate`, or
    :meth:`prefill` before ``model.generate``.

    Args:
        config: the model's config (``model.config``), of a family in
            :data:`~headinfer_vllm.hf.support.SUPPORTED_MODEL_TYPES`; it gives
            each layer's sliding window, soft-cap and sinks, and the scale.
        cpu_kv_cache_gib, gpu_kv_cache_gib, device_tier, head_group_size, prefetch_depth:
            as in :class:`headinfer_vllm.config.HeadInferConfig`.
        host_memory_check: ``strict`` or ``warn``, as in
            :class:`~headinfer_vllm.config.HeadInferConfig`; ``None`` reads
            ``HEADINFER_HOST_MEMORY_CHECK``, else ``strict``.
        block_size: tokens per page.
        prefill_chunk_size: tokens per forward pass in :meth:`prefill`.
        dtype: KV dtype; defaults to ``config.dtype``.
        device: where the device tier lives; defaults to the device of the
            first K/V. Giving it allocates both tiers now instead of at the
            first forward pass.
    """

    def __init__(
        self,
        config,
        *,
        cpu_kv_cache_gib: float = HeadInferConfig.cpu_kv_cache_gib,
        gpu_kv_cache_gib: float | None = HeadInferConfig.gpu_kv_cache_gib,
        device_tier: str = HeadInferConfig.device_tier,
        head_group_size: int | None = HeadInferConfig.head_group_size,
        prefetch_depth: int = HeadInferConfig.prefetch_depth,
        host_memory_check: str | None = None,
        block_size: int = 256,
        prefill_chunk_size: int = 8192,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if prefill_chunk_size < 1:
            raise ValueError(f"headinfer: prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.geometry = attention_geometry(config)
        self.settings = HeadInferConfig(
            cpu_kv_cache_gib=cpu_kv_cache_gib,
            gpu_kv_cache_gib=gpu_kv_cache_gib,
            device_tier=device_tier,
            head_group_size=head_group_size,
            prefetch_depth=prefetch_depth,
            host_memory_check=host_memory_check or _environment_host_memory_check(),
        )
        self.plan = plan_capacity(
            num_layers=self.geometry.num_layers,
            num_kv_heads=self.geometry.num_kv_heads,
            head_dim=self.geometry.head_dim,
            block_size=block_size,
            dtype=dtype or _config_dtype(config),
            host_bytes=self.settings.cpu_kv_cache_bytes,
            device_bytes=self.settings.gpu_kv_cache_bytes,
            head_group_size=self.settings.head_group_size,
            prefetch_depth=self.settings.prefetch_depth,
            page_cache=self.settings.device_tier == "pages",
        )
        super().__init__(layers=[HeadInferLayer(self, index) for index in range(self.geometry.num_layers)])
        self.model_config = config
        self.prefill_chunk_size = prefill_chunk_size
        self.store: HeadPageStore | None = None
        self.attention: StreamedAttention | None = None
        self._sinks: torch.Tensor | None = None
        """shape: [num_layers, num_query_heads], the KV dtype: each layer's sinks, copied from its
        module at every call (the core reads them by reference); None without sinks."""
        self._batch_size: int | None = None
        self._next_layer = 0
        """Layer whose ``update()`` comes next; 0 between steps."""
        self._staged: tuple[int, torch.Tensor, torch.Tensor] | None = None
        """(layer, key, value) of the layer between its ``update()`` and its attention."""
        self._warned_unchunked = False
        if device is not None:
            self.allocate(torch.device(device))

    @property
    def max_tokens_per_row(self) -> int:
        """Tokens one batch row can hold (the whole capacity before the batch size is known)."""
        layout = self.plan.layout
        return layout.num_blocks // (self._batch_size or 1) * layout.block_size

    def allocate(self, device: torch.device) -> None:
        """Allocate the host and device tiers on ``device`` (once)."""
        if self.store is not None:
            if device.type != self.store.device.type:
                raise ValueError(f"headinfer: the cache lives on {self.store.device}, the model runs on {device}")
            return
        check_host_budget(self.plan.host_bytes, self.settings.host_memory_check)
        self.store = HeadPageStore.from_plan(self.plan, device)
        geometry = self.geometry
        if geometry.sinks:
            shape = (geometry.num_layers, geometry.num_query_heads)
            self._sinks = torch.zeros(shape, dtype=self.plan.layout.dtype, device=device)
        layers = [
            LayerAttention(
                sliding_window=window,
                logits_soft_cap=geometry.soft_cap,
                sinks=None if self._sinks is None else self._sinks[layer],
            )
            for layer, window in enumerate(geometry.windows)
        ]
        self.attention = StreamedAttention(
            self.store,
            num_query_heads=geometry.num_query_heads,
            scale=geometry.scale,
            prefetch_depth=self.settings.prefetch_depth,
            layers=layers,
        )
        logger.info("headinfer: %s", self.plan.describe())

    def stage(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold one layer's new K/V ``[B, Hkv, L, D]`` for its attention; begins a step at layer 0."""
        if self._staged is not None:
            raise RuntimeError(
                f"headinfer: the attention of layer {self._staged[0]} did not run through "
                f"attn_implementation={ATTN_IMPLEMENTATION!r}, so its tokens were never stored"
            )
        if layer == 0:
            self._begin_step(key)
        elif layer != self._next_layer:
            raise RuntimeError(
                f"headinfer: layer {layer} ran where layer {self._next_layer} was expected; "
                f"every layer must run once per forward pass, in order"
            )
        self._staged = (layer, key, value)
        _active.cache = weakref.ref(self)
        self.layers[layer].seq_len += key.shape[2]
        self._next_layer = (layer + 1) % self.geometry.num_layers
        return key, value

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None = None,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store the staged K/V of ``layer`` and attend; the core of the ``"headinfer"`` attention.

        Args:
            query: ``[B, Hq, L, D]``.
            key, value: ``[B, Hkv, L, D]``, the tensors ``update()`` returned.
            scaling: the model's softmax scale; None means ``D ** -0.5``.
            sliding_window, softcap: as transformers passes them to the attention function.
            sinks: ``[Hq]``, the ``s_aux`` transformers passes (gpt-oss), or None.

        The variant arguments must agree with the config the cache was built
        from (:meth:`AttentionGeometry.check_call`); the sinks are copied into
        the core's at every call, so weights loaded later count.

        Returns the attention output ``[B, L, Hq, D]``.
        """
        staged = self._staged
        if staged is None or staged[0] != layer or staged[1] is not key or staged[2] is not value:
            raise RuntimeError(
                f"headinfer: the attention of layer {layer} got K/V that this HeadInferCache did not "
                f"stage; run the model with past_key_values=HeadInferCache(model.config)"
            )
        self._staged = None
        assert self.attention is not None
        self.geometry.check_call(layer, scaling, sliding_window, softcap, sinks)
        if sinks is not None:
            self._load_sinks(layer, sinks)
        batch, num_query_heads, length, head_dim = query.shape
        tokens = batch * length
        # [B, H, L, D] -> token-major [B * L, H, D]: token r * L + i is row r's i-th new token.
        q = query.transpose(1, 2).reshape(tokens, num_query_heads, head_dim)
        k = key.transpose(1, 2).reshape(tokens, key.shape[1], head_dim)
        v = value.transpose(1, 2).reshape(tokens, value.shape[1], head_dim)
        out = torch.empty_like(q)
        self.attention.forward(layer, q, k, v, out)
        return out.view(batch, length, num_query_heads, head_dim)

    def _load_sinks(self, layer: int, sinks: torch.Tensor) -> None:
        """Copy a module's sinks ``[Hq]`` into the core's; refuses a copy that would round them."""
        assert self._sinks is not None
        target = self._sinks[layer]
        if sinks.shape != target.shape or torch.promote_types(sinks.dtype, target.dtype) != target.dtype:
            raise ValueError(
                f"headinfer: the sinks of layer {layer} are {tuple(sinks.shape)} {sinks.dtype}, the cache holds "
                f"{tuple(target.shape)} {target.dtype} (the KV dtype); load the model in one dtype"
            )
        target.copy_(sinks.detach())

    def check_idle(self) -> None:
        """Raise unless the last step ran every layer's update and attention."""
        if self._staged is not None or self._next_layer != 0:
            stopped = self._staged[0] if self._staged is not None else self._next_layer - 1
            raise RuntimeError(
                f"headinfer: the last forward pass stopped at layer {stopped} of "
                f"{self.geometry.num_layers}; every layer must run through attn_implementation="
                f"{ATTN_IMPLEMENTATION!r} once per forward pass"
            )

    @torch.no_grad()
    def prefill(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` ``[B, L]`` (``L >= 1``) through ``model`` in chunks of ``prefill_chunk_size``.

        Returns the logits ``[B, 1, vocab]`` of the last token. A following
        ``model.generate(all_ids, past_key_values=cache)`` continues after the
        tokens already in the cache.
        """
        if input_ids.shape[1] < 1:
            raise ValueError("headinfer: prefill needs at least one token")
        for chunk in input_ids.split(self.prefill_chunk_size, dim=1):
            outputs = model(input_ids=chunk, past_key_values=self, use_cache=True, logits_to_keep=1)
        self.check_idle()
        return outputs.logits

    def reset(self) -> None:
        """Forget every sequence (pages are overwritten, not cleared); keeps the allocation.

        Also recovers a cache whose last forward pass was aborted between layers.
        """
        self._staged = None
        self._next_layer = 0
        super().reset()
        self._batch_size = None

    def _begin_step(self, key: torch.Tensor) -> None:
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"headinfer: HeadInferCache needs the model loaded with attn_implementation="
                f"{ATTN_IMPLEMENTATION!r} (after `import headinfer_vllm.hf`), but it uses {implementation!r}"
            )
        self.check_idle()
        assert self.store is not None
        layout = self.plan.layout
        if key.dtype != layout.dtype:
            raise ValueError(
                f"headinfer: the model's K/V are {key.dtype} but the cache was planned for {layout.dtype}; "
                f"pass dtype={key.dtype} to HeadInferCache"
            )
        batch, _, length, _ = key.shape
        if self._batch_size is None:
            if batch > layout.num_blocks:
                raise CapacityError(f"headinfer: a batch of {batch} rows needs at least {batch} blocks")
            self._batch_size = batch
        elif batch != self._batch_size:
            raise ValueError(f"headinfer: the cache holds {self._batch_size} rows, this step has {batch}")
        past = self.layers[0].seq_len
        seq_len = past + length
        if seq_len > self.max_tokens_per_row:
            raise CapacityError(
                f"headinfer: a sequence of {seq_len} tokens exceeds the {self.max_tokens_per_row} tokens "
                f"each of the {batch} rows can hold; raise cpu_kv_cache_gib"
            )
        if length > self.prefill_chunk_size and not self._warned_unchunked:
            self._warned_unchunked = True
            logger.warning(
                "headinfer: %d tokens in one forward pass; prefill long prompts with "
                "headinfer_vllm.hf.generate or HeadInferCache.prefill to bound activations",
                length,
            )
        pages_per_row = layout.num_blocks // batch
        rows = torch.arange(batch)
        first_block = rows * pages_per_row
        # slot = block * block_size + offset = row's first slot + token position
        positions = torch.arange(past, seq_len)
        slots = (first_block[:, None] * layout.block_size + positions[None, :]).flatten()
        num_pages = -(-seq_len // layout.block_size)
        plan = build_step_plan(
            query_start_loc=torch.arange(batch + 1) * length,
            seq_lens=torch.full((batch,), seq_len),
            block_table=first_block[:, None] + torch.arange(num_pages)[None, :],
            slot_mapping=slots,
            block_size=layout.block_size,
            device=self.store.device,
        )
        assert self.attention is not None
        self.attention.begin_step(plan)


def _config_dtype(config) -> torch.dtype:
    """The model's dtype from its config (``config.dtype``), else torch's default dtype."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()


def _environment_host_memory_check() -> str:
    """``HEADINFER_HOST_MEMORY_CHECK`` (the vLLM plugin's variable too), else ``strict``."""
    return (os.environ.get(ENV_PREFIX + "HOST_MEMORY_CHECK") or HeadInferConfig.host_memory_check).strip().lower()
