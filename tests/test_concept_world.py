"""The concept world's models and the ground-truth evaluation of interpretation."""

import json

import pytest
import torch

from vitdecomp import datasets as D
from vitdecomp.concept_world import evaluate as E
from vitdecomp.concept_world import models as M
from vitdecomp.concept_world import train as T


# ---------------------------------------------------------------------------------------------- ground truth
def _synthetic(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    codes = torch.randn(3, 4, generator=g) * 3
    signal = codes[labels]
    c = torch.stack([
        signal + 0.01 * torch.randn(n, 4, generator=g),  # carries the factor, nothing else
        torch.randn(n, 4, generator=g),  # noise
        0.5 * signal + 2.0 * torch.randn(n, 4, generator=g),  # half the signal, much noise
    ], 1)
    return c, labels


def test_ground_truth_r2_and_attribution():
    c, labels = _synthetic()
    gt = E.ground_truth(c, labels)
    r2, attr = gt["r2"], gt["attribution"]
    assert r2[0] > 0.99 and r2[1] < 0.02 and 0.05 < r2[2] < 0.6
    assert torch.allclose(attr.sum(), torch.tensor(1.0, dtype=attr.dtype))
    # M = m_0 + m_2 = 1.5 m_0: shares 1/1.5 and 0.5/1.5 (up to sampling noise)
    assert abs(float(attr[0]) - 2 / 3) < 0.03 and abs(float(attr[2]) - 1 / 3) < 0.03 and abs(float(attr[1])) < 0.03
    # invariant to a per-component rescaling for r2, not for attribution
    c2 = c.clone()
    c2[:, 2] *= 10
    gt2 = E.ground_truth(c2, labels)
    assert torch.allclose(gt2["r2"], r2)
    assert gt2["attribution"][2] > attr[2]


def test_spearman_and_precision():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert E.spearman(a, a * 10) == pytest.approx(1.0)
    assert E.spearman(a, -a) == pytest.approx(-1.0)
    assert E.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)
    assert E.precision_at_k(a, a, 2) == 1.0
    assert E.precision_at_k(a, -a, 2) == 0.0


def test_retrieval_precision_uses_the_subset():
    c, labels = _synthetic()
    q = torch.arange(50)
    assert E.retrieval_precision(c, labels, [0], q) == 1.0
    assert E.retrieval_precision(c, labels, [1], q) < 0.6


def test_text_pools():
    single = E.single_factor_pool()
    assert len(single) == sum(len(v) for v in D.FACTORS.values()) == M.NUM_FACTOR_CLASSES
    pool = E.caption_pool(120)
    assert len(pool) == 120 == len(set(pool)) and pool[:25] == single
    tok = M.tokenizer()
    assert tok.UNK not in tok(pool).flatten().tolist()


# ---------------------------------------------------------------------------------------------- models
def test_factor_slices_cover_the_head():
    assert sum(sl.stop - sl.start for sl in M.FACTOR_SLICES.values()) == M.NUM_FACTOR_CLASSES == 25
    assert list(M.FACTOR_SLICES) == list(D.FACTOR_NAMES)


def test_manifest_records_every_shipped_model():
    man = M.manifest()
    assert man["format"] == "vitdecomp.concept_world/1"
    assert set(man["models"]) == {"clip", *M.TARGETS, *M.SPURIOUS}
    total = 0
    for name, rec in man["models"].items():
        path = M.WEIGHTS_DIR / rec["file"]
        assert path.is_file(), path
        total += path.stat().st_size
        assert rec["train"]["seed"] == 0 and rec["train"]["wall_seconds"] > 0
        assert rec["architecture"] == json.loads(json.dumps(M.describe(name)))
        assert rec["command"].startswith("python -m vitdecomp.concept_world.train --models")
        assert rec["history"] and rec["history"][-1]["epoch"] == rec["train"]["epochs"]
        metrics = rec["metrics"]
        if name == "clip":
            assert min(metrics["zero_shot_accuracy"].values()) >= 0.90, metrics
        elif name in M.TARGETS:
            assert min(metrics["test_accuracy"].values()) >= 0.95, metrics
        else:  # the spurious fine-tunes: worse on a minority group than on average
            assert metrics["worst_group_accuracy"] < metrics["test_accuracy"], metrics
    assert total < 8e6  # a few MB in all


@pytest.fixture(scope="module")
def eval_images():
    ds = D.ConceptWorld(160, seed=11)
    return ds, ds.tensors()


@pytest.mark.parametrize("name", M.TARGETS)
def test_shipped_classifiers_learned_the_factors(name, eval_images):
    ds, X = eval_images
    model = M.load(name)
    assert not model.training
    with torch.no_grad():
        logits = model(M.prepare(name, X))
    table = ds.factor_table()
    acc = {f: float((logits[:, sl].argmax(1) == table[:, k]).float().mean())
           for k, (f, sl) in enumerate(M.FACTOR_SLICES.items())}
    # measured here on 160 fresh images, not read from the manifest (held-out ≥ 0.95 on 2000 images there)
    assert min(acc.values()) >= 0.9, acc


def test_shipped_clip_reads_captions(eval_images):
    ds, X = eval_images
    clip, tok = M.load_clip()
    zs = T.clip_zero_shot(clip, X, ds.factor_table())
    assert min(zs.values()) >= 0.85, zs  # ≥ 0.90 on the 2000 held-out images of the manifest


def test_shipped_spurious_model_leans_on_the_background():
    name = "deit_spurious"
    test = D.SpuriousConceptWorld(200, seed=11, split="test")
    with torch.no_grad():
        pred = M.load(name)(test.tensors()).argmax(1)
    correct = (pred == test.labels("label")).float()
    g = test.groups()
    per_group = [float(correct[g == k].mean()) for k in range(4)]
    # majority groups (small on water, large on grass) beat the minority groups
    assert min(per_group[0], per_group[3]) > max(per_group[1], per_group[2]), per_group


def test_missing_weights_error(tmp_path, monkeypatch):
    from vitdecomp.errors import WeightsUnavailableError

    monkeypatch.setattr(M, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsUnavailableError, match="concept_world.train"):
        M.load("deit")


def test_training_script_runs_and_round_trips(tmp_path):
    cfg = {"n_train": 64, "epochs": 1, "lr": 1e-3, "batch": 32, "weight_decay": 0.0}
    model = T.train_model("deit", cfg, seed=0, log=lambda *a: None)
    path = T.save_model("deit", model, tmp_path)
    back = T._reload("deit", path)
    x = D.ConceptWorld(4, seed=1).tensors()
    with torch.no_grad():
        assert torch.allclose(model(x), back(x), atol=5e-2)  # float16 storage
    child = M.build("deit_spurious")
    T._init_from(child, path)
    assert torch.equal(child.blocks[0].attn.qkv.weight, back.blocks[0].attn.qkv.weight)
    assert child.head.weight.shape[0] == 2
    clip = T.train_model("clip", {**cfg, "n_train": 32}, seed=0, log=lambda *a: None)
    assert not clip.training


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def clip_and_encoder():
    clip = M.load("clip")
    return clip, E.text_encoder(clip)


@pytest.mark.parametrize("name", ["deit", "swin", "maxvit", "clip"])
def test_pipeline_end_to_end(name, clip_and_encoder):
    clip, enc = clip_and_encoder
    run = E.prepare_run(name, clip=clip, encoder=enc, n_fit=100, n_eval=100, max_epochs=2)
    assert run.error <= 1e-5
    C = len(run.names)
    assert run.contributions.shape[:2] == (100, C) and run.aligned.shape == (100, C, 64)
    res = E.evaluate(run, encoder=enc, queries=20)
    assert set(res["properties"]) == set(D.FACTOR_NAMES)
    for f, r in res["properties"].items():
        assert 0.0 <= r["precision_at_k"] <= 1.0
        assert -1.0 <= r["spearman_score_attribution"] <= 1.0
        assert r["retrieval_chance"] == pytest.approx(1 / len(D.FACTORS[f]))
    assert 0.0 <= res["textspan"]["agreement"] <= 1.0
    # every model knows the colour: its whole representation retrieves same-colour images above chance (1/6)
    assert res["properties"]["color"]["retrieval_whole"] > 0.3


def test_spurious_evaluation_runs(clip_and_encoder):
    clip, enc = clip_and_encoder
    res = E.evaluate_spurious("deit", clip=clip, encoder=enc, n_val=120, n_test=120, ks=(1, 3), max_epochs=3)
    assert set(res["by_k"]) == {1, 3}
    r = res["by_k"][3]
    assert 0.0 <= r["before_worst"] <= r["before_average"] <= 1.0
    assert len(r["components"]) == 3 and len(r["oracle_components"]) == 3


# ---------------------------------------------------------------------------------------------- training runs
_TINY = {"n_train": 64, "epochs": 3, "lr": 1e-3, "batch": 32, "weight_decay": 0.0, "pos_init": "sincos"}


@pytest.mark.parametrize("name", ["deit", "clip"])
def test_training_continues_from_a_checkpoint_to_the_same_weights(name, tmp_path):
    cfg = dict(_TINY, phrase_weight=1.0) if name == "clip" else dict(_TINY)
    full = T.train_model(name, cfg, seed=0, checkpoint=tmp_path / "full.pt", log=lambda *a: None)

    class Killed(Exception):
        pass

    def die_in_epoch_3(msg):  # the checkpoint after epoch 1 is written, epoch 2's is not
        if "epoch 2/3" in msg:
            raise Killed

    with pytest.raises(Killed):
        T.train_model(name, cfg, seed=0, checkpoint=tmp_path / "cut.pt", log=die_in_epoch_3)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["epoch"] == 1
    logs = []
    resumed = T.train_model(name, cfg, seed=0, checkpoint=tmp_path / "cut.pt", log=logs.append)
    assert any("continuing from" in m and "after epoch 1/3" in m for m in logs), logs
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.train_history] == [1, 2, 3]


def test_a_checkpoint_of_other_settings_or_a_foreign_file_is_refused(tmp_path):
    ck = tmp_path / "deit.pt"
    T.train_model("deit", dict(_TINY, epochs=1), seed=0, checkpoint=ck, log=lambda *a: None)
    with pytest.raises(RuntimeError, match=r"other settings \(differs in \['cfg'\]\)"):
        T.train_model("deit", dict(_TINY, epochs=2), seed=0, checkpoint=ck, log=lambda *a: None)
    with pytest.raises(RuntimeError, match=r"differs in \['seed'\]"):
        T.train_model("deit", dict(_TINY, epochs=1), seed=1, checkpoint=ck, log=lambda *a: None)
    # --restart discards the script's own checkpoint ...
    T.train_model("deit", dict(_TINY, epochs=2), seed=0, checkpoint=ck, restart=True, log=lambda *a: None)
    assert torch.load(ck, weights_only=True)["epoch"] == 2
    # ... but never a file it did not write
    foreign = tmp_path / "mine.pt"
    torch.save({"my": torch.ones(2)}, foreign)
    for restart in (False, True):
        with pytest.raises(RuntimeError, match="not a concept-world training checkpoint"):
            T.train_model("deit", dict(_TINY, epochs=1), seed=0, checkpoint=foreign, restart=restart,
                          log=lambda *a: None)
    assert torch.equal(torch.load(foreign, weights_only=True)["my"], torch.ones(2))


def test_sincos_position_start():
    table = T.sincos_2d(8, 64)
    assert table.shape == (64, 64)
    # rows with the same grid row share the first half of the channels, same column the second half
    assert torch.equal(table[0, :32], table[7, :32]) and not torch.equal(table[0, :32], table[8, :32])
    assert torch.equal(table[0, 32:], table[8, 32:]) and not torch.equal(table[0, 32:], table[1, 32:])
    for name in ("deit", "clip"):
        model = M.build(name)
        T._init_positions(name, model)
        pe = model.visual.positional_embedding[1:] if name == "clip" else model.pos_embed[0, 1:]
        assert torch.equal(pe.detach(), 0.5 * T.sincos_2d(8, pe.shape[1]))


def test_clip_phrase_loss_is_the_zero_shot_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    phr = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    y = torch.tensor([[0, 1], [2, 3], [1, 0], [0, 2], [2, 1]])
    got = T._phrase_loss(img, phr, [3, 4], 10.0, y)
    logits = 10.0 * img @ phr.T
    manual = sum(-torch.log_softmax(logits[i, :3], 0)[y[i, 0]] - torch.log_softmax(logits[i, 3:], 0)[y[i, 1]]
                 for i in range(5)) / 5 / 2
    assert torch.allclose(got, manual)


def test_factor_independence_detects_a_planted_correlation():
    ds = D.ConceptWorld(3000, seed=5)
    ind = E.factor_independence(ds)
    assert ind["n"] == 3000 and ind["max"][2] < 0.08  # independent by construction
    sp = D.SpuriousConceptWorld(3000, seed=5, split="train", correlation=0.95)
    bad = E.factor_independence(sp)
    assert bad["max"][:2] == ["size", "background"] and bad["max"][2] > 0.5


def test_goals_report_misses_by_how_much():
    prop = {"spearman_score_attribution": 0.7, "retrieval_components": 0.5, "retrieval_whole": 0.6,
            "retrieval_oracle": 0.8, "spearman_aligned_truth": 0.9, "spearman_score_aligned_attribution": 0.75}
    results = {"models": {"deit": {"properties": {"shape": prop, "color": dict(prop, spearman_score_attribution=0.9,
                                                                                 retrieval_components=0.7)},
                                   "textspan": {"carrying_agreement": 0.85, "n_carrying": 12, "carrying_misses": {}}}},
               "spurious": {"deit": {"spearman_difference": 0.4, "by_k": {
                   1: {"share_of_oracle_gain": 0.5}, 3: {"share_of_oracle_gain": 0.9}}}}}
    rows = {(r["model"], r["property"], r["goal"]): r for r in E.goals(results)}
    shape_rho = rows[("deit", "shape", "ρ(score, truth)")]
    assert not shape_rho["met"] and shape_rho["short_by"] == pytest.approx(0.1)
    assert "0.90" in shape_rho["why"] and "0.75" in shape_rho["why"]
    assert rows[("deit", "color", "ρ(score, truth)")]["met"]
    ret = rows[("deit", "shape", "retrieval: components − whole")]
    assert not ret["met"] and ret["short_by"] == pytest.approx(0.1)
    assert rows[("deit", "(all)", "TextSpan first pick")]["met"]
    rep = rows[("deit_spurious", "repair", "share of oracle worst-group gain")]
    assert rep["met"] and rep["k"] == 3 and rep["value"] == 0.9
    md = "\n".join(E.goals_markdown(results))
    assert "4 of 6 met" in md and "**no**" in md
