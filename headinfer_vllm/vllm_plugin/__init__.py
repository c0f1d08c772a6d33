"""The vLLM adapter: entry point, backend, worker runtime and version glue.

``register`` is the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (API server,
engine core, workers). It must be idempotent, and an exception here stops
vLLM's start-up, so it only registers and patches; all checks happen when
headinfer is actually selected.
"""

import logging

logger = logging.getLogger("headinfer_vllm")


def register() -> None:
    from headinfer_vllm.vllm_plugin import compat

    compat.share_vllm_logging()
    compat.warn_if_untested_vllm()
    compat.register_backend()
    compat.patch_platform()
    logger.debug("headinfer: backend registered (select it with --attention-backend headinfer)")
