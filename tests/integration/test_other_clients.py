"""Clients nobody here wrote, as their users call them, against the real service."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def test_langchains_dall_e_wrapper_gets_urls_it_can_download(service_url: str) -> None:
    # It reads only `url` and cannot ask for b64_json: dall-e requests must
    # default to url as OpenAI's do (it crashed with b64_json answers).
    from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

    wrapper = DallEAPIWrapper(
        model="dall-e-2", n=2, size="256x256", base_url=service_url, api_key="any-string"
    )
    urls = wrapper.run("a lighthouse at dusk").split(wrapper.separator)
    assert len(urls) == 2
    for url in urls:
        download = httpx.get(url, timeout=60)
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(download.content))
        assert (image.format, image.size) == ("PNG", (256, 256))
