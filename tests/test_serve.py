"""``ddpm serve``: the page in a real browser, the API's answers to bad values, the queue under
load, cancellation, memory, and the command's own mistakes."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import ddpm_in_process as cli
from ddpm.pipeline import load_pipeline
from ddpm.serve import Limits, WebServer
from ddpm.viz import read_animation

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# --- fixtures ------------------------------------------------------------------------------------


def train_tiny(folder: Path, data: Path, *extra) -> Path:
    run = folder / "run"
    r = cli("train", "--preset", "tiny", "--steps", 4, "--out", run, "--data-dir", data,
            "--checkpoint-every", 4, "--sample-every", 0, "--no-progress", *extra)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_fashion) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve"), fake_fashion)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, fake_fashion) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve-cond"), fake_fashion, "--conditional")


def start_server(source: Path, delay_s: float = 0.0, **limits) -> WebServer:
    """An in-process server on a free loopback port, loading ``source`` as 'ddpm serve' does
    (precision auto); ``delay_s`` slows each network evaluation, so that a generation lasts
    long enough to queue behind or to cancel mid-way."""
    pipe = load_pipeline(source, precision="auto")
    if delay_s:
        forward = pipe._forward

        def slow(x_t, t, y):
            time.sleep(delay_s)
            return forward(x_t, t, y)

        pipe._forward = slow
    return WebServer(pipe, str(source), Limits(**limits), port=0).start()


@pytest.fixture(scope="module")
def server(run):
    s = start_server(run)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_server(run):
    s = start_server(run, delay_s=0.02)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def conditional_server(conditional_run):
    s = start_server(conditional_run)
    yield s
    s.stop()


# --- a small HTTP client -------------------------------------------------------------------------


class Client:
    """Requests to one server over loopback, with a timeout on every read."""

    def __init__(self, url: str, timeout: float = 60.0):
        u = urlparse(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path: str) -> tuple[int, bytes, str]:
        conn = self.connect()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, body, r.getheader("content-type", "")

    def json(self, path: str) -> dict:
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def open_stream(self, body, raw: bytes | None = None):
        """POST /api/generate; the connection and the response (its body not read yet)."""
        conn = self.connect()
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", "/api/generate", body=data,
                     headers={"content-type": "application/json"})
        return conn, conn.getresponse()

    @staticmethod
    def events(response):
        """The server-sent events of a response, as (kind, data), until its end."""
        kind = None
        while line := response.readline():
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])

    def generate(self, body=None, raw: bytes | None = None) -> tuple[int, list | dict]:
        """(200, [events]) for a generation that ran, or (status, {"error": ...})."""
        conn, r = self.open_stream(body, raw)
        try:
            if r.status != 200:
                return r.status, json.loads(r.read())
            return 200, list(self.events(r))
        finally:
            conn.close()


def png_pixels(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):  # a data URL
        data = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)))


def sample_grid(tmp_path: Path, source: Path, *args) -> np.ndarray:
    out = tmp_path / f"sample-{len(list(tmp_path.iterdir()))}.png"
    r = cli("sample", source, "--out", out, "--no-progress", *args)
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(out))


def kinds(events) -> list[str]:
    return [k for k, _ in events]


# --- the API -------------------------------------------------------------------------------------


def test_page_and_model_description(server, run):
    c = Client(server.url)
    status, page, ctype = c.get("/")
    assert status == 200 and ctype.startswith("text/html") and b"Generate" in page
    info = c.json("/api/model")
    assert info["source"] == str(run) and info["image_size"] == 28 and info["channels"] == 1
    assert info["conditional"] is False and info["classes"] == []
    assert info["limits"] == {"max_images": 64, "max_steps": 100, "max_queue": 16}
    assert "dpm++" in info["samplers"] and info["defaults"]["sampler"] in info["samplers"]


def test_generation_streams_frames_then_the_grid_ddpm_sample_writes(server, run, tmp_path):
    c = Client(server.url)
    status, events = c.generate({"steps": 10, "seed": 3, "n": 4, "x0": True})
    assert status == 200
    names = kinds(events)
    assert names[0] == "queued" and names[-1] == "done" and "started" in names
    frames = [d for k, d in events if k == "frame"]
    assert frames and names.index("frame") < names.index("done")  # frames come before the end
    assert [f["step"] for f in frames] == sorted({f["step"] for f in frames})
    assert frames[-1]["step"] == 10 and all("x0" in f for f in frames)
    first = png_pixels(frames[0]["x_t"])
    assert first.shape[:2] == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)  # a 2x2 grid, as 'ddpm sample' makes
    done = events[-1][1]
    expected = sample_grid(tmp_path, run, "--n", 4, "--steps", 10, "--seed", 3)
    np.testing.assert_array_equal(png_pixels(done["grid"]), expected)
    # the downloads: the same grid, and a GIF of the denoising ending in it (x_t | x0, scale 2)
    status, png, ctype = c.get(done["png"])
    assert status == 200 and ctype == "image/png"
    np.testing.assert_array_equal(png_pixels(png), expected)
    status, gif, ctype = c.get(done["gif"])
    assert status == 200 and ctype == "image/gif"
    path = tmp_path / "d.gif"
    path.write_bytes(gif)
    animation = read_animation(path)
    assert len(animation) == 11  # x_T, the 9 states between, and the output
    h, w = expected.shape[:2]
    last = animation[-1][..., 0]  # a grey GIF; the PNG grid is RGB with three equal channels
    np.testing.assert_array_equal(last[:2 * h:2, :2 * w:2], expected[..., 0])  # x_t, scale 2


def test_sampler_and_class_requests_equal_ddpm_sample(conditional_server, conditional_run,
                                                       tmp_path):
    c = Client(conditional_server.url)
    info = c.json("/api/model")
    assert info["conditional"] and len(info["classes"]) == 10
    status, events = c.generate({"steps": 5, "seed": 7, "n": 3, "class": 4, "guidance": 2,
                                 "sampler": "dpm++"})
    assert status == 200 and events[-1][0] == "done"
    expected = sample_grid(tmp_path, conditional_run, "--n", 3, "--steps", 5, "--seed", 7,
                           "--class", 4, "--guidance", 2, "--sampler", "dpm++")
    np.testing.assert_array_equal(png_pixels(events[-1][1]["grid"]), expected)
    # a class by name, and every class in turn (the empty class)
    name = info["classes"][4]
    assert c.generate({"steps": 5, "seed": 7, "n": 3, "class": name, "guidance": 2,
                       "sampler": "dpm++"})[1][-1][1]["grid"] == events[-1][1]["grid"]
    status, events = c.generate({"steps": 3, "seed": 1, "n": 2, "class": ""})
    expected = sample_grid(tmp_path, conditional_run, "--n", 2, "--steps", 3, "--seed", 1)
    np.testing.assert_array_equal(png_pixels(events[-1][1]["grid"]), expected)


def test_a_diffusers_folder_is_served(run, tmp_path):
    pytest.importorskip("diffusers", reason="pip install 'ddpm[diffusers]'")
    folder = tmp_path / "exported"
    r = cli("export", run, "--format", "diffusers", folder)
    assert r.returncode == 0, r.stderr
    s = start_server(folder)
    try:
        status, events = Client(s.url).generate({"steps": 4, "seed": 5, "n": 2})
    finally:
        s.stop()
    assert status == 200 and events[-1][0] == "done"
    expected = sample_grid(tmp_path, folder, "--n", 2, "--steps", 4, "--seed", 5)
    np.testing.assert_array_equal(png_pixels(events[-1][1]["grid"]), expected)


GOOD = {"steps": 2, "n": 1}
BAD = [  # body (or raw bytes), HTTP status, what the message must say
    ({"steps": 0}, 400, "steps must be from 1 to 100 (the model's training timesteps T), got 0"),
    ({"steps": 10**6}, 400, "steps must be from 1 to 100"),
    ({"steps": "ten"}, 400, 'steps must be a whole number, got "ten"'),
    ({"steps": 2.5}, 400, "steps must be a whole number, got 2.5"),
    ({"n": 0}, 400, "n (the number of images) must be from 1 to 64 (this server's --max-images), "
                    "got 0"),
    ({"n": 10**4}, 400, "got 10000"),
    ({"seed": -1}, 400, "seed must be from 0 to"),
    ({"sampler": "plms"}, 400, 'unknown sampler "plms"; choose one of ddpm, ddim, dpm++'),
    ({"class": 3}, 400, "class 3: this model was trained without classes; leave class empty"),
    ({"guidance": 2}, 400, "guidance 2 needs a class-conditional model"),
    ({"guidance": -1}, 400, "guidance must be a finite number >= 0, got -1"),
    ({"x0": "yes"}, 400, 'x0 must be true or false, got "yes"'),
    ({"stepz": 10}, 400, "unknown field 'stepz'; the fields are n, steps, seed"),
    ([1, 2], 400, "the request must be a JSON object"),
    (b"steps=10", 400, "the request body is not JSON"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(b)[:24] for b, _, _ in BAD])
def test_a_bad_value_gets_a_message_and_the_server_goes_on(server, body, status, message):
    c = Client(server.url)
    raw = body if isinstance(body, bytes) else None
    got, answer = c.generate(None if raw else body, raw=raw)
    assert got == status and message in answer["error"], answer
    got, events = c.generate(GOOD)
    assert got == 200 and events[-1][0] == "done"


@pytest.mark.parametrize("body,message", [
    ({"class": 10}, "class must be from 0 to 9 (this model's classes), got 10"),
    ({"class": "sandal-ish"}, 'class "sandal-ish" is not a class of this model; give an index'),
    ({"guidance": "inf"}, "guidance must be a finite number >= 0, got Infinity"),
])
def test_conditional_bad_values(conditional_server, body, message):
    c = Client(conditional_server.url)
    got, answer = c.generate(body)
    assert got == 400 and message in answer["error"], answer
    assert c.generate({**GOOD, "class": 1})[1][-1][0] == "done"


def test_other_paths_and_methods(server):
    c = Client(server.url)
    assert c.get("/api/generate")[0] == 405
    assert c.get("/nothing")[0] == 404
    status, body, _ = c.get("/api/jobs/999999/grid.png")
    assert status == 404 and b"generate it again" in body


# --- the queue, cancellation and memory -----------------------------------------------------------


def test_eight_concurrent_requests_complete_in_queue_order(slow_server):
    c = Client(slow_server.url, timeout=120)
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        time.sleep(0.05 * i)  # arrive in order i, while the first ones still run
        conn, r = c.open_stream({"steps": 10, "n": 2, "seed": i})
        events = []
        try:
            for kind, data in c.events(r):
                events.append((kind, data, time.monotonic()))
        finally:
            conn.close()
        results[i] = {"job": events[0][1]["job"], "events": events}

    with ThreadPoolExecutor(max_workers=8) as pool:  # a bounded client: 8 at once
        for f in [pool.submit(one, i) for i in range(8)]:
            f.result(timeout=120)
    jobs = [results[i]["job"] for i in range(8)]
    assert jobs == sorted(jobs)  # admitted in the order they came
    ends = [results[i]["events"][-1] for i in range(8)]
    assert all(kind == "done" for kind, _, _ in ends)
    assert [t for _, _, t in ends] == sorted(t for _, _, t in ends)  # finished in that order
    # the last one waited behind others, told each time one ahead of it started, then started
    names = [k for k, _, _ in results[7]["events"]]
    waits = [d["ahead"] for k, d, _ in results[7]["events"] if k == "queued"]
    assert waits[0] >= 2 and waits == list(range(waits[0], 0, -1))
    assert names[len(waits)] == "started"
    status = Client(slow_server.url).json("/api/status")
    assert status["running"] is None and status["waiting"] == []


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_cancelled_request_frees_its_slot(slow_server):
    c = Client(slow_server.url)
    before = c.json("/api/status")["ended"]
    # A runs (100 steps of 20 ms: 2 s at least), B waits behind it; B's page closes, then A's.
    conn_a, r_a = c.open_stream({"steps": 100, "n": 8})
    a_events = c.events(r_a)
    while next(a_events)[0] != "frame":
        pass
    conn_b, r_b = c.open_stream({"steps": 100, "n": 8})
    b_events = c.events(r_b)
    kind, data = next(b_events)
    assert kind == "queued" and data["ahead"] == 1
    conn_b.close()
    wait_for(lambda: c.json("/api/status")["waiting"] == [])
    conn_a.close()
    started = time.monotonic()
    wait_for(lambda: c.json("/api/status")["running"] is None)
    freed_s = time.monotonic() - started
    status = c.json("/api/status")
    assert status["ended"].get("cancelled", 0) == before.get("cancelled", 0) + 2
    assert status["ended"].get("done", 0) == before.get("done", 0)  # neither ran to its end
    assert freed_s < 5.0  # a step or two, not the 1.9 s left of A's 100 steps (loose: CI)
    got, events = c.generate(GOOD)  # the slot is free
    assert got == 200 and events[-1][0] == "done"


def test_a_full_queue_refuses_and_a_failed_generation_is_said(run):
    server = start_server(run, delay_s=0.02, max_queue=1)
    c = Client(server.url)
    pipe = server.engine.pipe
    try:
        conn_a, r_a = c.open_stream({"steps": 100, "n": 2})  # runs for 2 s at least
        a_events = c.events(r_a)
        assert next(a_events)[0] == "queued" and next(a_events)[0] == "started"
        conn_b, r_b = c.open_stream({"steps": 2, "n": 1})  # waits: the one place in the queue
        assert next(c.events(r_b)) == ("queued", {"job": 2, "ahead": 1})
        got, answer = c.generate({"steps": 2, "n": 1})
        assert got == 503 and "1 generations are waiting already (this server's --max-queue)" \
            in answer["error"]
        conn_a.close()
        conn_b.close()
        wait_for(lambda: c.json("/api/status")["running"] is None)

        forward = pipe._forward

        def broken(x_t, t, y):  # the machine fails mid-way (e.g. out of memory)
            raise RuntimeError("out of memory (a test)")

        pipe._forward = broken
        got, events = c.generate({"steps": 3, "n": 1})
        assert got == 200 and events[-1][0] == "error"
        assert events[-1][1]["error"] == ("the generation failed: RuntimeError: out of memory "
                                          "(a test)")
        pipe._forward = forward
        got, events = c.generate({"steps": 3, "n": 1})  # and the server goes on
        assert got == 200 and events[-1][0] == "done"
        assert c.json("/api/status")["ended"] == {"cancelled": 2, "failed": 1, "done": 1}
    finally:
        server.stop()


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_load_on_the_real_command_and_its_memory(run):
    """'ddpm serve' itself: 8 concurrent requests of the most it allows (64 images, T steps)
    after one to warm it up; its resident memory may grow by what it keeps for download
    (Limits.keep_bytes, 64 MiB) and 64 MiB more (allocator pools and the threads' arenas)."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+)", line).group(1)
        c = Client(url, timeout=300)
        big = {"n": 64, "steps": 100, "x0": True}
        assert c.generate(big)[1][-1][0] == "done"
        before = rss_bytes(proc.pid)
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda i: c.generate({**big, "seed": i}), range(8)))
        assert all(status == 200 and events[-1][0] == "done" for status, events in results)
        jobs = [events[0][1]["job"] for _, events in results]
        assert len(set(jobs)) == 8
        grown = rss_bytes(proc.pid) - before
        kept = c.json("/api/status")["kept_bytes"]
        assert kept <= Limits().keep_bytes
        assert grown < Limits().keep_bytes + 64 * 2**20, f"grew by {grown / 2**20:.0f} MiB"
        print(f"server memory: {before / 2**20:.0f} MiB after one request, grew by "
              f"{grown / 2**20:.1f} MiB over 8 more; {kept / 2**20:.1f} MiB kept for download")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- the command ---------------------------------------------------------------------------------


def test_command_mistakes_are_one_line(run, tmp_path):
    cases = [
        ((tmp_path / "nothing",), "nothing"),
        ((run, "--max-images", 500), "--max-images 500: give 1..128"),
        ((run, "--max-steps", 1000), "--max-steps 1000: give 1..100"),
        ((run, "--port", 70000), "in [0, 65535], got 70000"),
    ]
    for args, message in cases:
        r = cli("serve", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_said(run, server):
    port = urlparse(server.url).port
    r = cli("serve", run, "--port", port)
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port 0" in r.stderr


def test_without_the_extra_the_command_names_it(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now fails
    r = cli("serve", run, "--port", 0)
    assert r.returncode == 2 and "pip install 'ddpm[serve]'" in r.stderr


def test_every_address_is_served_with_a_warning(run):
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "serve", str(run), "--host",
                             "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "http://127.0.0.1:" in line
        warning = proc.stderr.readline()
        assert "warning: --host 0.0.0.0 lets every machine" in warning
        url = re.search(r"at (http://\S+)", line).group(1)
        assert Client(url).get("/")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (bash scripts/setup.sh --test "
                    "installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,820", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def page_events(driver) -> list[dict]:
    return driver.execute_script("return window.ddpmEvents || []")


def test_the_page_in_a_browser(browser, run, tmp_path):
    """The page loads; steps 10 and seed 3 (and DPM-Solver++, and the predicted x0 shown), then
    Generate: frames arrive before the last one, and the image that appears has the pixels of
    'ddpm sample' with the same settings. The screenshot goes to $DDPM_SERVE_SCREENSHOT when set
    (the README's, taken with DDPM_SERVE_RUN=a trained run)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    source = Path(os.environ.get("DDPM_SERVE_RUN", run))
    server = start_server(source)
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sampler option"))
        assert "step" in browser.find_element(By.ID, "model").text
        Select(browser.find_element(By.ID, "sampler")).select_by_value("dpm++")
        for field, value in (("steps", 10), ("seed", 3), ("n", 16)):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(str(value))
        browser.find_element(By.ID, "x0").click()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: any(e["kind"] == "done" for e in page_events(d)))
        events = [e["kind"] for e in page_events(browser)]
        assert "frame" in events and events.index("frame") < events.index("done")
        src = browser.find_element(By.ID, "image").get_attribute("src")
        expected = sample_grid(tmp_path, source, "--n", 16, "--steps", 10, "--seed", 3,
                               "--sampler", "dpm++")
        np.testing.assert_array_equal(png_pixels(src), expected)
        assert "Done: 16 images" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "gif").get_attribute("href").endswith(".gif")
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 500
        if target := os.environ.get("DDPM_SERVE_SCREENSHOT"):
            shutil.copyfile(shot, target)

        # a bad value is said on the page, and the page goes on
        box = browser.find_element(By.ID, "steps")
        box.clear()
        box.send_keys("0")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "steps must be from 1" in d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").get_attribute("class") == "bad"
    finally:
        server.stop()


def test_leaving_or_closing_the_page_cancels_its_generation(browser, run):
    server = start_server(run, delay_s=0.05)  # 100 steps: 5 s at least
    c = Client(server.url)
    try:
        browser.get(server.url)
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.execute_script("return document.getElementById('steps').value"))
        browser.execute_script("document.getElementById('steps').value = 100;"
                               "document.getElementById('generate').click()")
        wait.until(lambda d: any(e["kind"] == "frame" for e in page_events(d)))
        assert c.json("/api/status")["running"] is not None
        browser.get("about:blank")  # the page goes (it may go to the back-forward cache)
        wait_for(lambda: c.json("/api/status")["running"] is None, timeout=4)
        assert c.json("/api/status")["ended"] == {"cancelled": 1}

        first = browser.current_window_handle  # and a tab that is closed
        browser.switch_to.new_window("tab")
        browser.get(server.url)
        wait.until(lambda d: d.execute_script("return document.getElementById('steps').value"))
        browser.execute_script("document.getElementById('steps').value = 100;"
                               "document.getElementById('generate').click()")
        wait.until(lambda d: any(e["kind"] == "frame" for e in page_events(d)))
        browser.close()
        browser.switch_to.window(first)
        wait_for(lambda: c.json("/api/status")["running"] is None, timeout=4)
        assert c.json("/api/status")["ended"] == {"cancelled": 2}
    finally:
        server.stop()
