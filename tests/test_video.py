"""Video reading, EchoPrime preprocessing, the sector mask, and the two EchoPrime models at random weights.

Synthetic echoes are drawn here: a fan of fresh speckle every frame with a dark still cavity inside, a static
text block beside it and a scrolling ECG trace below it, written as DICOM (several photometric
interpretations, JPEG too) and as AVI/MP4 with PyAV.
"""

from pathlib import Path

import av
import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom import examples
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEGBaseline8Bit, ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from echovlm import video

REAL_CLIPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "echo_clips"
MEAN = torch.tensor(video.MEAN).view(3, 1, 1, 1)
STD = torch.tensor(video.STD).view(3, 1, 1, 1)
BLANK = (-MEAN / STD).view(3)  # a black pixel after normalisation

# synthetic geometry, 256 x 320: the fan's apex at (30, 160), radius 150, +-40 degrees -> down to row 180
H, W = 256, 320
APEX, RADIUS, HALF_ANGLE = (30, 160), 150, 40
TEXT_BOX = (slice(30, 50), slice(60, 100))
ECG_BASELINE, ECG_SPIKE = 222, 26  # the trace spans rows 196..223, well clear of the fan
# where those land in the 224x224 clip: square crop keeps columns 32..288, the 10% cut keeps rows and
# columns 25..231 of that square, resized 206 -> 224
ECG_ROWS_OUT = slice(188, 212)
TEXT_OUT = (slice(6, 25), slice(6, 40))


def geometry():
    yy, xx = np.mgrid[:H, :W]
    dy, dx = yy - APEX[0], xx - APEX[1]
    fan = (np.hypot(dy, dx) < RADIUS) & (np.abs(np.degrees(np.arctan2(dx, dy))) < HALF_ANGLE)
    cavity = ((yy - 115) / 22.0) ** 2 + ((xx - 160) / 30.0) ** 2 < 1
    return fan, cavity


def echo_frames(n=30, channels=(1.0, 1.0, 1.0), ecg=True, seed=0) -> np.ndarray:
    """uint8 RGB (n, H, W, 3) echo-like video; `channels` tints the fan (e.g. (1, 0, 0) = pure red)."""
    rng = np.random.default_rng(seed)
    fan, cavity = geometry()
    live = fan & ~cavity
    frames = np.zeros((n, H, W, 3), np.uint8)
    xs = np.arange(20, 300)
    for t in range(n):
        speckle = rng.integers(30, 230, size=(H, W)).astype(np.float32)
        for c, gain in enumerate(channels):
            frames[t, ..., c][live] = (speckle[live] * gain).astype(np.uint8)
        frames[t][TEXT_BOX] = 200
        if ecg:
            # a QRS-like spike every 60 px, scrolling 7 px per frame: what a live ECG strip does
            phase = (xs + 7 * t) % 60
            ys = ECG_BASELINE - np.where(phase < 6, ECG_SPIKE * (1 - np.abs(phase - 3) / 3), 0)
            pts = np.stack([xs, ys], axis=1).astype(np.int32)
            cv2.polylines(frames[t], [pts], isClosed=False, color=(0, 255, 0), thickness=2)
    return frames


def write_dicom(path, frames, photometric="RGB", jpeg=False, n_frames=None):
    """Write frames (n, H, W, 3) uint8 RGB as an ultrasound multi-frame DICOM in the asked encoding."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.NumberOfFrames = n_frames if n_frames is not None else len(frames)
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if photometric.startswith("MONOCHROME"):
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.PixelData = np.ascontiguousarray(frames[..., 0]).tobytes()
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        if jpeg:  # what scanners write: baseline JPEG frames, YCbCr with 4:2:2 chroma
            params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]
            encoded = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), params)[1].tobytes() for f in frames]
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.PixelData = encapsulate(encoded)
            ds["PixelData"].VR = "OB"
        else:
            ds.PhotometricInterpretation = photometric
            data = convert_color_space(frames, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else frames
            ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_video(path, frames, codec):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mjpeg" else {"crf": "10"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def unnormalise(clip):
    return clip * STD + MEAN


def write_any(tmp_path, kind, frames):
    if kind in ("avi", "mp4"):
        return write_video(tmp_path / f"clip.{kind}", frames, "mjpeg" if kind == "avi" else "libx264")
    return write_dicom(tmp_path / "clip.dcm", frames, photometric=kind.removesuffix("-jpeg"), jpeg=kind.endswith("-jpeg"))


# ------------------------------------------------------------------------------------------------ reading
def test_pydicom_ultrasound_example_preprocesses():
    path = examples.get_path("ybr_color")  # a real 30-frame YBR_FULL_422 JPEG echo
    clip = video.load_clip(path)
    assert clip.shape == (3, 16, 224, 224) and clip.dtype == torch.float32
    assert torch.isfinite(clip).all()
    pixels = unnormalise(clip[:, :15])
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    # the echo is grey: decoded YBR left unconverted would put ~128 into channels 1 and 2
    assert (pixels[0] - pixels[1]).abs().mean() < 3 and (pixels[0] - pixels[2]).abs().mean() < 3
    assert pixels.mean() > 5  # there is an image in there
    # 30 frames: output frame 14 is input frame 28, frame 15 would be frame 30, which is padding
    assert clip[:, 14].abs().sum() > 0 and (clip[:, 15] == 0).all()
    # outside the fan (top-left corner of the crop), everything is blanked to exact black
    assert torch.equal(clip[:, :15, :15, :15], BLANK.view(3, 1, 1, 1).expand(3, 15, 15, 15))
    # the dim far field at the fan's lower corners (grey levels ~1-10) is still sector: a mask that only keeps
    # the bright speckle covers ~28% of this frame, the whole fan ~38%
    frames = video.read_frames(path)
    assert video.sector_mask(frames).mean() > 0.35


def test_palette_colour_dicom():
    clip = video.load_clip(pydicom.data.get_testdata_file("OBXXXX1A_2frame.dcm"))  # real 2-frame ultrasound
    assert clip.shape == (3, 16, 224, 224) and torch.isfinite(clip).all()
    assert unnormalise(clip[:, :1]).std() > 5 and (clip[:, 1:] == 0).all()  # frame 2 does not exist: padding


@pytest.mark.parametrize("kind", ["RGB", "YBR_FULL", "RGB-jpeg", "avi", "mp4"])
def test_channel_order_is_rgb(tmp_path, kind):
    path = write_any(tmp_path, kind, echo_frames(n=12, channels=(1.0, 0.0, 0.0), ecg=False))
    clip = video.load_clip(path)
    assert clip.shape == (3, 16, 224, 224) and clip.dtype == torch.float32 and torch.isfinite(clip).all()
    red, green, blue = unnormalise(clip[:, :6]).mean(dim=(1, 2, 3)).tolist()
    assert red > 40 and red > 4 * green and red > 4 * blue, (red, green, blue)


def test_grayscale_dicom_becomes_three_equal_channels(tmp_path):
    frames = echo_frames(n=12, ecg=False)
    clip = video.load_clip(write_dicom(tmp_path / "mono.dcm", frames, "MONOCHROME2"))
    pixels = unnormalise(clip[:, :6])
    assert torch.allclose(pixels[0], pixels[1], atol=1e-3) and torch.allclose(pixels[0], pixels[2], atol=1e-3)
    # the same frames stored as RGB give the same clip: the grey path and the colour path agree
    rgb = video.load_clip(write_dicom(tmp_path / "rgb.dcm", frames, "RGB"))
    assert torch.allclose(clip, rgb, atol=1e-5)


def test_jpeg_dicom_matches_the_lossless_one(tmp_path):
    frames = echo_frames(n=12)
    lossless = video.load_clip(write_dicom(tmp_path / "raw.dcm", frames, "RGB"))
    jpeg = video.load_clip(write_dicom(tmp_path / "jpeg.dcm", frames, jpeg=True))
    assert (jpeg - lossless).abs().mean() < 0.1  # about 5 grey levels of JPEG error on heavy speckle


@pytest.mark.parametrize("kind,n_frames,tolerance", [("RGB", 10, 1e-5), ("RGB", 40, 1e-5), ("avi", 40, 3.0)])
def test_frame_stride_and_zero_padding(tmp_path, kind, n_frames, tolerance):
    levels = 5 + 6 * np.arange(n_frames)  # frame j is a flat grey of level 5 + 6 j
    frames = np.broadcast_to(levels[:, None, None, None], (n_frames, 120, 160, 3)).astype(np.uint8)
    clip = video.load_clip(write_any(tmp_path, kind, np.ascontiguousarray(frames)), mask=False)
    kept = min(16, (n_frames + 1) // 2)
    got = unnormalise(clip)[:, :kept].mean(dim=(2, 3))  # (3, kept)
    expected = torch.tensor(levels[0:2 * kept:2], dtype=torch.float32).expand(3, kept)
    assert (got - expected).abs().max() < tolerance, (got[0], expected[0])
    # shorter than 32 frames: the rest is zero *after* normalisation, as in EchoPrime
    assert (clip[:, kept:] == 0).all()


@pytest.mark.parametrize("shape,box", [((200, 300), (20, 180, 70, 230)),   # landscape: square, then 10% off
                                       ((300, 200), (70, 230, 20, 180)),   # portrait
                                       ((241, 320), (24, 217, 64, 256))])  # odd: 241 x 240 after the square crop
def test_crop_box(shape, box):
    frame = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    top, bottom, left, right = box
    expected = cv2.resize(frame[top:bottom, left:right], (224, 224), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(video.crop_and_scale(frame), expected)


# ------------------------------------------------------------------------------------------------ sector mask
def test_sector_mask_keeps_the_fan_and_drops_text_and_ecg():
    fan, cavity = geometry()
    frames = echo_frames()
    mask = video.sector_mask(frames)
    inner_fan = cv2.erode(fan.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert mask[inner_fan].all()
    assert mask[cavity].all()  # a still, black cavity inside the fan is part of the sector
    assert not mask[TEXT_BOX].any()
    assert not mask[ECG_BASELINE - ECG_SPIKE - 3:].any()  # the scrolling ECG strip
    near_fan = cv2.dilate(fan.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert not mask[~near_fan].any()


def test_dicom_clips_are_masked_and_video_files_are_not(tmp_path):
    frames = echo_frames(n=20)
    dicom = video.load_clip(write_dicom(tmp_path / "echo.dcm", frames))
    unmasked = video.load_clip(tmp_path / "echo.dcm", mask=False)
    blank_rows = BLANK.view(3, 1, 1, 1).expand(3, 10, ECG_ROWS_OUT.stop - ECG_ROWS_OUT.start, 224)
    blank_text = BLANK.view(3, 1, 1, 1).expand(3, 10, 19, 34)
    assert torch.equal(dicom[:, :10, ECG_ROWS_OUT], blank_rows)
    assert torch.equal(dicom[:, :10, TEXT_OUT[0], TEXT_OUT[1]], blank_text)
    # the ECG and the text are in view without the mask, so the checks above can fail
    assert not torch.equal(unmasked[:, :10, ECG_ROWS_OUT], blank_rows)
    assert not torch.equal(unmasked[:, :10, TEXT_OUT[0], TEXT_OUT[1]], blank_text)
    assert torch.equal(dicom[:, :, 60:160, 80:144], unmasked[:, :, 60:160, 80:144])  # the fan is untouched
    mp4 = video.load_clip(write_video(tmp_path / "echo.mp4", frames, "libx264"))
    assert not torch.equal(mp4[:, :10, TEXT_OUT[0], TEXT_OUT[1]], blank_text)


def test_static_dicom_has_no_sector(tmp_path):
    still = np.repeat(echo_frames(n=1, ecg=False), 8, axis=0)
    with pytest.raises(video.VideoError, match="no moving ultrasound sector"):
        video.load_clip(write_dicom(tmp_path / "still.dcm", still))


# ------------------------------------------------------------------------------------------------ skipping
def test_non_videos_are_skipped_with_a_reason(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", echo_frames(n=6, ecg=False))
    single = write_dicom(tmp_path / "single.dcm", echo_frames(n=1, ecg=False), n_frames=1)
    report = tmp_path / "report.dcm"  # a structured report: a DICOM object without pixels
    sr = pydicom.dcmread(good)
    del sr.PixelData
    sr.Modality = "SR"
    sr.save_as(report)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_mp4 = tmp_path / "notes.mp4"
    not_mp4.write_text("this is not a video")
    us_still = Path(pydicom.data.get_testdata_file("US1_UNCR.dcm"))  # a real single-frame ultrasound image

    paths = [single, good, report, garbage, truncated, not_mp4, us_still]
    clips, kept, skipped = video.load_study(paths)
    assert clips.shape == (1, 3, 16, 224, 224) and kept == [good]
    reasons = dict(skipped)
    assert list(reasons) == [single, report, garbage, truncated, not_mp4, us_still]
    assert "not a video" in reasons[single] and "not a video" in reasons[us_still]
    assert "pixel data" in reasons[report]
    assert all("\n" not in r and r for r in reasons.values())
    with pytest.raises(video.NotAVideo):
        video.load_clip(us_still)
    with pytest.raises(video.VideoError, match="no usable echo video.*garbage.dcm"):
        video.load_study([single, garbage])


def test_load_study_message_lists_a_few_files():
    # a folder of 1000 non-videos must not become a message of hundreds of kilobytes on the page
    paths = [Path(f"/nowhere/clip{i:04d}.dcm") for i in range(1000)]
    with pytest.raises(video.VideoError) as e:
        video.load_study(paths)
    message = str(e.value)
    assert "clip0000.dcm: no such file" in message and "and 995 more" in message and len(message) < 1000


# ------------------------------------------------------------------------------------------------ size limits
def test_dicom_frames_too_large_are_refused_from_the_header(tmp_path):
    # the header says 5000 x 5000 pixels a frame; a tiny JPEG stands in for each frame: the refusal comes from
    # the header, before any pixel is decoded
    path = write_dicom(tmp_path / "huge.dcm", echo_frames(n=2, ecg=False), jpeg=True)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 5000, 5000
    ds.save_as(path)
    with pytest.raises(video.VideoError, match=r"frames of 5000x5000 pixels are larger than .* 3840x2160"):
        video.load_clip(path)


def test_dicom_too_many_frames_are_refused_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "long.dcm", echo_frames(n=2, ecg=False), jpeg=True)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 20000  # 20000 frames of 256 x 320: 4.6 GB as RGB
    ds.save_as(path)
    with pytest.raises(video.VideoError, match=r"20000 frames of 256x320 pixels would decode to 4.6 GB, more than "
                                               r"the 1 GB .*at most 4369 frames"):
        video.load_clip(path)


def test_deflated_dicom_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    # deflate shrinks a still, dark echo a thousandfold: the inflated size is counted, chunk by chunk, before
    # pydicom inflates the whole file into memory. A 4 MB budget here stands in for the real 1 GB.
    frames = np.zeros((24, H, W, 3), np.uint8)  # 5.9 MB of pixels
    frames[:, 100:110, 150:160] = np.arange(24)[:, None, None, None] * 10
    path = write_dicom(tmp_path / "bomb.dcm", frames)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 100_000
    assert video.read_frames(path).shape == (24, H, W, 3)  # within the real budget: read as before
    monkeypatch.setattr(video, "MAX_DECODED_BYTES", 4 << 20)
    with pytest.raises(video.VideoError, match=r"deflated DICOM inflates to more than 4 MB"):
        video.read_frames(path)


def test_video_frames_too_large_are_refused_before_decoding(tmp_path):
    # like the 24 KB MP4 of issue 17 that took 5.2 GB to decode: two flat 4096x4096 frames are a 5 KB file
    path = tmp_path / "huge.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 4096
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((4096, 4096, 3), np.uint8), format="rgb24")
        for _ in range(2):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(video.VideoError, match=r"frames of 4096x4096 pixels are larger than .* 3840x2160"):
        video.load_clip(path)


def test_long_masked_video_is_refused_while_decoding(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.avi", echo_frames(n=40, ecg=False), "mjpeg")
    # unmasked, only the 32 frames the clip keeps are decoded (7.5 MB), within a 9 MB budget; masked, all 40 (9.4 MB)
    monkeypatch.setattr(video, "MAX_DECODED_BYTES", 9 << 20)
    assert video.load_clip(path, mask=False).shape == (3, 16, 224, 224)
    with pytest.raises(video.VideoError, match=r"frames of 256x320 pixels would decode to .* more than the 9 MB"):
        video.load_clip(path, mask=True)  # the mask needs every frame


def test_find_videos(tmp_path):
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    a = write_dicom(study / "series1" / "IM_0001", echo_frames(n=2, ecg=False))  # scanners' extensionless names
    b = study / "b.MP4"
    b.write_bytes(b"")
    (study / "notes.txt").write_text("x")
    (study / ".hidden.dcm").write_bytes(b"")
    (study / "README").write_text("no preamble here")
    extra = tmp_path / "extra.avi"
    extra.write_bytes(b"")
    assert video.find_videos([study, extra]) == [b, a, extra]
    assert video.find_videos(study / "series1") == [a]
    with pytest.raises(FileNotFoundError, match="nope"):
        video.find_videos([tmp_path / "nope"])


@pytest.mark.skipif(not REAL_CLIPS.is_dir(), reason="shared real echo clips not present (fresh clone)")
def test_real_echo_clips():
    paths = video.find_videos(REAL_CLIPS)
    assert len(paths) >= 1
    clips, kept, skipped = video.load_study(paths)
    assert clips.shape == (len(paths), 3, 16, 224, 224) and not skipped
    assert torch.isfinite(clips).all()
    pixels = unnormalise(clips)
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    assert pixels.std() > 20  # real anatomy, not a blank or constant frame
    # the exported clips are already cut to the sector; our mask finds that fan (a third of the frame)
    fraction = video.sector_mask(video.read_frames(paths[0])).mean()
    assert 0.15 < fraction < 0.6


# ------------------------------------------------------------------------------------------------ models
class Spy(torch.nn.Module):
    """Stands in for a model: remembers its inputs, answers with a per-sample number in column 0."""

    def __init__(self, n_out):
        super().__init__()
        self.n_out, self.seen = n_out, []

    def forward(self, x):
        self.seen.append(x.clone())
        out = torch.zeros(len(x), self.n_out)
        out[:, 0] = x.flatten(1)[:, 0]
        out[:, 3] = 1 - out[:, 0]
        return out


def test_batching_keeps_order_and_views_see_the_first_frame():
    clips = torch.zeros(5, 3, 16, 224, 224)
    clips[:, 0, 0, 0, 0] = torch.tensor([0.0, 1, 2, 3, 4])
    clips[:, :, 1:] = 7  # later frames must not reach the view classifier
    spy = Spy(512)
    emb = video.encode_clips(spy, clips, batch_size=2)
    assert [len(x) for x in spy.seen] == [2, 2, 1]
    assert emb[:, 0].tolist() == [0, 1, 2, 3, 4]
    spy = Spy(11)
    views = video.classify_views(spy, clips, batch_size=4)
    assert torch.equal(torch.cat(spy.seen), clips[:, :, 0])  # the normalised first frame, as EchoPrime feeds it
    assert views == ["A5C", "A2C", "A2C", "A2C", "A2C"]  # argmax: column 3 (A5C) wins only where the value is 0


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return video.build_encoder()


def test_encoder_and_view_classifier_shapes(encoder):
    clips = torch.randn(1, 3, 16, 224, 224)
    emb = video.encode_clips(encoder, clips)
    assert emb.shape == (1, 512) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    views = video.classify_views(video.build_view_classifier(), clips)
    assert len(views) == 1 and views[0] in video.VIEW_CLASSES and len(video.VIEW_CLASSES) == 11
    with pytest.raises(ValueError, match="clips must be"):
        video.encode_clips(encoder, torch.randn(1, 3, 8, 112, 112))


def test_weights_files(encoder, tmp_path):
    good = tmp_path / "echo_prime_encoder.pt"
    torch.save(encoder.state_dict(), good)
    loaded = video.build_encoder(good)
    assert torch.equal(loaded.head[-1].weight, encoder.head[-1].weight)

    state = encoder.state_dict()
    state["head.9.weight"] = state.pop("head.1.weight")  # e.g. a checkpoint of some other head
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(ValueError, match=r"wrong.pt does not fit the EchoPrime video encoder.*head\.1\.weight.*model_data.zip"):
        video.build_encoder(wrong)
    with pytest.raises(FileNotFoundError, match=r"view_classifier.pt.*EchoPrime v1.0.0 release"):
        video.build_view_classifier(tmp_path / "view_classifier.pt")
    not_torch = tmp_path / "page.pt"
    not_torch.write_text("<html>404</html>")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        video.build_encoder(not_torch)
