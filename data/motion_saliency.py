"""Per-frame masks of what moves, from a sequence of frames (the ms extractor's method).

In the spirit of uNLC as used by Pathak et al. 2017 ("Learning features by watching objects
move") [1], made cheap enough for a CPU (~18 frames/s per core at 320x240):

1. Dense optical flow between consecutive frames, both ways (OpenCV DIS, or Farnebäck).
2. Camera motion: a homography fitted to a grid of flow vectors with RANSAC. Its flow is
   subtracted; what is left (the residual) is object motion. Too few RANSAC inliers means
   the camera model failed (a cut, a blur, strong parallax) and the frame is dropped.
3. Motion saliency per pixel: residual / (2 * motion threshold), clipped to [0, 1], so 0.5
   means "moves by the threshold" (the larger of `motion_px` and a multiple of the frame's
   median residual, which rises with flow noise). The two directions are combined by their
   minimum: the flow smears a mover's motion onto the background ahead of it (forward flow)
   and behind it (backward flow), but only the mover itself moves both ways.
4. Voting across neighbouring frames: the saliency of frames t-k..t+k is carried into frame
   t along the (chained) flow and averaged, so a one-frame flow error is outvoted. (NLC votes
   non-locally, between superpixels that look alike anywhere in the video; votes that travel
   along the flow are far cheaper and keep the same aim: agreement over time.)
5. Pooling over superpixels (skimage SLIC): each superpixel takes its mean vote; >= 0.5 is
   foreground. This fills flat object interiors where flow is weak, and snaps the mask to
   image edges.
6. Frames with almost no or almost all foreground are dropped, as in [1].

`segments=0` and `vote_radius=0` switch steps 5 and 4 off (the per-pixel baseline).

[1] D. Pathak, R. Girshick, P. Dollár, T. Darrell, B. Hariharan. Learning Features by
    Watching Objects Move. CVPR 2017.
"""

import dataclasses
from typing import Iterable, Iterator

import cv2
import numpy as np
from skimage.segmentation import slic

from mtss_train.errors import DataError, MtssError

DROP_NO_FLOW = "no_flow"  # A one-frame video: nothing to compare with.
DROP_CAMERA = "camera_fit"
DROP_EMPTY = "too_little_foreground"
DROP_FULL = "too_much_foreground"
DROP_REASONS = (DROP_NO_FLOW, DROP_CAMERA, DROP_EMPTY, DROP_FULL)


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    """Everything that decides the masks; stored in the manifest (a rerun must match it).

    Attributes:
      max_side: frames are shrunk so their longer side is at most this (None, or 0 as a flag: as decoded).
      frame_stride: use every n-th decoded frame (flow is computed between used frames).
      max_frames: use at most this many frames per video (None, or 0 as a flag: all).
      flow: 'dis' (DIS at full resolution, 6 px patches) or 'farneback'.
      fit_step: spacing in px of the flow samples the camera homography is fitted to.
      ransac_px: RANSAC reprojection threshold in px.
      min_camera_inliers: below this fraction of inliers the camera fit failed.
      motion_px: residual flow (px per frame, at the processed size) that counts as motion;
        set for people walking in video sampled at 3-5 frames/s (use frame_stride on 25 fps video).
      noise_factor: the motion threshold is at least this times the frame's median residual.
      segments: approximate number of SLIC superpixels; 0 pools nothing (per-pixel masks).
      compactness: SLIC colour/space balance.
      slic_iterations: SLIC k-means iterations (5 is close to converged and twice as fast as 10).
      vote_radius: frames voted on either side; 0 votes nothing.
      min_foreground, max_foreground: frames outside this foreground fraction are dropped.
    """

    max_side: int | None = 320
    frame_stride: int = 1
    max_frames: int | None = None
    flow: str = "dis"
    fit_step: int = 8
    ransac_px: float = 1.0
    min_camera_inliers: float = 0.5
    motion_px: float = 2.0
    noise_factor: float = 3.0
    segments: int = 800
    compactness: float = 10.0
    slic_iterations: int = 5
    vote_radius: int = 2
    min_foreground: float = 0.005
    max_foreground: float = 0.5

    def validate(self) -> None:
        """Raises MtssError naming the first bad setting."""
        problems = [
            (self.flow not in ("dis", "farneback"), f"flow must be 'dis' or 'farneback', not {self.flow!r}"),
            (self.max_side is not None and self.max_side < 16, f"max_side must be >= 16, not {self.max_side}"),
            (self.frame_stride < 1, f"frame_stride must be >= 1, not {self.frame_stride}"),
            (self.max_frames is not None and self.max_frames < 1, f"max_frames must be >= 1, not {self.max_frames}"),
            (self.fit_step < 1 or self.ransac_px <= 0, "fit_step must be >= 1 and ransac_px > 0"),
            (not 0 < self.min_camera_inliers <= 1,
             f"min_camera_inliers must be in (0, 1], not {self.min_camera_inliers}"),
            (self.motion_px <= 0 or self.noise_factor < 0, "motion_px must be > 0 and noise_factor >= 0"),
            (self.segments < 0 or self.slic_iterations < 1, "segments must be >= 0 and slic_iterations >= 1"),
            (self.vote_radius < 0, f"vote_radius must be >= 0, not {self.vote_radius}"),
            (not 0 <= self.min_foreground < self.max_foreground <= 1,
             "need 0 <= min_foreground < max_foreground <= 1"),
        ]
        for bad, message in problems:
            if bad:
                raise MtssError(f"motion mask settings: {message}")


@dataclasses.dataclass
class FrameMask:
    """One frame's result.

    Attributes:
      number: the frame's number in the video (0-based, before striding).
      frame: RGB uint8 [H, W, 3].
      mask: bool [H, W], True where something moves (all False when the camera fit failed).
      foreground: the mask's mean.
      camera_inliers: the worst RANSAC inlier fraction of this frame's camera fits (nan: none).
      drop: None if the frame is kept, else one of DROP_REASONS.
    """

    number: int
    frame: np.ndarray
    mask: np.ndarray
    foreground: float
    camera_inliers: float
    drop: str | None


@dataclasses.dataclass
class _Motion:
    """A frame on its way through the stream: flows to its neighbours and its saliency."""

    number: int
    rgb: np.ndarray
    grey: np.ndarray
    forward: np.ndarray | None = None  # Flow to the next frame [H, W, 2] if its camera fit held.
    backward: np.ndarray | None = None  # Flow to the previous frame, likewise.
    residuals: list = dataclasses.field(default_factory=list)  # Residual magnitudes [H, W] per good fit.
    inliers: list = dataclasses.field(default_factory=list)  # Inlier fraction per attempted fit.
    saliency: np.ndarray | None = None  # float32 [H, W] in [0, 1]; None: no camera fit held.


def _flow_fn(settings: MaskSettings):
    """grey a, grey b -> float32 flow [H, W, 2] from a to b (a per-video object, no global state)."""
    if settings.flow == "dis":
        # The presets stop at half resolution with 12 px patches, which smears a walker's
        # motion over twice their width. Full resolution with 6 px patches keeps it tight;
        # without variational refinement it costs ~13 ms per 320x240 pair on one core here,
        # and gave better masks on the sample clip and the synthetic test sequences.
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(0)
        dis.setPatchSize(6)
        dis.setPatchStride(3)
        dis.setGradientDescentIterations(12)
        dis.setVariationalRefinementIterations(0)
        return lambda a, b: dis.calc(a, b, None)
    return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def camera_residual(flow: np.ndarray, settings: MaskSettings) -> tuple[np.ndarray | None, float]:
    """Object motion left after removing the camera's homography flow.

    Args:
      flow: float32 [H, W, 2] (dx, dy) from one frame to another.
      settings: fit_step, ransac_px, min_camera_inliers are used.

    Returns:
      (|flow - homography flow| float32 [H, W], or None if the fit failed; inlier fraction).
    """
    height, width = flow.shape[:2]
    step = settings.fit_step
    ys, xs = np.mgrid[step // 2:height:step, step // 2:width:step]
    source = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    target = source + flow[ys.ravel(), xs.ravel()]
    if len(source) < 8:
        return None, 0.0
    homography, inliers = cv2.findHomography(source, target, cv2.RANSAC, settings.ransac_px, maxIters=500)
    fraction = float(inliers.mean()) if inliers is not None else 0.0
    if homography is None or fraction < settings.min_camera_inliers:
        return None, fraction
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    h = homography.astype(np.float32)
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    camera_dx = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w - x
    camera_dy = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w - y
    return np.hypot(flow[..., 0] - camera_dx, flow[..., 1] - camera_dy), fraction


def _saliency(residuals: list[np.ndarray], settings: MaskSettings) -> np.ndarray:
    """Minimum over directions of residual / (2 * threshold), clipped to [0, 1]: float32 [H, W]."""
    maps = []
    for residual in residuals:
        threshold = max(settings.motion_px, settings.noise_factor * float(np.median(residual)))
        maps.append(np.clip(residual / (2 * threshold), 0, 1))
    return np.min(maps, axis=0).astype(np.float32)


def _motion_stream(frames: Iterable[tuple[int, np.ndarray]], settings: MaskSettings) -> Iterator[_Motion]:
    """Frames -> _Motion with flows, residuals and saliency, one frame behind the input."""
    flow = _flow_fn(settings)
    previous = None
    for number, rgb in frames:
        current = _Motion(number, rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        if previous is not None:
            if current.grey.shape != previous.grey.shape:
                raise DataError(f"frame {number} changes size {previous.grey.shape} -> {current.grey.shape}")
            for source, target, attribute in ((previous, current, "forward"), (current, previous, "backward")):
                vectors = flow(source.grey, target.grey)
                residual, fraction = camera_residual(vectors, settings)
                source.inliers.append(fraction)
                if residual is not None:
                    setattr(source, attribute, vectors)
                    source.residuals.append(residual)
            yield _finish(previous, settings)
        previous = current
    if previous is not None:
        yield _finish(previous, settings)


def _finish(motion: _Motion, settings: MaskSettings) -> _Motion:
    if motion.residuals:
        motion.saliency = _saliency(motion.residuals, settings)
    motion.residuals = []  # Not needed any more; keeps the window small.
    return motion


def _carried_votes(window: list[_Motion], centre: int, radius: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Mean saliency of window[centre - radius .. centre + radius], carried into the centre frame.

    A neighbour's saliency is sampled where the (chained) flow takes each centre pixel; the
    chain stops at a frame whose camera fit failed. Pixels whose flow leaves the neighbour's
    frame do not vote. Returns float32 [H, W] in [0, 1].
    """
    total = window[centre].saliency.copy()
    count = np.ones_like(total)
    for step, attribute in ((1, "forward"), (-1, "backward")):
        map_x = map_y = None
        for j in range(1, radius + 1):
            near, far = centre + step * (j - 1), centre + step * j
            if not 0 <= far < len(window):
                break
            vectors = getattr(window[near], attribute)
            if vectors is None or window[far].saliency is None:
                break
            if map_x is None:
                map_x, map_y = grid[0] + vectors[..., 0], grid[1] + vectors[..., 1]
            else:
                moved = cv2.remap(vectors, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                map_x, map_y = map_x + moved[..., 0], map_y + moved[..., 1]
            carried = cv2.remap(window[far].saliency, map_x, map_y, cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
            valid = np.isfinite(carried)
            total += np.where(valid, carried, 0)
            count += valid
    return total / count


def _pool(rgb: np.ndarray, votes: np.ndarray, settings: MaskSettings) -> np.ndarray:
    """bool [H, W]: superpixels (or pixels, if segments == 0) whose mean vote is >= 0.5."""
    if settings.segments == 0:
        return votes >= 0.5
    labels = slic(rgb, n_segments=settings.segments, compactness=settings.compactness,
                  max_num_iter=settings.slic_iterations, start_label=0).ravel()
    means = np.bincount(labels, weights=votes.ravel()) / np.maximum(np.bincount(labels), 1)
    return (means[labels] >= 0.5).reshape(votes.shape)


def _frame_mask(window: list[_Motion], centre: int, settings: MaskSettings, grid) -> FrameMask:
    motion = window[centre]
    inliers = min(motion.inliers) if motion.inliers else float("nan")
    if motion.saliency is None:
        empty = np.zeros(motion.grey.shape, bool)
        reason = DROP_CAMERA if motion.inliers else DROP_NO_FLOW
        return FrameMask(motion.number, motion.rgb, empty, 0.0, inliers, reason)
    votes = _carried_votes(window, centre, settings.vote_radius, grid) if settings.vote_radius else motion.saliency
    mask = _pool(motion.rgb, votes, settings)
    foreground = float(mask.mean())
    drop = None
    if foreground < settings.min_foreground:
        drop = DROP_EMPTY
    elif foreground > settings.max_foreground:
        drop = DROP_FULL
    return FrameMask(motion.number, motion.rgb, mask, foreground, inliers, drop)


def masks_from_frames(frames: Iterable[tuple[int, np.ndarray]], settings: MaskSettings) -> Iterator[FrameMask]:
    """The motion masks of a sequence of (frame number, RGB uint8 [H, W, 3]) of one shot.

    Lazy: holds only 2 * vote_radius + 2 frames. Yields one FrameMask per input frame, in order.
    """
    settings.validate()
    radius = settings.vote_radius
    window: list[_Motion] = []
    centre = 0
    grid = None
    for motion in _motion_stream(frames, settings):
        if grid is None:
            height, width = motion.grey.shape
            grid = tuple(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)))
        window.append(motion)
        while centre + radius < len(window):
            yield _frame_mask(window, centre, settings, grid)
            centre += 1
            if centre > radius:  # The oldest frame can no longer vote.
                window.pop(0)
                centre -= 1
    while centre < len(window):
        yield _frame_mask(window, centre, settings, grid)
        centre += 1
