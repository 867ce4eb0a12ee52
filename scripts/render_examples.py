#!/usr/bin/env python3
"""Render the Prem registry's four example prompts through a running service.

    scripts/render_examples.py [BASE_URL] [--out DIR] [--size WxH] [--steps N]
                               [--update-readme] [--force] [--image-base-url URL]

Goes through the OpenAI-compatible API with the official `openai` client, as a
user would, with a fixed seed per prompt so the gallery can be reproduced. It
writes `NN-<slug>.png` and `gallery.md` (the README's gallery section) into
`--out`; `--update-readme` also replaces the section between the markers in the
registry README. That refuses unless the service says it runs the real SDXL
weights (`"preset": "sdxl"` in GET /v1/models): tiny-preset renders are noise
and must never be published as SDXL output.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE_URL = "http://localhost:9225/v1"
DEFAULT_OUT = REPO / "build" / "examples"
REGISTRY_README = REPO / "registry" / "diffuser-stable-diffusion-xl-with-refiner" / "README.md"
START_MARKER = "<!-- examples:start -->"
END_MARKER = "<!-- examples:end -->"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REAL_PRESET = "sdxl"

EXIT_REFUSED = 2


@dataclass(frozen=True)
class Example:
    slug: str
    prompt: str
    seed: int


# The registry page's prompts, verbatim (typos included: they are its examples).
EXAMPLES: tuple[Example, ...] = (
    Example(
        "iron_man",
        "Iron man portrait, highly detailed, science fiction landscape, "
        "art style by klimt and nixeu and ian sprigger and wlop and krenz cushart",
        seed=1001,
    ),
    Example("panda", "Low polygon panda 3d", seed=1002),
    Example("rick_and_morty", "3d hiper-realistic rick sanchez and morty", seed=1003),
    Example(
        "brad_pitt",
        "Synthwave brad pitt wearing headphones, animated, trending on artstation, portrait",
        seed=1004,
    ),
)


@dataclass(frozen=True)
class RenderedExample:
    example: Example
    filename: str
    seed: int
    size: str


class RefusedError(Exception):
    """The run would publish something it must not; the message says why."""


def service_preset(client: Any) -> str | None:
    """The preset the service reports on GET /v1/models; None when it does not say."""
    presets = {getattr(model, "preset", None) for model in client.models.list().data}
    if len(presets) != 1:
        return None
    return presets.pop()


def readme_refusal(preset: str | None, force: bool) -> str | None:
    """Why the README must not be updated from this service, or None when it may."""
    if preset == REAL_PRESET or force:
        return None
    if preset == "tiny":
        return (
            "the service runs the tiny preset (random weights): its images are noise, "
            "not SDXL output. Start it with SDXL_PRESET=sdxl on a GPU machine."
        )
    return (
        f"the service does not report the sdxl preset (GET /v1/models says preset={preset!r}); "
        "if it is still loading, wait for /readyz. Pass --force only if you know it runs "
        "the real SDXL weights."
    )


def render_examples(
    client: Any,
    out_dir: Path,
    size: str,
    steps: int | None = None,
    examples: Sequence[Example] = EXAMPLES,
) -> list[RenderedExample]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = []
    for number, example in enumerate(examples, start=1):
        extra_body: dict[str, Any] = {"seed": example.seed}
        if steps is not None:
            extra_body["num_inference_steps"] = steps
        response = client.images.generate(
            prompt=example.prompt,
            n=1,
            size=size,
            response_format="b64_json",
            extra_body=extra_body,
        )
        image = response.data[0]
        data = base64.b64decode(image.b64_json)
        if not data.startswith(PNG_SIGNATURE):
            raise RuntimeError(f"the service did not answer a PNG for {example.slug!r}")
        filename = f"{number:02d}-{example.slug}.png"
        (out_dir / filename).write_bytes(data)
        # The service echoes the seed it used; fall back to ours if it does not.
        seed = getattr(image, "seed", None)
        rendered.append(
            RenderedExample(example, filename, example.seed if seed is None else seed, size)
        )
        print(f"{filename}: seed {example.seed}, {len(data)} bytes", file=sys.stderr)
    return rendered


def _keycap(number: int) -> str:
    return f"{number}\ufe0f\u20e3"


def gallery_markdown(
    rendered: Sequence[RenderedExample], image_base: str, preset: str | None
) -> str:
    """The README's gallery section, markers excluded."""
    lines = []
    if preset != REAL_PRESET:
        lines += [
            f"> **Not SDXL output**: rendered by a service reporting preset={preset!r}.",
            "",
        ]
    lines += [
        "Rendered through this service's API by `scripts/render_examples.py` "
        "(SDXL base 1.0 + refiner 1.0, default settings, one fixed seed per prompt).",
        "",
    ]
    base = image_base.rstrip("/")
    for number, item in enumerate(rendered, start=1):
        link = f"{base}/{item.filename}" if base else item.filename
        lines += [
            f"### {_keycap(number)} Prompt: {item.example.prompt}",
            f"![{item.example.slug}]({link})",
            "",
            f"<sub>seed {item.seed}, {item.size}</sub>",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_gallery(readme: str, gallery: str) -> str:
    """The README with the text between the two markers replaced by `gallery`."""
    if readme.count(START_MARKER) != 1 or readme.count(END_MARKER) != 1:
        raise ValueError(f"the README needs exactly one {START_MARKER} and one {END_MARKER}")
    head, rest = readme.split(START_MARKER)
    _, tail = rest.split(END_MARKER)
    if END_MARKER in head:
        raise ValueError(f"{END_MARKER} comes before {START_MARKER}")
    return f"{head}{START_MARKER}\n{gallery.strip(chr(10))}\n{END_MARKER}{tail}"


def image_base_for(readme: Path, out_dir: Path, image_base_url: str | None) -> str:
    """How the README links to the images: the given URL, or a path relative to it."""
    if image_base_url:
        return image_base_url
    relative = Path(os.path.relpath(out_dir.resolve(), readme.resolve().parent))
    if relative.parts and relative.parts[0] == "..":
        # The registry copies only its app folder: a link outside it would break.
        raise RefusedError(
            f"--out {out_dir} is outside {readme.parent}; write the images inside it "
            "(e.g. --out registry/diffuser-stable-diffusion-xl-with-refiner/examples) "
            "or pass --image-base-url"
        )
    return "" if relative == Path(".") else relative.as_posix()


def run(args: argparse.Namespace, client: Any) -> int:
    out_dir: Path = args.out
    try:
        preset = service_preset(client)
    except Exception as error:  # an older service without /v1/models
        print(f"could not read the preset from GET /v1/models: {error}", file=sys.stderr)
        preset = None
    try:
        if args.update_readme:
            refusal = readme_refusal(preset, args.force)
            if refusal:
                raise RefusedError(f"refusing to update {args.readme}: {refusal}")
            image_base = image_base_for(args.readme, out_dir, args.image_base_url)
        else:
            image_base = args.image_base_url or ""
    except RefusedError as error:
        print(error, file=sys.stderr)
        return EXIT_REFUSED

    rendered = render_examples(client, out_dir, args.size, args.steps)
    gallery = gallery_markdown(rendered, image_base, preset)
    (out_dir / "gallery.md").write_text(gallery)
    print(f"wrote {len(rendered)} images and gallery.md to {out_dir}", file=sys.stderr)
    if args.update_readme:
        args.readme.write_text(replace_gallery(args.readme.read_text(), gallery))
        print(f"updated the gallery section of {args.readme}", file=sys.stderr)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", nargs="?", default=DEFAULT_BASE_URL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the service's)")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--readme", type=Path, default=REGISTRY_README)
    parser.add_argument("--image-base-url", help="prefix of the image links in the gallery")
    parser.add_argument(
        "--force", action="store_true", help="update the README even if the preset is not sdxl"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from openai import OpenAI

    client = OpenAI(
        base_url=args.base_url,
        # The service ignores the key; the client insists on one. Not
        # OPENAI_API_KEY: a real key has no business going to this host.
        api_key="not-needed",
        timeout=args.timeout,
    )
    return run(args, client)


if __name__ == "__main__":
    sys.exit(main())
