"""The playground's pictures in a real browser (Debian's Chromium, Playwright): a picture to
edit with a mask painted on it, a ControlNet control image with its canny map previewed, the
IP-Adapter pictures, and the strip of the page's images that brings one and its settings back.

One service with SDXL_CONTROLNET_DIR (a ControlNet made from the tiny base's UNet); the
IP-Adapter section's request is checked as sent (intercepted): its rendering is
tests/integration/test_ip_adapters.py's.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.playground_pages import playground_page

pytestmark = pytest.mark.integration

SIDE = 256  # the tiny preset renders 256x256 as asked


@pytest.fixture(scope="module")
def pictures_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The service with the test ControlNets (tests/controlnet_files.py): `edges`, `depth`,
    `union`, and two that cannot be used."""
    from sdxl_service.engine.tiny import ensure_tiny_pair
    from tests.controlnet_files import save_controlnets
    from tests.service_process import REPO, running_service

    base, _ = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    folder = save_controlnets(tmp_path_factory.mktemp("controlnets") / "controlnets", base)
    env = {"SDXL_CONTROLNET_DIR": str(folder)}
    with running_service(tmp_path_factory.mktemp("pictures-service"), env) as running:
        yield running


@pytest.fixture
def page(browser: Any, pictures_service: Any) -> Iterator[Any]:
    with playground_page(browser, pictures_service.root, width=1300) as page:
        page.wait_for_selector("#cn-model option[value='edges']", state="attached")
        yield page


def picture_file(folder: Path, name: str = "picture.png", seed: int = 0) -> Path:
    """A picture with shapes (edges for canny), 256x256."""
    rng = np.random.default_rng(seed)
    array = np.full((SIDE, SIDE, 3), 40, np.uint8)
    array[60:200, 50:180] = rng.integers(120, 255, 3, dtype=np.uint8)
    array[20:80, 150:240] = rng.integers(0, 255, 3, dtype=np.uint8)
    path = folder / name
    Image.fromarray(array).save(path)
    return path


def generate(page: Any, expected_images: int) -> None:
    page.click("#generate")
    page.wait_for_function(
        f"document.querySelectorAll('#gallery figure[data-previews]').length >= {expected_images}"
        " || !document.getElementById('error').hidden",
        timeout=120_000,
    )
    assert page.is_hidden("#error"), page.text_content("#error")


def fill_form(page: Any, prompt: str, seed: int) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", f"{SIDE}x{SIDE}")
    page.fill("#seed", str(seed))
    page.fill("#num_inference_steps", "4")
    page.select_option("#partial_images", "0")


# Chromium does not show Playwright a multipart body with files in it (its post data is
# None), so the page's fetch is wrapped to keep a copy of each form it sends, as sent.
RECORD_FORMS = """() => {
  window.sentForms = [];
  const send = window.fetch;
  const base64 = (blob) => new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(',')[1]);
    reader.readAsDataURL(blob);
  });
  window.fetch = async (url, options = {}) => {
    if (options.body instanceof FormData) {
      const parts = {};
      for (const [name, value] of options.body.entries()) {
        parts[name] = value instanceof Blob ? {file: await base64(value)} : value;
      }
      window.sentForms.push({url: String(url), parts});
    }
    return send(url, options);
  };
}"""


def last_form(page: Any, path: str) -> dict[str, bytes]:
    """The last multipart form the page sent to `path`: each part's bytes by its name."""
    forms = [form for form in page.evaluate("window.sentForms") if form["url"].endswith(path)]
    return {
        name: base64.b64decode(value["file"]) if isinstance(value, dict) else value.encode()
        for name, value in forms[-1]["parts"].items()
    }


def data_url_picture(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def shown_picture(page: Any) -> np.ndarray:
    """The picture shown large beside the form."""
    return np.asarray(data_url_picture(page.get_attribute("#viewer-image", "src")).convert("RGB"))


def test_a_painted_mask_is_sent_transparent_where_painted_and_the_rest_is_kept(
    page: Any, tmp_path: Path
) -> None:
    source = picture_file(tmp_path)
    page.set_input_files("#edit-image", str(source))
    page.wait_for_selector("#paint:not([hidden])")
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == [SIDE, SIDE]
    assert page.input_value("#size") == "auto"  # an edit is made at the picture's own size
    box = page.locator("#mask-canvas").bounding_box()
    scale = SIDE / box["width"]
    # A horizontal stroke, 32 screen pixels wide, through the picture's upper third.
    y = box["y"] + 60 / scale
    page.mouse.move(box["x"] + 40 / scale, y)
    page.mouse.down()
    page.mouse.move(box["x"] + 200 / scale, y, steps=8)
    page.mouse.up()
    fill_form(page, "a red car", seed=11)
    page.fill("#strength", "0.9")
    page.evaluate(RECORD_FORMS)
    with page.expect_request("**/v1/images/edits"):
        generate(page, 1)
    parts = last_form(page, "/v1/images/edits")
    assert parts["image"] == source.read_bytes()
    assert parts["prompt"] == b"a red car" and parts["strength"] == b"0.9"
    assert (parts["seed"], parts["size"], parts["stream"]) == (b"11", b"256x256", b"true")
    mask = Image.open(io.BytesIO(parts["mask"]))
    assert mask.format == "PNG" and mask.size == (SIDE, SIDE) and mask.mode == "RGBA"
    alpha = np.asarray(mask)[:, :, 3]
    assert set(np.unique(alpha)) == {0, 255}
    painted = alpha == 0
    # The stroke, and nothing far from it.
    half = 16 * scale
    assert painted[60, 45:195].all() and painted[int(60 - half) + 3 : int(60 + half) - 3, 120].all()
    assert not painted[: int(60 - half) - 2].any() and not painted[int(60 + half) + 2 :].any()
    # The answer, beside the form: outside the painted region, the picture's own pixels.
    page.wait_for_selector("#viewer:not([hidden])")
    answer = shown_picture(page)
    assert answer.shape == (SIDE, SIDE, 3)
    original = np.asarray(Image.open(source).convert("RGB"))
    assert np.array_equal(answer[~painted], original[~painted])
    assert not np.array_equal(answer[painted], original[painted])

    # Undo and clear: with nothing painted the edit is of the whole picture, with no mask.
    page.click("#mask-undo")
    assert page.evaluate("maskPainted()") is False
    page.select_option("#size", "auto")
    with page.expect_request("**/v1/images/edits"):
        generate(page, 2)
    parts = last_form(page, "/v1/images/edits")
    assert "mask" not in parts and parts["size"] == b"auto"
    answer = shown_picture(page)
    assert answer.shape == (SIDE, SIDE, 3) and not np.array_equal(answer, original)
    # Without the picture, "auto" is no choice: a generation has its size back.
    page.click("#edit-remove")
    assert page.input_value("#size") == "1024x1024"
    assert page.eval_on_selector("#size-auto", "o => o.disabled") is True


def test_mask_blur_and_only_masked_go_with_a_painted_mask(page: Any, tmp_path: Path) -> None:
    source = picture_file(tmp_path)
    page.set_input_files("#edit-image", str(source))
    page.wait_for_selector("#inpaint-options:not([hidden])")
    page.fill("#mask_blur", "4")
    page.check("#only_masked")
    page.fill("#inpaint_padding", "16")
    fill_form(page, "a red car", seed=5)
    page.evaluate(RECORD_FORMS)
    # Without paint, no mask: the options stay home (the server refuses them without one).
    with page.expect_request("**/v1/images/edits"):
        generate(page, 1)
    parts = last_form(page, "/v1/images/edits")
    assert "mask" not in parts and "mask_blur" not in parts and "inpaint_area" not in parts
    box = page.locator("#mask-canvas").bounding_box()
    scale = SIDE / box["width"]
    page.mouse.move(box["x"] + 150 / scale, box["y"] + 150 / scale)
    page.mouse.down()
    page.mouse.move(box["x"] + 170 / scale, box["y"] + 160 / scale, steps=4)
    page.mouse.up()
    with page.expect_request("**/v1/images/edits"):
        generate(page, 2)
    parts = last_form(page, "/v1/images/edits")
    assert (parts["mask_blur"], parts["inpaint_area"], parts["inpaint_padding"]) == (
        b"4",
        b"only_masked",
        b"16",
    )
    page.wait_for_selector("#viewer:not([hidden])")
    answer = shown_picture(page)
    original = np.asarray(Image.open(source).convert("RGB"))
    assert answer.shape == (SIDE, SIDE, 3)
    assert np.array_equal(answer[:64, :64], original[:64, :64])  # far from the stroke
    assert not np.array_equal(answer[150:160, 150:170], original[150:160, 150:170])


def previewed_after(page: Any, action: Any, sent: Any = None) -> np.ndarray:
    """The map shown once `action` has made the page ask for a new one (whose request body
    `sent` accepts)."""
    with page.expect_response(
        lambda r: (
            r.url.endswith("/control-maps") and (sent is None or sent(r.request.post_data_json))
        )
    ) as answered:
        action()
    made = answered.value.json()["data"][0]["b64_json"]
    page.wait_for_function(
        f"document.getElementById('cn-preview').src.endsWith({json.dumps(made)})"
    )
    return np.asarray(data_url_picture(page.get_attribute("#cn-preview", "src")))


def test_the_canny_map_is_previewed_and_the_generation_carries_the_unit(
    page: Any, tmp_path: Path
) -> None:
    from sdxl_service.api.control_maps import canny_map, fit_crop_and_resize

    # No IP-Adapter in the models listing: its section stays hidden.
    assert page.is_hidden("#ipa-section")
    assert page.is_visible("#control-section")
    source = picture_file(tmp_path, seed=3)
    fill_form(page, "a lighthouse", seed=5)
    page.click("#control-section summary")
    options = page.eval_on_selector_all(
        "#cn-model option", "os => os.map(o => [o.value, o.disabled, Boolean(o.title)])"
    )
    by_name = {name: (disabled, why) for name, disabled, why in options}
    assert by_name["edges"] == by_name["union"] == (False, False)
    assert by_name["sd15"] == (True, True)  # listed, with why it cannot be used
    page.select_option("#cn-model", "union")
    assert page.is_visible("#cn-mode-label")  # a Union model takes the map's mode
    page.select_option("#cn-mode", "depth")
    page.set_input_files("#cn-image", str(picture_file(tmp_path, "map.png")))
    page.wait_for_selector("#cn-preview-figure:not([hidden])")
    assert page.evaluate("requestBody().controlnets[0]")["mode"] == "depth"
    page.select_option("#cn-model", "edges")
    assert page.is_hidden("#cn-mode-label")
    shown = previewed_after(page, lambda: page.set_input_files("#cn-image", str(source)))
    fitted = fit_crop_and_resize(Image.open(source), SIDE, SIDE)
    assert np.array_equal(shown, canny_map(fitted))

    # New thresholds: a new preview, as the server computes it.
    def new_thresholds() -> None:
        page.fill("#cn-low", "5")
        page.fill("#cn-high", "20")

    shown = previewed_after(page, new_thresholds, lambda body: body["high"] == 20)
    assert np.array_equal(shown, canny_map(fitted, 5, 20))

    with page.expect_request("**/v1/images/generations") as sent:
        generate(page, 1)
    units = sent.value.post_data_json["controlnets"]
    image = "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode()
    assert units == [
        {
            "name": "edges",
            "image": image,
            "preprocessor": "canny",
            "low": 5,
            "high": 20,
            "scale": 1,
            "start": 0,
            "end": 1,
        }
    ]
    assert shown_picture(page).shape == (SIDE, SIDE, 3)

    # preprocessor none: the picture is the map, fitted; no thresholds shown or sent.
    shown = previewed_after(page, lambda: page.select_option("#cn-preprocessor", "none"))
    assert np.array_equal(shown, fitted)
    assert page.is_hidden("#cn-low") and page.is_hidden("#cn-high")
    unit = page.evaluate("requestBody().controlnets[0]")
    without_thresholds = {k: v for k, v in units[0].items() if k not in ("low", "high")}
    assert unit == {**without_thresholds, "preprocessor": "none"}


def png_b64(seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (seed, 100, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_ip_adapter_pictures_are_sent_as_ip_adapters(page: Any, tmp_path: Path) -> None:
    def with_an_adapter(route: Any) -> None:
        listed = route.fetch()
        models = listed.json()
        models["data"].append(
            {
                "id": "ip-adapter_sdxl",
                "object": "model",
                "created": 0,
                "owned_by": "ip_adapter_dir",
                "ip_adapter": {"name": "ip-adapter_sdxl"},
            }
        )
        route.fulfill(response=listed, json=models)

    sent: list[Any] = []

    def answered(route: Any) -> None:
        sent.append(route.request.post_data_json)
        event = {
            "type": "image_generation.completed",
            "b64_json": png_b64(7),
            "output_format": "png",
            "seed": 7,
        }
        route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=f"event: {event['type']}\ndata: {json.dumps(event)}\n\n",
        )

    page.route("**/v1/models", with_an_adapter)
    page.route("**/v1/images/generations", answered)
    page.reload()
    page.wait_for_selector("#ipa-section:not([hidden])")
    page.click("#ipa-section summary")
    assert page.input_value("#ipa-scale") == "0.6"
    files = [picture_file(tmp_path, f"style{seed}.png", seed) for seed in (1, 2)]
    page.set_input_files("#ipa-images", [str(f) for f in files])
    page.wait_for_function("document.querySelectorAll('#ipa-thumbs img').length === 2")
    page.fill("#ipa-scale", "0.8")
    fill_form(page, "a cat", seed=7)
    generate(page, 1)
    images = ["data:image/png;base64," + base64.b64encode(f.read_bytes()).decode() for f in files]
    assert sent[0]["ip_adapters"] == [{"name": "ip-adapter_sdxl", "images": images, "scale": 0.8}]
    assert "controlnets" not in sent[0]
    assert page.text_content("#viewer-caption") == "seed 7"


def test_the_strip_brings_an_earlier_image_and_its_settings_back(page: Any, tmp_path: Path) -> None:
    source = picture_file(tmp_path, seed=9)
    fill_form(page, "a lighthouse with edges", seed=3)
    page.click("#control-section summary")
    page.select_option("#cn-model", "edges")
    page.set_input_files("#cn-image", str(source))
    page.wait_for_selector("#cn-preview-figure:not([hidden])")
    generate(page, 1)
    first = page.get_attribute("#viewer-image", "src")
    page.click("#cn-remove")
    fill_form(page, "a plain fox", seed=8)
    page.fill("#num_inference_steps", "3")
    generate(page, 2)
    assert page.text_content("#viewer-caption") == "seed 8"
    assert page.get_attribute("#viewer-image", "src") != first
    # The strip, newest first: the earlier image is the second thumbnail.
    earlier = "#gallery figure:nth-child(2)"
    page.focus(f"{earlier} button.thumb")
    page.keyboard.press("Enter")  # a keyboard reaches it as a click does
    assert page.get_attribute("#viewer-image", "src") == first
    assert page.text_content("#viewer-caption") == "seed 3"
    assert "a lighthouse with edges" in page.text_content("#viewer-settings")
    assert "ControlNet edges (canny, 1)" in page.text_content("#viewer-settings")
    assert page.get_attribute(earlier, "class") == "shown"
    # Its settings back in the form, its control image and map too: the same image again.
    page.click("#viewer-reuse")
    assert page.input_value("#prompt") == "a lighthouse with edges"
    assert (page.input_value("#seed"), page.input_value("#num_inference_steps")) == ("3", "4")
    page.wait_for_selector("#cn-preview-figure:not([hidden])")
    generate(page, 3)
    assert page.get_attribute("#viewer-image", "src") == first


def test_the_result_is_beside_the_form_on_wide_screens_and_below_it_on_narrow_ones(
    page: Any,
) -> None:
    fill_form(page, "a fox", seed=1)
    generate(page, 1)
    form, result = (page.locator(f"#{id}").bounding_box() for id in ("form", "viewer"))
    assert result["x"] >= form["x"] + form["width"] and result["y"] < form["y"] + form["height"]
    page.set_viewport_size({"width": 600, "height": 900})
    form, result = (page.locator(f"#{id}").bounding_box() for id in ("form", "viewer"))
    assert result["y"] >= form["y"] + form["height"]


def test_an_edit_queued_as_a_job_is_a_job_of_kind_edit(page: Any, tmp_path: Path) -> None:
    from tests.decoded import decode

    source = picture_file(tmp_path, seed=4)
    page.set_input_files("#edit-image", str(source))
    page.wait_for_selector("#paint:not([hidden])")
    fill_form(page, "a blue car", seed=12)
    page.select_option("#size", "auto")
    page.evaluate(RECORD_FORMS)
    with page.expect_response(
        lambda r: r.url.endswith("/v1/images/jobs") and r.request.method == "POST"
    ) as answered:
        page.click("#queue-job")
    assert answered.value.status == 202, answered.value.text()
    parts = last_form(page, "/v1/images/jobs")
    assert parts["kind"] == b"edit" and parts["image"] == source.read_bytes()
    assert json.loads(parts["metadata"]) == {"prompt": "a blue car"}
    assert "stream" not in parts and "partial_images" not in parts and "mask" not in parts
    card = f".job[data-job-id='{answered.value.json()['id']}']"
    page.wait_for_selector(f"{card}[data-status='succeeded'] img", timeout=120_000)
    src = page.get_attribute(f"{card} img", "src")
    assert decode(src.split(",", 1)[1]).size == (SIDE, SIDE)


def test_a_job_image_the_safety_checker_withheld_shows_why(page: Any) -> None:
    withheld = {"message": "The image was withheld by the safety checker.", "code": "x"}
    job = {
        "id": "imgjob_withheld",
        "object": "image.job",
        "status": "succeeded",
        "progress": {"step": 4, "steps": 4},
        "queue_position": None,
        "metadata": {"prompt": "a flagged picture"},
        "result": {"output_format": "png", "data": [{"seed": 1, "error": withheld}]},
    }

    def listed(route: Any) -> None:
        route.fulfill(json={"object": "list", "data": [job], "has_more": False})

    page.route("**/v1/images/jobs?limit=*", listed)
    page.reload()
    card = ".job[data-job-id='imgjob_withheld']"
    page.wait_for_selector(f"{card} .job-withheld")
    assert page.text_content(f"{card} .job-withheld") == withheld["message"]
    assert page.locator(f"{card} img").count() == 0
