"""The component atlas (``vitdecomp.atlas``, ``vitdecomp atlas``): built from the concept-world DeiT the way the demo
builds it, checked against independent computations, structurally without a browser, and in headless Chromium."""

import json
import os
import shutil

import pytest
import torch

from vitdecomp._atlas import atlas, check_site, component_layout
from vitdecomp.errors import InputError, MismatchError

N = 80


@pytest.fixture(scope="module")
def world():
    from vitdecomp import datasets as D
    from vitdecomp.concept_world import evaluate as E
    from vitdecomp.concept_world import models as M

    clip = M.load("clip")
    enc = E.text_encoder(clip)
    ds = D.ConceptWorld(N, E.EVAL_SEED)
    X = ds.tensors()
    run = E.prepare_run("deit", clip=clip, encoder=enc, fit_images=D.ConceptWorld(N, E.FIT_SEED).tensors(),
                        eval_dataset=ds, eval_images=X, max_epochs=8)
    return {"run": run, "enc": enc, "ds": ds, "X": X, "pool": E.caption_pool(120)}


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    from vitdecomp._cli_demo import write_atlas

    out = tmp_path_factory.mktemp("atlas") / "atlas"
    res = write_atlas(world["run"], out, dataset=world["ds"], images=world["X"], encoder=world["enc"],
                      pool=world["pool"], iters=3, textspan_images=50, heatmap_components=4, heatmap_images=2,
                      page_size=10)
    return res, json.loads((out / "atlas.json").read_text())


def test_atlas_writes_every_page(built, world):
    res, info = built
    run = world["run"]
    out = res.out
    assert res.path == out / "index.html" and res.components == len(run.names) == len(info["components"])
    assert set(res.properties) == set(run.bases)
    for c in info["components"]:
        assert (out / c["page"]).is_file(), c["name"]
    for p in info["properties"].values():
        assert (out / p["page"]).is_file()
    index = (out / "index.html").read_text()
    # the grid and the list beside it link every component (the table is rendered from data by the browser)
    assert all(f'href="{c["page"]}"' in index or f"href='{c['page']}'" in index for c in info["components"])
    assert all(f"href='{p['page']}'" in index for p in info["properties"].values())
    assert (out / "assets" / "atlas.js").is_file() and (out / "assets" / "atlas.css").is_file()
    assert res.heatmaps == 4 * 2 and res.thumbnails > 10
    assert sorted(info["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_atlas_is_structurally_sound_and_offline(built):
    res, _ = built
    problems = check_site(res.out)
    assert problems == {"broken_links": [], "missing_images": [], "duplicate_ids": [], "external": []}
    for page in res.out.rglob("*.html"):
        text = page.read_text()
        assert "http://" not in text and "https://" not in text, page  # no CDN, no fonts, nothing remote


def test_check_site_detects_a_broken_page(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")  # exists, but is no image
    (tmp_path / "page.html").write_text(
        "<html><body><a href='missing.html'>x</a><a href='page.html#nowhere'>y</a><img src='gone.png'>"
        "<img src='ok.png'><p id='a'></p><p id='a'></p><script src='https://cdn.example/x.js'></script></body></html>")
    p = check_site(tmp_path)
    assert p["broken_links"] == ["page.html: missing.html", "page.html: page.html#nowhere"]
    assert p["missing_images"] == ["page.html: gone.png", "page.html: ok.png"]
    assert p["duplicate_ids"] == ["page.html: #a"]
    assert p["external"] == ["page.html: https://cdn.example/x.js"]


def test_atlas_numbers_match_independent_computations(built, world):
    """Scores, variance shares, TextSpan, images along directions and retrieval: recomputed with the library's
    tensor functions on the full aligned tensor."""
    from vitdecomp.retrieval import retrieve_by_text
    from vitdecomp.scores import specificity, variance_attributed, variance_explained
    from vitdecomp.spans import textspan

    _, info = built
    run, enc = world["run"], world["enc"]
    A = run.aligner(run.contributions).to(torch.float64)  # [N, C, d]
    comps = info["components"]
    sc = {p: variance_attributed(A.float(), b) for p, b in run.bases.items()}
    for p, b in run.bases.items():
        got = torch.tensor([c["scores"][p] for c in comps], dtype=torch.float64)
        assert torch.allclose(got, sc[p].double(), atol=1e-4), p
        ve = torch.tensor([c["variance_explained"][p] for c in comps], dtype=torch.float64)
        assert torch.allclose(ve, variance_explained(A.float(), b).double(), atol=1e-4), p
        sp = torch.tensor([c["specificity"][p] for c in comps], dtype=torch.float64)
        assert torch.allclose(sp, specificity(sc, p).double(), atol=1e-4), p
    var = A.var(0, unbiased=True).sum(-1)
    share = torch.tensor([c["variance_share"] for c in comps], dtype=torch.float64)
    assert torch.allclose(share, var / var.sum(), rtol=1e-5, atol=1e-9)
    assert abs(float(share.sum()) - 1) < 1e-9

    pool = world["pool"]
    T = enc.encode(pool, templates=None, progress=False)
    sub = torch.unique(torch.linspace(0, N - 1, 50).round().long())
    for i in (1, 8, len(comps) - 2):
        ref = textspan(A[sub, i].float(), T, pool, iters=3)
        assert [s["text"] for s in comps[i]["textspan"]] == [s.text for s in ref]
        assert [s["variance_explained"] for s in comps[i]["textspan"]] == pytest.approx([s.variance_explained for s in ref])
        d = comps[i]["directions"][0]
        assert d["text"] == ref[0].text
        proj = A[:, i] @ T[pool.index(ref[0].text)].double()
        assert [x for x, _ in d["most"]] == torch.argsort(proj, descending=True)[:6].tolist()
        assert [x for x, _ in d["least"]] == torch.argsort(proj)[:6].tolist()
    for p, pr in info["properties"].items():
        for q in pr["queries"]:
            t = enc.encode([q["text"]], templates=None, progress=False)[0]
            r = retrieve_by_text(run.contributions, t, aligner=run.aligner, component_scores=sc[p], k=10,
                                 names=run.names)
            assert tuple(pr["components"]) == r.components
            assert [x for x, _ in q["restricted"]] == r.order[:6]
            assert [x for x, _ in q["whole"]] == r.baseline_order[:6]
            assert [v for _, v in q["restricted"]] == pytest.approx(r.scores[r.order[:6]].tolist(), rel=1e-4, abs=1e-5)


def test_atlas_heatmaps_match_token_heatmap(built, world):
    from vitdecomp.api import decompose
    from vitdecomp.concept_world import models as M
    from vitdecomp.heatmap import token_heatmap

    res, info = built
    run, enc = world["run"], world["enc"]
    with_maps = [c for c in info["components"] if c["heatmaps"]]
    assert len(with_maps) == 4
    c = with_maps[0]
    assert [h["image"] for h in c["heatmaps"]] == [x for x, _ in c["directions"][0]["most"][:2]]
    t = enc.encode([c["directions"][0]["text"]], templates=None, progress=False)[0]
    x = c["heatmaps"][1]["image"]
    dec = decompose(run.model, M.prepare("deit", world["X"][[x]]), tokens="source")
    hm = token_heatmap(dec, run.aligner, text=t, components=[c["name"]])
    assert c["heatmaps"][1]["min"] == pytest.approx(float(hm.maps[0].min()), rel=1e-4, abs=1e-6)
    assert c["heatmaps"][1]["max"] == pytest.approx(float(hm.maps[0].max()), rel=1e-4, abs=1e-6)
    from PIL import Image

    with Image.open(res.out / c["heatmaps"][1]["file"]) as im:
        assert im.size == tuple(hm.maps.shape[-2:][::-1])
    # the final norm's offset is the same for every image: nothing to describe, no direction
    bias = next(c for c in info["components"] if c["name"] == "norm.bias")
    assert bias["textspan"] == [] and bias["directions"] == [None, None]
    # MLPs of a CLS-readout ViT write only to the CLS token: no map, and the page says why
    mlp = next(c for c in info["components"] if c["name"] == "blocks.0.mlp")
    assert not mlp["heatmaps"] and "prefix tokens" in mlp["heatmap_note"]


def test_component_layout_of_real_names():
    lay = {r["name"]: r for r in component_layout(
        ["embed", "blocks.3.attn.head.7", "blocks.3.attn.bias", "blocks.3.mlp", "norm.bias",
         "stages.2.blocks.1.attn.head.0", "stages.2.downsample.norm.bias", "stages.1.blocks.0.attn_grid.attn.head.2",
         "stages.1.blocks.0.attn_grid.mlp", "stages.1.blocks.0.conv", "init"])}
    assert lay["blocks.3.attn.head.7"] | {} == {"name": "blocks.3.attn.head.7", "kind": "head", "stage": None,
                                                "block": 3, "head": 7, "row": "blocks.3", "col": "head 7"}
    assert (lay["blocks.3.mlp"]["kind"], lay["blocks.3.mlp"]["row"], lay["blocks.3.mlp"]["col"]) == ("mlp", "blocks.3", "mlp")
    assert lay["blocks.3.attn.bias"]["kind"] == "const" and lay["norm.bias"]["row"] is None
    assert lay["embed"]["kind"] == "embed" and lay["init"]["kind"] == "residual"
    s = lay["stages.2.blocks.1.attn.head.0"]
    assert (s["stage"], s["block"], s["head"], s["row"]) == (2, 1, 0, "stages.2.blocks.1")
    g = lay["stages.1.blocks.0.attn_grid.attn.head.2"]
    assert g["row"] == "stages.1.blocks.0.attn_grid" and lay["stages.1.blocks.0.attn_grid.mlp"]["row"] == g["row"]
    assert lay["stages.1.blocks.0.conv"]["kind"] == "conv"
    assert lay["stages.2.downsample.norm.bias"]["kind"] == "const"


def test_atlas_protects_foreign_folders_and_replaces_its_own(world, tmp_path):
    run = world["run"]
    kw = dict(encoder=world["enc"], templates=None, properties={"color": ["a red shape", "a blue shape"]},
              pool=world["pool"][:30], iters=2, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my data")
    with pytest.raises(InputError, match="not empty"):
        atlas(run.contributions, run.aligner, mine, **kw)
    assert (mine / "notes.txt").read_text() == "my data" and len(list(mine.iterdir())) == 1
    out = tmp_path / "a"
    atlas(run.contributions, run.aligner, out, images=world["X"], **kw)
    assert any((out / "img").iterdir())
    (out / "user.txt").write_text("keep me")
    atlas(run.contributions, run.aligner, out, **kw)  # again, now without images: old thumbnails go
    assert not (out / "img").exists() or not any((out / "img").iterdir())
    assert (out / "user.txt").read_text() == "keep me"
    assert check_site(out)["broken_links"] == [] and check_site(out)["missing_images"] == []


def test_atlas_input_errors(world, tmp_path):
    run = world["run"]
    with pytest.raises(InputError, match="encoder"):
        atlas(run.contributions, run.aligner, tmp_path / "x")
    kw = dict(encoder=world["enc"], templates=None, properties={"color": ["a red shape"]}, pool=world["pool"][:10])
    with pytest.raises(MismatchError, match="names|components"):
        atlas(run.contributions, run.aligner, tmp_path / "x", names=[f"c{i}" for i in range(len(run.names))], **kw)
    with pytest.raises(InputError, match="inputs="):
        atlas(run.contributions, run.aligner, tmp_path / "x", model=run.model, **kw)
    with pytest.raises(InputError, match="iters"):
        atlas(run.contributions, run.aligner, tmp_path / "x", iters=0, **kw)
    with pytest.raises(InputError, match="ExtractionCache"):
        atlas(run.contributions[0], run.aligner, tmp_path / "x", **kw)


# ---------------------------------------------------------------------------------------------------- CLI


def test_atlas_command_on_a_cache(tmp_path, tiny_clip_name):
    """extract → align → atlas through the command line on a random-init timm ViT, with heat maps."""
    import open_clip
    from PIL import Image
    from skimage import data as skdata

    from vitdecomp.cli import main

    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    for label, arr in {"cat": skdata.chelsea(), "cup": skdata.coffee()}.items():
        (tmp_path / "img" / label).mkdir(parents=True)
        for k, angle in enumerate((0, 90, 180)):
            Image.fromarray(arr).rotate(angle).resize((36, 36)).save(tmp_path / "img" / label / f"{k}.png")
    (tmp_path / "pool.txt").write_text("\n".join(f"description number {i}" for i in range(12)))
    from vitdecomp.api import load_model
    from vitdecomp.compalign import fit_aligner
    from vitdecomp.extraction import extract

    torch.manual_seed(0)  # the weights 'atlas --random-init' rebuilds for its heat maps
    model = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    tiny = load_model(f"open_clip:{tiny_clip_name}", weights=str(tmp_path / "clip.pt"))
    cache = extract(model, tmp_path / "img", tmp_path / "cache", clip=tiny, batch_size=3, dtype=torch.float32,
                    progress=False)
    fit_aligner(cache, max_epochs=2, val_fraction=0.34, progress=False).save(tmp_path / "a.safetensors")
    base = ["--random-init", "--image-size", "32"]
    out = tmp_path / "site"
    assert main(["atlas", str(tmp_path / "cache"), "--aligner", str(tmp_path / "a.safetensors"), "--out", str(out),
                 "--text-weights", str(tmp_path / "clip.pt"), "--templates", "simple", "--pool",
                 str(tmp_path / "pool.txt"), "--property", "color", "--iters", "2", "--top-images", "3",
                 "--model", "timm:vit_tiny_patch16_224", *base, "--heatmaps", "2", "--heatmap-images", "1",
                 "--quiet"]) == 0
    info = json.loads((out / "atlas.json").read_text())
    assert info["model"] == "timm:vit_tiny_patch16_224" and info["images"] == 6
    assert sum(len(c["heatmaps"]) for c in info["components"]) == 2
    assert len(list((out / "img").iterdir())) == 6  # every image appears among the extremes
    assert check_site(out) == {"broken_links": [], "missing_images": [], "duplicate_ids": [], "external": []}


# ---------------------------------------------------------------------------------------------------- browser


def _chromium():
    from vitdecomp._browser import find_chromium

    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed but CI=true: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test runs in CI")
    return exe


def test_browser_detects_broken_pages(tmp_path):
    from vitdecomp._browser import Chromium

    exe = _chromium()
    (tmp_path / "fine.png").write_bytes(b"not a png")
    (tmp_path / "bad.html").write_text(
        "<!DOCTYPE html><html><body><a href='nowhere.html'>x</a><img src='gone.png'><img src='fine.png'>"
        "<script>console.error('deliberate console error'); undefinedFunction();</script></body></html>")
    (tmp_path / "good.html").write_text("<!DOCTYPE html><html><body><a href='bad.html'>ok</a></body></html>")
    with Chromium(exe) as b:
        good = b.open(tmp_path / "good.html")
        assert good.ok, good
        bad = b.open(tmp_path / "bad.html")
    assert any("deliberate console error" in e for e in bad.console_errors)
    assert any("undefinedFunction" in e for e in bad.console_errors)
    assert any("gone.png" in e or "ERR_FILE_NOT_FOUND" in e for e in bad.console_errors)  # the failed load, logged
    assert [u.rsplit("/", 1)[-1] for u in bad.broken_links] == ["nowhere.html", "gone.png"]
    assert sorted(u.rsplit("/", 1)[-1] for u in bad.missing_images) == ["fine.png", "gone.png"]
    assert not bad.ok


def test_atlas_in_headless_chromium(built, tmp_path):
    """Every page of the atlas in a real browser: no console error, broken link or missing image; the table sorts
    and filters, the grid is coloured; screenshots of the index and a component page are saved."""
    from PIL import Image

    from vitdecomp._browser import Chromium

    exe = _chromium()
    res, info = built
    shots = tmp_path / "screenshots"
    with Chromium(exe) as b:
        index = b.open(res.path)
        assert index.ok, index
        assert index.load_ms is not None  # timings belong in benchmarks/atlas.py
        b.screenshot(shots / "index.png")
        # the table: sorted by clicking a score column, filtered by typing
        C = len(info["components"])
        rows = lambda: b.evaluate("Array.from(document.querySelectorAll('#list tbody tr'))"  # noqa: E731
                                  ".map(r => r.cells[1].textContent)")
        assert rows() == [c["name"] for c in info["components"][:10]]  # pages of 10 rows (page_size=10)
        b.evaluate("document.getElementById('page-next').click()")
        assert rows() == [c["name"] for c in info["components"][10:20]]
        assert f"{C} of {C} components · page 2 / {-(-C // 10)}" in b.evaluate("document.getElementById('pager').textContent")
        prop = next(iter(info["properties"]))
        col = 7 + list(info["properties"]).index(prop)
        b.evaluate(f"document.querySelectorAll('#list thead th')[{col}].click()")
        top = b.evaluate("document.querySelector('#list tbody tr a').textContent")
        assert top == max(info["components"], key=lambda c: c["scores"][prop])["name"]
        b.evaluate("(() => { const f = document.getElementById('filter'); f.value = 'mlp';"
                   " f.dispatchEvent(new Event('input')); })()")
        mlps = [c for c in info["components"] if "mlp" in c["name"]]  # still sorted by the clicked column
        assert rows() == [c["name"] for c in sorted(mlps, key=lambda c: -c["scores"][prop])]
        colours = b.evaluate("Array.from(document.querySelectorAll('#grid a.cell')).map(a => a.style.background)")
        assert colours and all(colours) and len(set(colours)) > 3
        b.evaluate(f"(() => {{ const s = document.getElementById('gridprop'); s.value = '{prop}';"
                   " s.dispatchEvent(new Event('change')); })()")
        recoloured = b.evaluate("Array.from(document.querySelectorAll('#grid a.cell')).map(a => a.style.background)")
        assert recoloured != colours
        assert b.open(res.path).ok  # reload after the interactions: still no error
        # every page the index links to, and every page those link to
        pages = sorted({u.split("#")[0] for u in index.links if u.endswith(".html")})
        assert len(pages) >= len(info["components"]) + len(info["properties"])
        for url in pages:
            rep = b.open(url)
            assert rep.ok, rep
        comp = next(c for c in info["components"] if c["heatmaps"])
        rep = b.open(res.out / comp["page"])
        assert rep.ok, rep
        n_img = b.evaluate("document.images.length")
        assert n_img >= 2 * 2 * 6 + len(comp["heatmaps"])
        b.screenshot(shots / "component.png")
    for name in ("index.png", "component.png"):
        with Image.open(shots / name) as im:
            assert im.size[0] == 1280 and im.size[1] > 600
    keep = os.environ.get("VITDECOMP_SCREENSHOTS")
    if keep:  # a place to look at them after the run
        shutil.copytree(shots, keep, dirs_exist_ok=True)
