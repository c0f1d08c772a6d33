"""vLLM's source code read with ``ast``, never imported: modules, names, classes, members and signatures.

The contract test reads three vLLM releases side by side (the installed one
and the CUDA wheels' sources), and the CUDA wheels' modules cannot all be
imported here. Reading covers what import would: a name's existence follows
re-exports (``from .x import y``, ``from .x import *``) and vLLM's lazy
top-level ``__getattr__`` (``MODULE_ATTRS = {"LLM": ".entrypoints.llm:LLM"}``);
a class's members are its methods, properties, annotated or assigned class
attributes (config fields, enum members) and ``self.x = ...`` in its methods,
through its base classes inside vLLM (depth first, left to right).

A :class:`SourceTree` reads one release from one or more import roots; the
first root that holds a module wins, so a small overlay of edited files
plants a mismatch without copying the release.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclasses.dataclass(frozen=True)
class Found:
    """Where a name is bound: a module (``node`` None: the name is that module) and its statement."""

    module: str
    node: ast.AST | None


class SourceTree:
    """One vLLM release's ``vllm`` package under ``roots`` (import roots, the first holding a module wins)."""

    def __init__(self, version: str, roots: Sequence[Path]) -> None:
        self.version = version
        self.roots = [Path(root) for root in roots]

    def __repr__(self) -> str:
        return f"SourceTree({self.version})"

    @functools.cache  # noqa: B019 (trees live as long as the test session)
    def module_file(self, module: str) -> Path | None:
        parts = module.split(".")
        for root in self.roots:
            base = root.joinpath(*parts)
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    return path
        return None

    @functools.cache  # noqa: B019
    def module(self, module: str) -> ast.Module | None:
        path = self.module_file(module)
        return None if path is None else ast.parse(path.read_text(encoding="utf-8"), str(path))

    def is_package(self, module: str) -> bool:
        path = self.module_file(module)
        return path is not None and path.name == "__init__.py"

    def absolute(self, module: str, statement: ast.ImportFrom) -> str:
        """The absolute module of ``statement`` (a relative or absolute ``from ... import``) inside ``module``."""
        if not statement.level:
            return statement.module or ""
        package = module.split(".") if self.is_package(module) else module.split(".")[:-1]
        package = package[: len(package) - (statement.level - 1)]
        return ".".join(package + ([statement.module] if statement.module else []))

    def resolve(self, module: str, name: str, _seen: frozenset = frozenset()) -> Found | None:
        """Where ``module.name`` is defined (following re-exports), or None if importing it would fail."""
        key = (module, name)
        if key in _seen:
            return None
        seen = _seen | {key}
        tree = self.module(module)
        if tree is None:
            return None
        for statement in runtime_statements(tree.body):
            found = self._binding(module, statement, name, seen)
            if found is not None:
                return found
        if self.module(f"{module}.{name}") is not None:
            return Found(f"{module}.{name}", None)
        return self._lazy_attribute(module, tree, name, seen)

    def _binding(self, module: str, statement: ast.stmt, name: str, seen: frozenset) -> Found | None:
        if isinstance(statement, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and statement.name == name:
            return Found(module, statement)
        if isinstance(statement, ast.Assign | ast.AnnAssign) and name in assigned_names(statement):
            return Found(module, statement)
        if isinstance(statement, ast.ImportFrom):
            source = self.absolute(module, statement)
            for alias in statement.names:
                if alias.name == "*":
                    found = self.resolve(source, name, seen)
                    if found is not None:
                        return found
                elif (alias.asname or alias.name) == name:
                    return self.resolve(source, alias.name, seen)
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.asname == name:
                    return Found(alias.name, None) if self.module(alias.name) is not None else None
        return None

    def _lazy_attribute(self, module: str, tree: ast.Module, name: str, seen: frozenset) -> Found | None:
        """A name a module's ``__getattr__`` makes on first access: one it tests for by name
        (``if name == "current_platform"``), or one of a ``{"Name": ".mod:attr"}`` table it imports from."""
        statements = runtime_statements(tree.body)
        getattr_function = next(
            (s for s in statements if isinstance(s, ast.FunctionDef) and s.name == "__getattr__"), None
        )
        if getattr_function is None:
            return None
        if any(isinstance(node, ast.Constant) and node.value == name for node in ast.walk(getattr_function)):
            return Found(module, getattr_function)
        for statement in statements:
            value = statement.value if isinstance(statement, ast.Assign | ast.AnnAssign) else None
            if not isinstance(value, ast.Dict):
                continue
            for key, target in zip(value.keys, value.values, strict=True):
                if (isinstance(key, ast.Constant) and key.value == name and isinstance(target, ast.Constant)
                        and isinstance(target.value, str) and ":" in target.value):
                    relative, attribute = target.value.split(":", 1)
                    level = len(relative) - len(relative.lstrip("."))
                    source = self.absolute(module, ast.ImportFrom(module=relative.lstrip(".") or None, level=level))
                    return self.resolve(source, attribute, seen)
        return None

    def class_def(self, module: str, name: str) -> Found | None:
        """The ``ClassDef`` that ``module.name`` resolves to, or None."""
        found = self.resolve(module, name)
        return found if found is not None and isinstance(found.node, ast.ClassDef) else None

    def bases(self, cls: Found) -> list[Found]:
        """The base classes of ``cls`` that are defined in vLLM (``Generic[T]``, ``ABC``, ``str`` are not)."""
        result = []
        for base in cls.node.bases:
            if isinstance(base, ast.Subscript):  # Builder[Metadata]
                base = base.value
            found = None
            if isinstance(base, ast.Name):
                found = self.class_def(cls.module, base.id)
            elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                owner = self.resolve(cls.module, base.value.id)
                if owner is not None and owner.node is None:
                    found = self.class_def(owner.module, base.attr)
            if found is not None:
                result.append(found)
        return result

    def mro(self, cls: Found) -> list[Found]:
        """``cls`` and its vLLM base classes, depth first, left to right, each once."""
        order: list[Found] = []

        def visit(current: Found) -> None:
            if any(current.node is seen.node for seen in order):
                return
            order.append(current)
            for base in self.bases(current):
                visit(base)

        visit(cls)
        return order

    def member(self, cls: Found, name: str) -> tuple[Found, ast.AST] | None:
        """The class in ``cls``'s MRO that binds ``name``, and the binding statement; None if none does."""
        for owner in self.mro(cls):
            node = class_binding(owner.node, name)
            if node is not None:
                return owner, node
        return None


def runtime_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level statements, looking into ``if``/``try`` blocks but not ``if TYPE_CHECKING:`` ones."""
    result = []
    for statement in body:
        if isinstance(statement, ast.If):
            if "TYPE_CHECKING" in ast.unparse(statement.test):
                result.extend(runtime_statements(statement.orelse))
                continue
            result.extend(runtime_statements(statement.body) + runtime_statements(statement.orelse))
        elif isinstance(statement, ast.Try):
            for block in (statement.body, statement.orelse, statement.finalbody, *(h.body for h in statement.handlers)):
                result.extend(runtime_statements(block))
        else:
            result.append(statement)
    return result


def assigned_names(statement: ast.Assign | ast.AnnAssign) -> set[str]:
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    names = set()
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.add(node.id)
    return names


def class_binding(cls: ast.ClassDef, name: str) -> ast.AST | None:
    """The statement of ``cls``'s own body (or a ``self.name = ...`` in its methods) that binds ``name``."""
    for statement in runtime_statements(cls.body):
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and statement.name == name:
            return statement
        if isinstance(statement, ast.Assign | ast.AnnAssign) and name in assigned_names(statement):
            return statement
    for method in cls.body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr == name and isinstance(target.value, ast.Name)
                        and target.value.id == "self"):
                    return node
    return None


def method_kind(function: FunctionNode) -> str:
    """``staticmethod``, ``classmethod``, ``property`` or ``method``."""
    for decorator in function.decorator_list:
        name = decorator.id if isinstance(decorator, ast.Name) else getattr(decorator, "attr", "")
        if name in ("staticmethod", "classmethod", "property"):
            return name
    return "method"


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    kind: str
    """``positional`` (positional-only or positional-or-keyword), ``keyword`` (keyword-only)."""
    position: int | None
    has_default: bool
    keyword_allowed: bool


@dataclasses.dataclass(frozen=True)
class Signature:
    parameters: tuple[Parameter, ...]
    star_args: bool
    star_kwargs: bool

    @classmethod
    def of(cls, function: FunctionNode, bound: bool) -> Signature:
        """The parameters callers pass: without ``self``/``cls`` when ``bound``."""
        arguments = function.args
        positional = [*arguments.posonlyargs, *arguments.args]
        defaults = [False] * (len(positional) - len(arguments.defaults)) + [True] * len(arguments.defaults)
        parameters = [
            Parameter(arg.arg, "positional", index, default, keyword_allowed=arg not in arguments.posonlyargs)
            for index, (arg, default) in enumerate(zip(positional, defaults, strict=True))
        ]
        if bound:
            parameters = [dataclasses.replace(p, position=p.position - 1) for p in parameters[1:]]
        parameters += [
            Parameter(arg.arg, "keyword", None, default is not None, keyword_allowed=True)
            for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
        ]
        return cls(tuple(parameters), arguments.vararg is not None, arguments.kwarg is not None)

    def named(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


def override_problems(base: Signature, override: Signature) -> list[str]:
    """Why calls that fit ``base`` would fail on ``override`` (empty: compatible).

    Every parameter of ``base`` must be accepted: by a parameter of the same
    name (at the same position, if vLLM may pass it positionally, and with a
    default where vLLM's has one), or by ``*args``/``**kwargs``. Every
    parameter the override adds must have a default, unless ``base`` takes
    ``*args``/``**kwargs`` too (a wrapper that forwards whatever it gets).
    """
    problems = []
    for wanted in base.parameters:
        have = override.named(wanted.name)
        if have is None:
            by_keyword = wanted.keyword_allowed and override.star_kwargs
            by_position = wanted.kind == "positional" and override.star_args
            if not (by_keyword or by_position):
                problems.append(f"does not accept vLLM's parameter {wanted.name!r}")
            continue
        if wanted.kind == "positional" and (have.kind != "positional" or have.position != wanted.position):
            problems.append(f"takes {wanted.name!r} at another position than vLLM (position {wanted.position})")
        if wanted.has_default and not have.has_default:
            problems.append(f"requires {wanted.name!r}, which vLLM's signature lets callers omit")
    for extra in override.parameters:
        forwarded = base.star_kwargs if extra.kind == "keyword" else base.star_args and base.star_kwargs
        if base.named(extra.name) is None and not extra.has_default and not forwarded:
            problems.append(f"requires {extra.name!r}, which vLLM's signature does not have")
    return problems


def call_problems(signature: Signature, num_positional: int, keywords: Sequence[str], unpacks: bool) -> list[str]:
    """Why a call with ``num_positional`` positional arguments and ``keywords`` would fail (empty: fits).

    ``unpacks``: the call also passes ``*args`` or ``**kwargs``, so missing
    required parameters are not reported.
    """
    problems = []
    positional = [p for p in signature.parameters if p.kind == "positional"]
    if num_positional > len(positional) and not signature.star_args:
        problems.append(f"takes at most {len(positional)} positional arguments, the plugin passes {num_positional}")
    for keyword in keywords:
        parameter = signature.named(keyword)
        if (parameter is None or not parameter.keyword_allowed) and not signature.star_kwargs:
            problems.append(f"has no parameter {keyword!r}")
    if not unpacks:
        given = {p.name for p in positional[:num_positional]} | set(keywords)
        missing = [p.name for p in signature.parameters if not p.has_default and p.name not in given]
        if missing:
            problems.append(f"requires {', '.join(map(repr, missing))}, which the plugin does not pass")
    return problems
