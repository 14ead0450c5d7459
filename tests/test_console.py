"""The web console in a real browser against the real stack: Debian's chromium, headless,
driven by Selenium through chromedriver (`make test` installs both), a redis-server, a Celery
worker and uvicorn with the demo model (benchmarks.stack.Stack), two API keys.

Each test works the page as a person would (sign in, pick, type, click) and checks what it
shows against the API's own answer for the same job. Screenshots of every page are kept under
pytest's tmp path and copied to tests/artifacts/console/ for people to look at.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from benchmarks.stack import Stack, free_port
from service.up import DEMO_BUNDLE, DEMO_BUNDLES, api_command, register_bundle, worker_command

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
STATIC = ROOT / "service" / "console" / "static"
ADMIN, USER = "console-admin-key", "console-user-key"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]
WIDTH = 1280


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"SMOOTHCERT_ADMIN_KEYS": ADMIN, "SMOOTHCERT_API_KEYS": USER}
    with Stack(tmp_path_factory.mktemp("console-logs"), device="cpu", env=env) as stack:
        stack.worker("worker", worker_command("console@%h"), OMP_NUM_THREADS="1")
        stack.api(workers=1)
        yield stack


@pytest.fixture(scope="module")
def url(stack):
    return stack.url


@pytest.fixture(scope="module")
def open_url(stack):
    """A second API on the same Redis with no key configured: an open API."""
    port = free_port()
    stack.spawn("api-open", api_command("127.0.0.1", port, 1),
                stack.env(SMOOTHCERT_API_KEYS="", SMOOTHCERT_ADMIN_KEYS=""))
    url = f"http://127.0.0.1:{port}"
    stack.wait(lambda: _answers(url), 60, "the open API")
    return url


def _answers(url: str) -> bool:
    try:
        return fetch(url + "/v2/health/live")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are not installed: `make test` installs them "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 f"--window-size={WIDTH},1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(30)
    yield session
    session.quit()


@pytest.fixture(scope="module")
def shot(browser, tmp_path_factory):
    """shot(name): a PNG of the whole page, in the tmp path and in tests/artifacts/console/."""
    folder = tmp_path_factory.mktemp("console-screenshots")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(name: str) -> Path:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(WIDTH, min(max(height, 600), 6000) + 120)
        path = folder / f"{name}.png"
        assert browser.save_screenshot(str(path))
        shutil.copy(path, ARTIFACTS / path.name)
        browser.set_window_size(WIDTH, 1000)
        return path

    return take


def api(url: str, path: str, key: str | None) -> tuple[int, dict, dict[str, str]]:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def fetch(url: str) -> tuple[int, bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}


def floor_text(x: float, decimals: int) -> str:
    """What the console shows for a radius: rounded down (as its floorTo computes it)."""
    scale = 10**decimals
    return f"{math.floor(x * scale) / scale:.{decimals}f}"


def wait(browser, predicate, seconds: float = 30, what: str = "the page"):
    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(
        lambda d: predicate(d), message=f"timed out waiting for {what}")


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def typed(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def csp_violations(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


def open_console(browser, url: str, key: str | None) -> None:
    """A fresh console (nothing kept from an earlier test), signed in with `key` by keyboard."""
    browser.get(url + "/v2/health/live")  # this origin, and no console script that could store a key again
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "view-signin").is_displayed(), what="the sign-in form")
    if key is not None:
        browser.find_element(By.ID, "signin-key").send_keys(key, Keys.ENTER)
        wait(browser, lambda d: d.find_element(By.ID, "view-certify").is_displayed(), what="the signed-in console")
        wait(browser, lambda d: Select(d.find_element(By.ID, "cert-model")).options, what="the model list")


def show(browser, view: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'nav button[data-view="{view}"]').send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, f"view-{view}").is_displayed(), what=f"the {view} view")


class _Html(HTMLParser):
    """Every tag with its attributes, and the text of any inline script or style."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._open = tag

    def handle_endtag(self, tag):
        self._open = None

    def handle_data(self, data):
        if self._open in ("script", "style") and data.strip():
            self.inline.append(data)


def test_pages_carry_the_policy_and_no_inline_code(url):
    for path in ("/", "/docs"):
        status, body, headers = fetch(url + path)
        assert status == 200 and headers["content-type"].startswith("text/html")
        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
        assert policy["img-src"] == "'self' data: blob:" and policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
        assert policy["form-action"] == "'self'" and policy["default-src"] == "'none'"
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
        html = _Html()
        html.feed(body.decode())
        assert not html.inline, (path, html.inline)
        for tag, attributes in html.tags:
            assert not any(name.startswith("on") or name == "style" for name in attributes), (path, tag, attributes)
            assert tag != "style"
            if tag == "script":
                assert attributes.get("src") and not re.match(r"(https?:)?//", attributes["src"]), attributes
    # The console writes what the API says as text, never as markup or code.
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, (script.name, sink)
    # The JSON API's answers are left alone: the headers are the pages'.
    assert "content-security-policy" not in {k.lower() for k in api(url, "/v1/models", USER)[2]}


def test_a_bad_key_is_refused_with_the_apis_own_message(browser, url, shot):
    open_console(browser, url, None)
    shot("00-sign-in")
    browser.find_element(By.ID, "signin-key").send_keys("not-a-key", Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "signin-error").text, what="the error")
    status, body, _ = api(url, "/v1/models", "not-a-key")
    assert status == 401
    assert text(browser, "signin-error") == f"401 {body['error']['code']}: {body['error']['message']}"
    assert browser.find_element(By.ID, "view-signin").is_displayed()
    assert not browser.find_element(By.ID, "nav").is_displayed()
    assert browser.execute_script("return sessionStorage.length + localStorage.length") == 0
    shot("01-sign-in-refused")


def test_an_open_api_needs_no_key(browser, open_url):
    browser.get(open_url + "/v2/health/live")
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(open_url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "view-certify").is_displayed(), what="the console")
    assert text(browser, "who") == "Open API: no key needed"
    assert not browser.find_element(By.ID, "sign-out").is_displayed()
    assert not browser.find_element(By.ID, "view-signin").is_displayed()
    wait(browser, lambda d: "digits" in [o.text for o in Select(d.find_element(By.ID, "cert-model")).options],
         what="the model list")


def test_certify_an_example_end_to_end(browser, url, shot):
    open_console(browser, url, USER)
    assert text(browser, "who") == "Signed in with an API key"
    Select(browser.find_element(By.ID, "cert-model")).select_by_visible_text("digits")
    Select(browser.find_element(By.ID, "example")).select_by_visible_text("digit-7.png")
    wait(browser, lambda d: "fits the model" in d.find_element(By.ID, "input-note").text, what="the preview")
    assert "0.12" in text(browser, "sigma-range") and "SMOOTHCERT_MAX_N" in text(browser, "limits")
    typed(browser, "n", "2000")
    shot("02-certify-form")
    browser.find_element(By.ID, "certify-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "certificate").is_displayed(), 60, "the certificate")
    job_id = text(browser, "cert-job-title").removeprefix("Job ")
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert browser.find_element(By.CSS_SELECTOR, "#cert-job .job-status").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.CSS_SELECTOR, "#cert-job progress").get_attribute("value") == "1"

    status, job, _ = api(url, f"/v1/certifications/{job_id}", USER)
    assert status == 200 and job["status"] == "succeeded" and job["request"]["n"] == 2000
    result = job["result"]
    assert not result["abstained"] and result["radius"] > 0
    assert text(browser, "cert-class") == f"{result['prediction']} (label “{result['label']}”)"
    assert text(browser, "cert-radius") == floor_text(result["radius"], 4)
    assert text(browser, "cert-sigma") == str(result["sigma"]) and text(browser, "cert-n") == "2,000"
    assert text(browser, "cert-memory") == "not used"
    assert text(browser, "cert-guarantee") == result["guarantee"]["statement"]
    assert f"{result['seed']} (chosen by the server)" in text(browser, "cert-fields")  # 63 bits, exactly
    votes = text(browser, "cert-votes-text")
    assert f"{result['n_a']:,} of 2,000" in votes and floor_text(result["p_a_lower"], 6) in votes
    pictures = browser.find_elements(By.CSS_SELECTOR, "#cert-samples canvas")
    assert len(pictures) == 6 and "Illustration" in text(browser, "cert-caption")
    # The key stays in this tab's sessionStorage: never in the URL, never in localStorage.
    assert USER not in browser.current_url
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.execute_script("return sessionStorage.getItem('smoothcert.key')") == USER
    assert not csp_violations(browser)
    shot("03-certificate")

    show(browser, "jobs")
    row = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]'), what="the job row")
    wait(browser, lambda d: row.find_element(By.CLASS_NAME, "job-state").text.startswith("succeeded"),
         what="the job's status")
    assert row.find_element(By.CLASS_NAME, "job-state").text == (
        f"succeeded: class {result['prediction']}, radius {floor_text(result['radius'], 4)}")
    shot("04-my-jobs")


def test_a_sigma_selector_chooses_sigma_itself(browser, url, stack, shot):
    register_bundle(stack.store(), DEMO_BUNDLES[2])  # mnist-selector
    open_console(browser, url, USER)
    Select(browser.find_element(By.ID, "cert-model")).select_by_visible_text("mnist-selector")
    wait(browser, lambda d: "σ selector" in d.find_element(By.ID, "sigma-range").text, what="the selector note")
    for control in ("sigma", "sigma-search", "memory"):
        assert not browser.find_element(By.ID, control).is_enabled(), control
    assert not browser.find_element(By.ID, "memory").is_selected()
    Select(browser.find_element(By.ID, "example")).select_by_visible_text("mnist-3.png")
    wait(browser, lambda d: "fits the model" in d.find_element(By.ID, "input-note").text, what="the preview")
    typed(browser, "n", "1000")
    browser.find_element(By.ID, "certify-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "certificate").is_displayed(), 60, "the certificate")
    job_id = text(browser, "cert-job-title").removeprefix("Job ")
    _, job, _ = api(url, f"/v1/certifications/{job_id}", USER)
    result, sel = job["result"], job["result"]["selector"]
    assert job["request"]["sigma"] is None and job["request"]["memory"] is False
    assert result["prediction"] == 3 and result["guarantee"]["scope"] == "selector"
    chosen = sel["sigmas"][sel["sigma_index"]]  # the console prints numbers as JavaScript does: 1, not 1.0
    assert text(browser, "cert-selector").startswith(f"chose σ = {chosen:g} of ")
    assert text(browser, "cert-guarantee") == result["guarantee"]["statement"]
    assert not csp_violations(browser)
    shot("03b-selector-certificate")


def test_a_memory_answer_names_its_root(browser, url, shot):
    open_console(browser, url, USER)
    Select(browser.find_element(By.ID, "example")).select_by_visible_text("digit-3.png")
    browser.find_element(By.ID, "sigma-search").click()
    # A σ search turns the shared memory on: α from its levels, and the service draws the seed.
    assert browser.find_element(By.ID, "memory").is_selected()
    assert not browser.find_element(By.ID, "seed").is_enabled()
    assert not browser.find_element(By.ID, "sigma").is_enabled()
    levels = [o.text for o in Select(browser.find_element(By.ID, "alpha-level")).options]
    assert levels == ["0.001", "0.01", "0.05"] and not browser.find_element(By.ID, "alpha").is_displayed()
    assert "n ≥ 1,000" in text(browser, "limits")
    typed(browser, "n", "1000")
    browser.find_element(By.ID, "certify-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "certificate").is_displayed(), 90, "the certificate")
    job_id = text(browser, "cert-job-title").removeprefix("Job ")
    status, job, _ = api(url, f"/v1/certifications/{job_id}", USER)
    assert status == 200 and job["status"] == "succeeded" and job["request"]["sigma_search"]["method"] == "ddrs"
    result, memory = job["result"], job["result"]["memory"]
    assert memory["used"] and result["guarantee"]["scope"] == "memory"
    assert text(browser, "cert-memory").startswith(
        f"{memory['outcome']}; root entry {memory['root']} (job {memory['root_job']})")
    assert text(browser, "cert-radius") == floor_text(result["radius"], 4)
    assert text(browser, "cert-guarantee") == result["guarantee"]["statement"]
    shot("05-memory-certificate")


def bundle_copy(folder: Path) -> Path:
    """The demo bundle under another name, one label written as markup (it must show as text)."""
    spec = json.loads((DEMO_BUNDLE / "model.json").read_text())
    spec["name"] = "digits-copy"
    spec["labels"][0] = '<img src="x" id="injected">'
    path = folder / "digits-copy.zip"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("model.json", json.dumps(spec))
        zf.write(DEMO_BUNDLE / "weights.pt", "weights.pt")
    path.write_bytes(out.getvalue())
    return path


def test_an_admin_uploads_and_deletes_a_model(browser, url, shot, tmp_path):
    open_console(browser, url, USER)  # then out, and in again as the admin
    browser.find_element(By.ID, "sign-out").click()
    wait(browser, lambda d: d.find_element(By.ID, "view-signin").is_displayed(), what="the sign-in form")
    assert browser.execute_script("return sessionStorage.length") == 0
    browser.find_element(By.ID, "signin-key").send_keys(ADMIN, Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "nav").is_displayed(), what="the signed-in console")
    show(browser, "models")
    browser.find_element(By.ID, "upload-bundle").send_keys(str(bundle_copy(tmp_path)))
    browser.find_element(By.CSS_SELECTOR, "#upload-form button").click()
    wait(browser, lambda d: d.find_element(By.ID, "admin-status").text, 30, "the upload")
    status, model, _ = api(url, "/v1/models/digits-copy", ADMIN)
    assert status == 200
    assert text(browser, "admin-status") == f"Uploaded digits-copy ({model['digest']})."
    wait(browser, lambda d: "digits-copy" in d.find_element(By.ID, "models-table").text, what="the new row")
    assert '<img src="x" id="injected">' in text(browser, "models-table")  # shown as text
    assert not browser.find_elements(By.ID, "injected")
    shot("06-models-uploaded")

    Select(browser.find_element(By.ID, "delete-model")).select_by_visible_text("digits-copy")
    browser.find_element(By.CSS_SELECTOR, "#delete-form button").click()  # not confirmed: refused here
    wait(browser, lambda d: d.find_element(By.ID, "admin-error").text, what="the confirmation request")
    assert api(url, "/v1/models/digits-copy", ADMIN)[0] == 200
    browser.find_element(By.ID, "delete-confirm").click()
    browser.find_element(By.CSS_SELECTOR, "#delete-form button").click()
    wait(browser, lambda d: d.find_element(By.ID, "admin-status").text.startswith("Deleted"), what="the deletion")
    assert text(browser, "admin-status") == f"Deleted digits-copy ({model['digest']})."
    assert api(url, "/v1/models/digits-copy", ADMIN)[0] == 404
    wait(browser, lambda d: "digits-copy" not in d.find_element(By.ID, "models-table").text, what="the row to go")
    shot("07-models-deleted")


def test_an_evaluation_draws_its_curve(browser, url, shot):
    open_console(browser, url, USER)
    show(browser, "evaluate")
    assert browser.find_element(By.ID, "eval-builtin").is_selected()
    typed(browser, "eval-n", "1000")
    shot("08-evaluate-form")
    browser.find_element(By.ID, "evaluate-submit").click()
    curve = wait(browser, lambda d: (img := d.find_element(By.ID, "eval-curve")).is_displayed()
                 and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) and img,
                 90, "the curve")
    job_id = text(browser, "eval-job-title").removeprefix("Job ")
    status, job, _ = api(url, f"/v1/evaluations/{job_id}", USER)
    assert status == 200 and job["status"] == "succeeded"
    summary = job["result"]
    assert text(browser, "eval-count") == str(summary["count"]) == "10"
    assert text(browser, "eval-clean") == f"{floor_text(100 * summary['clean_accuracy'], 1)} %"
    assert text(browser, "eval-acr") == floor_text(summary["acr"], 4)
    rows = browser.find_elements(By.CSS_SELECTOR, "#eval-table tbody tr")
    assert len(rows) == len(summary["certified_accuracy"])
    assert curve.get_attribute("src").startswith("blob:") and "Certified accuracy" in curve.get_attribute("alt")
    assert not csp_violations(browser)
    shot("09-evaluation")


def test_the_api_page_renders_with_no_network(browser, url, shot):
    _, spec, _ = api(url, "/openapi.json", None)
    operations = sum(len(methods) for methods in spec["paths"].values())
    browser.get(url + "/docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations, 30, "Swagger UI")
    operation = browser.find_element(By.ID, "operations-certifications-create_certification")
    assert "create_certification" in operation.text
    # Every resource the page loaded is this server's (the machine has no other network anyway).
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(s.startswith(url) or s.startswith("data:") for s in sources), sources
    assert not csp_violations(browser)
    shot("10-api-page")
    operation.find_element(By.CSS_SELECTOR, "button").click()
    wait(browser, lambda d: "A PNG at a fixed σ" in operation.text, 10, "the operation's examples")
    shot("11-api-page-operation")
