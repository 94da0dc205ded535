"""The stage explorer's page in a real browser: headless Chromium (the system's, driven by Playwright)
against a live explorer/serve.py on the tests' tiny world. Type a prompt, see one column per stage fill and end,
point at a token and see its alternatives; a reasoning preset shows the step checker's marks."""
import json
import os

import pytest

from conftest import ROOT, made_once, run_script, stage_folders, start_server
from explorer.browser import CHROMIUM, FLAGS, picture

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine: `apt install chromium` "
                                                         "(CI's .ci/run installs it)")


@pytest.fixture(scope="module")
def worker(tiny_world, tiny_sft, tmp_path_factory):
    """tiny_sft fine-tuned on worked answers to one-character problems: it writes step-like lines (right or
    wrong), so the step checker has something to mark. (The tiny SFT model alone writes no lines.)"""
    return made_once(tmp_path_factory, "worker", lambda out: make_worker(tiny_world, tiny_sft, out)) / "ckpt.pt"


def make_worker(tiny_world, tiny_sft, out):
    rows = [json.loads(line) for name in ("math_train.jsonl", "math_test.jsonl")
            for line in (tiny_world["data"] / name).read_text().splitlines()]
    chats = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in rows if r["level"] == 1]
    (out / "worked.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    r = run_script("train_sft.py", f"--data={out / 'worked.jsonl'}", f"--init={tiny_sft}", f"--out={out}", "--qa_data=",
                   "--replay_data=", "--batch_size=8", "--max_steps=60", "--lr=1e-2", "--warmup_steps=2",
                   "--eval_every=60", "--device=cpu")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def page(tiny_world, tiny_pretrained, tiny_sft, tiny_rm, worker, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    out = stage_folders(tmp_path_factory.mktemp("explorer"), {"pretrain": tiny_pretrained, "sft": tiny_sft, "ppo": tiny_sft,
                                                              "dpo": tiny_sft, "grpo": worker, "rm": tiny_rm})
    proc, base = start_server(f"--out={out}", f"--data={tiny_world['data']}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(base + "/")
        yield page
        browser.close()
    assert proc.poll() is None, "the server died during the tests"
    proc.terminate()
    proc.wait(timeout=30)


def ask(page, prompt=None, preset=None):
    if preset is None:
        page.fill("#prompt", prompt)
        page.click("#run")
    else:
        page.locator(".preset").nth(preset).click()
    page.wait_for_function("document.querySelectorAll('.column').length > 0 && "
                           "[...document.querySelectorAll('.column')].every(c => c.classList.contains('done'))",
                           timeout=60_000)


def test_every_stage_answers_in_its_own_column(page):
    ask(page, "Where does Ann live?")
    columns = page.locator(".column")
    assert [columns.nth(i).locator("h2").inner_text() for i in range(columns.count())] == [
        "0 random init", "1 pre-trained", "2 SFT", "3 PPO", "3 DPO", "4 GRPO"]
    for i in range(columns.count()):
        col = columns.nth(i)
        assert col.locator(".error").count() == 0, col.inner_text()
        n = col.locator(".tok").count()
        assert n > 0 or "(nothing" in col.locator(".reply").inner_text()
        assert f"{n} tokens" in col.locator(".timing").inner_text()
        p = [float(x) for x in col.locator(".tok").evaluate_all("spans => spans.map(s => s.dataset.p)")]
        assert all(0 < x <= 1 for x in p)
    sft = page.locator('.column[data-stage="sft"]')
    verdict = sft.locator(".verdict").inner_text()
    assert "reward model" in verdict and "gold" in verdict and sft.locator(".kl").inner_text() == "0.00"
    assert sft.locator(".rm").inner_text() != "-" and sft.locator(".gold").inner_text() != "-"
    assert page.locator('.column[data-stage="random"] .kl').inner_text() not in ("-", "0.00")


def test_pointing_at_a_token_shows_its_alternatives(page):
    ask(page, "Where does Ann live?")
    token = page.locator('.column[data-stage="pretrain"] .tok').first
    assert not page.locator("#tip").is_visible()
    token.hover()
    tip = page.locator("#tip")
    assert tip.is_visible()
    assert tip.locator("tr").count() == 5 and "top 5" in tip.inner_text()
    shown = float(tip.inner_text().split("p = ")[1].split("%")[0])
    assert shown == pytest.approx(100 * float(token.get_attribute("data-p")), abs=0.06)
    page.mouse.move(0, 0)
    assert not tip.is_visible()


def test_a_reasoning_preset_shows_the_checkers_marks(page, tmp_path):
    presets = page.locator(".preset")
    assert presets.count() == 3
    ask(page, preset=2)
    assert page.input_value("#prompt") == presets.nth(2).inner_text()
    worker = page.locator('.column[data-stage="grpo"]')
    assert "verifier:" in worker.locator(".mathverdict").inner_text()
    marks = worker.locator(".steps li")
    assert marks.count() > 0
    assert all(m[:2] in ("✓ ", "✗ ", "· ") for m in marks.all_inner_texts())
    assert worker.locator(".steps li.right, .steps li.wrong").count() > 0  # a step the checker judged
    shot = ROOT / "out" / "explorer-test.png" if os.access(ROOT / "out", os.W_OK) else tmp_path / "explorer-test.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_plain_completion_mode(page):
    page.select_option("#mode", "completion")
    try:
        ask(page, "Ann lives in")
    finally:
        page.select_option("#mode", "chat")
    for col in page.locator(".column").all():
        assert col.locator(".error").count() == 0, col.inner_text()
        assert col.locator(".tok").count() > 0  # a continuation has no turn to end: it writes
        # the reward model and the gold rater judge replies to a question; a continuation has KL only
        assert col.locator(".rm").inner_text() == "-" and col.locator(".gold").inner_text() == "-"
        assert col.locator(".kl").inner_text() != "-"


def test_the_docs_picture_of_the_page(page, tmp_path):
    """make docs's picture of the explorer (explorer.browser.picture): every column answered, at its size."""
    from PIL import Image
    picture(page, "Where does Lucy live?", tmp_path / "explorer.png")
    shot = Image.open(tmp_path / "explorer.png")
    assert shot.size == (1050, 600) and len(shot.getcolors(256)) > 8  # a page, not a blank
    assert page.locator(".column").count() == 6 and not list(tmp_path.glob("*.full.png"))
