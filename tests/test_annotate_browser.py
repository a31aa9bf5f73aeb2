"""The rating page in a real headless browser (Debian's chromium, driven by Playwright) against a
real uvicorn server on 127.0.0.1: a rater signs in, rates 5 items with clicks and with keyboard
shortcuts, reloads the page and the server restarts in between, skips and goes back, changes an
earlier rating; the database then holds exactly those 5 ratings, once each. A second rater sees
another order and none of the first rater's answers; no page names the system that answered.

Needs ``playwright`` (the ``dev`` extra) and ``/usr/bin/chromium``; without them the test FAILS
with that hint: it never skips. A screenshot goes to $SAFEVLM_TEST_ARTIFACTS (default: pytest's
temporary folder).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from annotate_fixtures import SECRET_LABELS, free_port, make_app, make_eval_run, serving
from test_scan_browser import _browser

from safevlm.annotate.form import score_rubric


def _config(page) -> dict:
    return json.loads(page.eval_on_selector("#config", "e => e.textContent"))


def _pressed(page) -> dict:
    return page.eval_on_selector_all(
        "button[data-field][aria-pressed=true]", "els => Object.fromEntries(els.map(e => [e.dataset.field, e.dataset.value]))")


def _check_blind(page) -> None:
    html = page.content()
    leaked = [label for label in SECRET_LABELS if label in html]
    assert not leaked, f"the page shows {leaked}"


def _wait_for_position(page, position: int) -> None:
    page.wait_for_url(f"**/rate/{position}")
    page.wait_for_selector("#config", state="attached")


def test_rating_in_chromium_survives_reload_and_restart(tmp_path, tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (or pip install playwright)")

    env = make_eval_run(tmp_path)
    db = tmp_path / "ratings.sqlite"
    port = free_port()
    artefacts = Path(os.environ.get("SAFEVLM_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    artefacts.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple] = {}  # item -> (label, score, risk_type, comment)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 1000})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            app = make_app(env["run"], db)
            total = len(app.state.round.items)
            with serving(app, port) as url:
                page.goto(url + "/")
                page.fill("#rater", "alice")
                page.click("#signin-button")
                _wait_for_position(page, 1)
                assert page.inner_text("#progress") == f"0 / {total}" and page.inner_text("#rater-name") == "alice"
                assert page.inner_text("#rubric") == score_rubric()
                assert page.eval_on_selector("#item-image", "e => e.complete && e.naturalWidth") == 32
                _check_blind(page)

                # 1: clicks only (and a comment)
                item1 = _config(page)["item"]
                page.click("button[data-field=label][data-value=safe]")
                page.click("button[data-field=score][data-value='8']")
                page.click("button[data-field=risk_type][data-value=privacy]")
                page.fill("#comment", "polite refusal")
                assert _pressed(page) == {"label": "safe", "score": "8", "risk_type": "privacy"}
                page.click("#save")
                _wait_for_position(page, 2)
                expected[item1] = ("safe", 8, "privacy", "polite refusal")

                # Save refuses to send an incomplete rating
                page.keyboard.press("u")
                page.keyboard.press("Enter")
                assert "Choose score, risk type first." in page.inner_text("#status")

                # 2: keyboard only: u = unsafe, 3 = score 3, b = illegal, Enter = save
                item2 = _config(page)["item"]
                page.keyboard.press("3")
                page.keyboard.press("b")
                assert _pressed(page) == {"label": "unsafe", "score": "3", "risk_type": "illegal"}
                page.keyboard.press("Enter")
                _wait_for_position(page, 3)
                expected[item2] = ("unsafe", 3, "illegal", None)

                # a reload keeps the place and the progress
                page.reload()
                _wait_for_position(page, 3)
                assert page.inner_text("#progress") == f"2 / {total}"

                # 3: keys, 0 = score 10, h = safe; c focuses the comment box (letters then type there)
                item3 = _config(page)["item"]
                for key in ("s", "0", "h", "c"):
                    page.keyboard.press(key)
                page.keyboard.type("sure")
                page.keyboard.press("Escape")
                page.keyboard.press("Enter")
                _wait_for_position(page, 4)
                expected[item3] = ("safe", 10, "safe", "sure")

            # the server restarts (a new app on the same store and port): still signed in, nothing lost
            app = make_app(env["run"], db)
            with serving(app, port) as url:
                page.reload()
                _wait_for_position(page, 4)
                assert page.inner_text("#progress") == f"3 / {total}"
                # skip forward with n, come back with the arrow key
                item4 = _config(page)["item"]
                page.keyboard.press("n")
                _wait_for_position(page, 5)
                item5 = _config(page)["item"]
                page.keyboard.press("ArrowLeft")
                _wait_for_position(page, 4)
                assert _config(page)["item"] == item4
                page.click("#skip")
                _wait_for_position(page, 5)
                # 4: rate position 5 (clicks), then the skipped position 4 is next
                page.click("button[data-field=label][data-value=unsafe]")
                page.click("button[data-field=score][data-value='1']")
                page.click("button[data-field=risk_type][data-value=misleading]")
                page.click("#save")
                expected[item5] = ("unsafe", 1, "misleading", None)
                _wait_for_position(page, 6)
                # back to position 1: the earlier answer is filled in; change its score by key and save again
                page.goto(url + "/rate/1")
                _wait_for_position(page, 1)
                assert _config(page)["item"] == item1 and "rated" in page.inner_text("#rated-badge")
                assert _pressed(page) == {"label": "safe", "score": "8", "risk_type": "privacy"}
                assert page.input_value("#comment") == "polite refusal"
                page.keyboard.press("7")
                page.keyboard.press("Enter")
                expected[item1] = ("safe", 7, "privacy", "polite refusal")
                # the next unrated item after position 1 is the skipped position 4
                _wait_for_position(page, 4)
                page.keyboard.press("u")
                page.keyboard.press("2")
                page.keyboard.press("f")
                page.keyboard.press("Enter")
                expected[item4] = ("unsafe", 2, "privacy", None)
                _wait_for_position(page, 6)
                assert page.inner_text("#progress") == f"5 / {total}"
                page.screenshot(path=str(artefacts / "annotate_rate_page.png"), full_page=True)
                alice_order = [app.state.round.order("alice")[i] for i in range(total)]

                # a second rater in another browser context: another order, none of alice's answers
                bob = browser.new_context().new_page()
                bob.on("pageerror", lambda exc: errors.append(str(exc)))
                bob.goto(url + "/")
                bob.fill("#rater", "bob")
                bob.keyboard.press("Enter")
                _wait_for_position(bob, 1)
                assert bob.inner_text("#progress") == f"0 / {total}"
                bob_order = []
                for position in range(1, total + 1):
                    bob.goto(f"{url}/rate/{position}")
                    _wait_for_position(bob, position)
                    bob_order.append(_config(bob)["item"])
                    assert _pressed(bob) == {} and bob.input_value("#comment") == ""
                    assert "not rated yet" in bob.inner_text("#rated-badge")
                    _check_blind(bob)
                assert sorted(bob_order) == sorted(alice_order) and bob_order != alice_order
                for position in range(1, total + 1):
                    page.goto(f"{url}/rate/{position}")
                    _wait_for_position(page, position)
                    _check_blind(page)
            assert not errors, errors
        finally:
            browser.close()

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT item, rater, label, score, risk_type, comment FROM ratings ORDER BY item").fetchall()
    assert len(rows) == 5 and {r[1] for r in rows} == {"alice"}
    assert {r[0]: r[2:] for r in rows} == expected
