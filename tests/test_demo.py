"""``vitdecomp demo``: the offline report on the shipped concept-world models."""

import json

from vitdecomp.cli import build_parser, main


def test_demo_is_a_command():
    parser = build_parser()
    args = parser.parse_args(["demo", "--quick"])
    assert args.quick and callable(args.func)
    assert str(args.out) == "vitdecomp-demo"


def test_demo_quick_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--images", "120", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for section in ("Does CompAttribute find", "TextSpan", "Retrieval by reference image", "Token heat maps",
                    "Spurious correlation", "## Goals", "## The factors are independent"):
        assert section in report, section
    for png in ("images.png", "heatmaps.png", "retrieval_color.png", "retrieval_shape.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report
    assert "(atlas/index.html)" in report  # the demo's component atlas, linked from the report
    from vitdecomp._atlas import check_site

    assert (out / "atlas" / "index.html").is_file() and not any(check_site(out / "atlas").values())
    res = json.loads((out / "results.json").read_text())
    deit = res["models"]["deit"]
    assert deit["reconstruction_error"] <= 1e-5
    assert set(deit["properties"]) == {"shape", "color", "pattern", "position", "size", "background"}
    assert set(res["spurious"]["by_k"]) == {"1", "3", "5", "10"}
    # the goals are computed from this run's numbers, not stored: every ρ row carries the value measured above
    rho_rows = [line for line in report.splitlines() if line.startswith("| deit | ") and "ρ(score, truth)" in line]
    assert len(rho_rows) == 6
    for line in rho_rows:
        prop = line.split(" | ")[1]
        assert f"| {deit['properties'][prop]['spearman_score_attribution']:.2f} |" in line, line
    assert max(v for row in res["independence"]["evaluation"]["pairs"].values() for v in row.values()) < 0.3
    assert "wrote" in capsys.readouterr().out
