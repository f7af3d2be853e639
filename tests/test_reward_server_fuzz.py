"""The reward server fuzzed over loopback, as a careless or hostile client would use it.

The server runs as `trl-nft reward-server` in a subprocess (so that its memory is its own to measure), with small
limits, and is sent malformed JSON, fields of the wrong type, missing or extra fields, oversized bodies, pixel bombs
(as images and as condition images), too many images (condition images counted), images over the base64 limit, wrong
tokens, images in other formats, truncated and corrupted images, and broken HTTP framing. Each class of bad input gets its own 4xx and never a 5xx, a good request after each one
still succeeds, and the server's peak memory grows by less than what reading or decoding any of them would take.
"""

import base64
import dataclasses
import functools
import io
import json
import re
import socket
import struct
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_reward_server import TOKEN, free_port, noise_images, png_base64, start_cli_server, stop

from trl_nft.rewards.jpeg import jpeg_compressibility


MIB = 1024 * 1024
MAX_BODY_MB, MAX_IMAGES, MAX_IMAGE_BASE64_MB, MAX_IMAGE_PIXELS = 2, 8, 1, 512 * 512
# The most the server's peak resident memory (about 940 MiB after start-up, mostly torch) may grow in one test.
# Measured: at most 2 MiB in any test, 8 MiB over the whole file. With the pixel limit raised, the 8192x8192 bomb
# alone raised the peak by 578 MiB; with the body limit raised, a 200 MB body by at least 169 MiB more.
PEAK_MEMORY_GROWTH_BOUND = 64 * MIB

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD_IMAGE = noise_images(1, size=16)[0]
GOOD_REQUEST = {"reward": "jpeg_compressibility", "images": [png_base64(GOOD_IMAGE)], "prompts": ["a"]}
# Formats PIL writes (with the libraries installed here) that the server must refuse: it reads PNG and WebP only.
Image.init()
OTHER_FORMATS = "AVIF BMP DDS EPS GIF ICNS ICO IM JPEG JPEG2000 PCX PDF PPM QOI SGI TGA TIFF".split()
OTHER_FORMATS = [format for format in OTHER_FORMATS if format in Image.SAVE]


@dataclasses.dataclass
class Server:
    url: str
    port: int
    pid: int


@pytest.fixture(scope="module")
def server():
    port = free_port()
    options = ["--reward", "jpeg_compressibility", "--max_body_mb", str(MAX_BODY_MB), "--max_images", str(MAX_IMAGES)]
    options += ["--max_image_base64_mb", str(MAX_IMAGE_BASE64_MB), "--max_image_pixels", str(MAX_IMAGE_PIXELS)]
    process = start_cli_server(port, *options)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, process.pid)
    finally:
        stop(process)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert_serving(client)  # warm-up: the first request's one-off allocations are not the fuzzing's
        yield client


def peak_memory(pid: int) -> int:
    """The peak resident memory of process `pid` so far (`VmHWM`), in bytes: it catches a transient allocation
    that the current resident size, read after the request, would miss."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def assert_serving(client: httpx.Client) -> None:
    response = client.post("/score", json=GOOD_REQUEST, headers=AUTH)
    assert response.json() == {"rewards": jpeg_compressibility([GOOD_IMAGE], ["a"])}


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(images: list) -> dict:
    return {"reward": "jpeg_compressibility", "images": images, "prompts": ["a"] * len(images)}


@dataclasses.dataclass
class Case:
    """A bad request and what the server must answer: a status in `statuses`, and `detail` in its message."""

    kind: str
    body: bytes
    statuses: set[int]
    detail: str = ""
    headers: dict = dataclasses.field(default_factory=lambda: dict(AUTH))
    chunked: bool = False  # sent without Content-Length, in 1 MiB chunks


def json_case(kind: str, payload: dict, statuses: set[int], detail: str = "", **options) -> Case:
    return Case(kind, json.dumps(payload).encode(), statuses, detail, **options)


def send(client: httpx.Client, case: Case) -> httpx.Response:
    body = case.body
    content = (body[start : start + MIB] for start in range(0, len(body), MIB)) if case.chunked else body
    return client.post("/score", content=content, headers={"Content-Type": "application/json", **case.headers})


# ------------------------------------------------------------------------------------------------- bad inputs

VALID_BODY = json.dumps(GOOD_REQUEST).encode()

malformed_json = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.integers(0, len(VALID_BODY) - 1).map(lambda length: VALID_BODY[:length]),  # cut short
    st.integers(300, 100_000).map(lambda depth: b'{"images": [], "prompts": [], "columns": {"a": ' + b"[" * depth),
).map(lambda body: Case("malformed JSON", body, {400}, "malformed request"))

scalars = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans())
not_a_string = st.one_of(scalars, st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), scalars))
not_a_list_of_strings = st.one_of(
    st.none(),
    scalars,
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    st.lists(st.one_of(st.none(), not_a_string), min_size=1, max_size=3),
)
not_columns = st.one_of(
    st.none(),
    scalars,
    st.text(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), scalars, st.text(max_size=5)), min_size=1, max_size=3),
)
# Condition images: a list of one image (base64 text), a list of them, or null per image; anything else is refused.
not_a_condition_entry = st.one_of(
    scalars,
    st.dictionaries(st.text(max_size=3), scalars, min_size=1, max_size=2),
    st.lists(st.one_of(st.none(), scalars, st.lists(st.text(max_size=3), max_size=2)), min_size=1, max_size=3),
)
not_condition_images = st.one_of(
    scalars,
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=2),
    st.lists(not_a_condition_entry, min_size=1, max_size=3),
)
WRONG_TYPES = {"reward": not_a_string, "images": not_a_list_of_strings, "prompts": not_a_list_of_strings}
WRONG_TYPES["columns"] = not_columns
WRONG_TYPES["condition_images"] = not_condition_images


@st.composite
def wrong_types(draw) -> Case:
    field = draw(st.sampled_from(sorted(WRONG_TYPES)))
    payload = {**GOOD_REQUEST, field: draw(WRONG_TYPES[field])}
    return json_case("wrong type", payload, {400}, f"malformed request: {field}")


@st.composite
def missing_or_extra_fields(draw) -> Case:
    if draw(st.booleans()):
        missing = draw(st.sets(st.sampled_from(["images", "prompts"]), min_size=1))
        payload = {key: value for key, value in GOOD_REQUEST.items() if key not in missing}
        return json_case("missing field", payload, {400}, "Field required")
    extra = draw(
        st.text(min_size=1, max_size=10).filter(
            lambda key: key not in ("reward", "images", "prompts", "columns", "condition_images")
        )
    )
    payload = {**GOOD_REQUEST, extra: draw(st.one_of(st.none(), scalars, st.text(max_size=5)))}
    return json_case("extra field", payload, {400}, "Extra inputs are not permitted")


@st.composite
def oversized_bodies(draw) -> Case:
    size = draw(st.integers(MAX_BODY_MB * MIB + 1, 3 * MAX_BODY_MB * MIB))
    body = b'{"images": ["' + b"A" * size + b'"], "prompts": ["a"]}'  # one big image, as a client would send
    return Case("oversized body", body, {413}, "max_body_mb", chunked=draw(st.booleans()))


@functools.cache
def pixel_bombs() -> list[str]:
    """Small files that decode to images over MAX_IMAGE_PIXELS (512 x 512): 1-bit PNGs compress blank pixels about
    1000-fold, WebP more."""
    return [
        b64(encode(Image.new("1", (1024, 1024)))),  # 4 times the limit, 200 bytes
        b64(encode(Image.new("1", (8192, 8192)))),  # 64 M pixels, 8 kB: 192 MiB as RGB
        b64(encode(Image.new("1", (16384, 17)))),  # a thin strip just over the limit
        b64(encode(Image.new("L", (4096, 4096)), "WEBP", lossless=True)),  # 16 M pixels, 700 bytes
    ]


@st.composite
def pixel_bombs_among_images(draw) -> Case:
    images = [GOOD_REQUEST["images"][0]] * draw(st.integers(0, MAX_IMAGES - 1))
    images.insert(draw(st.integers(0, len(images))), draw(st.sampled_from(pixel_bombs())))
    return json_case("pixel bomb", request(images), {413}, "over the server's max_image_pixels")


@st.composite
def pixel_bombs_among_condition_images(draw) -> Case:
    """A bomb as a sample's condition image, alone or in a multi-image row (with at most 3 images each, a request
    stays within max_images)."""
    count = draw(st.integers(1, MAX_IMAGES // 3))
    good = GOOD_REQUEST["images"][0]
    condition_images = [draw(st.sampled_from([good, [good], None])) for _ in range(count)]
    row = draw(st.integers(0, count - 1))
    bomb = draw(st.sampled_from(pixel_bombs()))
    condition_images[row] = draw(st.sampled_from([bomb, [good, bomb]]))
    payload = {**request([good] * count), "condition_images": condition_images}
    return json_case("condition pixel bomb", payload, {413}, "over the server's max_image_pixels")


@st.composite
def too_many_images_with_their_conditions(draw) -> Case:
    """Images within the limit, but not once their condition images are counted: refused before any is decoded."""
    count = draw(st.integers(1, MAX_IMAGES))
    images = draw(st.lists(st.text(max_size=20), min_size=count, max_size=count))
    sources = draw(st.lists(st.text(max_size=20), min_size=MAX_IMAGES + 1 - count, max_size=2 * MAX_IMAGES))
    condition_images = [sources] + [None] * (count - 1)
    return json_case(
        "too many condition images",
        {**request(images), "condition_images": condition_images},
        {413},
        f"condition images), over the server's max_images ({MAX_IMAGES})",
    )


@st.composite
def too_many_images(draw) -> Case:
    count = draw(st.integers(MAX_IMAGES + 1, 64))
    # Not even base64: refused for their number, before any is decoded.
    images = draw(st.lists(st.text(max_size=20), min_size=count, max_size=count))
    return json_case("too many images", request(images), {413}, f"over the server's max_images ({MAX_IMAGES})")


@st.composite
def images_over_the_base64_limit(draw) -> Case:
    length = draw(st.integers(MAX_IMAGE_BASE64_MB * MIB + 1, MAX_IMAGE_BASE64_MB * MIB + 65536))
    return json_case("image over max_image_base64_mb", request(["A" * length]), {413}, "max_image_base64_mb")


def is_the_token(authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and token == TOKEN


header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)  # printable, no spaces
wrong_authorizations = st.one_of(
    st.none(),  # no header
    header_text,  # no scheme
    header_text.filter(bool).map(lambda token: f"Bearer {token}"),  # (HTTP forbids a trailing space)
    header_text.filter(bool).map(lambda scheme: f"{scheme} {TOKEN}"),
).filter(lambda authorization: not is_the_token(authorization))


@st.composite
def wrong_tokens(draw) -> Case:
    authorization = draw(wrong_authorizations)
    headers = {} if authorization is None else {"Authorization": authorization}
    return json_case("wrong token", GOOD_REQUEST, {401}, "missing or wrong token", headers=headers)


@st.composite
def other_formats(draw) -> Case:
    format = draw(st.sampled_from(OTHER_FORMATS))
    size = (draw(st.integers(1, 32)), draw(st.integers(1, 32)))
    image = Image.new("RGB", size, tuple(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3))))
    return json_case(f"{format} image", request([b64(encode(image, format))]), {400}, "not a readable PNG or WebP")


def pixel_data_end(png: bytes) -> int:
    """The offset where the last IDAT chunk's data ends."""
    offset, end = 8, 0  # after the signature
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        if png[offset + 4 : offset + 8] == b"IDAT":
            end = offset + 8 + length
        offset += 12 + length
    return end


@st.composite
def truncated_images(draw) -> Case:
    png = encode(noise_images(1, seed=draw(st.integers(0, 1000)), size=draw(st.integers(16, 48)))[0])
    if draw(st.booleans()):  # base64 text cut at a length that is not a multiple of 4
        text = b64(png)
        length = draw(st.integers(0, len(text) - 1).filter(lambda n: n % 4))
        return json_case("truncated base64", request([text[:length]]), {400}, "is not valid base64")
    # The file cut well before its pixel data ends (the last bytes of a zlib stream may not hold pixels).
    length = draw(st.integers(0, pixel_data_end(png) - 128))
    return json_case("truncated PNG", request([b64(png[:length])]), {400}, "not a readable PNG or WebP")


@st.composite
def corrupted_images(draw) -> Case:
    """A valid PNG with a few bytes changed: it may still decode (a byte in the pixels), be refused as unreadable
    (a checksum, a chunk length, the zlib stream) or, had a checksum let it through, as too large."""
    png = bytearray(encode(noise_images(1, seed=draw(st.integers(0, 1000)), size=draw(st.integers(8, 32)))[0]))
    for _ in range(draw(st.integers(1, 4))):
        png[draw(st.integers(0, len(png) - 1))] = draw(st.integers(0, 255))
    return json_case("corrupted PNG", request([b64(bytes(png))]), {200, 400, 413})


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "bad_requests",
    [
        malformed_json,
        wrong_types(),
        missing_or_extra_fields(),
        oversized_bodies(),
        pixel_bombs_among_images(),
        pixel_bombs_among_condition_images(),
        too_many_images(),
        too_many_images_with_their_conditions(),
        images_over_the_base64_limit(),
        wrong_tokens(),
        other_formats(),
        truncated_images(),
        corrupted_images(),
    ],
    ids=[
        "malformed-json",
        "wrong-types",
        "missing-or-extra-fields",
        "oversized-bodies",
        "pixel-bombs",
        "condition-pixel-bombs",
        "too-many-images",
        "too-many-condition-images",
        "images-over-the-base64-limit",
        "wrong-tokens",
        "other-formats",
        "truncated-images",
        "corrupted-images",
    ],
)
def test_fuzzed_requests_get_their_4xx_never_a_5xx_and_the_server_keeps_serving(server, client, bad_requests):
    peak_before = peak_memory(server.pid)

    @settings(max_examples=10, deadline=None, database=None)
    @given(bad_requests)
    def check(case: Case):
        response = send(client, case)
        assert response.status_code in case.statuses, (case.kind, response.status_code, response.text[:300])
        if response.status_code != 200:
            assert case.detail in response.json()["detail"], case.kind
        assert_serving(client)

    check()
    growth = peak_memory(server.pid) - peak_before
    assert growth < PEAK_MEMORY_GROWTH_BOUND, f"the server's peak memory grew by {growth / MIB:.0f} MiB"


def test_the_measured_attacks_are_refused_without_using_memory(server, client):
    """What a new user tried on the server before it had limits, each of which it answered with 200: a 13000 x 13000
    PNG (169 M pixels), a request of 5000 images, and a 200 MB body; and an image over PIL's own limit."""
    peak_before = peak_memory(server.pid)
    cases = [
        json_case("13000x13000 PNG", request([b64(encode(Image.new("1", (13000, 13000))))]), {413}, "13000x13000"),
        # Over twice PIL's Image.MAX_IMAGE_PIXELS, where PIL itself refuses to open it.
        json_case(
            "13400x13400 PNG", request([b64(encode(Image.new("1", (13400, 13400))))]), {413}, "max_image_pixels"
        ),
        json_case("5000 images", request([b64(encode(Image.new("RGB", (1, 1))))] * 5000), {413}, "5000 images"),
    ]
    for chunked in (False, True):
        body = b'{"images": ["' + b"A" * 200_000_000 + b'"], "prompts": ["a"]}'
        cases.append(Case("200 MB body", body, {413}, "max_body_mb", chunked=chunked))
    for case in cases:
        response = send(client, case)
        assert response.status_code == 413 and case.detail in response.json()["detail"], case.kind
        assert_serving(client)
    growth = peak_memory(server.pid) - peak_before
    assert growth < PEAK_MEMORY_GROWTH_BOUND, f"the server's peak memory grew by {growth / MIB:.0f} MiB"


def raw_exchange(port: int, data: bytes, responses: int) -> list[int]:
    """Send raw bytes to the server; the status codes of the first `responses` responses (fewer if it closes)."""
    status_line = re.compile(rb"HTTP/1\.1 (\d{3}) ")  # a response may follow the previous body on its line
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while len(status_line.findall(received)) < responses and (chunk := sock.recv(65536)):
            received += chunk
    return [int(status) for status in status_line.findall(received)]


@pytest.mark.parametrize(
    "headers, body, statuses",
    [
        # The server reads 10 bytes of body and then the rest as the next request, which is not HTTP.
        (b"Content-Length: 10\r\n", b'{"images": NOT HTTP\r\n\r\n', [400, 400]),
        # Declared far over the limit: refused at once, without waiting for the body.
        (b"Content-Length: 1000000000000\r\n", b"{}", [413]),
        (b"Content-Length: abc\r\n", b"{}", [400]),
        (b"Content-Length: -1\r\n", b"{}", [400]),
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}", [400]),
    ],
    ids=["content-length-too-small", "content-length-huge", "content-length-not-a-number", "negative", "two"],
)
def test_broken_http_framing_gets_a_4xx(server, client, headers, body, statuses):
    head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
    assert raw_exchange(server.port, head + headers + b"\r\n" + body, len(statuses)) == statuses
    assert_serving(client)
