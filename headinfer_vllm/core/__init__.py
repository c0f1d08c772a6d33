"""The HeadInfer core: head-paged KV store, transfer scheduler, streamed attention.

Imports torch only, never vLLM, so it runs and is tested on CPU and CUDA alike.
"""

from headinfer_vllm.core.engine import StreamedAttention
from headinfer_vllm.core.layout import CapacityPlan, KVLayout, plan_capacity, plan_residency
from headinfer_vllm.core.page_store import HeadPageStore
from headinfer_vllm.core.plan import StepPlan, build_step_plan
from headinfer_vllm.core.residency import ResidencyPolicy, SpreadAcrossLayers
from headinfer_vllm.core.variants import LayerAttention

__all__ = [
    "CapacityPlan",
    "HeadPageStore",
    "KVLayout",
    "LayerAttention",
    "ResidencyPolicy",
    "SpreadAcrossLayers",
    "StepPlan",
    "StreamedAttention",
    "build_step_plan",
    "plan_capacity",
    "plan_residency",
]
