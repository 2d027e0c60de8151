"""``diffugts check-foundation``: what the frozen model can do, measured on held-out healthy phantoms.

1. VAE reconstruction: MAE in HU inside the body and inside each organ, PSNR (model space, range 2).
2. Healthy inpainting: mask a disk of healthy liver, inpaint, MAE of the smoothed result against the
   truth, beside the MAE of filling the disk with the body's mean.
3. Pseudo-healthy: a synthetic tumor 40 HU below its organ, inpainted inside the tumor dilated by a
   margin; the mean HU inside the tumor for the input I, the pseudo-healthy H and the true healthy
   organ; the ratio |H - healthy| / |I - healthy| must be <= 0.25 in the liver, spleen, kidney and
   pancreas of two held-out cases. Beside it, the same ratio for filling the tumor with the mean of
   the organ around it: the organ's structure hidden under the tumor (the kidney's medulla and sinus
   fat, the pancreatic duct) that no fill from the surroundings can know, only a model of the organ.
4. Per-stage times for one 64-slice volume.
Held-out means a PhantomBench seed the training never used (training uses seed 1000).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from ..data import phantoms
from ..io import InputError
from ..inpaint import InpaintConfig, enlarge_mask, healthy_conditioning, pseudo_healthy
from ..metrics import dice
from ..vocabulary import ORGAN_LABELS, conditioning_organ_index

# the pass/fail test: a tumor inpainted back toward its organ, in each (the kidney and pancreas are 2-4 latent cells
# across on a 10 mm grid, which is what v2's 5 mm grid and organ map are for)
PSEUDO_HEALTHY_ORGANS = ("liver", "spleen", "kidney_right", "pancreas")
TUMOR_CONTRAST_HU = -40.0
RATIO_LIMIT = 0.25


def _ball(shape, centre, radius_mm, spacing) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


def reconstruct(backbone, image: np.ndarray, modality: str, batch: int = 32) -> tuple[np.ndarray, float]:
    """E then D on every slice: the reconstructed volume (image units) and the PSNR in model space (range 2)."""
    intensity = backbone.intensity(modality, image)
    x = backbone.volume_to_slices(intensity.forward(image))
    decoded = torch.cat([backbone.decode(backbone.encode(x[i:i + batch])).cpu() for i in range(0, len(x), batch)])
    model_in, model_out = backbone.slices_to_volume(x), backbone.slices_to_volume(decoded)
    mse = float(((model_out - model_in) ** 2).mean())
    return intensity.inverse(model_out), float(10 * np.log10(4.0 / max(mse, 1e-12)))


def insert_test_tumor(case, organ: str, radius_mm: float = 12.0, contrast_hu: float = TUMOR_CONTRAST_HU):
    """A ball at the organ's deepest point, ``contrast_hu`` off the healthy image (texture kept): (image, tumor).

    The radius is at most half the organ's depth there, so organ tissue remains around the tumor
    (a tumor that replaces the whole organ leaves nothing to inpaint it from).
    """
    inside = case.organs == ORGAN_LABELS[organ]
    depth = ndimage.distance_transform_edt(inside, sampling=case.spacing)
    centre = np.unravel_index(depth.argmax(), inside.shape)
    radius_mm = min(radius_mm, 0.5 * float(depth.max()))
    tumor = _ball(case.image.shape, centre, radius_mm, case.spacing) & inside
    image = case.image.copy()
    image[tumor] += contrast_hu
    return image, tumor


def reconstruction(backbone, case) -> dict:
    recon, psnr = reconstruct(backbone, case.image, case.modality)
    intensity = backbone.intensity(case.modality, case.image)
    body = case.organs > 0
    organs = {}
    for name, label in ORGAN_LABELS.items():
        inside = case.organs == label
        if label and inside.sum() >= 200:
            organs[name] = float(np.abs(recon - case.image)[inside].mean())
    # CT in HU; MRI in percent of its normalisation range (raw MRI units mean nothing across scanners)
    unit = 1.0 if case.modality == "CT" else 100.0 / (intensity.knots[-1] - intensity.knots[0])
    return {"case": case.case_id, "modality": case.modality,
            "mae_body": unit * float(np.abs(recon - case.image)[body].mean()),
            "mae_organs": {k: unit * v for k, v in organs.items()}, "psnr_db": psnr}


def healthy_inpainting(backbone, text_encoder, case, config: InpaintConfig, radius_mm: float = 12.0) -> dict:
    _, disk = insert_test_tumor(case, "liver", radius_mm, contrast_hu=0.0)  # a hole, not a tumor
    cond, uncond = healthy_conditioning(text_encoder, "CT", case.region, "liver")
    inpainted, _ = pseudo_healthy(backbone, case.image, "CT", disk, cond, uncond, config)
    smoothed = ndimage.gaussian_filter(inpainted, sigma=(1, 1, 0))
    truth = ndimage.gaussian_filter(case.image, sigma=(1, 1, 0))  # compare like with like: smooth both
    liver = case.organs == ORGAN_LABELS["liver"]
    mae = float(np.abs(smoothed - truth)[disk].mean())
    body_fill = float(np.abs(case.image[case.organs > 0].mean() - truth)[disk].mean())
    liver_fill = float(np.abs(case.image[liver & ~disk].mean() - truth)[disk].mean())  # the stronger baseline
    return {"case": case.case_id, "voxels": int(disk.sum()), "mae_inpainted": mae, "mae_body_mean_fill": body_fill,
            "mae_liver_mean_fill": liver_fill, "ratio": mae / body_fill}


def pseudo_healthy_test(backbone, text_encoder, case, organ: str, config: InpaintConfig, *, radius_mm: float = 12.0,
                        margin_mm: float = 5.0) -> dict:
    image, tumor = insert_test_tumor(case, organ, radius_mm)
    region = enlarge_mask(tumor, case.spacing, margin_mm)
    cond, uncond = healthy_conditioning(text_encoder, "CT", case.region, organ.split("_")[0])
    # an organ-aware denoiser is told where the organs are by the case's own organ map (as a user's organ mask would)
    organs = conditioning_organ_index(case.organs) if getattr(backbone, "organ_channels", ()) else None
    healthy_estimate, spread = pseudo_healthy(backbone, image, "CT", region, cond, uncond, config, organs=organs)
    means = {"input": float(image[tumor].mean()), "pseudo_healthy": float(healthy_estimate[tumor].mean()),
             "healthy": float(case.image[tumor].mean())}
    found = (np.abs(image - healthy_estimate) > 20.0) & region
    return {"case": case.case_id, "organ": organ, "tumor_voxels": int(tumor.sum()), "mean_hu": means,
            "ratio": abs(means["pseudo_healthy"] - means["healthy"]) / abs(means["input"] - means["healthy"]),
            "organ_mean_fill_ratio": organ_mean_fill_ratio(case, image, tumor, region, organ),
            "dice_residual_gt_20hu": dice(found, tumor), "spread_hu": float(spread[tumor].mean())}


def organ_mean_fill_ratio(case, image: np.ndarray, tumor: np.ndarray, region: np.ndarray, organ: str) -> float:
    """The pseudo-healthy ratio of a fill with the organ's mean outside the inpainted ``region``: how far the healthy
    organ under the tumor is from its surroundings' average (what only a model of the organ's structure recovers)."""
    fill = float(case.image[(case.organs == ORGAN_LABELS[organ]) & ~region].mean())
    healthy = float(case.image[tumor].mean())
    return abs(fill - healthy) / abs(float(image[tumor].mean()) - healthy)


def stage_timings(backbone, case, config: InpaintConfig, text_encoder) -> dict:
    seconds = {}
    tic = time.perf_counter()
    intensity = backbone.intensity(case.modality, case.image)
    x = backbone.volume_to_slices(intensity.forward(case.image))
    seconds["to_model_space"] = time.perf_counter() - tic
    for name, run in (("encode", lambda: backbone.encode(x)), ("encode_features", lambda: backbone.encode_features(x))):
        tic = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - tic
    z = backbone.encode(x)
    tic = time.perf_counter()
    backbone.decode(z)
    seconds["decode"] = time.perf_counter() - tic
    cond, uncond = healthy_conditioning(text_encoder, case.modality, case.region, "liver")
    tic = time.perf_counter()
    backbone.denoise(z, 500, cond.expand(len(z)))
    seconds["denoise_step"] = time.perf_counter() - tic
    everywhere = np.zeros(case.image.shape, bool)
    everywhere[40:88, 40:88, :] = True  # every slice holds mask: the whole-volume worst case
    tic = time.perf_counter()
    pseudo_healthy(backbone, case.image, case.modality, everywhere, cond, uncond, replace(config, samples=1))
    seconds[f"inpaint_{len(x)}_slices_{config.steps}_steps"] = time.perf_counter() - tic
    return {"slices": len(x), "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def check_foundation(backbone, text_encoder, *, seed: int = 7, shape=(128, 128, 64),
                     config: InpaintConfig = InpaintConfig(samples=2), pseudo_healthy_seeds: tuple[int, ...] = (),
                     organs: tuple[str, ...] = PSEUDO_HEALTHY_ORGANS) -> dict:
    """The report; the pseudo-healthy test runs on the healthy abdomens of ``seed`` and ``seed + 1``, or of
    ``pseudo_healthy_seeds`` when given (more seeds: ratios that move less from case to case)."""
    unknown = sorted(set(organs) - set(PSEUDO_HEALTHY_ORGANS))
    if unknown or not organs:
        raise InputError(f"organs {unknown or '(none)'}: the pseudo-healthy test knows "
                         f"{', '.join(PSEUDO_HEALTHY_ORGANS)}")
    torch.manual_seed(0)
    cases = {region: phantoms.generate_case("healthy", 0, seed, shape, region=region)
             for region in ("abdomen", "thorax", "brain")}
    abdomens = {case_seed: cases["abdomen"] if case_seed == seed else
                phantoms.generate_case("healthy", 0, case_seed, shape, region="abdomen")
                for case_seed in pseudo_healthy_seeds or (seed, seed + 1)}
    report = {"seed": seed, "inpaint": vars(config).copy(),
              "reconstruction": [reconstruction(backbone, case) for case in cases.values()],
              "healthy_inpainting": healthy_inpainting(backbone, text_encoder, cases["abdomen"], config),
              "pseudo_healthy": [{"seed": case_seed, **pseudo_healthy_test(backbone, text_encoder, case, organ, config)}
                                 for organ in organs for case_seed, case in abdomens.items()]}
    report["pseudo_healthy_mean"] = {organ: float(np.mean([r["ratio"] for r in report["pseudo_healthy"]
                                                           if r["organ"] == organ])) for organ in organs}
    report["timings"] = stage_timings(backbone, cases["abdomen"], config, text_encoder)
    report["pass"] = all(r["ratio"] <= RATIO_LIMIT for r in report["pseudo_healthy"])
    return report


def format_report(report: dict) -> str:
    lines = [f"held-out healthy phantoms (seed {report['seed']}); inpainting: {report['inpaint']}", "",
             "VAE reconstruction"]
    for r in report["reconstruction"]:
        unit = "HU" if r["modality"] == "CT" else "% of range"
        organs = ", ".join(f"{k} {v:.1f}" for k, v in r["mae_organs"].items())
        lines.append(f"  {r['case']:20s} MAE body {r['mae_body']:6.1f} {unit}, PSNR {r['psnr_db']:.1f} dB")
        lines.append(f"  {'':20s} MAE per organ: {organs}")
    h = report["healthy_inpainting"]
    lines += ["", "healthy inpainting (liver disk, smoothed)",
              f"  MAE inpainted {h['mae_inpainted']:.1f} HU vs body-mean fill {h['mae_body_mean_fill']:.1f} HU "
              f"(ratio {h['ratio']:.2f}) and liver-mean fill {h['mae_liver_mean_fill']:.1f} HU; {h['voxels']} voxels",
              "",
              f"pseudo-healthy ({TUMOR_CONTRAST_HU:+.0f} HU tumor; ratio |H - healthy| / |I - healthy| must be <= "
              f"{RATIO_LIMIT} in each organ, on each seed)"]
    for r in report["pseudo_healthy"]:
        m = r["mean_hu"]
        lines.append(f"  {r['organ']:12s} seed {r['seed']:<3d} I {m['input']:6.1f}  H {m['pseudo_healthy']:6.1f}  "
                     f"healthy {m['healthy']:6.1f}"
                     f"  ratio {r['ratio']:.3f} (organ-mean fill {r['organ_mean_fill_ratio']:.3f})"
                     f"  DSC(|I-H|>20 HU) {r['dice_residual_gt_20hu']:.3f}"
                     f"  spread {r['spread_hu']:.1f} HU")
    means = ", ".join(f"{organ} {ratio:.3f}" for organ, ratio in report["pseudo_healthy_mean"].items())
    lines.append(f"  mean ratio per organ over {len({r['seed'] for r in report['pseudo_healthy']})} seeds: {means}")
    t = report["timings"]
    lines += ["", f"per-stage times, one {t['slices']}-slice volume (s)"]
    lines += [f"  {k:28s} {v:7.3f}" for k, v in t["seconds"].items()]
    lines += ["", "PASS" if report["pass"] else "FAIL: a pseudo-healthy ratio is above the limit"]
    return "\n".join(lines)
