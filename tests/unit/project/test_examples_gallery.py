"""scripts/render_examples.py without a server: gallery, README section, refusals.

The run against the real (tiny-preset) service is
tests/integration/test_render_examples.py.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
REGISTRY_APP = REPO / "registry" / "diffuser-stable-diffusion-xl-with-refiner"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_examples", REPO / "scripts" / "render_examples.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_script()


class FakeClient:
    """Stands in for openai.OpenAI: models.list() and images.generate()."""

    def __init__(self, presets: list[str | None]) -> None:
        self.calls: list[dict[str, Any]] = []
        self.models = SimpleNamespace(
            list=lambda: SimpleNamespace(
                data=[SimpleNamespace(id=f"m{i}", preset=p) for i, p in enumerate(presets)]
            )
        )
        self.images = SimpleNamespace(generate=self._generate)

    def _generate(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(kwargs)
        item = SimpleNamespace(b64_json=base64.b64encode(PNG).decode(), seed=None)
        return SimpleNamespace(data=[item])


def _rendered() -> list[Any]:
    return [
        render.RenderedExample(example, f"{i:02d}-{example.slug}.png", example.seed, "1024x1024")
        for i, example in enumerate(render.EXAMPLES, start=1)
    ]


def _args(tmp_path: Path, *extra: str) -> Any:
    return render.parse_args(["--out", str(tmp_path / "out"), *extra])


# ---- the examples -------------------------------------------------------------


def test_examples_are_the_registry_pages_four_prompts() -> None:
    # The registry page in the repository, not the seed copy outside it: that
    # one is missing in a clone or CI, where the comparison silently passed.
    prompts = [e.prompt for e in render.EXAMPLES]
    readme = (REGISTRY_APP / "README.md").read_text()
    page_prompts = re.findall(r"^### .*? Prompt: (.+?)\s*$", readme, re.M)

    assert len(prompts) == 4
    assert prompts == page_prompts
    assert all(f"Prompt: {prompt}\n" in readme for prompt in prompts)


def test_examples_have_distinct_fixed_seeds_and_slugs() -> None:
    assert len({e.seed for e in render.EXAMPLES}) == 4
    assert len({e.slug for e in render.EXAMPLES}) == 4
    assert all(re.fullmatch(r"[a-z0-9_]+", e.slug) for e in render.EXAMPLES)


# ---- gallery markdown -----------------------------------------------------------


def test_gallery_lists_each_prompt_with_its_image_and_seed() -> None:
    gallery = render.gallery_markdown(_rendered(), "examples", "sdxl")

    for number, example in enumerate(render.EXAMPLES, start=1):
        assert f"### {number}\ufe0f\u20e3 Prompt: {example.prompt}\n" in gallery
        assert f"![{example.slug}](examples/{number:02d}-{example.slug}.png)" in gallery
        assert f"seed {example.seed}, 1024x1024" in gallery
    assert "Not SDXL output" not in gallery
    assert render.START_MARKER not in gallery


def test_gallery_links_next_to_the_readme_and_to_urls() -> None:
    beside = render.gallery_markdown(_rendered(), "", "sdxl")
    assert "](01-iron_man.png)" in beside
    hosted = render.gallery_markdown(_rendered(), "https://example.org/img/", "sdxl")
    assert "](https://example.org/img/01-iron_man.png)" in hosted


@pytest.mark.parametrize("preset", ["tiny", None])
def test_gallery_of_anything_but_sdxl_says_so(preset: str | None) -> None:
    gallery = render.gallery_markdown(_rendered(), "", preset)
    assert gallery.startswith("> **Not SDXL output**")


# ---- README section replacement --------------------------------------------------

README = f"""# Doc

## Example Usage

{render.START_MARKER}
old gallery
{render.END_MARKER}

## License
"""


def test_replace_gallery_changes_only_the_marked_section() -> None:
    updated = render.replace_gallery(README, "new gallery\n")

    assert "old gallery" not in updated
    assert f"{render.START_MARKER}\nnew gallery\n{render.END_MARKER}" in updated
    assert updated.startswith("# Doc\n\n## Example Usage\n\n")
    assert updated.endswith(f"{render.END_MARKER}\n\n## License\n")


def test_replace_gallery_is_idempotent() -> None:
    once = render.replace_gallery(README, "new gallery\n")
    assert render.replace_gallery(once, "new gallery\n") == once


@pytest.mark.parametrize(
    "readme",
    [
        "# no markers\n",
        f"{render.START_MARKER}\nonly a start\n",
        f"{render.END_MARKER}\nreversed\n{render.START_MARKER}\n",
        f"{render.START_MARKER}\n{render.END_MARKER}\n{render.START_MARKER}\n{render.END_MARKER}\n",
    ],
)
def test_replace_gallery_rejects_broken_markers(readme: str) -> None:
    with pytest.raises(ValueError):
        render.replace_gallery(readme, "gallery")


def test_registry_readme_has_one_gallery_section() -> None:
    readme = (REGISTRY_APP / "README.md").read_text()
    assert render.replace_gallery(readme, "x") != readme


def test_registry_readme_images_exist() -> None:
    # Anything linked from the gallery must be committed beside it (or hosted),
    # so a half-finished render cannot leave broken images in the registry page.
    readme = (REGISTRY_APP / "README.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        if not link.startswith("https://"):
            assert (REGISTRY_APP / link).is_file(), link


# ---- the tiny-preset refusal ---------------------------------------------------------


def test_refusal_depends_on_the_reported_preset() -> None:
    assert render.readme_refusal("sdxl", force=False) is None
    assert "tiny preset" in render.readme_refusal("tiny", force=False)
    assert "does not report the sdxl preset" in render.readme_refusal(None, force=False)
    assert render.readme_refusal(None, force=True) is None
    assert render.readme_refusal("tiny", force=True) is None


def test_service_preset_reads_the_models_list() -> None:
    assert render.service_preset(FakeClient(["sdxl"])) == "sdxl"
    assert render.service_preset(FakeClient(["tiny"])) == "tiny"
    assert render.service_preset(FakeClient([None])) is None
    assert render.service_preset(FakeClient(["sdxl", "tiny"])) is None
    assert render.service_preset(FakeClient([])) is None


def test_update_readme_against_tiny_refuses_before_rendering(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    client = FakeClient(["tiny"])
    args = _args(tmp_path, "--update-readme", "--readme", str(readme))

    assert render.run(args, client) == render.EXIT_REFUSED

    assert client.calls == []
    assert readme.read_text() == README
    assert "tiny preset" in capsys.readouterr().err


def test_update_readme_refuses_links_outside_the_registry_folder(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    readme = tmp_path / "app" / "README.md"
    readme.write_text(README)
    args = render.parse_args(
        ["--out", str(tmp_path / "elsewhere"), "--update-readme", "--readme", str(readme)]
    )

    assert render.run(args, FakeClient(["sdxl"])) == render.EXIT_REFUSED
    assert readme.read_text() == README


def test_run_without_update_writes_images_and_gallery_only(tmp_path: Path) -> None:
    client = FakeClient(["tiny"])

    assert render.run(_args(tmp_path, "--size", "128x128", "--steps", "2"), client) == 0

    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "01-iron_man.png",
        "02-panda.png",
        "03-rick_and_morty.png",
        "04-brad_pitt.png",
        "gallery.md",
    ]
    assert (out / "gallery.md").read_text().startswith("> **Not SDXL output**")
    assert [c["extra_body"] for c in client.calls] == [
        {"seed": e.seed, "num_inference_steps": 2} for e in render.EXAMPLES
    ]
    assert {c["size"] for c in client.calls} == {"128x128"}
    assert {c["response_format"] for c in client.calls} == {"b64_json"}


def test_run_with_update_rewrites_the_readme_section(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    readme = app / "README.md"
    readme.write_text(README)
    args = render.parse_args(
        ["--out", str(app / "examples"), "--update-readme", "--readme", str(readme)]
    )

    assert render.run(args, FakeClient(["sdxl"])) == 0

    text = readme.read_text()
    assert "old gallery" not in text
    assert "![panda](examples/02-panda.png)" in text
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (app / link).is_file()
