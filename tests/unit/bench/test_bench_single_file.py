"""The single-file case of the fullsize bench: its streaming safetensors writer."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.fullsize_single_file import save_streaming, single_file_of


def test_the_streaming_writer_writes_what_safetensors_reads_back(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "b.half": torch.randn(3, 5).half(),
        "a.bf16": torch.randn(7).bfloat16(),
        # A view that is not contiguous (a transpose) and one of a larger tensor.
        "c.transposed": base.T,
        "d.slice": base[1:3],
        "e.scalar": torch.tensor(4.6),
        "f.ids": torch.arange(77).unsqueeze(0),
    }
    read = load_file(save_streaming(tensors, tmp_path / "x.safetensors"))
    assert set(read) == set(tensors)
    for key, tensor in tensors.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key


def test_the_single_file_is_kept_beside_the_folders_not_in_them() -> None:
    # The fullsize bench counts and reads every .safetensors under the models folder.
    models = Path("/cache/bench-fullsize")
    assert not single_file_of(models).is_relative_to(models)
