"""
The files of C{web/}: the pages' XML templates, parsed once when the UI is
built (a broken template stops the daemon at start, not a page at night),
and the static files, read once and named by a content hash.
"""

from __future__ import annotations

import hashlib
import os

from twisted.python.filepath import FilePath
from twisted.web.iweb import ITemplateLoader
from twisted.web.template import Tag, XMLFile

import cllama_tx


def web_root() -> str:
    """
    The directory of templates and static files: C{cllama_tx/web} in an
    installed package (shipped as package data), else the repository's
    C{web/} beside the C{cllama_tx} package (a source checkout).
    """
    package = os.path.dirname(os.path.abspath(cllama_tx.__file__))
    for candidate in (os.path.join(package, "web"), os.path.join(os.path.dirname(package), "web")):
        if os.path.isdir(os.path.join(candidate, "templates")):
            return candidate
    raise FileNotFoundError(
        "the operator UI's web/ directory (templates, static files) is missing from this installation"
    )


class Templates:
    """
    Every C{web/templates/*.xml} (C{twisted.web.template} XML), found at
    construction and parsed the first time a page asks for it (L{loader}),
    then kept: a daemon whose UI nobody opens does not hold the parsed
    templates (about 600 KiB).
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = FilePath(root or web_root()).child("templates")
        self._paths: dict[str, FilePath] = {
            path.basename()[: -len(".xml")]: path for path in sorted(self.root.globChildren("*.xml"))
        }
        self._loaders: dict[str, ITemplateLoader] = {}

    def loader(self, name: str) -> ITemplateLoader:
        loader = self._loaders.get(name)
        if loader is None:
            loader = XMLFile(self._paths[name])
            _drop_layout_whitespace(loader.load(), None)  # parsed once, and kept by XMLFile
            self._loaders[name] = loader
        return loader

    def require(self, names: frozenset[str]) -> None:
        """Refuse to start without a template the pages use (a broken installation)."""
        missing = sorted(names - set(self._paths))
        if missing:
            raise FileNotFoundError(f"the operator UI's templates {', '.join(missing)} are missing from {self.root.path}")

    def names(self) -> list[str]:
        return sorted(self._paths)


# Where whitespace between elements is never drawn: between table parts,
# list items, options, and the top-level blocks of a template.  The templates
# are indented for reading; writing that indentation for every row of a
# hundred-row table would only cost time.
_SILENT_WHITESPACE = frozenset({"table", "thead", "tbody", "tfoot", "tr", "ul", "ol", "dl", "select", ""})


def _drop_layout_whitespace(children: list, parent: str | None) -> None:
    if parent is None or parent in _SILENT_WHITESPACE:
        children[:] = [c for c in children if not (isinstance(c, str) and not c.strip())]
    for child in children:
        if isinstance(child, Tag):
            _drop_layout_whitespace(child.children, child.tagName if isinstance(child.tagName, str) else child.tagName.decode())


class Static:
    """
    C{web/static/*}, read once, each with a content hash: pages link
    C{/static/ui.css?v=<hash>} so browsers may cache them for long.
    """

    TYPES = {
        ".css": "text/css; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
    }

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or web_root(), "static")
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            ext = os.path.splitext(name)[1]
            if os.path.isfile(path) and ext in self.TYPES:
                with open(path, "rb") as f:
                    data = f.read()
                digest = hashlib.sha256(data).hexdigest()[:12]
                self.files[name] = (data, self.TYPES[ext], digest)

    def url(self, name: str) -> str:
        return f"/static/{name}?v={self.files[name][2]}"
