"""Architecture dispatch: config.json is read once on load, config and processor never import the model."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from processor_reference import write_checkpoint_files
from qwen2vl import config as config_module
from qwen2vl.config import VISION_CONFIGS, ProcessorSettings
from qwen2vl.errors import CheckpointError
from qwen2vl.model.registry import ARCHITECTURES
from qwen2vl.processor import Processor


def test_every_architecture_has_its_settings_and_its_model():
    assert set(ARCHITECTURES) == set(VISION_CONFIGS) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def test_config_and_a_processor_alone_import_nothing_of_the_model(tmp_path):
    checkpoint = write_checkpoint_files(tmp_path / "checkpoint")
    script = textwrap.dedent(f"""
        import sys
        import qwen2vl.config
        from qwen2vl.processor import Processor
        processor = Processor.from_pretrained({str(checkpoint)!r})
        assert processor.context_len == 32768 and processor.tokens_per_second is None
        print(sorted(name for name in sys.modules if name.startswith("qwen2vl.model")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_loading_reads_config_json_once(tiny_ckpt, monkeypatch):
    from qwen2vl import Qwen2VL

    reads = []
    read = config_module.read_config_json
    monkeypatch.setattr(config_module, "read_config_json", lambda model_dir: reads.append(model_dir) or read(model_dir))
    llm = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=16)
    assert reads == [tiny_ckpt]
    config = llm.engine.config
    assert llm.processor.context_len == config.text.max_position_embeddings
    assert (llm.processor.image_token_id, llm.processor.video_token_id) == (config.image_token_id, config.video_token_id)


def test_the_models_vision_token_ids_must_be_the_tokenizers(tmp_path):
    checkpoint = write_checkpoint_files(tmp_path / "checkpoint")
    settings = ProcessorSettings(vision_token_ids=(151655, 151656, 151652, 7))
    with pytest.raises(CheckpointError, match=r"config.json's vision_end_token_id is 7, but the tokenizer's "
                                              r"<\|vision_end\|> is 151653"):
        Processor.from_pretrained(checkpoint, settings=settings)
