"""The side-by-side benchmarks: peer bounds are proven, peers are size-matched, and the
entry point writes every section (on a synthetic CIFAR folder, with a budget of seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.peers import (
    BUILDERS,
    PEERS,
    PlainSLLBlock,
    SLLBlock,
    build_peer,
    build_sll,
    build_torchlip,
    count_parameters,
    export_peer,
    matched_width,
    own_radius,
    robustflow_parameters,
    sll_block_bound,
    train_budgeted,
)
from certify import lipschitz_bound
from robustflow.data import write_cifar_folder
from robustflow.train import TrainConfig
from tests.conftest import jacobian_norm, synthetic_set

pytestmark = pytest.mark.usefixtures("one_thread")
SLACK = 1 + 1e-6


def _perturb(module: torch.nn.Module, scale: float = 0.5) -> None:
    """Move every parameter randomly, as training would (trained-ish weights)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p) * (p.abs().mean() + 0.1))


def test_sll_block_bound_covers_the_jacobian() -> None:
    block = SLLBlock(4, size=6)
    _perturb(block)
    block = block.double()
    bound = block.lipschitz_bound()
    assert bound >= 1.0
    for _ in range(3):
        x = torch.randn(4, 6, 6, dtype=torch.float64)
        assert jacobian_norm(block, x) <= bound * SLACK
    plain = block.export()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.allclose(plain(x), block(x), atol=1e-12)
    assert plain.lipschitz_bound() == bound


def test_sll_bound_formula_without_aol_rescaling() -> None:
    """With ‖K‖ > 1 (no AOL) the block expands; the bound max(1, 2‖K‖² − 1) still covers it."""
    kernel = 2.0 * torch.randn(3, 3, 3, 3, dtype=torch.float64)
    block = PlainSLLBlock(kernel, torch.zeros(3, dtype=torch.float64), 1, 5)
    bound = block.lipschitz_bound()
    assert bound > 1.0
    x = torch.rand(3, 5, 5, dtype=torch.float64) + 1.0  # mostly active ReLUs: near 2‖K‖² − 1
    norm = jacobian_norm(block, x)
    assert 1.0 < norm <= bound * SLACK
    with pytest.raises(ValueError):
        sll_block_bound(torch.zeros(2, 2, 2, 2), 1, (4, 4))


@pytest.mark.parametrize("kind", PEERS)
def test_exported_peer_is_identical_and_its_bound_is_proven(kind: str) -> None:
    small = {"stages": 2, "image_size": 8}
    model = build_sll(4, 1, **small) if kind == "sll" else build_torchlip(4, 1, **small)
    _perturb(model, 0.3)
    model.train()
    for _ in range(3):  # torchlip updates its power iteration in training mode
        model(torch.rand(4, 3, 8, 8))
    model.eval()
    plain = export_peer(model)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)
    bound = lipschitz_bound(plain, (3, 8, 8))
    plain = plain.double()
    for sample in x[:3].double():
        assert jacobian_norm(plain, sample) <= bound * SLACK


@pytest.mark.parametrize("kind", PEERS)
def test_peer_parameter_count_is_matched(kind: str) -> None:
    target = robustflow_parameters()
    model, info = build_peer(kind)
    assert info["parameters"] == count_parameters(model) and info["target"] == target
    step = 2 if kind == "torchlip" else 1
    width, count = matched_width(kind, target, info["depth"], info["stem"])
    assert width == info["width"]
    for other in (width - step, width + step):
        neighbour = BUILDERS[kind](other, info["depth"], stem=info["stem"])
        assert abs(count_parameters(neighbour) - target) >= abs(count - target)
    assert abs(count - target) / target < 0.25


@pytest.mark.parametrize("kind", PEERS)
def test_peer_mirrors_a_preset_with_one_count_per_stage(kind: str) -> None:
    model, info = build_peer(kind, target=50_000, depth=(2, 0, 2))
    assert info["depth"] == (2, 0, 2) and len(model.stage2) == 0
    assert len(model.stage1) == len(model.stage3) > 0
    uniform = BUILDERS[kind](info["width"], 2, stem=info["stem"])
    assert count_parameters(model) < count_parameters(uniform)
    with pytest.raises(ValueError, match="2 block counts for 3 stages"):
        BUILDERS[kind](4, (2, 2))


def test_own_certificate_is_margin_over_sqrt2() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0])
    for kind in PEERS:
        radius, how = own_radius(kind, build_sll(2, 1, stages=1, image_size=2), logits, labels)
        assert radius.tolist() == pytest.approx([2 / math.sqrt(2), 0.0])
        assert "√2" in how or "VRA" in how


def test_peers_train_with_the_recipes_weight_average() -> None:
    """``train_budgeted`` with ``ema`` leaves the average in the model, as ``robustflow.train``
    does: the same trained weights as without it, averaged step by step."""
    data = synthetic_set(64, 0)
    cfg = TrainConfig(epochs=2, batch_size=16, loss="cce", seed=0)
    torch.manual_seed(0)
    plain = build_sll(width=4, blocks_per_stage=1)
    torch.manual_seed(0)
    averaged = build_sll(width=4, blocks_per_stage=1)
    first = {k: v.clone() for k, v in averaged.state_dict().items()}
    metrics = train_budgeted(plain, data, 1e6, cfg)
    train_budgeted(averaged, data, 1e6, TrainConfig(**{**cfg.__dict__, "ema": 0.5}))
    assert metrics["steps"] == 8
    moved = [k for k, v in plain.state_dict().items() if v.is_floating_point()
             and not torch.equal(v, first[k])]
    assert moved and all(not torch.allclose(averaged.state_dict()[k], plain.state_dict()[k])
                         for k in moved)
    assert lipschitz_bound(export_peer(averaged), (3, 32, 32)) <= 1 + 1e-5  # as trained peers


@pytest.mark.parametrize("argv, out_dir, models_dir", [
    ([], "benchmarks", "runs/bench-models"),
    (["--only", "3"], "benchmarks", "runs/bench-models"),
    (["--quick"], "runs/benchmarks-quick", "runs/benchmarks-quick/models"),
    (["--quick", "--render"], "runs/benchmarks-quick", "runs/benchmarks-quick/models"),
    (["--quick", "--out-dir", "elsewhere"], "elsewhere", "runs/benchmarks-quick/models"),
    (["--out-dir", "elsewhere", "--models-dir", "m"], "elsewhere", "m"),
])
def test_run_all_publishes_only_full_runs(argv: list[str], out_dir: str, models_dir: str) -> None:
    """A quick try writes (and trains) under runs/, never over the published figures and
    models; only a full run or an explicit --out-dir/--models-dir chooses otherwise."""
    from benchmarks import run_all

    repo = Path(run_all.__file__).resolve().parents[1]
    args = run_all.parse_args(argv)
    for got, want in ((args.out_dir, out_dir), (args.models_dir, models_dir)):
        if want.startswith(("benchmarks", "runs/benchmarks-quick")):
            assert Path(got) == repo / want
        else:
            assert got == want


def test_run_all_shows_the_data_folder_as_a_variable() -> None:
    from benchmarks import run_all

    assert run_all.published_command(["--data-root", "/srv/x y", "--only", "1"]) == \
        "python benchmarks/run_all.py --data-root $DATA --only 1"
    assert run_all.published_command(["--data-root=/srv/c", "--out-dir", "a b"]) == \
        "python benchmarks/run_all.py --data-root=$DATA --out-dir 'a b'"


def test_run_all_quick_writes_every_section(tmp_path: Path) -> None:
    from benchmarks import run_all

    root = tmp_path / "data"
    write_cifar_folder(root, synthetic_set(200, 0), synthetic_set(60, 1))
    out = tmp_path / "out"
    results = run_all.main([
        "--data-root", str(root), "--quick", "--budget", "2", "--test-n", "30", "--attack-n", "16",
        "--bench-attack-n", "16", "--cost-n", "30", "--tight-n", "6", "--tight-steps", "4",
        "--scale-depths", "2", "--scale-widths", "1", "--scale-batch", "4",
        "--out-dir", str(out), "--models-dir", str(tmp_path / "models")])
    saved = json.loads((out / "results.json").read_text())
    text = (out / "RESULTS.md").read_text()
    assert set(saved["sections"]) == {"1", "2", "3", "4", "5"} == set(results["sections"])
    for number, title in run_all.SECTIONS.items():
        if number in run_all.LONG_SECTIONS:  # only --only runs them
            assert f"## {number}." not in text and str(number) not in saved["sections"]
            continue
        assert f"## {number}. {title}" in text
        section = saved["sections"][str(number)]
        assert section["command"].startswith("python benchmarks/run_all.py --data-root")
        assert section["machine"]["torch_threads"] >= 1 and section["machine"]["cpu"]
    assert "## Aims" in text and "certification within 1.5× of inference, rounding proven" in text
    models = saved["sections"]["1"]["models"]
    assert set(models) == {"robustflow", *PEERS}
    for row in models.values():
        assert row["n"] == 30 and row["pgd"]["n"] == 16  # --test-n and --attack-n are obeyed
    for peer in PEERS:  # the reported accuracies are those of the per-point certificates
        row = models[peer]
        for eps, counts in row["agreement"].items():
            assert counts["both"] + counts["own_only"] == round(row["own_certified_accuracy"][eps] * 30)
            assert counts["both"] + counts["robustflow_only"] == round(row["certified_accuracy"][eps] * 30)
    for row in saved["sections"]["4"]["models"].values():  # a proven radius never exceeds an attack
        for key in ("robustflow certify", "robustflow certify, float64"):
            assert row["ratios"][key].get("above_distance", 0) == 0
    assert str(root) not in text  # no path of this machine in the report
    assert all(section["command"].count("$DATA") == 1 for section in saved["sections"].values())
    assert {r["model"] for r in saved["sections"]["5"]["rows"]} == {"robustflow", *PEERS}

    again = run_all.main(["--data-root", str(root), "--only", "3", "--cost-n", "20",
                          "--out-dir", str(out), "--models-dir", str(tmp_path / "models")])
    assert set(again["sections"]) == {"1", "2", "3", "4", "5"}  # earlier sections kept
    assert again["sections"]["3"]["settings"]["n"] == 20
    # --reuse: the peers come back from --models-dir untouched, robustflow is retrained
    sizes = ["--data-root", str(root), "--only", "1", "--test-n", "30", "--attack-n", "16",
             "--out-dir", str(out), "--models-dir", str(tmp_path / "models")]
    sll_file = tmp_path / "models" / "sll.pt"
    before = sll_file.read_bytes()
    reused = run_all.main([*sizes, "--budget", "2", "--reuse", "sll,torchlip"])["sections"]["1"]["models"]
    assert sll_file.read_bytes() == before
    assert "reused_from" in reused["sll"] and "reused_from" in reused["torchlip"]
    assert "reused_from" not in reused["robustflow"]
    assert reused["sll"]["certified_accuracy"] == models["sll"]["certified_accuracy"]
    assert "Not retrained in this run (`--reuse`): SLL" in (out / "RESULTS.md").read_text()
    with pytest.raises(SystemExit, match="sll.pt was trained differently: budget 2.0 \\(now 3.0\\)"):
        run_all.main([*sizes, "--budget", "3", "--reuse", "sll"])
    with pytest.raises(SystemExit, match="recipe .*'seed': 0} \\(now .*'seed': 1}\\)"):
        run_all.main([*sizes, "--seed", "1", "--reuse", "robustflow"])
    with pytest.raises(SystemExit) as info:
        run_all.main([*sizes, "--reuse", "resnet"])
    assert info.value.code == 2
    (out / "RESULTS.md").unlink()
    run_all.main(["--render", "--out-dir", str(out)])  # the report again from results.json alone
    assert "## 3. " in (out / "RESULTS.md").read_text()
    with pytest.raises(SystemExit, match="no sections"):
        run_all.main(["--render", "--out-dir", str(tmp_path / "empty")])


def test_recipe_probe_trains_a_variant_and_reports_it(tmp_path: Path, capsys) -> None:
    from benchmarks import probe_recipe
    from robustflow.networks import PRESETS

    root = tmp_path / "data"
    write_cifar_folder(root, synthetic_set(64, 0), synthetic_set(20, 1))
    log = tmp_path / "probes.jsonl"
    overrides = '{"batch_size": 16, "epochs": 2, "preset": "micro", "net": {"stem": "unshuffle"}}'
    result = probe_recipe.main(["unshuffled", overrides, "--data-root", str(root), "--images", "64",
                                "--test-n", "20", "--log", str(log)])
    assert json.loads(log.read_text()) == result == json.loads(capsys.readouterr().out)
    assert result["overrides"]["net"] == {"stem": "unshuffle"} and "probe" not in PRESETS
    assert 0 < result["L"] <= 1 + 1e-5
    with pytest.raises(SystemExit) as info:
        probe_recipe.main(["bad", "[1, 2]", "--data-root", str(root)])
    assert info.value.code == 2


def test_plane_cat_search_ranks_and_bundles_the_best(tmp_path: Path, capsys) -> None:
    """On a CIFAR folder holding the bundled sample as its test set: the candidates are the
    airplanes both bundled models classify correctly, best first, and the written sample names
    the first one, whose pixels are that test image's."""
    import numpy as np

    from benchmarks import plane_cat_search
    from robustflow.pretrained import load_sample_set, sample_plane_cat

    test = load_sample_set()
    root = tmp_path / "data"
    write_cifar_folder(root, None, test)
    out, report = tmp_path / "sample.npz", tmp_path / "search.json"
    ranked = plane_cat_search.main(["--data-root", str(root), "--steps", "20", "--write-sample",
                                    str(out), "--json", str(report), "--top", "3"])
    printed = capsys.readouterr().out
    assert ranked and f"{len(ranked)} classified correctly by both models" in printed
    keys = [(not c.proof(0.3), not c.flipped, -c.radius) for c in ranked]
    assert keys == sorted(keys)
    assert all(int(test.labels[c.index]) == 0 for c in ranked)
    assert [c["index"] for c in json.loads(report.read_text())["candidates"]] == \
        [c.index for c in ranked]
    written = load_sample_set(out)
    position = sample_plane_cat(out)
    assert torch.equal(written.images[position], test.images[ranked[0].index])
    with np.load(out) as data:
        assert int(data["test_index"][position]) == ranked[0].index


def test_run_all_autoattack_section_compares_with_torchattacks(tmp_path: Path) -> None:
    """Section 6 runs only when asked; each row's accuracies are fractions of the images, ours
    never reports a certified point as broken, and the aims are judged from the rows."""
    from benchmarks import run_all

    out = tmp_path / "out"
    results = run_all.main(["--quick", "--only", "6", "--aa-n", "12", "--aa-queries", "10",
                            "--out-dir", str(out)])
    section = results["sections"]["6"]
    rows = section["rows"]
    assert {(r["model"], r["norm"], r["eps"]) for r in rows} == {
        (m, n, e) for m in ("lipschitz", "baseline")
        for n, e in (("l2", "36/255"), ("l2", "0.3"), ("linf", "8/255"))}
    for r in rows:
        assert r["n"] == 12
        for key in ("clean", "certified", "ours", "torchattacks"):
            assert round(r[key] * 12, 4) == int(round(r[key] * 12))  # a count of images
        assert r["certified"] <= r["ours"] <= r["clean"] and r["torchattacks"] <= r["clean"]
        assert r["speedup_cpu"] == pytest.approx(r["torchattacks_cpu_s"] / r["ours_cpu_s"])
        for side in ("ours", "torchattacks"):  # each evaluates every image at least once
            evaluations = r[f"{side}_evaluations"]
            assert evaluations["forward"] + evaluations["gradient"] >= 12
        if r["norm"] == "l2":  # torchattacks attacks every point, and so does ours unskipped
            assert r["certified_broken_by_torchattacks"] == 0
            assert r.get("certified_broken_by_ours", 0) == 0
    strength, speed, sound = section["aims"]
    assert strength["met"] == (max(r["ours"] - r["torchattacks"] for r in rows)
                               <= run_all.STRENGTH_TOLERANCE)
    assert speed["met"] == (min(r["speedup_cpu"] for r in rows) >= 1.5)
    assert sound["met"] and sound["detail"].count(" 0 of ") == 2  # the 1-Lipschitz model's L2 ε
    assert "## 6. AutoAttack against torchattacks" in (out / "RESULTS.md").read_text()


def test_counting_model_counts_images_with_and_without_gradient() -> None:
    """The AutoAttack benchmark's counter leaves outputs unchanged and tells gradient
    evaluations (input requiring a gradient, gradients enabled) from plain ones."""
    from benchmarks.bench_autoattack import CountingModel

    model = torch.nn.Linear(4, 3)
    counting = CountingModel(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(counting(x), model(x))
    counting(x.clone().requires_grad_()).sum().backward()
    counting(torch.randn(2, 4))  # gradients enabled, but the input needs none
    with torch.no_grad():
        counting(x.clone().requires_grad_())
    assert counting.counts() == {"forward": 12, "gradient": 5}


def test_run_all_autoattack_section_takes_cells_measured_one_per_call(tmp_path: Path) -> None:
    """``--aa-cells`` builds section 6 from ``bench_autoattack.py --json`` rows: it names the
    cells still missing (with the command for each) and rejects rows measured on another
    bundled model or budget, so no published row comes from a model that is not bundled."""
    from benchmarks import bench_autoattack, run_all

    cells = tmp_path / "cells.jsonl"
    bench_autoattack.main(["--n", "4", "--queries", "5", "--models", "baseline",
                           "--eps", "linf:8/255", "--json", str(cells)])
    (row,) = [json.loads(line) for line in cells.read_text().splitlines()]
    assert row["asset_sha256"] == bench_autoattack.asset_fingerprint("baseline")
    common = ["--quick", "--only", "6", "--aa-n", "4", "--aa-queries", "5",
              "--out-dir", str(tmp_path / "out"), "--aa-cells", str(cells)]
    with pytest.raises(SystemExit) as missing:
        run_all.main(common)
    message = str(missing.value)
    assert "lacks 5 of 6 cells" in message
    assert "--models lipschitz --eps l2:36/255" in message
    assert "--models baseline --eps linf:8/255" not in message

    rows = [dict(row, model=m, norm=norm, eps=label) for m in ("lipschitz", "baseline")
            for norm, label in (("l2", "36/255"), ("l2", "0.3"), ("linf", "8/255"))]
    for r in rows:
        r["asset_sha256"] = bench_autoattack.asset_fingerprint(r["model"])
    stale = dict(rows[0], asset_sha256="0" * 64)
    cells.write_text("".join(json.dumps(r) + "\n" for r in [*rows[1:], stale]))
    with pytest.raises(SystemExit) as rejected:
        run_all.main(common)
    assert "lacks 1 of 6 cells" in str(rejected.value)
    assert "another bundled model" in str(rejected.value)

    with cells.open("a") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    section = run_all.main(common)["sections"]["6"]
    assert [(r["model"], r["norm"], r["eps"]) for r in section["rows"]] == \
        [(r["model"], r["norm"], r["eps"]) for r in rows]
    assert section["settings"]["cells_from"] == str(cells)
    assert section["aims"][1]["met"] == (min(r["speedup_cpu"] for r in rows) >= 1.5)


def test_autoattack_cell_measured_in_two_halves_is_joined(tmp_path: Path) -> None:
    """A cell too long for one sitting is measured as ours only and torchattacks only; run_all
    joins the halves: each side's accuracy and time, the speed-up from the two CPU times and the
    points robust to both from the indices each half keeps; with one half it names the other."""
    from benchmarks import bench_autoattack, run_all

    cells = tmp_path / "cells.jsonl"
    common = ["--n", "6", "--queries", "5", "--models", "baseline", "--eps", "l2:0.3",
              "--json", str(cells)]
    (mine,) = bench_autoattack.main([*common, "--skip-torchattacks"])
    assert "torchattacks" not in mine and "speedup_cpu" not in mine
    assert len(mine["ours_robust_points"]) == round(mine["ours"] * 6)
    with pytest.raises(SystemExit) as half:
        run_all.cells_from_file(cells, ["baseline"], [("l2", "0.3", 0.3)], n=6, queries=5)
    assert "--models baseline --eps l2:0.3 --skip-ours" in str(half.value)
    (theirs,) = bench_autoattack.main([*common, "--skip-ours"])
    assert "ours" not in theirs
    (joined,) = run_all.cells_from_file(cells, ["baseline"], [("l2", "0.3", 0.3)], n=6,
                                        queries=5)
    assert joined["ours"] == mine["ours"] and joined["torchattacks"] == theirs["torchattacks"]
    assert joined["speedup_cpu"] == pytest.approx(theirs["torchattacks_cpu_s"] / mine["ours_cpu_s"])
    both = set(mine["ours_robust_points"]) & set(theirs["torchattacks_robust_points"])
    assert joined["both_robust"] == pytest.approx(len(both) / 6)
    assert joined["both_robust"] <= min(joined["ours"], joined["torchattacks"])



def test_run_all_counts_certified_points_an_attack_broke() -> None:
    """run_all recomputes the certificate on the same images and counts the certified points
    missing from an attack's robust ones: 0 when all are there, 1 when one is dropped."""
    from benchmarks import bench_autoattack, run_all
    from robustflow.pretrained import load_test_sample

    images, labels = load_test_sample()
    images, labels = images[:12], labels[:12]
    radii = bench_autoattack.certified_radii(bench_autoattack.bundled_plain("lipschitz"),
                                             images, labels, 250, [36 / 255])
    certified = (radii > 36 / 255).nonzero().squeeze(1).tolist()
    assert certified
    row = {"model": "lipschitz", "norm": "l2", "eps": "36/255",
           "torchattacks_robust_points": list(range(12))}
    linf = dict(row, norm="linf", eps="8/255")  # no L∞ certificate: not counted
    assert run_all._certified_broken_by_torchattacks([row, linf], images, labels) == [
        {"model": "lipschitz", "norm": "l2", "eps": "36/255", "certified": len(certified),
         "broken": 0}]
    dropped = dict(row, torchattacks_robust_points=[i for i in range(12) if i != certified[0]])
    (check,) = run_all._certified_broken_by_torchattacks([dropped], images, labels)
    assert check["broken"] == 1
