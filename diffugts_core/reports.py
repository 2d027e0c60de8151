"""What `diffugts segment` writes, and its batch jobs: the mask in the input's grid, the JSON report (versions,
weights' sha256, thresholds and their provenance, timings, peak memory, plausibility warnings), a QC picture and, if
asked, every intermediate map; and the cases of one run (a NIfTI file, a folder of them or a CSV).

Light on purpose (no torch): the CLI names every output path from here and checks it before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np

from .io import InputError, Volume


def intermediate_names(seeds: int) -> tuple[str, ...]:
    """The intermediate maps a run with ``seeds`` inpainting samples has (the uncertainty needs two or more)."""
    names = ("anomaly", "organ_probability", "regions", "roi", "pseudo_healthy", "pixel_residual", "feature_residual",
             "refined_probability", "fusion")
    return names + ("uncertainty",) if seeds > 1 else names


def segmentation_report(pipeline, result, *, image: Path | None = None, seed: int = 0) -> dict:
    """What produced a mask (``result``, a ``SegmentationResult`` of the ``DiffuGTSPipeline`` ``pipeline``):
    versions, model sha256s, seed, thresholds and their provenance, timings, peak memory, warnings."""
    import importlib.metadata as metadata
    import resource

    spacing = np.abs(np.linalg.det(result.affine[:3, :3]))
    return {
        "image": None if image is None else str(image), "organ": result.organ, "prompt": result.prompt,
        "versions": {name: metadata.version(name)
                     for name in ("diffugts-core", "torch", "diffusers", "transformers", "numpy")},
        "weights_sha256": pipeline.weights_sha256(), "setting": pipeline.heads.setting,
        "seen": list(pipeline.heads.seen),
        "seed": seed, "seeds": result.seeds, "thresholds": result.thresholds,
        "regions": [{"voxels": r.voxels, "mean_s": r.mean_s, "probability": r.probability,
                     "kept": r.probability >= pipeline.heads.thresholds.region} for r in result.detection.regions],
        "roi_voxels": int(result.residuals.roi.sum()), "mask_voxels": int(result.mask.sum()),
        "mask_ml": float(result.mask.sum() * spacing / 1000.0),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "total_s": round(sum(result.timings.values()), 3),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(pipeline.backbone.device),
        "organ_region_voxels": int(result.detection.organ_region.sum()),
        "warnings": list(result.warnings),
    }


def write_segmentation(pipeline, result, mask_path: Path, *,
                       image: Path | None = None, report: Path | None = None, png: Path | None = None,
                       intermediates: Path | None = None, protect=(), seed: int = 0, modality: str = "CT",
                       truth: np.ndarray | None = None) -> list[Path]:
    """Write the mask (input grid and affine), the JSON report, a QC picture and, if asked, every intermediate.

    Every file is written atomically; a path among ``protect`` (the inputs) is never overwritten."""
    import json

    from . import viz
    from .io import save_volume, write_text_atomic

    paths = segmentation_outputs(mask_path, report=report, png=png, intermediates=intermediates, seeds=result.seeds)
    written = [save_volume(result.mask, result.affine, mask_path, protect=protect)]
    for name, array in result.intermediates.items() if intermediates is not None else ():
        data = result.to_input_grid(array)
        written.append(save_volume(data.astype(np.uint8 if data.dtype == bool else np.float32), result.affine,
                                   paths[name], protect=protect))
    data = segmentation_report(pipeline, result, image=image, seed=seed)
    written.append(write_text_atomic(paths["report"], json.dumps(data, indent=2) + "\n"))
    stem = mask_path.name.removesuffix(".gz").removesuffix(".nii")
    residual = np.abs(result.image - result.residuals.healthy)
    figure = viz.montage(result.image, modality=modality, tumor=result.refined,
                         images={"pseudo-healthy": result.residuals.healthy},
                         maps={"S": result.aova.anomaly, "|I - H| / 200": np.clip(residual / 200, 0, 1),
                               "refined p": result.probability}, truth=truth,
                         title=f"{stem}: {result.organ}, mask in red"
                         + ("; truth in cyan" if truth is not None else ""))
    written.append(viz.save_figure(figure, paths["png"]))
    return written


def segmentation_outputs(mask_path: Path, *, report: Path | None = None, png: Path | None = None,
                         intermediates: Path | None = None, seeds: int = 1) -> dict[str, Path]:
    """Every file :func:`write_segmentation` writes beside a mask, by role: "report", "png" (by default beside the
    mask) and one per intermediate map when ``intermediates`` names a folder."""
    stem = Path(mask_path).name.removesuffix(".gz").removesuffix(".nii")
    paths = {"report": report or Path(mask_path).with_name(f"{stem}_report.json"),
             "png": png or Path(mask_path).with_name(f"{stem}_qc.png")}
    if intermediates is not None:
        paths.update({name: Path(intermediates) / f"{stem}_{name}.nii.gz" for name in intermediate_names(seeds)})
    return paths


@dataclass
class SegmentJob:
    """One case of `diffugts segment`: where its image is, what to look for, where its mask goes."""

    case_id: str
    image: Path
    organ: str
    modality: str
    mask: Path
    organ_mask: Path | None = None

    def load(self) -> tuple[Volume, Volume | None]:
        """The image and organ mask, checked (a bad file raises ``InputError`` naming it)."""
        from .io import load_volume

        organ_mask = load_volume(self.organ_mask, role="organ mask", dtype=np.uint8) if self.organ_mask else None
        return load_volume(self.image), organ_mask

    def outputs(self, *, report=None, png=None, intermediates=None, seeds: int = 1) -> dict[str, Path]:
        """Every file a run writes beside the mask (see :func:`segmentation_outputs`)."""
        return segmentation_outputs(self.mask, report=report, png=png, intermediates=intermediates, seeds=seeds)

    def run(self, pipeline, *, inputs=None, prompt=None, seeds=1, seed=0, method="head", report=None,
            png=None, intermediates=None, progress=False) -> list[Path]:
        volume, organ_mask = inputs or self.load()
        result = pipeline(volume, self.organ, modality=self.modality, prompt=prompt, organ_mask=organ_mask,
                          seeds=seeds, seed=seed, method=method, progress=progress)
        return write_segmentation(pipeline, result, self.mask, image=self.image, report=report, png=png,
                                  intermediates=intermediates, protect=[p for p in (self.image, self.organ_mask) if p],
                                  seed=seed, modality=self.modality)


def segment_cases(source: Path, *, organ: str | None, modality: str = "CT", organ_mask: Path | None = None,
                  out: Path) -> list[SegmentJob]:
    """The cases of `diffugts segment`: one NIfTI file, a folder of them, or a CSV (image, organ[, modality,
    organ_mask, case_id]; relative paths are relative to the CSV's folder)."""
    import csv

    from .io import is_nifti_path, nifti_files

    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: not found; pass a NIfTI volume (.nii or .nii.gz), a folder of them, "
                         "or a CSV of cases")

    def stem(path: Path) -> str:
        return path.name.removesuffix(".gz").removesuffix(".nii")

    def mask_path(case_id: str) -> Path:
        return Path(out) / f"{case_id}_mask.nii.gz"

    def need_organ(value, where: str) -> str:
        if not value:
            raise InputError(f"no organ for {where}; pass --organ (e.g. liver, lung, colon, brain)")
        return value

    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "image" not in rows[0]:
            raise InputError(f"{source}: a case CSV needs a header with an 'image' column (and 'organ' unless --organ "
                             "is given); optional: modality, organ_mask, case_id")
        jobs = []
        for row in rows:
            image = source.parent / row["image"]
            case_id = row.get("case_id") or stem(image)
            mask = row.get("organ_mask")
            jobs.append(SegmentJob(case_id, image, need_organ(row.get("organ") or organ, f"{case_id} in {source}"),
                                   (row.get("modality") or modality).upper(), mask_path(case_id),
                                   source.parent / mask if mask else None))
        return jobs
    if source.is_dir():
        if organ_mask is not None:
            raise InputError("--organ-mask names one mask; for a folder of cases use a CSV with an organ_mask column")
        images = nifti_files(source)
        if not images:
            raise InputError(f"{source}: no .nii or .nii.gz files in this folder")
        return [SegmentJob(stem(p), p, need_organ(organ, str(source)), modality, mask_path(stem(p))) for p in images]
    if not is_nifti_path(source):
        raise InputError(f"{source}: not a NIfTI file (.nii or .nii.gz), a folder or a .csv of cases")
    single = Path(out) if str(out).endswith((".nii", ".nii.gz")) else mask_path(stem(source))
    return [SegmentJob(stem(source), source, need_organ(organ, str(source)), modality, single, organ_mask)]
