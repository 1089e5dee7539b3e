"""The playground page in a real headless Chromium: type, click, read the ranking."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import live_server

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


def test_playground_is_served(rm_dir: Path) -> None:
    with live_server(Settings(model=str(rm_dir))) as url:
        r = httpx.get(url + "/playground")
    assert r.status_code == 200 and "v1/rank" in r.text and "<button" in r.text


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed")
def test_playground_ranks_in_a_real_browser(rm_dir: Path, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    with live_server(Settings(model=str(rm_dir))) as url:
        answers = ["Mix flour, water, yeast and salt, then knead and bake.", "No idea.", "Thanks for asking!"]
        scores = httpx.post(url + "/v1/score", json={"prompt": "How do I bake bread?", "responses": answers}).json()
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        try:
            driver.get(url + "/playground")
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("How do I bake bread?")
            box = driver.find_element(By.ID, "answers")
            box.clear()
            box.send_keys("\n---\n".join(answers))
            driver.find_element(By.ID, "rank").click()
            WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.CSS_SELECTOR, "tr.result")))
            rows = driver.find_elements(By.CSS_SELECTOR, "tr.result")
            cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        finally:
            driver.quit()
    assert len(cells) == 3
    best = max(range(3), key=lambda i: scores["scores"][i])
    assert cells[0][1] == answers[best]
    assert float(cells[0][2]) == pytest.approx(scores["scores"][best], abs=1e-3)
    assert sum(float(c[3].split("%")[0]) for c in cells) == pytest.approx(100, abs=0.5)


NODE = shutil.which("node")
# A small DOM for the page's script under Node: the elements it reads and writes, and fetch answering
# first a ranking, then the API's 422 for an empty answer.
FAKE_DOM = r"""
const made = () => ({ children: [], style: {}, textContent: "", hidden: false, className: "",
  appendChild(c) { this.children.push(c); this.lastChild = c; }, replaceChildren() { this.children = []; } });
const tbody = made();
const els = { error: made(), prompt: { value: "How?" }, answers: { value: "A\n---\nB" }, key: { value: "" },
  results: Object.assign(made(), { hidden: true, querySelector: () => tbody }),
  rank: { disabled: false, addEventListener(_, f) { this.click = f; } } };
globalThis.document = { getElementById: (id) => els[id], createElement: made };
const answers = [
  { ok: true, body: { ranking: [{ index: 1, score: 1.5, probability: 0.6 },
                                { index: 0, score: 1.0, probability: 0.4 }] } },
  { ok: false, body: { error: { message: "'responses[1]' is empty; give non-empty text", param: "responses[1]" } } },
  { ok: false, body: { error: {
    message: "'responses' has 70 entries; at most 64 are allowed (RMSERVE_MAX_RESPONSES)" } } },
];
globalThis.fetch = async () => {
  const a = answers.shift();
  return { ok: a.ok, statusText: "x", json: async () => a.body };
};
"""
CHECKS = r"""
(async () => {
  const out = [];
  for (let i = 0; i < 3; i++) {
    await els.rank.click();
    out.push({ rows: tbody.children.length, hidden: els.results.hidden, error: els.error.textContent });
  }
  els.answers.value = " \n---\n ";
  await els.rank.click();
  out.push({ rows: tbody.children.length, hidden: els.results.hidden, error: els.error.textContent });
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(not NODE, reason="node is not installed")
def test_playground_clears_results_under_an_error_and_says_answers(tmp_path: Path) -> None:
    import json
    import re
    import subprocess

    page = (Path(__file__).resolve().parents[2] / "service" / "static" / "playground.html").read_text()
    script = re.search(r"<script>(.*)</script>", page, re.S)
    assert script is not None
    js = tmp_path / "page.js"
    js.write_text(FAKE_DOM + script.group(1) + CHECKS)
    run = subprocess.run([NODE, str(js)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    ok, empty, many, none = json.loads(run.stdout)
    assert ok == {"rows": 2, "hidden": False, "error": ""}
    assert empty["rows"] == 0 and empty["hidden"] is True  # the previous ranking is gone
    assert empty["error"] == "answer 2 is empty; give non-empty text"
    assert many["error"] == "answers has 70 entries; at most 64 are allowed (RMSERVE_MAX_RESPONSES)"
    assert none["hidden"] is True and "at least one answer" in none["error"]
