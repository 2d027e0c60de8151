"""PhantomBench: a seeded, deterministic cohort of synthetic CT and MRI cases with tumors.

CT cases come from one continuous torso model (patient RAS+ millimetres, z = 0 near T12/L1) seen
through two fields of view: ``abdomen`` (z from -160 to 96 mm) and ``thorax`` (z from 40 to 296 mm).
Organs are implicit shapes deformed by smooth random fields, with internal structure that a
mean-fill cannot fake: a branching hepatic vessel tree, renal cortex / medulla / sinus fat,
lobulated pancreas with fat clefts and a duct, colon with wall, gas and mottled stool, pulmonary
vessel trees, vertebrae with discs. Intensities are portal-venous HU with per-organ texture, a
partial-volume blur and correlated noise. MRI brain cases start from the real healthy T1 MNI152
template that ships inside nilearn.

Tumors follow six CT appearance models (liver, kidney, pancreas, lung, colon, hepatic vessel) and
one MRI model (brain); each case also keeps the healthy image it was made from (the true
pseudo-healthy target, used by later quality checks).

Organ maps label the organ as if healthy: a tumor lies inside its organ's label and is given
separately as a binary mask. Label ids are in :data:`ORGAN_LABELS`.

Each case's random stream is derived from (seed, case id) alone, so a case does not depend on
which other cases are generated with it, and the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io as _stdio
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..io import CaseRecord, atomic_path, check_same_grid, load_volume, save_volume
from ..vocabulary import CATEGORIES, ORGAN_LABELS, REGION_MODALITY, category_organ_labels, category_region

GENERATOR_VERSION = 1

CT_FOV_MM = np.array([320.0, 320.0, 256.0])
CT_Z_START_MM = {"abdomen": -160.0, "thorax": 40.0}
BRAIN_FOV_MM = np.array([192.0, 228.0, 192.0])
DEFAULT_SHAPE = (128, 128, 64)


@dataclass
class PhantomCase:
    """One generated case: arrays in RAS voxel order plus the affine that places them."""

    case_id: str
    category: str  # a tumor category or "healthy"
    region: str
    image: np.ndarray  # HU for CT, arbitrary units for MRI
    healthy: np.ndarray | None  # the same case before the tumor was inserted (not written to disk)
    organs: np.ndarray  # uint8 label map, ids in ORGAN_LABELS
    tumor: np.ndarray  # uint8 binary
    affine: np.ndarray

    @property
    def modality(self) -> str:
        return REGION_MODALITY[self.region]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    @property
    def tumor_voxels(self) -> int:
        return int(self.tumor.sum())

    def organ_mask(self, category: str | None = None) -> np.ndarray:
        """Boolean mask of the organ region that ``category``'s tumors live in."""
        ids = [ORGAN_LABELS[name] for name in category_organ_labels(category or self.category)]
        return np.isin(self.organs, ids)

    def slab(self, slices: int) -> "PhantomCase":
        """The case cut to ``slices`` axial slices centred on the tumor's busiest slice (the middle one without a
        tumor), the affine moved with it: a quicker case for demonstrations, the same anatomy at the same spacing."""
        depth = self.image.shape[2]
        if not 1 <= slices <= depth:
            raise ValueError(f"a slab needs 1 to {depth} slices (this case's depth), got {slices}")
        per_slice = self.tumor.sum(axis=(0, 1))
        centre = int(per_slice.argmax()) if per_slice.any() else depth // 2
        start = min(max(centre - slices // 2, 0), depth - slices)
        cut = np.s_[:, :, start:start + slices]
        shift = np.eye(4)
        shift[2, 3] = start
        healthy = None if self.healthy is None else self.healthy[cut].copy()
        return PhantomCase(self.case_id, self.category, self.region, self.image[cut].copy(), healthy,
                           self.organs[cut].copy(), self.tumor[cut].copy(), self.affine @ shift)


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode())]))


def generate_case(category: str, index: int = 0, seed: int = 0, shape=DEFAULT_SHAPE, region: str | None = None) -> PhantomCase:
    """Generate one case. ``category`` is a tumor category or ``"healthy"`` (then pass ``region``)."""
    if category not in CATEGORIES and category != "healthy":
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)} or healthy")
    if category == "healthy":
        region = region or "abdomen"
        case_id = f"healthy_{region}_{index:03d}"
    else:
        region = category_region(category)
        case_id = f"{category}_{index:03d}"
    if region not in REGION_MODALITY:
        raise ValueError(f"unknown region {region!r}; choose from {', '.join(REGION_MODALITY)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    rng = case_rng(seed, case_id)
    if region == "brain":
        healthy, organs, grid = _brain_anatomy(rng, shape)
    else:
        grid = _Grid.ct(shape, region)
        healthy, organs, anatomy = _torso_anatomy(rng, grid)
    image = healthy.copy()
    tumor = np.zeros(shape, dtype=bool)
    if category == "brain":
        tumor = _insert_brain_lesion(rng, grid, image, organs)
    elif category != "healthy":
        tumor = LESION_MODELS[category](rng, grid, image, organs, anatomy)
    if region != "brain":
        healthy, image = _ct_acquisition(rng, grid, healthy, image)
    return PhantomCase(case_id, category, region, image.astype(np.float32), healthy.astype(np.float32),
                       organs.astype(np.uint8), tumor.astype(np.uint8), grid.affine)


def cohort_plan(categories, per_category: int, healthy: int) -> list[tuple[str, int, str | None]]:
    """(category, index, region) for every case; healthy cases cycle over the regions in view."""
    plan = [(c, i, None) for c in categories for i in range(per_category)]
    regions = []
    for c in categories:
        r = category_region(c)
        if r not in regions:
            regions.append(r)
    regions = regions or ["abdomen"]
    plan += [("healthy", i, regions[i % len(regions)]) for i in range(healthy)]
    return plan


def write_case(case: PhantomCase, out_dir: str | Path) -> CaseRecord:
    out_dir = Path(out_dir)
    paths = {kind: out_dir / f"{case.case_id}_{kind}.nii.gz" for kind in ("image", "organs", "tumor")}
    save_volume(case.image, case.affine, paths["image"], dtype=np.float32)
    save_volume(case.organs, case.affine, paths["organs"], dtype=np.uint8)
    save_volume(case.tumor, case.affine, paths["tumor"], dtype=np.uint8)
    return CaseRecord(case.case_id, paths["image"], case.modality, case.region, case.category,
                      organs=paths["organs"], tumor=paths["tumor"], tumor_voxels=case.tumor_voxels,
                      spacing=case.spacing, extra={"tumor_labels": [1]})


def read_case(record: CaseRecord) -> PhantomCase:
    """Read a written PhantomBench case back (without its healthy image, which is not written)."""
    image = load_volume(record.image)
    organs = load_volume(record.organs, role="organ map", dtype=np.uint8)
    tumor = load_volume(record.tumor, role="tumor mask", dtype=np.uint8)
    for label in (organs, tumor):
        check_same_grid(image, label)
    return PhantomCase(record.case_id, record.category, record.region, image.array, None, organs.array,
                       tumor.array, image.affine)


def generate_cohort(out_dir, categories=CATEGORIES, per_category: int = 1, healthy: int = 0, seed: int = 0,
                    shape=DEFAULT_SHAPE, progress: bool = True) -> list[CaseRecord]:
    """Generate and write a cohort plus ``cases.csv``; returns the case records."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    records = []
    for category, index, region in tqdm(cohort_plan(categories, per_category, healthy), desc="phantoms",
                                        disable=not progress):
        records.append(write_case(generate_case(category, index, seed, shape, region), out_dir))
    write_cases_csv(records, Path(out_dir) / "cases.csv")
    return records


def write_cases_csv(records: list[CaseRecord], path: Path) -> None:
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "modality", "region", "category", "tumor_voxels", "spacing"])
    for r in records:
        writer.writerow([r.case_id, r.modality, r.region, r.category, r.tumor_voxels,
                         "x".join(f"{s:.4g}" for s in r.spacing)])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray  # world position (mm) of voxel (0, 0, 0)

    @classmethod
    def ct(cls, shape, region: str) -> "_Grid":
        spacing = CT_FOV_MM / np.array(shape)
        origin = np.array([-CT_FOV_MM[0] / 2, -CT_FOV_MM[1] / 2, CT_Z_START_MM[region]]) + spacing / 2
        return cls(tuple(shape), spacing, origin)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag(np.append(self.spacing, 1.0))
        affine[:3, 3] = self.origin
        return affine

    def axis(self, i: int) -> np.ndarray:
        coords = (self.origin[i] + self.spacing[i] * np.arange(self.shape[i])).astype(np.float32)
        return coords.reshape([-1 if j == i else 1 for j in range(3)])

    @property
    def xyz(self):
        return self.axis(0), self.axis(1), self.axis(2)

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        return np.rint((np.asarray(points_mm) - self.origin) / self.spacing).astype(int)

    def to_mm(self, index) -> np.ndarray:
        return self.origin + self.spacing * np.asarray(index)


def _smooth_noise(rng: np.random.Generator, grid: _Grid, scale_mm: float) -> np.ndarray:
    """Unit-variance random field with features of about ``scale_mm`` (coarse noise, upsampled)."""
    coarse = np.maximum(2, np.ceil(np.array(grid.shape) * grid.spacing / scale_mm).astype(int) + 1)
    field = ndimage.zoom(rng.standard_normal(coarse).astype(np.float32), np.array(grid.shape) / coarse, order=1)
    field = field[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipsoid(grid: _Grid, centre, semi_axes, deform: np.ndarray | None = None, amount: float = 0.0) -> np.ndarray:
    """Normalised radius of an axis-aligned ellipsoid (< 1 inside), optionally bumped by a field."""
    x, y, z = grid.xyz
    r = np.sqrt(((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2
                + ((z - centre[2]) / semi_axes[2]) ** 2)
    return r + amount * deform if deform is not None else r


def _polyline(points, step_mm: float = 1.0) -> np.ndarray:
    """Densely resample a polyline through ``points`` (N, 3) mm."""
    points = np.asarray(points, dtype=float)
    out = []
    for a, b in zip(points[:-1], points[1:]):
        n = max(2, int(np.linalg.norm(b - a) / step_mm) + 1)
        out.append(a + (b - a) * np.linspace(0, 1, n, endpoint=False)[:, None])
    out.append(points[-1:])
    return np.concatenate(out)


@dataclass
class _Tubes:
    """Distance to a set of centrelines, and which centreline point is nearest (for radii, arc length)."""

    distance: np.ndarray  # mm
    nearest: np.ndarray  # index into the point list, -1 where no point is rasterised
    points: np.ndarray


def _tubes(grid: _Grid, centrelines: list[np.ndarray]) -> _Tubes:
    points = np.concatenate(centrelines)
    index = grid.to_index(points)
    inside = np.all((index >= 0) & (index < np.array(grid.shape)), axis=1)
    seeds = np.full(grid.shape, -1, dtype=np.int64)
    # later points overwrite earlier ones in the same voxel: fine, they are within a voxel
    seeds[tuple(index[inside].T)] = np.flatnonzero(inside)
    if not inside.any():
        return _Tubes(np.full(grid.shape, np.inf, np.float32), seeds, points)
    distance, nearest_voxel = ndimage.distance_transform_edt(seeds < 0, sampling=grid.spacing, return_indices=True)
    return _Tubes(distance.astype(np.float32), seeds[tuple(nearest_voxel)], points)


def _branching_tree(rng, start, direction, length, radius, depth, spread_deg=35.0):
    """Random branching centrelines: lists of points (mm) and matching radii."""
    segments, radii = [], []
    stack = [(np.asarray(start, float), np.asarray(direction, float) / np.linalg.norm(direction), length, radius, depth)]
    while stack:
        p, d, length, r, level = stack.pop()
        bend = rng.normal(0, 0.15, 3)
        end = p + length * (d + bend) / np.linalg.norm(d + bend)
        seg = _polyline([p, (p + end) / 2 + rng.normal(0, length * 0.08, 3), end])
        segments.append(seg)
        radii.append(np.linspace(r, r * 0.8, len(seg)))
        if level > 0:
            for _ in range(2):
                axis = rng.normal(size=3)
                axis -= axis.dot(d) * d
                axis /= np.linalg.norm(axis) + 1e-9
                angle = np.deg2rad(rng.uniform(0.6, 1.3) * spread_deg)
                new_d = np.cos(angle) * d + np.sin(angle) * axis
                stack.append((end, new_d, length * rng.uniform(0.6, 0.8), r * 0.72, level - 1))
    return segments, radii


def _pick_point(rng, grid: _Grid, mask: np.ndarray, min_depth_mm: float = 0.0, max_depth_mm: float = np.inf):
    """A random voxel of ``mask`` whose distance to the mask's border is in the given range (mm)."""
    depth = ndimage.distance_transform_edt(mask, sampling=grid.spacing)
    candidates = np.argwhere((depth >= min_depth_mm) & (depth <= max_depth_mm) & mask)
    if len(candidates) == 0:  # a small organ at coarse resolution: fall back to its deepest voxels
        candidates = np.argwhere((depth >= depth.max() * 0.7) & mask)
    return grid.to_mm(candidates[rng.integers(len(candidates))]), depth


# --------------------------------------------------------------------------------------------
# CT torso
# --------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """Per-case anatomy that lesion models need besides the label map."""

    cavity: np.ndarray
    hu: dict
    texture: np.ndarray
    vessel_tubes: _Tubes
    pancreas_line: np.ndarray
    colon_tube: _Tubes
    colon_radius: float


def _torso_anatomy(rng, grid: _Grid):
    x, y, z = grid.xyz
    shape_field = _smooth_noise(rng, grid, 40.0)
    texture = _smooth_noise(rng, grid, 6.0)
    jitter = lambda s: rng.normal(0, s, 3)  # noqa: E731 - a tiny local helper reads better here
    size = lambda: rng.uniform(0.88, 1.12)  # noqa: E731
    hu = {
        "fat": rng.uniform(-110, -90), "muscle": rng.uniform(48, 60), "liver": rng.uniform(95, 115),
        "spleen": rng.uniform(105, 120), "cortex": rng.uniform(160, 190), "medulla": rng.uniform(85, 105),
        "pancreas": rng.uniform(85, 100), "blood": rng.uniform(150, 180), "portal": rng.uniform(140, 170),
        "lung": rng.uniform(-880, -840), "myocardium": rng.uniform(80, 100),
    }
    hu_map = np.full(grid.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(mask, value, label=None):
        # masks and values may be broadcastable coordinate expressions, not full volumes
        mask = np.broadcast_to(mask, grid.shape)
        hu_map[mask] = np.broadcast_to(value, grid.shape)[mask]
        if label is not None:
            labels[mask] = ORGAN_LABELS[label]

    # body outline: an elliptic cylinder, wider in the thorax, flatter at the back, skin bumps
    ax, ay = 150 * size(), 108 * size()
    ax_z = ax + 8 * np.tanh((z - 60) / 40)
    body_r = np.sqrt((x / ax_z) ** 2 + (y / ay) ** 2) + 0.02 * shape_field
    back = -0.88 * ay  # the back lies flat on the table
    body = (body_r < 1.0) & (y > back)
    skin_depth = ndimage.distance_transform_edt(body, sampling=grid.spacing).astype(np.float32)
    fat_thickness = rng.uniform(12, 32) * (1 + 0.35 * shape_field)
    paint(body, hu["muscle"] - 10.0, "muscle")  # skin
    paint(body & (skin_depth > 2), hu["fat"] + 8 * texture, "fat")
    wall = body & (skin_depth > 2 + fat_thickness)
    paint(wall, hu["muscle"] + 6 * texture, "muscle")
    cavity = body & (skin_depth > 12 + fat_thickness)
    paint(cavity, hu["fat"] + 12 * texture, "fat")  # visceral fat; organs are painted over it

    # spine: vertebral bodies with cortex, discs, canal, posterior elements; paraspinal muscles
    yb = back + 58
    paraspinal = ((np.abs(x) - 32) / 28) ** 2 + ((y - (yb - 48)) / 24) ** 2 < 1
    paint(paraspinal & body, hu["muscle"] + 5 * texture, "muscle")
    psoas_r = np.clip((20 - z) / 170, 0, 1) * 24 + 1e-3
    psoas = ((np.abs(x) - 30 - psoas_r * 0.6) / (psoas_r * 1.1)) ** 2 + ((y - (yb + 2)) / psoas_r) ** 2 < 1
    paint(psoas & cavity & (z < 20), hu["muscle"] + 5 * texture, "muscle")
    vb = (x / 24) ** 2 + ((y - yb) / 19) ** 2
    level = np.cos(2 * np.pi * (z - rng.uniform(0, 32)) / 32)  # +1 at discs, -1 mid-vertebra
    disc = level > 0.88
    paint(vb < 1, 240 + 25 * texture, "bone")
    paint((vb < 1) & (vb > 0.78), 650.0)
    paint((vb < 1) & disc, 90.0 + 5 * texture)
    spinous = (np.abs(x) < 5) & (y < yb - 30) & (y > yb - 52 + 8 * level)
    transverse = (np.abs(x) < 38) & (np.abs(y - (yb - 30)) < 5) & (level < -0.5)
    posterior = spinous | transverse
    paint(posterior & body, 450.0 + 40 * texture, "bone")
    canal = (x / 9) ** 2 + ((y - (yb - 30)) / 8) ** 2 < 1
    paint(canal, 15.0, "bone")

    # ribs: arcs in the inner body wall, sloping down anteriorly, spaced along z
    angle = np.arctan2(y, x)  # 0 = patient right, pi/2 = anterior
    from_back = np.abs(angle + np.pi / 2)  # angular distance from the spine: 0 at the back
    from_back = np.minimum(from_back, 2 * np.pi - from_back)
    rib_phase = (z + 28 * (1 - np.cos(np.minimum(from_back, 2.4))) / 2 - rng.uniform(0, 28)) % 28
    rib_depth = skin_depth - fat_thickness
    ribs = body & (rib_phase < 8) & (rib_depth > 3) & (rib_depth < 13) & (from_back > 0.35) & (from_back < 2.3) & (z > -50)
    paint(ribs, 350.0 + 200 * (np.abs(rib_phase - 4) > 2.5), "bone")

    # diaphragm height, right dome higher; posterior recesses deeper
    dome = 96 + 6 * np.tanh(x / 40) - 0.002 * x**2 - 0.0035 * np.minimum(y, 0) ** 2 - 0.001 * np.maximum(y, 0) ** 2
    below_diaphragm = z < dome + jitter(4)[0]

    # great vessels as tubes: aorta (abdominal, descending, arch, ascending) and IVC
    aorta_path = _polyline([(-12, yb + 30, -260), (-16, yb + 30, 100), (-24, yb + 26, 235), (-8, 5, 262),
                            (6, 32, 240), (8, 34, 145)], 2.0)
    ivc_path = _polyline([(24, yb + 30, -260), (22, yb + 34, 40), (18, -12, 100), (12, 15, 118)], 2.0)
    vessels = _tubes(grid, [aorta_path, ivc_path])
    is_aorta = vessels.nearest < len(aorta_path)
    radius = np.where(is_aorta, np.where(vessels.points[vessels.nearest, 2] > 140, 15, 11), 12)
    great = (vessels.distance < radius) & body
    paint(great & is_aorta, hu["blood"] + 4 * texture, "aorta")
    paint(great & ~is_aorta, hu["blood"] - 15 + 4 * texture, "inferior_vena_cava")

    # kidneys: cortex shell, medullary pyramids, sinus fat at the medial hilum
    for side, label, zc in ((1, "kidney_right", -25), (-1, "kidney_left", -10)):
        c = np.array([side * 62, yb + 12, zc]) + jitter(5)
        semi = np.array([26, 22, 52]) * size()
        r = _ellipsoid(grid, c, semi, shape_field, 0.05)
        kidney = (r < 1) & cavity
        medial = side * (x - c[0]) < -semi[0] * 0.25
        sinus = kidney & (r < 0.55) & medial
        pyramids = kidney & (r < 0.78) & (np.cos(3.2 * np.pi * (z - c[2]) / semi[2] + side) > 0.0) & ~sinus
        paint(kidney, hu["cortex"] + 8 * texture, label)
        paint(pyramids, hu["medulla"] + 6 * texture)
        paint(sinus, hu["fat"] + 30 + 20 * texture)
        paint(sinus & (r < 0.25), 10.0)  # renal pelvis (urine)

    # liver: right lobe plus a left lobe across the midline, under the right dome
    c_right = np.array([58, 5, 35]) + jitter(6)
    r_right = _ellipsoid(grid, c_right, np.array([72, 82, 72]) * size(), shape_field, 0.06)
    c_left = np.array([-15, 40, 55]) + jitter(6)
    r_left = _ellipsoid(grid, c_left, np.array([55, 38, 35]) * size(), shape_field, 0.06)
    liver = (np.minimum(r_right, r_left) < 1) & cavity & below_diaphragm & ~great
    paint(liver, hu["liver"] + 7 * texture, "liver")

    # hepatic vessels: a portal tree from the hilum, a hepatic-vein tree toward the IVC
    hilum = np.array([30, 10, 25]) + jitter(4)
    segs, rads = _branching_tree(rng, hilum, (1, -0.2, 0.5), 35, 6.5, 3)
    segs2, rads2 = _branching_tree(rng, (20, -8, 92), (0.6, 0.8, -0.6), 40, 6.0, 3)
    tree = _tubes(grid, segs + segs2)
    tree_radius = np.concatenate(rads + rads2)[tree.nearest]
    hepatic_vessels = liver & (tree.distance < tree_radius)
    paint(hepatic_vessels, hu["portal"] + 5 * texture, "hepatic_vessels")

    # spleen: posterior left, crescent-like (an ellipsoid minus a medial bite)
    c = np.array([-82, -30, 45]) + jitter(6)
    r = _ellipsoid(grid, c, np.array([28, 55, 50]) * size(), shape_field, 0.05)
    bite = _ellipsoid(grid, c + np.array([28, 30, 0]), np.array([30, 35, 60])) < 1
    spleen = (r < 1) & ~bite & cavity & below_diaphragm & (labels == ORGAN_LABELS["fat"])
    paint(spleen, hu["spleen"] + 6 * texture, "spleen")

    # pancreas: head by the duodenum, body over the aorta, tail to the splenic hilum; lobulated
    pancreas_line = _polyline([(30, 12, -28), (10, 22, -12), (-20, 18, -2), (-50, 5, 8), (-68, -8, 18)], 1.5)
    pancreas_line = pancreas_line + jitter(5)
    pan = _tubes(grid, [pancreas_line])
    thickness = np.interp(np.arange(len(pancreas_line)), [0, len(pancreas_line) - 1], [14, 9])[pan.nearest] * size()
    pancreas = (pan.distance < thickness * (1 + 0.15 * shape_field)) & cavity & (labels == ORGAN_LABELS["fat"])
    paint(pancreas, hu["pancreas"] + 6 * texture, "pancreas")
    paint(pancreas & (texture > 1.1), hu["fat"] + 40)  # interlobular fat clefts
    paint(pancreas & (pan.distance < 1.6), 15.0)  # main duct

    # colon: caecum, ascending, transverse (sagging, anterior), descending, sigmoid
    colon_line = _polyline([(66, -5, -200), (68, -8, -120), (70, -5, -75), (55, 30, -62), (10, 60, -85),
                            (-40, 55, -65), (-72, 10, -40), (-78, -12, -90), (-70, -5, -150), (-30, 20, -185)], 1.5)
    colon_line = colon_line + jitter(6)
    colon_radius = rng.uniform(17, 23)
    colon_tube = _tubes(grid, [colon_line])
    colon_r = colon_radius * (1 + 0.12 * shape_field)
    colon = (colon_tube.distance < colon_r) & cavity & np.isin(labels, [ORGAN_LABELS["fat"], ORGAN_LABELS["muscle"]])
    lumen = colon & (colon_tube.distance < colon_r - 3)
    centre_y = colon_tube.points[colon_tube.nearest, 1]
    gas = lumen & (y - centre_y > rng.uniform(-6, 4))  # gas rises anteriorly (patient supine)
    stool = lumen & ~gas
    paint(colon, hu["muscle"] - 10 + 5 * texture, "colon")
    paint(stool, np.where(texture > 0.7, -750.0, 20.0 + 45 * texture))
    paint(gas, -980.0)

    # thorax: lungs above the diaphragm, heart on the left dome, pulmonary vessel trees
    heart_c = np.array([-22, 28, dome.max() + 55]) + jitter(6)
    r_heart = _ellipsoid(grid, heart_c, np.array([62, 50, 58]) * size(), shape_field, 0.03)
    heart = (r_heart < 1) & cavity & ~below_diaphragm & ~great
    mediastinum = (np.abs(x + 2) < 24) & (y > yb - 10) & ~below_diaphragm & cavity
    thoracic = cavity & ~below_diaphragm & ~heart & ~mediastinum & (labels == ORGAN_LABELS["fat"])
    density = hu["lung"] + 30 * np.clip(-y / 100, -1, 1) + 12 * texture  # dependent lung is denser
    paint(thoracic & (x >= 0), density, "lung_right")
    paint(thoracic & (x < 0), density, "lung_left")
    paint(mediastinum & (labels == ORGAN_LABELS["fat"]), hu["fat"] + 10 * texture)
    paint(heart, hu["myocardium"] + 6 * texture, "heart")
    paint(heart & (r_heart < 0.72), hu["blood"] + 6 * texture)
    lung_segs, lung_rads = [], []
    for side in (1, -1):
        s, r = _branching_tree(rng, (side * 35, -5, dome.max() + 80), (side, -0.2, -0.3), 45, 5.5, 4, 40)
        lung_segs += s
        lung_rads += r
    lung_tree = _tubes(grid, lung_segs)
    lungs = np.isin(labels, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])
    paint(lungs & (lung_tree.distance < np.concatenate(lung_rads)[lung_tree.nearest]), 40.0 + 10 * texture)

    anatomy = _Anatomy(cavity, hu, texture, tree, pancreas_line, colon_tube, colon_radius)
    return hu_map, labels, anatomy


def _ct_acquisition(rng, grid: _Grid, healthy: np.ndarray, image: np.ndarray):
    """Partial-volume blur and correlated quantum noise, identical for the healthy and tumor images."""
    sigma = 0.9 / grid.spacing * np.array([1.0, 1.0, 1.2])
    noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), 0.6)
    noise *= rng.uniform(9, 14) / (noise.std() + 1e-6)
    out = []
    for volume in (healthy, image):
        blurred = ndimage.gaussian_filter(volume, sigma) + noise
        out.append(np.clip(blurred, -1024, 3071))
    return out


# --------------------------------------------------------------------------------------------
# CT lesion models: each modifies ``image`` in place and returns the tumor mask
# --------------------------------------------------------------------------------------------


def _lesion_shape(rng, grid: _Grid, centre, radius, irregularity: float, scale_mm: float = 8.0):
    """Normalised radius of a lobulated blob (< 1 inside) and its local texture field."""
    field = _smooth_noise(rng, grid, scale_mm)
    return _ellipsoid(grid, centre, radius * rng.uniform(0.8, 1.2, 3), field, irregularity), field


def _liver_lesion(rng, grid, image, labels, anatomy):
    liver = np.isin(labels, [ORGAN_LABELS["liver"], ORGAN_LABELS["hepatic_vessels"]])
    radius = rng.uniform(9, 24)
    centre, _ = _pick_point(rng, grid, liver, min_depth_mm=radius * 0.8)
    r, field = _lesion_shape(rng, grid, centre, radius, 0.08)
    tumor = (r < 1) & liver
    value = anatomy.hu["liver"] - rng.uniform(40, 65) + 8 * field  # hypodense metastasis / HCC washout
    image[tumor] = value[tumor]
    if rng.random() < 0.6:  # rim enhancement
        rim = tumor & (r > 0.9)
        image[rim] = anatomy.hu["liver"] + rng.uniform(10, 30)
    return tumor


def _hepatic_vessel_lesion(rng, grid, image, labels, anatomy):
    vessels = labels == ORGAN_LABELS["hepatic_vessels"]
    liver = labels == ORGAN_LABELS["liver"]
    centre, _ = _pick_point(rng, grid, vessels if vessels.any() else liver)  # centred on a vessel branch
    radius = rng.uniform(10, 18)
    r, field = _lesion_shape(rng, grid, centre, radius, 0.3, 5.0)  # ill-defined, infiltrative margin
    tumor = (r < 1) & liver  # the vessel itself stays a vessel: the lesion encases it
    value = anatomy.hu["liver"] - rng.uniform(22, 35) + 10 * field
    image[tumor] = value[tumor]
    return tumor


def _kidney_lesion(rng, grid, image, labels, anatomy):
    label = ORGAN_LABELS["kidney_right" if rng.random() < 0.5 else "kidney_left"]
    kidney = labels == label
    radius = rng.uniform(11, 24)
    centre, _ = _pick_point(rng, grid, kidney, min_depth_mm=0.3 * radius, max_depth_mm=0.6 * radius)  # exophytic
    r, field = _lesion_shape(rng, grid, centre, radius, 0.08)
    may_grow = kidney | (labels == ORGAN_LABELS["fat"]) & anatomy.cavity
    tumor = (r < 1) & may_grow
    value = rng.uniform(95, 135) + 30 * field  # heterogeneous enhancing renal cell carcinoma
    image[tumor] = value[tumor]
    necrosis = tumor & (r < rng.uniform(0.35, 0.55))
    image[necrosis] = 25.0 + 8 * field[necrosis]
    return tumor


def _pancreas_lesion(rng, grid, image, labels, anatomy):
    pancreas = labels == ORGAN_LABELS["pancreas"]
    line = anatomy.pancreas_line
    at = int(rng.integers(len(line) // 6, len(line) * 2 // 3))
    inside = pancreas[tuple(np.clip(grid.to_index(line[at]), 0, np.array(grid.shape) - 1))]
    centre = line[at] if inside else _pick_point(rng, grid, pancreas)[0]
    radius = rng.uniform(9, 16)
    r, field = _lesion_shape(rng, grid, centre, radius, 0.35, 5.0)
    region = ndimage.binary_dilation(pancreas, iterations=1)
    tumor = (r < 1) & region & ~np.isin(labels, [ORGAN_LABELS["aorta"], ORGAN_LABELS["inferior_vena_cava"]])
    value = anatomy.hu["pancreas"] - rng.uniform(30, 45) + 8 * field  # hypoattenuating adenocarcinoma
    image[tumor] = value[tumor]
    # upstream (tail-side) duct dilation, a classic secondary sign; not part of the tumor label
    duct = _tubes(grid, [line[at:]])
    dilated = pancreas & ~tumor & (duct.distance < rng.uniform(2.5, 3.5))
    image[dilated] = 8.0
    return tumor


def _lung_lesion(rng, grid, image, labels, anatomy):
    lungs = np.isin(labels, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])
    radius = rng.uniform(6, 18)
    centre, _ = _pick_point(rng, grid, lungs, min_depth_mm=radius * 0.7)
    x, y, z = grid.xyz
    offset = [x - centre[0], y - centre[1], z - centre[2]]
    distance = np.sqrt(sum(o**2 for o in offset)) + 1e-6
    spikes = np.zeros(grid.shape, dtype=np.float32)
    for _ in range(int(rng.integers(8, 15))):  # spiculation: thin radial extensions
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        cosine = sum(o * di for o, di in zip(offset, d)) / distance
        spikes = np.maximum(spikes, np.clip(cosine, 0, 1) ** 40)
    extent = radius * (1 + rng.uniform(0.5, 1.0) * spikes)
    field = _smooth_noise(rng, grid, 4.0)
    tumor = (distance / extent + 0.06 * field < 1) & lungs
    value = rng.uniform(25, 45) + 10 * field  # solid soft-tissue nodule in air
    image[tumor] = value[tumor]
    return tumor


def _colon_lesion(rng, grid, image, labels, anatomy):
    colon = labels == ORGAN_LABELS["colon"]
    tube = anatomy.colon_tube
    in_view = np.unique(tube.nearest[colon])
    at = int(rng.choice(in_view))
    along = np.abs(tube.nearest - at) * 1.5  # arc length in mm (points are 1.5 mm apart)
    length = rng.uniform(15, 35)
    thickness = rng.uniform(8, 14)
    x, y, z = grid.xyz
    centre = tube.points[at]
    radial = np.stack(np.broadcast_arrays(x - centre[0], y - centre[1], z - centre[2]))
    side = rng.normal(size=3)
    field = _smooth_noise(rng, grid, 5.0)
    annular = rng.random() < 0.4  # "apple core" circumferential vs a focal polypoid mass
    sector = np.ones(grid.shape, bool) if annular else np.tensordot(side, radial, axes=1) > 0
    tumor = colon & (along < length / 2) & (tube.distance > anatomy.colon_radius - 3 - thickness) & sector
    value = rng.uniform(50, 70) + 8 * field  # enhancing soft tissue replacing gas and stool
    image[tumor] = value[tumor]
    return tumor


LESION_MODELS = {
    "liver": _liver_lesion,
    "hepatic_vessel": _hepatic_vessel_lesion,
    "kidney": _kidney_lesion,
    "pancreas": _pancreas_lesion,
    "lung": _lung_lesion,
    "colon": _colon_lesion,
}


# --------------------------------------------------------------------------------------------
# MRI brain: the MNI152 template (real healthy T1) with a random pose, bias field and Rician noise
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mni152():
    """T1 template and tissue probabilities (1 mm), read from the files inside nilearn."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    return (np.asarray(t1.get_fdata(), np.float32), np.asarray(gm.get_fdata(), np.float32),
            np.asarray(wm.get_fdata(), np.float32), t1.affine)


def _brain_anatomy(rng, shape):
    t1, gm, wm, template_affine = _mni152()
    spacing = BRAIN_FOV_MM / np.array(shape)
    origin = -BRAIN_FOV_MM / 2 + spacing / 2 + np.array([0.0, -18.0, 18.0])
    grid = _Grid(tuple(shape), spacing, origin)
    # random rigid pose and scale: world point of an output voxel -> template voxel
    angles = np.deg2rad(rng.normal(0, 4, 3))
    rotation = _rotation(angles) * rng.uniform(0.94, 1.06)
    shift = rng.normal(0, 4, 3)
    out_to_world = grid.affine
    world_to_template = np.linalg.inv(template_affine)
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = shift
    matrix = world_to_template @ pose @ out_to_world
    resample = lambda vol: ndimage.affine_transform(vol, matrix[:3, :3], matrix[:3, 3], output_shape=shape,  # noqa: E731
                                                    order=1, mode="constant", cval=0.0)
    t1_out, gm_out, wm_out = resample(t1), resample(gm), resample(wm)
    brain = (gm_out + wm_out > 0.35) | (ndimage.binary_fill_holes(gm_out + wm_out > 0.35))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[brain] = ORGAN_LABELS["csf"]
    labels[brain & (gm_out >= wm_out) & (gm_out > 0.35)] = ORGAN_LABELS["gray_matter"]
    labels[brain & (wm_out > gm_out) & (wm_out > 0.35)] = ORGAN_LABELS["white_matter"]
    scale = rng.uniform(800, 1200)
    image = t1_out * scale
    image *= 1 + 0.08 * _smooth_noise(rng, grid, 80.0)  # receive-coil bias field
    sigma = rng.uniform(0.015, 0.03) * scale
    real = image + rng.normal(0, sigma, shape)
    imag = rng.normal(0, sigma, shape)
    image = np.sqrt(real**2 + imag**2).astype(np.float32)  # magnitude images have Rician noise
    return image, labels, grid


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _insert_brain_lesion(rng, grid, image, labels):
    """Glioma-like lesion: T1-hypointense necrotic core, isointense rim, faint edema (all labelled)."""
    white = labels == ORGAN_LABELS["white_matter"]
    brain = labels > 0
    radius = rng.uniform(10, 22)
    centre, _ = _pick_point(rng, grid, white, min_depth_mm=2.0)
    r, field = _lesion_shape(rng, grid, centre, radius, 0.12, 10.0)
    wm_level = float(np.median(image[white]))
    tumor = (r < 1.35) & brain
    edema = tumor & (r >= 1.0)
    rim = tumor & (r < 1.0) & (r >= 0.6)
    core = tumor & (r < 0.6)
    image[edema] *= 0.85
    image[rim] = wm_level * (0.78 + 0.06 * field[rim])
    image[core] = wm_level * (0.38 + 0.05 * field[core])
    return tumor
