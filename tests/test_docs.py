"""The README and docs/ as a reader meets them, and the layout they describe: every link and picture
there, the README's first screen, its table against the example report, the root's modules and the
direction of their imports."""
import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

from conftest import ROOT
from studies.docs import TABLE_END, TABLE_START, first_table, images_in

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# the project's own Python: the root's modules and its packages (the folders with Python in them)
PACKAGES = ["data", "gpt_kernels", "studies", "explorer", "bench", "tests"]
ROOT_MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_picture_points_at_a_file(page):
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text())
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_picture_comes_from_the_docs_command():
    """The pictures the README and docs/ show are in docs/example/ (the report's) or docs/figures/ (make
    docs writes them), none elsewhere: a picture outside those folders would be a hand copy."""
    shown = {(page.parent / t).resolve() for page in PAGES for t in images_in(page.read_text())}
    assert shown
    for picture in shown:
        assert picture.is_relative_to(ROOT / "docs" / "example") or picture.parent == ROOT / "docs" / "figures", picture
    figures = {p.name for p in (ROOT / "docs" / "figures").iterdir()}
    assert figures == {"explorer.png", "hacking.png"}  # the two studies/docs.py writes


def test_the_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first = "\n".join(lines[:60])
    for needed in ("make demo", "make test", "## Requirements", "(#what-you-will-see)"):
        assert needed in first, needed
    assert "LICENSE" in "\n".join(lines) and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_readmes_table_is_the_example_reports():
    readme = (ROOT / "README.md").read_text()
    between = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip().splitlines()
    assert between == first_table((ROOT / "docs" / "example" / "report.md").read_text())


def test_the_root_holds_the_lesson():
    assert len(ROOT_MODULES) <= 20, ROOT_MODULES
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"over 400 lines: {long}"


def test_no_name_of_ours_shadows_an_installed_package():
    """A module or package of ours at the root would hide a package of the same name (`kernels` hid
    Hugging Face's from transformers): check every top-level name against what is installed."""
    installed = set(importlib.metadata.packages_distributions())
    ours = set(ROOT_MODULES) | {p for p in PACKAGES if p != "tests"}
    assert not ours & installed, ours & installed


def imports(path):
    """The project's modules a file imports, as top-level names (a package stands for its modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & (set(ROOT_MODULES) | set(PACKAGES))


def test_the_imports_run_one_way():
    """The lesson and its plumbing import no study, tool, benchmark or test; the studies and the
    explorer no benchmark or test; no stage imports another stage; the root's modules form no cycle."""
    below = {m: imports(ROOT / f"{m}.py") for m in ROOT_MODULES}
    for m, deps in below.items():
        assert not deps & {"studies", "explorer", "bench", "tests"}, (m, deps)
        if m.startswith("train_"):
            assert not {d for d in deps if d.startswith("train_")}, (m, deps)
    for package, banned in [("data", {"studies", "explorer", "bench", "tests"} | {m for m in ROOT_MODULES if m != "cli"}),
                            ("gpt_kernels", {"studies", "explorer", "bench", "tests"} | set(ROOT_MODULES)),
                            ("studies", {"bench", "tests"}), ("explorer", {"studies", "bench", "tests"}),
                            ("bench", {"tests"})]:
        for path in (ROOT / package).glob("*.py"):
            assert not imports(path) & banned, (path.name, imports(path) & banned)
    done, visiting = set(), []

    def visit(m):  # depth first: meeting a module still being visited is a cycle
        assert m not in visiting, f"an import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        if m in done or m not in below:
            return
        visiting.append(m)
        for d in sorted(below[m]):
            visit(d)
        visiting.pop()
        done.add(m)

    for m in ROOT_MODULES:
        visit(m)


def test_the_docs_command_copies_the_report_and_rewrites_the_readmes_table(tmp_path):
    """make docs (studies/docs.py) on a small out/: the report and every picture it shows copied, the README's
    table replaced by the report's, and an out/ of another seed refused in one line, exit code 2."""
    from conftest import run_script
    out, docs, readme = tmp_path / "out", tmp_path / "docs", tmp_path / "README.md"
    (out / "rm").mkdir(parents=True)
    table = "| stage | facts |\n|---|---|\n| 1 pre-trained | 100% |"
    (out / "report.md").write_text(f"# report\n\n{table}\n\n![a](report-sft.png)\n![b](rm/best_of_n.png)\n")
    for name in ("report.json", "report-sft.png", "rm/best_of_n.png"):
        (out / name).write_text(name)
    (out / ".seed").write_text("0\n")
    readme.write_text(f"intro\n{TABLE_START}\n| old |\n{TABLE_END}\nrest\n")
    flags = [f"--out={out}", f"--docs={docs}", f"--readme={readme}", "--picture=false"]
    r = run_script("-m", "studies.docs", *flags)
    assert r.returncode == 0, r.stderr
    for name in ("report.md", "report.json", "report-sft.png", "rm/best_of_n.png"):
        assert (docs / "example" / name).read_text() == (out / name).read_text()
    assert readme.read_text() == f"intro\n{TABLE_START}\n{table}\n{TABLE_END}\nrest\n"
    assert "run `make hacking`" in r.stdout and "rewrote" in r.stdout  # it says what it rewrote and what it could not
    (out / ".seed").write_text("1\n")
    r = run_script("-m", "studies.docs", *flags)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "make demo SEED=0" in r.stderr
