"""The command line: plugins, check, decompose."""

import subprocess
import sys

from PIL import Image

import vitdecomp
from vitdecomp.cli import main


def test_plugins_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "timm_vit" in out and "built-in" in out and "open_clip" in out


def test_check_random_init(capsys):
    code = main(["check", "timm:deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--batch", "1",
                 "--dtype", "float64", "--tokens"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "error" in out and "tolerance 1e-10: OK" in out and "ratio" in out and "2×2 patches" in out


def test_check_open_clip(capsys, tiny_clip_name):
    assert main(["check", f"open_clip:{tiny_clip_name}", "--random-init", "--batch", "1"]) == 0
    assert "open_clip-vit" in capsys.readouterr().out


def test_decompose_writes_file(tmp_path, capsys):
    from skimage import data

    paths = []
    for name in ("astronaut", "coffee"):
        p = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(p)
        paths.append(str(p))
    out = tmp_path / "dec.safetensors"
    assert main(["decompose", "timm:deit_tiny_patch16_224", "--random-init", *paths, "--out", str(out)]) == 0
    dec = vitdecomp.Decomposition.load(out)
    assert dec.contributions.shape[:2] == (2, len(dec.names)) and dec.error < 1e-5
    assert dec.meta["images"] == paths and dec.meta["model"] == "timm:deit_tiny_patch16_224"


def test_errors_are_one_line(capsys):
    assert main(["check", "timm:not_a_model_xyz", "--random-init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitdecomp: error: timm has no model named")


def test_entry_point_script():
    out = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout and "decompose" in out.stdout
