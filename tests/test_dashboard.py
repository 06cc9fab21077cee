"""GET /dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) loads the page from a live server on a tiny
random checkpoint while requests run; the plots fill and grow, the request, throughput,
cache hit and TTFT plots rise above zero, the queue table lists a waiting request, and
the browser logs no error. A screenshot goes into the test's tmp directory. Also: the
page on a server without --enable-metrics, /get_load's shape, /dashboard/data's fields
with and without metrics, and /get_server_info's request counters equal to /metrics'."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx2
import pytest

from radixserve.entrypoints.dashboard import dashboard_data, load_entries
from radixserve.managers.io_struct import ServerInfo
from tests.conftest import LiveServer, start_server
from tests.model_factory import make_tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MAX_TOTAL_TOKENS = 4096
# The page's chart geometry (dashboard_page.py): y of the zero line in the viewBox.
ZERO_Y = 150 - 14
# Fewer slots than traffic workers, so that one request is always waiting.
MAX_RUNNING = 2
WORKERS = 3
PROMPT = list(range(100, 140))  # below the tiny vocabulary, no EOS (2)


def _info(**over: Any) -> ServerInfo:
    base = dict(max_total_num_tokens=1000, available_tokens=600, evictable_tokens=300,
                protected_tokens=50, num_running_reqs=2, num_waiting_reqs=3,
                num_retractions=0, total_prefill_tokens=70, total_cached_tokens=30)
    return ServerInfo(**{**base, **over})


def test_get_load_is_sglangs_shape_per_dp_rank() -> None:
    single = load_entries(_info())
    # Used = capacity - free - evictable; num_reqs counts running and waiting.
    assert single == [{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 3, "num_tokens": 100}]
    a, b = _info(num_running_reqs=1, num_waiting_reqs=0), _info(available_tokens=700)
    summed = _info(extra={"dp_replicas": [dataclasses.asdict(a), dataclasses.asdict(b)]})
    assert load_entries(summed) == [
        {"dp_rank": 0, "num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 100},
        {"dp_rank": 1, "num_reqs": 5, "num_waiting_reqs": 3, "num_tokens": 0}]


def test_queue_head_merges_dp_ranks_longest_wait_first() -> None:
    a = _info(extra={"queue_head": [{"rid": "x", "prompt_tokens": 4, "waited_s": 0.5}]})
    b = _info(extra={"queue_head": [{"rid": "y", "prompt_tokens": 9, "waited_s": 2.0},
                                    {"rid": "z", "prompt_tokens": 1, "waited_s": 0.1}]})
    summed = _info(extra={"dp_replicas": [dataclasses.asdict(a), dataclasses.asdict(b)]})
    assert [(e["rid"], e["dp_rank"]) for e in dashboard_data(summed, 0, None)["queue_head"]] \
        == [("y", 1), ("x", 0), ("z", 1)]


def test_dashboard_data_without_and_with_metrics() -> None:
    off = dashboard_data(_info(), 4, None)
    assert off["metrics_enabled"] is False
    assert off["gen_throughput"] is None and off["ttft_count"] is None
    assert off["num_used_tokens"] == 100 and off["token_usage"] == pytest.approx(0.1)
    assert off["radix_tree_tokens"] == 350 and off["num_pending_requests"] == 4
    assert off["queue_head"] == []
    on = dashboard_data(_info(), 0, {"gen_throughput": 12.5,
                                     "time_to_first_token_seconds_sum": 0.75,
                                     "time_to_first_token_seconds_count": 3.0})
    assert on["metrics_enabled"] is True
    assert (on["gen_throughput"], on["ttft_sum_s"], on["ttft_count"]) == (12.5, 0.75, 3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ckpt = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("dashboard-llama"))
    live = start_server("--model-path", str(ckpt), "--max-total-tokens",
                        str(MAX_TOTAL_TOKENS), "--enable-metrics", "--decode-log-interval",
                        "2", "--max-running-requests", str(MAX_RUNNING), "--api-key", "k",
                        log_name="dashboard")
    live.api_key = "k"
    yield live
    live.proc.terminate()
    assert live.proc.wait(timeout=30) == 0


def _traffic(live: LiveServer, stop: threading.Event, worker: int) -> None:
    """Streamed requests one after another; each worker repeats its own prompt, so from
    the second request on most of it comes from the radix cache."""
    prompt = [t + worker for t in PROMPT]
    body = {"input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": 24, "ignore_eos": True, "temperature": 0}}
    with live.client() as c:
        while not stop.is_set():
            with c.stream("POST", "/generate", json=body) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    pass


def _ys(d: str) -> list[float]:
    return [float(p.split(",")[1]) for p in d.replace("M", " ").replace("L", " ").split()]


def _browser() -> Any:
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        pytest.fail(f"headless Chromium is needed: {CHROMIUM} or {CHROMEDRIVER} is missing "
                    f"(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_dashboard_plots_fill_in_chromium(server: LiveServer, tmp_path: Path) -> None:
    # The page itself needs no key; its polls carry the one from the URL fragment.
    page = httpx2.get(f"{server.url}/dashboard")
    assert page.status_code == 200 and 'id="panels"' in page.text
    assert httpx2.get(f"{server.url}/dashboard/data").status_code == 401
    with server.client() as c:
        load = c.get("/get_load").raise_for_status().json()
    assert [sorted(e) for e in load] == [["dp_rank", "num_reqs", "num_tokens",
                                          "num_waiting_reqs"]]

    driver = _browser()
    stop = threading.Event()
    threads = [threading.Thread(target=_traffic, args=(server, stop, w), daemon=True)
               for w in range(WORKERS)]
    try:
        driver.get(f"{server.url}/dashboard#key=k")
        for t in threads:
            t.start()

        def paths() -> dict[str, dict[str, Any]]:
            return {f"{el.get_attribute('data-series')}@{chart}": {
                        "points": int(el.get_attribute("data-points")),
                        "d": el.get_attribute("d")}
                    for chart in ("requests", "kv", "radix", "throughput", "hit", "ttft")
                    for el in driver.find_elements(
                        "css selector", f"#chart-{chart} path.series")}

        def above_zero(p: dict[str, Any]) -> bool:
            return any(y < ZERO_Y - 0.05 for y in _ys(p["d"])) if p["d"] else False

        want = ("running@requests", "queued@requests", "usage@kv", "tokens@radix",
                "gen@throughput", "hit@hit", "ttft@ttft")
        deadline = time.monotonic() + 45
        queue_rows: list[str] = []
        while True:
            first = paths()
            queue_rows = queue_rows or [
                tr.text for tr in driver.find_elements("css selector", "#queue-rows tr")]
            if queue_rows and all(first[k]["points"] >= 2 and above_zero(first[k])
                                  for k in want):
                break
            assert time.monotonic() < deadline, \
                f"plots did not fill: {json.dumps(first)}; queue rows: {queue_rows}"
            time.sleep(0.5)
        # rid, dp rank, prompt tokens, seconds waited
        assert queue_rows[0].split()[1:3] == ["0", str(len(PROMPT))], queue_rows
        time.sleep(3)
        second = paths()
        for k in ("running@requests", "queued@requests", "usage@kv", "tokens@radix",
                  "gen@throughput"):
            assert second[k]["points"] > first[k]["points"], (k, first[k], second[k])
        assert "cannot reach" not in driver.find_element("id", "status").text
        assert driver.find_element("css selector", "#panel-ttft .note").text == ""
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        driver.quit()
    server.wait_idle()


def test_dashboard_without_metrics_says_what_it_lacks(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without --enable-metrics (and without an API key) the page still plots what the
    scheduler reports; the throughput and TTFT panels stay empty and say why."""
    ckpt = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("dashboard-plain"))
    live = start_server("--model-path", str(ckpt), "--max-total-tokens",
                        str(MAX_TOTAL_TOKENS), log_name="dashboard-plain")
    driver = _browser()
    try:
        assert httpx2.get(f"{live.url}/metrics").status_code == 404
        driver.get(f"{live.url}/dashboard")
        body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8}}
        deadline = time.monotonic() + 30
        while True:
            httpx2.post(f"{live.url}/generate", json=body, timeout=60).raise_for_status()
            points = {c: int(driver.find_element("css selector", f"#chart-{c} path.series")
                             .get_attribute("data-points"))
                      for c in ("requests", "kv", "radix", "throughput", "ttft")}
            if min(points["requests"], points["kv"], points["radix"]) >= 3:
                break
            assert time.monotonic() < deadline, points
            time.sleep(0.5)
        assert points["throughput"] == 0 and points["ttft"] == 0
        for c in ("throughput", "ttft"):
            note = driver.find_element("css selector", f"#panel-{c} .note").text
            assert "needs --enable-metrics" in note
        assert driver.find_element("css selector", "#panel-requests .note").text == ""
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
        live.proc.terminate()
    assert live.proc.wait(timeout=30) == 0


def test_server_info_counters_equal_metrics(server: LiveServer) -> None:
    """After the traffic above (and one more request, should this test run alone), the
    scheduler's counters in /get_server_info equal the API server's in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    with server.client() as c:
        c.post("/generate", json=body).raise_for_status()
    info = server.wait_idle()
    with server.client() as c:
        text = c.get("/metrics").raise_for_status().text
    samples = {s.name: s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    names = ("num_requests_total", "num_aborted_requests_total", "prompt_tokens_total",
             "generation_tokens_total", "cached_tokens_total")
    assert info["num_requests_total"] >= 1 and info["cached_tokens_total"] > 0
    assert {n: info[n] for n in names} == {
        n: int(samples.get(f"radixserve:{n}", 0)) for n in names}
