"""import-nemo against NeMo itself: the fixture's outputs were computed by nemo-toolkit 3.0.0
(tests/fixtures/nemo/README.md); nothing here needs NeMo.

Every output is compared as ``max |ours - NeMo| / max |NeMo|`` in float32, for the three
utterances in one packed batch, in one padded batch (junk past each length) and one by one.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from speedasr.cli import main
from speedasr.core.segments import Segments
from speedasr.decoding.greedy import GreedySearch
from speedasr.decoding.options import DecodingOptions
from speedasr.errors import UserError
from speedasr.nemo.archive import read_nemo
from speedasr.nemo.import_nemo import import_nemo, load_imported

FIXTURE = Path(__file__).parents[1] / "fixtures" / "nemo"
NEMO = FIXTURE / "canary_tiny.nemo"
TOL = 1e-5  # fp32, relative to the output's largest magnitude
UTTS = (0, 1, 2)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    ckpt, *_ = import_nemo(NEMO, out)
    model, raw = load_imported(ckpt)
    return out, model, raw


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float((ours.float() - theirs).abs().max() / theirs.abs().max())


def _features(ref, utts=UTTS):
    return [ref[f"utt{u}.features"].T.contiguous() for u in utts]  # (T, 128) each


def _encode(model, feats: list[torch.Tensor], layout: str):
    """Encoder output per utterance, and the packed output + segments for the decoder."""
    segments = Segments.from_lengths([f.shape[0] for f in feats], "cpu")
    if layout == "packed":
        enc, enc_segments = model.encode(torch.cat(feats), segments)
        return enc_segments.split(enc), enc, enc_segments
    padded = segments.pad(torch.cat(feats))
    enc, enc_segments = model.encode_padded(padded, segments)
    return [e[:n] for e, n in zip(enc, enc_segments.lengths, strict=True)], enc, enc_segments


def test_features_equal_nemo(imported, ref):
    _, model, _ = imported
    with torch.no_grad():
        for u in UTTS:
            ours = model.frontend(ref[f"utt{u}.audio"])
            assert rel(ours.T, ref[f"utt{u}.features"]) <= TOL


@pytest.mark.parametrize("layout", ["packed", "padded", "alone"])
def test_encoder_and_projection_equal_nemo(imported, ref, layout):
    _, model, _ = imported
    with torch.no_grad():
        if layout == "alone":
            outs = [_encode(model, _features(ref, [u]), "packed")[0][0] for u in UTTS]
        else:
            outs = _encode(model, _features(ref), layout)[0]
        for u, enc in zip(UTTS, outs, strict=True):
            assert rel(enc, ref[f"utt{u}.encoder_output"]) <= TOL
            memory = model.decoder.project_memory(enc, torch.arange(enc.shape[0]))
            assert rel(memory, ref[f"utt{u}.encoder_projected"]) <= TOL


@pytest.mark.parametrize("layout", ["packed", "padded", "alone"])
def test_teacher_forced_log_probs_equal_nemo(imported, ref, layout):
    """Also checks that NeMo's attention (q and k each scaled by dh^-1/4, -10000 masks) is the
    same maths as speedasr's 1/sqrt(dh) scores."""
    _, model, _ = imported
    inputs = [ref[f"utt{u}.target_ids"][:-1] for u in UTTS]
    with torch.no_grad():
        if layout == "alone":
            got = []
            for u, ids in zip(UTTS, inputs, strict=True):
                _, enc, es = _encode(model, _features(ref, [u]), "packed")
                ts = Segments.from_lengths([len(ids)], "cpu")
                got.append(model.decode_logits(ids, ts, enc, es).log_softmax(-1))
        else:
            _, enc, es = _encode(model, _features(ref), layout)
            ts = Segments.from_lengths([len(i) for i in inputs], "cpu")
            tokens = torch.cat(inputs) if layout == "packed" else ts.pad(torch.cat(inputs))
            logits = model.decode_logits(tokens, ts, enc, es).log_softmax(-1)
            got = ts.split(logits if layout == "packed" else ts.unpad(logits))
        for u, lp in zip(UTTS, got, strict=True):
            assert rel(lp, ref[f"utt{u}.decoder_log_probs"]) <= TOL


@pytest.mark.parametrize("layout", ["packed", "padded", "alone"])
def test_greedy_ids_equal_nemo(imported, ref, layout):
    """NeMo's limit in the fixture: encoder length + 8 tokens, the 9-token prompt included."""
    _, model, _ = imported
    search = GreedySearch(DecodingOptions())
    eot = int(ref["utt0.target_ids"][-1])
    groups = [[u] for u in UTTS] if layout == "alone" else [list(UTTS)]
    got = {}
    with torch.no_grad():
        for utts in groups:
            _, enc, es = _encode(model, _features(ref, utts), layout)
            if layout == "padded":
                enc = es.unpad(enc)
            prompts = [ref[f"utt{u}.prompt_ids"].tolist() for u in utts]
            limits = torch.tensor([int(ref[f"utt{u}.encoder_length"]) + 8 - 9 for u in utts])
            for u, ids in zip(
                utts, search.search(model, enc, es, prompts, eot, limits), strict=True
            ):
                got[u] = ids
    for u in UTTS:
        theirs = ref[f"utt{u}.greedy_ids"].tolist()[9:]
        assert got[u] == [i for i in theirs if i != eot]


def test_output_dir_keeps_nemo_config_and_tokenizers(imported):
    out, model, raw = imported
    archive = read_nemo(NEMO)
    assert (out / "nemo" / "model_config.yaml").read_bytes() == archive.config_bytes
    for name, data in archive.files.items():
        assert (out / "nemo" / name).read_bytes() == data
    assert [lang for lang, _ in raw["tokenizer"]["langs"]] == ["spl_tokens", "en"]
    assert raw["tokenizer"]["prompt_format"] == "canary2"
    assert model.cfg.vocab_size == 128 and model.cfg.pad_id == 2  # NeMo's loss.pad_id
    assert model.decoder.output.weight is model.decoder.embed.weight


def test_cli_imports_and_prints(tmp_path, capsys):
    assert main(["import-nemo", str(NEMO), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.ckpt").is_file()
    assert "imported" in capsys.readouterr().out


def test_out_must_be_new_or_empty_unless_overwrite(tmp_path, capsys):
    """import-nemo never writes into a directory holding something else (another import, a
    user's files) unless told to; then it replaces model.ckpt and nemo/ (no stale files)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["import-nemo", str(NEMO), "--out", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out '{busy}' is not empty" in err
    assert "--overwrite" in err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    out = tmp_path / "empty"
    out.mkdir()
    assert main(["import-nemo", str(NEMO), "--out", str(out)]) == 0  # empty: fine
    first = (out / "model.ckpt").read_bytes()
    (out / "model.ckpt").write_bytes(b"changed")
    assert main(["import-nemo", str(NEMO), "--out", str(out)]) == 2  # a second import: refused
    assert "is not empty" in capsys.readouterr().err
    assert (out / "model.ckpt").read_bytes() == b"changed"
    (out / "nemo" / "stale_tokenizer.model").write_bytes(b"another model's")
    for flag in ("--overwrite", "--force"):
        assert main(["import-nemo", str(NEMO), "--out", str(out), flag]) == 0
        assert (out / "model.ckpt").read_bytes() == first
        assert not (out / "nemo" / "stale_tokenizer.model").exists()
    with pytest.raises(UserError, match="not empty"):
        import_nemo(NEMO, out)  # the Python function refuses too


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _members() -> dict[str, bytes]:
    with tarfile.open(NEMO) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_not_a_tar_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "model.nemo"
    bad.write_text("hello")
    assert main(["import-nemo", str(bad), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "not a tar archive" in err


def test_tar_without_weights_is_one_line_error(tmp_path, capsys):
    members = {k: v for k, v in _members().items() if not k.endswith("model_weights.ckpt")}
    bad = _tar(tmp_path / "noweights.nemo", members)
    assert main(["import-nemo", str(bad), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "model_weights.ckpt" in err
    assert not (tmp_path / "o").exists()


def test_member_names_never_reach_the_disk(tmp_path):
    """Members named ../x (path traversal) or inside folders are ignored, never written."""
    work = tmp_path / "work"
    work.mkdir()
    members = {**_members(), "../escaped.model": b"x", "./sub/inner.txt": b"y"}
    import_nemo(_tar(work / "evil.nemo", members), work / "out")
    assert not (tmp_path / "escaped.model").exists() and not (work / "escaped.model").exists()
    written = sorted(p.name for p in (work / "out" / "nemo").iterdir())
    assert written == sorted([*read_nemo(NEMO).files, "model_config.yaml"])


def _with_state(tmp_path: Path, change) -> Path:
    members = _members()
    key = next(k for k in members if k.endswith("model_weights.ckpt"))
    state = torch.load(io.BytesIO(members[key]), weights_only=True)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    members[key] = buf.getvalue()
    return _tar(tmp_path / "changed.nemo", members)


def test_unused_and_missing_keys_are_listed(tmp_path):
    def change(state):
        state["encoder.extra.weight"] = torch.zeros(1)
        del state["encoder.layers.1.self_attn.pos_bias_u"]

    with pytest.raises(UserError) as e:
        import_nemo(_with_state(tmp_path, change), tmp_path / "o")
    message = str(e.value)
    assert "encoder.extra.weight" in message and "encoder.layers.1.self_attn.pos_bias_u" in message


def test_untied_head_is_refused(tmp_path):
    def change(state):
        state["log_softmax.mlp.layer0.weight"] = state["log_softmax.mlp.layer0.weight"] + 1

    with pytest.raises(UserError, match="not tied"):
        import_nemo(_with_state(tmp_path, change), tmp_path / "o")


def test_aggregate_tokenizer_gives_nemos_ids_and_text(imported, ref):
    from speedasr.checkpoint import load_model

    out, _, _ = imported
    tokenizer = load_model(out / "model.ckpt").tokenizer
    assert tokenizer.languages == ("en",)
    for u in UTTS:
        target = ref[f"utt{u}.target_ids"].tolist()
        assert tokenizer.prompt("en") == ref[f"utt{u}.prompt_ids"].tolist()  # canary2, 9 tokens
        assert tokenizer.encode(ref[f"utt{u}.text"], "en") == target[9:-1]
        assert tokenizer.eot_id == target[-1]
        assert tokenizer.decode(ref[f"utt{u}.greedy_ids"][9:]) == ref[f"utt{u}.greedy_text"]


def test_transcribe_gives_nemos_greedy_text(imported, ref, tmp_path, capsys):
    """Audio file -> NeMo front end -> canary2 prompt -> greedy -> aggregate decoding. The
    random model repeats one token up to NeMo's limit (encoder length + 8 with the prompt)."""
    import soundfile as sf

    out, _, _ = imported
    for u in UTTS:
        wav = tmp_path / f"utt{u}.wav"
        sf.write(wav, ref[f"utt{u}.audio"].numpy(), 16000, subtype="FLOAT")
        max_len = str(int(ref[f"utt{u}.encoder_length"]) + 8 - 9)
        argv = ["transcribe", "--ckpt", str(out / "model.ckpt"), str(wav), "--max-len", max_len]
        assert main([*argv, "--quiet"]) == 0
        line = capsys.readouterr().out.strip()
        assert line == f"{wav}\t{ref[f'utt{u}.greedy_text']}"


def test_eval_reads_the_nemo_front_end(imported, ref, tmp_path):
    """``speedasr eval``'s path (``evaluate``) on an imported model: NeMo's greedy text."""
    import soundfile as sf

    from speedasr.checkpoint import load_model
    from speedasr.decoding.transcribe import cuts_from_audio
    from speedasr.evaluate import evaluate

    out, _, _ = imported
    loaded = load_model(out / "model.ckpt")
    wav = tmp_path / "utt1.wav"
    sf.write(wav, ref["utt1.audio"].numpy(), 16000, subtype="FLOAT")
    cuts = cuts_from_audio([str(wav)])
    max_len = int(ref["utt1.encoder_length"]) + 8 - 9
    result = evaluate(loaded.model, loaded.tokenizer, cuts, DecodingOptions(max_len=max_len))
    assert result.hyps == [ref["utt1.greedy_text"]]


def test_torch_export_refuses_an_imported_model(imported, tmp_path, capsys):
    out, _, _ = imported
    assert main(["export", "--ckpt", str(out / "model.ckpt"), "--out", str(tmp_path / "e")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "imported from NeMo" in err


def test_export_gives_nemos_state_dict_and_files_back(imported, tmp_path):
    out, _, _ = imported
    nemo = tmp_path / "back.nemo"
    assert main(["export-nemo", str(out / "model.ckpt"), "--out", str(nemo)]) == 0
    original, exported = read_nemo(NEMO), read_nemo(nemo)
    assert exported.config_bytes == original.config_bytes and exported.files == original.files
    assert list(exported.state_dict) and set(exported.state_dict) == set(original.state_dict)
    for key, tensor in original.state_dict.items():
        theirs = exported.state_dict[key]
        assert theirs.dtype == tensor.dtype and torch.equal(theirs, tensor), key
    with tarfile.open(nemo) as tar:  # NeMo's layout: uncompressed, ./-prefixed members
        assert all(m.name.startswith("./") for m in tar.getmembers())


def test_export_refuses_an_existing_out_unless_overwrite(imported, tmp_path, capsys):
    """export-nemo, like import-nemo, never replaces a file unasked; --overwrite/--force do."""
    out, _, _ = imported
    nemo, ckpt = tmp_path / "m.nemo", str(out / "model.ckpt")
    nemo.write_bytes(b"a user's file")
    assert main(["export-nemo", ckpt, "--out", str(nemo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out '{nemo}' exists" in err and "--overwrite" in err
    assert nemo.read_bytes() == b"a user's file"
    for flag in ("--overwrite", "--force"):
        nemo.write_bytes(b"a user's file")
        assert main(["export-nemo", ckpt, "--out", str(nemo), flag]) == 0
        assert read_nemo(nemo).config_bytes == read_nemo(NEMO).config_bytes  # replaced
    assert main(["export-nemo", ckpt, "--out", str(tmp_path), "--overwrite"]) == 2  # a directory
    assert "is a directory" in capsys.readouterr().err


def test_import_export_import_is_bit_identical(imported, tmp_path):
    from speedasr.nemo.export_nemo import export_nemo

    out, _, first = imported
    ckpt, *_ = import_nemo(
        export_nemo(out / "model.ckpt", tmp_path / "a.nemo").path, tmp_path / "b"
    )
    second = torch.load(ckpt, weights_only=True)
    assert second["hyper_parameters"] == first["hyper_parameters"]
    assert second["tokenizer"] == first["tokenizer"]
    assert set(second["state_dict"]) == set(first["state_dict"])
    for key, tensor in first["state_dict"].items():
        assert torch.equal(second["state_dict"][key], tensor), key


def test_import_keeps_dw_striding_and_export_refuses_stacking(imported, tmp_path, capsys):
    """NeMo has no stacking subsampling: export-nemo of such a model is a one-line error before
    anything is written, for a checkpoint carrying NeMo's files (an imported model switched to
    stacking) as for a plain run's."""
    from dataclasses import asdict, replace

    from speedasr.models.aed import AEDModel
    from speedasr.testing import write_untrained_checkpoint

    out, model, raw = imported
    assert model.cfg.subsampling == "dw_striding"
    cfg = replace(model.cfg, subsampling="stacking")
    stacked = AEDModel(cfg)
    switched = tmp_path / "switched.ckpt"
    torch.save({
        **raw, "state_dict": {f"model.{k}": v for k, v in stacked.state_dict().items()},
        "hyper_parameters": {**raw["hyper_parameters"], "model": asdict(cfg)},
    }, switched)  # fmt: skip
    plain = write_untrained_checkpoint(tmp_path / "plain", subsampling="stacking")
    for ckpt in (switched, plain):
        nemo = tmp_path / "m.nemo"
        assert main(["export-nemo", str(ckpt), "--out", str(nemo)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"'{ckpt}' has model.subsampling='stacking'" in err and "dw_striding" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "switched.ckpt"]


def test_export_needs_an_imported_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "plain.ckpt"
    raw = torch.load(NEMO.parent / "outputs.pt", weights_only=True)  # not a checkpoint at all
    torch.save({"x": raw["durations"]}, ckpt)
    assert main(["export-nemo", str(ckpt), "--out", str(tmp_path / "x.nemo")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_python_api_transcribes_arrays_with_the_nemo_front_end(imported, ref):
    import speedasr

    out, _, _ = imported
    model = speedasr.load(out / "model.ckpt")
    audio = ref["utt2.audio"].numpy()
    max_len = int(ref["utt2.encoder_length"]) + 8 - 9
    assert model.transcribe(audio, sample_rate=16000, max_len=max_len) == [ref["utt2.greedy_text"]]


def test_timestamps_model_is_not_imported(tmp_path, capsys):
    """NeMo's optional auxiliary timestamps model is left out (NeMo restores without it)."""
    members = {**_members(), "./timestamps_asr_model_weights.ckpt": b"big"}
    nemo = _tar(tmp_path / "with_ts.nemo", members)
    assert main(["import-nemo", str(nemo), "--out", str(tmp_path / "o")]) == 0
    assert "timestamps_asr_model_weights.ckpt" in capsys.readouterr().out
    assert not (tmp_path / "o" / "nemo" / "timestamps_asr_model_weights.ckpt").exists()


def test_weights_in_torchs_legacy_format_are_read(tmp_path):
    """torch.save's pre-zip format cannot be memory-mapped; it is read without mmap."""
    members = _members()
    key = next(k for k in members if k.endswith("model_weights.ckpt"))
    buf = io.BytesIO()
    torch.save(torch.load(io.BytesIO(members[key]), weights_only=True), buf,
               _use_new_zipfile_serialization=False)  # fmt: skip
    members[key] = buf.getvalue()
    archive = read_nemo(_tar(tmp_path / "legacy.nemo", members))
    original = read_nemo(NEMO).state_dict
    assert all(torch.equal(archive.state_dict[k], v) for k, v in original.items())


def test_decoding_stops_at_the_decoder_position_table(imported, ref, tmp_path):
    """NeMo's decoding ends at max_sequence_length positions, the prompt included."""
    from dataclasses import replace

    from speedasr.decoding import decode_encoded

    _, model, _ = imported
    assert model.cfg.max_decoder_positions == 512  # the fixture's max_sequence_length
    _, enc, es = _encode(model, _features(ref, [2]), "packed")
    prompt = ref["utt2.prompt_ids"].tolist()
    eot = int(ref["utt2.target_ids"][-1])
    unlimited = decode_encoded(model, enc, es, [prompt], eot, DecodingOptions(max_len=20))[0]
    small = replace(model.cfg, max_decoder_positions=len(prompt) + 3)
    model.cfg, saved = small, model.cfg
    try:
        limited = decode_encoded(model, enc, es, [prompt], eot, DecodingOptions(max_len=20))[0]
    finally:
        model.cfg = saved
    assert len(unlimited) == 20 and limited == unlimited[:3]
