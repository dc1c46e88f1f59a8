"""Echo videos (DICOM, AVI, MP4) -> EchoPrime-ready clips -> 512-d video embeddings and view labels.

A clip is what the EchoPrime video encoder was trained on, a (3, 16, 224, 224) float32 tensor:

  1. decode the frames as uint8 RGB (F, H, W, 3): all of them where the mask needs them, else the first 32;
     grayscale (MONOCHROME1/2) is repeated to 3 channels, palette colour looked up, YBR converted. The size the
     file declares is checked first (MAX_FRAME_PIXELS, MAX_DECODED_BYTES): a few kilobytes can decode to gigabytes
  2. DICOM only: blank everything outside the ultrasound sector (see `sector_mask`)
  3. per frame: centre-crop to a square, cut 10% of that square from each side, resize to 224x224 with
     cv2.INTER_CUBIC on uint8 pixels (EchoPrime's `crop_and_scale`, in that order)
  4. normalise each channel with EchoPrime's mean and std (pixel values 0-255)
  5. keep frames 0, 2, ..., 30; a video shorter than 32 frames is padded with zeros *after* normalisation,
     as EchoPrime does, so a padding frame is the dataset mean colour, not black

Decisions worth knowing when you compare with EchoPrime's own code:

* Channel order is RGB for every input type. EchoPrime's MP4 path gives RGB; its DICOM path runs
  cv2.COLOR_YUV2BGR on the decoded pixels and so gives BGR (with pydicom >= 3, whose pixel_array already
  returns RGB, that conversion even lands on RGB values). Echo is almost all grey, where the order cannot matter, and the
  normalisation constants of channels 0 and 2 agree to 0.02 grey levels, so one order everywhere is the
  safe choice; only colour Doppler pixels would differ.
* The sector mask is our own: pixels whose grey level varies over time are the live image; static text,
  rulers and logos do not vary, and an ECG trace, which does change, is a thin line (or a band far smaller
  than the fan) that a morphological opening and keeping the largest region remove. The convex hull of
  that region is the sector, which also brings back dark, nearly still cavities inside the fan. EchoPrime
  instead combines "non-black after erosion" with "first frame differs from the last"; both aim at the
  same sector. Like EchoPrime, AVI/MP4 files are not masked by default: such exports are usually already
  cropped to the sector (pass mask=True to mask them too).
* The view classifier sees the first frame of the *normalised* clip, exactly as EchoPrime feeds it.
* On CUDA the models run under bf16 autocast (about 3 significant digits), so embeddings differ slightly
  from EchoPrime's fp32 ones; on CPU they run in fp32.

Weights come from the EchoPrime v1.0.0 release (model_data.zip, unpacked by `python -m scripts.fetch_echoprime`):
model_data/weights/echo_prime_encoder.pt and model_data/weights/view_classifier.pt. They are never part of
this repository.
"""

import os
import zlib
from pathlib import Path

import av
import cv2
import numpy as np
import pydicom
import torch
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian
from torchvision.models import convnext_base
from torchvision.models.video import mvit_v2_s
from tqdm import tqdm

# EchoPrime's preprocessing constants; the encoder's weights only make sense with exactly these
MEAN = (29.110628, 28.076836, 29.096405)
STD = (47.989223, 46.456997, 47.20083)
FRAMES_TAKEN = 32  # the first 32 frames (about one heart beat at 30 fps)...
FRAME_STRIDE = 2  # ...every 2nd of them: 16 frames into the encoder
SIZE = 224
ZOOM = 0.1  # fraction cut from each side of the square crop
EMBED_DIM = 512
VIEW_CLASSES = ["A2C", "A3C", "A4C", "A5C", "Apical_Doppler", "Doppler_Parasternal_Long",
                "Doppler_Parasternal_Short", "Parasternal_Long", "Parasternal_Short", "SSN", "Subcostal"]

DICOM_SUFFIXES = {".dcm", ".dicom"}
VIDEO_SUFFIXES = {".avi", ".mp4"}
# a grey level that changes by more than this (std over frames, 0-255 scale) is live image, not overlay.
# Low on purpose: the dim far field at the fan's edges (grey ~1-10) moves by little more than 1, and at 2.0
# a real echo lost a quarter of its fan; the opening below removes the JPEG noise that gets through on text
MOTION_THRESHOLD = 1.0
# Decoding limits, checked before any pixel is decoded: a file of a few kilobytes can declare (and, deflated or
# as H.264 of a flat image, really hold) gigabytes of pixels. Echo machines export 1024x768 or smaller frames,
# screen captures 1920x1080; a few hundred frames at most. Refusing beyond these keeps one upload from taking
# the server's memory, and real studies never reach them.
MAX_FRAME_PIXELS = 3840 * 2160  # one frame: a 4K screen
MAX_DECODED_BYTES = 1 << 30  # all decoded frames of one file as uint8 RGB: 455 frames of 1024x768
MIN_SECTOR_FRACTION = 0.01  # a "sector" smaller than 1% of the frame means we found no image at all
RELEASE_HINT = ("it comes from the EchoPrime v1.0.0 release asset model_data.zip "
                "(https://github.com/echonet/EchoPrime/releases/tag/v1.0.0); "
                "`python -m scripts.fetch_echoprime` downloads and unpacks it")


class VideoError(Exception):
    """A file that cannot be turned into a clip; the message says why, in one line."""


class NotAVideo(VideoError):
    """A readable file that is not a video: a still image, a structured report, an audio-only file."""


# ------------------------------------------------------------------------------------------------ finding
def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def find_videos(inputs) -> list[Path]:
    """Files named directly, plus the DICOM/AVI/MP4 files found (recursively) in folders named.

    Inside folders, extensionless files count when they carry the DICOM preamble: scanners and PACS exports
    often write names like IM_0001. Files named directly are always kept; if they are not videos,
    `load_study` says so. Sorted within each folder, so a study is always read in the same order.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = []
    for item in map(Path, inputs):
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")):
                suffix = path.suffix.lower()
                if suffix in DICOM_SUFFIXES | VIDEO_SUFFIXES or (suffix == "" and _has_dicom_preamble(path)):
                    found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return found


# ------------------------------------------------------------------------------------------------ reading
def _to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    # rare >8-bit ultrasound: scale the stored range onto 0-255 so the normalisation constants still apply
    return np.round(arr.astype(np.float32) * (255.0 / (2 ** bits_stored - 1))).clip(0, 255).astype(np.uint8)


def _mb(n: int) -> str:
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MB"


def _budget() -> str:
    return f"{MAX_DECODED_BYTES >> 30} GB" if MAX_DECODED_BYTES >= 1 << 30 else f"{MAX_DECODED_BYTES >> 20} MB"


def check_size(n_frames: int, rows: int, cols: int):
    """Refuse, before decoding, frames or a frame count beyond MAX_FRAME_PIXELS / MAX_DECODED_BYTES."""
    if rows * cols > MAX_FRAME_PIXELS:
        raise VideoError(f"frames of {rows}x{cols} pixels are larger than this reader decodes (at most "
                         f"{MAX_FRAME_PIXELS:,} pixels a frame, 3840x2160); export the clip at the scanner's resolution")
    if n_frames * rows * cols * 3 > MAX_DECODED_BYTES:
        raise VideoError(f"{n_frames} frames of {rows}x{cols} pixels would decode to {_mb(n_frames * rows * cols * 3)}, "
                         f"more than the {_budget()} this reader decodes from one file (at most "
                         f"{MAX_DECODED_BYTES // (rows * cols * 3)} frames at this size); export a shorter clip")


def _check_inflated_size(path: Path):
    """A deflated DICOM is inflated whole by pydicom before its header can be read: count the inflated bytes
    first, a chunk at a time, so a tiny file that inflates to gigabytes is refused without holding them."""
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)  # leaves f at the deflated dataset (pydicom's own reader does the same)
        inflate, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while data := inflate.unconsumed_tail or f.read(1 << 20):
            size += len(inflate.decompress(data, 1 << 24))
            if size > MAX_DECODED_BYTES:
                raise VideoError(f"the deflated DICOM inflates to more than {_budget()}, more than this reader "
                                 "decodes from one file; export the clip uncompressed or as JPEG")


def read_dicom(path) -> np.ndarray:
    """A multi-frame ultrasound DICOM as uint8 RGB frames (F, H, W, 3); its size is checked on the header first."""
    try:
        if _has_dicom_preamble(path) and pydicom.filereader.read_file_meta_info(path).get(
                "TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            _check_inflated_size(path)
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except VideoError:
        raise
    except Exception as e:  # malformed files raise anything from InvalidDicomError to struct.error
        raise VideoError(f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    try:
        n_frames = int(header.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise VideoError(f"malformed NumberOfFrames {header.get('NumberOfFrames')!r}") from None
    try:
        rows, cols = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    except (TypeError, ValueError):
        raise VideoError(f"malformed Rows/Columns {header.get('Rows')!r}/{header.get('Columns')!r}") from None
    if n_frames >= 2 and rows > 0 and cols > 0:  # without pixel data or frames, the messages below say why
        check_size(n_frames, rows, cols)  # pydicom decodes the frames and the size the header declares
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise VideoError(f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise NotAVideo("no pixel data (a structured report or another non-image object), not a video")
    if n_frames < 2:
        raise NotAVideo("a single frame (still image), not a video")
    photometric = ds.get("PhotometricInterpretation")
    if photometric is None:
        raise VideoError("no PhotometricInterpretation: cannot tell how the pixels are coloured")
    try:
        # pydicom >= 3 converts YBR_FULL / YBR_FULL_422 to RGB here (as_rgb=True by default)
        arr = ds.pixel_array
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    except Exception as e:  # every decoder raises its own types; the file is unusable whichever it is
        raise VideoError(f"pixel data could not be decoded ({type(e).__name__}: {e})") from e
    if photometric == "PALETTE COLOR" and arr.dtype != np.uint8:  # 16-bit palette entries
        arr = (arr >> 8).astype(np.uint8)
    arr = _to_uint8(arr, int(ds.get("BitsStored", 8)))
    if photometric == "MONOCHROME1":  # 0 is white in this convention
        arr = 255 - arr
    if arr.ndim == 3:  # (F, H, W) grayscale
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VideoError(f"unexpected pixel array shape {arr.shape} ({photometric}, {n_frames} frames)")
    return arr


def read_video_file(path, max_frames: int | None = None) -> np.ndarray:
    """An AVI/MP4 (anything FFmpeg reads) as uint8 RGB frames (F, H, W, 3), the first max_frames if given.

    The frame size and count the container declares are checked before decoding, and the frames decoded so far
    while decoding (a container may not know its frame count, or may lie about it)."""
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise NotAVideo("no video stream in the file")
            stream = container.streams.video[0]
            rows, cols = stream.codec_context.height, stream.codec_context.width
            declared = stream.frames or 2  # 0 when the container does not say; a video has 2 at least
            if rows > 0 and cols > 0:
                check_size(min(declared, max_frames or declared), rows, cols)
            # the decoder itself refuses a larger frame later in the stream (its resolution can change)
            stream.codec_context.options = {"max_pixels": str(MAX_FRAME_PIXELS)}
            stream.thread_type = "AUTO"  # frame-parallel decoding; the default decodes on one core
            for frame in container.decode(stream):
                check_size(len(frames) + 1, frame.height, frame.width)
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == max_frames:  # unmasked clips need only the first 32 frames
                    break
    except av.error.FFmpegError as e:
        raise VideoError(f"not a readable video ({type(e).__name__}: {e})") from e
    if len(frames) < 2:
        raise NotAVideo(f"{len(frames)} decodable frame(s), not a video")
    return np.stack(frames)


def is_dicom(path) -> bool:
    path = Path(path)
    return path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path)


def read_frames(path, max_frames: int | None = None) -> np.ndarray:
    """uint8 RGB frames (F, H, W, 3) of a DICOM or video file; max_frames only shortens video decoding."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    return read_dicom(path) if is_dicom(path) else read_video_file(path, max_frames)


# ------------------------------------------------------------------------------------------------ preprocessing
def sector_mask(frames: np.ndarray, threshold: float = MOTION_THRESHOLD) -> np.ndarray:
    """Boolean (H, W) mask of the ultrasound sector of uint8 RGB frames (F, H, W, 3).

    Moving pixels (grey-level std over frames > threshold) -> closing (joins the speckle of the fan) ->
    opening with a kernel of 3% of the short side (drops lines a few pixels wide: ECG traces, changing
    text, calipers) -> largest connected region -> its filled convex hull.
    """
    n, h, w = frames.shape[:3]
    total = np.zeros((h, w), np.float64)
    total_sq = np.zeros((h, w), np.float64)
    for frame in frames:  # one frame at a time: a float copy of a whole DICOM would be gigabytes
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float64)
        total += grey
        total_sq += grey * grey
    variance = np.maximum(total_sq / n - (total / n) ** 2, 0.0)
    moving = (variance > threshold ** 2).astype(np.uint8)

    k = max(3, round(0.03 * min(h, w))) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    moving = cv2.morphologyEx(moving, cv2.MORPH_CLOSE, kernel)
    moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if count < 2 or areas.max() < MIN_SECTOR_FRACTION * h * w:
        raise VideoError("no moving ultrasound sector found (the frames are static); pass mask=False to keep them whole")
    region = (labels == 1 + int(areas.argmax())).astype(np.uint8)
    hull = cv2.convexHull(cv2.findNonZero(region))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


def crop_and_scale(frame: np.ndarray, size: int = SIZE, zoom: float = ZOOM) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): centre square, minus `zoom` of it per side, bicubic resize."""
    h, w = frame.shape[:2]
    # same integer arithmetic as EchoPrime's crop_and_scale, so crops agree to the pixel
    if w > h:
        pad = int(round((w - h) / 2))
        frame = frame[:, pad:w - pad]
    elif h > w:
        pad = int(round((h - w) / 2))
        frame = frame[pad:h - pad]
    h, w = frame.shape[:2]
    pad_y, pad_x = int(h * zoom), int(w * zoom)
    frame = frame[pad_y:h - pad_y, pad_x:w - pad_x]
    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_CUBIC)


def preprocess(frames: np.ndarray, mask: bool) -> torch.Tensor:
    """uint8 RGB frames (F, H, W, 3) -> normalised, padded, strided clip (3, 16, 224, 224) float32."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if min(frames.shape[1:3]) < 16:
        raise VideoError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small to be an echo")
    sector = sector_mask(frames)[..., None] if mask else None  # from all frames, like EchoPrime
    used = frames[:FRAMES_TAKEN:FRAME_STRIDE]
    scaled = np.stack([crop_and_scale(f * sector if sector is not None else f) for f in used])
    x = torch.from_numpy(scaled).permute(3, 0, 1, 2).float()
    x = (x - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)
    clip = torch.zeros(3, FRAMES_TAKEN // FRAME_STRIDE, SIZE, SIZE)
    clip[:, :len(used)] = x
    return clip


def load_clip(path, mask: bool | None = None) -> torch.Tensor:
    """One video file -> (3, 16, 224, 224) float32 clip. mask=None masks DICOMs only (see module docstring).

    Raises NotAVideo for still images and non-image objects, VideoError for unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    if mask is None:
        mask = is_dicom(path)
    # the mask looks at every frame; without it only the frames the clip keeps need decoding
    return preprocess(read_frames(path, None if mask else FRAMES_TAKEN), mask)


def few_reasons(skipped, shown: int = 5) -> str:
    """The first files' reasons and how many more: a study of 1000 non-videos is not a 200 KB message."""
    text = "; ".join(f"{p}: {r}" for p, r in skipped[:shown])
    return text + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


def load_study(paths, mask: bool | None = None, progress: bool = False, on_file=None):
    """Clips of all usable videos of one study.

    Returns (clips (N, 3, 16, 224, 224), kept paths, skipped [(path, reason)]). Raises VideoError, listing
    every file's reason, when no file is a usable video. on_file(done, total, path, reason or None) is called
    after each file (a page showing progress uses it).
    """
    clips, kept, skipped = [], [], []
    paths = list(paths)
    for i, path in enumerate(tqdm(paths, desc="reading videos", unit="file", disable=not progress)):
        reason = None
        try:
            clips.append(load_clip(path, mask))
            kept.append(Path(path))
        except VideoError as e:
            reason = str(e)
            skipped.append((Path(path), reason))
        if on_file is not None:
            on_file(i + 1, len(paths), Path(path), reason)
    if not clips:
        raise VideoError(f"no usable echo video in this study ({few_reasons(skipped) or 'no files given'})")
    return torch.stack(clips), kept, skipped


# ------------------------------------------------------------------------------------------------ models
def _read_state_dict(path, what: str) -> dict:
    # checked before the model is built, so a wrong path fails in milliseconds, not after model set-up
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}: {RELEASE_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, HTML error page, a pickle of arbitrary objects...
        raise ValueError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}); "
                         f"re-download it: {RELEASE_HINT}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of the {what}")
    return state


def _build(make, state: dict | None, path, what: str) -> torch.nn.Module:
    """make() builds the bare model; with a state dict it is built on the meta device, skipping a random
    initialisation (seconds for 88M parameters) that the loaded weights would overwrite anyway."""
    if state is None:
        return make().eval().requires_grad_(False)
    with torch.device("meta"):
        model = make()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state)
                         if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise ValueError(f"{path} does not fit the {what}: {len(missing)} missing keys ({few(missing)}), "
                         f"{len(unexpected)} unexpected ({few(unexpected)}), {len(wrong_shape)} of the wrong "
                         f"shape ({few(wrong_shape)}). Is it the right file? {RELEASE_HINT}")
    # assign=True adopts the loaded tensors (fp32, as the maths below expects) in place of the meta ones
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def _mvit_encoder() -> torch.nn.Module:
    model = mvit_v2_s(weights=None)
    model.head[-1] = torch.nn.Linear(model.head[-1].in_features, EMBED_DIM)
    return model


def _convnext_views() -> torch.nn.Module:
    model = convnext_base(weights=None)
    model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, len(VIEW_CLASSES))
    return model


def build_encoder(weights_path=None) -> torch.nn.Module:
    """EchoPrime's video encoder: torchvision mvit_v2_s with a 768 -> 512 head. None = random weights (tests)."""
    what = "EchoPrime video encoder (echo_prime_encoder.pt)"
    state = None if weights_path is None else _read_state_dict(weights_path, what)
    return _build(_mvit_encoder, state, weights_path, what)


def build_view_classifier(weights_path=None) -> torch.nn.Module:
    """EchoPrime's view classifier: torchvision convnext_base with a 1024 -> 11 head. None = random weights."""
    what = "EchoPrime view classifier (view_classifier.pt)"
    state = None if weights_path is None else _read_state_dict(weights_path, what)
    return _build(_convnext_views, state, weights_path, what)


def _check_clips(clips: torch.Tensor):
    expected = (3, FRAMES_TAKEN // FRAME_STRIDE, SIZE, SIZE)
    if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
        raise ValueError(f"clips must be (N, {', '.join(map(str, expected))}), got {tuple(clips.shape)}")


def _batched(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    device = torch.device(device)
    outputs = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(inputs), batch_size):
            outputs.append(model(inputs[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(outputs)


def encode_clips(encoder: torch.nn.Module, clips: torch.Tensor, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """(N, 3, 16, 224, 224) clips -> (N, 512) float32 embeddings on the CPU (unnormalised, as EchoPrime's)."""
    _check_clips(clips)
    return _batched(encoder, clips, batch_size, device)


def view_probabilities(view_model: torch.nn.Module, clips: torch.Tensor, batch_size: int = 32, device="cpu") -> torch.Tensor:
    """(N, len(VIEW_CLASSES)) softmax of the view classifier, from each clip's first (normalised) frame."""
    _check_clips(clips)
    return _batched(view_model, clips[:, :, 0], batch_size, device).softmax(dim=1)


def classify_views(view_model: torch.nn.Module, clips: torch.Tensor, batch_size: int = 32, device="cpu") -> list[str]:
    """One VIEW_CLASSES name per clip, from the clip's first (normalised) frame."""
    probs = view_probabilities(view_model, clips, batch_size, device)
    return [VIEW_CLASSES[i] for i in probs.argmax(dim=1).tolist()]
