"""The stage explorer's speed, as a learner meets it: explorer/serve.py on the demo's checkpoints, every stage asked
the same prompt at once.

    python bench/explorer.py            # after `make demo`; writes bench/RESULTS-explorer.md
                                        # (the page's picture in docs/ is make docs's)

Two measures, each the median over rounds:
- HTTP: one streamed request per stage at once from Python threads, each made to write exactly 64
  tokens (ignore_eos), greedy: when each stage's first token arrived and when the last stream ended;
- the page: the journey's prompts typed into the page in headless Chromium (replies as the stages
  write them, each ending where its stage ends it): the slowest column's first token, and the time
  until every column has its reply and its scores.
"""
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from measure import device_name, markdown_table  # noqa: E402  (bench/ is on the path: this script's folder)

import torch  # noqa: E402

ROUNDS = 5
TOKENS = 64


def start_server(out):
    proc = subprocess.Popen([sys.executable, "-m", "explorer.serve", "--port=0", f"--out={out}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if line.startswith("open http://"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split()[1].rstrip("/")
    raise SystemExit("explorer/serve.py did not start: run `make demo` first")


def stream_times(base, model, prompt, t0, results):
    """Seconds after t0 of a stream's first token and of its end."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "temperature": 0, "max_tokens": TOKENS, "ignore_eos": True}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    first, n = None, 0
    with urllib.request.urlopen(request) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line:
                first = first or time.perf_counter() - t0
                n += 1
    results[model] = (first, time.perf_counter() - t0)


def http_round(base, models, prompt):
    results, t0 = {}, time.perf_counter()
    threads = [threading.Thread(target=stream_times, args=(base, m, prompt, t0, results)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(f for f, _ in results.values()), max(e for _, e in results.values())


def page_rounds(base, prompts):
    from playwright.sync_api import sync_playwright
    from explorer.browser import ALL_DONE, CHROMIUM, FLAGS
    if CHROMIUM is None:
        return None
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(base + "/")
        page.wait_for_selector(".preset")
        for prompt in prompts:
            firsts, dones = [], []
            for _ in range(ROUNDS):
                page.fill("#prompt", prompt)
                page.click("#run")
                page.wait_for_function(ALL_DONE, timeout=60_000)
                firsts.append(max(page.locator(".column").evaluate_all("cs => cs.map(c => Number(c.dataset.firstMs || 0))")))
                dones.append(float(page.get_attribute("#columns", "data-done-ms")))
            rows.append((prompt, statistics.median(firsts), statistics.median(dones)))
        browser.close()
    return rows


def main():
    out = ROOT / "out"
    if not (out / "sft" / "ckpt.pt").is_file():
        raise SystemExit("no checkpoints in out/: run `make demo` first")
    proc, base = start_server(out)
    try:
        info = json.loads(urllib.request.urlopen(base + "/info").read())
        models = [s["id"] for s in info["stages"]]
        prompts = info["presets"]
        http_round(base, models, prompts[0])  # warm-up
        http = [http_round(base, models, prompts[0]) for _ in range(ROUNDS)]
        page = page_rounds(base, prompts)
    finally:
        proc.terminate()
    lines = ["# The stage explorer's speed", "",
             f"- machine: {device_name(torch.device('cpu'))}; torch {torch.__version__}; the demo's checkpoints "
             f"({', '.join(models)}), served by `python -m explorer.serve` on this machine",
             f"- command: `python bench/explorer.py`; {ROUNDS} rounds, medians; {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"## HTTP: {len(models)} streams at once, {TOKENS} tokens each (greedy, ignore_eos)", "",
             markdown_table(["slowest first token ms", "all streams ended ms"],
                            [[f"{1e3 * statistics.median(f for f, _ in http):.0f}",
                              f"{1e3 * statistics.median(e for _, e in http):.0f}"]]), ""]
    if page is None:
        lines += ["No Chromium here: the page was not measured (`apt install chromium`)."]
    else:
        lines += ["## The page in headless Chromium: each journey prompt, every stage's reply and scores", "",
                  markdown_table(["prompt", "slowest column's first token ms", "every column done, scores included ms"],
                                 [[p, f"{f:.0f}", f"{d:.0f}"] for p, f, d in page])]
    (ROOT / "bench" / "RESULTS-explorer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
