"""The documentation: the generated options reference matches the code, the README is the short
entrance it should be, no page cites the project's issue numbers, and every command quoted in a
code block is one the command line accepts."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from ddpm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/ddpm train --out runs/demo",
    "bash scripts/setup.sh --test && bash scripts/check",
)
README_MAX_LINES = 200


def pages() -> list[Path]:
    """The Markdown a reader sees: the README, BENCHMARKS.md and every page under docs/."""
    return [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(text: str, language: str = "[a-z]*") -> list[str]:
    """The contents of the fenced code blocks of ``text`` (of one ``language`` if given)."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


# --- the generated options reference ------------------------------------------------------------


def load_generator():
    path = ROOT / "scripts" / "options_reference.py"
    spec = importlib.util.spec_from_file_location("options_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_reference_matches_the_settings_declarations():
    generator = load_generator()
    committed = generator.OUT.read_text(encoding="utf-8")
    assert committed == generator.render(), (
        "docs/reference/options.md differs from the settings' declarations; "
        "run 'python scripts/options_reference.py' to write it")


def test_options_reference_lists_every_flag_once_per_setting():
    from ddpm.cli.options import setting_flags

    text = (ROOT / "docs" / "reference" / "options.md").read_text(encoding="utf-8")
    for key, flag in setting_flags().items():
        section, name = key.split(".")
        assert f"| `{name}` | `{flag}`" in text, f"{key} ({flag}) is missing from the reference"


def test_options_reference_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    generator = load_generator()
    stale = tmp_path / "options.md"
    stale.write_text(generator.render().replace("AdamW peak learning rate", "a hand edit"),
                     encoding="utf-8")
    monkeypatch.setattr(generator, "OUT", stale)
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    assert generator.main(["--check"]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "options_reference.py" in message
    assert generator.main([]) == 0  # writing it makes it current
    assert generator.main(["--check"]) == 0


# --- the README ---------------------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES} and move the rest to docs/")


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    intro, _, _ = text.partition("```")
    assert "\n## " not in intro, "the set-up commands must come before any section"
    assert len(intro.splitlines()) <= 10, "the set-up commands must follow a short introduction"
    first_two = [block.strip() for block in fenced_blocks(text)[:2]]
    assert first_two == list(SETUP_COMMANDS)


def test_readme_links_to_every_docs_page():
    text = README.read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


# --- no issue numbers ---------------------------------------------------------------------------

# "issue 12", "Issues 20 and 21", "(issue #7)", or a bare "#34": the project's issue numbers.
# A number after a repository's name ("diffusers#12633") or in a link's path (".../issues/12633")
# names an upstream issue, which a page may cite.
ISSUE_NUMBER = re.compile(r"\bissues?\s+#?\d+|(?<![\w/&#])#\d+\b", re.IGNORECASE)


@pytest.mark.parametrize("text", ["since issue 21", "(issue 5)", "Issues 20 and 21 added",
                                  "see #34", "fixed (#7)", "Issue #12's table"])
def test_issue_pattern_finds_issue_numbers(text):
    assert ISSUE_NUMBER.search(text)


@pytest.mark.parametrize("text", [
    "[diffusers#12633](https://github.com/huggingface/diffusers/issues/12633)",
    "the issue's targets", "## 2 GPUs", "`&#39;`", "[Presets](training.md#presets)",
    "C# code", "a page with 12 issues"])
def test_issue_pattern_leaves_other_text(text):
    assert not ISSUE_NUMBER.search(text)


def sources() -> list[Path]:
    """The code and its comments: the package, the tests (but this file, whose examples must
    match), the benchmarks and the scripts."""
    return [p for folder in ("src", "tests", "benchmarks", "scripts")
            for p in sorted((ROOT / folder).rglob("*.py")) if p != Path(__file__).resolve()]


@pytest.mark.parametrize("page", pages() + sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(page):
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = ISSUE_NUMBER.search(line)
        assert match is None, (f"{page.relative_to(ROOT)}:{number} cites {match.group(0)!r}; say "
                               f"what changed (history belongs in CHANGELOG.md)")


# --- quoted commands ----------------------------------------------------------------------------


def quoted_commands() -> list[tuple[str, str]]:
    """``(page, arguments)`` of every ``ddpm`` command in a ```bash block."""
    found = []
    for page in pages():
        for block in fenced_blocks(page.read_text(encoding="utf-8"), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#\s", line)[0].strip()
                match = re.search(r"(?:^|\s|/)ddpm\s+([a-z].*)$", line)
                if match:
                    found.append((str(page.relative_to(ROOT)), match.group(1)))
    return found


def test_the_pages_quote_commands():
    assert len(quoted_commands()) > 50


@pytest.mark.parametrize("page, command", quoted_commands())
def test_quoted_command_parses(page, command):
    args = [a for a in shlex.split(command) if a != "..."]  # '...': the reader's own options
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exc:
        assert not exc.code, f"{page}: 'ddpm {command}' is refused: {errors.getvalue().strip()}"
