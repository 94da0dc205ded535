"""Headless Chromium for the explorer's page: the system's browser (Debian's `chromium`), driven by
Playwright. The page's tests, its benchmark and the docs' picture of it all start it this way."""
import shutil
from pathlib import Path

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
# as root in a container Chromium needs --no-sandbox; the rest keep it off a network it cannot reach
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
ALL_DONE = "[...document.querySelectorAll('.column')].every(c => c.classList.contains('done'))"


def picture(page, prompt, path, size=(1050, 600)):
    """The explorer's page (a Playwright page at its address) asked `prompt`, every column answered, the
    pointer on a token of SFT's reply so that its five alternatives show: a screenshot, shrunk to `size`
    and to 64 colours, written to `path`."""
    from PIL import Image  # matplotlib's dependency
    page.wait_for_selector(".preset")
    page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_function(ALL_DONE, timeout=60_000)
    page.locator('.column[data-stage="sft"] .tok').nth(3).hover()
    full = Path(str(path) + ".full.png")
    page.screenshot(path=str(full))
    Image.open(full).convert("RGB").resize(size, Image.LANCZOS).quantize(64).save(path, optimize=True)
    full.unlink()
