"""The documentation: generated option tables are current, links and references resolve.

`nox -s docs` builds the site with `mkdocs build --strict`, which checks the links
between pages of docs/. These tests check what it does not see: the README's links
into docs/, the option tables generated from the code, and that the API reference
names only the public surface of `nanogpt_core`.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

import nanogpt_core

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REGENERATE = "python docs/generate_options.py"


def load_generator():
    """docs/generate_options.py as a module (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("generate_options", DOCS / "generate_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return load_generator()


def test_generated_option_tables_are_current(generator):
    texts, missing = generator.generate()
    stale = [
        str(page.relative_to(REPO)) for page, text in texts.items() if page.read_text() != text
    ]
    assert not stale, f"stale option tables in {', '.join(stale)}: run `{REGENERATE}`"
    assert not missing, (
        f"no page of docs/ has a table for {', '.join(missing)}: add the markers "
        f"(see docs/generate_options.py) to the page that describes it and run `{REGENERATE}`"
    )


def test_a_stale_table_is_regenerated(generator):
    """The check above can fail: an edited row or an unknown key is noticed."""
    tables = generator.core_tables()
    page = (DOCS / "experiments.md").read_text()
    row = "| `n_layer` | `12` | Number of transformer blocks. |"
    assert row in page
    edited = page.replace(row, "| `n_layer` | `6` | Number of layers. |")
    assert generator.render_page(edited, tables, "experiments.md") == page
    unknown = page.replace("<!-- options: model ", "<!-- options: modle ")
    with pytest.raises(ValueError, match=r"experiments\.md: no options named 'modle'"):
        generator.render_page(unknown, tables, "experiments.md")


def test_every_builtin_plugin_with_options_has_a_table(generator):
    tables = generator.core_tables()
    assert {"model", "train", "dataset/fineweb", "callback/checkpoint", "optimizer/muon"} <= set(
        tables
    )
    # The plugin kinds of the built-ins that take options, each with its tables placed.
    placed = {m["key"] for p in generator.pages() for m in generator.BEGIN.finditer(p.read_text())}
    assert placed == set(tables)


def markdown_links(text: str) -> list[str]:
    """The targets of inline links ``[text](target)``, outside code blocks and spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def slug(heading: str) -> str:
    """A heading's anchor, as Python-Markdown's toc extension makes it (mkdocs' default)."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_slug_matches_python_markdown():
    assert slug("Several GPUs and nodes") == "several-gpus-and-nodes"
    assert slug("`register_eval_tasks(register)`") == "register_eval_tasksregister"
    assert slug("The `eval` callback") == "the-eval-callback"


def test_readme_links_point_at_docs_pages_and_their_headings():
    links = markdown_links((REPO / "README.md").read_text())
    into_docs = [link for link in links if link.startswith("docs/")]
    assert len(into_docs) >= 10, "the README should link into the documentation"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # https://..., not a file of the repository
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), f"README.md links to {link}, but {path} does not exist"
        if path.startswith("docs/"):
            assert target.suffix == ".md" and target.parent == DOCS, (
                f"README.md links to {link}: not a page of docs/"
            )
        if anchor:
            assert anchor in anchors(target), (
                f"README.md links to {link}, but {path} has no heading with that anchor"
            )


def test_every_page_is_in_the_nav_and_linked_from_the_readme():
    nav = (REPO / "mkdocs.yml").read_text()
    readme = set(markdown_links((REPO / "README.md").read_text()))
    for page in sorted(DOCS.glob("*.md")):
        assert re.search(rf": {re.escape(page.name)}$", nav, re.MULTILINE), (
            f"{page.name} is not in mkdocs.yml's nav"
        )
        assert f"docs/{page.name}" in readme, f"README.md does not link to docs/{page.name}"


def api_references() -> list[tuple[str, str]]:
    """``(page, identifier)`` for each mkdocstrings ``::: identifier`` in docs/."""
    return [
        (page.name, name)
        for page in sorted(DOCS.rglob("*.md"))
        for name in re.findall(r"^::: (\S+)", page.read_text(), flags=re.MULTILINE)
    ]


def test_the_api_reference_names_public_names_only():
    """Modules move; the names `nanogpt_core` exports stay, so the reference uses those."""
    references = api_references()
    for page, name in references:
        module, _, public = name.partition(".")
        assert module == "nanogpt_core" and public in nanogpt_core.__all__, (
            f"{page}: `::: {name}` is not a name `nanogpt_core` exports; "
            "use `::: nanogpt_core.<name>` with a name from its __all__"
        )
    documented = {name.split(".", 1)[1] for _, name in references}
    undocumented = sorted(set(nanogpt_core.__all__) - documented - {"__version__"})
    assert not undocumented, f"docs/api.md lacks `::: nanogpt_core.X` for {undocumented}"


def test_paths_named_in_the_docs_exist():
    """A file of the repository named in a code span still exists (modules move)."""
    texts = {p.name: p.read_text() for p in sorted(DOCS.glob("*.md"))}
    texts["README.md"] = (REPO / "README.md").read_text()
    texts["CONTRIBUTING.md"] = (REPO / "CONTRIBUTING.md").read_text()
    roots = ("nanogpt_core/", "plugins/", "tests/", "experiments/", "docs/", ".ci/")
    checked = 0
    for name, text in texts.items():
        for span in re.findall(r"`([^`\s<>*]+)`", text):
            if span.startswith(roots):
                assert (REPO / span).exists(), f"{name} names {span}, which does not exist"
                checked += 1
    assert checked > 20


def test_every_option_of_every_command_is_named_in_the_docs():
    # An option added to a command without a word in the README or docs/ fails here.
    import click

    from nanogpt_core.cli import CORE_COMMANDS

    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted(DOCS.glob("*.md"))])

    def options(command: click.Command, path: str):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from options(sub, f"{path} {name}")
            return
        for param in command.params:
            if isinstance(param, click.Option):
                for flag in [*param.opts, *param.secondary_opts]:
                    if flag.startswith("--"):
                        yield path, flag

    flags = [pair for command in CORE_COMMANDS for pair in options(command, command.name)]
    assert ("serve", "--no-prepack") in flags  # the walk reaches secondary flags
    missing = [
        f"gpt {path} {flag}"
        for path, flag in flags
        if not re.search(re.escape(flag) + r"(?![\w-])", text)
    ]
    assert not missing, f"options the docs never name: {missing}"
