"""Flag conventions shared by every command (speedasr.options, docs/cli.md): dtype names and
their aliases, the underscore spelling of dashed options, and typed config overrides."""

import argparse
import importlib
from typing import Literal

import pytest
import torch

from speedasr.cli import COMMANDS
from speedasr.errors import UserError
from speedasr.inference import inference_dtype
from speedasr.models.aed import ModelConfig
from speedasr.options import (
    ArgumentParser,
    config_keys,
    dataclass_sections,
    dtype_name,
    human_count,
    parse_count,
    parse_overrides,
)


def _parser(module: str) -> ArgumentParser:
    parser = ArgumentParser(prog=module)
    importlib.import_module(module).add_arguments(parser)
    return parser


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("BF16", "bfloat16"), ("fp32", "float32"),
     ("float32", "float32"), ("fp16", "float16"), ("float16", "float16")],
)  # fmt: skip
def test_dtype_names_and_aliases(given, canonical):
    assert dtype_name(given) == canonical
    for module in ("speedasr.inference", "speedasr.evaluate"):  # transcribe, eval
        args = _parser(module).parse_args(["--ckpt", "m", "--cuts", "c", "--dtype", given])
        assert args.dtype == canonical
    args = _parser("speedasr.kernels.bench").parse_args(["--dtype", given])  # bench kernels
    assert args.dtype == canonical
    if canonical != "float16":  # bench rtfx times CPU inference: float32 or bfloat16
        assert _parser("speedasr.bench.rtfx").parse_args(["--dtype", given]).dtype == canonical


def test_bad_dtype_is_an_argparse_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        _parser("speedasr.inference").parse_args(["--ckpt", "m.ckpt", "--dtype", "int8"])
    assert e.value.code == 2
    assert "unknown dtype 'int8'; choose float32 (fp32), bfloat16 (bf16)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # rtfx offers no float16 (CPU inference)
        _parser("speedasr.bench.rtfx").parse_args(["--dtype", "fp16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_inference_dtype_reads_aliases():
    assert inference_dtype("bf16", "cpu") is torch.bfloat16
    assert inference_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(UserError, match="float16 needs a GPU"):
        inference_dtype("fp16", "cpu")


def test_underscore_spelling_of_every_dashed_option_is_accepted():
    """For every command, ``--x_y`` reads as ``--x-y`` (the dashed spelling is what help shows);
    config keys (``--model.d_model``) and values are left as written."""
    checked = 0
    for _, module, _ in COMMANDS:
        if not hasattr(importlib.import_module(module), "add_arguments"):
            continue  # train: jsonargparse, config keys only
        parser = _parser(module)
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and "-" in flag[2:]:
                    alias = "--" + flag[2:].replace("-", "_")
                    assert parser._dash_spelling([alias, "a_b"]) == [flag, "a_b"], module
                    assert parser._dash_spelling([f"{alias}=x_y"]) == [f"{flag}=x_y"], module
                    checked += 1
    assert checked > 40
    args = _parser("speedasr.kernels.bench").parse_args(["--head_dim", "32", "--max_len=100"])
    assert (args.head_dim, args.max_len) == ([32], 100)
    assert _parser("speedasr.models.sizing")._dash_spelling(["--model.d_model=1"]) == [
        "--model.d_model=1"
    ]


def test_overrides_are_typed_from_the_dataclass_fields():
    """Values as jsonargparse reads them for ``speedasr train``: later flags win."""
    items = [("model.d_model", "256"), ("model.tie_embeddings", "false"),
             ("model.decoder_heads", "null"), ("model.dropout", "0"),
             ("model.attention_backend", "torch"), ("model.d_model", "192")]  # fmt: skip
    out = parse_overrides(items, {"model": ModelConfig})
    assert out.section("model") == {"d_model": 192, "tie_embeddings": False, "decoder_heads": None,
                                    "dropout": 0.0, "attention_backend": "torch"}  # fmt: skip
    assert isinstance(out.section("model")["dropout"], float)
    assert out.args[0] == "--model.d_model=256" and out.section("data") == {}


def test_config_keys_recurse_into_nested_dataclasses():
    from speedasr.config import TrainConfig
    from speedasr.train.datamodule import DataConfig

    sections = dataclass_sections(TrainConfig)  # what calibrate and bench convergence take
    assert sections["data"] is DataConfig and sections["model"] is ModelConfig
    assert "out_dir" not in sections and "seed" not in sections  # plain keys, not sections
    keys = config_keys(sections)
    assert keys["model.d_model"] is int and "data.spec_augment.enabled" in keys
    assert keys["model.attention_backend"] == Literal["auto", "torch", "triton", "flash_attn"]
    assert "data.spec_augment" not in keys


@pytest.mark.parametrize(
    ("item", "message"),
    [(("model.tie_embeddings", "flase"), "expected true or false, got 'flase'"),
     (("model.tie_embeddings", "1"), "expected true or false, got '1'"),
     (("model.encoder_layers", "2.5"), "expected an integer"),
     (("model.rope_base", "fast"), "expected a number"),
     (("model.vocab", "1"), "unknown config key --model.vocab; did you mean --model.vocab_size?"),
     (("model.zzz", "1"), "takes --SECTION.KEY=VALUE for model (ModelConfig)")],
)  # fmt: skip
def test_override_errors(item, message):
    with pytest.raises(UserError) as e:
        parse_overrides([item], {"model": ModelConfig})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_need_speedasr_parser():
    from speedasr.options import add_config_overrides

    with pytest.raises(TypeError):
        add_config_overrides(argparse.ArgumentParser(), {"model": ModelConfig}, "")


def test_counts_read_and_print_with_one_convention():
    assert parse_count("30M", "--sizes entry") == 30e6
    assert parse_count(" 1.5b ", "--budget") == 1.5e9 and parse_count("1e21", "--flops") == 1e21
    for bad, message in (("lots", "cannot read --budget 'lots'"), ("-3M", "must be a positive")):
        with pytest.raises(UserError, match=message):
            parse_count(bad, "--budget")
    assert [human_count(n) for n in (512, 30.3e6, 883.6e6, 1.03e9, 999.9e3)] == [
        "512",
        "30.3M",
        "884M",
        "1.03B",
        "1M",
    ]
