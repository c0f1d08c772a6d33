"""headinfer_vllm: exact head-wise KV offloading (HeadInfer) for vLLM and transformers."""

__version__ = "0.1.0"
