"""Content hashes: files, JSON-able objects, and the identity of the code a stage runs.

A stage's *code identity* (:func:`stage_identity`) is what of the software decides its output's
bytes, and nothing else:

- ``version``: the stage module's ``VERSION``, an integer bumped by hand when a change is meant to
  change results (as lm-evaluation-harness versions its tasks);
- ``code``: a hash of the *normalised* source (:func:`normalized_source`: the AST without
  docstrings, comments, formatting, annotations or typing-only imports) of the modules that compute
  the rows: the stage module and every shardwise module it imports, directly or not, except the
  plumbing (:data:`PLUMBING`: config and settings, whose *values* are in the identity already; the
  shard mechanism; status, the CLI, the cluster and retry logic; errors, atomic writes, clocks);
- ``libraries``: the installed versions of the libraries that compute the rows, the module's
  ``LIBRARIES`` (e.g. torch and transformers: a resume after ``pip install -U transformers`` would
  otherwise mix two numerics in one merge).

So a fixed typo in a docstring, a comment, a new analysis key in config.py or a change to the shard
mechanism reruns nothing; a change to the sampler, to model loading or a new transformers reruns the
stages whose rows they compute. The identity is a rule param (Snakemake reruns on a change, and a dry
run names it) and part of every shard fingerprint (a new identity starts a new shard store).
The normalised source is ``ast.unparse`` of the stripped tree: a new Python minor version may print
the same code differently, which then counts as a code change. The modules are read, never imported
(Snakemake computes the identities at every start, on the login node and in every job), and the
normalised sources are kept in ``~/.cache/shardwise`` (:func:`normalize_cached`).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


PACKAGE = "shardwise"

# Modules whose code never decides a stage's rows (their values may: the settings are in the identity).
PLUMBING = frozenset(
    f"{PACKAGE}.{name}"
    for name in (
        "atomic",
        "checks",
        "cli",
        "clock",
        "cluster",
        "config",
        "environment",
        "errors",
        "fingerprint",
        "profile",
        "retries",
        "settings",
        "sharded",
        "smk",
        "status",
    )
)
PLUMBING_PACKAGES = (f"{PACKAGE}.shards",)  # the shard mechanism: plan, store, worker, runner, codecs


def is_plumbing(module: str) -> bool:
    return module == PACKAGE or module in PLUMBING or module.startswith(tuple(p for p in PLUMBING_PACKAGES))


_ROOT = Path(__file__).resolve().parent  # the package's directory: its modules are read, not imported


def _source_or_none(module: str) -> Path | None:
    """The source file of shardwise module `module` (``a.b`` -> a/b.py or a/b/__init__.py), found
    on disk: importing it (or asking importlib for its spec, which imports its parents) would load
    torch at every Snakemake start."""
    package, *parts = module.split(".")
    if package != PACKAGE:
        return None
    base = _ROOT.joinpath(*parts)
    for path in (base.parent / f"{base.name}.py", base / "__init__.py") if parts else (base / "__init__.py",):
        if path.is_file():
            return path
    return None


def _source(module: str) -> Path:
    if (path := _source_or_none(module)) is None:
        raise ModuleNotFoundError(module)
    return path


@cache
def _parsed(module: str) -> ast.Module:
    """The syntax tree of a shardwise module's source, read once (not to be changed)."""
    return ast.parse(_source(module).read_bytes())


@cache
def imports_of(module: str) -> frozenset[str]:
    """The shardwise modules that `module`'s source imports, at the top or inside a function
    (read with `ast`, nothing is imported)."""
    found: set[str] = set()
    for node in ast.walk(_parsed(module)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if (
                node.module.split(".")[0] == PACKAGE
            ):  # from shardwise import generate / from shardwise.shards import plan
                names += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if _source_or_none(f"{node.module}.{a.name}")
                ]
        else:
            continue
        found.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + "."))
    found.discard(module)
    return frozenset(found)


def import_closure(*modules: str) -> list[str]:
    """`modules` and every shardwise module they import, directly or not (sorted)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports_of(name))
    return sorted(seen)


def code_modules(stage: str) -> list[str]:
    """The modules whose code computes stage `stage`'s rows: ``shardwise.<stage>`` and the
    shardwise modules it imports, directly or not, without following the plumbing (sorted)."""
    seen: set[str] = set()
    todo = [f"{PACKAGE}.{stage}"]
    while todo:
        name = todo.pop()
        if name not in seen and not is_plumbing(name):
            seen.add(name)
            todo.extend(imports_of(name))
    return sorted(seen)


_TYPING_MODULES = ("__future__", "typing", "collections.abc", "typing_extensions")


class _Normalise(ast.NodeTransformer):
    """Drops what does not change what code computes: docstrings, annotations, typing-only imports
    and ``if TYPE_CHECKING:`` blocks (comments and formatting are gone once parsed)."""

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        first = body[0] if body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            body = body[1:]
        return body or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = self._body(node.body)
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.returns = None
        return self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        node.returns = None
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        node.annotation = ast.Constant(value=None)  # a dataclass field stays a field
        return self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        return None if node.module in _TYPING_MODULES else node

    def visit_If(self, node: ast.If) -> ast.AST | None:
        test = node.test
        name = (
            test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        )
        return None if name == "TYPE_CHECKING" and not node.orelse else self.generic_visit(node)


def normalize(source: str | bytes) -> str:
    """Python source as the stage identity sees it: parsed, stripped (:class:`_Normalise`) and
    printed again, so that editing a docstring, a comment, an annotation or the layout of the code
    leaves it unchanged."""
    return ast.unparse(_Normalise().visit(ast.parse(source)))  # (unparse needs no line numbers)


@cache
def normalized_source(module: str) -> str:
    """:func:`normalize` of a shardwise module's source file."""
    return normalize_cached(_source(module).read_bytes())


def cache_dir() -> Path:
    """Where normalised sources are kept between processes: ``$XDG_CACHE_HOME/shardwise`` (default
    ``~/.cache/shardwise``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardwise" / "normalized"


@cache
def _normaliser() -> bytes:
    """What decides :func:`normalize`'s output besides the source: this module and the Python."""
    return hashlib.sha256(Path(__file__).read_bytes() + sys.version.encode()).digest()


def normalize_cached(source: bytes) -> str:
    """:func:`normalize`, kept on disk under the hash of `source`, this module and the Python version
    (as ``__pycache__`` keeps bytecode): every Snakemake start, on the login node and in each job,
    computes every stage's identity, and parsing, stripping and printing the modules is ~0.4 s of
    it. A cache file that is unreadable or fails its checksum is computed again; one that cannot be
    written is skipped."""
    key = hashlib.sha256(_normaliser() + source).hexdigest()
    try:
        path = cache_dir() / f"{key}.txt"
    except RuntimeError:  # no home directory
        return normalize(source)
    try:
        digest, text = path.read_text(encoding="utf-8").split("\n", 1)
        if hashlib.sha256(text.encode()).hexdigest() == digest:
            return text
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    text = normalize(source)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as fh:
            tmp = fh.name  # a temporary name beside it, then os.replace: no reader sees half a file
            fh.write(f"{hashlib.sha256(text.encode()).hexdigest()}\n{text}")
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return text


def _constant(module: str, name: str) -> Any:
    """The literal a module assigns to `name` at its top level (read with `ast`, not imported)."""
    for node in _parsed(module).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
                return ast.literal_eval(node.value)
    raise LookupError(f"{module} has no top-level {name} = <literal>")


def library_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """The installed version of each distribution (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@cache
def stage_identity(stage: str) -> dict[str, Any]:
    """What of the software decides stage `stage`'s bytes (module docstring): its explicit
    ``VERSION``, the hash of the normalised code of :func:`code_modules`, and the installed versions
    of its ``LIBRARIES``."""
    module = f"{PACKAGE}.{stage}"
    digest = hashlib.sha256()
    for name in code_modules(stage):
        digest.update(name.encode() + b"\0" + normalized_source(name).encode() + b"\0")
    return {
        "version": int(_constant(module, "VERSION")),
        "code": digest.hexdigest()[:16],
        "libraries": library_versions(tuple(_constant(module, "LIBRARIES"))),
    }


@cache
def code_version(stage: str) -> str:
    """:func:`stage_identity` in 16 hex digits: the `code` param of the stage's rules, so that a
    change of it reruns them (and a dry run says why), and recorded in run_info.json."""
    return stable_hash(stage_identity(stage))[:16]
