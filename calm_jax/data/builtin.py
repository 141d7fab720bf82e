"""The `builtin:python_docs` corpus: English text that ships with every Python interpreter.

Documents are the help topics of `pydoc_data.topics` (one per topic) and the
docstrings of the standard library modules (one per module: the module, class
and function docstrings in source order), about 2.3 M characters. Module
sources are parsed with `ast`, never imported (importing is slow and has side
effects). Nothing is cached on disk; the corpus is built once per process.
"""
import ast
import functools
import gc
import hashlib
import os
import sysconfig

import pydoc_data.topics

SPLITS = ("train", "valid", "all")
# Percent of documents in the validation split (chosen by a hash of the name).
VALID_PERCENT = 5
# Directories of the stdlib that hold tests or third-party code, not stdlib docs.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages",
                        "dist-packages", "__pycache__", "lib-dynload"})
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(body):
  """Yields the docstrings of the classes and functions in `body`, in source order.

  Walks statements only (also inside if/try/with blocks), never expressions,
  which is much faster than ast.walk over the whole tree.
  """
  for node in body:
    if isinstance(node, _DEF_NODES):
      doc = ast.get_docstring(node)
      if doc:
        yield doc
      yield from _docstrings(node.body)
    else:
      for field in ("body", "orelse", "finalbody", "handlers"):
        children = getattr(node, field, None)
        if isinstance(children, list) and children and isinstance(children[0], ast.AST):
          yield from _docstrings(children)


def _module_documents(stdlib_dir):
  """(name, text) for every stdlib module with docstrings, sorted by path."""
  docs = []
  for root, dirs, files in os.walk(stdlib_dir):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    rel = os.path.relpath(root, stdlib_dir)
    package = [] if rel == "." else rel.split(os.sep)
    for filename in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(root, filename), "rb") as f:
        source = f.read()
      try:
        tree = ast.parse(source)
      except (SyntaxError, ValueError):  # e.g. lib2to3 test fixtures
        continue
      pieces = [ast.get_docstring(tree) or ""] + list(_docstrings(tree.body))
      text = "\n\n".join(p for p in pieces if p)
      if text:
        stem = [] if filename == "__init__.py" else [filename[:-3]]
        docs.append(("module:" + ".".join(package + stem), text))
  return docs


def _split_of(name):
  """'valid' for about VALID_PERCENT% of document names, else 'train' (stable hash)."""
  bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 100
  return "valid" if bucket < VALID_PERCENT else "train"


@functools.cache
def _all_documents():
  topics = [("topic:" + k, v) for k, v in sorted(pydoc_data.topics.topics.items())]
  # Parsing allocates millions of short-lived AST nodes; with a large heap (jax,
  # grain imported) the cyclic GC would double the time.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    modules = _module_documents(sysconfig.get_paths()["stdlib"])
  finally:
    if gc_was_enabled:
      gc.enable()
  return tuple((name, text) for name, text in topics + modules if text.strip())


@functools.cache
def documents(split="train"):
  """The (name, text) documents of a split ('train', 'valid' or 'all'), in a fixed order."""
  if split not in SPLITS:
    raise ValueError(
        f"builtin:python_docs has no split {split!r}; use one of {', '.join(SPLITS)}.")
  docs = _all_documents()
  if split == "all":
    return docs
  return tuple(d for d in docs if _split_of(d[0]) == split)
