"""Media at the model's speed: uint8 until the vision tower, one patchify layer, videos decoded only
where sampled, a batch's media prepared in a thread pool."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import torch
from PIL import Image

from processor_reference import write_checkpoint_files

from qwen2vl.errors import MediaError
from qwen2vl.layers.patchify import Patchifier, VisionPixels, patch_rows
from qwen2vl.processor import Processor
from qwen2vl.processor import image as image_module
from qwen2vl.processor import video as video_module
from qwen2vl.processor.fetch import MediaSource
from qwen2vl.processor.pool import media_map


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_checkpoint_files(tmp_path_factory.mktemp("decode-ckpt")))


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_video(path, frames: int, gop: int, fps: int = 10):
    """H.264 with B-frames and a keyframe every `gop` frames: seeking has keyframes to land on."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(gop), "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for index in range(frames):
            pixels = np.asarray(picture(96, 64, index))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def every_frame(path) -> torch.Tensor:
    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                            for f in container.decode(container.streams.video[0])])


def test_images_stay_uint8_and_the_layer_gives_the_reference_rows(processor):
    prompt = processor.prepare([{"role": "user", "content": [{"type": "image", "image": picture(100, 60)}]}])
    item = prompt.vision_items[0]
    assert item.pixels.dtype == torch.uint8 and item.pixels.shape == (1, 3, 56, 112) and item.grid_thw == (1, 4, 8)
    # the reference's order and values: (x / 255 - mean) / std, the still frame twice, merge windows contiguous
    frames = item.pixels.float().div(255).repeat(2, 1, 1, 1)
    mean, std = torch.tensor(Patchifier().image_mean).view(3, 1, 1), torch.tensor(Patchifier().image_std).view(3, 1, 1)
    normalized = (frames - mean) / std
    cubes = normalized.view(1, 2, 3, 2, 2, 14, 4, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(32, 1176)
    torch.testing.assert_close(item.pixel_values, cubes, atol=2e-6, rtol=0)
    # in a half-precision tower's dtype: the float32 rows rounded once
    half = patch_rows(VisionPixels([item.pixels], item.patchifier), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, item.pixel_values.bfloat16())
    assert torch.equal(patch_rows(item.pixel_values, torch.float32), item.pixel_values)


def test_packed_items_are_each_items_rows_in_order(processor):
    items = [processor.prepare([{"role": "user", "content": [{"type": "image", "image": picture(w, h, w)}]}]).vision_items[0]
             for w, h in ((100, 60), (60, 130))]
    packed = Patchifier()([item.pixels for item in items])
    assert torch.equal(packed, torch.cat([item.pixel_values for item in items]))
    with pytest.raises(ValueError, match=r"3 frames: a video needs a multiple of 2"):
        Patchifier().grid(torch.zeros(3, 3, 28, 28, dtype=torch.uint8))


def test_digest_follows_pixels_and_normalization(processor):
    item = processor.prepare([{"role": "user", "content": [{"type": "image", "image": picture(100, 60)}]}]).vision_items[0]
    same = type(item)(item.kind, item.pixels.clone(), item.grid_thw, item.original_size, item.resized_size)
    other_norm = type(item)(item.kind, item.pixels, item.grid_thw, item.original_size, item.resized_size,
                            patchifier=Patchifier(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)))
    changed = item.pixels.clone()
    changed[0, 0, 0, 0] ^= 1
    other_pixels = type(item)(item.kind, changed, item.grid_thw, item.original_size, item.resized_size)
    assert item.digest == same.digest
    assert len({item.digest, other_norm.digest, other_pixels.digest}) == 3


@pytest.mark.parametrize("count", [4, 12, 40])
def test_sampled_decoding_gives_the_frames_of_a_full_decode(tmp_path, count):
    path = write_video(tmp_path / "gop.mp4", frames=120, gop=10)
    indices = video_module.sample_indices(120, count)
    frames, total = video_module.decode_frames(MediaSource(path=path), indices, (56, 84))
    assert total == 120 and frames.dtype == torch.uint8 and frames.shape == (count, 3, 56, 84)
    expected = video_module.resize_frames(every_frame(path)[indices], 56, 84)
    assert torch.equal(frames, expected)


class CountingContainer:
    """A PyAV container that records the timestamp of every frame it decodes."""

    def __init__(self, container, decoded: list):
        self.container, self.decoded = container, decoded

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded.append(frame.pts)
            yield frame


def test_sampled_decoding_seeks_past_what_it_does_not_need(tmp_path, monkeypatch):
    path = write_video(tmp_path / "gop.mp4", frames=120, gop=10)
    decoded = []
    open_container = video_module._open_container
    monkeypatch.setattr(video_module, "_open_container", lambda source: CountingContainer(open_container(source), decoded))
    frames, _ = video_module.decode_frames(MediaSource(path=path), [0, 60, 119], (64, 96))
    assert torch.equal(frames, every_frame(path)[[0, 60, 119]])
    assert len(decoded) < 40  # three short runs from the keyframes before them, not 120 frames


def test_a_video_without_timestamps_still_decodes_in_order(tmp_path, monkeypatch):
    path = write_video(tmp_path / "gop.mp4", frames=30, gop=10)
    monkeypatch.setattr(video_module, "_packet_index", lambda container, stream: None)
    frames, total = video_module.decode_frames(MediaSource(path=path), [0, 29], (64, 96))
    assert total == 30 and torch.equal(frames, every_frame(path)[[0, 29]])


def test_media_map_keeps_order_and_raises_the_first_failure():
    threads, torch_threads = set(), set()
    callers = torch.get_num_threads()

    def work(value):
        threads.add(threading.current_thread().name)
        torch_threads.add(torch.get_num_threads())
        if value in (3, 5):
            raise MediaError(f"bad {value}")
        return value * 2

    assert media_map(work, range(3)) == [0, 2, 4]
    with pytest.raises(MediaError, match="bad 3"):
        media_map(work, range(8))
    assert any(name.startswith("qwen2vl-media") for name in threads)
    assert torch_threads == {1} and torch.get_num_threads() == callers  # the pool is the parallelism
    # nested: a worker's own map runs in that worker, no waiting on the pool it occupies
    assert media_map(lambda n: media_map(lambda m: m + n, range(4)), range(4)) == [[m + n for m in range(4)] for n in range(4)]


def test_a_batch_prepared_in_the_pool_equals_one_by_one(processor):
    conversations = [[{"role": "user", "content": [{"type": "image", "image": picture(90 + i, 70, i)},
                                                   {"type": "image", "image": picture(50, 40 + i, i + 9)},
                                                   {"type": "text", "text": f"picture {i}"}]}] for i in range(5)]
    batch = processor(conversations)
    for i, conversation in enumerate(conversations):
        single = processor(conversation)
        assert torch.equal(batch["input_ids"][i, :single["input_ids"].shape[1]], single["input_ids"][0])
    assert torch.equal(batch["pixel_values"], torch.cat([processor(c)["pixel_values"] for c in conversations]))


def test_banded_resize_is_pils_resize(monkeypatch):
    """A large image's resize runs in bands on the pool: exactly PIL's pixels, in either pass
    order (Pillow runs the vertical pass first where the height shrinks much more than the width)."""
    monkeypatch.setattr(image_module, "BANDED_RESIZE_MIN_PIXELS", 1)
    monkeypatch.setattr(image_module, "media_workers", lambda: 3)  # bands of unequal sizes
    picture = Image.fromarray(np.arange(2 * 50 * 3, dtype=np.uint8).reshape(2, 50, 3))  # fewer rows than bands
    assert np.array_equal(image_module.resize_image(picture, 2, 30).permute(1, 2, 0).numpy(),
                          np.asarray(picture.resize((30, 2), Image.Resampling.BICUBIC)))
    assert image_module._pillow_vertical_first_rule() is not None
    rng = np.random.default_rng(0)
    shapes = [(300, 200, 120, 80), (200, 300, 80, 120), (64, 300, 60, 40), (300, 64, 40, 60), (90, 70, 200, 150),
              (97, 61, 97, 30), (61, 97, 30, 97), (333, 3000 // 10, 56, 50), (100, 400, 90, 20)]
    shapes += [tuple(int(v) for v in rng.integers(8, 260, 4)) for _ in range(40)]
    for src_width, src_height, width, height in shapes:
        picture = Image.fromarray(rng.integers(0, 256, (src_height, src_width, 3), dtype=np.uint8))
        expected = np.asarray(picture.resize((width, height), Image.Resampling.BICUBIC))
        got = image_module.resize_image(picture, height, width)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (src_width, src_height, width, height)


def test_an_rgb_image_is_used_as_decoded():
    picture = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    assert image_module.to_rgb(picture) is picture
    assert image_module.to_rgb(picture.convert("L")).mode == "RGB"


def test_media_threads_setting(monkeypatch):
    from qwen2vl.processor import pool

    monkeypatch.setenv("QWEN2VL_MEDIA_THREADS", "1")
    assert pool.media_workers() == 1
    caller = threading.current_thread().name
    assert media_map(lambda n: (n, threading.current_thread().name), range(3)) == [(n, caller) for n in range(3)]
    monkeypatch.setenv("QWEN2VL_MEDIA_THREADS", "two")
    with pytest.raises(ValueError, match="QWEN2VL_MEDIA_THREADS must be a positive integer, got 'two'"):
        pool.media_workers()


def test_concurrent_media_maps_share_the_pool(monkeypatch):
    """A second call's items do not queue behind all of a first call's: a freed worker takes an item
    of the call with the fewest items running."""
    from qwen2vl.processor import pool

    monkeypatch.setenv("QWEN2VL_MEDIA_THREADS", "2")
    executor = ThreadPoolExecutor(2, initializer=pool._mark_worker)
    submitted = threading.Semaphore(0)
    submit = executor.submit
    monkeypatch.setattr(executor, "submit", lambda *args: (submitted.release(), submit(*args))[1])
    monkeypatch.setattr(pool, "_pool", executor)
    started, release = queue.Queue(), {name: threading.Event() for name in ("a0", "a1", "a2", "a3", "b0", "b1")}
    results = {}

    def work(name):
        started.put(name)
        assert release[name].wait(timeout=60)
        return name

    def run(key, names):
        results[key] = media_map(work, names)

    calls = [threading.Thread(target=run, args=("a", ["a0", "a1", "a2", "a3"]))]
    try:
        calls[0].start()
        assert {started.get(timeout=60), started.get(timeout=60)} == {"a0", "a1"}  # the first call holds both workers
        calls.append(threading.Thread(target=run, args=("b", ["b0", "b1"])))
        calls[1].start()
        for _ in range(6):  # both calls have handed the pool all their items
            assert submitted.acquire(timeout=60)
        release["a0"].set()
        assert started.get(timeout=60) == "b0"  # not a2: the first call still has a1 running, the second none
    finally:
        for event in release.values():
            event.set()
        for call in calls:
            call.join(timeout=60)
        executor.shutdown()
    assert results == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1"]}
