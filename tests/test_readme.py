"""The README's two commands are the ones CI runs; they must not drift apart."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    return [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    train, test = readme_commands()
    assert ci_lines == [test]


def test_both_readme_commands_share_the_same_set_up():
    train, test = readme_commands()
    setup = "pip install torch==2.13.0 && "
    assert train.startswith(setup) and test.startswith(setup)
    assert train.endswith("grpo train examples/local-cpu.yaml")
    assert test.endswith("python -m pytest -q")
    assert train.rsplit(" && ", 1)[0] in test


def test_the_readme_links_every_docs_page():
    """The README is the entrance: each page under docs/ is reachable from it, and every link it has resolves."""
    text = (REPO / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[^)#]+\.md)(?:#[^)]*)?\)", text))
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages <= links, f"docs pages the README does not link: {sorted(pages - links)}"
    assert all((REPO / link).is_file() for link in links), links
