"""``ddpm serve``: the page in a real browser, the API's answers to bad values, the queue under
load, cancellation, memory, and the command's own mistakes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.pipeline import load_pipeline
from ddpm.serve import Limits, WebServer
from ddpm.serve.engine import GIF_FRAMES
from ddpm.viz import read_animation

from conftest import Client, png_pixels, snapshot
from conftest import ddpm_in_process as cli

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
    assert info["source"] == run.name and info["image_size"] == 28 and info["channels"] == 1
    assert str(run.parent) not in page.decode() + json.dumps(info)  # no absolute path
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
    ({"guidance": -1}, 400, "guidance must be a number in [0, 100], got -1"),
    ({"x0": "yes"}, 400, 'x0 must be true or false, got "yes"'),
    ({"stepz": 10}, 400, 'unknown field "stepz"; the fields are n, steps, seed'),
    ([1, 2], 400, "the request must be a JSON object"),
    (b"steps=10", 400, "the request body is not JSON"),
    # an empty body is refused as null is: the defaults are asked for with {}
    (b"", 400, "the request must be a JSON object of some of the fields n, steps, seed, sampler, "
               "class, guidance, x0, e.g. {} for the defaults; got an empty body"),
    (b" \n", 400, "e.g. {} for the defaults; got an empty body"),
    (None, 400, "e.g. {} for the defaults; got null"),
    # numbers are JSON numbers: a string, a boolean or a fraction is not a whole number
    ({"n": "4"}, 400, 'n (the number of images) must be a whole number, got "4", a string: send '
                      'the number without quotes'),
    ({"steps": "2"}, 400, 'steps must be a whole number, got "2", a string'),
    ({"seed": "7"}, 400, 'seed must be a whole number, got "7"'),
    ({"steps": True}, 400, "steps must be a whole number, got true"),
    ({"n": 1.5}, 400, "n (the number of images) must be a whole number, got 1.5"),
    # nesting beyond the parser's depth, and a body beyond any request's size
    (b"[" * 100_000, 400, "the request body is nested too deeply; send one flat JSON object"),
    (b'{"n": ' + b"[" * 100_000, 400, "the request body is nested too deeply"),
    (b'{"n": ' + b"1" * 4000 + b"}", 400, "got 111111111111111111111111... (4,000 digits)"),
    # a seed out of range says the range, and never echoes a huge value in full
    ({"seed": 1e300}, 400, "seed must be from 0 to 9223372036854775806, got 1e+300"),
    ({"seed": 10**300}, 400, "seed must be from 0 to 9223372036854775806, got "
                             "100000000000000000000000... (301 digits)"),
    ({"seed": 2**63}, 400, "seed must be from 0 to 9223372036854775806, got 92233720368547758"),
    ({"guidance": 1e300}, 400, "guidance must be a number in [0, 100], got 1e+300"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(b)[:24] for b, _, _ in BAD])
def test_a_bad_value_gets_a_message_and_the_server_goes_on(server, body, status, message):
    c = Client(server.url)
    raw = body if isinstance(body, bytes) else None
    got, answer = c.generate(None if raw is not None else body, raw=raw)
    assert got == status and message in answer["error"], answer
    assert len(answer["error"]) < 300, "a message repeats no huge value"
    got, events = c.generate(GOOD)
    assert got == 200 and events[-1][0] == "done"


@pytest.mark.parametrize("body,message", [
    ({"class": 10}, "class must be from 0 to 9 (this model's classes), got 10"),
    ({"class": "sandal-ish"}, 'class "sandal-ish" is not a class of this model; give an index'),
    ({"guidance": "inf"}, 'guidance must be a number in [0, 100], got "inf"'),
    ({"guidance": 1e300}, "guidance must be a number in [0, 100], got 1e+300"),
    ({"class": "4"}, 'class "4" is not a class of this model; give an index 0..9 as a number'),
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


# --- who may use the server: its Host, the Origin of a page, JSON only ----------------------------


def test_only_requests_addressed_to_the_server_are_served(server):
    """A page on another site that points its own name at 127.0.0.1 (DNS rebinding) sends its
    own name as Host: refused, for reading as for generating."""
    c = Client(server.url)
    before = c.json("/api/status")
    port = urlparse(server.url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"):
        assert c.request("GET", "/api/model", headers={"Host": host})[0] == 200, host
    for host in ("evil.example.com", f"evil.example.com:{port}", f"localhost:{port + 1}",
                 "127.0.0.1", f"localhost.evil.example:{port}", f"127.0.0.1:{port}@evil.example",
                 "[::1]"):
        for method, path in (("GET", "/api/model"), ("GET", "/"), ("POST", "/api/generate")):
            status, body, _ = c.request(method, path, b"{}", {
                "Host": host, "Content-Type": "application/json"})
            error = json.loads(body)["error"]
            assert status == 421 and "is not this server's address" in error, (host, body)
            assert f"it answers only to {server.url}" in error
    assert c.json("/api/status") == before, "a refused request started nothing"


def test_another_sites_page_cannot_start_a_generation(server):
    c = Client(server.url)
    before = c.json("/api/status")
    own = server.url.rstrip("/")
    json_type = {"Content-Type": "application/json"}
    refused = [  # headers, status, what the message must say
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403,
         'a page from "http://evil.example" may not use this server; open ' + server.url),
        ({"Origin": "http://evil.example", **json_type}, 403, "may not use this server"),
        ({"Origin": "null", **json_type}, 403, 'a page from "null" may not use this server'),
        ({"Origin": own.replace("http:", "https:"), **json_type}, 403, "may not use this server"),
        ({"Origin": own + "0", **json_type}, 403, "may not use this server"),
        ({"Content-Type": "text/plain"}, 415, "send the settings as JSON with Content-Type: "
                                               'application/json, not "text/plain"'),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json, not"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415, "application/json, not"),
        ({}, 415, "application/json, not none"),
    ]
    for headers, status, message in refused:
        got, body, _ = c.request("POST", "/api/generate", b'{"steps": 2, "n": 1}', headers)
        assert got == status and message in json.loads(body)["error"], (headers, body)
    assert c.json("/api/status") == before, "a refused request started nothing"
    # the server's own page (its Origin) and a script (no Origin) are served
    for headers in ({"Origin": own, **json_type}, json_type,
                    {"Content-Type": "application/json; charset=utf-8"}):
        got, body, _ = c.request("POST", "/api/generate", b'{"steps": 2, "n": 1}', headers)
        assert got == 200 and b"event: done" in body, (headers, body[-300:])


# --- odd requests to the real command ------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
ODD_REQUESTS = [  # method, path, headers, body, the status and what its message must say
    ("PUT", "/api/generate", JSON, b"{}", 405, 'PUT "/api/generate" is not allowed; use POST'),
    ("DELETE", "/api/model", {}, b"", 405, 'DELETE "/api/model" is not allowed; use GET'),
    ("POST", "/api/status", JSON, b"{}", 405, 'POST "/api/status" is not allowed; use GET'),
    ("GET", "/api/model/extra", {}, b"", 404, 'nothing at "/api/model/extra"; there are /, '),
    ("GET", "/api/jobs/1/grid.png/more", {}, b"", 404, 'nothing at "/api/jobs/1/grid.png/more"'),
    ("GET", "/api/jobs/1/..%2F..%2Fconfig.json", {}, b"", 404, "nothing at"),
    ("GET", "/api/jobs/" + "9" * 5000 + "/grid.png", {}, b"", 404,
     '(5,000 characters) is not among those this server keeps'),
    ("GET", "/api/jobs/-1/grid.png", {}, b"", 404, 'generation "-1" is not among those'),
    ("GET", "/api/jobs/1/" + "g" * 3000, {}, b"", 404, "is not among those this server keeps"),
    ("POST", "/api/generate?n=1000&steps=1", JSON, b"{}", 400,
     'takes its settings as a JSON body, not in the query string (got "?n=1000&steps=1")'),
    ("POST", "/api/generate", JSON, b'{"n": 1' + b"0" * 40 + b"}", 400,
     "n (the number of images) must be from 1 to 64 (this server's --max-images), got "
     "100000000000000000000000... (41 digits)"),
    ("POST", "/api/generate", JSON, b'{"steps": -5}', 400,
     "steps must be from 1 to 100 (the model's training timesteps T), got -5"),
    ("POST", "/api/generate", JSON, b'{"guidance": NaN}', 400,
     "the request body is not JSON (NaN is not a JSON number)"),
    ("POST", "/api/generate", JSON, b'{"seed": -Infinity}', 400,
     "not JSON (-Infinity is not a JSON number)"),
    ("POST", "/api/generate", JSON, b'\xff\xfe{"n": 1}', 400, "the request body is not UTF-8 text"),
    ("POST", "/api/generate", JSON, b'{"class": "unicorn"}', 400,
     'class "unicorn" is not a class of this model; give an index 0..9 as a number or a name'),
    ("POST", "/api/generate", JSON, b'{"class": 2.5}', 400, "class must be a whole number, got 2.5"),
    ("POST", "/api/generate", JSON, b'{"class": -1}', 400,
     "class must be from 0 to 9 (this model's classes), got -1"),
    ("POST", "/api/generate", JSON, json.dumps({"sampler": "x" * 10_000}).encode(), 400,
     'unknown sampler "xxxxxxxxxxxxxxxxxxxxxxx... (10,000 characters); choose one of'),
    ("POST", "/api/generate", JSON, json.dumps({"y" * 10_000: 1}).encode(), 400,
     'unknown field "yyyyyyyyyyyyyyyyyyyyyyy... (10,000 characters); the fields are n, steps'),
    ("POST", "/api/generate", JSON, b'{"n": 1' + b" " * 2**21 + b"}", 413,
     "the request body is over 1048576 bytes"),
    ("POST", "/api/generate", JSON, b'"{}"', 400, 'e.g. {} for the defaults; got "{}"'),
    ("POST", "/api/generate", JSON, b'{"x0": "false"}', 400, 'x0 must be true or false, got "false"'),
    ("POST", "/api/generate", JSON, b'{"guidance": -0.5}', 400,
     "guidance must be a number in [0, 100], got -0.5"),
    ("POST", "/api/generate", JSON, b'{"guidance": "7"}', 400,
     'guidance must be a number in [0, 100], got "7"'),
    ("POST", "/api/generate", {"Content-Type": "application/jsonp"}, b"{}", 415,
     'application/json, not "application/jsonp"'),
    ("POST", "/api/generate", {**JSON, "Origin": "null"}, b"{}", 403, 'a page from "null"'),
    ("POST", "/api/generate", {**JSON, "Origin": "https://127.0.0.1:{port}"}, b"{}", 403,
     'a page from "https://127.0.0.1:'),
    ("GET", "/api/model", {"Host": "127.0.0.1:{port}.evil.example"}, b"", 421,
     "is not this server's address"),
    ("GET", "/", {"Host": "localhost:1"}, b"", 421, 'Host "localhost:1" is not this server'),
]


@pytest.fixture(scope="module")
def served(conditional_run, tmp_path_factory):
    """'ddpm serve' itself on the conditional run, in an empty folder: its Client, its stderr
    (the server's log) and the folder."""
    folder = tmp_path_factory.mktemp("served")
    log = folder.parent / f"{folder.name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ddpm", "serve", str(conditional_run),
                                 "--port", "0"], cwd=folder, stdout=subprocess.PIPE,
                                stderr=err, text=True)
    try:
        url = re.search(r"at (http://\S+)", proc.stdout.readline()).group(1)
        yield Client(url), log, folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("method, path, headers, body, status, message", ODD_REQUESTS,
                         ids=[f"{m} {p[:40]} {str(h)[:30]} {b[:20]!r}"
                              for m, p, h, b, _, _ in ODD_REQUESTS])
def test_an_odd_request_gets_a_message_and_changes_nothing(served, conditional_run, method, path,
                                                           headers, body, status, message):
    c, log, folder = served
    before = snapshot(conditional_run), snapshot(folder), c.json("/api/status")
    logged = log.read_text()
    fill = {k: v.replace("{port}", str(c.port)) for k, v in headers.items()}
    got, answer, _ = c.request(method, path, body, fill)
    error = json.loads(answer)["error"]
    assert got == status and message.replace("{port}", str(c.port)) in error, (got, error)
    assert len(error) < 300, "a message repeats no huge value"
    after = snapshot(conditional_run), snapshot(folder), c.json("/api/status")
    assert after == before, "an odd request wrote a file or started a generation"
    assert "Traceback" not in log.read_text()[len(logged):]


ODD_COMMANDS = [  # 'ddpm serve' arguments, what its one line must say
    ("{root}/empty", "holds no checkpoints"),
    ("{root}/afile", "afile"),
    ("{root}/junk.pt", "junk.pt is not a readable ddpm checkpoint"),
    ("{root}/text.pt", "text.pt is not a readable ddpm checkpoint"),
    ("{root}/pets", "pets holds no checkpoints"),
    ("{root}/run --port -1", "argument --port: expected a number in [0, 65535], got -1"),
    ("{root}/run --port http", "argument --port: expected a whole number, got 'http'"),
    ("{root}/run --port 7860.5", "argument --port: expected a whole number, got '7860.5'"),
    ("{root}/run --port 0 --host no-such-host.invalid",
     "--host no-such-host.invalid: not an address of this machine"),
    ("{root}/run --port 0 --host ''", "--host '': not an address of this machine"),
    ("{root}/run --port 0 --host 203.0.113.7", "cannot listen on 203.0.113.7:0: Cannot assign "
                                               "requested address; choose another --host or "
                                               "--port"),
    ("{root}/run --max-queue -1", "argument --max-queue: expected a number >= 0, got -1"),
    ("{root}/run --max-images 0", "argument --max-images: expected a number >= 1, got 0"),
    ("{root}/run --max-steps 0", "argument --max-steps: expected a number >= 1, got 0"),
    ("{root}/run --max-images 1e3", "argument --max-images: expected a whole number, got '1e3'"),
    ("{root}/run --port 0 --device tpu", "unknown device 'tpu'"),
    ("{root}/run --precision fp8", "argument --precision: invalid choice: 'fp8'"),
    ("{root}/run {root}/crun", "unrecognized arguments"),
    ("", "the following arguments are required: RUN_OR_CHECKPOINT"),
]


@pytest.mark.parametrize("args, message", ODD_COMMANDS, ids=[a[:50] for a, _ in ODD_COMMANDS])
def test_an_odd_command_is_one_line_exit_2_and_changes_nothing(world, monkeypatch, args,
                                                               message):
    def serving(self):  # a command that gets this far would serve until Ctrl+C
        self.stop()
        raise AssertionError("the command served")

    monkeypatch.setattr(WebServer, "serve_forever", serving)
    before = snapshot(world)
    r = cli("serve", *shlex.split(args.format(root=world)))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "error: " in lines[0] and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert snapshot(world) == before


# --- the guidance bound ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("{root}/crun", "--guidance", "1e300"), "argument --guidance: expected a number in [0, 100], "
                                             "got 1e300"),
    (("{root}/crun", "--guidance", "100.5"), "argument --guidance: expected a number in [0, 100]"),
    (("{root}/run", "--classifier-scale", "1e300"), "argument --classifier-scale: expected a "
                                                    "number in [0, 100], got 1e300"),
])
def test_guidance_above_its_bound_is_refused_by_the_command_line(world, args, message):
    before = snapshot(world)
    r = cli("sample", *(a.format(root=world) for a in args), "--out", world / "existing.png")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert snapshot(world) == before


def test_guidance_at_its_bound_gives_finite_images(world, tmp_path):
    """Classifier-free guidance and classifier guidance both at the largest scale allowed, on
    the raw predictions (no clipping of x0): every pixel finite. Above it, Python is refused too."""
    from ddpm.config import GUIDANCE_MAX, UNetConfig
    from ddpm.noisy_classifier import load_noisy_classifier, train_noisy_classifier

    pipe = load_pipeline(world / "crun")
    small = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), norm_groups=4, dropout=0.0)
    train_noisy_classifier(None, None, tmp_path / "clf.pt", like=pipe.config, epochs=1,
                           batch_size=64, model=small, progress=False)
    classifier = load_noisy_classifier(tmp_path / "clf.pt")
    for sampler in ("ddpm", "ddim", "dpm++"):
        images = pipe.generate(4, seed=1, num_sample_steps=4, labels=3, sampler=sampler,
                               x0_transform="none", guidance=GUIDANCE_MAX,
                               classifier=classifier, classifier_scale=GUIDANCE_MAX)
        assert torch.isfinite(images).all(), sampler
    with pytest.raises(ValueError, match=r"guidance must be in \[0, 100\], got 1e\+300"):
        pipe.generate(1, num_sample_steps=2, labels=3, guidance=1e300)


# --- the queue, cancellation and memory -----------------------------------------------------------


def test_eight_concurrent_requests_complete_in_queue_order(slow_server):
    c = Client(slow_server.url, timeout=120)
    results: dict[int, dict] = {}
    admitted = [threading.Event() for _ in range(8)]

    def one(i: int) -> None:
        # arrive in order i, while the first ones still run: each waits until the one before it
        # was admitted (a fixed delay is not an order on a loaded machine)
        if i and not admitted[i - 1].wait(60):
            raise AssertionError(f"request {i - 1} was never admitted")
        conn, r = c.open_stream({"steps": 10, "n": 2, "seed": i})
        events = []
        try:
            for kind, data in c.events(r):
                events.append((kind, data, time.monotonic()))
                admitted[i].set()
        finally:
            admitted[i].set()  # a failed request does not hold the others for a minute
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
        # the engine counts a generation as ended just after its last event goes out
        wait_for(lambda: c.json("/api/status")["ended"] == {"cancelled": 2, "failed": 1,
                                                            "done": 1})
    finally:
        server.stop()


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_load_on_the_real_command_and_its_memory(run):
    """'ddpm serve' itself: 4 concurrent requests of the most it holds (64 images, with every one
    of the GIF's frames a state: GIF_FRAMES - 1 steps keep as many as T steps) after one to warm
    it up; its resident memory may grow by what it keeps for download (Limits.keep_bytes,
    64 MiB) and 64 MiB more (allocator pools and the threads' arenas)."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+)", line).group(1)
        c = Client(url, timeout=300)
        big = {"n": 64, "steps": GIF_FRAMES - 1, "x0": True}
        assert c.generate(big)[1][-1][0] == "done"
        before = rss_bytes(proc.pid)
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda i: c.generate({**big, "seed": i}), range(4)))
        assert all(status == 200 and events[-1][0] == "done" for status, events in results)
        jobs = [events[0][1]["job"] for _, events in results]
        assert len(set(jobs)) == 4
        grown = rss_bytes(proc.pid) - before
        kept = c.json("/api/status")["kept_bytes"]
        assert kept <= Limits().keep_bytes
        assert grown < Limits().keep_bytes + 64 * 2**20, f"grew by {grown / 2**20:.0f} MiB"
        print(f"server memory: {before / 2**20:.0f} MiB after one request, grew by "
              f"{grown / 2**20:.1f} MiB over 4 more; {kept / 2**20:.1f} MiB kept for download")
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
        c = Client(url)
        assert c.get("/")[0] == 200
        # addressed as any IP, localhost or this machine's name: its own; another name is not
        port = urlparse(url).port
        for host in (f"192.0.2.7:{port}", f"[2001:db8::1]:{port}", f"localhost:{port}",
                     f"{socket.gethostname()}:{port}"):
            assert c.request("GET", "/api/model", headers={"Host": host})[0] == 200, host
        for host in (f"evil.example.com:{port}", f"192.0.2.7:{port + 1}"):
            status, body, _ = c.request("GET", "/api/model", headers={"Host": host})
            assert status == 421 and (f"it answers only to an IP address of this machine, "
                                      f"localhost or {socket.gethostname()}, at port {port}"
                                      in json.loads(body)["error"]), body
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
