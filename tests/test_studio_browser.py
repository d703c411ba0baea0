"""The studio in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's chromedriver
(installed by `make browser`, which `make test` runs). Each test does what a person does on one tab and saves a
screenshot under test-artifacts/studio/ to look at."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.studio_fixtures import ROOT, Server, build_env, make_app

SHOTS = ROOT / "test-artifacts" / "studio"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template_db):
    env = build_env(tmp_path_factory.mktemp("studio-browser"), mlflow_template_db)
    app = make_app(env)
    with Server(app) as s:
        s.env = env
        yield s
    app.state.jobs.shutdown()


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        raise RuntimeError(
            "Chromium and chromedriver are needed: run `make browser` (Debian packages chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1400,1100",
        "--mute-audio",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def until(driver, condition, timeout: float = 120.0):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "timeout.png"))  # what the page showed when the wait gave up
        error = driver.find_element("id", "error")
        raise AssertionError(
            f"timed out; the page says: {error.text if error.is_displayed() else '(no error)'}; "
            f"see {SHOTS / 'timeout.png'}"
        ) from None


def no_error(driver) -> None:
    box = driver.find_element("id", "error")
    assert not box.is_displayed(), box.text


def open_tab(driver, server, tab: str) -> None:
    driver.get(server.url + "/")
    until(driver, lambda d: d.execute_script("return document.readyState") == "complete")
    driver.find_element("css selector", f".tab[data-tab='{tab}']").click()


def plays(driver, audio) -> bool:
    """Start the element and see its clock move (or reach the end)."""
    driver.set_script_timeout(10)
    return driver.execute_async_script(
        """const a = arguments[0]; const done = arguments[arguments.length - 1];
        a.muted = true; const t0 = a.currentTime;
        a.play().then(() => setTimeout(() => done(a.ended || a.currentTime > t0), 600)).catch(e => done(String(e)));""",
        audio,
    )


def test_steer_with_compare_and_play_both_takes(browser, server):
    open_tab(browser, server, "steer")
    until(browser, lambda d: d.find_elements("css selector", "#sliders input[type=range]"))
    browser.find_element("name", "duration").clear()
    browser.find_element("name", "duration").send_keys("1")
    browser.find_element("id", "compare").click()
    until(browser, lambda d: len(d.find_elements("css selector", ".take audio")) == 2)
    no_error(browser)
    audios = browser.find_elements("css selector", ".take audio")
    until(browser, lambda d: all(d.execute_script("return arguments[0].readyState", a) >= 2 for a in audios), 30)
    for audio in audios:
        assert plays(browser, audio) is True
    trace = browser.find_element("css selector", "canvas.trace")
    assert trace.get_attribute("data-drawn") == "1"
    assert browser.find_element("css selector", "canvas.heatmap").get_attribute("data-drawn") == "1"
    titles = [h.text.lower() for h in browser.find_elements("css selector", ".take h3")]
    assert titles[:2] == ["unsteered", "steered"]
    browser.save_screenshot(str(SHOTS / "steer.png"))


def test_listen_to_an_uploaded_clip(browser, server):
    open_tab(browser, server, "listen")
    browser.find_element("css selector", "#listen-form input[type=file]").send_keys(str(server.env.clip_wav))
    browser.find_element("css selector", "#listen-form button[type=submit]").click()
    reading = until(browser, lambda d: d.find_elements("css selector", ".reading[data-trait='drums']"))[0]
    assert "the probes read" in reading.text
    assert "independent drums detector" in browser.find_element("css selector", ".reading.detector").text
    no_error(browser)
    browser.save_screenshot(str(SHOTS / "listen.png"))


def test_harmonize_a_melody_and_hear_it(browser, server):
    open_tab(browser, server, "harmonize")
    browser.find_element("css selector", "#harmonize-form input[type=file]").send_keys(str(server.env.melody_mid))
    steps = browser.find_element("css selector", "#harmonize-form input[name=steps]")
    steps.clear()
    steps.send_keys("16")
    browser.find_element("css selector", "#harmonize-form button[type=submit]").click()
    roll = until(browser, lambda d: d.find_elements("css selector", "#chorale canvas.roll"))[0]
    assert roll.get_attribute("data-drawn") == "1"
    no_error(browser)
    audio = browser.find_element("css selector", "#chorale audio")
    until(browser, lambda d: d.execute_script("return arguments[0].readyState", audio) >= 2, 30)
    assert plays(browser, audio) is True
    links = {a.text for a in browser.find_elements("css selector", "#chorale .downloads a")}
    assert {"MIDI", "MusicXML", "WAV"} <= links
    browser.save_screenshot(str(SHOTS / "harmonize.png"))


def test_a_bad_upload_is_one_sentence_on_the_page(browser, server, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio" * 50)
    open_tab(browser, server, "listen")
    browser.find_element("css selector", "#listen-form input[type=file]").send_keys(str(junk))
    browser.find_element("css selector", "#listen-form button[type=submit]").click()
    box = until(
        browser, lambda d: d.find_element("id", "error") if d.find_element("id", "error").is_displayed() else None, 30
    )
    assert "not audio" in box.text and "Traceback" not in box.text and "\n" not in box.text


def test_browse_the_data_and_play_a_clip(browser, server):
    open_tab(browser, server, "data")
    browser.find_element("css selector", "#data-form select[name=split]").send_keys("train")
    browser.find_element("css selector", "#data-form button[type=submit]").click()
    rows = until(browser, lambda d: d.find_elements("css selector", "#clips tbody tr"))
    assert len(rows) == 4 and "4 clips match" in browser.find_element("id", "clips-count").text
    rows[0].find_element("css selector", "button").click()
    player = browser.find_element("id", "clip-player")
    until(browser, lambda d: d.execute_script("return arguments[0].currentTime", player) > 0, 30)
    browser.save_screenshot(str(SHOTS / "data.png"))


def test_promote_through_the_gates_with_a_confirm_step(browser, server):
    from generation.session import GenerationSession
    from registry.registration import register_dir
    from registry.store import Registry, Settings
    from tests.model_fixtures import probe_set_for

    # a second drums probe set for the same generator, registered as challenger
    session = GenerationSession(None, params=str(server.env.params_path), tracking_uri=server.env.tracking_uri)
    better = server.env.root / "probes-better"
    probe_set_for(session.generator, "drums", 0.95, 7).save(better)
    reg = Registry(Settings.load(server.env.params_path, tracking_uri=server.env.tracking_uri))
    version = register_dir(reg, better, "probe_set", trait="drums").version
    open_tab(browser, server, "registry")
    button = until(
        browser,
        lambda d: d.find_elements(
            "css selector", f"button[data-model='smitin-probes-drums'][data-version='{version}']"
        ),
    )[0]
    button.click()
    dialog = until(
        browser,
        lambda d: (
            d.find_element("id", "promote-dialog") if d.find_element("id", "promote-dialog").is_displayed() else None
        ),
        30,
    )
    assert "Promote smitin-probes-drums" in dialog.text and "ok: metrics" in dialog.text
    browser.save_screenshot(str(SHOTS / "registry-confirm.png"))
    browser.find_element("id", "promote-confirm").click()
    until(
        browser,
        lambda d: any(
            "champion" in row.text and f"v{version}" in row.text for row in d.find_elements("css selector", ".model tr")
        ),
        30,
    )
    no_error(browser)
    browser.save_screenshot(str(SHOTS / "registry.png"))
    time.sleep(0.1)
