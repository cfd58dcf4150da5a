"""Tickets as artefacts: export from a run directory, save/load (weights_only), check/apply/
build, the --best choice, and damaged or foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lottery_ext as lx
from lottery_ext.cli import main
from lottery_ext.experiments.runner import load_checkpoint, read_jsonl
from lottery_ext.ticket import FORMAT, best_level, export_ticket

TINY = ["--rounds", "2", "--trials", "2", "--iterations", "40", "--eval-every", "20",
        "--checkpoint-every", "20", "--threads", "1", "--no-progress", "--no-plots",
        "--controls", "none"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ticket") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["find", "--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def late_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ticket_late") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["find", "--out", str(out), *TINY, "--rewind-iteration", "10"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_export_save_load_build_reproduces_the_level(run, tmp_path):
    out = tmp_path / "t.pt"
    assert main(["export", str(run), "--trial", "1", "--level", "2", "--out", str(out)]) == 0
    ticket = lx.load_ticket(out)
    saved_masks = load_checkpoint(run / "state" / "trial1_masks2.pt")
    assert set(ticket.masks) == set(saved_masks)
    for name, m in saved_masks.items():
        assert torch.equal(ticket.masks[name], m)
    theta0 = load_checkpoint(run / "state" / "trial1_theta.pt")["theta0"]["tensors"]
    assert ticket.iteration == 0
    model = ticket.build()  # the preset's architecture, from the run's config.json
    params = dict(model.named_parameters())
    for name, t in theta0.items():
        actual = dict(model.state_dict())[name]
        if name in ticket.masks:
            m = ticket.masks[name]
            assert torch.equal(actual[m], t[m]) and not actual[~m].any()
        else:
            assert torch.equal(actual, t), name
    assert ticket.provenance["trial"] == 1 and ticket.provenance["level"] == 2
    row = ticket.provenance["figures"]
    assert row["weights_remaining"] == pytest.approx(ticket.density(), abs=0.02)
    assert ticket.recipe["rate"] == 0.2
    # ready to train: the masks hold under a masked optimizer
    opt = lx.MaskedSGD(model.named_parameters(), lr=0.1, momentum=0.9, masks=ticket.masks)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 40)).sum().backward()
        opt.step()
    for name, m in ticket.masks.items():
        assert not params[name].detach()[~m].any()
    assert "kept" in repr(ticket)


def test_ticket_file_loads_with_weights_only(run, tmp_path):
    path = export_ticket(run, 0, 1).save(tmp_path / "t.pt")
    sd = torch.load(path, weights_only=True)
    assert sd["format"] == FORMAT
    json.dumps(sd["provenance"])  # plain JSON-compatible provenance


def test_late_rewinding_ticket_rewinds_to_theta_k(late_run):
    ticket = export_ticket(late_run, 0, 1)
    theta = load_checkpoint(late_run / "state" / "trial0_theta.pt")
    assert ticket.iteration == 10
    for name, t in theta["theta_k"]["tensors"].items():
        assert torch.equal(ticket.rewind_point[name], t)
    dense = export_ticket(late_run, 0, 0)  # the dense level starts from θ0
    assert dense.iteration == 0 and dense.masks == {}


def test_apply_names_what_does_not_fit(run):
    ticket = export_ticket(run, 0, 1)
    wrong = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 10))
    with pytest.raises(ValueError, match="does not fit this model") as info:
        ticket.apply(wrong)
    assert "the model has no" in str(info.value)
    model = ticket.build()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = lx.MaskedAdam(model.parameters())
    ticket.apply(model, opt)  # a masked optimizer: masks handed over, no warning
    name, mask = next(iter(ticket.masks.items()))
    assert torch.equal(opt.get_mask(dict(model.named_parameters())[name]), mask)


def test_best_level_choice_and_cli(run, tmp_path, capsys):
    rows = [r for r in read_jsonl(run / "results.jsonl") if r["control"] == "ticket"]
    trial, level, why = best_level(run, tolerance=100.0)  # anything goes: the sparsest level
    assert level == max(r["level"] for r in rows)
    assert "sparsest" in why and f"trial {trial}" in why
    out = tmp_path / "best.pt"
    assert main(["export", str(run), "--best", "--tolerance", "100", "--out", str(out)]) == 0
    assert "chose trial" in capsys.readouterr().out
    assert lx.load_ticket(out).provenance["level"] == level
    _, strict, _ = best_level(run, tolerance=0.0)  # no loss allowed vs the dense mean

    def mean(lv):
        accs = [r["test_accuracy_at_early_stop"] for r in rows if r["level"] == lv]
        return sum(accs) / len(accs)

    assert mean(strict) >= mean(0)
    assert all(mean(lv) < mean(0) for lv in {r["level"] for r in rows} if lv > strict)
    with pytest.raises(ValueError, match="tolerance"):
        best_level(run, tolerance=float("nan"))


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--trial", "5", "--level", "1"], "trial must be in"),
        (["--trial", "0", "--level", "9"], "level must be in"),
        (["--level", "1"], "give --trial and --level"),
        (["--best", "--trial", "0"], "drop --trial"),
    ],
)
def test_export_errors_are_one_line(run, args, msg, capsys):
    assert main(["export", str(run), *args]) == 2
    assert msg in capsys.readouterr().err


def test_damaged_and_foreign_ticket_files_are_refused(run, tmp_path):
    good = export_ticket(run, 0, 1).save(tmp_path / "good.pt")
    raw = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable ticket file"):
        lx.load_ticket(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lottery_ext ticket"):
        lx.load_ticket(tmp_path / "other.pt")
    sd = torch.load(good, weights_only=True)
    name = next(iter(sd["masks"]))
    sd["masks"][name] = sd["masks"][name][:1]
    torch.save(sd, tmp_path / "bad_mask.pt")
    with pytest.raises(ValueError, match="damaged ticket"):
        lx.load_ticket(tmp_path / "bad_mask.pt")
    with pytest.raises(FileNotFoundError):
        lx.load_ticket(tmp_path / "missing.pt")


def test_ticket_from_own_model_needs_a_factory():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    snap = lx.snapshot(model)
    ticket = lx.Ticket({"0.weight": torch.rand(4, 5) > 0.5}, snap, {"rate": 0.2})
    with pytest.raises(ValueError, match="factory"):
        ticket.build()
    built = ticket.build(lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)))
    m = ticket.masks["0.weight"]
    assert torch.equal(built[0].weight.detach()[m], snap["0.weight"][m])
    with pytest.raises(ValueError, match="shape"):
        lx.Ticket({"0.weight": torch.ones(3, 3, dtype=torch.bool)}, snap)
    with pytest.raises(ValueError, match="names no parameter"):
        lx.Ticket({"nope": torch.ones(3, dtype=torch.bool)}, snap)


def test_find_dry_run_shows_every_parameter_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["find", "--dry-run", "--out", str(out), "--rate", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "fc.weight" in text and "output layer (rate/2)" in text and "0.15" in text
    assert "bias: prune_biases=False" in text and "nothing was trained or written" in text
    assert not out.exists() and not (tmp_path / "runs").exists()
