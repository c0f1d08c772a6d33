"""Random batches over a shuffled page table, and a float64 dense reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from headinfer_vllm.core import HeadPageStore, KVLayout, LayerAttention, StreamedAttention, build_step_plan
from headinfer_vllm.core.cpu_split import MIN_SPEEDUP, DecodeSplit
from headinfer_vllm.core.residency import SpreadAcrossLayers


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention in float64, queries at the end of the sequence.

    query: [query_len, num_query_heads, head_dim]; keys, values: [seq_len, num_kv_heads, head_dim].
    Returns [query_len, num_query_heads, head_dim] float64.
    """
    query_len, seq_len = query.shape[0], keys.shape[0]
    repeat = query.shape[1] // keys.shape[1]
    q = query.double().transpose(0, 1)
    k = keys.double().repeat_interleave(repeat, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(repeat, dim=1).transpose(0, 1)
    scores = q @ k.transpose(1, 2) * scale  # [heads, query_len, seq_len]
    positions = torch.arange(seq_len - query_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > positions, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@dataclasses.dataclass
class Scenario:
    """A model-shaped cache with random history, and steps to run on it."""

    num_layers: int = 2
    num_kv_heads: int = 4
    query_per_kv: int = 1
    head_dim: int = 64
    block_size: int = 16
    head_group_size: int = 1
    num_resident_units: int = 0
    prefetch_depth: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    spare_blocks: int = 7
    seed: int = 0
    layers: Sequence[LayerAttention] | None = None
    """Each layer's attention variant; None: plain everywhere."""
    cpu_kernel: bool = False
    """Decode tokens through the C++ CPU kernel (on the CPU)."""
    cpu_groups: dict[int, tuple[int, ...]] | None = None
    split_from_bytes: float | None = None
    """With ``cpu_groups``: split only decode steps that stream at least this many bytes (None: every one)."""
    """Per layer, the streamed groups that the CPU attends in decode-only steps (:class:`DecodeSplit`)."""
    reference: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    """``(layer, query, keys, values, scale)`` -> float64 output, as :func:`dense_attention`; None: it."""
    cache_pages: int = 0
    """Page-cache rows of each streamed unit (:mod:`headinfer_vllm.core.page_cache`); 0: no page cache."""
    kv_groups: int = 1
    """KV-cache groups, as vLLM's hybrid manager makes them: layer ``l`` is in group ``l % kv_groups`` and
    uses slot ``l // kv_groups``; each group has its own block ids, from one pool."""

    def group_of(self, layer: int) -> int:
        return layer % self.kv_groups

    def build(self, seq_lens: list[int]) -> None:
        """Allocate the store with a shuffled block table for ``seq_lens``."""
        generator = torch.Generator().manual_seed(self.seed)
        self.generator = generator
        pages = [-(-n // self.block_size) for n in seq_lens] * self.kv_groups
        num_blocks = sum(pages) + self.spare_blocks
        # Odd requests get consecutive block ids (long runs); even ones get
        # shuffled ids from the rest of the pool.
        consecutive = sum(pages[1::2])
        shuffled = iter((consecutive + torch.randperm(num_blocks - consecutive, generator=generator)).tolist())
        next_consecutive = iter(range(consecutive))
        block_ids = [
            [next(next_consecutive if index % 2 else shuffled) for _ in range(count)]
            for index, count in enumerate(pages)
        ]
        requests = len(seq_lens)
        self.group_block_ids = [block_ids[group * requests : (group + 1) * requests] for group in range(self.kv_groups)]
        """Per KV-cache group, each request's block ids (disjoint across groups)."""
        self.block_ids = self.group_block_ids[0]
        num_slots = -(-self.num_layers // self.kv_groups)
        self.layout = KVLayout(
            num_slots, self.num_kv_heads, self.head_dim, self.block_size,
            num_blocks, self.head_group_size, self.dtype,
        )
        resident = SpreadAcrossLayers().select(num_slots, self.layout.num_groups, self.num_resident_units)
        buffers = self.prefetch_depth + 1
        cache_bytes = self.cache_pages * self.layout.unit_page_bytes * (self.num_layers * self.layout.num_groups
                                                                         - self.num_resident_units * self.kv_groups)
        self.store = HeadPageStore(
            self.layout, resident_units=resident, num_staging_buffers=buffers, device=self.device,
            device_budget_bytes=(self.num_resident_units + buffers) * self.layout.unit_bytes + cache_bytes,
            layer_slots=[layer // self.kv_groups for layer in range(self.num_layers)],
            cache_bytes=cache_bytes,
        )
        self.attention = StreamedAttention(
            self.store, num_query_heads=self.num_kv_heads * self.query_per_kv,
            scale=self.head_dim**-0.5, prefetch_depth=self.prefetch_depth, layers=self.layers,
            cpu_kernel=self.cpu_kernel,
            decode_split=None if self.cpu_groups is None else self._decode_split(),
            layer_groups=[self.group_of(layer) for layer in range(self.num_layers)],
        )
        self.keys = [self._random(self.num_layers, 0, self.num_kv_heads, self.head_dim) for _ in seq_lens]
        self.values = [self._random(self.num_layers, 0, self.num_kv_heads, self.head_dim) for _ in seq_lens]

    def _decode_split(self) -> DecodeSplit:
        split = DecodeSplit(self.cpu_groups, num_threads=2, num_streamed=len(self.store.streamed_units))
        if self.split_from_bytes is None:
            return split
        # Equal rates; the per-layer overhead that puts the threshold at split_from_bytes.
        split = dataclasses.replace(split, h2d_bytes_per_s=1.0, cpu_bytes_per_s=1.0, every_step=False)
        per_byte = max(1 - split.num_cpu_units / split.num_streamed, split.num_cpu_units / split.num_streamed)
        overhead = self.split_from_bytes * (1 - MIN_SPEEDUP * per_byte) / (MIN_SPEEDUP * len(self.cpu_groups))
        return dataclasses.replace(split, layer_overhead_s=overhead)

    def _random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator).to(self.dtype)

    def write_history(self, lengths: list[int]) -> None:
        """Put random K/V for the first ``lengths[r]`` tokens straight into the pages' homes."""
        for request, length in enumerate(lengths):
            keys = self._random(self.num_layers, length, self.num_kv_heads, self.head_dim)
            values = self._random(self.num_layers, length, self.num_kv_heads, self.head_dim)
            self.keys[request], self.values[request] = keys, values
            for position in range(length):
                offset = position % self.block_size
                for layer in range(self.num_layers):
                    block = self.group_block_ids[self.group_of(layer)][request][position // self.block_size]
                    for group in range(self.layout.num_groups):
                        heads = slice(group * self.head_group_size, (group + 1) * self.head_group_size)
                        home = self.store.home(layer, group)
                        home[block, 0, offset] = keys[layer, position, heads].to(home.device)
                        home[block, 1, offset] = values[layer, position, heads].to(home.device)

    def restart(self, request: int) -> None:
        """Forget ``request``'s tokens: its next step prefills it again over the same block ids (as vLLM
        reuses a freed request's blocks), through ``forward``, whatever its pages held."""
        self.keys[request] = self.keys[request][:, :0]
        self.values[request] = self.values[request][:, :0]

    def step(self, query_lens: list[int], padding: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step where request r appends ``query_lens[r]`` tokens.

        Returns (output, reference): [num_layers, num_tokens, num_query_heads, head_dim],
        the output in the cache dtype on CPU, the reference in float64.
        """
        num_query_heads = self.num_kv_heads * self.query_per_kv
        seq_lens = [k.shape[1] + n for k, n in zip(self.keys, query_lens, strict=True)]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        num_tokens = starts[-1]
        plans = []
        for group_ids in self.group_block_ids:
            slots = []
            for request, (n, seq) in enumerate(zip(query_lens, seq_lens, strict=True)):
                for position in range(seq - n, seq):
                    block = group_ids[request][position // self.block_size]
                    slots.append(block * self.block_size + position % self.block_size)
            max_pages = max(len(ids) for ids in group_ids) + 3
            # Unused table entries hold junk block ids that must be ignored.
            table = torch.randint(0, self.layout.num_blocks, (len(query_lens), max_pages), generator=self.generator)
            for request, ids in enumerate(group_ids):
                table[request, : len(ids)] = torch.tensor(ids)
            plans.append(build_step_plan(
                query_start_loc=torch.tensor(starts),
                seq_lens=torch.tensor(seq_lens),
                block_table=table,
                slot_mapping=torch.tensor(slots + [-1] * padding),
                block_size=self.block_size,
                device=self.device,
            ))
        self.plan = plans[0]
        self.attention.begin_step(plans if self.kv_groups > 1 else plans[0])
        outputs, references = [], []
        reference_of = self.reference or (lambda _layer, *args: dense_attention(*args))
        grown_keys = [[] for _ in query_lens]
        grown_values = [[] for _ in query_lens]
        for layer in range(self.num_layers):
            query = self._random(num_tokens + padding, num_query_heads, self.head_dim)
            new_keys = self._random(num_tokens + padding, self.num_kv_heads, self.head_dim)
            new_values = self._random(num_tokens + padding, self.num_kv_heads, self.head_dim)
            out = torch.zeros(num_tokens + padding, num_query_heads, self.head_dim, dtype=self.dtype)
            out = out.to(self.device)
            self.attention.forward(
                layer, query.to(self.device), new_keys.to(self.device), new_values.to(self.device), out
            )
            outputs.append(out.cpu()[:num_tokens])
            reference = []
            for request in range(len(query_lens)):
                rows = slice(starts[request], starts[request + 1])
                grown_keys[request].append(torch.cat([self.keys[request][layer], new_keys[rows]]))
                grown_values[request].append(torch.cat([self.values[request][layer], new_values[rows]]))
                reference.append(
                    reference_of(
                        layer, query[rows], grown_keys[request][layer], grown_values[request][layer],
                        self.attention.scale,
                    )
                )
            references.append(torch.cat(reference))
        self.keys = [torch.stack(k) for k in grown_keys]
        self.values = [torch.stack(v) for v in grown_values]
        if self.device == "cuda":
            torch.cuda.synchronize()
        return torch.stack(outputs), torch.stack(references)

    def assert_every_page_home(self) -> None:
        """What the store holds in the pages' homes is exactly each sequence, in every layer."""
        for request in range(len(self.keys)):
            for layer in range(self.num_layers):
                keys, values = self.stored_tokens(request, layer)
                assert torch.equal(keys, self.keys[request][layer]), (request, layer)
                assert torch.equal(values, self.values[request][layer]), (request, layer)

    def stored_tokens(self, request: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of a request as the store holds them in the pages' homes."""
        block_ids = self.group_block_ids[self.group_of(layer)][request]
        return self.store.read_tokens(layer, block_ids, self.keys[request].shape[1])


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.double() - reference).abs().max() / reference.abs().max()).item()
