"""The server with a tiny Qwen2.5-VL, through the official openai client: base64 image
chat (greedy text equal to the offline Engine's), streaming, SGLang's /generate with
image_data, http(s) URLs from a loopback server; and every bad input a 400 naming the
part, with other requests unaffected and the KV cache back to idle."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from PIL import Image

from tests.conftest import API_KEY, LiveServer, start_server
from vl_factory import make_image, make_qwen2_5_vl

CONTEXT = 120  # two images of the largest size (64 tokens each) do not fit
MAX_BYTES = 2_000_000
MAX_PIXELS = 1_000_000
GREEDY = {"max_tokens": 8, "temperature": 0}


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def image_message(url: str, text: str = "What is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


class _Files(http.server.BaseHTTPRequestHandler):
    """Loopback file server: /ok.png, /slow.png (answers after the fetch timeout)."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/slow.png":
            time.sleep(4)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl_server"))


@pytest.fixture(scope="module")
def vl_server(ckpt: Path) -> Iterator[LiveServer]:
    live = start_server("--model-path", str(ckpt), "--dtype", "float32", "--api-key", API_KEY,
                        "--context-length", str(CONTEXT), "--max-total-tokens", "4096",
                        "--mm-allow-http-urls", "--mm-per-request-timeout", "1",
                        "--mm-max-input-bytes", str(MAX_BYTES),
                        "--mm-max-image-pixels", str(MAX_PIXELS),
                        "--limit-mm-data-per-request", '{"image": 3}', log_name="vl")
    yield live
    live.proc.terminate()
    live.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Iterator[Any]:
    import radixserve as rs

    with rs.Engine(model_path=str(ckpt), dtype="float32", context_length=CONTEXT,
                   max_total_tokens=4096) as e:
        yield e


@pytest.fixture(scope="module")
def client(vl_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vl_server.url}/v1", api_key=API_KEY, timeout=120)


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    _Files.body = png(make_image(60, 80, 5))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_base64_image_chat_matches_engine(client: openai.OpenAI, engine: Any) -> None:
    image = make_image(90, 60, 1)
    messages = image_message(data_url(image))
    got = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    want = engine.chat(messages, {"max_new_tokens": 8, "temperature": 0})
    assert got.choices[0].message.content == want["text"]
    assert got.usage.prompt_tokens == want["meta_info"]["prompt_tokens"]
    # The image's tokens are in the prompt: more than the text alone has.
    text_only = engine.chat([{"role": "user", "content": "What is this?"}],
                            {"max_new_tokens": 1})
    assert got.usage.prompt_tokens > text_only["meta_info"]["prompt_tokens"] + 4


def test_image_chat_stream_concat_equals_non_stream(client: openai.OpenAI) -> None:
    messages = image_message(data_url(make_image(64, 100, 2)))
    full = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                 **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_second_identical_image_request_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = image_message(data_url(make_image(112, 112, 3)))
    first = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    second = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_native_generate_with_image_data(vl_server: LiveServer, engine: Any) -> None:
    image = make_image(70, 70, 4)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    b64 = base64.b64encode(png(image)).decode()
    with vl_server.client() as c:
        r = c.post("/generate", json={"text": prompt, "image_data": b64,
                                      "sampling_params": {"max_new_tokens": 6,
                                                          "temperature": 0}})
    assert r.status_code == 200, r.text
    want = engine.generate(prompt, {"max_new_tokens": 6, "temperature": 0}, image_data=image)
    assert r.json()["output_ids"] == want["output_ids"]


def test_http_url_from_loopback_server(client: openai.OpenAI, files: str, engine: Any) -> None:
    got = client.chat.completions.create(model="m", messages=image_message(f"{files}/ok.png"),
                                         **GREEDY)
    want = engine.chat(image_message(data_url(Image.open(io.BytesIO(_Files.body)))),
                       {"max_new_tokens": 8, "temperature": 0})
    assert got.choices[0].message.content == want["text"]


def _chat_error(vl_server: LiveServer, messages: list[dict[str, Any]]) -> dict[str, Any]:
    with vl_server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": messages,
                                                 "max_tokens": 4})
    assert r.status_code == 400, r.text
    return r.json()["error"]


def _bad_cases(files: str) -> dict[str, tuple[list[dict[str, Any]], str]]:
    part = "messages[0].content[1].image_url"
    huge = Image.new("RGB", (1100, 1000), (10, 200, 30))  # small PNG, too many pixels
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello, world").decode()
    four = [{"type": "image_url", "image_url": {"url": data_url(make_image(30, 30, i))}}
            for i in range(4)]
    two_large = [{"type": "image_url", "image_url": {"url": data_url(make_image(400, 400, i))}}
                 for i in range(2)]
    return {
        "broken base64": (image_message("data:image/png;base64,@@@not-base64@@@"), part),
        "not an image": (image_message(not_an_image), part),
        "truncated png": (image_message("data:image/png;base64," + base64.b64encode(
            png(make_image(40, 40, 9))[:60]).decode()), part),
        "unsupported part": ([{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}],
            "messages[0].content[1].type"),
        "too many images": ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                          *four]}],
                            "messages[0].content[4].image_url"),
        "over the context": ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                                           *two_large]}],
                             "messages[0].content[2].image_url"),
        "over the pixel limit": (image_message(data_url(huge)), part),
        "missing file": (image_message("/nonexistent/picture.png"), part),
        "over the byte limit": (image_message("data:image/png;base64," + base64.b64encode(
            b"\x89PNG" + bytes(MAX_BYTES)).decode()), part),
        "slow url": (image_message(f"{files}/slow.png"), part),
        "refused port": (image_message("http://127.0.0.1:9/x.png"), part),
    }


@pytest.mark.parametrize("case", ["broken base64", "not an image", "truncated png",
                                  "unsupported part", "too many images", "over the context",
                                  "over the pixel limit", "missing file",
                                  "over the byte limit", "slow url",
                                  "refused port"])
def test_bad_input_is_400_naming_the_part(vl_server: LiveServer, client: openai.OpenAI,
                                          files: str, case: str) -> None:
    messages, param = _bad_cases(files)[case]
    error = _chat_error(vl_server, messages)
    assert error["param"] == param, error
    # Nothing else is affected: the next request is answered, and no KV is held.
    ok = client.chat.completions.create(model="m", messages=image_message(
        data_url(make_image(40, 40, 1))), **GREEDY)
    assert ok.choices[0].finish_reason == "length"
    vl_server.wait_idle()


def test_native_generate_bad_image_data_is_400(vl_server: LiveServer) -> None:
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Hi"
    with vl_server.client() as c:
        bad = c.post("/generate", json={"text": prompt, "image_data": ["@@@"]})
        count = c.post("/generate", json={"text": "no placeholder", "image_data": "@@@"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image_data[0]"
    assert count.status_code == 400 and count.json()["error"]["param"] == "image_data"
    vl_server.wait_idle()


def test_image_on_a_text_only_model_is_400(server: LiveServer) -> None:
    """The default (text-only) server refuses image parts, naming the part."""
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "m", "max_tokens": 2,
            "messages": image_message(data_url(make_image(20, 20, 0)))})
    assert r.status_code == 400
    assert json.loads(r.text)["error"]["param"] == "messages[0].content[1].image_url"
