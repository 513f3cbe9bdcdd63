"""The training loop on tiny synthetic IDX data: metrics, checkpoints, exact resume, stops,
clobber protection; plus a short run on the real MNIST when CVAE_DATA is set."""

import json
import os
import signal
import struct

import numpy as np
import pytest

from cvae import train as T
from cvae.checkpoint import load_checkpoint
from cvae.errors import CvaeError
from cvae.model import Arch, model_from_checkpoint
from cvae.schedule import make_schedule
from cvae import rundir as R
from cvae import workflows as W
from cvae import evaluate as E
from .conftest import REAL, needs_real_data, write_mnist_dir

TINY = Arch(h1=32, h2=16, latent=4)


def make_plan(epochs=2, batch=16, digits=tuple(range(10)), schedule="progressive", lr=3e-3, seed=7):
    return T.Plan(arch=TINY, digits=digits, schedule=make_schedule(schedule, lr), epochs=epochs,
                  seed=seed, batch=batch, lr=lr, data={})


def fresh(run_dir, data_dir, plan=None, threads=1, **kwargs):
    return W.start_run(run_dir, plan or make_plan(), data_dir, threads, **kwargs)


def files(run_dir):
    return {os.path.basename(p): open(p, "rb").read() for p in R.list_checkpoints(run_dir)}


TIMING = ("img_per_s", "seconds")


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# ---------------------------------------------------------------- tests


def test_run_writes_metrics_checkpoints_and_config(tmp_path, data_dir):
    run = tmp_path / "run"
    result = fresh(run, data_dir, make_plan(epochs=3)).run()
    assert (result.status, result.exit_code, result.epoch, result.batch_in_epoch) == ("complete", 0, 3, 0)
    names = sorted(files(run))
    assert names == ["epoch-0001.cvae", "epoch-0002.cvae", "epoch-0003.cvae", "last.cvae"]

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r) == {"epoch", "step", "phase", "beta", "lr", "train_loss", "train_rec", "train_kl",
                          "test_neg_elbo", "test_rec", "test_kl", "img_per_s", "seconds"}
        assert np.isfinite(r["test_neg_elbo"]) and r["test_neg_elbo"] == pytest.approx(r["test_rec"] + r["test_kl"])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_neg_elbo"] < records[0]["test_neg_elbo"]
    assert (records[-1]["phase"], records[-1]["beta"]) == ("QUALITY", 1.0)
    assert records[-1]["step"] == 3 * 13  # 200 images in batches of 16

    meta, sections, _ = load_checkpoint(run / "last.cvae", expected_kind="cvae")
    assert meta["epoch"] == 3 and meta["epochs"] == 3 and meta["batch_in_epoch"] == 0
    assert meta["step"] == meta["adam_t"] == 39
    assert meta["arch"] == TINY.to_json() and meta["digits"] == list(range(10))
    assert meta["schedule"]["name"] == "progressive" and meta["seed"] == 7 and meta["batch"] == 16
    assert meta["data"] == {"name": "MNIST", "train_images": 200, "test_images": 60}
    assert not {"time", "seconds", "created", "threads"} & set(meta)
    assert any(k.startswith("adam_m.") for k in sections)

    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["threads"] == 1 and config["arch"] == TINY.to_json()

    model, meta2 = model_from_checkpoint(run / "epoch-0003.cvae", max_batch=16)
    assert meta2 == meta
    neg_elbo, _, _ = E.test_elbo(model, W.load_datasets(data_dir, meta["digits"])[1], 7)
    assert neg_elbo == pytest.approx(records[-1]["test_neg_elbo"], rel=1e-12)


def test_resume_after_an_epoch_is_byte_identical(tmp_path, data_dir):
    straight = tmp_path / "straight"
    fresh(straight, data_dir).run()

    split = tmp_path / "split"
    result = fresh(split, data_dir).run(stop_after_epochs=1)
    assert (result.status, result.exit_code, result.epoch) == ("stopped", 0, 1)
    assert sorted(files(split)) == ["epoch-0001.cvae", "last.cvae"]
    result = W.resume_run(split, threads=2, data_dir=data_dir).run()  # other thread count too
    assert result.status == "complete"

    assert files(split) == files(straight)
    assert untimed(R.read_metrics(split)) == untimed(R.read_metrics(straight))


@pytest.mark.parametrize("stop_step", [5, 13, 14])  # mid-epoch, at the epoch's last step, first of the next
def test_mid_epoch_stop_and_resume_is_byte_identical(tmp_path, data_dir, stop_step):
    straight = tmp_path / "straight"
    fresh(straight, data_dir).run()

    split = tmp_path / "split"

    def stop(trainer, step):
        if step == stop_step:
            trainer.request_stop(signal.SIGTERM)

    result = fresh(split, data_dir, after_step=stop).run()
    assert result.status == "interrupted" and result.exit_code == 143
    assert result.step == stop_step
    meta, _, _ = load_checkpoint(split / "last.cvae")
    assert meta["step"] == stop_step
    assert (meta["epoch"], meta["batch_in_epoch"]) == divmod(stop_step, 13)
    if stop_step % 13:
        assert "epoch_sums" in meta
        assert len(R.read_metrics(split)) == stop_step // 13

    W.resume_run(split, threads=1, data_dir=data_dir).run()
    assert files(split) == files(straight)
    assert untimed(R.read_metrics(split)) == untimed(R.read_metrics(straight))


def test_a_real_signal_stops_cleanly(tmp_path, data_dir):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)

    def send(trainer, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = fresh(run, data_dir, after_step=send).run()
    assert result.exit_code == 130 and result.step in (3, 4)  # delivered at once or after the next step
    assert signal.getsignal(signal.SIGINT) is before
    meta, _, _ = load_checkpoint(run / "last.cvae")
    assert meta["step"] == result.step and meta["batch_in_epoch"] == result.step


def test_existing_run_is_never_clobbered(tmp_path, data_dir):
    run = tmp_path / "run"
    fresh(run, data_dir, make_plan(epochs=1)).run()
    before = files(run)
    with pytest.raises(CvaeError) as info:
        fresh(run, data_dir)
    assert "--resume" in str(info.value) and str(run) in str(info.value)
    assert files(run) == before


def test_resuming_a_changed_data_set_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    fresh(run, data_dir, make_plan(epochs=2)).run(stop_after_epochs=1)
    other = write_mnist_dir(tmp_path / "other", n_train=150)
    with pytest.raises(CvaeError, match="trained on"):
        W.resume_run(run, threads=1, data_dir=other)


def test_resume_needs_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvaeError, match="no checkpoint"):
        W.load_resume_point(tmp_path / "empty", 1)
    with pytest.raises(CvaeError, match="no such run directory"):
        W.load_resume_point(tmp_path / "missing", 1)


def test_digit_subset_and_partial_batches(tmp_path, data_dir):
    run = tmp_path / "run"
    plan = make_plan(epochs=1, batch=7, digits=(3, 5), schedule="constant")
    trainer = fresh(run, data_dir, plan)
    assert set(np.unique(trainer.train_set.labels)) == {3, 5}
    assert trainer.run().status == "complete"
    (record,) = R.read_metrics(run)
    assert record["phase"] == "CONSTANT" and record["step"] == -(-len(trainer.train_set) // 7)


def test_reporters_get_progress(tmp_path, data_dir):
    calls = []

    class Recorder(T.Reporter):
        every = 4

        def progress(self, done, loss, rec, kl, beta, phase, img_per_s):
            calls.append((done, loss, phase))

        def epoch_end(self, record):
            calls.append(("end", record["epoch"]))

    fresh(tmp_path / "run", data_dir, make_plan(epochs=2), reporter=Recorder()).run()
    assert [c for c in calls if c[0] == "end"] == [("end", 1), ("end", 2)]
    assert [c[0] for c in calls if c[0] != "end"] == [4, 8, 12] * 2


def test_rich_and_json_reporters_render(tmp_path, data_dir, capsys):
    import io

    from rich.console import Console

    buffer = io.StringIO()
    reporter = T.RichReporter(Console(file=buffer, width=160, force_terminal=False))
    fresh(tmp_path / "a", data_dir, make_plan(epochs=2), reporter=reporter).run()
    text = buffer.getvalue()
    assert "epoch 2/2" in text and "-ELBO" in text and "QUALITY" in text

    out, err = io.StringIO(), io.StringIO()
    fresh(tmp_path / "b", data_dir, make_plan(epochs=2), reporter=T.JsonReporter(out, err)).run()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


# ---------------------------------------------------------------- real MNIST



@needs_real_data
def test_mini_on_real_mnist(tmp_path):
    from cvae.model import VARIANTS

    plan = T.Plan(arch=Arch.variant("mini"), digits=VARIANTS["mini"]["digits"],
                  schedule=make_schedule("progressive", 1e-3), epochs=1, seed=0, batch=64, lr=1e-3, data={})
    losses = []

    class Recorder(T.Reporter):
        every = 20

        def progress(self, done, loss, rec, kl, beta, phase, img_per_s):
            losses.append(loss)

    run = tmp_path / "run"
    trainer = W.start_run(run, plan, REAL, threads=1, reporter=Recorder())
    train_set, test_set = trainer.train_set, trainer.test_set
    assert trainer.run().status == "complete"
    assert len(train_set) == 12665 and len(test_set) == 2115
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 30 < record["test_neg_elbo"] < 300
    assert record["train_loss"] < losses[0]  # the running mean fell over the epoch
    model, meta = model_from_checkpoint(run / "last.cvae")
    assert meta["epoch"] == 1 and model.adam_t == record["step"] == 198


def test_a_directory_with_a_runs_outputs_but_no_checkpoint_is_not_clobbered(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(CvaeError, match="metrics.jsonl"):
        R.check_fresh_run_dir(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


@pytest.mark.parametrize("arch", [{"h1": 8, "h2": 8, "latent": 4, "act": "gelu"},
                                  {"h1": -4, "h2": 8, "latent": 4, "act": "elu"},
                                  {"h1": 8, "h2": 8}])
def test_a_checkpoint_header_with_an_impossible_architecture_is_a_clear_error(arch):
    from cvae.model import arch_from_json

    with pytest.raises(CvaeError, match="x.cvae"):
        arch_from_json(arch, source="x.cvae")
