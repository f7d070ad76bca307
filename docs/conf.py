"""Sphinx configuration of the monte_trio documentation (built with -W by `nox -s docs`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import monte_trio  # noqa: E402
import monte_trio.testing  # noqa: E402

project = "monte_trio"
author = "monte_trio contributors"
copyright = "monte_trio contributors"
release = monte_trio.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build"]
default_role = "py:obj"
pygments_style = "sphinx"
html_theme = "alabaster"
html_theme_options = {"description": "Encrypted bidirectional RPC over TCP for Trio"}
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become attribute entries that :attr: references can link to.
# (A class documenting a property there too gets a duplicate: exclude it in api.rst.)
napoleon_use_ivar = False

# Intersphinx fetches inventories over the network at build time, and a failed fetch is a
# warning (an error under -W), so it is opt-in: MONTE_DOCS_INTERSPHINX=1 nox -s docs.
if os.environ.get("MONTE_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "trio": ("https://trio.readthedocs.io/en/stable", None),
        "cryptography": ("https://cryptography.io/en/latest", None),
    }


def _check_api_page(app: Sphinx) -> None:
    """Warn about any public name that api.rst does not document, so none is forgotten."""
    text = (Path(app.srcdir) / "api.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. auto\w+:: ([\w.]+)", text, flags=re.MULTILINE))
    log = logging.getLogger(__name__)
    for module in (monte_trio, monte_trio.testing):
        for name in module.__all__:
            if name not in documented and f"{module.__name__}.{name}" not in documented:
                log.warning(
                    "api.rst does not document %s.%s: add an autoclass/autofunction/autodata "
                    "directive for it",
                    module.__name__,
                    name,
                )


def setup(app: Sphinx) -> None:
    app.connect("builder-inited", _check_api_page)
