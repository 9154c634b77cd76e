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


def test_flags_have_one_spelling_and_old_ones_still_work(capsys):
    """Canonical names across commands; the old spellings are hidden, deprecated aliases."""
    import argparse

    from vitdecomp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    visible = {name: {o for a in sp._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
               for name, sp in sub.choices.items()}
    for name, opts in visible.items():
        assert not opts & {"--batch", "--no-progress", "--img-size"}, name
        if name in ("check", "decompose", "extract", "heatmap", "segment", "ablate", "spurious"):
            assert {"--image-size", "--init-seed"} <= opts, name
    for name in ("describe", "score", "retrieve", "heatmap", "spurious"):
        assert {"--text-model", "--text-weights", "--text-random-init"} <= visible[name], name
        assert "--clip" not in visible[name]
    for name in ("extract", "align", "describe", "score", "retrieve", "heatmap", "segment", "ablate", "spurious"):
        assert "--quiet" in visible[name] and "--batch-size" in visible[name], name
    # defaults are shown in --help
    from vitdecomp._cli_common import HelpFormatter

    for name, sp in sub.choices.items():
        fmt = HelpFormatter(name)
        for a in sp._actions:
            meaningful = a.default not in (None, False, [], argparse.SUPPRESS) and a.nargs != 0
            if a.option_strings and meaningful and a.help != argparse.SUPPRESS:
                assert "default" in fmt._get_help_string(a), (name, a.option_strings)
    with __import__("pytest").raises(SystemExit):
        main(["check", "--help"])
    assert "(default: 2)" in capsys.readouterr().out
    # old spellings parse to the same values, with a warning naming the new one
    old = parser.parse_args(["check", "m:x", "--batch", "3", "--img-size", "32"])
    new = parser.parse_args(["check", "m:x", "--batch-size", "3", "--image-size", "32"])
    assert (old.batch_size, old.image_size) == (new.batch_size, new.image_size) == (3, [32])
    assert "--batch is deprecated; use --batch-size" in capsys.readouterr().err
    a = parser.parse_args(["heatmap", "m:x", "i.png", "--aligner", "a", "--out", "o", "--no-progress",
                           "--clip", "ViT-B-16", "--clip-random-init"])
    assert a.quiet and a.text_model == "ViT-B-16" and a.text_random_init


def test_check_reports_the_median_of_several_runs(capsys):
    code = main(["check", "timm:deit_tiny_patch16_224", "--random-init", "--image-size", "32", "--batch-size", "1",
                 "--repeat", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "median of 3" in out and "–" in out
    assert main(["check", "timm:deit_tiny_patch16_224", "--random-init", "--image-size", "32", "--repeat", "0"]) == 2
    assert "--repeat must be ≥ 1" in capsys.readouterr().err
