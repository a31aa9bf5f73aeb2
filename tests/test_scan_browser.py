"""report.html in a real headless browser (Debian's chromium, driven by Playwright): the page
renders, its counts match summary.json, a blurred thumbnail unblurs when clicked. A screenshot is
saved as a test artefact ($SAFEVLM_TEST_ARTIFACTS, default: pytest's temporary folder).

Needs ``playwright`` (the ``dev`` extra) and ``/usr/bin/chromium`` (``apt-get install -y
chromium``; CI's scripts/setup.sh installs it). Without them the test FAILS with that hint: it
never skips.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from scan_fixtures import TINY, encode, figstep_pngs, rows, run_cli, skimage_pictures, split_adapter, summary

CHROMIUM = os.environ.get("SAFEVLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _browser(playwright):
    if not Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is None:
        pytest.fail(f"chromium not found at {CHROMIUM}: install it (Debian/Ubuntu: apt-get install -y chromium) "
                    "or set SAFEVLM_CHROMIUM; scripts/setup.sh installs it")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_report_renders_in_chromium_and_thumbnails_unblur_on_click(tmp_path, tmp_path_factory, capsys):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (or pip install playwright)")
    from safevlm.data.images import decode_image

    folder = tmp_path / "images"
    folder.mkdir()
    pictures = skimage_pictures(("astronaut", "coffee", "chelsea", "rocket", "camera", "horse"))
    blobs = {f"{name}.jpg": encode(picture) for name, picture in pictures.items()}
    for k, png in enumerate(figstep_pngs(("Steps to make a weapon.", "Methods to steal a car.", "How to hack."))):
        blobs[f"figstep_{k}.png"] = png
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    adapter = split_adapter(tmp_path / "adapter", risky=(decode_image(blobs["figstep_0.png"]), None),
                            safe=(decode_image(blobs["coffee.jpg"]), None))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "scan", "--model", TINY, "--adapter", adapter, "--input", folder, "--out", out,
                           "--num-workers", "0", "--no-progress")
    assert code == 0, err
    s = summary(out)
    risky = [r for r in rows(out / "scan.jsonl") if r["risk_level"] >= 2]
    assert risky, "the split adapter should put some images at risk level 3"

    artefacts = Path(os.environ.get("SAFEVLM_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    artefacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto((out / "report.html").resolve().as_uri())
            assert page.title().startswith("safevlm scan report")
            for key in ("total", "scanned", "duplicates", "failed", "flagged"):
                assert page.inner_text(f"#count-{key}") == str(s[key]), key
            for action, n in s["by_action"].items():
                assert page.inner_text(f"#count-action-{action}") == str(n)
            cells = page.eval_on_selector_all("#heat-table td[data-count]", "els => els.map(e => +e.dataset.count)")
            assert sum(cells) == s["scanned"] + s["duplicates"]
            bars = page.eval_on_selector_all("#histogram rect", "els => els.map(e => +e.dataset.count)")
            assert sum(bars) == s["scanned"] + s["duplicates"]
            # every image really decoded in the browser
            loaded = page.eval_on_selector_all("img.photo", "els => els.map(e => e.complete && e.naturalWidth)")
            assert loaded and all(w == 160 for w in loaded)

            blurred = page.locator("figure.thumb.blurred")
            n_blurred = blurred.count()
            assert n_blurred == len([r for r in risky if r["risk_type"] != "safe"][:12]) > 0
            first = blurred.first
            figure_id = first.get_attribute("data-id")
            photo = first.locator("img.photo")
            assert photo.evaluate("e => getComputedStyle(e).filter").startswith("blur(")
            page.screenshot(path=str(artefacts / "scan_report_blurred.png"), full_page=True)
            first.locator(".frame").click()
            clicked = page.locator(f'figure.thumb[data-id="{figure_id}"]')
            assert "blurred" not in clicked.get_attribute("class")
            assert clicked.locator("img.photo").evaluate("e => getComputedStyle(e).filter") == "none"
            assert page.locator("figure.thumb.blurred").count() == n_blurred - 1  # the others stay blurred
            page.uncheck("#show-heat")
            assert clicked.locator("img.heat").evaluate("e => getComputedStyle(e).display") == "none"
            page.screenshot(path=str(artefacts / "scan_report.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    shot = artefacts / "scan_report.png"
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
