"""mkdocs hooks: the repository's BENCHMARKS.md and CHANGELOG.md as pages of the site.

Both files stay at the repository root, where GitHub shows them and where the project's figures
and history are kept. The site takes them in as ``benchmarks.md`` and ``changelog.md`` at the top
of the docs folder, and rewrites links so that each file reads correctly in both places:

- in the root files, ``docs/PAGE`` (a docs page or picture, as GitHub resolves it from the root)
  becomes ``PAGE``;
- in the docs pages, ``../BENCHMARKS.md`` (one ``../`` more than the page's depth, as GitHub
  resolves it) becomes ``benchmarks.md`` at the site's top, and likewise ``CHANGELOG.md``.

mkdocs then checks every rewritten link and anchor like any other (``validation`` in mkdocs.yml).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT_PAGES = {"BENCHMARKS.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}

_DOCS_PREFIX = re.compile(r"\]\(docs/")
_ROOT_PAGE = re.compile(r"\]\(((?:\.\./)*)\.\./(BENCHMARKS|CHANGELOG)\.md")
_ROOT_PAGE_FROM_ROOT = re.compile(r"\]\((BENCHMARKS|CHANGELOG)\.md")


def on_files(files: Files, config: Any) -> Files:
    root = Path(config.config_file_path).parent
    for name, uri in ROOT_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(root / name)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri in ROOT_PAGES.values():
        markdown = _DOCS_PREFIX.sub("](", markdown)
        return _ROOT_PAGE_FROM_ROOT.sub(lambda m: f"]({m.group(1).lower()}.md", markdown)
    return _ROOT_PAGE.sub(lambda m: f"]({m.group(1)}{m.group(2).lower()}.md", markdown)
