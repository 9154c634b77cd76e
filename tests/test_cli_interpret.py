"""The extract → align → describe → score command line on a random-init timm ViT and a tiny open_clip model."""

import json

import pytest
import torch
from PIL import Image
from skimage import data as skdata

import open_clip
from vitdecomp.cli import build_parser, main

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_clip_name):
    """Images in class folders, a saved tiny CLIP checkpoint, and a cache + aligner made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name)
    torch.save(clip.state_dict(), root / "clip.pt")
    for label, arr in {"cat": skdata.chelsea(), "cup": skdata.coffee(), "man": skdata.astronaut()}.items():
        (root / "img" / label).mkdir(parents=True)
        im = Image.fromarray(arr)
        for k, angle in enumerate((0, 90, 180, 270)):
            im.rotate(angle).resize((36, 36)).save(root / "img" / label / f"{k}.png")
    (root / "pool.txt").write_text("\n".join(f"description number {i}" for i in range(30)))
    torch.manual_seed(0)
    rc = main(["extract", "timm:vit_tiny_patch16_224", str(root / "img"), "--out", str(root / "cache"),
               "--random-init", "--img-size", "32", "--clip", f"open_clip:{tiny_clip_name}",
               "--clip-weights", str(root / "clip.pt"), "--batch-size", "4", "--shard-size", "5", "--quiet",
               "--dtype", "float32"])
    assert rc == 0
    rc = main(["align", str(root / "cache"), "--out", str(root / "aligner.safetensors"), "--epochs", "3",
               "--batch-size", "4", "--val-fraction", "0.25", "--quiet"])
    assert rc == 0
    return root


def _text_args(root):
    return ["--aligner", str(root / "aligner.safetensors"), "--text-weights", str(root / "clip.pt"), "--quiet"]


def test_extract_and_align_outputs(workdir, capsys, tiny_clip_name):
    from vitdecomp.compalign import Aligner
    from vitdecomp.extraction import ExtractionCache

    cache = ExtractionCache.open(workdir / "cache")
    assert len(cache) == 12 and set(cache.labels()) == {"cat", "cup", "man"}
    assert cache.clip_model == f"open_clip:{tiny_clip_name}"
    assert cache.target_dim == open_clip.get_model_config(tiny_clip_name)["embed_dim"]
    al = Aligner.load(workdir / "aligner.safetensors")
    assert al.names == cache.names and al.clip_model == cache.clip_model and al.held_out_cosine is not None


def test_describe_json_and_markdown(workdir, capsys):
    out = workdir / "spans.json"
    rc = main(["describe", str(workdir / "cache"), *_text_args(workdir), "--pool", str(workdir / "pool.txt"),
               "--components", "blocks.11.attn.head.*", "embed", "--iters", "3", "--rank", "8", "--format", "json",
               "--out", str(out)])
    assert rc == 0
    spans = json.loads(out.read_text())
    assert list(spans) == ["embed", "blocks.11.attn.head.0", "blocks.11.attn.head.1", "blocks.11.attn.head.2"]
    pool = set((workdir / "pool.txt").read_text().splitlines())
    for picks in spans.values():
        assert len(picks) == 3 and all(p["text"] in pool for p in picks)
        assert sum(p["variance_explained"] for p in picks) <= 1 + 1e-9
    rc = main(["describe", str(workdir / "cache"), *_text_args(workdir), "--pool", str(workdir / "pool.txt"),
               "--components", "norm.bias", "blocks.0.mlp", "--iters", "2", "--format", "markdown"])
    assert rc == 0
    md = capsys.readouterr().out
    assert "### `blocks.0.mlp`" in md and "| # | text | variance explained |" in md


def test_describe_embeds_the_pool_as_given_unless_templates_are_asked_for(workdir, tmp_path):
    """TextSpan's pool is embedded without the 80 ImageNet templates by default (Gandelsman et al.); the on-disk
    text cache is keyed by the template set, so it shows which one was used."""
    from vitdecomp.compalign import Aligner
    from vitdecomp.extraction import ExtractionCache
    from vitdecomp.spans import textspan
    from vitdecomp.text import TextEncoder, load_text_pool

    out = tmp_path / "raw.json"
    base = ["describe", str(workdir / "cache"), *_text_args(workdir), "--pool", str(workdir / "pool.txt"),
            "--components", "blocks.0.mlp", "--iters", "3", "--rank", "8", "--format", "json"]
    assert main([*base, "--text-cache", str(tmp_path / "raw"), "--out", str(out)]) == 0
    assert [p.name.rsplit("__", 1)[1] for p in (tmp_path / "raw").iterdir()][0].startswith("raw.")
    picks = [p["text"] for p in json.loads(out.read_text())["blocks.0.mlp"]]
    import open_clip

    clip = open_clip.create_model(ExtractionCache.open(workdir / "cache").clip_model.split(":", 1)[1])
    clip.load_state_dict(torch.load(workdir / "clip.pt"))
    pool = load_text_pool(workdir / "pool.txt")
    al = Aligner.load(workdir / "aligner.safetensors")
    X = al.align_components(ExtractionCache.open(workdir / "cache"), ["blocks.0.mlp"])[:, 0]
    want = textspan(X, TextEncoder.from_model(clip).encode(pool, templates=None), pool, iters=3, rank=8)
    assert picks == [w.text for w in want]
    assert main([*base, "--templates", "imagenet", "--text-cache", str(tmp_path / "tpl"),
                 "--out", str(tmp_path / "tpl.json")]) == 0
    assert [p.name.rsplit("__", 1)[1] for p in (tmp_path / "tpl").iterdir()][0].startswith("imagenet.")


def test_score_table_json_and_plot(workdir, capsys, tiny_clip_name):
    from vitdecomp.compalign import Aligner
    from vitdecomp.extraction import ExtractionCache
    from vitdecomp.properties import get_property
    from vitdecomp.scores import mean_correlation
    from vitdecomp.text import TextEncoder

    png = workdir / "color.png"
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "color", "--property", "shape",
               "--top", "5", "--format", "json", "--plot", str(png)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    ranking = report["ranking"]["color"]
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(ranking, ranking[1:]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers through the Python API
    cache, al = ExtractionCache.open(workdir / "cache"), Aligner.load(workdir / "aligner.safetensors")
    enc = TextEncoder.from_pretrained(tiny_clip_name, pretrained=str(workdir / "clip.pt"))
    aligned = al(cache.contributions())
    ref = mean_correlation(aligned, get_property("color").embed(enc))
    other = mean_correlation(aligned, get_property("shape").embed(enc))
    best = int(torch.argmax(ref))
    assert ranking[0]["component"] == cache.names[best]
    assert ranking[0]["score"] == pytest.approx(float(ref[best]), abs=1e-6)
    for r in ranking:  # specificity against the other property, not a copy of the score
        i = cache.names.index(r["component"])
        assert r["specificity"] == pytest.approx(float(ref[i] - other[i].clamp_min(0)), abs=1e-6)
    assert report["specificity_against"] == ["color", "shape"]
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "texture", "--top", "3"])
    table = capsys.readouterr().out
    assert rc == 0 and "rough texture" in table and "component" in table and len(table.strip().splitlines()) == 6
    assert "specific" not in table.splitlines()[1] and "specificity not shown: one property" in table
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "texture", "--top", "3",
               "--format", "json"])
    assert all(r["specificity"] is None for r in json.loads(capsys.readouterr().out)["ranking"]["texture"])
    assert main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "texture",
                 "--sort", "specificity"]) == 2
    assert "--against" in capsys.readouterr().err
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "texture", "--against", "color",
               "--top", "3", "--format", "json"])
    rep_t = json.loads(capsys.readouterr().out)
    assert list(rep_t["ranking"]) == ["texture"] and rep_t["specificity_against"] == ["texture", "color"]
    tex = mean_correlation(aligned, get_property("texture").embed(enc))
    for r in rep_t["ranking"]["texture"]:
        i = cache.names.index(r["component"])
        assert r["specificity"] == pytest.approx(float(tex[i] - ref[i].clamp_min(0)), abs=1e-6)


def test_score_user_properties_and_errors(workdir, capsys):
    props = workdir / "mine.toml"
    props.write_text('material = ["wooden object", "metal object"]\n')
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--properties-file", str(props),
               "--format", "markdown", "--top", "2"])
    assert rc == 0 and "### material" in capsys.readouterr().out
    rc = main(["score", str(workdir / "cache"), *_text_args(workdir), "--property", "colour"])
    err = capsys.readouterr().err
    assert rc == 2 and "Unknown property 'colour'" in err and "waterbirds_core" in err


def test_align_identity_and_mismatch(workdir, capsys, tiny_clip_name):
    from vitdecomp.compalign import Aligner

    out = workdir / "identity.safetensors"
    assert main(["align", str(workdir / "cache"), "--identity", "--out", str(out)]) == 0
    assert Aligner.load(out).is_identity
    Aligner.identity(["a", "b"], 192).save(workdir / "other.safetensors")
    rc = main(["score", str(workdir / "cache"), "--aligner", str(workdir / "other.safetensors"),
               "--text-weights", str(workdir / "clip.pt"), "--text-model", f"open_clip:{tiny_clip_name}",
               "--property", "color", "--quiet"])
    assert rc == 2 and "other components" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["extract", "align", "describe", "score"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"vitdecomp {command} " in out


def test_align_reports_baseline_and_method(workdir, capsys, tmp_path):
    from vitdecomp.compalign import Aligner

    for method in ("dual", "bcd", "joint", "adam"):
        out = tmp_path / f"{method}.safetensors"
        with pytest.warns(UserWarning, match="held out"):  # 3 of 12 images: too few to mean much, and said so
            rc = main(["align", str(workdir / "cache"), "--out", str(out), "--method", method, "--epochs", "2",
                       "--val-fraction", "0.25", "--quiet"])
        assert rc == 0
        text = capsys.readouterr().out
        al = Aligner.load(out)
        assert al.config["method"] == method
        assert f"held-out cosine {al.held_out_cosine:.4f} on 3 images" in text
        assert f"baseline, one shared linear map of the summed representation: {al.init_cosine:.4f}" in text
        assert f"best {dict(bcd='sweep', joint='iteration', dual='iteration', adam='epoch')[method]} " in text
        assert al.config["isometric"] is False
    out = tmp_path / "isometric.safetensors"
    with pytest.warns(UserWarning, match="held out"):
        assert main(["align", str(workdir / "cache"), "--out", str(out), "--method", "adam", "--epochs", "2",
                     "--val-fraction", "0.25", "--isometric", "--quiet"]) == 0
    al = Aligner.load(out)
    assert al.config["isometric"] is True
    gram = al.weight.transpose(1, 2) @ al.weight if al.weight.shape[1] >= al.weight.shape[2] else \
        al.weight @ al.weight.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-5, rtol=0)


def test_aligner_of_other_weights_refused_unless_no_model_check(workdir, capsys, tmp_path):
    """score / describe (and atlas, which opens the same way) refuse an aligner fitted on other weights with the
    same component names and sizes, naming both fingerprints; --no-model-check is the explicit override."""
    from vitdecomp.compalign import Aligner

    al = Aligner.load(workdir / "aligner.safetensors")
    theirs = al.model_fingerprint
    al.model_fingerprint = "f" * 32  # as if fitted on a fine-tuned copy
    al.save(tmp_path / "tuned.safetensors")
    args = ["--aligner", str(tmp_path / "tuned.safetensors"), "--text-weights", str(workdir / "clip.pt"), "--quiet"]
    for cmd, extra in (("score", ["--property", "color"]),
                       ("describe", ["--pool", str(workdir / "pool.txt"), "--iters", "1", "--components", "blocks.0.mlp"])):
        rc = main([cmd, str(workdir / "cache"), *args, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "f" * 32 in err and theirs in err and "--no-model-check" in err, (cmd, err)
        assert main([cmd, str(workdir / "cache"), *args, *extra, "--no-model-check"]) == 0, cmd
        capsys.readouterr()


@pytest.mark.parametrize("command", ["score", "describe", "atlas", "retrieve", "heatmap", "spurious"])
def test_every_command_applying_an_aligner_has_no_model_check(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-model-check" in out and "both weight fingerprints" in out
