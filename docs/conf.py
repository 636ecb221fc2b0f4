"""Sphinx configuration: the API reference from the docstrings, the guides and tutorials from Markdown."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro-evidence"
author = "pyro-evidence developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures carry them; the docstrings say what they mean
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["myst.header"]  # the included pages start below the top heading level
