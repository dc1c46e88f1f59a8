"""Fixtures shared by test files: a tiny model trained on a synthetic dataset (CPU, offline, ~5 s) and
short synthetic video files."""

from pathlib import Path

import av
import numpy as np
import pytest

from echovlm.dataset import open_dataset
from scripts import base_train, prepare_dataset, tok_train


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(runs/speedrun/model, its prepared dataset): 300 synthetic studies, a depth-1 model after 2 steps, laid out
    as speedrun.sh lays out a run (RUN/model), so a report card can be built beside it."""
    tmp = tmp_path_factory.mktemp("trained_run")
    data = tmp / "data"
    assert prepare_dataset.main(["--source", "synthetic", "--n-studies", "300", "--seed", "0", "--val-size", "20",
                                 "--test-size", "20", "--out", str(data)]) == 0
    assert tok_train.main(["--dataset", str(data), "--vocab-size", "300"]) == 0
    assert base_train.main(["--dataset", str(data), "--run-dir", str(tmp / "runs" / "speedrun"), "--run-name", "model",
                            "--depth", "1", "--num-steps", "2", "--total-batch-size", "4", "--device-batch-size", "4",
                            "--eval-every", "2", "--eval-studies", "4", "--device", "cpu", "--seed", "0"]) == 0
    return tmp / "runs" / "speedrun" / "model", open_dataset(data)


def write_video(path: Path, n_frames: int, seed: int) -> Path:
    """A random-pixel AVI (MJPEG) or MP4 (H.264) of n_frames 64x80 frames."""
    frames = np.random.default_rng(seed).integers(0, 256, (n_frames, 64, 80, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg" if path.suffix == ".avi" else "libx264", rate=30)
        stream.width, stream.height = 80, 64
        stream.pix_fmt = "yuvj420p" if path.suffix == ".avi" else "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def make_video():
    return write_video
