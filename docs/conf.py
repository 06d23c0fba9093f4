"""Sphinx configuration: attnjax's API reference and its tutorial.

Build with ``sphinx-build -W -b html docs docs/_build/html``. The tutorial,
``tutorials/attention_explained.py`` (a Jupytext "percent" notebook), is rendered to a
Markdown page at build time without running it; inline code naming an attnjax object in its
text becomes a link to the reference.
"""

import importlib
import inspect
import pathlib
import re
import sys

import jupytext

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # Document the attnjax next to these docs.

project = "attnjax"
author = "attnjax authors"
copyright = "attnjax authors"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "tutorials"]
html_theme = "alabaster"

autodoc_default_options = {"members": True, "special-members": "__call__"}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep the names of these aliases in signatures instead of the unions they stand for (the
# modules use ``from __future__ import annotations``, so annotations are strings).
autodoc_type_aliases = {name: name for name in (
    "ArrayLike", "DTypeLike", "Dtype", "Initializer", "Params")}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

TUTORIALS = {"attention_explained": "Attention, explained"}
GENERATED = DOCS / "_generated"
# Inline code such as `attnjax.lengths_mask(q_lengths, ...)` or `attnjax.toy.plotting`.
_API_NAME = re.compile(r"`(attnjax(?:\.\w+)+)((?:\([^`]*\))?)`")


def _resolve(name: str) -> object:
  """The object a dotted attnjax name refers to; raises if there is none."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(name)


def _link(match: re.Match) -> str:
  name, call = match.groups()
  try:
    _resolve(name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"the tutorial names `{name}`, which attnjax does not have") from e
  return f"{{py:obj}}`{name}{call} <{name}>`" if call else f"{{py:obj}}`{name}`"


def render_tutorial(path: pathlib.Path) -> str:
  """A percent-format notebook as MyST Markdown: text cells, then code cells as code."""
  parts = []
  for cell in jupytext.read(path).cells:
    if cell.cell_type == "markdown":
      parts.append(_API_NAME.sub(_link, cell.source))
    elif cell.source.strip():
      parts.append(f"```python\n{cell.source}\n```")
  return "\n\n".join(parts) + "\n"


def _write_tutorials(app) -> None:
  GENERATED.mkdir(exist_ok=True)
  for name in TUTORIALS:
    text = render_tutorial(DOCS / "tutorials" / f"{name}.py")
    out = GENERATED / f"{name}.md"
    if not out.exists() or out.read_text() != text:  # Unchanged: Sphinx need not reread it.
      out.write_text(text)


# A description that is one capital letter and a full stop ("head_dim: H.") would read as
# an alphabetic list to reStructuredText.
_LETTER_ITEM = re.compile(r"^(\s*[\w, ]+: [A-Z])\.$")
# Sphinx writes an alias inside a union as TypeAliasForwardRef('ArrayLike'), and a dataclass
# field's type with its module as ~collections.abc.Callable.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")
_QUALIFIED = re.compile(r"~(?:\w+\.)*(\w+)")


def _escape_letter_items(app, what, name, obj, options, lines):
  lines[:] = [_LETTER_ITEM.sub(r"\1\\.", line) for line in lines]


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
  def clean(text):
    return text and _QUALIFIED.sub(r"\1", _ALIAS_REPR.sub(r"\1", text))
  return clean(signature), clean(return_annotation)


def _skip_foreign_attributes(app, what, name, obj, skip, options):
  """Skips class attributes whose values come from elsewhere (a dataclass field defaulting
  to ``jnp.float32`` or an initialiser): their docstrings are not about attnjax. Also skips
  a field whose default is a function under another name (``attention_fn`` defaulting to
  ``dot_product_attention``): it is documented where it is defined, and the field in the
  class's ``Attributes``."""
  if what == "class" and not getattr(obj, "__module__", "attnjax").startswith("attnjax"):
    return True
  if what == "class" and inspect.isroutine(obj) and getattr(obj, "__name__", name) != name:
    return True
  return None


def setup(app):
  app.connect("builder-inited", _write_tutorials)
  app.connect("autodoc-skip-member", _skip_foreign_attributes)
  app.connect("autodoc-process-docstring", _escape_letter_items, priority=400)  # Before napoleon.
  app.connect("autodoc-process-signature", _clean_signature)
