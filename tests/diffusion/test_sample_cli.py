"""``diffquant sample`` argument parsing and handler, on a tiny local diffusers folder."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from diffquant.diffusion.sample_cli import add_sample_parser
from diffquant.errors import DiffquantError


def parse(argv):
    parser = argparse.ArgumentParser(prog="diffquant")
    add_sample_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_sample_command_writes_outputs(tmp_path, capsys):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, num_class_embeds=11, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "model")
    args = parse(["sample", "--model", str(tmp_path / "model"), "--n", "3", "--steps", "2",
                  "--scheduler", "ddpm", "--guidance", "2", "--classes", "4,5", "--seed", "1",
                  "--batch-size", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.handler(args) == 0
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["images"].shape == (3, 8, 8, 1) and data["labels"].tolist() == [4, 5, 4]
    assert (tmp_path / "out" / "grid.png").is_file()
    assert "wrote 3 samples" in capsys.readouterr().out


def test_sample_command_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        parse(["sample", "--out", str(tmp_path), "--scheduler", "euler"])
    args = parse(["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(DiffquantError, match="not found"):
        args.handler(args)
