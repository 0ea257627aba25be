"""`speedasr train`'s config: any Lightning Trainer argument, callbacks and loggers by class_path,
one-line errors, --help with descriptions, --print_config round trip, and the saved config and
hparams of a run that `--config` reads back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import CSVLogger

from speedasr.cli import main
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train import builder
from speedasr.train.builder import build_loggers, describe_outputs
from speedasr.train.run import dump_config, load_config, parse_config


def run_cli(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    out, err = capfd.readouterr()
    return code, out, err


# --- the trainer section: any Trainer argument, typed by Lightning's signature -------------------


def test_any_trainer_argument_reaches_lightning():
    cfg = parse_config([
        "--trainer.limit_val_batches=3", "--trainer.deterministic=true",
        "--trainer.benchmark=false", "--trainer.profiler=simple", "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu", "--trainer.devices=1",
    ])  # fmt: skip
    assert cfg.trainer.limit_val_batches == 3 and isinstance(cfg.trainer.limit_val_batches, int)
    settings = {k: v for k, v in vars(cfg.trainer).items() if k not in ("logger", "callbacks")}
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **settings)
    assert trainer.limit_val_batches == 3  # a batch count: 3.0 would be refused as a fraction > 1
    assert type(trainer.profiler).__name__ == "SimpleProfiler"
    assert trainer.max_epochs == 2


def test_speedasr_trainer_defaults_and_lightning_defaults():
    trainer = parse_config([]).trainer
    assert trainer.gradient_clip_val == 1.0 and trainer.num_sanity_val_steps == 0
    assert trainer.max_epochs == 10 and trainer.log_every_n_steps == 10
    assert trainer.precision == "32-true"
    assert trainer.limit_train_batches is None and trainer.detect_anomaly is False  # Lightning's
    assert trainer.logger is None and trainer.callbacks is None


def test_callbacks_and_loggers_by_class_path(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "  - class_path: pytorch_lightning.callbacks.EarlyStopping\n"
        "    init_args: {monitor: val/wer, patience: 7}\n"
        "  logger:\n"
        "  - class_path: CSVLogger\n"
        f"    init_args: {{save_dir: {tmp_path}, name: mine}}\n"
    )
    trainer = parse_config(["--config", str(config)]).trainer
    (stop,) = trainer.callbacks
    assert isinstance(stop, EarlyStopping) and stop.monitor == "val/wer" and stop.patience == 7
    (logger,) = trainer.logger
    assert isinstance(logger, CSVLogger) and logger.name == "mine"
    assert build_loggers(tmp_path / "exp", trainer.logger) == [logger]  # a CSVLogger: no other


def test_loggers_default_and_explicit(tmp_path):
    default = build_loggers(tmp_path, None)
    assert (
        isinstance(default[0], CSVLogger) and Path(default[0].log_dir).parent == tmp_path / "logs"
    )
    has_tb = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    assert len(default) == (2 if has_tb else 1)
    assert build_loggers(tmp_path, False) == []
    text = describe_outputs(tmp_path, default, tmp_path / "config.yaml")
    assert f"metrics.csv  {tmp_path / 'logs/version_0/metrics.csv'}" in text
    assert ("not installed" in text) != has_tb


@pytest.mark.parametrize(
    ("logger", "package"), [("WandbLogger", "wandb"), ("MLFlowLogger", "mlflow")]
)
def test_logger_without_its_package_is_one_line_naming_it(logger, package, capfd):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    code, _, err = run_cli(capfd, f"--trainer.logger={logger}", "--data.train_cuts=x")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        f"speedasr train: error: trainer.logger: pytorch_lightning.loggers.{logger}"
    )
    assert f"needs the package '{package}'" in err and "pip install" in err


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--monitors.padding=flase", "monitors.padding"),  # a typo is not False
        ("--trainer.deterministic=flase", "trainer.deterministic=flase"),
        ("--trainer.precision=bf16-mixedd", "trainer.precision=bf16-mixedd"),
        ("--trainer.max_stepz=3", "did you mean trainer.max_steps?"),
        ("--trainer.default_root_dir=x", "speedasr sets it (it is out_dir)"),
        ("--trainer.sync_batchnorm=true", "conv_norm=batch shares its statistics across ranks"),
        ("--trainer.callbacks+=EarlyStopping", "required: monitor"),
        ("--trainer.callbacks+=os.system", "not correspond to a subclass of Callback"),
        ("--trainer.logger=lightning.pytorch.loggers.CSVLogger", "pytorch_lightning.loggers"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(flag, says, tmp_path, capfd):
    code, _, err = run_cli(capfd, flag, f"--out_dir={tmp_path / 'exp'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert says in err
    assert not (tmp_path / "exp").exists()


def test_bool_typo_in_yaml_is_an_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("monitors: {padding: flase}\n")
    with pytest.raises(UserError, match="monitors.padding"):
        parse_config(["--config", str(config)])


# --- help and print_config ------------------------------------------------------------------------


def test_help_describes_every_section_in_few_lines(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "Seed for weights, sampler and augmentation." in text  # a TrainConfig field
    assert "Peak learning rate (reached at the end of warmup)." in text  # OptimConfig
    assert "How much of validation dataset to check" in text  # Lightning's Trainer docstring
    lines = text.splitlines()
    assert lines[0].startswith("usage: speedasr train [--config FILE.yaml] [--KEY=VALUE ...]")
    assert lines[1] == ""  # one usage line, not one per key
    keys = [line for line in lines if line.startswith("  --")]
    assert len(lines) < 2.5 * len(keys)  # was 298 lines for 97 keys, without descriptions


def test_print_config_flags_print_yaml_that_config_reads_back(tmp_path, capfd):
    argv = [
        "--model.d_model=96", "--trainer.max_epochs=null", "--trainer.profiler=simple",
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/wer",
    ]  # fmt: skip
    assert main(["train", *argv, "--print_config"]) == 0
    printed = capfd.readouterr().out
    assert main(["train", *argv, "--print-config"]) == 0
    assert capfd.readouterr().out == printed
    config = yaml.safe_load(printed)
    assert config["model"]["d_model"] == 96 and config["trainer"]["max_epochs"] is None
    assert config["trainer"]["callbacks"][0]["init_args"]["monitor"] == "val/wer"
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "printed.yaml"), "--print_config"]) == 0
    assert capfd.readouterr().out == printed


# --- a run saves its config and says where everything went ---------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two training steps of a tiny model with an extra callback (a second ModelCheckpoint
    saving every step into its own directory): the argv and out_dir."""
    root = tmp_path_factory.mktemp("run")
    make_tiny_cuts(root / "cuts", n=4, seed=0, durations=(0.4, 0.8))
    Tokenizer.train(tiny_texts(100, seed=1), root / "tok", vocab_size=60)
    (root / "c.yaml").write_text(
        "model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,"
        " subsampling_channels: 8, attention_backend: torch}\n"
        "sampler: {max_duration: 2.0, num_buckets: 1, num_token_buckets: 1}\n"
        "optim: {warmup_steps: 1}\n"
        "data: {num_workers: 0, spec_augment: {enabled: false}}\n"
        "monitors: {gpu: false}\n"
        "trainer:\n"
        "  max_steps: 2\n  max_epochs: null\n  accelerator: cpu\n  devices: 1\n"
        "  enable_progress_bar: false\n  log_every_n_steps: 1\n  enable_model_summary: false\n"
        "  callbacks:\n"
        "  - class_path: pytorch_lightning.callbacks.ModelCheckpoint\n"
        f"    init_args: {{dirpath: {root / 'extra'}, every_n_train_steps: 1, save_top_k: -1,"
        " filename: 'extra{step}',"
        " auto_insert_metric_name: false}\n"
    )
    argv = [
        "--config", str(root / "c.yaml"), f"--out_dir={root / 'exp'}",
        f"--data.train_cuts={root / 'cuts/cuts.jsonl.gz'}", f"--data.tokenizer={root / 'tok'}",
    ]  # fmt: skip
    return root, argv


def test_run_saves_its_config_and_prints_where_outputs_go(tiny_run, capfd):
    root, argv = tiny_run
    code, out, err = run_cli(capfd, *argv)
    assert code == 0, err[-3000:]
    out_dir = root / "exp"
    # The user's callback ran beside speedasr's own checkpointing.
    assert sorted(p.name for p in (root / "extra").glob("*.ckpt")) == ["extra1.ckpt", "extra2.ckpt"]
    assert (out_dir / "checkpoints/last.ckpt").is_file()
    metrics = out_dir / "logs/version_0/metrics.csv"
    assert metrics.is_file()
    start, _, end = out.partition("this run wrote:")
    for text in (start.split("this run writes:")[1], end):
        assert f"checkpoints  {out_dir / 'checkpoints'}" in text
        assert f"metrics.csv  {metrics}" in text
        assert f"config       {out_dir / 'config.yaml'}" in text
    # The saved config is the run's config: `--config` reads it back to the same values.
    parser, given = load_config(argv)
    parser, saved = load_config(["--config", str(out_dir / "config.yaml")])
    del given["config"], saved["config"]  # the file names they came from
    assert saved == given
    assert saved.trainer.callbacks[0].init_args.dirpath == str(root / "extra")
    assert dump_config(parser, saved) == dump_config(parser, given)


TENSORBOARD_HINT = "tensorboard  not installed (pip install tensorboard to log there too)"


def test_tensorboard_hint_only_where_speedasr_chooses_the_loggers(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "_has_tb", lambda: False)  # as where tensorboard is missing
    default = build_loggers(tmp_path, None)
    assert TENSORBOARD_HINT in describe_outputs(tmp_path, default, None, chosen=None)
    assert TENSORBOARD_HINT in describe_outputs(tmp_path, default, None, chosen=True)
    mine = [CSVLogger(str(tmp_path), name="mine")]  # the user's choice: TensorBoard is not in it
    assert TENSORBOARD_HINT not in describe_outputs(tmp_path, mine, None, chosen=mine)
    assert TENSORBOARD_HINT not in describe_outputs(tmp_path, [], None, chosen=False)


def test_a_run_with_a_csv_logger_configured_has_no_tensorboard_hint(
    tiny_run, tmp_path, monkeypatch, capfd
):
    root, argv = tiny_run
    monkeypatch.setattr(builder, "_has_tb", lambda: False)
    (tmp_path / "csv.yaml").write_text(
        "trainer:\n  logger:\n  - class_path: CSVLogger\n"
        f"    init_args: {{save_dir: {tmp_path}, name: mine}}\n"
    )
    code, out, err = run_cli(
        capfd, *argv, "--config", str(tmp_path / "csv.yaml"), f"--out_dir={tmp_path / 'exp'}"
    )
    assert code == 0, err[-3000:]
    assert out.count(f"metrics.csv  {tmp_path / 'mine/version_0/metrics.csv'}") == 2
    assert "tensorboard" not in out


def test_a_run_without_loggers_trains_and_says_so(tiny_run, tmp_path, capfd):
    root, argv = tiny_run
    code, out, err = run_cli(capfd, *argv, "--trainer.logger=false", f"--out_dir={tmp_path}")
    assert code == 0, err[-3000:]
    assert out.count("logs         none (trainer.logger: false)") == 2  # will write, wrote
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    assert not list(tmp_path.rglob("metrics.csv"))


def test_hparams_yaml_is_safe_yaml_that_config_reads(tiny_run, capfd):
    root, argv = tiny_run
    if not (root / "exp/logs/version_0/hparams.yaml").exists():
        assert run_cli(capfd, *argv)[0] == 0
    text = (root / "exp/logs/version_0/hparams.yaml").read_text()
    assert "!!python" not in text
    hparams = yaml.safe_load(text)
    assert hparams["optim"]["betas"] == [0.9, 0.98]
    vocab = Tokenizer.load(root / "tok").vocab_size
    assert hparams["model"]["vocab_size"] == vocab != 256  # the model as trained (tokenizer's)
    assert hparams["trainer"]["max_steps"] == 2  # the rest of the run's config is logged too
    cfg = parse_config(["--config", str(root / "exp/logs/version_0/hparams.yaml")])
    assert cfg.optim.betas == (0.9, 0.98) and cfg.model.d_model == 32
