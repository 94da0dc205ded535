"""The docs' example and pictures, rewritten from a demo's out/: nothing in docs/ is a hand copy.

    make docs                          # the default seed's demo (run first if needed), then this
    python -m studies.docs --out=out   # after make demo (and, for their pictures, make hacking / make forgetting)

What it writes, each from the command that measured it:
- docs/example/: the default seed's report (report.md, report.json, every figure report.md shows) and,
  where they have run, make hacking's and make forgetting's tables and make seeds' out/seeds.md;
- docs/figures/explorer.png: the stage explorer's page on those checkpoints, in headless Chromium;
- docs/figures/hacking.png: make hacking's picture;
- README.md's table of what you will see: the example report's table, between two markers.
It says which it rewrote, and for each it could not, why and what to run.
"""
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import UserError

ROOT = Path(__file__).resolve().parent.parent
TABLE_START, TABLE_END = "<!-- the example report's table (make docs) -->", "<!-- end of the table -->"


@dataclass
class Config:
    out: str = "out"                   # a demo's outputs: report.md and its figures, the stages' checkpoints
    docs: str = "docs"                 # where the example and the pictures go
    readme: str = "README.md"          # whose table of what you will see is the example report's
    seed: int = 0                      # the seed the example must come from (make demo's default)
    picture: bool = True               # take the explorer's picture (needs Chromium and Playwright)


def images_in(md_text):
    """The relative image paths a Markdown text shows: ![alt](path)."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md_text)


def first_table(md_text):
    """The lines of the first Markdown table in a text."""
    lines = md_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def copy(src, dst, said):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    said.append(f"rewrote {dst}  (from {src})")


def example(out, docs, said):
    """docs/example/: the report with every figure it shows, and the studies' tables where they ran."""
    example_dir = docs / "example"
    if example_dir.exists():
        shutil.rmtree(example_dir)  # nothing left over from an older report
    report = (out / "report.md").read_text()
    for name in ["report.md", "report.json", *images_in(report)]:
        if not (out / name).is_file():
            raise UserError(f"{out / name} is missing (report.md shows it): rerun `make demo`")
        copy(out / name, example_dir / name, said)
    for name, command in [("hacking/hacking.md", "make hacking"), ("forgetting/forgetting.md", "make forgetting"),
                          ("seeds.md", "make seeds")]:
        if (out / name).is_file():
            copy(out / name, example_dir / Path(name).name, said)
        else:
            said.append(f"no {example_dir / Path(name).name}: {out / name} does not exist (run `{command}`)")


def hacking_picture(out, docs, said):
    src, dst = out / "hacking" / "hacking.png", docs / "figures" / "hacking.png"
    if src.is_file():
        copy(src, dst, said)
    else:
        said.append(f"kept {dst} as it was: {src} does not exist (run `make hacking`)")


def explorer_picture(out, docs, said):
    """The stage explorer on out/'s checkpoints, asked the journey's first question, in headless Chromium."""
    from explorer.browser import CHROMIUM, FLAGS, picture
    dst = docs / "figures" / "explorer.png"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return said.append(f"kept {dst} as it was: no Playwright here (`make docs` installs it)")
    if CHROMIUM is None:
        return said.append(f"kept {dst} as it was: no Chromium on this machine (`apt install chromium`)")
    proc = subprocess.Popen([sys.executable, "-m", "explorer.serve", "--port=0", f"--out={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = next((m.group(0) for line in proc.stdout if (m := re.search(r"http://[\d.]+:\d+", line))), None)
        if base is None:
            raise UserError(f"the stage explorer did not start on {out}: try `python -m explorer.serve --out={out}`")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # its request log, read so it never blocks
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(base + "/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            picture(page, "Where does Lucy live?", dst)
            browser.close()
        said.append(f"rewrote {dst}  (the stage explorer on {out}/, in headless Chromium)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def readme_table(readme, report_md, said):
    """README.md's table of what you will see, replaced by the example report's, between the markers."""
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise UserError(f"{readme} has no markers around its table ({TABLE_START} ... {TABLE_END}): put them back")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = head + TABLE_START + "\n" + "\n".join(first_table(report_md)) + "\n" + TABLE_END + tail
    if new != text:
        readme.write_text(new)
        said.append(f"rewrote {readme}'s table (from the example report)")
    else:
        said.append(f"{readme}'s table already is the example report's")


def main(cfg):
    out, docs, readme = Path(cfg.out), Path(cfg.docs), Path(cfg.readme)
    if not (out / "report.md").is_file():
        raise UserError(f"no report in {out}/: run `make demo` first (or `make docs`, which runs it)")
    seed = (out / ".seed").read_text().split() if (out / ".seed").is_file() else []
    if seed and seed != [str(cfg.seed)]:
        raise UserError(f"{out}/ holds the demo of SEED={' PRESET='.join(seed)}, not the example's seed "
                        f"{cfg.seed}: run `make demo SEED={cfg.seed}` first, or pass --seed={seed[0]}")
    said = []
    example(out, docs, said)
    hacking_picture(out, docs, said)
    if cfg.picture:
        explorer_picture(out, docs, said)
    readme_table(readme, (out / "report.md").read_text(), said)
    print("\n".join(said))


if __name__ == "__main__":
    cli.run_main(main, Config)
