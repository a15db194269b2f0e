"""The Shapes-world evaluator: a small CenterNet-style detector trained on the renderer's ground truth.

It finds the objects in an image (64×64; other sizes are resized) with their shape, colour, box
and centre, so that `scoring.py` can apply GenEval's rules. It never sees a diffusion output in
training and never takes part in diffusion training.

Design (docs/evaluator.md): a small U-Net maps the image to a grid at stride 2 (32×32) with
* a centre heatmap (one channel): a Gaussian bump at each object's visible-box centre, trained with
  CenterNet's focal loss — peaks separate touching and overlapping objects of one shape, which
  counting prompts need;
* shape logits (8) and colour logits (10), read at the peak: the net classifies "the object whose
  centre is here", so an occluded object keeps its shape;
* a centre offset (2) and a box size (2), read at the peak, giving the box for position clauses.
Global-average-pooled features of its last two stages serve FID/KID; its per-image shape
distribution serves an Inception-Score analogue.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chorus.errors import ChorusError
from chorus.paths import shipped_weights
from chorus.world.scoring import Detection

DEFAULT_WEIGHTS = shipped_weights("evaluator")
SIZE_UNIT = 16.0  # box sizes are regressed in units of 16 input pixels


@dataclass
class EvaluatorConfig:
    """The network and its decoding; saved as `config.json` beside `model.safetensors`."""

    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star", "heart",
                                                       "cross", "diamond", "hexagon"])
    colors: list[str] = field(default_factory=lambda: ["red", "orange", "yellow", "green", "blue",
                                                       "purple", "pink", "brown", "white", "gray"])
    image_size: int = 64
    stem_width: int = 16
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # at strides 2, 4, 8
    stride: int = 2
    peak_threshold: float = 0.3  # a heatmap peak above this is an object

    @property
    def num_outputs(self) -> int:
        return 1 + len(self.shapes) + len(self.colors) + 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluatorConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class TrainConfig:
    """The recipe of `chorus world train-evaluator`."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    min_visible_pixels: int = 6  # objects with fewer visible pixels are ignored (neither found nor missed)
    min_visible_fraction: float = 0.3  # ... and so are objects a crop cut to under this share of their area
    data_seed: int = 1_000_003  # make_sample seed of the data-set crops (the honesty renders use render_spec)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class ShapesEvaluator(nn.Module):
    """U-Net: stem (stride 2) → encoder stages → decoder back to stride 2 → per-cell heads."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or EvaluatorConfig()
        w = cfg.widths
        self.stem = nn.Sequential(*_conv_bn_relu(3, cfg.stem_width), *_conv_bn_relu(cfg.stem_width, w[0], stride=2))
        self.down = nn.ModuleList([_block(w[0], w[0])] + [_block(w[i - 1], w[i]) for i in range(1, len(w))])
        self.up = nn.ModuleList([_block(w[i] + w[i - 1], w[i - 1]) for i in range(len(w) - 1, 0, -1)])
        self.head_hidden = nn.Sequential(*_conv_bn_relu(w[0], w[0]))
        self.head = nn.Conv2d(w[0], cfg.num_outputs, 1)
        nn.init.constant_(self.head.bias[:1], -2.2)  # heatmap starts near p = 0.1 (CenterNet's prior)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) in [0,1] → (bottleneck (B,C3,H/8,W/8), penultimate (B,C0,H/2,W/2))."""
        h = self.stem(x * 2.0 - 1.0)
        skips = []
        for i, stage in enumerate(self.down):
            if i:
                h = F.max_pool2d(h, 2)
            h = stage(h)
            skips.append(h)
        bottleneck = skips.pop()
        for stage in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = stage(torch.cat([h, skips.pop()], dim=1))
        return bottleneck, self.head_hidden(h)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B,3,H,W) → maps on the stride-2 grid: heat (B,1), shape (B,S), color (B,K), offset (B,2), size (B,2)."""
        _, h = self.trunk(x)
        out = self.head(h)
        s, k = len(self.config.shapes), len(self.config.colors)
        return {"heat": out[:, :1], "shape": out[:, 1:1 + s], "color": out[:, 1 + s:1 + s + k],
                "offset": out[:, 1 + s + k:3 + s + k], "size": out[:, 3 + s + k:5 + s + k]}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """FID/KID features: [GAP(bottleneck), GAP(penultimate)] → (B, C3 + C0)."""
        bottleneck, h = self.trunk(x)
        return torch.cat([bottleneck.mean(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)


# --------------------------------------------------------------------------------------------
# images in
# --------------------------------------------------------------------------------------------

def to_batch(images, size: int = 64) -> tuple[torch.Tensor, bool]:
    """PIL images / (H,W,3) uint8 arrays / a (B,3,H,W) float tensor in [0,1] → (B,3,size,size); resized?"""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
    else:
        arrs = []
        for im in images:
            a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
            if a.ndim != 3 or a.shape[2] != 3:
                raise ChorusError(f"The evaluator needs RGB images (H, W, 3); got an array of shape {a.shape}.")
            arrs.append(torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0)
        shapes = {tuple(a.shape) for a in arrs}
        if len(shapes) > 1:
            arrs = [_resize(a[None], size)[0] for a in arrs]
        x = torch.stack(arrs) if arrs else torch.zeros(0, 3, size, size)
    resized = tuple(x.shape[-2:]) != (size, size)
    if resized:
        x = _resize(x, size)
    return x.clamp(0, 1), resized


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --------------------------------------------------------------------------------------------
# training targets from the renderer's ground truth
# --------------------------------------------------------------------------------------------

def visible_boxes(instance_map: np.ndarray, n_objects: int, min_pixels: int) -> list[tuple | None]:
    """Per object: the tight box (x0, y0, x1, y1) of its visible pixels, or None if under min_pixels."""
    boxes: list[tuple | None] = []
    for i in range(n_objects):
        ys, xs = np.nonzero(instance_map == i + 1)
        if len(xs) < min_pixels:
            boxes.append(None)
        else:
            boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    return boxes


def gaussian_sigma(w: float, h: float, stride: int) -> float:
    """σ (grid cells) of an object's heat bump: a sixth of its smaller side, at least 0.6 cells."""
    return max(0.6, min(w, h) / stride / 6.0)


def make_targets(sample, cfg: EvaluatorConfig, min_pixels: int, min_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Renderer ground truth → per-cell arrays on the (G,G) grid and per-object (shape, colour, box).

    heat: max of the objects' Gaussian bumps (1 at each centre cell); owner: the object whose bump
    dominates a cell (bump > 0.3) or -1; pixel_owner: the object visible at the cell's middle pixel
    or -1; ignore: cells near objects too cut or too hidden to demand (neither found nor missed).
    """
    g = cfg.image_size // cfg.stride
    s = sample.image.shape[0] / cfg.image_size  # sample pixels per evaluator pixel
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    heat = np.zeros((g, g), np.float32)
    owner = np.full((g, g), -1, np.int64)
    ignore = np.zeros((g, g), bool)
    mid = ((np.arange(g) + 0.5) * cfg.stride * s).astype(np.int64)
    inst_mid = sample.instance_map[mid[:, None], mid[None, :]].astype(np.int64)  # (G,G) object id + 1 or 0
    lut = np.full(len(sample.objects) + 1, -1, np.int64)
    shape_t, color_t, box_t = [], [], []
    boxes = visible_boxes(sample.instance_map, len(sample.objects), min_pixels)
    for i, (obj, box) in enumerate(zip(sample.objects, boxes)):
        if obj.visible_fraction < min_fraction:
            box = None
        if box is not None:  # the exact box, tightened to the visible pixels (±1 px) where occluded
            box = (max(obj.box[0], box[0] - 1), max(obj.box[1], box[1] - 1),
                   min(obj.box[2], box[2] + 1), min(obj.box[3], box[3] + 1))
        x0, y0, x1, y1 = (v / s for v in (obj.box if box is None else box))
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        px, py = min(int(cx / cfg.stride), g - 1), min(int(cy / cfg.stride), g - 1)
        bump = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * gaussian_sigma(w, h, cfg.stride) ** 2))
        if box is None:  # barely visible: neither a positive nor a negative
            ignore |= bump > 0.1
            continue
        k = len(shape_t)
        lut[i + 1] = k
        owner[bump > np.where(owner >= 0, heat, 0.3)] = k
        heat = np.maximum(heat, bump)
        shape_t.append(cfg.shapes.index(obj.shape))
        color_t.append(cfg.colors.index(obj.color))
        box_t.append((cx, cy, w, h))
    return {"heat": heat, "owner": owner, "pixel_owner": lut[inst_mid], "ignore": ignore & (heat < 0.5),
            "shape": np.array(shape_t, np.int64), "color": np.array(color_t, np.int64),
            "box": np.array(box_t, np.float32).reshape(-1, 4)}


def collate_targets(targets: list[dict], cfg: EvaluatorConfig) -> dict[str, torch.Tensor]:
    """Per-image targets → dense (B, ...) tensors: heat, ignore, per-cell labels and their weights.

    Box regression (offset, size) is taught on the centre cores (bump > 0.3); shape and colour on
    the cores and, at half weight, on every cell where an object is visible (denser supervision).
    """
    g = cfg.image_size // cfg.stride
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    n = len(targets)
    shape, color = np.zeros((n, g, g), np.int64), np.zeros((n, g, g), np.int64)
    reg = np.zeros((n, 4, g, g), np.float32)
    w_reg, w_cls = np.zeros((n, g, g), np.float32), np.zeros((n, g, g), np.float32)
    for b, t in enumerate(targets):
        core = t["owner"] >= 0
        w_reg[b] = np.where(core, t["heat"], 0.0)
        w_cls[b] = np.maximum(w_reg[b], 0.5 * (t["pixel_owner"] >= 0))
        if len(t["shape"]):
            cls_idx = np.maximum(np.where(core, t["owner"], t["pixel_owner"]), 0)
            shape[b], color[b] = t["shape"][cls_idx], t["color"][cls_idx]
            cx, cy, w, h = (t["box"][np.maximum(t["owner"], 0), j] for j in range(4))
            reg[b] = np.stack([cx / cfg.stride - (xs + 0.5), cy / cfg.stride - (ys + 0.5),
                               w / SIZE_UNIT, h / SIZE_UNIT])
    stack = lambda key: torch.from_numpy(np.stack([t[key] for t in targets]))[:, None]
    return {"heat": stack("heat"), "ignore": stack("ignore"), "shape": torch.from_numpy(shape),
            "color": torch.from_numpy(color), "reg": torch.from_numpy(reg),
            "w_reg": torch.from_numpy(w_reg), "w_cls": torch.from_numpy(w_cls)}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """CenterNet: −Σ[(1−p)²log p at peaks + (1−y)⁴p²log(1−p) elsewhere] / #peaks."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target >= 0.999
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_w = (1 - target) ** 4 * (~pos) * (~ignore)
    neg_loss = -(neg_w * p ** 2 * torch.log(1 - p)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def detection_loss(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Focal heat loss + weighted CE(shape) + CE(colour) + L1(offset, size) (weights: collate_targets)."""
    wc, wr = t["w_cls"], t["w_reg"]
    ce_shape = (F.cross_entropy(out["shape"], t["shape"], reduction="none") * wc).sum() / wc.sum().clamp(min=1.0)
    ce_color = (F.cross_entropy(out["color"], t["color"], reduction="none") * wc).sum() / wc.sum().clamp(min=1.0)
    reg = torch.cat([out["offset"], out["size"]], dim=1)
    l1 = ((reg - t["reg"]).abs().sum(1) * wr).sum() / wr.sum().clamp(min=1.0)
    heat = focal_loss(out["heat"], t["heat"], t["ignore"])
    return {"heat": heat, "shape": ce_shape, "color": ce_color, "box": l1,
            "total": heat + ce_shape + ce_color + l1}


# --------------------------------------------------------------------------------------------
# augmentation: mild degradations so diffusion-like images score fairly
# --------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: blur σ∈[0,1.2] px (p=.5), noise std∈[0,.06] (p=.5), gain∈[.9,1.1], bias∈[−.04,.04]."""
    b = x.shape[0]
    u = torch.rand(b, 6, generator=gen)
    out = []
    for i in range(b):
        xi = x[i:i + 1]
        if u[i, 0] < 0.5:
            xi = gaussian_blur(xi, float(u[i, 1]) * 1.2 + 0.2)
        out.append(xi)
    x = torch.cat(out)
    gain = (0.9 + 0.2 * u[:, 2]).view(b, 1, 1, 1)
    bias = (u[:, 3] * 0.08 - 0.04).view(b, 1, 1, 1)
    noise_std = (u[:, 4] < 0.5).float() * u[:, 5] * 0.06
    x = x * gain + bias + noise_std.view(b, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: x * g_σ."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


# --------------------------------------------------------------------------------------------
# decoding: peaks → objects
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def decode(out: dict[str, torch.Tensor], cfg: EvaluatorConfig, scales: list[tuple[float, float]] | None = None,
           threshold: float | None = None) -> list[list[Detection]]:
    """Local maxima (3×3) of the heatmap above the threshold → Detection(shape, colour, box, score).

    Boxes come back in each image's own pixel frame: evaluator pixels times `scales[b]` = (sx, sy).
    """
    thr = cfg.peak_threshold if threshold is None else threshold
    heat = torch.sigmoid(out["heat"])
    peaks = (heat == F.max_pool2d(heat, 3, stride=1, padding=1)) & (heat > thr)
    shape_p = out["shape"].softmax(1)
    color_p = out["color"].softmax(1)
    result = []
    for b in range(heat.shape[0]):
        scale = scales[b] if scales is not None else (1.0, 1.0)
        dets = []
        for py, px in torch.nonzero(peaks[b, 0]).tolist():
            ox, oy, w, h = (float(v) for v in torch.cat([out["offset"][b, :, py, px], out["size"][b, :, py, px]]))
            cx, cy = (px + 0.5 + ox) * cfg.stride, (py + 0.5 + oy) * cfg.stride
            w, h = max(w, 0.0) * SIZE_UNIT, max(h, 0.0) * SIZE_UNIT
            box = ((cx - w / 2) * scale[0], (cy - h / 2) * scale[1], (cx + w / 2) * scale[0], (cy + h / 2) * scale[1])
            dets.append(Detection(shape=cfg.shapes[int(shape_p[b, :, py, px].argmax())],
                                  color=cfg.colors[int(color_p[b, :, py, px].argmax())],
                                  box=box, score=float(heat[b, 0, py, px])))
        dets.sort(key=lambda d: -d.score)
        result.append(dets)
    return result


class Evaluator:
    """The trained detector with its decoding: `detect(images)`, `features(images)`, `shape_probs(images)`."""

    def __init__(self, model: ShapesEvaluator):
        self.model = model.eval()
        self.config = model.config

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Evaluator":
        """Load `config.json` + `model.safetensors` (fp16 or fp32) from a folder (default: the shipped weights)."""
        from safetensors.torch import load_file
        folder = Path(path) if path is not None else DEFAULT_WEIGHTS
        cfg_file, w_file = folder / "config.json", folder / "model.safetensors"
        if not cfg_file.is_file() or not w_file.is_file():
            raise ChorusError(f"No evaluator weights in {folder}: expected config.json and model.safetensors there "
                              "(train them with `chorus world train-evaluator --out DIR`).")
        cfg = EvaluatorConfig.from_dict(json.loads(cfg_file.read_text()))
        model = ShapesEvaluator(cfg)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(w_file)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ChorusError(f"The evaluator weights in {folder} do not fit its config.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
        return cls(model)

    def save(self, path: str | Path) -> None:
        """Write config.json + fp16 model.safetensors (BatchNorm counters stay int64)."""
        from chorus.models.io import save_safetensors
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.model.state_dict().items()}
        save_safetensors(state, folder / "model.safetensors")
        (folder / "config.json").write_text(self.config.to_json() + "\n")

    def _batches(self, images, batch_size: int):
        for i in range(0, len(images), batch_size):
            yield to_batch(images[i:i + batch_size], self.config.image_size)

    @torch.no_grad()
    def detect(self, images, batch_size: int = 64, threshold: float | None = None) -> list[list[Detection]]:
        """Images (any size; resized to 64) → per image, its objects, boxes in the image's own pixels."""
        if isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        dets: list[list[Detection]] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x, _ = to_batch(torch.stack(chunk) if isinstance(chunk[0], torch.Tensor) else chunk, self.config.image_size)
            scales = [(w / self.config.image_size, h / self.config.image_size) for h, w in map(_image_hw, chunk)]
            dets += decode(self.model(x), self.config, scales, threshold)
        return dets

    @torch.no_grad()
    def features(self, images, batch_size: int = 64) -> torch.Tensor:
        """(N, D) FID/KID features (GAP of the bottleneck and the penultimate layer)."""
        feats = [self.model.features(x) for x, _ in self._batches(images, batch_size)]
        return torch.cat(feats).double() if feats else torch.zeros(0, sum(self.config.widths[-1:] + self.config.widths[:1]))

    @torch.no_grad()
    def shape_probs(self, images, batch_size: int = 64) -> torch.Tensor:
        """p(shape | image) (N, 8): the heat-weighted mean of the per-cell shape softmax."""
        probs = []
        for x, _ in self._batches(images, batch_size):
            out = self.model(x)
            w = torch.sigmoid(out["heat"])
            p = (out["shape"].softmax(1) * w).sum((2, 3)) + 1e-6
            probs.append(p / p.sum(1, keepdim=True))
        return torch.cat(probs).double()


def _image_hw(im) -> tuple[int, int]:
    if isinstance(im, torch.Tensor):
        return int(im.shape[-2]), int(im.shape[-1])
    if hasattr(im, "size") and not isinstance(im, np.ndarray):
        return int(im.size[1]), int(im.size[0])
    return int(im.shape[0]), int(im.shape[1])


# --------------------------------------------------------------------------------------------
# FID, KID and the Inception-Score analogue on the evaluator's own features
# --------------------------------------------------------------------------------------------

def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID = |μ1−μ2|² + tr(Σ1 + Σ2 − 2(Σ1^½ Σ2 Σ1^½)^½)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    e1, v1 = torch.linalg.eigh(s1)
    root1 = (v1 * e1.clamp(min=0).sqrt()) @ v1.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 20, subset_size: int = 200,
                    seed: int = 0) -> float:
    """KID: unbiased MMD² with the kernel k(x,y) = (xᵀy/d + 1)³, averaged over random subsets."""
    f1, f2 = f1.double(), f2.double()
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=gen)[:m]]
        y = f2[torch.randperm(len(f2), generator=gen)[:m]]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))
        total += float(off(kxx) + off(kyy) - 2 * kxy.mean())
    return total / subsets


def inception_score(probs: torch.Tensor) -> float:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) over the evaluator's shape distribution (1 … 8)."""
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def training_sample(rng: np.random.Generator, cfg: EvaluatorConfig, data_seed: int, index: int):
    """One ground-truth scene: half free-form scenes, half crops of the data set (every colour–shape pair).

    Free-form (`render.random_scene_sample`): 0–5 objects, occlusion on half of them, a native
    size in [16, 128] on half of them (blur). Data-set crops (`render.make_sample`, seed
    `data_seed`): native-size variation, crops and cut distractors, over all three splits.
    One in 25 is an empty noise image (`empty_sample`), so that noise finds no objects.
    """
    from chorus.world import render
    u = rng.random()
    if u < 0.04:
        return empty_sample(rng, cfg.image_size)
    if u < 0.52:
        return render.random_scene_sample(
            rng, size=cfg.image_size, max_objects=5, occlusion=bool(rng.random() < 0.5),
            native_range=(16, 128) if rng.random() < 0.5 else None, split="heldout_pairs", with_instances=True)
    split = ("train", "heldout_pairs", "heldout_words")[int(rng.integers(3))]
    return render.make_sample(data_seed, index, size=cfg.image_size, crop=True, split=split, with_instances=True)


def empty_sample(rng: np.random.Generator, size: int):
    """A negative: i.i.d. uniform noise, blurred (σ ∈ [0, 2] px) half of the time; no objects."""
    from chorus.world.scene import Sample
    x = torch.from_numpy(rng.random((1, 3, size, size), dtype=np.float32))
    if rng.random() < 0.5:
        x = gaussian_blur(x, float(rng.uniform(0.3, 2.0)))
        x = (x - x.mean()) / x.std().clamp(min=1e-6) * float(rng.uniform(0.1, 0.3)) + 0.5
    image = (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return Sample(image=image, caption="", spec={"include": [], "exclude": []}, objects=[],
                  original_size=(size, size), crop_top_left=(0, 0), instance_map=np.zeros((size, size), np.int16))


class TrainingBatches(torch.utils.data.Dataset):
    """Item `step` = the augmented batch of that step, drawn from its own seeds (any worker count gives the same data)."""

    def __init__(self, cfg: EvaluatorConfig, train: "TrainConfig"):
        self.cfg, self.train = cfg, train

    def __len__(self) -> int:
        return self.train.steps

    def __getitem__(self, step: int):
        """Fresh renderer scenes → (augmented images (B,3,64,64), dense targets)."""
        cfg, tr = self.cfg, self.train
        rng = np.random.default_rng([tr.seed, step, 1])
        images, targets = [], []
        for i in range(tr.batch_size):
            sample = training_sample(rng, cfg, tr.data_seed, step * tr.batch_size + i)
            images.append(torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float() / 255.0)
            targets.append(make_targets(sample, cfg, tr.min_visible_pixels, tr.min_visible_fraction))
        gen = torch.Generator().manual_seed(tr.seed * 1_000_003 + step)
        return augment(torch.stack(images), gen), collate_targets(targets, cfg)


def train_evaluator(out_dir: str | Path | None = None, train: TrainConfig | None = None,
                    config: EvaluatorConfig | None = None, progress: bool = True, device: str = "cpu",
                    workers: int = 0) -> tuple[Evaluator, dict]:
    """Train on random renderer scenes (never diffusion outputs); save to out_dir if given."""
    from tqdm import tqdm
    train = train or TrainConfig()
    cfg = config or EvaluatorConfig()
    torch.manual_seed(train.seed)
    if train.threads:
        torch.set_num_threads(train.threads)
    model = ShapesEvaluator(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    batches = torch.utils.data.DataLoader(TrainingBatches(cfg, train), batch_size=None, shuffle=False,
                                          num_workers=workers, persistent_workers=False)
    t0 = time.time()
    history = []
    bar = tqdm(batches, disable=not progress, desc="train evaluator", total=train.steps)
    for step, (x, t) in enumerate(bar):
        x, t = x.to(device), {k: v.to(device) for k, v in t.items()}
        losses = detection_loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == train.steps - 1:
            row = {k: round(float(v.detach()), 4) for k, v in losses.items()}
            history.append({"step": step, **row})
            bar.set_postfix(loss=row["total"])
    evaluator = Evaluator(model.cpu().eval())
    info = {"steps": train.steps, "batch_size": train.batch_size, "seed": train.seed, "device": device,
            "wall_s": round(time.time() - t0, 1), "history": history}
    if out_dir is not None:
        evaluator.save(out_dir)
        (Path(out_dir) / "train_log.json").write_text(json.dumps({"train": asdict(train), **info}, indent=1) + "\n")
    return evaluator, info


# --------------------------------------------------------------------------------------------
# scoring images against specs
# --------------------------------------------------------------------------------------------

def score_images(images, specs: list[dict], evaluator: Evaluator | None = None, names: list[str] | None = None,
                 batch_size: int = 64) -> list[dict]:
    """Detect objects in each image and apply GenEval's rules to its spec → one record per image."""
    from chorus.world.scoring import evaluate_spec
    if len(images) != len(specs):
        raise ChorusError(f"Got {len(images)} images but {len(specs)} specs; each image needs its spec.")
    evaluator = evaluator or Evaluator.load()
    records = []
    for i in range(0, len(images), batch_size):
        dets = evaluator.detect(images[i:i + batch_size], batch_size=batch_size)
        for j, (d, spec) in enumerate(zip(dets, specs[i:i + batch_size])):
            verdict = evaluate_spec(d, spec)
            rec = {"tag": spec.get("tag", "?"), "split": spec.get("split", "train"), "prompt": spec.get("prompt", ""),
                   "correct": verdict.correct, "reason": "; ".join(verdict.reasons),
                   "detections": [x.to_dict() for x in d]}
            if names is not None:
                rec["file"] = names[i + j]
            records.append(rec)
    return records
