"""TicketSearch: the whole protocol on a user's own model (CNN + BatchNorm) and data, with
resume after a kill, tickets that rebuild the level exactly, and the hooks (regression)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lottery_ext as lx
from lottery_ext.experiments import training
from lottery_ext.experiments.rundir import load_checkpoint


class Images(Dataset):
    """A user's own Dataset class: (image, label) items."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = (self.x[:, 0, :4].mean((1, 2)) > self.x[:, 0, 4:].mean((1, 2))).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _search(out: Path, **kw) -> lx.TicketSearch:
    args = dict(model=Net, train=Images(256, 0), val=Images(64, 1), test=Images(64, 2),
                optimizer=lambda p: lx.MaskedAdam(p, lr=1e-2), iterations=40, batch_size=32,
                eval_every=10, rounds=2, rate=0.3, trials=1, out=out, progress=False,
                checkpoint_every=10, threads=1)  # fmt: skip
    args.update(kw)
    return lx.TicketSearch(**args)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search") / "run"
    threads = torch.get_num_threads()
    try:
        _search(out).run()
    finally:
        torch.set_num_threads(threads)
    return out


def test_own_cnn_with_batchnorm_writes_every_file(done):
    rows = _rows(done)
    assert [(r["control"], r["level"]) for r in rows] == [
        ("ticket", 0), ("ticket", 1), ("reinit", 1), ("random_prune", 1),
        ("ticket", 2), ("reinit", 2), ("random_prune", 2),
    ]  # fmt: skip
    assert rows[2]["weights_remaining"] == rows[1]["weights_remaining"] < 1.0
    for r in rows:
        assert 0 <= r["test_accuracy_at_early_stop"] <= 1 and r["early_stop_iteration"] % 10 == 0
    for name in ("config.json", "curves.jsonl", "state/trial0_theta.pt",
                 "state/trial0_masks1.pt", "state/trial0_masks2.pt"):  # fmt: skip
        assert (done / name).exists(), name
    cfg = json.loads((done / "config.json").read_text())["config"]
    assert cfg["preset"] == "custom" and cfg["pruner_options"]["rate"] == 0.3


def test_ticket_build_reproduces_the_level(done):
    search = _search(done)
    ticket = search.ticket(0, 2)
    saved = load_checkpoint(done / "state" / "trial0_masks2.pt")
    assert all(torch.equal(ticket.masks[n], m) for n, m in saved.items())
    theta0 = load_checkpoint(done / "state" / "trial0_theta.pt")["theta0"]["tensors"]
    model = ticket.build()  # the search's own factory
    state = model.state_dict()
    for name, t in theta0.items():  # parameters and BatchNorm buffers
        if name in ticket.masks:
            m = ticket.masks[name]
            assert torch.equal(state[name][m], t[m]) and not state[name][~m].any()
        else:
            assert torch.equal(state[name], t), name
    assert search.ticket(0).provenance["level"] == 2  # default: the last level done


def test_same_seed_same_results_and_resume_after_a_kill(done, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    orig = training.Level.evaluate_now

    def evaluate_now(self):
        if (self.unit["control"], self.unit["level"], self.it) == ("ticket", 1, 30):
            raise KeyboardInterrupt  # a kill mid-unit, after the checkpoint at iteration 20
        orig(self)

    monkeypatch.setattr(training.Level, "evaluate_now", evaluate_now)
    with pytest.raises(KeyboardInterrupt):
        _search(out).run()
    assert (out / "state" / "unit_t0_ticket_L1.pt").exists()
    monkeypatch.setattr(training.Level, "evaluate_now", orig)
    _search(out).run()
    assert _rows(out) == _rows(done)


def test_inputs_as_tensor_pairs_and_dataloaders(done, tmp_path):
    train, val, test = Images(256, 0), Images(64, 1), Images(64, 2)
    out = tmp_path / "forms"
    _search(out, train=DataLoader(train, batch_size=7), val=(val.x, val.y),
            test=TensorDataset(test.x, test.y)).run()  # fmt: skip
    assert _rows(out) == _rows(done)


def test_regression_with_hooks(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g)

    def loss_fn(model, batch):
        xb, yb = batch
        return nn.functional.mse_loss(model(xb), yb)

    def evaluate(model, split):
        xs, ys = (x[200:250], y[200:250]) if split == "val" else (x[250:], y[250:])
        return {"mse": float(nn.functional.mse_loss(model(xs), ys))}

    search = lx.TicketSearch(
        model=lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)),
        train=(x[:200], y[:200]), val=(x[200:250], y[200:250]), test=(x[250:], y[250:]),
        optimizer=lambda p: lx.MaskedSGD(p, lr=0.05, momentum=0.9), iterations=30,
        batch_size=20, eval_every=10, rounds=1, out=tmp_path / "reg", progress=False,
        loss_fn=loss_fn, evaluate=evaluate, early_stop_on="val_mse", controls=["reinit"],
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10, 0.5), threads=1,
    )  # fmt: skip
    search.run()
    rows = search.results()
    assert len(rows) == 3 and all("val_mse_at_early_stop" in r and "final_test_mse" in r
                                  for r in rows)  # fmt: skip
    best = min(h["val_mse"] for h in json.loads(
        (tmp_path / "reg" / "curves.jsonl").read_text().splitlines()[0])["history"])  # fmt: skip
    assert rows[0]["val_mse_at_early_stop"] == best


def test_bad_inputs_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(TypeError, match="masked optimizer"):
        _search(tmp_path / "a", optimizer=lambda p: torch.optim.Adam(p))
    with pytest.raises(ValueError, match="val"):
        _search(tmp_path / "b", val=None)
    with pytest.raises(TypeError, match="train: expected a torch Dataset"):
        _search(tmp_path / "c", train=42)
    with pytest.raises(ValueError, match="rate"):
        _search(tmp_path / "d", rate=1.5)
    assert not any(tmp_path.iterdir())


MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2))

def datasets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, 4, generator=g)
    y = (x.sum((1, 2)) > 0).long()
    train, val = TensorDataset(x[:200], y[:200]), TensorDataset(x[200:250], y[200:250])
    return train, val, (x[250:], y[250:])
"""


def test_cli_find_with_own_model_and_data(tmp_path, monkeypatch, capsys):
    from lottery_ext.cli import main

    (tmp_path / "my_own_task.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = ["find", "--model", "my_own_task:make_net", "--data", "my_own_task:datasets",
            "--rounds", "1", "--iterations", "20", "--eval-every", "10", "--trials", "1",
            "--batch-size", "20", "--threads", "1", "--no-progress", "--no-plots",
            "--optimizer", "adam", "--lr", "0.01", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _rows(out)
    assert [(r["control"], r["level"]) for r in rows] == [
        ("ticket", 0), ("ticket", 1), ("reinit", 1), ("random_prune", 1)]  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["model"] == "my_own_task:make_net" and cfg["optimizer"] == "adam"
    assert main([*args[:-2], "--dry-run"]) == 0
    assert "0.weight" not in capsys.readouterr().err
    assert main(["find", "--model", "my_own_task:nope", "--data", "my_own_task:datasets"]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    assert main(["find", "--model", "my_own_task:make_net"]) == 2
    assert "--model and --data go together" in capsys.readouterr().err


def test_find_help_documents_every_option(capsys):
    from lottery_ext.cli import build_parser

    parser = build_parser()
    find = parser._subparsers._group_actions[0].choices["find"]
    for action in find._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["find", "--help"])
    text = capsys.readouterr().out
    assert "--rewind-iteration" in text and "(mnist1d-mlp: 0.2)" in text


def _sequences(n: int, seed: int, vocab: int = 20, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, (x[:, 0] > vocab // 2).long()


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True,
                                           dropout=0.0)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0][:, -1])


@pytest.mark.parametrize("net", [TinyTransformer, TinyLSTM], ids=["transformer", "lstm"])
def test_transformer_and_lstm_through_ticket_search(net, tmp_path):
    search = lx.TicketSearch(
        model=net, train=_sequences(200, 0), val=_sequences(50, 1), test=_sequences(50, 2),
        optimizer=lambda p: lx.MaskedAdam(p, lr=1e-2), iterations=20, batch_size=20,
        eval_every=10, rounds=2, rate=0.2, controls=(), out=tmp_path / "run", progress=False,
        threads=1,
    )  # fmt: skip
    search.run()
    rows = search.results()
    assert [r["level"] for r in rows] == [0, 1, 2]
    probe = net()
    pruner = lx.MagnitudePruner(probe, rate=0.2)
    expected = {n: p.numel() for n, p in pruner.targets.items()}
    for _ in range(2):  # exact per-tensor counts, round after round (output layer at rate/2)
        expected = {n: k - round(pruner.rates[n] * k) for n, k in expected.items()}
    ticket = search.ticket(0, 2)
    assert {n: int(m.sum()) for n, m in ticket.masks.items()} == expected
    assert any("lstm" in n or "self_attn" in n for n in ticket.masks)
    model = ticket.build()
    named = dict(model.named_parameters())
    for name, m in ticket.masks.items():
        assert not named[name].detach()[~m].any()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--threads", "-1"], "--threads must be >= 1"),
        (["--milestones", "a,b"], "--milestones takes comma-separated iterations"),
        (["--device", "tpu"], "--device tpu: not a device torch can use here; available: cpu"),
        (["--controls", "foo"], "--controls: unknown ['foo']"),
        (["--rate", "1.5"], "--rate must be in [0, 1)"),
        (["--iterations", "0"], "--iterations must be >= 1"),
    ],
)
def test_find_checks_every_option_before_writing(option, message, tmp_path, capsys):
    from lottery_ext.cli import main

    out = tmp_path / "run"
    assert main(["find", *option, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_cuda_device_without_cuda_lists_the_available_ones(tmp_path, capsys):
    from lottery_ext.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["find", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "available: cpu" in capsys.readouterr().err


def test_presets_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lottery_ext", "presets"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader leaves at once, as `| head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "BrokenPipe" not in err and "Traceback" not in err


def test_interrupted_find_says_how_to_resume_and_resume_says_where(tmp_path, monkeypatch, capsys):
    from lottery_ext.cli import main

    out = tmp_path / "run"
    args = ["find", "--rounds", "1", "--trials", "1", "--iterations", "40", "--eval-every", "10",
            "--checkpoint-every", "10", "--threads", "1", "--no-progress", "--no-plots",
            "--controls", "none", "--out", str(out)]  # fmt: skip
    orig = training.Level.evaluate_now

    def evaluate_now(self):
        if (self.unit["level"], self.it) == (1, 30):
            raise KeyboardInterrupt
        orig(self)

    monkeypatch.setattr(training.Level, "evaluate_now", evaluate_now)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume with:" in err and "Traceback" not in err
    monkeypatch.setattr(training.Level, "evaluate_now", orig)
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().out
