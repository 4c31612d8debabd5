"""The loop core the three trainers share (meestral.training: run_log, checkpoint, optim)."""

import json

import pytest
import torch

from meestral.errors import MeestralError
from meestral.training.checkpoint import CHECKPOINT, previous_checkpoint, save_checkpoint
from meestral.training.optim import averaged, make_optimizer, warmup_stable_decay
from meestral.training.run_log import LOG, RunLog


def write_log(out, lines: list[str]):
    out.mkdir(exist_ok=True)
    (out / LOG).write_text("".join(lines))


def test_a_resumed_log_keeps_what_came_before_its_checkpoint(tmp_path):
    records = [{"step": 1}, {"step": 2}, {"final": True}, {"step": 3}, {"step": 4}]
    write_log(tmp_path, [json.dumps(r) + "\n" for r in records] + ['{"step": 5, "lo'])  # killed mid-line
    log = RunLog(tmp_path, 2)
    kept = [{"step": 1}, {"step": 2}, {"final": True}]  # a record without a step stays where it is
    assert log.records == kept
    log.write({"step": 3, "loss": 0.5})
    assert [json.loads(l) for l in (tmp_path / LOG).read_text().splitlines()] == kept + [{"step": 3, "loss": 0.5}]


def test_a_cut_line_ends_the_readable_log(tmp_path):
    write_log(tmp_path, ['{"step": 1}\n', '{"step": 2, "lo\n', '{"step": 3}\n'])
    assert RunLog(tmp_path, 10).records == [{"step": 1}]
    write_log(tmp_path, ['{"step": 1}\n', '{"step": 2}'])  # whole JSON, but its newline was never written
    RunLog(tmp_path, 10).write({"step": 2})
    assert (tmp_path / LOG).read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_run_from_the_start_begins_an_empty_log(tmp_path):
    write_log(tmp_path, ['{"step": 0, "split": "val"}\n', '{"step": 1}\n'])  # a run killed before its checkpoint
    assert RunLog(tmp_path, None).records == [] and (tmp_path / LOG).read_text() == ""
    assert RunLog(tmp_path / "new", None).records == [] and not (tmp_path / "new").exists()  # nothing written yet


def test_a_checkpoint_is_resumed_only_when_asked(tmp_path, capsys):
    assert previous_checkpoint(tmp_path, resume=True) is None
    assert "starting from the beginning" in capsys.readouterr().err
    save_checkpoint(tmp_path, {"step": 3})
    assert previous_checkpoint(tmp_path, resume=True) == {"step": 3}
    with pytest.raises(MeestralError, match="pass --resume"):
        previous_checkpoint(tmp_path, resume=False)
    (tmp_path / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(MeestralError, match="is corrupted"):
        previous_checkpoint(tmp_path, resume=True)


class Cfg:
    optimizer, lr, warmup, weight_decay = "schedulefree", 0.1, 1, 0.0


def test_averaged_weights_inside_the_block_and_training_weights_after_it():
    w = torch.nn.Parameter(torch.zeros(3))
    opt, _ = make_optimizer([w], Cfg, total=10)
    opt.train()
    for _ in range(3):
        opt.zero_grad()
        (w - torch.arange(3.0)).square().sum().backward()
        opt.step()
    y = w.detach().clone()
    with averaged(opt):
        x = w.detach().clone()
    assert not torch.equal(x, y)  # schedule-free's two sequences differ after a few steps
    torch.testing.assert_close(w.detach(), y)
    assert opt.param_groups[0]["train_mode"]


def test_warmup_stable_decay_by_hand():
    lrs = [warmup_stable_decay(s, total=10, lr=1.0, min_lr=0.1, warmup=2, decay_share=0.5) for s in range(11)]
    assert lrs[:5] == [0.5, 1.0, 1.0, 1.0, 1.0]  # warm-up, then the peak up to step 5 = 10 x (1 - 0.5)
    assert lrs[5:] == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28, 0.1])  # linear to the floor at the last step
