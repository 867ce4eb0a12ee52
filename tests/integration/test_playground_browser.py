"""The playground in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.playground_pages import playground_page

pytestmark = pytest.mark.integration


@pytest.fixture
def page(browser: Any, service: Any) -> Iterator[Any]:
    with playground_page(browser, service.root) as page:
        yield page


def images(page: Any) -> list[list[int]]:
    return page.evaluate(
        "[...document.querySelectorAll('#gallery figure img')]"
        ".map(image => [image.naturalWidth, image.naturalHeight])"
    )


def generate(page: Any, expected_images: int) -> None:
    page.click("#generate")
    page.wait_for_function(
        # Finished images only: a figure shows previews first, then its image.
        f"document.querySelectorAll('#gallery figure[data-previews]').length >= {expected_images}",
        timeout=120_000,
    )


def test_a_prompt_becomes_images_of_the_size_asked_with_their_seeds(page: Any) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    page.select_option("#size", "256x256")
    page.fill("#n", "2")
    page.fill("#seed", "42")
    page.fill("#num_inference_steps", "4")
    generate(page, 2)
    assert images(page) == [[256, 256], [256, 256]]
    captions = page.eval_on_selector_all(
        "#gallery figcaption span", "s => s.map(x => x.textContent)"
    )
    assert sorted(captions) == ["seed 42", "seed 43"]


# Records the natural size of every picture the gallery shows, previews included.
WATCH_GALLERY = """() => {
  window.shown = [];
  new MutationObserver(() => {
    for (const image of document.querySelectorAll('#gallery figure img')) {
      if (image.dataset.watched) continue;
      image.dataset.watched = '1';
      const label = image.closest('figure').querySelector('figcaption span').textContent;
      const record = () => window.shown.push([label, image.naturalWidth, image.naturalHeight]);
      image.decode().then(record);
    }
  }).observe(document.getElementById('gallery'), {childList: true, subtree: true});
}"""


def test_previews_come_before_each_image(page: Any) -> None:
    page.evaluate(WATCH_GALLERY)
    page.fill("#prompt", "a lighthouse at dusk")
    page.select_option("#size", "256x256")
    page.select_option("#partial_images", "2")
    page.fill("#n", "2")
    page.fill("#seed", "7")
    page.fill("#num_inference_steps", "6")
    generate(page, 2)
    page.wait_for_function(
        "document.querySelectorAll('#gallery figure[data-previews]').length == 2"
    )
    page.wait_for_function("window.shown.length >= 6")
    shown = page.evaluate("window.shown")
    previews = [entry for entry in shown if entry[0].startswith("preview")]
    finals = [entry for entry in shown if entry[0].startswith("seed")]
    assert sorted(label for label, _, _ in previews) == ["preview 1"] * 2 + ["preview 2"] * 2
    assert sorted(label for label, _, _ in finals) == ["seed 7", "seed 8"]
    assert {(w, h) for _, w, h in shown} == {(256, 256)}
    counts = page.eval_on_selector_all("#gallery figure", "fs => fs.map(f => f.dataset.previews)")
    assert counts == ["2", "2"]


def test_reusing_an_images_settings_gives_the_same_image(page: Any) -> None:
    page.fill("#prompt", "a red fox")
    page.select_option("#size", "256x256")
    page.fill("#num_inference_steps", "4")
    generate(page, 1)
    first = page.get_attribute("#gallery figure img", "src")
    seed = page.text_content("#gallery figcaption span")
    page.click("#gallery figure img")  # shows it large again, beside the form
    page.click("#viewer-reuse")  # puts its settings, seed included, back in the form
    assert f"seed {page.input_value('#seed')}" == seed
    generate(page, 2)
    assert page.get_attribute("#gallery figure:first-child img", "src") == first


def test_a_bad_value_shows_the_apis_message(page: Any) -> None:
    page.fill("#prompt", "x")
    page.fill("#n", "0")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "'n'" in page.text_content("#error")


@pytest.fixture(scope="module")
def models_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A service with SDXL_MODELS_DIR: the tiny base as a folder with a sidecar, and a file
    that is no checkpoint."""
    from sdxl_service.engine.tiny import ensure_tiny_pair
    from tests.service_process import REPO, running_service

    base, _ = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(base, models / "tiny-folder")
    (models / "tiny-folder.json").write_text('{"steps": 3, "guidance_scale": 4, "refiner": "none"}')
    (models / "junk.safetensors").write_bytes(b"\x00" * 64)
    env = {"SDXL_MODELS_DIR": str(models)}
    with running_service(tmp_path_factory.mktemp("models-service"), env) as running:
        yield running


def test_the_model_picker_lists_the_models_and_renders_with_the_one_picked(
    browser: Any, models_service: Any
) -> None:
    with playground_page(browser, models_service.root) as page:
        page.wait_for_selector("#model option[value='tiny-folder']", state="attached")
        options = page.eval_on_selector_all(
            "#model option", "os => os.map(o => [o.value, o.disabled, o.title])"
        )
        assert options[0][:2] == ["", False]
        by_value = {value: (disabled, title) for value, disabled, title in options}
        assert by_value["tiny-folder"] == (False, "")
        assert by_value["junk"][0] and "model 'junk'" in by_value["junk"][1]
        # Picking it shows its sidecar's defaults; the default model brings the form's back.
        page.select_option("#model", "tiny-folder")
        picked = [page.input_value(f) for f in ("#num_inference_steps", "#guidance_scale")]
        assert picked == ["3", "4"] and page.input_value("#refiner") == "none"
        page.select_option("#model", "")
        assert page.input_value("#num_inference_steps") == "30"
        assert page.input_value("#refiner") == "ensemble"
        page.select_option("#model", "tiny-folder")
        page.fill("#prompt", "a lighthouse")
        page.select_option("#size", "256x256")
        page.fill("#seed", "5")
        with page.expect_request("**/v1/images/generations") as sent:
            generate(page, 1)
        body = sent.value.post_data_json
        assert (body["model"], body["num_inference_steps"], body["refiner"]) == (
            "tiny-folder",
            3,
            "none",
        )
        assert images(page) == [[256, 256]]
        assert page.text_content("#gallery figcaption span") == "seed 5"
        # Its settings come back with the model when the image is clicked.
        page.select_option("#model", "")
        page.click("#gallery figure img")
        page.click("#viewer-reuse")
        assert page.input_value("#model") == "tiny-folder"


def job_card(job_id: str) -> str:
    return f".job[data-job-id='{job_id}']"


def queue_job(page: Any) -> str:
    """Clicks "Queue as job"; the id of the job the API made (202)."""
    with page.expect_response(
        lambda r: r.url.endswith("/v1/images/jobs") and r.request.method == "POST"
    ) as answered:
        page.click("#queue-job")
    assert answered.value.status == 202, answered.value.text()
    body = answered.value.request.post_data_json
    # The synchronous call's body, less what a job refuses (stream) or ignores (previews).
    assert "stream" not in body and "partial_images" not in body
    assert body["metadata"] == {"prompt": body["prompt"]}
    return answered.value.json()["id"]  # type: ignore[no-any-return]


def shown_image(page: Any, card: str) -> str:
    """The base64 of the card's image, checked to be a PNG data URL."""
    src = page.get_attribute(f"{card} img", "src")
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return src[len(prefix) :]  # type: ignore[no-any-return]


def test_a_queued_job_shows_its_image_is_still_there_after_a_reload_and_is_deleted(
    page: Any, http: Any
) -> None:
    from tests.decoded import decode

    prompt = "a lighthouse <img src=x onerror=alert(1)> at dusk"  # shown as text, not markup
    page.fill("#prompt", prompt)
    page.select_option("#size", "256x256")
    page.fill("#seed", "21")
    page.fill("#num_inference_steps", "4")
    job_id = queue_job(page)
    card = job_card(job_id)
    page.wait_for_selector(f"{card}[data-status='succeeded'] img", timeout=120_000)
    assert page.text_content(f"{card} .job-prompt") == prompt
    assert page.text_content(f"{card} .job-state") == "succeeded"
    assert page.eval_on_selector(f"{card} progress", "p => [p.value, p.max]") == [4, 4]
    shown = shown_image(page, card)
    assert decode(shown).size == (256, 256)
    job = http.get(f"/images/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and [d["seed"] for d in job["result"]["data"]] == [21]
    assert job["result"]["data"][0]["b64_json"] == shown
    page.wait_for_function("pollTimer === null")  # nothing queued or running: no more polls

    page.reload()
    page.wait_for_selector(f"{card}[data-status='succeeded'] img", timeout=30_000)
    assert page.text_content(f"{card} .job-prompt") == prompt
    assert shown_image(page, card) == shown
    assert page.text_content(f"{card} figcaption") == "seed 21"

    page.click(f"{card} button[data-action='delete']")
    page.wait_for_selector(card, state="detached")
    gone = http.get(f"/images/jobs/{job_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.service_process import running_service

    env = {"SDXL_API_KEYS": "playground-key,another-key"}
    with running_service(tmp_path_factory.mktemp("keyed-service"), env) as running:
        yield running


def test_with_api_keys_a_running_job_is_cancelled_from_the_page(
    browser: Any, keyed_service: Any
) -> None:
    import httpx

    from tests.polling import wait_until

    api = httpx.Client(
        base_url=keyed_service.api, headers={"Authorization": "Bearer playground-key"}, timeout=30
    )
    with api, playground_page(browser, keyed_service.root) as page:
        # The models and the jobs are both refused at load: one dialog asks for the key.
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "playground-key")
        page.click("#key-dialog button")
        # 150 steps at 512x512: seconds on the tiny preset, still running when Cancel lands.
        page.fill("#prompt", "a long render")
        page.select_option("#size", "512x512")
        page.fill("#num_inference_steps", "150")
        job_id = queue_job(page)
        card = job_card(job_id)
        running = wait_until(
            lambda: (
                (job := api.get(f"/images/jobs/{job_id}").json())["progress"]["step"] >= 1 and job
            ),
            timeout=120,
            interval=0.1,
            message="the job to run",
        )
        assert running["status"] == "running"
        page.click(f"{card} button[data-action='cancel']")
        page.wait_for_selector(f"{card}[data-status='cancelled']")
        job = api.get(f"/images/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["progress"]["step"] < 150
        assert page.text_content(f"{card} .job-error") == job["error"]["message"]
        assert page.locator(f"{card} img").count() == 0
        assert page.locator(f"{card} button[data-action='delete']").count() == 1
        # Made with the page's key: another key does not see it.
        other = httpx.get(
            f"{keyed_service.api}/images/jobs/{job_id}",
            headers={"Authorization": "Bearer another-key"},
        )
        assert other.status_code == 404


def test_the_strip_keeps_only_the_newest_images(page: Any) -> None:
    # The page keeps 40; two here, so three images show the oldest going.
    page.evaluate("document.getElementById('gallery').dataset.keep = '2'")
    page.select_option("#size", "256x256")
    page.fill("#num_inference_steps", "2")
    page.fill("#prompt", "a lighthouse")
    for seed in ("1", "2", "3"):
        page.fill("#seed", seed)
        page.click("#generate")
        page.wait_for_function(
            "document.querySelector('#gallery figure[data-previews]')?.dataset.seed == " + seed,
            timeout=120_000,
        )
        page.wait_for_selector("#generate:not([disabled])")
    seeds = page.eval_on_selector_all("#gallery figure", "fs => fs.map(f => f.dataset.seed)")
    assert seeds == ["3", "2"]
    # The newest is shown large; the one that went freed its place, not the viewer's.
    assert page.get_attribute("#viewer", "data-seed") == "3"


# Drops a PNG (base64) on the prompt as the browser does a file dragged from the desktop.
DROP_FILE = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dropped = new DataTransfer();
  dropped.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
  const drop = { dataTransfer: dropped, bubbles: true, cancelable: true };
  document.getElementById("prompt").dispatchEvent(new DragEvent("drop", drop));
}"""


def test_an_images_settings_read_from_its_file_make_it_again(
    page: Any, service: Any, tmp_path: Any
) -> None:
    """AUTOMATIC1111's PNG Info in the page: an image made elsewhere (a size and a scheduler
    the form's lists do not hold, a hires fix and clip skip it has no inputs for) dropped on
    "Read an image's settings" fills the form; generating gives the same pixels."""
    import base64
    import io

    import httpx
    import numpy as np
    from PIL import Image

    body = {
        "prompt": "a lighthouse, at dusk: oil on canvas",
        "negative_prompt": "blurry",
        "size": "128x128",
        "seed": 4321,
        "num_inference_steps": 4,
        "guidance_scale": 4.5,
        "scheduler": "dpmpp_3m_sde",
        "schedule_type": "exponential",
        "clip_skip": 2,
        "refiner": "none",
        "hires": {"scale": 2, "steps": 2, "denoising_strength": 0.5},
    }
    made = httpx.post(f"{service.api}/images/generations", json=body, timeout=120)
    assert made.status_code == 200, made.text
    data = base64.b64decode(made.json()["data"][0]["b64_json"])
    path = tmp_path / "made-elsewhere.png"
    path.write_bytes(data)

    page.set_input_files("#infotext-image", str(path))
    page.wait_for_function("document.getElementById('prompt').value !== ''", timeout=30_000)
    assert page.input_value("#prompt") == body["prompt"]
    assert page.input_value("#negative_prompt") == "blurry"
    assert page.input_value("#size") == "128x128"
    assert page.input_value("#scheduler") == "dpmpp_3m_sde"
    assert page.input_value("#seed") == "4321"
    assert page.input_value("#refiner") == "none"
    note = page.text_content("#infotext-note")
    assert "schedule_type" in note and "hires" in note and "clip_skip" in note

    page.select_option("#partial_images", "0")
    generate(page, 1)
    src = page.get_attribute("#gallery figure img", "src")
    shown = base64.b64decode(src.split(",", 1)[1])
    with Image.open(io.BytesIO(shown)) as again, Image.open(io.BytesIO(data)) as first:
        assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(first.convert("RGB")))

    # Dropped on the form, as a file from the desktop.
    page.fill("#prompt", "")
    page.evaluate(DROP_FILE, base64.b64encode(data).decode())
    page.wait_for_function("document.getElementById('prompt').value !== ''", timeout=30_000)
    assert page.input_value("#prompt") == body["prompt"]

    plain = tmp_path / "plain.png"
    Image.new("RGB", (16, 16)).save(plain)
    page.set_input_files("#infotext-image", str(plain))
    page.wait_for_function(
        "document.getElementById('infotext-note').textContent.includes('no settings')"
    )
