"""The checks of the vLLM contract: each returns its problems, every one naming the vLLM version and symbol.

An empty list means the release has every name the plugin uses, in a shape
its calls and overrides fit. See :mod:`tests.contract.plugin_uses` for what
is checked and :mod:`tests.contract.vllm_source` for how a release is read.
"""

from __future__ import annotations

import ast

from packaging.version import Version

from tests.contract import plugin_uses
from tests.contract.plugin_uses import PACKAGE
from tests.contract.vllm_source import Found, Signature, SourceTree, call_problems, method_kind, override_problems


def present_in(tree: SourceTree, owner: str, attribute: str) -> bool | None:
    """Whether the table :data:`plugin_uses.SINCE` says ``owner.attribute`` exists in ``tree``'s release."""
    since = plugin_uses.SINCE.get((owner, attribute))
    return None if since is None else Version(tree.version) >= Version(since)


def check_imports(tree: SourceTree) -> list[str]:
    """Every ``from vllm... import name`` of the plugin resolves."""
    problems = []
    for use in plugin_uses.imports():
        if tree.module(use.module) is None:
            problems.append(f"vllm {tree.version}: module {use.module} does not exist (imported at {use.where})")
        elif tree.resolve(use.module, use.name) is None:
            problems.append(f"vllm {tree.version}: {use.symbol} does not exist (imported at {use.where})")
    return problems


def check_overrides(tree: SourceTree) -> list[str]:
    """Each method and class attribute a plugin subclass defines overrides one of its vLLM base, compatibly.

    Public methods and ``__init__`` must exist in the base (unless the table
    ``SINCE`` says the base gained them later) with a signature that takes
    vLLM's calls; private ones must not exist there (an accidental override).
    """
    problems = []
    for subclass in plugin_uses.subclasses():
        base = tree.class_def(subclass.base.module, subclass.base.name)
        label = f"vllm {tree.version}: {subclass.base.symbol}"
        if base is None:
            problems.append(f"{label}: class not found (subclassed by {subclass.name})")
            continue
        for method in subclass.methods:
            problems += _override_problems(tree, base, label, subclass, method)
        for attribute in subclass.attributes:
            if tree.member(base, attribute) is None:
                problems.append(f"{label}.{attribute}: no such class attribute (set by {subclass.name})")
    return problems


def _override_problems(tree: SourceTree, base: Found, label: str, subclass, method: ast.FunctionDef) -> list[str]:
    name = method.name
    symbol = f"{label}.{name}"
    found = tree.member(base, name)
    private = name.startswith("_") and not name.startswith("__")
    if private:
        return [] if found is None else [f"{symbol}: vLLM defines it, so {subclass.name}'s own helper overrides it"]
    expected = present_in(tree, base.node.name, name)
    if found is None:
        return [] if expected is False else [f"{symbol}: no such method to override (overridden by {subclass.name})"]
    if expected is False:
        return [f"{symbol}: exists, but the table SINCE says it appears later; update the table"]
    _, node = found
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return [f"{symbol}: not a method in vLLM (overridden by {subclass.name})"]
    theirs, ours = method_kind(node), method_kind(method)
    if theirs != ours:
        return [f"{symbol}: a {theirs} in vLLM but a {ours} in {subclass.name}"]
    bound = ours != "staticmethod"
    return [f"{symbol}: {subclass.name}'s override {problem}"
            for problem in override_problems(Signature.of(node, bound), Signature.of(method, bound))]


def check_attributes(tree: SourceTree) -> list[str]:
    """Each config field, enum member, metadata field and method the plugin reads exists (table ATTRIBUTES)."""
    problems = []
    for (module, cls_name), attributes in plugin_uses.ATTRIBUTES.items():
        cls = tree.class_def(module, cls_name)
        if cls is None:
            problems.append(f"vllm {tree.version}: class {module}.{cls_name} not found (its attributes are read)")
            continue
        for attribute in attributes:
            exists = tree.member(cls, attribute) is not None
            expected = present_in(tree, cls_name, attribute)
            if expected is None and not exists:
                problems.append(f"vllm {tree.version}: {module}.{cls_name}.{attribute} does not exist (read by the "
                                "plugin)")
            elif expected is not None and exists != expected:
                problems.append(f"vllm {tree.version}: {module}.{cls_name}.{attribute} "
                                f"{'exists' if exists else 'does not exist'}, unlike the table SINCE says")
    return problems


def check_calls(tree: SourceTree) -> list[str]:
    """Each call of a vLLM function or class passes arguments its signature takes."""
    problems = []
    targets = [(c.target, c.num_positional, c.keywords, c.unpacks) for c in plugin_uses.calls()]
    targets += [(plugin_uses.Use(module, name, site), 0, keywords, False)
                for module, name, keywords, site in plugin_uses.CALLS]
    for use, num_positional, keywords, unpacks in targets:
        found = tree.resolve(use.module, use.name)
        if found is None:
            continue  # reported by check_imports
        signature = _call_signature(tree, found)
        if signature is None:  # a class without __init__ (a TypedDict, a msgspec struct): keywords are its fields
            problems += [f"vllm {tree.version}: {use.symbol} has no field {keyword!r} (called at {use.where})"
                         for keyword in keywords if tree.member(found, keyword) is None]
            continue
        for problem in call_problems(signature, num_positional, keywords, unpacks):
            problems.append(f"vllm {tree.version}: {use.symbol} {problem} (called at {use.where})")
    return problems


def _call_signature(tree: SourceTree, found: Found) -> Signature | None:
    if isinstance(found.node, ast.FunctionDef | ast.AsyncFunctionDef):
        return Signature.of(found.node, bound=False)
    if isinstance(found.node, ast.ClassDef):
        init = tree.member(found, "__init__")
        if init is not None and isinstance(init[1], ast.FunctionDef):
            return Signature.of(init[1], bound=True)
    return None


def check_patched(tree: SourceTree) -> list[str]:
    """Each vLLM method the plugin replaces exists, of the kind it wraps, with a signature that fits both ways."""
    problems = []
    compat = PACKAGE / "vllm_plugin" / "compat.py"
    for module, cls_name, method, replacement, kind in plugin_uses.PATCHED:
        symbol = f"vllm {tree.version}: {module}.{cls_name}.{method}"
        cls = tree.class_def(module, cls_name)
        found = None if cls is None else tree.member(cls, method)
        if found is None or not isinstance(found[1], ast.FunctionDef):
            problems.append(f"{symbol}: no such method (replaced by compat.{replacement})")
            continue
        node = found[1]
        if method_kind(node) != kind:
            problems.append(f"{symbol}: a {method_kind(node)} in vLLM, replaced as a {kind}")
            continue
        ours = plugin_uses.nested_function(compat, *replacement.split("."))
        theirs_signature, ours_signature = Signature.of(node, bound=True), Signature.of(ours, bound=True)
        for problem in override_problems(theirs_signature, ours_signature):
            problems.append(f"{symbol}: compat.{replacement} {problem}")
        for problem in override_problems(ours_signature, theirs_signature):
            problems.append(f"{symbol}: vLLM's original, called by compat.{replacement}, {problem}")
    return problems


def check_selector_fields(tree: SourceTree) -> list[str]:
    """Every field of AttentionSelectorConfig is a parameter of AttentionBackend.validate_configuration."""
    (selector_module, selector_name), (backend_module, backend_name, method) = plugin_uses.SELECTOR_INTO_VALIDATION
    selector, backend = tree.class_def(selector_module, selector_name), tree.class_def(backend_module, backend_name)
    if selector is None or backend is None or tree.member(backend, method) is None:
        return [f"vllm {tree.version}: {selector_module}.{selector_name} or {backend_module}.{backend_name}.{method} "
                "not found"]
    fields = [s.target.id for s in selector.node.body
              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    signature = Signature.of(tree.member(backend, method)[1], bound=True)
    return [f"vllm {tree.version}: {selector_module}.{selector_name}.{field} is not a parameter of "
            f"{backend_name}.{method} (compat._patch_cpu_backend_choice passes every field)"
            for field in fields if signature.named(field) is None and not signature.star_kwargs]


CHECKS = {
    "imports": check_imports,
    "overrides": check_overrides,
    "attributes": check_attributes,
    "calls": check_calls,
    "patched": check_patched,
    "selector_fields": check_selector_fields,
}
