"""import-gguf: the embedded SmolLM2 GGUF becomes an fp32 HF checkpoint that generates like the GGUF."""

from __future__ import annotations

import json

import pytest
from deltaserve.cli.main import main
from deltaserve.errors import InvalidArgumentError, NotFoundError
from deltaserve.models.gguf_import import embedded_gguf_path, import_gguf


def test_embedded_gguf_is_found():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.read_bytes()[:4] == b"GGUF"


def test_not_a_gguf_and_non_empty_output(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(InvalidArgumentError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out")
    with pytest.raises(NotFoundError):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not empty"):
        import_gguf(embedded_gguf_path(), busy)


@pytest.mark.slow
def test_round_trip_real_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    assert main(["import-gguf", "--out", str(out), "--verify-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["model_type"] == "llama" and report["dtype"] == "float32"
    assert 130e6 < report["num_parameters"] < 140e6
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype.is_floating_point
    assert (out / "model.safetensors").stat().st_size > 500e6  # fp32, not a quantised copy
