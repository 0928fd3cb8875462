"""``diffseg-synthesize ckpt_path=... n=...``: image / instance-map pairs from the nuclei generators, MoNuSeg layout.

The checkpoint is a :class:`~diffseg_lightning.methods.nuclei_aug.NucleiAugmentationModule` run (Yu et al.,
MICCAI 2023). Pairs are generated in batches (:meth:`NucleiAugmentationModule.generate`: structure DDPM,
Hover-Net inversion with the eight swap / sign combinations, guided SPADE image DDPM) and written as
``Tissue Images/<prefix>_<k>.tif`` (RGB, 8 bit) and ``Annotations/<prefix>_<k>.xml`` (Aperio ImageScope
XML, one ``Region`` polygon per nucleus), the layout :class:`~diffseg_lightning.data.monuseg.MoNuSeg` reads.
``synthesis.json`` beside them records the settings, the combinations kept and the time per pair.
"""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from skimage.measure import find_contours

from diffseg_lightning.data.monuseg import TRAIN_ANNOTATIONS, TRAIN_IMAGES
from diffseg_lightning.entry import load_checkpoint, module_from_checkpoint
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors
from diffseg_lightning.utils.atomic import atomic_write
from diffseg_lightning.utils.errors import ConfigError, DiffSegError
from diffseg_lightning.validate import check_inference, validate_config

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


def instance_polygons(instances: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """One closed outline per instance of an (H, W) map: ``(id, (N, 2) float (x, y))`` in id order.

    The outline is the 0.5 iso-line of the instance's indicator (``skimage.measure.find_contours`` on the
    map padded by one pixel), which passes half way between the instance's pixel centres and its
    neighbours', so :func:`~diffseg_lightning.data.monuseg.rasterize_instances` (pixel centres inside the
    polygon) gives the instance back. An instance in several pieces keeps its longest outline; holes are
    not written (MoNuSeg polygons have none).
    """
    out = []
    for k in np.unique(instances[instances > 0]):
        contours = find_contours(np.pad(instances == k, 1).astype(np.float32), 0.5)
        if not contours:
            continue
        rc = max(contours, key=len) - 1.0  # undo the padding
        if len(rc) >= 4:
            out.append((int(k), rc[:, ::-1]))
    return out


def annotation_xml(polygons: list[tuple[int, np.ndarray]], microns_per_pixel: float | None = None) -> bytes:
    """The MoNuSeg (Aperio ImageScope) XML of a list of ``(id, (N, 2) (x, y))`` polygons."""
    root = ET.Element("Annotations")
    if microns_per_pixel is not None:
        root.set("MicronsPerPixel", f"{float(microns_per_pixel):.6f}")
    annotation = ET.SubElement(root, "Annotation", Id="1")
    regions = ET.SubElement(annotation, "Regions")
    for number, (_, xy) in enumerate(polygons, start=1):
        region = ET.SubElement(regions, "Region", Id=str(number))
        vertices = ET.SubElement(region, "Vertices")
        for x, y in xy:
            ET.SubElement(vertices, "Vertex", X=f"{x:.2f}", Y=f"{y:.2f}", Z="0")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def to_uint8(image: torch.Tensor, image_range: tuple[float, float]) -> np.ndarray:
    """(C, H, W) image in ``image_range`` -> (H, W, C) uint8 RGB (a single channel is repeated)."""
    low, high = image_range
    x = ((image.float().cpu() - low) / (high - low)).clamp(0, 1) * 255.0
    x = x.round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[..., :3]


def write_pair(
    folder: Path, name: str, image: np.ndarray, instances: np.ndarray, microns: float | None
) -> int:
    """Write ``name.tif`` and ``name.xml`` in the MoNuSeg layout under ``folder``; returns the polygon count."""
    polygons = instance_polygons(instances)
    tif = folder / TRAIN_IMAGES / f"{name}.tif"
    xml = folder / TRAIN_ANNOTATIONS / f"{name}.xml"
    tif.parent.mkdir(parents=True, exist_ok=True)
    xml.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(tif, lambda tmp: Image.fromarray(image).save(tmp, format="TIFF"))
    atomic_write(xml, lambda tmp: tmp.write_bytes(annotation_xml(polygons, microns)))
    return len(polygons)


def synthesize(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``cfg.n`` pairs from ``cfg.ckpt_path`` into ``cfg.output_dir``; returns the record written
    to ``synthesis.json``."""
    validate_config(cfg, sampling=False, unused=("data",))  # before anything is read or written
    L.seed_everything(cfg.seed, workers=True)
    if int(cfg.n) < 1:
        raise DiffSegError(f"n must be >= 1, got {cfg.n}")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    check_inference(cfg, checkpoint["diffseg_config"])  # the sampler against the trained kernel
    target = checkpoint["diffseg_config"]["model"].get("_target_", "")
    if not target.endswith("NucleiAugmentationModule"):
        raise DiffSegError(
            f"checkpoint {cfg.ckpt_path} is a {target.rsplit('.', 1)[-1] or 'unknown'} run; diffseg-synthesize "
            "needs a NucleiAugmentationModule run (experiment=nuclei_aug)"
        )
    if cfg.device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {cfg.device!r}")
    module = module_from_checkpoint(checkpoint, cfg.sampler)
    if cfg.get("structure_ckpt_path"):  # stage 1 from another run (e.g. model.stage=structure)
        other = load_checkpoint(cfg.structure_ckpt_path)["state_dict"]
        weights = {
            k.removeprefix("structure_net."): v for k, v in other.items() if k.startswith("structure_net.")
        }
        if not weights:
            raise DiffSegError(f"checkpoint {cfg.structure_ckpt_path} holds no structure_net weights")
        module.structure_net.load_state_dict(weights)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = module.to(device).eval()
    size = cfg.size if cfg.get("size") is not None else checkpoint["diffseg_config"]["data"]["size"]
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    folder = Path(cfg.output_dir)
    (folder / TRAIN_IMAGES).mkdir(parents=True, exist_ok=True)
    (folder / TRAIN_ANNOTATIONS).mkdir(parents=True, exist_ok=True)
    n, batch = int(cfg.n), max(1, int(cfg.batch_size))
    counts, combinations, seconds = [], [], 0.0
    for start in range(0, n, batch):
        m = min(batch, n - start)
        begin = time.perf_counter()
        out = module.generate(
            m, size, seed=int(cfg.seed) + start, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale
        )
        if out["image"].is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - begin
        for i in range(m):
            name = f"{cfg.prefix}_{start + i:05d}"
            image = to_uint8(out["image"][i], module.image_range)
            counts.append(
                write_pair(folder, name, image, out["instances"][i].cpu().numpy(), cfg.microns_per_pixel)
            )
        combinations.extend(out["combination"].tolist())
        log.info("generated %d / %d pairs", start + m, n)
    record = {
        "ckpt_path": str(cfg.ckpt_path),
        "n": n,
        "size": list(size),
        "num_steps": int(cfg.num_steps),
        "guidance_scale": float(cfg.guidance_scale),
        "sampling": module.solver.name,  # the solver of generation (sampler.solver)
        "seed": int(cfg.seed),
        "device": device,
        "seconds_per_pair": seconds / n,
        "instances_per_pair": counts,
        "combination_counts": {str(k): combinations.count(k) for k in sorted(set(combinations))},
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    (folder / "synthesis.json").write_text(json.dumps(record, indent=1, default=str))
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="synthesize")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        synthesize(cfg)


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
